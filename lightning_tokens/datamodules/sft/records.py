"""Reading SFT data files (JSON Lines, JSON arrays, CSV) into raw records that know their location, the
:class:`SFTDataError` that names file, line and field, and the stable integer id of a record."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.datamodules.text_files import read_utf8_text

__all__ = ["SFTDataError", "stable_example_id"]

FileFormat = Literal["auto", "jsonl", "json", "csv"]

_FORMATS = ("auto", "jsonl", "json", "csv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_LIST_FIELDS = ("messages", "token_weights", "weight_spans")  # JSON text inside CSV cells


class SFTDataError(DataError):
    """A problem in an SFT data file; the message names the file, the line (or index) and the field."""


def _error(location: str, field_name: str | None, message: str) -> SFTDataError:
    where = f"{location}, field '{field_name}'" if field_name else location
    return SFTDataError(f"{where}: {message}")


def _json_value(text: str) -> Any:
    """``json.loads(text)``, every failure a :class:`ValueError` whose message says what is wrong (the
    caller adds the location): invalid JSON, an integer of more than 4300 digits, nesting too deep."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as err:  # an integer literal beyond Python's int_max_str_digits (4300 by default)
        raise ValueError("an integer has too many digits" if "digits" in str(err) else str(err)) from None
    except RecursionError:
        raise ValueError("arrays or objects are nested too deeply") from None


def _read_text(path: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); invalid UTF-8 is an
    :class:`SFTDataError` naming the line and the byte column."""
    return read_utf8_text(
        path,
        f"SFT data file {path!r} does not exist.",
        lambda line, column, byte, reason: _error(
            f"{path}, line {line}", None,
            f"not UTF-8 text (byte 0x{byte:02x} at byte column {column}: {reason}); save the file as UTF-8.",
        ),
    )


def stable_example_id(value: str | int | float) -> int:
    """The integer ``example_id`` of a record's ``id``: the same in every run and on every machine.

    A non-negative integer below ``2**63`` is returned unchanged; any other string or number is hashed
    (the first 63 bits of the SHA-256 of its JSON text), so ``"7"`` and ``7`` differ.

    Example:
        >>> stable_example_id(42), stable_example_id("42") == stable_example_id("42"), stable_example_id("42") == 42
        (42, True, False)
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"an example id must be a string or a number, got {value!r}.")
    if isinstance(value, int) and 0 <= value < 2**63:
        return value
    digest = hashlib.sha256(json.dumps(value).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class _Record:
    location: str  # "path, line 3" or "path, index 2"
    index: int  # 0-based position of the record in its file
    data: dict[str, Any]
    from_csv: bool = False


def _infer_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise ConfigError(f"Cannot tell the format of {path!r} from its extension; set format: jsonl, json or csv.")
    return _EXTENSIONS[ext]


def _read_jsonl(path: str, text: str, prompts: bool = False) -> list[_Record]:
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = _json_value(line)
        except json.JSONDecodeError as err:
            raise _error(f"{path}, line {lineno}", None, f"invalid JSON ({err.msg}, column {err.colno}).") from None
        except ValueError as err:
            raise _error(f"{path}, line {lineno}", None, f"invalid JSON ({err}).") from None
        location = f"{path}, line {lineno}"
        if prompts and isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise _error(location, None, f"expected a JSON object, got {type(value).__name__}.")
        records.append(_Record(location, len(records), value))
    return records


def _read_json(path: str, text: str, prompts: bool = False) -> list[_Record]:
    if not text.lstrip().startswith("["):  # one object per line in a .json file
        return _read_jsonl(path, text, prompts)
    try:
        values = _json_value(text)
    except json.JSONDecodeError as err:
        raise _error(f"{path}, line {err.lineno}", None, f"invalid JSON ({err.msg}, column {err.colno}).") from None
    except ValueError as err:
        raise _error(path, None, f"invalid JSON ({err}).") from None
    records = []
    for index, value in enumerate(values):
        location = f"{path}, index {index}"
        if prompts and isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise _error(location, None, f"expected a JSON object, got {type(value).__name__}.")
        records.append(_Record(location, index, value))
    return records


def _read_csv(path: str, text: str, prompts: bool = False) -> list[_Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as err:
        raise _csv_error(path, reader.line_num or 1, err) from None
    if not fieldnames:
        raise _error(f"{path}, line 1", None, "a CSV file needs a header row naming its fields.")
    records = []
    line_end = reader.line_num
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as err:
            raise _csv_error(path, line_end + 1, err) from None
        start, line_end = line_end + 1, reader.line_num
        location = f"{path}, line {start}"
        data: dict[str, Any] = {}
        for key, value in row.items():
            if key is None or value is None or value == "":
                continue
            if key in _LIST_FIELDS:
                try:
                    value = _json_value(value)
                except json.JSONDecodeError as err:
                    raise _error(location, key, f"invalid JSON in the CSV cell ({err.msg}).") from None
                except ValueError as err:
                    raise _error(location, key, f"invalid JSON in the CSV cell ({err}).") from None
            elif key == "id" and re.fullmatch(r"\d+", value):
                try:
                    value = int(value)
                except ValueError:  # more than 4300 digits
                    raise _error(location, key, f"an integer id of {len(value)} digits is too long.") from None
            data[key] = value
        # an empty cell is an absent field, except where it is the empty half of a prompt/response pair
        # or the only schema field of the row (so that the error says "empty", not "missing")
        columns = set(reader.fieldnames)
        for one, other in (("prompt", "response"), ("response", "prompt")):
            if one in data and other in columns and other not in data:
                data[other] = ""
        if "text" in columns and not {"prompt", "response", "messages"} & set(data):
            data.setdefault("text", "")
        records.append(_Record(location, len(records), data, from_csv=True))
    return records


def _csv_error(path: str, line: int, err: csv.Error) -> SFTDataError:
    hint = " (save long texts as JSONL instead)" if "field limit" in str(err) else ""
    return _error(f"{path}, line {line}", None, f"unreadable CSV: {err}{hint}.")


def _read_records(path: str, fmt: FileFormat = "auto", prompts: bool = False) -> list[_Record]:
    """The records of an SFT data file, each with its location (``"path, line N"`` / ``"path, index N"``);
    ``prompts``: a JSON string is read as ``{"prompt": string}``."""
    text = _read_text(path)
    kind = _infer_format(path, fmt)
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind](path, text, prompts)
