"""A shuffling sampler that makes training resume exactly, also mid-epoch.

Lightning restores a mid-epoch checkpoint by restarting the epoch's iterator from the beginning unless
the dataloader is stateful. This sampler's order depends only on ``(seed, epoch)`` (Lightning calls
``set_epoch``), and a datamodule can ask it to skip the batches an interrupted epoch already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Sampler

from lightning_tokens.core.errors import ConfigError


class ResumableShuffleSampler(Sampler[int]):
    """Random permutation per epoch from ``(seed, epoch)``; an optional one-shot skip on resume.

    Args:
        num_samples: dataset length.
        seed: base seed of the permutations.

    Example::

        sampler = ResumableShuffleSampler(len(dataset), seed=1234)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples to skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_in_epoch(self, epoch: int, samples: int) -> None:
        """Skip the first ``samples`` indices of ``epoch``'s permutation, once."""
        self._skip = (epoch, samples)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = min(self._skip[1], self.num_samples)
        self._skip = None
        return iter(order[start:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataMixin:
    """For a LightningDataModule whose training loader uses :class:`ResumableShuffleSampler`: saves
    how far the current epoch got and makes the restored run skip those batches."""

    _resume_position: tuple[int, int] | None = None  # (epoch, batches completed in it)

    def state_dict(self) -> dict[str, Any]:
        trainer: pl.Trainer | None = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        # "processed", not "completed": a checkpoint written in on_train_batch_end has processed the
        # batch (its optimizer step is in the checkpoint) but not yet counted it as completed
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": batches, "seed": getattr(self, "seed", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved, current = state.get("seed"), getattr(self, "seed", None)
        if saved is not None and current is not None and int(saved) != int(current):
            raise ConfigError(
                f"{type(self).__name__}: the checkpoint was trained on data seeded {saved}, this run seeds its "
                f"data with {current} (seed_everything, or the datamodule's own seed): resuming would continue on "
                f"different data. Resume with seed_everything: {saved} (or the datamodule's seed: {saved})."
            )
        self._resume_position = (int(state["epoch"]), int(state["batches"]))

    def _resumable_sampler(self, num_samples: int, seed: int, batch_size: int) -> ResumableShuffleSampler:
        sampler = ResumableShuffleSampler(num_samples, seed)
        if self._resume_position is not None:
            epoch, batches = self._resume_position
            sampler.skip_in_epoch(epoch, batches * batch_size)
            self._resume_position = None
        return sampler
