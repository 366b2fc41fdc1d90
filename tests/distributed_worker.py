"""One process of the multi-process equivalence tests, launched the way users launch jobs (torchrun):

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py --strategy fsdp2 --out DIR

For each method (Rho-1 with a separate reference model, ssToken with EMA history, LoRA + Rho-1 with the
adapter-disabled base as reference) it runs, on a tiny
Llama: an uninterrupted fit of ``STEPS`` optimizer steps, and the same fit split in two (``RESUME_AT``
steps, a checkpoint, a resume to ``STEPS``). Rank 0 writes the global loss of every step and the final
full weights to ``DIR/<method>_<run>.pt``. ``--strategy single`` (one process, the global batch) is the
baseline the tests compare with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_tokens import ExcessLossSelection, SSToken, TokenLM  # noqa: E402
from lightning_tokens.core.reference import ReferenceSettings  # noqa: E402
from lightning_tokens.modules import LoRASettings, OptimizerSettings  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
GLOBAL_BATCH = 4
STEPS = 6
RESUME_AT = 3  # an epoch boundary: 12 examples / global batch 4


class SeededTokenLM(TokenLM):
    """Every process builds the same initial weights (and reference model), whatever ran before."""

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(1234)
        super().configure_model()


def examples(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(12):
        length = 8 + (5 * i) % 11  # uneven lengths: ranks hold different token counts
        ids = torch.randint(4, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[:3] = -100  # the prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    length = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = x["input_ids"], x["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class RecordLoss(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def build(method: str) -> tuple[TokenLM, pl.Callback]:
    optimizer = OptimizerSettings(lr=1e-2, warmup=0, min_lr_ratio=1.0)
    if method == "rho1":
        reference = ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY)
        callback: pl.Callback = ExcessLossSelection(ratio=0.6, scope="batch", ranks=os.environ.get("RHO1_RANKS", "global"))
    elif method == "lora_rho1":
        reference = ReferenceSettings(mode="adapter_disabled")
        callback = ExcessLossSelection(ratio=0.6, scope="batch", ranks="global")
    else:
        reference = ReferenceSettings(mode="ema", ema_alpha=0.5)
        callback = SSToken(ratio=0.6, gamma=0.5)
    lora = LoRASettings(r=4) if method.startswith("lora") else None
    model = SeededTokenLM(
        model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=optimizer, reference=reference, lora=lora
    )
    return model, callback


def strategy_of(name: str):
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    return "ddp" if name == "ddp" else "auto"


def fit(args, method: str, max_steps: int, ckpt_dir: str | None = None, resume: str | None = None) -> tuple[list[float], dict]:
    world = 1 if args.strategy == "single" else 2
    model, callback = build(method)
    recorder = RecordLoss()
    callbacks = [callback, recorder]
    if ckpt_dir:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=max_steps, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy_of(args.strategy),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    data = examples(len(model.tokenizer))
    # rank r takes examples r, r + world, ...: each step's union is the single process's batch
    sampler = DistributedSampler(data, num_replicas=world, rank=int(os.environ.get("RANK", "0")), shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate)
    trainer.fit(model, loader, ckpt_path=resume)
    return recorder.losses, full_weights(model, args.strategy)


def full_weights(model: TokenLM, strategy: str) -> dict[str, torch.Tensor]:
    if strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith("model.")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    parser.add_argument("--methods", default="rho1,sstoken,lora_rho1")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for method in args.methods.split(","):
        results = {}
        results["full"] = fit(args, method, STEPS)
        ckpt_dir = os.path.join(args.out, f"ckpt_{args.strategy}_{method}")
        if rank == 0 and os.path.exists(ckpt_dir):  # a stale checkpoint would be resumed instead (-v1 names)
            shutil.rmtree(ckpt_dir)
        first = fit(args, method, RESUME_AT, ckpt_dir=ckpt_dir)
        saved = os.path.join(ckpt_dir, f"epoch=0-step={RESUME_AT}.ckpt")
        second = fit(args, method, STEPS, resume=saved)
        results["resumed"] = (first[0] + second[0], second[1])
        results["at_checkpoint"] = first[1]
        results["checkpoint"] = saved
        results["sharded_checkpoint"] = os.path.isdir(saved)
        if rank == 0:
            torch.save(results, os.path.join(args.out, f"{args.strategy}_{method}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
