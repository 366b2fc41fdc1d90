"""One process of the image-tokenizer multi-process test (``tests/modules/test_image_tokenizer_ddp.py``):

    python tests/image_tokenizer_distributed_worker.py --strategy single --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/image_tokenizer_distributed_worker.py --strategy ddp --out DIR

A tiny FlexibleImageTokenizer (RTP, per-sample kept lengths, HSR and perceptual loss on random frozen networks,
EMA codebook, PatchGAN with the adaptive weight) fits ``STEPS`` steps on fixed random images; rank ``r`` of
``w`` takes images ``r, r + w, ...`` of each global batch. Rank 0 writes the global loss of every step and
the final state dict to ``DIR/tokenizer_<strategy>.pt``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_tokens.datamodules.images import collate_images  # noqa: E402
from lightning_tokens.layers.adversarial import AdversarialSettings  # noqa: E402
from lightning_tokens.modules.causal_lm import OptimizerSettings  # noqa: E402
from lightning_tokens.modules.image_tokenizer import FlexibleImageTokenizer  # noqa: E402
from tests.helpers import fit_sharded, worker_main  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3


def fit(strategy: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(1234)  # every process builds the same initial weights
    model = FlexibleImageTokenizer(
        preset="tiny", semantic_pretrained=False, teacher_image_size=64, perceptual_image_size=32,
        adversarial=AdversarialSettings(width=8, depth=2, norm="group"),
        optimizer=OptimizerSettings(lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.95), warmup=0, min_lr_ratio=1.0),
    )
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))

    images = list(torch.rand(GLOBAL_BATCH * STEPS, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    return losses, fit_sharded(model, images, collate_images, strategy, GLOBAL_BATCH, STEPS, [Record()])


if __name__ == "__main__":
    worker_main(fit, "tokenizer")
