"""One process of the DualSpeechLM multi-process test (``tests/modules/test_dual_speech_lm_ddp.py``):

    python tests/speech_distributed_worker.py --strategy single --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/speech_distributed_worker.py --strategy ddp --out DIR

A tiny DualSpeechLM (tiny Llama, acoustic decoder over a tiny EnCodec's tokens, Chain-of-Condition on) fits
``STEPS`` steps on fixed random speech records of uneven lengths; rank ``r`` of ``w`` takes records ``r, r + w,
...`` of each global batch. Rank 0 writes the global LM and acoustic losses of every step and the final
weights to ``DIR/speech_<strategy>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_tokens.modules import OptimizerSettings  # noqa: E402
from lightning_tokens.modules.speech import AcousticSettings, DualSpeechLM  # noqa: E402
from lightning_tokens.datamodules.speech import collate_speech  # noqa: E402
from tests.speech_fixtures import speech_records  # noqa: E402

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
    world = 1 if strategy == "single" else 2
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

    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[Record()],
    )
    records = speech_records(GLOBAL_BATCH * STEPS, 24000, K, seed=5)
    sampler = DistributedSampler(records, num_replicas=world, rank=int(os.environ.get("RANK", "0")), shuffle=False)
    loader = DataLoader(records, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate_speech)
    trainer.fit(model, loader)
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=["single", "ddp"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = fit(args.strategy)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, os.path.join(args.out, f"speech_{args.strategy}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
