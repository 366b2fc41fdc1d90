"""Number Cookbook rewards: the generated answer scored against the target by ``nupa_scores``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.metrics.nupa import extract_answer, nupa_scores


def _scores(completions: Sequence[str], answers: Sequence[str] | None, domains: Sequence[str] | None, index: int) -> list[float]:
    if answers is None or domains is None:
        raise ConfigError(
            "the NUPA rewards need the batch columns `answers` and `domains` (NUPADataModule with "
            "train_format: prompts provides them)."
        )
    return [
        float(nupa_scores(extract_answer(text, domain, continuation=True), answer, domain)[index])
        for text, answer, domain in zip(completions, answers, domains)
    ]


def nupa_exact_match(
    completions: Sequence[str], answers: Sequence[str] | None = None, domains: Sequence[str] | None = None, **_: Any
) -> list[float]:
    """1.0 where the answer at the start of the completion equals the target exactly, else 0.0.

    Example:
        >>> nupa_exact_match([" 1287", "1288", "no"], answers=["1287"] * 3, domains=["Integer"] * 3)
        [1.0, 0.0, 0.0]
    """
    return _scores(completions, answers, domains, 0)


def nupa_digit_match(
    completions: Sequence[str], answers: Sequence[str] | None = None, domains: Sequence[str] | None = None, **_: Any
) -> list[float]:
    """The fraction of the target's digits matched in place (``nupa_scores``' digit match), a denser reward.

    Example:
        >>> nupa_digit_match(["1244"], answers=["1234"], domains=["Integer"])
        [0.75]
    """
    return _scores(completions, answers, domains, 1)
