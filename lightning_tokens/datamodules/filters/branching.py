"""Long chain-of-thought branching density (arXiv 2604.01702): reasoning steps, the share that branch, and
:class:`BranchingDensityFilter`, which drops branch-heavy traces."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.filters.base import Record, RecordFilter, _check_selection, record_texts

__all__ = ["BRANCHING_KEYWORDS", "STEP_PATTERN", "BranchingDensityFilter", "branching_density", "split_steps"]


#: Branching keywords of the third-party implementation of the paper's "Proxy 2" (regexes, matched
#: case-insensitively at word boundaries); the paper's own list was not retrieved.
BRANCHING_KEYWORDS: tuple[str, ...] = (
    "perhaps",
    "another approach",
    "alternatively",
    "let me try",
    "wait",
    "let me reconsider",
    r"maybe (?:i|we) should",
    "on second thought",
    "what if",
)
#: Steps end at ``.``, ``!``, ``?`` or a newline.
STEP_PATTERN = r"[.!?\n]"


def split_steps(text: str, step_pattern: str = STEP_PATTERN, min_step_chars: int = 1) -> list[str]:
    """Reasoning steps: ``text`` split on ``step_pattern``, stripped, keeping steps of at least
    ``min_step_chars`` characters.

    Example:
        >>> split_steps("Let x=2. Wait, maybe we should use y. Alternatively set z. So answer 4.")
        ['Let x=2', 'Wait, maybe we should use y', 'Alternatively set z', 'So answer 4']
    """
    steps = (s.strip() for s in re.split(step_pattern, text))
    return [s for s in steps if s and len(s) >= min_step_chars]


def _keyword_regex(keywords: Sequence[str]) -> re.Pattern[str]:
    if not keywords:
        raise ConfigError("the branching keyword list is empty.")
    return re.compile(r"\b(?:" + "|".join(f"(?:{k})" for k in keywords) + r")\b", re.IGNORECASE)


def branching_density(
    text: str,
    keywords: Sequence[str] = BRANCHING_KEYWORDS,
    step_pattern: str = STEP_PATTERN,
    min_step_chars: int = 1,
) -> float:
    """Share of reasoning steps that contain a branching keyword (0 for a text without steps).

    Example (``shared/specs/text_methods.md`` §12 (f): 4 steps, 2 branching):
        >>> branching_density("Let x=2. Wait, maybe we should use y. Alternatively set z. So answer 4.")
        0.5
    """
    steps = split_steps(text, step_pattern, min_step_chars)
    if not steps:
        return 0.0
    regex = _keyword_regex(keywords)
    return sum(1 for s in steps if regex.search(s)) / len(steps)


def _thinking(text: str, tags: Sequence[str] | None) -> str:
    if not tags:
        return text
    open_tag, close_tag = tags
    start = text.find(open_tag)
    if start < 0:
        return text
    start += len(open_tag)
    end = text.find(close_tag, start)
    return text[start:] if end < 0 else text[start:end]


class BranchingDensityFilter(RecordFilter):
    """Drop long chain-of-thought traces that branch too often.

    Paper: "On the Role of Reasoning Patterns in the Generalization Discrepancy of Long CoT SFT"
    (arXiv 2604.01702): students inherit the redundant exploration of branch-heavy traces (DeepSeek-R1's
    many "Propose" steps); training on the subset without frequently-branching trajectories generalises
    better (+5.1% AIME25 in the paper). "Proxy 2" is the share of reasoning steps containing a
    branching keyword (:func:`branching_density`), computed on the response's ``<think>`` part when it
    has one (otherwise on the whole response).

    Ambiguities (``shared/specs/text_methods.md`` §12; the paper's list, segmentation, threshold and kept
    fraction were not retrieved):
        - *Keywords*: ``keywords`` (regexes); default :data:`BRANCHING_KEYWORDS`, the third-party list.
        - *Step segmentation*: ``step_pattern`` (default ``[.!?\\n]``) and ``min_step_chars``. Default 1
          (every non-empty step), which gives the spec's check (4 steps, density 0.5); the third-party
          code keeps steps longer than 10 characters (``min_step_chars: 11``; the same trace then has 3
          steps, density 2/3, filtered too).
        - *Threshold or fraction*: ``max_density`` (default 0.3: the third-party "> 0.30 is high"), or
          ``keep_fraction`` (the least-branching part), which takes precedence when set.

    Args:
        max_density: keep records whose density is at most this.
        keep_fraction: instead, keep this fraction of the records with the lowest density.
        keywords: branching keyword regexes, matched case-insensitively at word boundaries.
        step_pattern: regex that ends a step.
        min_step_chars: shortest step counted (after stripping).
        think_tags: ``[open, close]`` tags of the reasoning part; ``null`` scores the whole response.

    Example::

        filters = [BranchingDensityFilter(max_density=0.3)]
        dm = SFTDataModule(train_file="data/examples/long_cot.jsonl", filters=filters)
    """

    def __init__(
        self,
        max_density: float | None = 0.3,
        keep_fraction: float | None = None,
        keywords: list[str] | None = None,
        step_pattern: str = STEP_PATTERN,
        min_step_chars: int = 1,
        think_tags: tuple[str, str] | None = ("<think>", "</think>"),
    ) -> None:
        _check_selection("BranchingDensityFilter", keep_fraction, "max_density", max_density)
        if min_step_chars < 1:
            raise ConfigError(f"BranchingDensityFilter(min_step_chars={min_step_chars}): must be >= 1.")
        self.keywords = list(keywords) if keywords is not None else list(BRANCHING_KEYWORDS)
        _keyword_regex(self.keywords)  # fail early on a bad regex
        re.compile(step_pattern)
        if think_tags is not None and len(think_tags) != 2:
            raise ConfigError(f"BranchingDensityFilter(think_tags={think_tags!r}): give [open, close] or null.")
        self.max_density = max_density
        self.keep_fraction = keep_fraction
        self.step_pattern = step_pattern
        self.min_step_chars = min_step_chars
        self.think_tags = tuple(think_tags) if think_tags is not None else None

    def threshold(self) -> float | None:
        return self.max_density

    def scores(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        return np.array(
            [
                branching_density(_thinking(record_texts(r)[1], self.think_tags), self.keywords, self.step_pattern, self.min_step_chars)
                for r in records
            ],
            dtype=np.float64,
        )
