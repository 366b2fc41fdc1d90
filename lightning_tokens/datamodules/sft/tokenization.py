"""Tokenizing parsed examples into :class:`~lightning_tokens.datamodules.sft.dataset.SFTDataset` arrays: token
ids, labels from the labelled character spans, token weights, per-token FAIT masks, and the ``max_length`` policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedTokenizerBase

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.sft.dataset import SFTDataset
from lightning_tokens.datamodules.sft.parsing import _Parsed, _Segment
from lightning_tokens.datamodules.sft.records import _error

TruncationPolicy = Literal["error", "drop", "truncate_left", "truncate_right"]

_POLICIES = ("error", "drop", "truncate_left", "truncate_right")


def _overlaps(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Tokens whose characters ``[s, e)`` overlap ``[start, end)`` (an empty token counts as ``[s, s+1)``)."""
    token_start = offsets[:, 0]
    token_end = np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    return (token_start < end) & (token_end > start)


@dataclass
class _ExampleBuilder:
    """Tokenizes :class:`~lightning_tokens.datamodules.sft.parsing._Parsed` examples with the tokenizer, bos prefix,
    ``max_length`` and ``truncation`` of an :class:`~lightning_tokens.datamodules.sft.datamodule.SFTDataModule`."""

    tokenizer: PreTrainedTokenizerBase
    bos_prefix: list[int]
    max_length: int
    truncation: TruncationPolicy

    def _tokenize_segments(self, segments: list[_Segment]) -> list[tuple[list[int], np.ndarray | None]]:
        tokenizer = self.tokenizer
        assert tokenizer is not None
        need_offsets = any(s.needs_offsets for s in segments)
        if need_offsets and not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
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

    def build(self, parsed: list[_Parsed], split: str, source: str | None = None) -> SFTDataset:
        """The tokenized examples of ``split`` (read from the file ``source``): long ones dropped or cut as
        ``truncation`` says, unlabelled ones dropped."""
        tokenizer = self.tokenizer
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
            ids: list[int] = list(self.bos_prefix) if p.bos else []
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
                with np.errstate(over="ignore"):  # an overflow is reported below, naming the record
                    weights[lab] *= np.asarray(values, dtype=np.float32)
            else:
                eos_weight = 1.0
            if p.eos:
                ids.append(int(eos_id))
                lab = np.append(lab, p.eos_labelled)
                weights = np.append(weights, np.float32(eos_weight))
                field_arrays = {name: np.append(values, np.float32(0.0)) for name, values in field_arrays.items()}
            ids_arr = np.asarray(ids, dtype=np.int32)
            with np.errstate(over="ignore"):
                weights = weights * np.float32(p.weight)
            if not np.isfinite(weights).all():
                raise _error(
                    p.location, "weight",
                    "weight x weight_spans x token_weights exceeds the float32 range (3.4e38) on some token; use smaller weights.",
                )
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
            if len(labels):
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
            where = f" of {source}" if source else ""
            raise ConfigError(
                f"SFT {split}: no example is left ({total} read{where}); check max_length and truncation."
            )
        return SFTDataset(inputs, labels_out, weights_out, ids_out, fields_out or None)

    def _kept_slice(self, ids: np.ndarray, has_bos: bool) -> np.ndarray:
        n, budget = len(ids), self.max_length
        if self.truncation == "truncate_right":
            return np.arange(budget)
        bos = len(self.bos_prefix) if has_bos and self.bos_prefix and ids[: len(self.bos_prefix)].tolist() == self.bos_prefix else 0
        return np.concatenate([np.arange(bos), np.arange(n - (budget - bos), n)])
