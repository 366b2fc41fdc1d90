"""A format reward: whether a completion matches a regular expression (tags, an answer pattern)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning_tokens.core.errors import ConfigError


class FormatReward:
    """1.0 for completions that match ``pattern`` (``re.search``, or the whole text with ``full_match``),
    else 0.0.

    Args:
        pattern: the regular expression, e.g. ``r"<think>.*?</think>\\s*<answer>.*?</answer>"``.
        full_match: the whole completion (stripped) must match, not only a part of it.
        dotall: ``.`` matches newlines too (reasoning spans several lines).

    Example:
        >>> reward = FormatReward(r"<answer>\\d+</answer>")
        >>> reward(["x <answer>12</answer>", "<answer>twelve</answer>"])
        [1.0, 0.0]
    """

    def __init__(self, pattern: str = r"<think>.*?</think>\s*<answer>.*?</answer>", full_match: bool = False, dotall: bool = True) -> None:
        try:
            self.regex = re.compile(pattern, re.DOTALL if dotall else 0)
        except re.error as error:
            raise ConfigError(f"FormatReward: pattern {pattern!r} is not a valid regular expression ({error}).") from None
        self.full_match = full_match
        self.__name__ = "format"

    def __call__(self, completions: Sequence[str], **_: Any) -> list[float]:
        match = self.regex.fullmatch if self.full_match else self.regex.search
        return [1.0 if match(text.strip() if self.full_match else text) else 0.0 for text in completions]
