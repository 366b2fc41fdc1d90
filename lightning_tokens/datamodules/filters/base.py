"""The base of data-level filters: the :class:`RecordFilter` interface, a record's ``(instruction, response)``
texts, import paths, and keeping the lowest scores."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_tokens.core.errors import ConfigError

__all__ = ["RecordFilter", "record_texts", "select_lowest"]

Record = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def record_texts(record: Record) -> tuple[str, str]:
    """``(instruction, response)`` of a raw SFT record.

    - ``{prompt, response}``: the prompt and the response;
    - ``{messages}``: the contents of the non-assistant messages, and of the assistant messages, each
      joined with ``"\\n"`` (a single-turn chat gives its user message and its answer);
    - ``{text}``: ``""`` and the text.

    Example:
        >>> record_texts({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
        ('2+2?', '4')
    """
    if "messages" in record and isinstance(record["messages"], list):
        messages = [m for m in record["messages"] if isinstance(m, Mapping)]
        instruction = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "assistant")
        response = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "assistant")
        return instruction, response
    if "prompt" in record or "response" in record:
        return str(record.get("prompt") or ""), str(record.get("response") or "")
    return "", str(record.get("text") or "")


def select_lowest(scores: Sequence[float] | np.ndarray, keep_fraction: float | None = None, max_score: float | None = None) -> np.ndarray:
    """Keep mask of the records with the lowest scores.

    With ``keep_fraction``: the ``ceil(keep_fraction · n)`` lowest scores (ties: the earlier record
    first; NaN scores last). Otherwise with ``max_score``: every score ``<= max_score`` (NaN never).

    Example:
        >>> select_lowest([0.3, 0.1, 0.2, 0.1], keep_fraction=0.5).tolist()
        [False, True, False, True]
        >>> select_lowest([0.3, 0.1, 0.2], max_score=0.2).tolist()
        [False, True, True]
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if keep_fraction is not None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ConfigError(f"keep_fraction={keep_fraction} must lie in (0, 1].")
        count = math.ceil(keep_fraction * len(values) - 1e-9)
        keyed = np.where(np.isnan(values), np.inf, values)
        order = np.argsort(keyed, kind="stable")
        keep = np.zeros(len(values), dtype=bool)
        keep[order[:count]] = True
        return keep
    if max_score is None:
        raise ConfigError("give keep_fraction or a threshold.")
    return np.nan_to_num(values, nan=np.inf) <= max_score


# ----------------------------------------------------------------------------------------------------
# The base filter
# ----------------------------------------------------------------------------------------------------
class RecordFilter:
    """Base class of data filters: ``keep(records, tokenizer) -> bool mask``.

    Score-based filters implement :meth:`scores` (lower is better) and set :attr:`keep_fraction` or a
    threshold; :meth:`keep` stores the scores of its last call in :attr:`last_scores`. A filter must be
    deterministic: every rank of a distributed run applies it on its own and must keep the same
    records.
    """

    keep_fraction: float | None = None
    last_scores: np.ndarray | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def scores(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        """``(n,)`` float64 scores, lower is better."""
        raise NotImplementedError

    def threshold(self) -> float | None:
        """The score a record may have at most (used when ``keep_fraction`` is ``None``)."""
        return None

    def keep(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        """``(n,)`` bool: which of ``records`` to keep. ``tokenizer`` is the datamodule's."""
        scores = np.asarray(self.scores(records, tokenizer), dtype=np.float64).reshape(-1)
        if len(scores) != len(records):
            raise ConfigError(f"{self.name} gave {len(scores)} scores for {len(records)} records.")
        self.last_scores = scores
        return select_lowest(scores, self.keep_fraction, self.threshold())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "last_scores")
        return f"{self.name}({args})"


def _check_selection(owner: str, keep_fraction: float | None, threshold_name: str, threshold: float | None) -> None:
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise ConfigError(f"{owner}(keep_fraction={keep_fraction}): keep_fraction must lie in (0, 1].")
    if keep_fraction is None and threshold is None:
        raise ConfigError(f"{owner}: set keep_fraction (keep the best part) or {threshold_name} (a threshold).")
