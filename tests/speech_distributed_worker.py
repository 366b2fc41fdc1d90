"""One process of the DualSpeechLM multi-process test (``tests/modules/test_dual_speech_lm_ddp.py``):

    python tests/speech_distributed_worker.py --strategy single --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/speech_distributed_worker.py --strategy ddp --out DIR

A tiny DualSpeechLM (tiny Llama, acoustic decoder over a tiny EnCodec's tokens, Chain-of-Condition on) fits
``STEPS`` steps on fixed random speech records of uneven lengths; rank ``r`` of ``w`` takes records ``r, r + w,
...`` of each global batch. Rank 0 writes the global LM and acoustic losses of every step and the final
weights to ``DIR/speech_<strategy>.pt``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_tokens.modules import OptimizerSettings  # noqa: E402
from lightning_tokens.modules.speech import AcousticSettings, DualSpeechLM  # noqa: E402
from lightning_tokens.datamodules.speech import collate_speech  # noqa: E402
from tests.speech_fixtures import speech_records  # noqa: E402
from tests.helpers import fit_sharded, worker_main  # noqa: E402

K = 16
GLOBAL_BATCH = 4
STEPS = 3


class SeededDualSpeechLM(DualSpeechLM):
    """Every process builds the same initial weights."""

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(1234)
        super().configure_model()


def fit(strategy: str) -> tuple[list[tuple[float, float]], dict[str, torch.Tensor]]:
    model = SeededDualSpeechLM(
        model="tiny-llama", tokenizer="char", model_config={"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128},
        speech_codebook_size=K, acoustic=AcousticSettings(n_embd=32, n_layer=1, n_head=2, block_size=256),
        optimizer=OptimizerSettings(lr=1e-2, warmup=0, min_lr_ratio=1.0), generate_in_validation=False,
    )
    losses: list[tuple[float, float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            metrics = trainer.callback_metrics
            losses.append((float(metrics["train/loss"]), float(metrics["train/acoustic/loss"])))

    records = speech_records(GLOBAL_BATCH * STEPS, 24000, K, seed=5)
    weights = fit_sharded(model, records, collate_speech, strategy, GLOBAL_BATCH, STEPS, [Record()])
    return losses, weights


if __name__ == "__main__":
    worker_main(fit, "speech")
