"""Step time and peak memory of the token-loss pipeline against the model's own loss, in one run.

Variants (each a full Lightning training step: forward, backward, AdamW step), ratios to a baseline
measured on the same device in the same process:
  (a) hf_loss    the model's own ``model(input_ids, labels=labels).loss`` (full logits)
  (b) token_lm   TokenLM, fused token loss, no method                         (baseline: hf_loss)
  (c) dft        TokenLM + the DFT callback                                   (baseline: hf_loss)
  rho1_offline   Rho-1 with reference losses precomputed by ``score``           (baseline: hf_loss)
  rho1_model     Rho-1 with a separate same-size frozen reference model         (baseline: hf_loss)
  lora           TokenLM with LoRA r=16 on all linear layers                    (baseline: lora)
  lora_rho1_adapter_disabled  LoRA + Rho-1, reference = the adapter-disabled base  (baseline: lora)
  qtuning        Q-Tuning, entropy from the fused NLL pass                    (baseline: hf_loss)
  ift            Intuitive Fine-Tuning: a greedy no-grad first pass, mixed input embeddings, propagated
                 weights (baseline: token_lm, plain SFT; issue 12's GPU target ≤ 1.40)
  caft           CAFT, 4 auxiliary decoder-layer heads on the shared output head, fused per-head NLL
                 (baseline: token_lm; issue 12's GPU target ≤ 1.25 step time, ≤ 1.1× memory)
  otr_exact      One-Token Rollout, the exact expectation (baseline: token_lm; GPU target ≤ 1.05)
  otr_sampled    One-Token Rollout, K = 256 sampled tokens (baseline: token_lm; GPU target ≤ 1.10)
  sstoken_offline  ssToken with offline history losses   (baseline: rho1_offline, the same history cost)
  lora_sstoken_adapter_disabled  LoRA + ssToken, adapter-disabled history (baseline: LoRA + Rho-1, same)
  no_head        a floor: the decoder without output head or loss           (baseline: hf_loss)
  lora_bf16      LoRA r=16 on all linear layers, weights in the run's precision (bf16-true on CUDA)
  qlora_nf4      QLoRA: the base loaded in 4-bit NF4 by transformers' BitsAndBytesConfig, LoRA on top
                 (baseline: lora_bf16)
  qlora_nf4_rho1 QLoRA + Rho-1 against the adapter-disabled (4-bit) base        (baseline: qlora_nf4)
A variant may name the fused-loss backend after a colon (``dft:torch``, ``dft:liger``) to compare Liger
with the chunked torch path. Quantized variants load the preset's random weights from a checkpoint folder
saved once under ``--workdir`` (quantization applies to weights loaded with ``from_pretrained``); when the
three QLoRA rows run, their two target ratios are printed under the table.

    python benchmarks/token_loss.py --device cpu                                  # tiny, minutes on 2 cores
    python benchmarks/token_loss.py --device cuda --preset llama-1.5b --vocab 128256 --batch 8 --seq 4096
    python benchmarks/token_loss.py --device cuda --preset llama-1b --batch 2 --seq 1024 --gradient-checkpointing \
        --variants lora_bf16,qlora_nf4,qlora_nf4_rho1

Run-to-run noise (about ±25 % on a shared 2-core machine) can be larger than the effects measured. With
``--repeats N`` (N > 1) every variant runs N times, each run in a fresh Python process, interleaved: round r
runs every variant once, in an order shuffled with seed r, so slow drift of the machine hits all variants
alike. Baselines missing from ``--variants`` are added (and the output says so). Each round's ratio is paired
(the variant's step time / its baseline's step time in the same round); the table reports per variant the
median step time, the median ratio and its spread (min–max and interquartile range) over the rounds; the QLoRA
target lines use the median ratio. A failed child process shows as a failed row with the last line of its
stderr, and the other runs go on. ``--json`` then holds every round's results and the summary.

    python benchmarks/token_loss.py --device cpu --repeats 5 --variants token_lm,dft,qtuning --json runs/r5.json
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tokens.callbacks import DFT, ExcessLossSelection
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.modules import LoRASettings, OptimizerSettings, TokenLM
from lightning_tokens.core.reference_scores import score_reference


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
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "example_id": index}


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


class RandomTokensData(pl.LightningDataModule):
    def __init__(self, steps: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.dataset = RandomTokens(steps, args.batch, args.seq, args.vocab)
        self.batch_size = args.batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size)


LORA = LoRASettings(r=16, alpha=32)

# name -> (module class, TokenLM keyword arguments, method callbacks, baseline the ratio is taken to)
VARIANTS: dict[str, tuple[type, dict[str, Any], list[str], str]] = {
    "hf_loss": (HFLossLM, {}, [], "hf_loss"),
    "no_head": (NoHeadLM, {}, [], "hf_loss"),
    "token_lm": (TokenLM, {}, [], "hf_loss"),
    "dft": (TokenLM, {}, ["dft"], "hf_loss"),
    "rho1_offline": (TokenLM, {"reference": "offline"}, ["rho1"], "hf_loss"),
    "rho1_model": (TokenLM, {"reference": "model"}, ["rho1"], "hf_loss"),
    "qtuning": (TokenLM, {}, ["qtuning"], "hf_loss"),
    "ift": (TokenLM, {}, ["ift"], "token_lm"),
    "caft": (TokenLM, {}, ["caft"], "token_lm"),
    "otr_exact": (TokenLM, {}, ["otr_exact"], "token_lm"),
    "otr_sampled": (TokenLM, {}, ["otr_sampled"], "token_lm"),
    "sstoken_offline": (TokenLM, {"reference": "offline"}, ["sstoken"], "rho1_offline"),
    "lora": (TokenLM, {"lora": LORA}, [], "lora"),
    "lora_rho1_adapter_disabled": (TokenLM, {"lora": LORA, "reference": "adapter_disabled"}, ["rho1"], "lora"),
    "lora_sstoken_adapter_disabled": (
        TokenLM, {"lora": LORA, "reference": "adapter_disabled"}, ["sstoken"], "lora_rho1_adapter_disabled"
    ),
    "lora_bf16": (TokenLM, {"lora": LORA}, [], "lora_bf16"),
    "qlora_nf4": (TokenLM, {"lora": LORA, "quantization": "nf4"}, [], "lora_bf16"),
    "qlora_nf4_rho1": (
        TokenLM, {"lora": LORA, "quantization": "nf4", "reference": "adapter_disabled"}, ["rho1"], "qlora_nf4"
    ),
}
# the QLoRA targets: (row, divided by row, target ratio, what is compared)
QLORA_TARGETS = [
    ("qlora_nf4_rho1", "qlora_nf4", "step_s", 1.30),
    ("qlora_nf4_rho1", "lora_bf16", "peak_gib", 0.40),
]


def _method(name: str) -> pl.Callback:
    from lightning_tokens.callbacks.caft import CAFT
    from lightning_tokens.callbacks.ift import IntuitiveFineTuning
    from lightning_tokens.callbacks.otr import OneTokenRollout
    from lightning_tokens.callbacks.qtuning import QTuning
    from lightning_tokens.callbacks.sstoken import SSToken

    if name.startswith("otr_"):  # the two OTR rows: the exact expectation, and K = 256 draws
        return OneTokenRollout(estimator="exact") if name == "otr_exact" else OneTokenRollout(estimator="sample", num_samples=256)
    return {"dft": DFT, "rho1": ExcessLossSelection, "qtuning": QTuning, "sstoken": SSToken,
            "ift": IntuitiveFineTuning, "caft": CAFT}[name]()


def _reference(mode: str, args: argparse.Namespace, steps: int) -> ReferenceSettings:
    if mode == "model":
        return ReferenceSettings(mode="model", model=args.preset, model_config={"vocab_size": args.vocab})
    if mode == "offline":
        path = os.path.join(args.workdir, "reference_scores.safetensors")
        if not os.path.exists(path):  # scored once, by the same path users take (`lightning-tokens score`)
            scorer = TokenLM(model=args.preset, tokenizer="char", model_config={"vocab_size": args.vocab})
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            with torch.device(args.device):
                scorer.configure_model()
            scorer.to(dtype)
            score_reference(scorer, RandomTokensData(steps, args), path, device=args.device)
            del scorer
        return ReferenceSettings(mode="offline", scores_file=path)
    return ReferenceSettings(mode=mode)


def _saved_preset(args: argparse.Namespace) -> str:
    """The preset with random weights as a checkpoint folder (written once, in bf16 on CUDA), so that it
    can be loaded quantized like any pretrained model."""
    from transformers import AutoModelForCausalLM

    from lightning_tokens.models.presets import build_config
    from lightning_tokens.models.tokenizers import resolve_tokenizer

    path = os.path.join(args.workdir, f"{args.preset}-vocab{args.vocab}")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(build_config(args.preset, args.vocab), dtype=dtype)
        tmp = f"{path}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        resolve_tokenizer("char").save_pretrained(tmp)
        os.replace(tmp, path)
        del model
    return path


def run_variant(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    variant, _, backend = name.partition(":")
    cls, kwargs, methods, baseline = VARIANTS[variant]
    steps = args.warmup + args.steps
    kwargs = dict(kwargs)
    if "reference" in kwargs:
        kwargs["reference"] = _reference(kwargs["reference"], args, steps)
    if kwargs.get("quantization"):  # pretrained-style weights, compute in the run's dtype
        source: dict[str, Any] = {"model": _saved_preset(args), "dtype": "bfloat16" if cuda else None}
    else:
        source = {"model": args.preset, "model_config": {"vocab_size": args.vocab}}
    model = cls(
        **source,
        tokenizer="char",
        optimizer=OptimizerSettings(lr=1e-5, warmup=0),
        gradient_checkpointing=args.gradient_checkpointing,
        generate_in_validation=False,
        loss_backend=backend or "auto",
        **kwargs,
    )
    timer = StepTimer(args.warmup, cuda)
    callbacks: list[pl.Callback] = [timer] + [_method(m) for m in methods]
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
    trainer.fit(model, datamodule=RandomTokensData(steps, args))
    result = {
        "variant": name,
        "baseline": baseline,
        "step_s": statistics.median(timer.times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (all variants)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--workdir", default="runs/benchmark", help="where offline reference scores are written")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="N > 1: N interleaved rounds, each variant in its own process; median and spread of paired ratios",
    )
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # child of --repeats: one variant
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.single and not args.json:
        parser.error("--single needs --json")
    args.precision = args.precision or ("bf16-true" if args.device == "cuda" else "32-true")
    return args


def _device_name(args: argparse.Namespace) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else "CPU"


def _setup_line(device: str, args: argparse.Namespace) -> str:
    return f"device: {device} | model {args.preset}, vocab {args.vocab}, {args.batch}x{args.seq} tokens, {args.precision}"


# ------------------------------------------------------------------ --repeats 1: all variants in this process


def run_in_process(args: argparse.Namespace) -> None:
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, args)
    device = _device_name(args)
    print(f"\n{_setup_line(device, args)}")
    print("| variant | step time (s) | peak memory (GiB) | baseline | time × baseline | memory × baseline |")
    print("|---|---|---|---|---|---|")
    for row in results.values():
        base = results.get(row["baseline"])
        row["time_ratio"] = row["step_s"] / base["step_s"] if base else float("nan")
        row["mem_ratio"] = row["peak_gib"] / base["peak_gib"] if base and base["peak_gib"] > 0 else float("nan")
        print(
            f"| {row['variant']} | {row['step_s']:.4f} | {row['peak_gib']:.2f} | {row['baseline']} | "
            f"{row['time_ratio']:.3f} | {row['mem_ratio']:.3f} |"
        )
    for row, base, key, target in QLORA_TARGETS:
        if row in results and base in results:
            ratio = results[row][key] / results[base][key] if results[base][key] > 0 else float("nan")
            what = "step time" if key == "step_s" else "peak memory"
            verdict = "n/a (not measured on this device)" if math.isnan(ratio) else ("met" if ratio <= target else "MISSED")
            print(f"{what}: {row} / {base} = {ratio:.3f} (target <= {target:.2f}): {verdict}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "args": vars(args), "results": list(results.values())}, handle, indent=2)


def run_single(args: argparse.Namespace) -> None:
    """The child of ``--repeats``: one variant, its result written as JSON."""
    result = run_variant(args.single, args)
    result["device"] = _device_name(args)
    with open(args.json, "w") as handle:
        json.dump(result, handle)


# ------------------------------------------------------------------ --repeats N: interleaved child processes

NAN = float("nan")
# the arguments a child process gets from its parent (the model, shape and run settings)
_CHILD_ARGS = ("device", "preset", "vocab", "batch", "seq", "steps", "warmup", "precision", "workdir")


def baseline_of(name: str) -> str:
    return VARIANTS[name.partition(":")[0]][3]


def with_baselines(names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` plus the baselines their ratios need (a baseline's own baseline too), and the ones added."""
    run, added = list(names), []
    for name in run:  # grows while iterated
        base = baseline_of(name)
        if base not in run:
            run.append(base)
            added.append(base)
    return run, added


def round_order(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: every variant once, shuffled with seed ``r``."""
    order = list(names)
    random.Random(r).shuffle(order)
    return order


def child_command(name: str, args: argparse.Namespace, json_path: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--single", name, "--json", json_path]
    for key in _CHILD_ARGS:
        command += [f"--{key}", str(getattr(args, key))]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return command


def run_child(name: str, args: argparse.Namespace, json_path: str) -> dict[str, Any]:
    """One variant in a fresh process; a failure comes back as ``{"failed": <last stderr line>}``."""
    proc = subprocess.run(child_command(name, args, json_path), capture_output=True, text=True)
    if proc.returncode == 0 and os.path.exists(json_path):
        with open(json_path) as handle:
            return json.load(handle)
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    error = lines[-1] if lines else f"exit code {proc.returncode}"
    return {"variant": name, "baseline": baseline_of(name), "failed": error}


def run_rounds(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rounds = []
    with tempfile.TemporaryDirectory(prefix="token_loss-") as tmp:
        for r in range(1, args.repeats + 1):
            order, results = round_order(names, r), {}
            for i, name in enumerate(order):
                start = time.perf_counter()
                results[name] = result = run_child(name, args, os.path.join(tmp, f"round{r}-{i}.json"))
                outcome = f"failed: {result['failed']}" if "failed" in result else f"{result['step_s']:.4f} s/step"
                print(f"round {r}/{args.repeats}: {name} {outcome} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
            rounds.append({"round": r, "order": order, "results": results})
    return rounds


def _ok(result: dict[str, Any] | None, key: str) -> bool:
    return result is not None and "failed" not in result and math.isfinite(result.get(key, NAN))


def paired_ratios(rounds: list[dict[str, dict]], row: str, base: str, key: str) -> list[float]:
    """Per round where both ran: ``row``'s ``key`` / ``base``'s ``key`` in that same round."""
    return [
        results[row][key] / results[base][key]
        for results in rounds
        if _ok(results.get(row), key) and _ok(results.get(base), key) and results[base][key] > 0
    ]


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles (``statistics.quantiles``, inclusive); all NaN for no values."""
    if not values:
        return dict.fromkeys(("median", "min", "max", "q1", "q3"), NAN)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


def summarize_rounds(rounds: list[dict[str, dict]], baselines: dict[str, str]) -> list[dict[str, Any]]:
    """One row per variant (in ``baselines``' order, variant -> baseline) from per-round results
    (``rounds[i][variant]`` is a ``run_variant`` result or ``{"failed": message}``)."""
    rows = []
    for name, base in baselines.items():
        runs = [results[name] for results in rounds if name in results]
        errors = [run["failed"] for run in runs if "failed" in run]
        time_ratios = paired_ratios(rounds, name, base, "step_s")
        rows.append({
            "variant": name,
            "baseline": base,
            "rounds": len(runs),
            "n": len(time_ratios),
            "failures": len(errors),
            "failed": errors[-1] if errors else None,
            "step_s": _median([run["step_s"] for run in runs if _ok(run, "step_s")]),
            "peak_gib": _median([run["peak_gib"] for run in runs if _ok(run, "peak_gib")]),
            "time_ratio": spread(time_ratios),
            "mem_ratio": spread(paired_ratios(rounds, name, base, "peak_gib")),
        })
    return rows


def _fmt(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _ratio_cells(s: dict[str, float]) -> str:
    return f"{_fmt(s['median'], 3)} | {_fmt(s['min'], 3)}–{_fmt(s['max'], 3)} | {_fmt(s['q1'], 3)}–{_fmt(s['q3'], 3)}"


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(
        "ratios are paired per round (variant / its baseline in the same round); median over the n rounds where "
        "both ran, spread = min–max and IQR (Q1–Q3, statistics.quantiles inclusive)"
    )
    print(
        "| variant | n | step time (s), median | peak memory (GiB), median | baseline | time × baseline, median | "
        "time ratio min–max | time ratio IQR | memory × baseline, median | memory ratio min–max | memory ratio IQR |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        n = f"{row['n']}/{row['rounds']}"
        if row["failures"] == row["rounds"]:
            print(f"| {row['variant']} | {n} | failed: {row['failed']} | | {row['baseline']} | | | | | | |")
            continue
        print(
            f"| {row['variant']} | {n} | {_fmt(row['step_s'], 4)} | {_fmt(row['peak_gib'], 2)} | {row['baseline']} | "
            f"{_ratio_cells(row['time_ratio'])} | {_ratio_cells(row['mem_ratio'])} |"
        )
    for row in rows:
        if 0 < row["failures"] < row["rounds"]:
            print(f"{row['variant']}: {row['failures']} of {row['rounds']} runs failed, last: {row['failed']}")


def print_targets(rounds: list[dict[str, dict]], names: list[str]) -> None:
    for row, base, key, target in QLORA_TARGETS:
        if row in names and base in names:
            s = spread(paired_ratios(rounds, row, base, key))
            what = "step time" if key == "step_s" else "peak memory"
            if math.isnan(s["median"]):
                verdict = "n/a (not measured on this device)"
            else:
                verdict = "met" if s["median"] <= target else "MISSED"
                if s["q1"] <= target < s["q3"]:
                    verdict += " (the IQR straddles the target)"
            print(
                f"{what}: {row} / {base} = {_fmt(s['median'], 3)} median, min–max {_fmt(s['min'], 3)}–"
                f"{_fmt(s['max'], 3)}, IQR {_fmt(s['q1'], 3)}–{_fmt(s['q3'], 3)} (target <= {target:.2f}): {verdict}"
            )


def run_repeated(args: argparse.Namespace) -> None:
    names, added = with_baselines(args.variants.split(","))
    if added:
        print(f"added the baseline(s) {', '.join(added)} (not in --variants; the ratios need them)", flush=True)
    start = time.perf_counter()
    rounds = run_rounds(names, args)
    per_round = [entry["results"] for entry in rounds]
    rows = summarize_rounds(per_round, {name: baseline_of(name) for name in names})
    ok = [result for results in per_round for result in results.values() if "failed" not in result]
    device = ok[0]["device"] if ok else _device_name(args)
    print(f"\n{_setup_line(device, args)} | {args.repeats} interleaved rounds, one process per run, "
          f"{time.perf_counter() - start:.0f} s")
    print_summary(rows)
    print_targets(per_round, names)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": device, "args": vars(args), "variants": names, "added_baselines": added,
                 "rounds": rounds, "summary": rows},
                handle, indent=2,
            )


def main() -> None:
    args = parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.single:
        run_single(args)
    elif args.repeats > 1:
        run_repeated(args)
    else:
        run_in_process(args)


if __name__ == "__main__":
    main()
