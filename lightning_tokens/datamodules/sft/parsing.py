"""Parsing raw records into examples ready to tokenize: the schema of each record, its fields checked, and
its text segments with the character spans that carry labels, weights and FAIT masks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.sft.chat import _ChatTemplate
from lightning_tokens.datamodules.sft.fields import _number, _string, _token_weight_list, _weight_spans
from lightning_tokens.datamodules.sft.records import FileFormat, _error, _read_records, _Record, stable_example_id

Schema = Literal["auto", "prompt_response", "messages", "text"]

_SCHEMAS = ("auto", "prompt_response", "messages", "text")


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


@dataclass
class _RecordParser:
    """Turns records into :class:`_Parsed` examples, with the options of an
    :class:`~lightning_tokens.datamodules.sft.datamodule.SFTDataModule` (see its docstring)."""

    format: FileFormat
    schema: Schema
    add_eos: bool
    chat: _ChatTemplate
    fait_char_diff: Literal["levenshtein", "difflib"]
    fait_insertions: Literal["adjacent", "ignore"]

    def parse_file(self, path: str) -> list[_Parsed]:
        """The examples of the file ``path``, in file order; ids must be unique within it."""
        records = _read_records(path, self.format)
        if not records:
            raise ConfigError(f"SFT data file {path!r} holds no records.")
        parsed = [self.parse(r) for r in records]
        seen: dict[str | int | float, str] = {}
        for p in parsed:
            key = p.raw_id
            if key in seen:
                raise _error(p.location, "id", f"duplicate id {key!r} (first at {seen[key]}); ids must be unique within a file.")
            seen[key] = p.location
        return parsed

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

    def parse(self, record: _Record) -> _Parsed:
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
            text, labelled, weight_spans, last_is_assistant = self.chat.parse_messages(data, location)
            segments = [_Segment(text, labelled, weight_spans)]
            bos = not self.chat.uses_template
            eos = eos and not self.chat.uses_template
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
