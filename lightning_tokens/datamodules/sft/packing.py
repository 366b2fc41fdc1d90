"""Packing whole examples into rows of at most ``max_length`` tokens: the best-fit grouping, the dataset of
packed rows, and the block-diagonal attention mask for models that need one."""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.sft.dataset import SFTDataset

__all__ = ["PackedSFTDataset", "pack_examples", "packed_attention_mask"]


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
            raise ConfigError(f"example {index} has {size} tokens, more than the row capacity {capacity}.")
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


class PackedSFTDataset(Dataset):
    """Rows of whole examples of an :class:`SFTDataset`; an item is ``{"examples": [example items]}``."""

    def __init__(self, examples: SFTDataset, rows: Sequence[Sequence[int]]) -> None:
        self.examples = examples
        self.rows = [list(r) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"examples": [self.examples[i] for i in self.rows[index]]}
