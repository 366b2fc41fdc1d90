"""The map-style dataset of tokenized SFT examples: per-token arrays and an integer ``example_id`` each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lightning_tokens.core.errors import ConfigError

__all__ = ["SFTDataset"]


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
            raise ConfigError("input_ids, labels, token_weights and example_ids must have one entry per example.")
        reserved = {"input_ids", "labels", "token_weights", "example_id", "examples"}
        for name, values in self.token_fields.items():
            if name in reserved:
                raise ConfigError(f"token field {name!r} clashes with a standard batch key.")
            if len(values) != n or any(len(v) != len(ids) for v, ids in zip(values, self.input_ids)):
                raise ConfigError(f"token field {name!r} must have one array per example, as long as its input_ids.")

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
