"""Checks of record field values (numbers, strings, ``weight_spans``, ``token_weights``) that raise
:class:`~lightning_tokens.datamodules.sft.records.SFTDataError` naming the field."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lightning_tokens.datamodules.sft.records import _error

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(value: Any, location: str, name: str, from_csv: bool) -> float:
    if from_csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _error(location, name, f"expected a number, got {_short(value)}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(location, name, f"expected a number, got {_short(value)}.")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the float range
        raise _error(location, name, f"weights must be finite and >= 0, got an integer of {value.bit_length()} bits.") from None
    if not math.isfinite(value) or value < 0:
        raise _error(location, name, f"weights must be finite and >= 0, got {value}.")
    if value > _FLOAT32_MAX:
        raise _error(location, name, f"weights must be at most {_FLOAT32_MAX:.4g} (they are stored as float32), got {value}.")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a data file may hold huge values)."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more than 4300 digits
        return "a huge integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(data: dict[str, Any], key: str, location: str, prefix: str = "", empty_ok: bool = True) -> str:
    name = prefix + key
    if key not in data or data[key] is None:
        raise _error(location, name, "missing field.")
    value = data[key]
    if not isinstance(value, str):
        raise _error(location, name, f"expected a string, got {type(value).__name__}.")
    if not empty_ok and not value:
        raise _error(location, name, "is empty; there would be nothing to learn.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\\ud800" escapes decode to unpaired surrogates
        raise _error(
            location, name, f"holds an unpaired UTF-16 surrogate ({value[err.start]!r} at character {err.start}); it is not text."
        ) from None
    return value


def _weight_spans(value: Any, text_length: int, location: str, name: str, what: str) -> list[tuple[int, int, float]]:
    if not isinstance(value, list):
        raise _error(location, name, "expected a list of {start, end, weight} objects.")
    spans = []
    for i, span in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(span, dict) or not {"start", "end", "weight"} <= set(span):
            raise _error(location, where, "expected an object with 'start', 'end' and 'weight'.")
        start, end = span["start"], span["end"]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (start, end)):
            raise _error(location, where, f"start and end must be integers, got {_short(start)} and {_short(end)}.")
        if not 0 <= start < end <= text_length:
            raise _error(
                location, where, f"span [{start}, {end}) is outside the {what} (length {text_length}), or empty."
            )
        spans.append((start, end, _number(span["weight"], location, f"{where}.weight", False)))
    return spans


def _token_weight_list(value: Any, location: str) -> list[float]:
    if not isinstance(value, list):
        raise _error(location, "token_weights", "expected a list of numbers.")
    return [_number(v, location, f"token_weights[{i}]", False) for i, v in enumerate(value)]
