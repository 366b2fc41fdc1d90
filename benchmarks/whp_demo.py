"""WHP unlearning on the packaged SmolLM2-135M-Instruct and a made-up world, end to end, on the CPU.

The shipped model has never seen the world of ``data/examples/whp/corpus.jsonl`` (Teodric Ashvane,
Duskwater Academy, ...), so step 0 plays the part of pre-training: a LoRA fine-tune on the corpus,
merged into the weights, gives the *baseline that knows the world* (the paper's Llama-2 that read the
books). Then the three steps of the method, each through the library (``TokenLM`` + ``SFTDataModule``
+ callbacks, exactly what the CLI configs run):

1. reinforced model: LoRA fine-tune of the baseline on the corpus, adapter saved by ``SavePretrained``;
2. generic labels: :func:`lightning_tokens.callbacks.unlearning.build_generic_labels` with the anchors dictionary;
3. unlearning: LoRA fine-tune of the baseline on the corpus with ``GenericLabels``, once with hard and
   once with soft targets (a soft targets file holds the hard labels too).

Measured, for the baseline and the unlearned model: the mean log-probability of the specific names of
``probes.jsonl`` after their contexts (summed over each name's tokens, and of its first token alone),
and the mean per-token NLL of ``unrelated.jsonl`` (text that has nothing to do with the world).

    python benchmarks/whp_demo.py                 # the whole corpus (a few minutes on 2 cores)
    python benchmarks/whp_demo.py --passages 8 --know-steps 12 --reinforce-steps 6 --unlearn-steps 10   # the test's run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tokens.callbacks.unlearning import GenericLabels, SavePretrained, build_generic_labels
from lightning_tokens.datamodules import SFTDataModule
from lightning_tokens.modules import LoRASettings, OptimizerSettings, TokenLM

DATA = Path(__file__).resolve().parents[1] / "data" / "examples" / "whp"
MODEL = "smollm2-135m-instruct"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks,
    )


def _data(train_file: str, tokenizer: str | None = None, batch_size: int = 4) -> SFTDataModule:
    return SFTDataModule(train_file=train_file, tokenizer=tokenizer, max_length=256, packing=True, batch_size=batch_size, seed=0)


@torch.no_grad()
def name_logprobs(causal_lm: torch.nn.Module, tokenizer: Any, probes: list[dict[str, str]]) -> tuple[float, float]:
    """Mean over probes of log p(name | context), summed over the name's tokens, and of its first token."""
    causal_lm.eval()
    total, first = [], []
    for probe in probes:
        prompt = tokenizer(probe["prompt"], add_special_tokens=False)["input_ids"]
        name = tokenizer(probe["prompt"] + probe["completion"], add_special_tokens=False)["input_ids"][len(prompt):]
        ids = torch.tensor([prompt + name])
        logp = torch.log_softmax(causal_lm(input_ids=ids).logits[0, :-1].float(), -1)
        scores = logp[len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None])[:, 0]
        total.append(float(scores.sum()))
        first.append(float(scores[0]))
    return sum(total) / len(total), sum(first) / len(first)


@torch.no_grad()
def text_nll(causal_lm: torch.nn.Module, tokenizer: Any, texts: list[str]) -> float:
    """Mean per-token NLL of plain texts (each ending with the eos, as the datamodule builds them)."""
    causal_lm.eval()
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
        out = causal_lm(input_ids=ids, labels=ids)
        n = ids.shape[1] - 1
        nll, count = nll + float(out.loss) * n, count + n
    return nll / count


def run(
    workdir: str,
    passages: int | None = None,
    know_steps: int = 24,
    reinforce_steps: int = 12,
    unlearn_steps: int = 20,
    alpha: float = 5.0,
    modes: tuple[str, ...] = ("hard", "soft"),
    lr: float = 2e-3,
    reinforce_lr: float = 5e-4,
    unlearn_lr: float = 7e-4,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, float]:
    """The whole demo in ``workdir``; returns the measured numbers (and prints them with ``verbose``)."""
    clock = time.perf_counter()
    work = Path(workdir)
    corpus = _records(DATA / "corpus.jsonl")[:passages]
    train_file = work / "corpus.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in corpus))
    text = " ".join(r["text"] for r in corpus)
    probes = [p for p in _records(DATA / "probes.jsonl") if p["completion"].strip() in text]
    unrelated = [r["text"] for r in _records(DATA / "unrelated.jsonl")]
    log = print if verbose else (lambda *a, **k: None)
    results: dict[str, float] = {"passages": len(corpus), "probes": len(probes)}

    # 0. the baseline that knows the world: LoRA on the corpus, merged into the weights
    pl.seed_everything(seed)
    shipped = TokenLM(model=MODEL, lora=LoRASettings(r=16, alpha=32), optimizer=OptimizerSettings(lr=lr, warmup=0))
    shipped.configure_model()
    tokenizer = shipped.tokenizer
    with shipped.model.disable_adapter():
        results["shipped_name_logprob"], results["shipped_first_logprob"] = name_logprobs(shipped.causal_lm, tokenizer, probes)
        results["shipped_unrelated_nll"] = text_nll(shipped.causal_lm, tokenizer, unrelated)
    _trainer(know_steps, []).fit(shipped, datamodule=_data(str(train_file)))
    baseline_dir = str(work / "baseline")
    merged = shipped.model.merge_and_unload()
    merged.save_pretrained(baseline_dir)
    tokenizer.save_pretrained(baseline_dir)
    del shipped, merged

    # 1. the reinforced model: the baseline trained further on the corpus (an adapter)
    pl.seed_everything(seed)
    adapter_dir = str(work / "reinforced_adapter")
    reinforced = TokenLM(model=baseline_dir, lora=LoRASettings(r=16, alpha=32), optimizer=OptimizerSettings(lr=reinforce_lr, warmup=0))
    _trainer(reinforce_steps, [SavePretrained(adapter_dir)]).fit(reinforced, datamodule=_data(str(train_file)))
    results["reinforced_name_logprob"], results["reinforced_first_logprob"] = name_logprobs(reinforced.causal_lm, tokenizer, probes)
    del reinforced

    # 2. generic labels (a soft file also holds the hard labels: its argmax)
    targets_file = str(work / "generic_labels.safetensors")
    built = build_generic_labels(
        TokenLM(model=baseline_dir), _data(str(train_file), tokenizer=baseline_dir), targets_file, adapter_dir,
        str(DATA / "anchors.json"), alpha=alpha, targets="soft" if "soft" in modes else "hard",
    )
    scored = sum(int((t.labels != -100).sum()) for t in built.values())
    changed = sum(int(((t.labels != -100) & (t.labels != t.input_ids)).sum()) for t in built.values())
    results["targets"], results["targets_changed"] = scored, changed

    # 3. unlearning: the baseline fine-tuned on the corpus with the generic labels, once per mode
    for mode in modes:
        pl.seed_everything(seed)
        unlearned = TokenLM(model=baseline_dir, lora=LoRASettings(r=16, alpha=32), optimizer=OptimizerSettings(lr=unlearn_lr, warmup=0))
        _trainer(unlearn_steps, [GenericLabels(targets_file, mode=mode)]).fit(unlearned, datamodule=_data(str(train_file)))  # type: ignore[arg-type]
        if "baseline_name_logprob" not in results:
            with unlearned.model.disable_adapter():
                results["baseline_name_logprob"], results["baseline_first_logprob"] = name_logprobs(unlearned.causal_lm, tokenizer, probes)
                results["baseline_unrelated_nll"] = text_nll(unlearned.causal_lm, tokenizer, unrelated)
        results[f"{mode}_name_logprob"], results[f"{mode}_first_logprob"] = name_logprobs(unlearned.causal_lm, tokenizer, probes)
        results[f"{mode}_unrelated_nll"] = text_nll(unlearned.causal_lm, tokenizer, unrelated)
        results[f"{mode}_unrelated_change"] = results[f"{mode}_unrelated_nll"] / results["baseline_unrelated_nll"] - 1
        del unlearned
    results["seconds"] = time.perf_counter() - clock
    rows = "".join(
        f"    unlearned, {mode:4s} {results[f'{mode}_name_logprob']:8.3f} / {results[f'{mode}_first_logprob']:7.3f}\n" for mode in modes
    )
    unrelated_rows = ", ".join(
        f"unlearned {mode} {results[f'{mode}_unrelated_nll']:.4f} ({results[f'{mode}_unrelated_change']:+.2%} vs baseline)" for mode in modes
    )
    log(
        f"WHP demo ({MODEL}, {len(corpus)} passages, {len(probes)} probes, alpha={alpha}, "
        f"steps know/reinforce/unlearn = {know_steps}/{reinforce_steps}/{unlearn_steps}, lr {lr}/{reinforce_lr}/{unlearn_lr}, "
        f"{results['seconds']:.0f} s)\n"
        f"  mean log p(name | context), whole name / first token:\n"
        f"    shipped model   {results['shipped_name_logprob']:8.3f} / {results['shipped_first_logprob']:7.3f}\n"
        f"    baseline        {results['baseline_name_logprob']:8.3f} / {results['baseline_first_logprob']:7.3f}   (knows the world)\n"
        f"    reinforced      {results['reinforced_name_logprob']:8.3f} / {results['reinforced_first_logprob']:7.3f}\n"
        f"{rows}"
        f"  generic targets: {scored} tokens, {changed} differ from the text\n"
        f"  unrelated text NLL: shipped {results['shipped_unrelated_nll']:.4f}, baseline {results['baseline_unrelated_nll']:.4f}, "
        f"{unrelated_rows}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=None, help="use the first N passages of the corpus")
    parser.add_argument("--know-steps", type=int, default=24)
    parser.add_argument("--reinforce-steps", type=int, default=12)
    parser.add_argument("--unlearn-steps", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=5.0)
    parser.add_argument("--modes", nargs="+", choices=["hard", "soft"], default=["hard", "soft"], help="GenericLabels modes of step 3")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of step 0")
    parser.add_argument("--reinforce-lr", type=float, default=5e-4, help="learning rate of step 1")
    parser.add_argument("--unlearn-lr", type=float, default=7e-4, help="learning rate of step 3")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as work:
        results = run(
            work, args.passages, args.know_steps, args.reinforce_steps, args.unlearn_steps, args.alpha, tuple(args.modes), args.lr,
            args.reinforce_lr, args.unlearn_lr,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
