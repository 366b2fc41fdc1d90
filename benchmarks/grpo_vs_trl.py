"""Seconds per GRPO training step: ours (a Lightning ``Trainer`` fitting ``GRPO``) against TRL's ``GRPOTrainer``.

A full step on each side: sample ``--generations`` completions of each of ``--prompts`` prompts (Hugging Face
``generate`` with the KV cache, sampling at ``--temperature``, no top-k / top-p), score them, compute the
group-relative advantages, the clipped-surrogate loss (``--loss-type``, TRL's name; ours uses the same
aggregation), backward, gradient clipping at ``--max-grad-norm`` and an AdamW step at a constant learning rate.
``beta = 0`` (no reference model), one process, one micro-batch per step, ``num_iterations = 1``, float32 on the
CPU. Both sides load the same tiny Llama (the ``tiny-llama`` preset with random weights and the char tokenizer,
saved once with ``save_pretrained``), train on the same prompts (``NUPADataModule(tasks="Integer/max",
train_format="prompts")``'s training prompts, whose answers and domains TRL receives as dataset columns) and
score with the same reward (``nupa_digit_match``).

A step's time is the interval between the ends of two consecutive optimizer steps (Lightning's
``on_train_batch_end``, TRL's ``on_step_end``), so it includes everything each framework does per step: data
loading, generation, the reward, the loss, backward, the optimizer, logging. The first ``--warmup`` steps are
not timed; the table reports the mean over the next ``--steps``. The completions' mean length is printed too:
a tiny random model rarely samples its eos, so both sides normally generate ``--completion-length`` tokens.

With ``--repeats N`` every side runs N times, each run in a fresh Python process, interleaved (round r runs both,
in an order shuffled with seed r); the ratio ours/TRL is paired within a round, and the table gives medians and
the min–max spread. The target is ours/TRL <= 0.8.

    python benchmarks/grpo_vs_trl.py                                     # defaults, a few minutes on 2 cores
    python benchmarks/grpo_vs_trl.py --steps 20 --warmup 3 --generations 8 --prompts 4 --completion-length 32 --repeats 3

On a shared machine another busy process makes multi-threaded small matrix products wait for a descheduled
thread (about 16 ms a product on a 2-core VM); ``--threads 1`` takes that out of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

LOSS_TYPES = {"dapo": "token-mean", "grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo"}
TASK = "Integer/max"
COMPLETION_CHARS: list[float] = []  # mean completion length (characters = tokens, eos excluded) per reward call


def counted_reward(completions, answers=None, domains=None, **_: Any) -> list[float]:
    """``nupa_digit_match``, recording the completions' mean length; both sides call this same function."""
    from lightning_tokens.rewards import nupa_digit_match

    COMPLETION_CHARS.append(sum(map(len, completions)) / max(len(completions), 1))
    return nupa_digit_match(completions, answers=answers, domains=domains)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--completion-length", type=int, default=16, help="max_completion_length")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, each in a fresh process")
    parser.add_argument("--loss-type", choices=sorted(LOSS_TYPES), default="dapo", help="TRL's loss_type (ours: the same aggregation)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping on both sides (0: off)")
    parser.add_argument("--model-config", type=json.loads, default=None,
                        help='overrides of the tiny-llama preset as JSON, e.g. \'{"num_hidden_layers": 2}\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every run (default: torch's own choice, the cores)")
    parser.add_argument("--workdir", default=None, help="where the model is saved (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument("--child", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    if args.generations < 2:
        parser.error("--generations must be >= 2")
    return args


# ---- set-up --------------------------------------------------------------------------------------------------
def save_model(folder: str, overrides: dict[str, Any] | None, seed: int) -> None:
    import torch

    from lightning_tokens import GRPO

    torch.manual_seed(seed)
    model = GRPO(model="tiny-llama", tokenizer="char", model_config=overrides)
    model.configure_model()
    model.save_pretrained(folder)


def datamodule(args: argparse.Namespace, folder: str):
    from lightning_tokens import NUPADataModule

    total = args.warmup + args.steps
    return NUPADataModule(tasks=TASK, tokenizer=folder, num_train=args.prompts * total, num_val=4, num_test=4,
                          batch_size=args.prompts, train_format="prompts", seed=args.seed)


def _timed(ends: list[float], args: argparse.Namespace) -> float:
    """Mean seconds per step over the steps after the warm-up, from the step-end times."""
    total = args.warmup + args.steps
    if len(ends) < total:
        raise RuntimeError(f"only {len(ends)} of {total} steps ran")
    return (ends[total - 1] - ends[args.warmup - 1]) / args.steps


# ---- ours ----------------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_tokens import GRPO, RewardSpec
    from lightning_tokens.modules import OptimizerSettings

    pl.seed_everything(args.seed, verbose=False)
    model = GRPO(
        model=folder, tokenizer=folder, rewards=[RewardSpec("__main__:counted_reward")],
        num_generations=args.generations, max_completion_length=args.completion_length, temperature=args.temperature,
        beta=0.0, loss_agg=LOSS_TYPES[args.loss_type], log_completions=0, generate_in_validation=False,
        optimizer=OptimizerSettings(lr=args.lr, warmup=0, min_lr_ratio=1.0, betas=(0.9, 0.999)),
    )
    ends: list[float] = []

    class StepEnds(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
            gradient_clip_val=args.max_grad_norm or None, default_root_dir=root, callbacks=[StepEnds()],
        )
        trainer.fit(model, datamodule=datamodule(args, folder))
    return {"seconds_per_step": _timed(ends, args), "completion_length": statistics.fmean(COMPLETION_CHARS[args.warmup:])}


# ---- TRL -----------------------------------------------------------------------------------------------------
def run_trl(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    examples = datamodule(args, folder).examples["train"]
    dataset = Dataset.from_dict({
        "prompt": [e.prompt for e in examples], "answers": [e.answer for e in examples], "domains": [e.domain for e in examples],
    })
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as root:
        config = GRPOConfig(
            output_dir=root, use_cpu=True, bf16=False, fp16=False, report_to=[], disable_tqdm=True, save_strategy="no",
            seed=args.seed, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.prompts * args.generations,
            num_generations=args.generations, max_completion_length=args.completion_length, temperature=args.temperature,
            top_k=0, top_p=1.0, beta=0.0, loss_type=args.loss_type, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=args.max_grad_norm, gradient_checkpointing=False, log_completions=False,
        )
        trainer = GRPOTrainer(
            model=folder, reward_funcs=[counted_reward], args=config, train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[StepEnds()],
        )
        trainer.train()
    return {"seconds_per_step": _timed(ends, args), "completion_length": statistics.fmean(COMPLETION_CHARS[args.warmup:])}


# ---- driver --------------------------------------------------------------------------------------------------
def run_child(args: argparse.Namespace, side: str, folder: str) -> dict[str, Any]:
    """One run of one side in a fresh Python process."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    forwarded = [
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--generations", str(args.generations),
        "--prompts", str(args.prompts), "--completion-length", str(args.completion_length),
        "--loss-type", args.loss_type, "--temperature", str(args.temperature), "--lr", str(args.lr),
        "--max-grad-norm", str(args.max_grad_norm), "--seed", str(args.seed),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    command = [sys.executable, os.path.abspath(__file__), *forwarded, "--child", side, "--folder", folder, "--out", out]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            return {"failed": f"exit {done.returncode}: {last}"}
        with open(out) as handle:
            return json.load(handle)
    finally:
        os.unlink(out)


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for side in ("ours", "trl"):
        times = [r[side]["seconds_per_step"] for r in rounds if "seconds_per_step" in r[side]]
        lengths = [r[side]["completion_length"] for r in rounds if "completion_length" in r[side]]
        summary[side] = {"median": statistics.median(times), "min": min(times), "max": max(times),
                         "completion_length": statistics.fmean(lengths)} if times else None
    ratios = [r["ours"]["seconds_per_step"] / r["trl"]["seconds_per_step"] for r in rounds
              if "seconds_per_step" in r["ours"] and "seconds_per_step" in r["trl"]]
    summary["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios} if ratios else None
    return summary


def print_table(args: argparse.Namespace, rounds: list[dict[str, dict[str, Any]]], summary: dict[str, Any]) -> None:
    print(f"\nGRPO step time on the CPU: {args.prompts} prompts x {args.generations} generations, "
          f"max_completion_length={args.completion_length}, loss_type={args.loss_type}, temperature={args.temperature}, "
          f"beta=0; {args.warmup} warm-up + {args.steps} timed steps, {len(rounds)} round(s), "
          f"threads={args.threads or 'default'}")
    print(f"{'side':<6} {'s/step (median)':>16} {'min':>8} {'max':>8} {'completion len':>15}")
    for side, label in (("ours", "ours"), ("trl", "TRL")):
        row = summary[side]
        if row is None:
            failures = "; ".join(r[side].get("failed", "") for r in rounds)
            print(f"{label:<6} failed: {failures}")
            continue
        print(f"{label:<6} {row['median']:>16.4f} {row['min']:>8.4f} {row['max']:>8.4f} {row['completion_length']:>15.2f}")
    ratio = summary["ratio"]
    if ratio is not None:
        spread = f" (min {ratio['min']:.3f}, max {ratio['max']:.3f})" if len(ratio["rounds"]) > 1 else ""
        verdict = "meets" if ratio["median"] <= 0.8 else "misses"
        print(f"ratio ours/TRL: {ratio['median']:.3f}{spread}; target <= 0.8: {verdict}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = (run_ours if args.child == "ours" else run_trl)(args, args.folder)
        with open(args.out, "w") as handle:
            json.dump(result, handle)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="grpo_vs_trl_")
    folder = os.path.join(workdir, "tiny-llama")
    save_model(folder, args.model_config, args.seed)
    rounds = []
    for r in range(args.repeats):
        order = ["ours", "trl"]
        random.Random(r).shuffle(order)
        result = {side: run_child(args, side, folder) for side in order}
        rounds.append(result)
        print(f"round {r}: " + ", ".join(
            f"{side} {result[side].get('seconds_per_step', float('nan')):.4f} s/step" if "failed" not in result[side]
            else f"{side} failed ({result[side]['failed']})" for side in order), flush=True)
    summary = summarize(rounds)
    print_table(args, rounds, summary)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("child", "folder", "out")},
                       "rounds": rounds, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
