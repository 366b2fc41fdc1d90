"""Collating SFT items into batches: padded (or packed) training/evaluation rows, and left-padded prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["SFTCollator"]

_ITEM_KEYS = frozenset({"input_ids", "labels", "token_weights", "example_id"})


@dataclass
class SFTCollator:
    """Collate :class:`SFTDataset` / :class:`PackedSFTDataset` items (picklable, for worker processes).

    Args:
        pad_token_id: id used for padding.
        mode: ``"train"`` for training/evaluation batches (see :mod:`lightning_tokens.datamodules.sft` for their keys;
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
