"""Number Cookbook (NUPA) scoring: exact match, digit match and digit-length error.

Re-implements the scoring of the Number Cookbook benchmark (Yang et al., ICLR 2025, arXiv 2411.03766;
reference code ``GraphPKU/number_cookbook`` @46aefaa, ``src/text_model/metrics.py::StringMetrics`` and
``MetricsRecorder.retrieve_answer``) as pure functions plus thin ``torchmetrics`` classes.

Scoring works on *digit parts*. A string is cleaned into parts according to the answer's domain
(``Integer`` → [int]; ``Float`` → [int, frac] split on ``"."``; ``Fraction`` → [num, den] split on
``"/"``; ``ScientificNotation`` → [int, frac, exp] split on ``"e"`` then ``"."``); every non-digit
character (signs, spaces, commas) is dropped from each part. Then

* ``exact_match`` = 1 if all parts are equal, else 0;
* ``digit_match`` = Σ_parts Σ_aligned 1[pred digit == target digit] / Σ_parts len(target part), where a
  part is aligned from its least significant digit ("right": integer parts, numerators, denominators,
  exponents) or from its most significant digit ("left": fractional parts);
* ``dlength`` = \\|Σ len(pred parts) − Σ len(target parts)\\|.

A string that lacks a separator its domain needs (``"12"`` scored as a Float) is cleaned to empty parts,
exactly as in the reference, so it scores 0 digit matches and its dlength is the target's digit count.

Example:
    >>> nupa_scores("1244", "1234", "Integer")
    (0.0, 0.75, 0)
    >>> extract_answer("Add two numbers: 744 + 543 = 1287 and more")
    '1287'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from lightning_tokens.core.errors import ConfigError

__all__ = [
    "NUPA_DOMAINS",
    "NUPADigitLengthError",
    "NUPADigitMatch",
    "NUPAExactMatch",
    "extract_answer",
    "normalize_domain",
    "nupa_digit_parts",
    "nupa_metric_collection",
    "nupa_scores",
]

#: The four number representations of the Number Cookbook.
NUPA_DOMAINS: tuple[str, ...] = ("Integer", "Float", "Fraction", "ScientificNotation")

# Alignment direction of each digit part (reference: `NumberBasic.default_read_direct`).
_READ_DIRECTION: dict[str, tuple[str, ...]] = {
    "Integer": ("right",),
    "Float": ("right", "left"),
    "Fraction": ("right", "right"),
    "ScientificNotation": ("right", "left", "right"),
}

# Answer patterns of `MetricsRecorder.retrieve_answer`, matched at the start of the answer text.
_ANSWER_PATTERNS: dict[str, str] = {
    "Integer": r"\d+",
    "Float": r"\d+\.\d+",
    "Fraction": r"\d+/\d+",
    "ScientificNotation": r"\d+\.\d+[eE][+-]?\d+",
}
# Without a domain, the most specific pattern that matches wins.
_PATTERN_ORDER: tuple[str, ...] = ("ScientificNotation", "Float", "Fraction", "Integer")


def normalize_domain(domain: str) -> str:
    """Validate a domain name; the reference's output type ``"int"`` is an alias of ``"Integer"``.

    Raises:
        ValueError: ``domain`` is not one of :data:`NUPA_DOMAINS` (or ``"int"``).

    Example:
        >>> normalize_domain("int")
        'Integer'
    """
    if domain == "int":
        return "Integer"
    if domain not in _READ_DIRECTION:
        raise ConfigError(f"Unknown NUPA domain {domain!r}; valid domains are {', '.join(NUPA_DOMAINS)} (or 'int').")
    return domain


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def nupa_digit_parts(text: str, domain: str) -> list[str]:
    """Clean ``text`` into the digit parts of ``domain`` (reference: ``StringMetrics._clean_str_and_part``).

    Non-digit characters are dropped from every part. A missing separator gives all-empty parts.

    Example:
        >>> nupa_digit_parts("-12.50", "Float")
        ['12', '50']
        >>> nupa_digit_parts("1.2e3", "ScientificNotation")
        ['1', '2', '3']
        >>> nupa_digit_parts("12", "Float")
        ['', '']
    """
    domain = normalize_domain(domain)
    if domain == "Integer":
        return [_digits(text)]
    try:
        if domain == "Float":
            parts = text.split(".")
            return [_digits(parts[0]), _digits(parts[1])]
        if domain == "Fraction":
            parts = text.split("/")
            return [_digits(parts[0]), _digits(parts[1])]
        # ScientificNotation: mantissa and exponent split on a lowercase "e", then the mantissa on ".".
        mantissa_exp = text.split("e")
        parts = mantissa_exp[0].split(".") + [mantissa_exp[1]]
        return [_digits(parts[0]), _digits(parts[1]), _digits(parts[2])]
    except IndexError:
        return [""] * len(_READ_DIRECTION[domain])


def nupa_scores(pred: str, target: str, domain: str) -> tuple[float, float, int]:
    """Score one prediction against its target: ``(exact_match, digit_match, dlength)``.

    Follows ``StringMetrics.__call__`` of the Number Cookbook. ``pred`` is scored as given; run
    :func:`extract_answer` on generated text first.

    Args:
        pred: predicted answer string, e.g. ``"1244"``; ``""`` for no answer.
        target: ground-truth answer string, e.g. ``"1234"``.
        domain: the answer's representation, one of :data:`NUPA_DOMAINS` (``"int"`` = ``"Integer"``).

    Returns:
        ``exact_match`` (0.0 or 1.0), ``digit_match`` in [0, 1] and ``dlength`` (a non-negative int).
        If the target has no digits at all (never the case for generated data), ``digit_match``
        equals ``exact_match`` instead of dividing by zero.

    Raises:
        ValueError: unknown ``domain``; the message lists the valid ones.

    Example:
        >>> nupa_scores("1244", "1234", "Integer")
        (0.0, 0.75, 0)
        >>> nupa_scores("234", "1234", "Integer")
        (0.0, 0.75, 1)
        >>> nupa_scores("12.35", "2.345", "Float")
        (0.0, 0.5, 0)
        >>> nupa_scores("7/13", "7/13", "Fraction")
        (1.0, 1.0, 0)
    """
    domain = normalize_domain(domain)
    pred_parts = nupa_digit_parts(pred, domain)
    gt_parts = nupa_digit_parts(target, domain)
    exact = float(pred_parts == gt_parts)
    matched = 0
    for pred_p, gt_p, direction in zip(pred_parts, gt_parts, _READ_DIRECTION[domain]):
        if direction == "right":
            pred_p, gt_p = pred_p[::-1], gt_p[::-1]
        matched += sum(p == g for p, g in zip(pred_p, gt_p))
    gt_len = sum(len(p) for p in gt_parts)
    digit_match = matched / gt_len if gt_len > 0 else exact
    dlength = abs(sum(len(p) for p in pred_parts) - gt_len)
    return exact, float(digit_match), dlength


def extract_answer(
    text: str, domain: str | None = None, *, continuation: bool | None = None, start_answer: str = " = "
) -> str:
    """Pull the answer out of generated text (reference: ``MetricsRecorder.retrieve_answer``).

    Steps, as in the reference: keep the text after the **first** ``start_answer`` (``" = "``) if there
    is one, strip whitespace, then match a number pattern at the very start; finally drop ``+``/``-``
    signs and turn ``E`` into ``e``. Patterns: ``Integer`` ``\\d+``, ``Float`` ``\\d+\\.\\d+``,
    ``Fraction`` ``\\d+/\\d+``, ``ScientificNotation`` ``\\d+\\.\\d+[eE][+-]?\\d+``. No leading minus
    sign is accepted (the benchmark's answers are non-negative), so ``"-5"`` gives ``""``.

    The reference scores prompt + continuation, where the first ``" = "`` ends the prompt. A bare
    continuation (what is generated after the prompt) is matched at its start instead, so that a
    model that rambles on (``"1287 Add two numbers: 1 + 2 = 3"``) is scored on ``1287`` as the
    reference would.

    Args:
        text: generated text: the continuation alone, or prompt + continuation.
        domain: the expected answer domain; its pattern is used, as in the reference. ``None``
            (the library's extension) tries the most specific pattern first: ScientificNotation,
            Float, Fraction, then Integer.
        continuation: ``True``: ``text`` is a bare continuation (no marker search); ``False``: cut at
            the first ``start_answer`` as the reference does; ``None`` (default): a continuation if the
            stripped text starts with a digit (every NUPA prompt starts with words), else cut.
        start_answer: the marker after which the answer starts.

    Returns:
        The matched answer, or ``""`` if nothing matches.

    Example:
        >>> extract_answer("Add two numbers: 744 + 543 = 1287")
        '1287'
        >>> extract_answer(" 3.25 is it = 4")
        '3.25'
        >>> extract_answer("1.2E+3", domain="ScientificNotation")
        '1.2e3'
        >>> extract_answer("12.5", domain="Integer")
        '12'
        >>> extract_answer("no number")
        ''
    """
    if continuation is None:
        continuation = text.lstrip()[:1].isdigit()
    if not continuation and start_answer:
        marker = text.find(start_answer)
        if marker >= 0:
            text = text[marker + len(start_answer) :]
    text = text.strip()
    domains = (normalize_domain(domain),) if domain is not None else _PATTERN_ORDER
    for name in domains:
        match = re.match(_ANSWER_PATTERNS[name], text)
        if match is not None:
            return match.group().replace("+", "").replace("-", "").replace("E", "e")
    return ""


def _broadcast_domains(domains: Sequence[str] | str, n: int) -> list[str]:
    if isinstance(domains, str):
        return [domains] * n
    domains = list(domains)
    if len(domains) != n:
        raise ConfigError(f"Got {n} predictions but {len(domains)} domains.")
    return domains


def _nupa_update(
    preds: Sequence[str], targets: Sequence[str], domains: Sequence[str] | str, index: int
) -> tuple[float, int]:
    """Sum of score ``index`` (0 exact match, 1 digit match, 2 dlength) over a batch, and its size."""
    if isinstance(preds, str) or isinstance(targets, str):
        raise TypeError("preds and targets must be sequences of strings, not a single string.")
    preds, targets = list(preds), list(targets)
    if len(preds) != len(targets):
        raise ConfigError(f"Got {len(preds)} predictions but {len(targets)} targets.")
    total = 0.0
    for pred, target, domain in zip(preds, targets, _broadcast_domains(domains, len(preds))):
        total += float(nupa_scores(pred, target, domain)[index])
    return total, len(preds)


class _NUPAMeanMetric(Metric):
    """Mean of one NUPA score over all examples seen (summed across processes)."""

    is_differentiable = False
    full_state_update = False
    _score_index: int = 0
    # Distinct state names per subclass keep MetricCollection from merging the three metrics into one
    # compute group (their states can coincide on a batch, e.g. when every prediction is right).
    _state_prefix: str = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state(f"{self._state_prefix}_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state(f"{self._state_prefix}_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str], domains: Sequence[str] | str) -> None:
        """Add a batch of predicted answer strings, target strings and their domains (one or per example)."""
        total, n = _nupa_update(preds, targets, domains, self._score_index)
        name = self._state_prefix
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + total)
        setattr(self, f"{name}_count", getattr(self, f"{name}_count") + n)

    def compute(self) -> torch.Tensor:
        """Mean over all examples (NaN before any example), as a float32 scalar."""
        total = getattr(self, f"{self._state_prefix}_sum")
        count = getattr(self, f"{self._state_prefix}_count")
        if int(count) == 0:
            return torch.tensor(float("nan"), device=total.device)
        return (total / count).float()


class NUPAExactMatch(_NUPAMeanMetric):
    """Fraction of answers whose digit parts all equal the target's (Number Cookbook exact match).

    Example:
        >>> m = NUPAExactMatch()
        >>> m.update(["1287", "12"], ["1287", "13"], "Integer")
        >>> float(m.compute())
        0.5
    """

    higher_is_better = True
    _score_index = 0
    _state_prefix = "exact_match"


class NUPADigitMatch(_NUPAMeanMetric):
    """Mean per-example fraction of target digits reproduced at aligned positions (digit match).

    Example:
        >>> m = NUPADigitMatch()
        >>> m.update(["1244", "12.35"], ["1234", "2.345"], ["Integer", "Float"])
        >>> float(m.compute())
        0.625
    """

    higher_is_better = True
    _score_index = 1
    _state_prefix = "digit_match"


class NUPADigitLengthError(_NUPAMeanMetric):
    """Mean absolute difference between predicted and target digit counts (dlength).

    Example:
        >>> m = NUPADigitLengthError()
        >>> m.update(["234", ""], ["1234", "56"], "Integer")
        >>> float(m.compute())
        1.5
    """

    higher_is_better = False
    _score_index = 2
    _state_prefix = "dlength"


def nupa_metric_collection(prefix: str = "val/") -> MetricCollection:
    """The three NUPA metrics under keys ``exact_match``, ``digit_match`` and ``dlength``.

    Every metric takes ``update(preds, targets, domains)`` with answer strings (already extracted).

    Example:
        >>> metrics = nupa_metric_collection("val/")
        >>> metrics.update(["1244"], ["1234"], ["Integer"])
        >>> {k: round(float(v), 2) for k, v in sorted(metrics.compute().items())}
        {'val/digit_match': 0.75, 'val/dlength': 0.0, 'val/exact_match': 0.0}
    """
    return MetricCollection(
        {
            "exact_match": NUPAExactMatch(),
            "digit_match": NUPADigitMatch(),
            "dlength": NUPADigitLengthError(),
        },
        prefix=prefix,
        compute_groups=False,
    )
