"""One process of the vision-language multi-process tests (``tests/modules/test_vision_language_multiprocess.py``):

    python tests/vlm_distributed_worker.py --strategies single --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/vlm_distributed_worker.py --strategies ddp,fsdp2 --out DIR

A tiny GVT composition (tiny Llama + random ViT + Perceiver resampler, language model and connector trained)
fits ``STEPS`` optimizer steps on fixed random images, questions and answers; under FSDP2 the same fit is
also split in two (``RESUME_AT`` steps, a sharded checkpoint, a resume to ``STEPS``). Rank 0 writes, per
strategy, the global loss of every step, the final full weights (LM, connector, vision encoder) and which
modules FSDP2 made units to ``DIR/vlm_<strategy>.pt``. ``single`` (one process, the global batch) is the
baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_tokens.modules import OptimizerSettings  # noqa: E402
from lightning_tokens.modules.vision_language import ResamplerSettings, VisionLanguageLM, VisionSettings  # noqa: E402

TINY_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
TINY_VIT = VisionSettings(name="vit_tiny_patch16_224", pretrained=False, image_size=32, overrides={"patch_size": 8, "depth": 2})
TINY_RESAMPLER = ResamplerSettings(num_latents=4, depth=1, heads=2, dim_head=16)
GLOBAL_BATCH = 4
EXAMPLES = 8  # two steps an epoch: the checkpoint at RESUME_AT is an epoch boundary
STEPS = 3
RESUME_AT = 2
SAVED_PREFIXES = ("model.", "connector.", "vision_encoder.")


class SeededVisionLanguageLM(VisionLanguageLM):
    """Every process builds the same initial weights, whatever ran before."""

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(1234)
        super().configure_model()


def build(kind: str) -> VisionLanguageLM:
    torch.manual_seed(99)  # the vision encoder is built with the processor, before configure_model
    optimizer = OptimizerSettings(lr=1e-2, warmup=0, min_lr_ratio=1.0)
    if kind == "hf":  # Qwen2-VL built from a tiny config: its vision tower stays frozen, the rest trains
        model = SeededVisionLanguageLM(model="tiny-qwen2-vl", train_language_model=True, optimizer=optimizer)
    else:
        model = SeededVisionLanguageLM(
            model="tiny-llama", tokenizer="char", model_config=TINY_LM, vision=TINY_VIT, resampler=TINY_RESAMPLER,
            train_language_model=True, optimizer=optimizer,
        )
    model.processor  # noqa: B018 (builds the encoder under the seed above)
    return model


def examples() -> list[tuple[Image.Image, str, str]]:
    g = torch.Generator().manual_seed(7)
    letters = "abcdefghij"
    out = []
    for i in range(EXAMPLES):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        words = [letters[int(j)] for j in torch.randint(0, len(letters), (3 + i % 4,), generator=g)]
        question = "what is " + "".join(words[:2]) + "?"
        answer = "".join(words)  # uneven lengths: ranks hold different token counts
        out.append((Image.fromarray(pixels), question, answer))
    return out


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def strategy_of(name: str):
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return "ddp" if name == "ddp" else "auto"


def fit(kind: str, strategy: str, max_steps: int, ckpt_dir: str | None = None, resume: str | None = None) -> tuple[list[float], dict, dict]:
    world = 1 if strategy == "single" else 2
    model = build(kind)
    recorder = RecordLoss()
    callbacks: list[pl.Callback] = [recorder]
    if ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy_of(strategy), max_steps=max_steps, logger=False,
        enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=callbacks,
    )
    data = examples()
    processor = model.processor
    # rank r takes examples r, r + world, ...: each step's union is the single process's batch
    sampler = DistributedSampler(data, num_replicas=world, rank=int(os.environ.get("RANK", "0")), shuffle=False)

    def collate(items: list[tuple[Image.Image, str, str]]) -> dict[str, torch.Tensor]:
        images, questions, answers = zip(*items)
        batch = processor(list(images), list(questions), list(answers))
        return {k: v for k, v in batch.items() if not k.startswith("prompt_")}  # generation inputs unused

    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate)
    trainer.fit(model, loader, ckpt_path=resume)
    return recorder.losses, full_weights(model, strategy), sharding_layout(model)


def full_weights(model: VisionLanguageLM, strategy: str) -> dict[str, torch.Tensor]:
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(SAVED_PREFIXES)}


def sharding_layout(model: VisionLanguageLM) -> dict:
    """Which parameters are DTensors and which modules are FSDP2 units (empty lists without FSDP2)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return {
        "plain_parameters": sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor)),
        "units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
    }


def run(kind: str, strategy: str, out: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    results = {}
    results["full"] = fit(kind, strategy, STEPS)
    if strategy == "single":  # the starting weights, to tell trained from untouched
        model = build(kind)
        model.configure_model()
        results["initial"] = full_weights(model, strategy)
    if strategy == "fsdp2" and kind == "gvt":
        ckpt_dir = os.path.join(out, f"vlm_ckpt_{kind}_{strategy}")
        if rank == 0 and os.path.exists(ckpt_dir):  # a stale checkpoint would be resumed instead (-v1 names)
            shutil.rmtree(ckpt_dir)
        first = fit(kind, strategy, RESUME_AT, ckpt_dir=ckpt_dir)
        saved = os.path.join(ckpt_dir, f"epoch=0-step={RESUME_AT}.ckpt")
        second = fit(kind, strategy, STEPS, resume=saved)
        results["resumed"] = (first[0] + second[0], second[1])
        results["sharded_checkpoint"] = os.path.isdir(saved)
    if rank == 0:
        torch.save(results, os.path.join(out, f"vlm_{kind}_{strategy}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", required=True, help="single, or ddp and/or fsdp2 under torchrun")
    parser.add_argument("--models", default="gvt,hf", help="gvt (the GVT composition) and/or hf (tiny Qwen2-VL)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for kind in args.models.split(","):
        for strategy in args.strategies.split(","):
            run(kind, strategy, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
