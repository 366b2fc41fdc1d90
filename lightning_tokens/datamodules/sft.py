"""Supervised fine-tuning data from your own files, as a LightningDataModule.

Files are JSON Lines (``.jsonl``), JSON arrays (``.json``) or CSV (``.csv``, one column per field; list
fields such as ``messages``, ``token_weights`` and ``weight_spans`` hold JSON text, an ``id`` of digits is
an integer, and an empty cell is an absent field). Each record is one example in one of three schemas,
detected per record (or fixed with ``schema=``):

``{"prompt": ..., "response": ...}``
    Completion-only: the response and the eos carry labels, the prompt does not. Prompt and response
    are tokenized separately and concatenated (a leading bos is added when the tokenizer adds one).
``{"messages": [{"role": ..., "content": ...}, ...]}``
    A conversation rendered with the tokenizer's chat template (``apply_chat_template``; or the
    ``chat_template`` argument). Only assistant turns carry labels. The labelled characters of turn
    ``i`` are what the template adds between ``render(messages[:i], add_generation_prompt=True)`` and
    ``render(messages[:i + 1])`` (the content and the template's end-of-turn text, not the assistant
    header). A template that does not render conversations prefix-consistently (one that rewrites
    earlier turns, or adds a footer) falls back to labelling the first verbatim occurrence of each
    assistant content after the previous turn; a content the template does not reproduce verbatim is an
    error. Character spans become token labels through the fast tokenizer's ``offset_mapping``: a token
    is labelled when its characters overlap a labelled span. ``{% generation %}`` blocks are not needed.
    Without a chat template the fallback :data:`FALLBACK_CHAT_TEMPLATE` renders every message as
    ``<|role|>\\ncontent\\n`` (generation prompt ``<|assistant|>\\n``); an assistant turn's labels then
    cover ``content\\n``, and with ``add_eos`` an eos ends the conversation (labelled when the last
    message is an assistant's). Real chat templates close turns with their own tokens, so no eos is
    added to them.
``{"text": ...}``
    Plain language modelling: every token carries a label (and the eos, with ``add_eos``), except the
    first, as in every schema (see ``labels`` below).

Optional fields of every record:

- ``id``: a string or number naming the example (default: the record's 0-based position in its file).
  It becomes the integer ``example_id`` of the batches through :func:`stable_example_id` (a pure
  function, so offline per-example data can be keyed by it): a non-negative integer stays itself, any
  other value is hashed (SHA-256, 63 bits). Ids must be unique within a file;
  ``SFTDataModule.example_ids`` maps each loaded raw id to its integer.
- ``weight``: a sample weight ``>= 0`` multiplied into every token weight of the example.
- ``token_weights``: per-token weights, aligned to the labelled tokens of the example in order: the
  response tokens (``prompt_response``), the text tokens (``text``) or all assistant-turn labelled
  tokens (``messages``). When an eos is appended the list may have one more value, for the eos
  (otherwise the eos weighs 1).
- ``weight_spans``: ``[{"start": s, "end": e, "weight": w}, ...]``, character spans ``[s, e)`` into the
  response (``prompt_response``), the text (``text``) or, as a field of an assistant message, that
  message's content (``messages``). A token that overlaps a span gets its weight (the last listed span
  wins where spans overlap); other tokens weigh 1. ``token_weights`` and ``weight_spans`` multiply.
- ``incorrect`` (``prompt_response`` records only): a functionally incorrect variant of the response
  (the correct code), for FAIT (:class:`~lightning_tokens.callbacks.fait.FAIT`). The response's
  characters that a line diff and a character alignment against it flag
  (:func:`~lightning_tokens.callbacks.fait.edit_masks`) become per-token masks through the offsets (a
  token is marked when it overlaps a marked character).

Problems in the data raise :class:`SFTDataError` (a ``ValueError``) in ``setup``, before training,
naming the file, the line (JSON Lines, CSV; 1-based) or array index (JSON), and the field.

Batches (labels are **not** shifted: the library shifts once, in ``ops``):

==========================  ===============================================================================
``input_ids``               ``(B, T)`` long
``labels``                  ``(B, T)`` long, the token id where loss is taken, -100 elsewhere. The first token
                            of every example is -100 (it has no preceding token of its own example).
``token_weights``           ``(B, T)`` float32: per-token weight × sample ``weight`` (1.0 by default; 0 on
                            padding), indexed like ``labels``.
``token_example_ids``       ``(B, T)`` long: the ``example_id`` of each token, -1 on padding.
``position_ids``            ``(B, T)`` long: position within the token's own example.
``attention_mask``          ``(B, T)`` long, unpacked batches only (right padding).
``example_id``              ``(B,)`` long, unpacked batches only.
``fait_line_mask``          ``(B, T)`` float32 0/1, only when some record has ``incorrect``: the token lies on
                            a line of the correct response that the line diff flags; 0 on unlabelled tokens,
                            the eos, padding and records without ``incorrect``.
``fait_token_mask``         ``(B, T)`` float32 0/1, likewise: the token overlaps a flagged character.
==========================  ===============================================================================

Packing (``packing=True``) puts whole examples into rows of at most ``max_length`` tokens (best-fit in a
seeded random order, once at setup; the sampler shuffles rows every epoch); an example is never split.
Packed batches carry **no** ``attention_mask``: ``position_ids`` restart at 0 at every example, and the
row's padding is a pseudo-example of its own (positions ``0, 1, ...``). With ``attention_mask=None``
transformers (``masking_utils._preprocess_mask_arguments`` → ``find_packed_sequence_indices``) detects
packed sequences from ``position_ids`` (a new sequence wherever the position does not increase by one)
and ``create_causal_mask`` builds a block-diagonal causal mask (sdpa, eager and flex attention), but
only when there is no KV cache: Llama-style models create a ``DynamicCache`` whenever ``use_cache`` is on
(``config.use_cache`` defaults to true, in training too), and with a cache the detection is skipped. So
``decoder(input_ids, attention_mask=batch.get("attention_mask"), position_ids=batch["position_ids"],
use_cache=False)``, which is what ``TokenLM.forward`` calls, never attends across examples (``tests/datamodules/test_sft.py`` checks the hidden states against each
example run alone). Two cases need care: ``flash_attention_2`` recognises packed ``position_ids`` only
for a batch of one row (``modeling_flash_attention_utils._is_packed_sequence``), so use ``batch_size: 1``
with it; and a model that ignores ``position_ids`` needs an explicit 4-D mask, which
:func:`packed_attention_mask` builds from them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_tokens.datamodules.filters import RecordFilter
from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.models.tokenizers import bos_prefix, datamodule_tokenizer

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "PackedSFTDataset",
    "SFTCollator",
    "SFTDataError",
    "SFTDataModule",
    "SFTDataset",
    "pack_examples",
    "packed_attention_mask",
    "stable_example_id",
]

FileFormat = Literal["auto", "jsonl", "json", "csv"]
Schema = Literal["auto", "prompt_response", "messages", "text"]
TruncationPolicy = Literal["error", "drop", "truncate_left", "truncate_right"]

#: The chat template used when the tokenizer has none (and no ``chat_template`` argument is given),
#: written in Jinja for reference; :class:`SFTDataModule` renders it in Python with the same output.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_FORMATS = ("auto", "jsonl", "json", "csv")
_SCHEMAS = ("auto", "prompt_response", "messages", "text")
_POLICIES = ("error", "drop", "truncate_left", "truncate_right")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_LIST_FIELDS = ("messages", "token_weights", "weight_spans")  # JSON text inside CSV cells


class SFTDataError(ValueError):
    """A problem in an SFT data file; the message names the file, the line (or index) and the field."""


def _error(location: str, field_name: str | None, message: str) -> SFTDataError:
    where = f"{location}, field '{field_name}'" if field_name else location
    return SFTDataError(f"{where}: {message}")


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


def pack_examples(lengths: Sequence[int], capacity: int, seed: int | None = 0) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens, never splitting an example.

    Best-fit: examples are visited in a random order drawn from ``seed`` (file order when ``seed`` is
    ``None``) and each goes into the fullest row that still has room, or into a new row.

    Example:
        >>> pack_examples([5, 3, 4, 2], capacity=8, seed=None)
        [[0, 1], [2, 3]]
    """
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in order:
        size = int(lengths[index])
        if size > capacity:
            raise ValueError(f"example {index} has {size} tokens, more than the row capacity {capacity}.")
        slot = bisect_left(free, (size, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(index)
        else:
            row, room = len(rows), capacity
            rows.append([index])
        room -= size
        if room > 0:
            insort(free, (room, row))
    return rows


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 4-D additive block-diagonal causal mask ``(B, 1, T, T)`` for packed rows, from ``position_ids``.

    Not needed for Hugging Face models, which derive the same mask from ``position_ids`` when
    ``attention_mask`` is ``None``; for models that take an explicit mask. 0 where attention is allowed,
    the dtype's minimum elsewhere. An example starts wherever the position does not increase by one.

    Example:
        >>> m = packed_attention_mask(torch.tensor([[0, 1, 0, 1]]))
        >>> (m[0, 0] == 0).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.long().cumsum(-1)
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same & causal)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------
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
        raise ValueError(f"Cannot tell the format of {path!r} from its extension; set format: jsonl, json or csv.")
    return _EXTENSIONS[ext]


def _read_jsonl(path: str, text: str, prompts: bool = False) -> list[_Record]:
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise _error(f"{path}, line {lineno}", None, f"invalid JSON ({err.msg}, column {err.colno}).") from None
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
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise _error(f"{path}, line {err.lineno}", None, f"invalid JSON ({err.msg}, column {err.colno}).") from None
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
    if not reader.fieldnames:
        raise _error(f"{path}, line 1", None, "a CSV file needs a header row naming its fields.")
    records = []
    line_end = reader.line_num
    for row in reader:
        start, line_end = line_end + 1, reader.line_num
        location = f"{path}, line {start}"
        data: dict[str, Any] = {}
        for key, value in row.items():
            if key is None or value is None or value == "":
                continue
            if key in _LIST_FIELDS:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as err:
                    raise _error(location, key, f"invalid JSON in the CSV cell ({err.msg}).") from None
            elif key == "id" and re.fullmatch(r"\d+", value):
                value = int(value)
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


def _read_records(path: str, fmt: FileFormat = "auto", prompts: bool = False) -> list[_Record]:
    """The records of an SFT data file, each with its location (``"path, line N"`` / ``"path, index N"``);
    ``prompts``: a JSON string is read as ``{"prompt": string}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SFT data file {path!r} does not exist.")
    with open(path, encoding="utf-8-sig") as handle:  # -sig: a leading byte-order mark is dropped
        text = handle.read()
    kind = _infer_format(path, fmt)
    return {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind](path, text, prompts)


# ----------------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------------
def _number(value: Any, location: str, name: str, from_csv: bool) -> float:
    if from_csv and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _error(location, name, f"expected a number, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(location, name, f"expected a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise _error(location, name, f"weights must be finite and >= 0, got {value}.")
    return value


def _string(data: dict[str, Any], key: str, location: str, prefix: str = "", empty_ok: bool = True) -> str:
    name = prefix + key
    if key not in data or data[key] is None:
        raise _error(location, name, "missing field.")
    value = data[key]
    if not isinstance(value, str):
        raise _error(location, name, f"expected a string, got {type(value).__name__}.")
    if not empty_ok and not value:
        raise _error(location, name, "is empty; there would be nothing to learn.")
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
            raise _error(location, where, f"start and end must be integers, got {start!r} and {end!r}.")
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


# ----------------------------------------------------------------------------------------------------
# Parsed and tokenized examples
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Segment:
    """A piece of text tokenized on its own; labels on ``labelled`` character spans (``None``: all)."""

    text: str
    labelled: list[tuple[int, int]] | None = field(default_factory=list)
    weight_spans: list[tuple[int, int, float]] = field(default_factory=list)
    char_masks: dict[str, np.ndarray] | None = None  # per-character masks that become per-token fields

    @property
    def needs_offsets(self) -> bool:
        return bool(self.weight_spans) or bool(self.char_masks) or (self.labelled is not None and len(self.labelled) > 0)


@dataclass
class _Parsed:
    location: str
    raw_id: str | int | float
    example_id: int
    weight: float
    segments: list[_Segment]
    bos: bool
    eos: bool
    eos_labelled: bool
    token_weights: list[float] | None
    data: dict[str, Any] = field(default_factory=dict)  # the raw record, for record filters


def _overlaps(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Tokens whose characters ``[s, e)`` overlap ``[start, end)`` (an empty token counts as ``[s, s+1)``)."""
    token_start = offsets[:, 0]
    token_end = np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    return (token_start < end) & (token_end > start)


class SFTDataset(Dataset):
    """Tokenized examples: ``input_ids`` (int32), ``labels`` (int32, -100 = no loss) and
    ``token_weights`` (float32) arrays of equal length, and an integer ``example_id`` each; optional
    ``token_fields``: more per-token float32 arrays by name (e.g. FAIT's ``fait_line_mask``), which the
    collator pads with 0 into ``(B, T)`` batch entries of the same name."""

    def __init__(
        self,
        input_ids: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        token_weights: Sequence[np.ndarray],
        example_ids: Sequence[int],
        token_fields: dict[str, Sequence[np.ndarray]] | None = None,
    ) -> None:
        self.input_ids = list(input_ids)
        self.labels = list(labels)
        self.token_weights = list(token_weights)
        self.example_ids = [int(i) for i in example_ids]
        self.token_fields = {name: list(values) for name, values in (token_fields or {}).items()}
        n = len(self.input_ids)
        if not (len(self.labels) == len(self.token_weights) == len(self.example_ids) == n):
            raise ValueError("input_ids, labels, token_weights and example_ids must have one entry per example.")
        reserved = {"input_ids", "labels", "token_weights", "example_id", "examples"}
        for name, values in self.token_fields.items():
            if name in reserved:
                raise ValueError(f"token field {name!r} clashes with a standard batch key.")
            if len(values) != n or any(len(v) != len(ids) for v, ids in zip(values, self.input_ids)):
                raise ValueError(f"token field {name!r} must have one array per example, as long as its input_ids.")

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "token_weights": self.token_weights[index],
            "example_id": self.example_ids[index],
        }
        for name, values in self.token_fields.items():
            item[name] = values[index]
        return item


_ITEM_KEYS = frozenset({"input_ids", "labels", "token_weights", "example_id"})


class PackedSFTDataset(Dataset):
    """Rows of whole examples of an :class:`SFTDataset`; an item is ``{"examples": [example items]}``."""

    def __init__(self, examples: SFTDataset, rows: Sequence[Sequence[int]]) -> None:
        self.examples = examples
        self.rows = [list(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"examples": [self.examples[i] for i in self.rows[index]]}


class _PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[str], prompt_ids: Sequence[np.ndarray]) -> None:
        self.prompts = list(prompts)
        self.prompt_ids = list(prompt_ids)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"prompt": self.prompts[index], "prompt_ids": self.prompt_ids[index]}


@dataclass
class SFTCollator:
    """Collate :class:`SFTDataset` / :class:`PackedSFTDataset` items (picklable, for worker processes).

    Args:
        pad_token_id: id used for padding.
        mode: ``"train"`` for training/evaluation batches (see the module docstring for their keys;
            packed items give packed rows), ``"predict"`` for ``prompt_input_ids`` (left-padded),
            ``prompt_attention_mask`` and ``prompts``.
    """

    pad_token_id: int
    mode: Literal["train", "predict"] = "train"

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.mode == "predict":
            return self._prompts(items)
        packed = "examples" in items[0]
        rows = [item["examples"] if packed else [item] for item in items]
        width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        size = (len(rows), width)
        input_ids = torch.full(size, self.pad_token_id, dtype=torch.long)
        labels = torch.full(size, -100, dtype=torch.long)
        weights = torch.zeros(size, dtype=torch.float32)
        token_example_ids = torch.full(size, -1, dtype=torch.long)
        position_ids = torch.zeros(size, dtype=torch.long)
        attention_mask = torch.zeros(size, dtype=torch.long)
        extra = {key: torch.zeros(size, dtype=torch.float32) for key in rows[0][0] if key not in _ITEM_KEYS}
        for r, row in enumerate(rows):
            cursor = 0
            for example in row:
                n = len(example["input_ids"])
                end = cursor + n
                input_ids[r, cursor:end] = torch.from_numpy(np.asarray(example["input_ids"], dtype=np.int64))
                labels[r, cursor:end] = torch.from_numpy(np.asarray(example["labels"], dtype=np.int64))
                weights[r, cursor:end] = torch.from_numpy(np.asarray(example["token_weights"], dtype=np.float32))
                for key, values in extra.items():
                    values[r, cursor:end] = torch.from_numpy(np.asarray(example[key], dtype=np.float32))
                token_example_ids[r, cursor:end] = int(example["example_id"])
                position_ids[r, cursor:end] = torch.arange(n)
                cursor = end
            attention_mask[r, :cursor] = 1
            if packed:  # the padding is a pseudo-example of its own: positions 0, 1, ...
                position_ids[r, cursor:] = torch.arange(width - cursor)
            else:  # masked out by attention_mask; positions simply continue
                position_ids[r, cursor:] = torch.arange(cursor, width)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "token_weights": weights,
            "token_example_ids": token_example_ids,
            "position_ids": position_ids,
            **extra,
        }
        if not packed:
            batch["attention_mask"] = attention_mask
            batch["example_id"] = torch.tensor([int(item["example_id"]) for item in items], dtype=torch.long)
        return batch

    def _prompts(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["prompt_ids"]) for item in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for r, item in enumerate(items):
            n = len(item["prompt_ids"])
            if n:
                ids[r, width - n :] = torch.from_numpy(np.asarray(item["prompt_ids"], dtype=np.int64))
                mask[r, width - n :] = 1
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompts": [item["prompt"] for item in items]}


# ----------------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------------
class SFTDataModule(ResumableDataMixin, L.LightningDataModule):
    """Supervised fine-tuning on your own JSONL / JSON / CSV files: completions, chats or plain text.

    Features:
        - Three record schemas, detected per record: ``{prompt, response}`` (labels on the response and
          eos), ``{messages}`` (chat template; labels on assistant turns only, found by rendering
          conversation prefixes, so templates need no ``{% generation %}`` block; a documented fallback
          template without one) and ``{text}`` (labels everywhere). See the module docstring.
        - Weights that travel with the data: a sample ``weight``, ``token_weights`` lists and
          character ``weight_spans`` mapped to tokens through offsets; all end up in
          ``batch["token_weights"]``.
        - Stable integer example ids from the records' ``id`` (:func:`stable_example_id`), per example
          (``example_id``) and per token (``token_example_ids``).
        - An explicit policy for examples longer than ``max_length``: ``error``, ``drop``,
          ``truncate_right`` (cut the end), ``truncate_left`` (cut the start, keeping a leading bos).
        - Packing of whole examples into rows, with attention and loss that never cross an example
          boundary (``position_ids`` restart per example; no ``attention_mask`` in packed batches).
        - Every data error is raised at ``setup`` with the file, line (or index) and field.
        - Exact mid-epoch resume of the training order (:class:`ResumableShuffleSampler`).
        - ``predict`` on prompts or chats (generation prompt added), left-padded.
        - FAIT code pairs: ``{prompt, response, incorrect}`` records carry per-token edit masks of the
          correct response (``fait_line_mask``, ``fait_token_mask`` in the batches) for
          :class:`~lightning_tokens.callbacks.fait.FAIT`.
        - Data-level ``filters`` (:mod:`lightning_tokens.datamodules.filters`: InstructMining, long-CoT
          branching density, your own :class:`~lightning_tokens.datamodules.filters.RecordFilter`)
          select training records before tokenization.

    Args:
        train_file: training data (``.jsonl``, ``.json`` or ``.csv``).
        val_file: validation data; ``None`` holds out ``val_fraction`` of the training file (or has no
            validation when that is 0).
        test_file: test data for ``trainer.test``.
        predict_file: prompts for ``trainer.predict``: records with ``prompt`` (a ``response`` is ignored)
            or ``messages`` (trailing assistant messages are dropped and the generation prompt added),
            or JSON strings; a file with another extension holds one prompt per line.
        tokenizer: ``None`` takes ``trainer.lightning_module.tokenizer`` at ``setup``; a string goes
            through :func:`~lightning_tokens.models.tokenizers.resolve_tokenizer` (``"char"``, a local
            directory, or a Hub id). A tokenizer object is accepted too (from Python).
        format: file format; ``auto`` decides by extension (``.jsonl``/``.ndjson``, ``.json``, ``.csv``).
        schema: ``auto`` detects each record's schema from its fields; otherwise every record must have
            that schema's fields.
        chat_template: a Jinja chat template overriding the tokenizer's (``None``: the tokenizer's, or
            :data:`FALLBACK_CHAT_TEMPLATE` when it has none).
        max_length: longest example in tokens, and the row length when packing.
        truncation: what to do with longer examples: ``error`` (raise, naming file and line), ``drop``
            (skip them, with a warning that counts them), ``truncate_right`` (keep the first
            ``max_length`` tokens: the response's end goes), ``truncate_left`` (keep the last ones: the
            prompt's start goes, a leading bos stays). Examples left without any labelled token are
            dropped with a warning.
        packing: pack whole training examples into rows of ``max_length`` tokens.
        pack_eval: pack validation/test examples too (off by default).
        batch_size: training batch size (rows when packing).
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        seed: seed of the validation hold-out, the packing order and the shuffling.
        val_fraction: fraction of the training file held out for validation when ``val_file`` is
            ``None`` (chosen with ``seed``).
        add_eos: append the tokenizer's eos (labelled) to responses, texts and fallback-template chats.
        max_new_tokens: generation length for ``predict`` (also the room kept free when long
            prediction prompts are cut from the left).
        filters: :class:`~lightning_tokens.datamodules.filters.RecordFilter` objects applied in order to the
            raw training records (after the ``val_fraction`` hold-out; validation and test files are never
            filtered). Each sees the survivors of the previous one; counts are logged and kept in
            :attr:`filter_report`.
        fait_char_diff: character alignment of FAIT's edit masks: ``levenshtein`` (a minimal edit script,
            the paper's description) or ``difflib`` (see :func:`~lightning_tokens.callbacks.fait.edit_masks`).
        fait_insertions: what an insertion in the incorrect code marks in the correct one: ``adjacent``
            (the line / character on each side) or ``ignore``.

    Attributes:
        example_ids: raw ``id`` (or default position) → integer ``example_id``, for every loaded example.
        filter_report: one ``{"filter", "before", "kept"}`` entry per applied filter.
        tokenizer: the tokenizer, once resolved.

    Example:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"id": "q1", "prompt": "2+2=", "response": "4"}) + "\\n")
        ...     _ = f.write(json.dumps({"messages": [{"role": "user", "content": "Hi"},
        ...                                          {"role": "assistant", "content": "Hello"}]}) + "\\n")
        >>> dm = SFTDataModule(train_file=path, tokenizer="char", batch_size=2, packing=True)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch)
        ['input_ids', 'labels', 'position_ids', 'token_example_ids', 'token_weights']
        >>> batch["input_ids"].shape  # one packed row: 6 + 33 tokens
        torch.Size([1, 39])

        From YAML: ``data: {class_path: lightning_tokens.datamodules.SFTDataModule, init_args:
        {train_file: data/examples/sft_chat.jsonl, packing: true, max_length: 512}}`` with
        ``tokenizer`` left out (the module's is used).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        tokenizer: str | None = None,
        format: FileFormat = "auto",
        schema: Schema = "auto",
        chat_template: str | None = None,
        max_length: int = 1024,
        truncation: TruncationPolicy = "truncate_right",
        packing: bool = False,
        pack_eval: bool = False,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 1234,
        val_fraction: float = 0.0,
        add_eos: bool = True,
        max_new_tokens: int = 256,
        filters: list[RecordFilter] | None = None,
        fait_char_diff: Literal["levenshtein", "difflib"] = "levenshtein",
        fait_insertions: Literal["adjacent", "ignore"] = "adjacent",
    ) -> None:
        super().__init__()
        for name, value, allowed in (("format", format, _FORMATS), ("schema", schema, _SCHEMAS), ("truncation", truncation, _POLICIES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if val_file is not None and val_fraction > 0:
            raise ValueError("Give either val_file or val_fraction (a hold-out of train_file), not both.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if fait_char_diff not in ("levenshtein", "difflib"):
            raise ValueError(f"fait_char_diff must be one of levenshtein, difflib; got {fait_char_diff!r}.")
        if fait_insertions not in ("adjacent", "ignore"):
            raise ValueError(f"fait_insertions must be one of adjacent, ignore; got {fait_insertions!r}.")
        for f in filters or []:
            if not isinstance(f, RecordFilter):
                raise TypeError(f"filters must be RecordFilter objects (lightning_tokens.datamodules.filters), got {type(f).__name__}.")
        tokenizer_name = tokenizer if (tokenizer is None or isinstance(tokenizer, str)) else None
        self.save_hyperparameters({
            "train_file": train_file,
            "val_file": val_file,
            "test_file": test_file,
            "predict_file": predict_file,
            "data_tokenizer": tokenizer_name,  # distinct keys: merged with the module's hparams in logs
            "format": format,
            "schema": schema,
            "chat_template": chat_template,
            "max_length": max_length,
            "truncation": truncation,
            "packing": packing,
            "pack_eval": pack_eval,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "num_workers": num_workers,
            "seed": seed,
            "val_fraction": val_fraction,
            "add_eos": add_eos,
            "data_max_new_tokens": max_new_tokens,
            "filters": [repr(f) for f in filters] if filters else None,
            "fait_char_diff": fait_char_diff,
            "fait_insertions": fait_insertions,
        })
        self.train_file, self.val_file, self.test_file, self.predict_file = train_file, val_file, test_file, predict_file
        self.format, self.schema, self.chat_template = format, schema, chat_template
        self.max_length, self.truncation = max_length, truncation
        self.packing, self.pack_eval = packing, pack_eval
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_fraction, self.add_eos, self.max_new_tokens = val_fraction, add_eos, max_new_tokens
        self.filters: list[RecordFilter] = list(filters or [])
        self.fait_char_diff, self.fait_insertions = fait_char_diff, fait_insertions
        self.filter_report: list[dict[str, Any]] = []

        self._tokenizer_arg: str | PreTrainedTokenizerBase | None = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._bos_prefix: list[int] = []
        self._datasets: dict[str, Dataset] = {}
        self.example_ids: dict[str | int | float, int] = {}

    # -- tokenizer -----------------------------------------------------------------------------------
    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        tokenizer = datamodule_tokenizer(self._tokenizer_arg, self.trainer, type(self).__name__)
        if self.add_eos and tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True needs a tokenizer with an eos token; set add_eos: false or use another tokenizer.")
        self.tokenizer = tokenizer
        self._bos_prefix = bos_prefix(tokenizer)
        return tokenizer

    @property
    def _uses_template(self) -> bool:
        return self.chat_template is not None or getattr(self.tokenizer, "chat_template", None) is not None

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text: the chat template's, or the fallback ``<|role|>\\ncontent\\n``."""
        if not self._uses_template:
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
            return text + ("<|assistant|>\n" if add_generation_prompt else "")
        assert self.tokenizer is not None
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _try_render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
        if not messages:
            return "" if not add_generation_prompt else None
        try:
            return self._render(messages, add_generation_prompt)
        except Exception:  # templates may refuse a prefix (e.g. one ending with a system message)
            return None

    # -- parsing -------------------------------------------------------------------------------------
    def _schema_of(self, record: _Record) -> str:
        if self.schema != "auto":
            return self.schema
        data = record.data
        if "messages" in data:
            return "messages"
        if "prompt" in data or "response" in data:
            return "prompt_response"
        if "text" in data:
            return "text"
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise _error(
            record.location, "prompt",
            f"missing field: a record needs 'prompt' and 'response', 'messages', or 'text' (its fields: {keys}).",
        )

    def _parse(self, record: _Record) -> _Parsed:
        data, location = record.data, record.location
        raw_id = data.get("id", record.index)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)) or (
            isinstance(raw_id, float) and not math.isfinite(raw_id)
        ):
            raise _error(location, "id", f"expected a string or a number, got {raw_id!r}.")
        weight = _number(data["weight"], location, "weight", record.from_csv) if "weight" in data else 1.0
        token_weights = _token_weight_list(data["token_weights"], location) if "token_weights" in data else None
        schema = self._schema_of(record)
        eos = self.add_eos
        eos_labelled = True
        if "incorrect" in data and schema != "prompt_response":
            raise _error(
                location, "incorrect",
                "applies to {prompt, response, incorrect} records only (the response is the correct code, "
                "incorrect a faulty variant of it, for FAIT).",
            )
        if schema == "prompt_response":
            prompt = _string(data, "prompt", location)
            response = _string(data, "response", location, empty_ok=False)
            spans = (
                _weight_spans(data["weight_spans"], len(response), location, "weight_spans", "response text")
                if "weight_spans" in data else []
            )
            char_masks = self._fait_char_masks(response, _string(data, "incorrect", location)) if "incorrect" in data else None
            segments = [_Segment(prompt), _Segment(response, None, spans, char_masks)]
            bos = True
        elif schema == "text":
            text = _string(data, "text", location, empty_ok=False)
            spans = _weight_spans(data["weight_spans"], len(text), location, "weight_spans", "text") if "weight_spans" in data else []
            segments = [_Segment(text, None, spans)]
            bos = True
        else:
            if "weight_spans" in data:
                raise _error(location, "weight_spans", "in a messages record, give weight_spans on each assistant message.")
            segment, last_is_assistant = self._parse_messages(data, location)
            segments = [segment]
            bos = not self._uses_template
            eos = eos and not self._uses_template
            eos_labelled = last_is_assistant
        return _Parsed(location, raw_id, stable_example_id(raw_id), weight, segments, bos, eos, eos_labelled, token_weights, data)

    def _fait_char_masks(self, correct: str, incorrect: str) -> dict[str, np.ndarray]:
        """FAIT's line- and character-level edit masks on the characters of the correct response."""
        from lightning_tokens.callbacks.fait import (
            FAIT_LINE_KEY,
            FAIT_TOKEN_KEY,
            edit_masks,
        )

        line, char = edit_masks(correct, incorrect, char_diff=self.fait_char_diff, insertions=self.fait_insertions)
        return {FAIT_LINE_KEY: line, FAIT_TOKEN_KEY: char}

    @staticmethod
    def _plain_messages(messages: Any, location: str) -> list[dict[str, str]]:
        """``[{role, content}]`` checked (assistant contents must not be empty), other keys dropped."""
        if not isinstance(messages, list) or not messages:
            raise _error(location, "messages", "expected a non-empty list of {role, content} objects.")
        plain: list[dict[str, str]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _error(location, f"messages[{i}]", "expected an object with 'role' and 'content'.")
            role = _string(message, "role", location, prefix=f"messages[{i}].", empty_ok=False)
            assistant = role == "assistant"
            content = _string(message, "content", location, prefix=f"messages[{i}].", empty_ok=not assistant)
            if "weight_spans" in message and not assistant:
                raise _error(location, f"messages[{i}].weight_spans", "only assistant messages carry labels and weights.")
            plain.append({"role": role, "content": content})
        return plain

    def _parse_messages(self, data: dict[str, Any], location: str) -> tuple[_Segment, bool]:
        messages = data.get("messages")
        plain = self._plain_messages(messages, location)
        if not any(m["role"] == "assistant" for m in plain):
            raise _error(location, "messages", "has no assistant message; there would be nothing to learn.")
        try:
            full = self._render(plain, add_generation_prompt=False)
        except Exception as err:
            raise _error(location, "messages", f"the chat template failed: {type(err).__name__}: {err}") from None
        labelled: list[tuple[int, int]] = []
        weight_spans: list[tuple[int, int, float]] = []
        cursor = 0
        for i, message in enumerate(plain):
            if message["role"] != "assistant":
                continue
            content = message["content"]
            start, end, content_start = self._assistant_span(plain, i, full, cursor)
            if start is None:
                found = full.find(content, cursor)
                if found < 0:
                    raise _error(
                        location, f"messages[{i}].content",
                        "the chat template does not reproduce this assistant content verbatim; its labels cannot be placed.",
                    )
                start, end, content_start = found, found + len(content), found
            labelled.append((start, end))
            cursor = end
            if "weight_spans" in messages[i]:
                name = f"messages[{i}].weight_spans"
                spans = _weight_spans(messages[i]["weight_spans"], len(content), location, name, "message content")
                if content_start is None:
                    raise _error(location, name, "the chat template does not reproduce the content verbatim; spans cannot be placed.")
                weight_spans.extend((content_start + s, content_start + e, w) for s, e, w in spans)
        return _Segment(full, labelled, weight_spans), plain[-1]["role"] == "assistant"

    def _assistant_span(
        self, messages: list[dict[str, str]], i: int, full: str, cursor: int
    ) -> tuple[int | None, int | None, int | None]:
        """``(start, end, content start)`` of the characters assistant turn ``i`` adds after its header, when
        the template renders prefixes consistently; ``(None, None, None)`` otherwise."""
        upto = self._try_render(messages[: i + 1], add_generation_prompt=False)
        if upto is None or not full.startswith(upto):
            return None, None, None
        content = messages[i]["content"]
        before = self._try_render(messages[:i], add_generation_prompt=False)
        header_end = self._try_render(messages[:i], add_generation_prompt=True)
        if (
            header_end is not None
            and before is not None
            and header_end.startswith(before)
            and len(before) < len(header_end)  # the template does add a generation prompt
            and upto.startswith(header_end)
            and cursor <= len(header_end) < len(upto)
        ):
            found = upto.find(content, len(header_end))
            return len(header_end), len(upto), (found if found >= 0 else None)
        # no usable generation prompt: the turn starts where its content does
        if before is None or not upto.startswith(before):
            return None, None, None
        found = upto.find(content, max(len(before), cursor))
        if found < 0:
            return None, None, None
        return found, len(upto), found

    # -- tokenization --------------------------------------------------------------------------------
    def _tokenize_segments(self, segments: list[_Segment]) -> list[tuple[list[int], np.ndarray | None]]:
        tokenizer = self.tokenizer
        assert tokenizer is not None
        need_offsets = any(s.needs_offsets for s in segments)
        if need_offsets and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "Chat messages and weight_spans map characters to tokens through offsets, which needs a fast "
                "(Rust) tokenizer; this one is not."
            )
        out: list[tuple[list[int], np.ndarray | None]] = []
        chunk = 1024
        for begin in range(0, len(segments), chunk):
            part = segments[begin : begin + chunk]
            texts = [s.text for s in part]
            if need_offsets:
                encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
                out.extend(
                    (ids, np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
                    for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])
                )
            else:
                encoded = tokenizer(texts, add_special_tokens=False)
                out.extend((ids, None) for ids in encoded["input_ids"])
        return out

    def _build_examples(self, parsed: list[_Parsed], split: str) -> SFTDataset:
        tokenizer = self._resolve_tokenizer()
        flat = [segment for p in parsed for segment in p.segments]
        encoded = iter(self._tokenize_segments(flat))
        eos_id = tokenizer.eos_token_id
        field_names = sorted({name for p in parsed for seg in p.segments if seg.char_masks for name in seg.char_masks})
        if field_names:  # per-character masks (FAIT's): a token is marked when it overlaps a marked character
            from lightning_tokens.callbacks.fait import char_mask_to_tokens
        inputs, labels_out, weights_out, ids_out = [], [], [], []
        fields_out: dict[str, list[np.ndarray]] = {name: [] for name in field_names}
        too_long = dropped_long = unlabelled = 0
        for p in parsed:
            ids: list[int] = list(self._bos_prefix) if p.bos else []
            labelled: list[bool] = [False] * len(ids)
            span_weights: list[float] = [1.0] * len(ids)
            fields: dict[str, list[float]] = {name: [0.0] * len(ids) for name in field_names}
            for segment in p.segments:
                seg_ids, offsets = next(encoded)
                n = len(seg_ids)
                if segment.labelled is None:
                    mask = np.ones(n, dtype=bool)
                else:
                    mask = np.zeros(n, dtype=bool)
                    for start, end in segment.labelled:
                        mask |= _overlaps(offsets, start, end)
                w = np.ones(n, dtype=np.float32)
                for start, end, value in segment.weight_spans:
                    w[_overlaps(offsets, start, end)] = value
                ids.extend(seg_ids)
                labelled.extend(mask.tolist())
                span_weights.extend(w.tolist())
                for name in field_names:
                    char_mask = (segment.char_masks or {}).get(name)
                    marked = np.zeros(n, dtype=bool) if char_mask is None else char_mask_to_tokens(char_mask, offsets)
                    fields[name].extend(marked.astype(np.float32).tolist())
            lab = np.asarray(labelled, dtype=bool)
            field_arrays = {name: np.asarray(values, dtype=np.float32) for name, values in fields.items()}
            weights = np.asarray(span_weights, dtype=np.float32)
            if p.token_weights is not None:
                count = int(lab.sum())
                values = p.token_weights
                if len(values) == count + 1 and p.eos and p.eos_labelled:
                    values, eos_weight = values[:-1], values[-1]
                elif len(values) == count:
                    eos_weight = 1.0
                else:
                    extra = f" ({count + 1} with the eos)" if p.eos and p.eos_labelled else ""
                    raise _error(
                        p.location, "token_weights",
                        f"has {len(values)} values but the example has {count} labelled tokens{extra}.",
                    )
                weights[lab] *= np.asarray(values, dtype=np.float32)
            else:
                eos_weight = 1.0
            if p.eos:
                ids.append(int(eos_id))
                lab = np.append(lab, p.eos_labelled)
                weights = np.append(weights, np.float32(eos_weight))
                field_arrays = {name: np.append(values, np.float32(0.0)) for name, values in field_arrays.items()}
            ids_arr = np.asarray(ids, dtype=np.int32)
            weights = weights * np.float32(p.weight)
            if len(ids_arr) > self.max_length:
                too_long += 1
                if self.truncation == "error":
                    raise _error(
                        p.location, None,
                        f"the example has {len(ids_arr)} tokens, more than max_length={self.max_length} "
                        "(truncation: error). Raise max_length or choose truncation: drop / truncate_right / truncate_left.",
                    )
                if self.truncation == "drop":
                    dropped_long += 1
                    continue
                keep = self._kept_slice(ids_arr, p.bos)
                ids_arr, lab, weights = ids_arr[keep], lab[keep], weights[keep]
                field_arrays = {name: values[keep] for name, values in field_arrays.items()}
            labels = np.where(lab, ids_arr, -100).astype(np.int32)
            labels[0] = -100  # never predicted from a token of its own example
            if not (labels != -100).any():
                unlabelled += 1
                continue
            inputs.append(ids_arr)
            labels_out.append(labels)
            weights_out.append(weights.astype(np.float32))
            ids_out.append(p.example_id)
            for name, values in field_arrays.items():  # aligned to labels: 0 where no loss is taken
                fields_out[name].append(np.where(labels != -100, values, np.float32(0.0)).astype(np.float32))
        total = len(parsed)
        if too_long and self.truncation != "error":
            action = "dropped" if self.truncation == "drop" else f"cut ({self.truncation})"
            rank_zero_warn(
                f"SFT {split}: {too_long}/{total} examples have more than max_length={self.max_length} tokens and were "
                f"{action}."
            )
        if unlabelled:
            rank_zero_warn(
                f"SFT {split}: {unlabelled}/{total} examples have no labelled token left (after truncation) and were dropped."
            )
        if not inputs:
            raise ValueError(f"SFT {split}: no example is left ({total} read); check max_length and truncation.")
        return SFTDataset(inputs, labels_out, weights_out, ids_out, fields_out or None)

    def _kept_slice(self, ids: np.ndarray, has_bos: bool) -> np.ndarray:
        n, budget = len(ids), self.max_length
        if self.truncation == "truncate_right":
            return np.arange(budget)
        bos = len(self._bos_prefix) if has_bos and self._bos_prefix and ids[: len(self._bos_prefix)].tolist() == self._bos_prefix else 0
        return np.concatenate([np.arange(bos), np.arange(n - (budget - bos), n)])

    # -- splits --------------------------------------------------------------------------------------
    def _parse_file(self, path: str) -> list[_Parsed]:
        records = _read_records(path, self.format)
        if not records:
            raise ValueError(f"SFT data file {path!r} holds no records.")
        parsed = [self._parse(r) for r in records]
        seen: dict[str | int | float, str] = {}
        for p in parsed:
            key = p.raw_id
            if key in seen:
                raise _error(p.location, "id", f"duplicate id {key!r} (first at {seen[key]}); ids must be unique within a file.")
            seen[key] = p.location
        return parsed

    def _split_records(self) -> dict[str, list[_Parsed]]:
        train = self._parse_file(self.train_file)
        if self.val_file is not None or self.val_fraction == 0:
            return {"train": train}
        count = max(1, round(len(train) * self.val_fraction))
        if count >= len(train):
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training example out of {len(train)}.")
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        held = set(order[:count])
        return {
            "train": [p for i, p in enumerate(train) if i not in held],
            "val": [p for i, p in enumerate(train) if i in held],
        }

    def _register_ids(self, parsed: list[_Parsed]) -> None:
        self.example_ids.update((p.raw_id, p.example_id) for p in parsed)

    def _build_predict_dataset(self) -> _PromptDataset:
        if self.predict_file is None:
            raise ValueError("trainer.predict needs predict_file (JSONL prompts or chats) on the SFTDataModule.")
        tokenizer = self._resolve_tokenizer()
        path = self.predict_file
        ext = os.path.splitext(path)[1].lower()
        prompts: list[str] = []
        templated: list[bool] = []
        if self.format == "auto" and ext not in _EXTENSIONS:
            with open(path, encoding="utf-8") as handle:
                lines = [line.rstrip("\r\n") for line in handle]
            prompts = [line for line in lines if line.strip()]
            templated = [False] * len(prompts)
        else:
            for record in _read_records(path, self.format, prompts=True):
                data = record.data
                if "messages" in data:
                    plain = self._plain_messages(data["messages"], record.location)
                    while plain and plain[-1]["role"] == "assistant":
                        plain.pop()
                    if not plain:
                        raise _error(record.location, "messages", "expected messages before the (dropped) assistant answer.")
                    prompts.append(self._render(plain, add_generation_prompt=True))
                    templated.append(self._uses_template)
                else:
                    prompts.append(_string(data, "prompt", record.location))
                    templated.append(False)
        if not prompts:
            raise ValueError(f"predict_file {path!r} holds no prompts.")
        encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        budget = max(1, self.max_length - self.max_new_tokens)
        prompt_ids, cut = [], 0
        for ids, is_templated in zip(encoded, templated):
            ids = list(ids) if is_templated else list(self._bos_prefix) + list(ids)
            if len(ids) > budget:
                cut += 1
                bos = self._bos_prefix if not is_templated and self._bos_prefix else []
                ids = bos + ids[len(ids) - (budget - len(bos)) :]
            prompt_ids.append(np.asarray(ids, dtype=np.int32))
        if cut:
            rank_zero_warn(
                f"SFT predict: {cut}/{len(prompts)} prompts exceed max_length - max_new_tokens = {budget} tokens; "
                "they were cut from the left."
            )
        return _PromptDataset(prompts, prompt_ids)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, then read, check and tokenize the files ``stage`` needs (errors here)."""
        self._resolve_tokenizer()
        if stage in ("fit", None):
            self._prepare_train_val()
            if stage is None and self.test_file is not None:
                self._prepare_file_split("test")
        elif stage == "validate":
            if self.val_file is None and self.val_fraction == 0:
                raise ValueError("trainer.validate needs val_file or val_fraction > 0 on the SFTDataModule.")
            self._prepare_train_val(train=False)
        elif stage == "test":
            self._prepare_file_split("test")
        elif stage == "predict" and "predict" not in self._datasets:
            self._datasets["predict"] = self._build_predict_dataset()

    def _prepare_train_val(self, train: bool = True) -> None:
        if self.val_file is not None:
            if "val" not in self._datasets:
                self._prepare_file_split("val")
            if not train:
                return
        if "train" in self._datasets:
            return
        for name, parsed in self._split_records().items():
            if name == "train":
                parsed = self._apply_filters(parsed)
            self._register_ids(parsed)
            self._datasets[name] = self._build_examples(parsed, name)

    def _apply_filters(self, parsed: list[_Parsed]) -> list[_Parsed]:
        """The training records that every filter keeps (each filter sees the previous one's survivors)."""
        self.filter_report = []
        for record_filter in self.filters:
            before = len(parsed)
            keep = record_filter.keep([p.data for p in parsed], self.tokenizer)
            if len(keep) != before:
                raise ValueError(f"{record_filter!r} returned {len(keep)} keep flags for {before} records.")
            parsed = [p for p, k in zip(parsed, keep) if k]
            self.filter_report.append({"filter": type(record_filter).__name__, "before": before, "kept": len(parsed)})
            rank_zero_info(f"SFT train: {type(record_filter).__name__} kept {len(parsed)}/{before} records.")
            if not parsed:
                raise ValueError(f"SFT train: {record_filter!r} kept no record of {before}; loosen its threshold or fraction.")
        return parsed

    def _prepare_file_split(self, split: Literal["val", "test"]) -> None:
        if split in self._datasets:
            return
        path = self.val_file if split == "val" else self.test_file
        if path is None:
            raise ValueError(f"trainer.{'test' if split == 'test' else 'validate'} needs {split}_file on the SFTDataModule.")
        parsed = self._parse_file(path)
        self._register_ids(parsed)
        self._datasets[split] = self._build_examples(parsed, split)

    def _examples(self, split: str) -> SFTDataset:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        dataset = self._datasets[split]
        assert isinstance(dataset, SFTDataset)
        return dataset

    def dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        """The dataset a loader of ``split`` iterates: examples, or packed rows when packing applies."""
        examples = self._examples(split)
        if not (self.packing if split == "train" else self.pack_eval):
            return examples
        key = f"{split}/packed"
        if key not in self._datasets:
            seed = self.seed if split == "train" else None
            self._datasets[key] = PackedSFTDataset(examples, pack_examples(examples.lengths(), self.max_length, seed))
        return self._datasets[key]

    def _pad_id(self) -> int:
        assert self.tokenizer is not None
        return int(self.tokenizer.pad_token_id)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None, mode: Literal["train", "predict"] = "train") -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=SFTCollator(self._pad_id(), mode),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (packed rows with ``packing=True``)."""
        dataset = self.dataset("train")
        sampler = self._resumable_sampler(len(dataset), self.seed % (2**31), self.batch_size)
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (the training keys; packed only with ``pack_eval``); ``[]`` without validation data."""
        if self.val_file is None and self.val_fraction == 0:
            return []
        return self._loader(self.dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, like validation batches."""
        return self._loader(self.dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: ``prompt_input_ids`` (left-padded), ``prompt_attention_mask``, ``prompts``."""
        if "predict" not in self._datasets:
            self.setup("predict")
        return self._loader(self._datasets["predict"], self.eval_batch_size, mode="predict")

    # -- used by the LightningModule -----------------------------------------------------------------
    def extract_answer(self, text: str) -> str:
        """The answer in generated text: the text without surrounding whitespace."""
        return text.strip()

    @property
    def generation_max_new_tokens(self) -> int:
        """How many tokens ``predict`` generates (``max_new_tokens``)."""
        return self.max_new_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train_file={self.train_file!r}, packing={self.packing}, max_length={self.max_length})"
