"""
JSONL Prediction Writer
^^^^^^^^^^^^^^^^^^^^^^^

Writes what ``predict_step`` returns (lists of dicts) as one JSON object per line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

__all__ = ["JSONLPredictionWriter"]


class JSONLPredictionWriter(BasePredictionWriter):
    """Append each predicted record to a JSONL file, one file per rank beyond rank 0.

    Args:
        output: file to write; ``None`` writes ``predictions.jsonl`` in the trainer's ``default_root_dir``.

    Example::

        trainer = L.Trainer(callbacks=[JSONLPredictionWriter("answers.jsonl")])
        trainer.predict(model, datamodule=dm, ckpt_path="last.ckpt")
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._path: str | None = None

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.output or os.path.join(trainer.default_root_dir, "predictions.jsonl")
        if trainer.global_rank > 0:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{trainer.global_rank}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "w").close()
        self._path = path

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with open(self._path, "a", encoding="utf-8") as handle:
            for record in prediction:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    @property
    def path(self) -> str | None:
        """The file written by the last ``predict`` run."""
        return self._path
