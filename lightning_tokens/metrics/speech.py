"""Speech metrics: error rates of transcripts (torchmetrics' WER and CER after a text normaliser), the
usage and perplexity of a speech tokenizer's codebook, and its token rate.

Example:
    >>> round(float(word_error_rate(["A x, c."], ["a b c"])), 4)
    0.3333
    >>> usage = CodebookUsage(4)
    >>> usage.update(torch.tensor([0, 0, 1, 1, -1]))
    >>> {k: round(float(v), 3) for k, v in usage.compute().items()}
    {'usage': 0.5, 'perplexity': 2.0}
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text import char_error_rate as _char_error_rate
from torchmetrics.functional.text import word_error_rate as _word_error_rate
from torchmetrics.text import CharErrorRate, WordErrorRate

from lightning_tokens.core.errors import ConfigError

__all__ = [
    "CodebookUsage",
    "NormalizedCharErrorRate",
    "NormalizedWordErrorRate",
    "char_error_rate",
    "normalize_transcript",
    "tokens_per_second",
    "word_error_rate",
]

_PUNCTUATION = re.compile(r"[^\w\s']|_")


def normalize_transcript(text: str) -> str:
    """Lower case, punctuation removed (apostrophes dropped, other marks become spaces), spaces collapsed.

    Example:
        >>> normalize_transcript("  Forty-two,  DON'T stop! ")
        'forty two dont stop'
    """
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).replace("'", "").split())


def _normalized(texts: str | Sequence[str], normalize: bool) -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts)
    return [normalize_transcript(t) for t in items] if normalize else items


def word_error_rate(predictions: str | Sequence[str], references: str | Sequence[str], normalize: bool = True) -> Tensor:
    """Word error rate of the corpus: (substitutions + deletions + insertions) / reference words.

    Example:
        >>> float(word_error_rate(["a b c"], ["a b c"]))
        0.0
    """
    return _word_error_rate(_normalized(predictions, normalize), _normalized(references, normalize))


def char_error_rate(predictions: str | Sequence[str], references: str | Sequence[str], normalize: bool = True) -> Tensor:
    """Character error rate of the corpus (spaces count as characters), after normalising both sides.

    Example:
        >>> round(float(char_error_rate(["abd"], ["ABC"])), 4)
        0.3333
    """
    return _char_error_rate(_normalized(predictions, normalize), _normalized(references, normalize))


class NormalizedWordErrorRate(WordErrorRate):
    """torchmetrics' ``WordErrorRate`` over :func:`normalize_transcript`-ed texts (DDP-safe sum states).

    Example:
        >>> metric = NormalizedWordErrorRate()
        >>> metric.update(["A x c!"], ["a b c"])
        >>> round(float(metric.compute()), 4)
        0.3333
    """

    def update(self, preds: str | list[str], target: str | list[str]) -> None:  # type: ignore[override]
        super().update(_normalized(preds, True), _normalized(target, True))


class NormalizedCharErrorRate(CharErrorRate):
    """torchmetrics' ``CharErrorRate`` over :func:`normalize_transcript`-ed texts (DDP-safe sum states)."""

    def update(self, preds: str | list[str], target: str | list[str]) -> None:  # type: ignore[override]
        super().update(_normalized(preds, True), _normalized(target, True))


class CodebookUsage(Metric):
    """How much of a codebook a tokenizer uses: the share of codes seen at least once (``usage``) and the
    perplexity of the code histogram (``exp`` of its entropy in nats; ``codebook_size`` when every code is
    equally frequent, 1 when one code is all).

    Negative codes (padding) are ignored. The histogram is a sum state: exact under DDP.

    Args:
        codebook_size: number of codes.

    Example:
        >>> metric = CodebookUsage(8)
        >>> metric.update(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items()}
        {'usage': 0.5, 'perplexity': 4.0}
    """

    full_state_update = False
    counts: Tensor

    def __init__(self, codebook_size: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if codebook_size <= 0:
            raise ConfigError(f"CodebookUsage(codebook_size={codebook_size}): must be a positive integer.")
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """Count ``codes`` (integer tensor of any shape; negative values are skipped)."""
        if codes.is_floating_point():
            raise ConfigError(f"CodebookUsage.update: codes must be integer ids, got a {codes.dtype} tensor.")
        flat = codes.reshape(-1).long()
        flat = flat[flat >= 0]
        if flat.numel() and int(flat.max()) >= self.codebook_size:
            raise ConfigError(
                f"CodebookUsage: code {int(flat.max())} is outside a codebook of {self.codebook_size}: set "
                "codebook_size to the tokenizer's."
            )
        self.counts += torch.bincount(flat, minlength=self.codebook_size).to(self.counts.device)

    def compute(self) -> dict[str, Tensor]:
        """``{"usage": used codes / codebook_size, "perplexity": exp(entropy)}`` (perplexity NaN before any code)."""
        counts = self.counts.double()
        total = counts.sum()
        usage = (self.counts > 0).sum().double() / self.codebook_size
        if total == 0:
            return {"usage": usage.float(), "perplexity": torch.tensor(float("nan"))}
        probabilities = counts[counts > 0] / total
        entropy = -(probabilities * probabilities.log()).sum()
        return {"usage": usage.float(), "perplexity": entropy.exp().float()}


def tokens_per_second(num_tokens: int, num_samples: int, sample_rate: int) -> float:
    """Tokens per second of audio: ``num_tokens`` for ``num_samples`` samples at ``sample_rate`` Hz.

    Example:
        >>> tokens_per_second(50, 32000, 16000)   # 2 s of audio, 50 tokens
        25.0
    """
    if num_samples <= 0 or sample_rate <= 0:
        raise ConfigError(f"tokens_per_second(num_samples={num_samples}, sample_rate={sample_rate}): both must be > 0.")
    return num_tokens * sample_rate / num_samples
