"""Step time and peak memory of the token-loss pipeline against the model's own loss, in one run.

Variants (each a full Lightning training step: forward, backward, AdamW step):
  (a) hf_loss   the model's own ``model(input_ids, labels=labels).loss`` (full logits)
  (b) token_lm  TokenLM, fused token loss, no method
  (c) dft       TokenLM + the DFT callback
  no_head       optional floor: the decoder without output head or loss (what any loss path adds to)

Ratios are to (a) on the same device in the same process. A variant may name the fused-loss backend
after a colon (``dft:torch``, ``dft:liger``) to compare Liger with the chunked torch path.

    python benchmarks/token_loss.py --device cpu                                  # tiny, minutes on 2 cores
    python benchmarks/token_loss.py --device cuda --preset llama-1.5b --vocab 128256 --batch 8 --seq 4096
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tokens.callbacks import DFT
from lightning_tokens.modules import OptimizerSettings, TokenLM


class RandomTokens(Dataset):
    """Random token rows; the first quarter of each row is a prompt without labels."""

    def __init__(self, steps: int, batch: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = steps * batch, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        ids = torch.randint(0, self.vocab, (self.seq,), generator=g)
        labels = ids.clone()
        labels[: self.seq // 4] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


class HFLossLM(TokenLM):
    """Baseline (a): the model computes its own mean cross-entropy from full logits."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self.causal_lm(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss


class NoHeadLM(TokenLM):
    """Floor (not a real loss): the decoder alone, no output head, to show what the loss path adds."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).float().square().mean()


class StepTimer(pl.Callback):
    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda, self.times, self._start = warmup, cuda, [], 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        if batch_idx == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    method, _, backend = name.partition(":")
    cls = {"hf_loss": HFLossLM, "no_head": NoHeadLM}.get(method, TokenLM)
    model = cls(
        model=args.preset,
        tokenizer="char",
        model_config={"vocab_size": args.vocab},
        optimizer=OptimizerSettings(lr=1e-5, warmup=0),
        generate_in_validation=False,
        loss_backend=backend or "auto",
    )
    timer = StepTimer(args.warmup, cuda)
    callbacks: list[pl.Callback] = [timer] + ([DFT()] if method == "dft" else [])
    steps = args.warmup + args.steps
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = DataLoader(RandomTokens(steps, args.batch, args.seq, args.vocab), batch_size=args.batch)
    trainer.fit(model, data)
    result = {
        "variant": name,
        "step_s": statistics.median(timer.times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default=None, help="Lightning precision; default bf16-true on CUDA, 32 on CPU")
    parser.add_argument("--variants", default="hf_loss,token_lm,dft")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-true" if args.device == "cuda" else "32-true")

    results = [run_variant(name, args) for name in args.variants.split(",")]
    base = results[0]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\ndevice: {device} | model {args.preset}, vocab {args.vocab}, {args.batch}x{args.seq} tokens, {args.precision}")
    print("| variant | step time (s) | × (a) | peak memory (GiB) | × (a) |")
    print("|---|---|---|---|---|")
    for row in results:
        row["time_ratio"] = row["step_s"] / base["step_s"]
        row["mem_ratio"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] == base["peak_gib"] else float("nan")
        print(
            f"| {row['variant']} | {row['step_s']:.4f} | {row['time_ratio']:.3f} | "
            f"{row['peak_gib']:.2f} | {row['mem_ratio']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
