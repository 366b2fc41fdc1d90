"""TimeMaster's comparison on one dataset: classical baselines, the numeric-input LM, plot + SFT, plot + SFT + GRPO
(test accuracy on the same split), and the README figure (one rendered series per class, plus a sampled
completion with its reward).

The language-model rows test the checkpoints the configs wrote (``lightning-tokens test`` in a subprocess, its
``test/accuracy`` read back from the CSV log); missing checkpoints are reported as "not run".

    lightning-tokens fit --config configs/timemaster_numeric.yaml
    lightning-tokens fit --config configs/timemaster_sft.yaml
    lightning-tokens export --config configs/timemaster_sft.yaml --ckpt_path runs/timemaster_sft/checkpoints/last.ckpt --output runs/timemaster_sft/export
    lightning-tokens fit --config configs/timemaster_grpo.yaml
    python benchmarks/timemaster_table.py --figure docs/timemaster_gunpoint.png
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import subprocess
import sys
import tempfile

RUNS = [
    ("numeric input + SFT (tiny Llama)", "configs/timemaster_numeric.yaml", "runs/timemaster_numeric/checkpoints/last.ckpt"),
    ("plot + SFT (GVT: MobileNetV2 + tiny Llama)", "configs/timemaster_sft.yaml", "runs/timemaster_sft/checkpoints/last.ckpt"),
    ("plot + SFT + GRPO", "configs/timemaster_grpo.yaml", "runs/timemaster_grpo/checkpoints/last.ckpt"),
]


def test_accuracy(config: str, ckpt: str) -> dict[str, float] | None:
    if not os.path.isfile(ckpt):
        return None
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "lightning_tokens.cli", "test", "--config", config, "--ckpt_path", ckpt, "--output_dir", out]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        values: dict[str, float] = {}
        for path in glob.glob(os.path.join(out, "**", "metrics.csv"), recursive=True):
            with open(path, newline="") as handle:
                for row in csv.DictReader(handle):
                    values.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v})
        return values


def figure(path: str, dataset: str, completions: str | None) -> str:
    """One rendered training series per class side by side (the reference's plots), and the text of a sampled
    GRPO completion with its reward; returns that caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from lightning_tokens.datamodules.time_series import TimeSeriesDataModule, render_series

    dm = TimeSeriesDataModule(dataset=dataset, num_val=0)
    examples = {}
    for example in dm.split_examples("train"):
        examples.setdefault(example.label, example)
    labels = dm.labels
    fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 2.7))
    for ax, label in zip(axes, labels):
        ax.imshow(Image.open(io.BytesIO(render_series(examples[label].values))))
        ax.set_title(f"class {label} (train #{examples[label].index})", fontsize=11)
        ax.axis("off")
    caption = ""
    if completions and os.path.isfile(completions):
        with open(completions, encoding="utf-8") as handle:
            samples = [json.loads(line) for line in handle]
        sample = samples[-1]
        caption = f"{sample['completion'].strip()}  (reward {sample['reward']:.2f})"
        fig.suptitle("GRPO sample (last step): " + caption, fontsize=9, y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="GunPoint")
    parser.add_argument("--figure", default=None, help="write the README figure here")
    parser.add_argument("--skip-lm", action="store_true", help="only the classical baselines")
    args = parser.parse_args()

    from lightning_tokens.baselines import classical_baselines
    from lightning_tokens.datamodules.time_series import TimeSeriesDataModule

    dm = TimeSeriesDataModule(dataset=args.dataset)
    n_test = len(dm.split_examples("test"))
    rows = [(f"classical: {name}", acc, None) for name, acc in classical_baselines(dm, ["1nn_dtw", "rocket", "minirocket"]).items()]
    if not args.skip_lm:
        for name, config, ckpt in RUNS:
            metrics = test_accuracy(config, ckpt)
            rows.append((name, None if metrics is None else metrics.get("test/accuracy"), None if metrics is None else metrics.get("test/format")))
    print(f"\n{args.dataset}, test split ({n_test} series)\n")
    print("| model | test accuracy | valid `<class>` label |")
    print("|---|---|---|")
    for name, acc, fmt in rows:
        acc_text = "not run" if acc is None else f"{acc:.3f}"
        fmt_text = "—" if fmt is None else f"{fmt:.2f}"
        print(f"| {name} | {acc_text} | {fmt_text} |")
    if args.figure:
        logs = sorted(glob.glob("runs/timemaster_grpo/logs/**/completions.jsonl", recursive=True))
        caption = figure(args.figure, args.dataset, logs[-1] if logs else None)
        print(f"\nfigure: {args.figure}" + (f"\nsample: {caption}" if caption else ""))


if __name__ == "__main__":
    main()
