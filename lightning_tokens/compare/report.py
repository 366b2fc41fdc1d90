"""The comparison's table (CSV and Markdown: every test metric as mean ± sample standard deviation over
seeds, train time, kept fraction) and its bar chart with one point per seed."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lightning_tokens.compare.runner import RunResult


@dataclass
class VariantSummary:
    """A variant's runs summarised over seeds (``values`` keeps every seed's number)."""

    variant: str
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def mean(self, key: str) -> float:
        finite = [v for v in self.values.get(key, []) if not math.isnan(v)]
        return statistics.fmean(finite) if finite else math.nan

    def spread(self, key: str) -> float:
        """Sample standard deviation over seeds (``nan`` with fewer than two)."""
        finite = [v for v in self.values.get(key, []) if not math.isnan(v)]
        return statistics.stdev(finite) if len(finite) > 1 else math.nan


def summarize(results: list[RunResult], variant_order: list[str]) -> list[VariantSummary]:
    """One summary per variant, in ``variant_order``; failed runs count as errors, not as numbers.

    Example:
        >>> ok = RunResult("dft", 1, "ok", test={"test/exact_match": 0.5}, train_time_s=10.0)
        >>> ok2 = RunResult("dft", 2, "ok", test={"test/exact_match": 0.7}, train_time_s=12.0)
        >>> [row] = summarize([ok, ok2], ["dft"])
        >>> round(row.mean("test/exact_match"), 3), round(row.spread("test/exact_match"), 4)
        (0.6, 0.1414)
    """
    rows = {name: VariantSummary(name) for name in variant_order}
    for result in results:
        row = rows.setdefault(result.variant, VariantSummary(result.variant))
        if result.status != "ok":
            row.errors.append(f"seed {result.seed}: {result.error}")
            continue
        row.seeds.append(result.seed)
        measured = {**result.test, "train_time_s": result.train_time_s, "kept_fraction": result.kept_fraction,
                    "train/nll": result.train_nll}
        for key, value in measured.items():
            row.values.setdefault(key, []).append(float(value))
    return list(rows.values())


def metric_names(rows: list[VariantSummary]) -> list[str]:
    """The test metrics any run reported, sorted, ``test/loss`` last."""
    names = sorted({key for row in rows for key in row.values if key.startswith("test/")})
    return sorted(names, key=lambda name: name.endswith("/loss"))


def default_metric(rows: list[VariantSummary]) -> str | None:
    """The chart's metric when none is named: an exact-match or accuracy metric if there is one, else the
    first other test metric, else the test loss."""
    names = metric_names(rows)
    preferred = [name for name in names if "exact_match" in name or "acc" in name.rsplit("/", 1)[-1]]
    return (preferred or names or [None])[0]


_FIXED = ["train/nll", "train_time_s", "kept_fraction"]


def write_csv(rows: list[VariantSummary], path: Path) -> None:
    """One line per variant: ``<metric>_mean``, ``<metric>_std`` for every metric, seeds, errors."""
    keys = metric_names(rows) + _FIXED
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seeds", *[f"{k}_{s}" for k in keys for s in ("mean", "std")], "errors"])
        for row in rows:
            cells = [f"{value:.6g}" for key in keys for value in (row.mean(key), row.spread(key))]
            writer.writerow([row.variant, " ".join(map(str, row.seeds)), *cells, " | ".join(row.errors)])


def write_runs_csv(results: list[RunResult], path: Path) -> None:
    """Every run on its own line (the per-seed numbers behind the table)."""
    metrics = sorted({key for result in results for key in result.test})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "status", *metrics, *_FIXED, "steps", "error"])
        for r in results:
            writer.writerow([r.variant, r.seed, r.status, *[r.test.get(m, "") for m in metrics],
                             r.train_nll, r.train_time_s, r.kept_fraction, r.steps, r.error])


def markdown_table(rows: list[VariantSummary]) -> str:
    """The table as Markdown: ``mean ± std`` per cell (std over seeds; a single seed shows the mean)."""
    keys = metric_names(rows) + _FIXED
    header = ["variant", "seeds", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if not row.seeds:
            lines.append("| " + " | ".join([row.variant, "0", *["failed"] * len(keys)]) + " |")
            continue
        cells = [_cell(row.mean(key), row.spread(key), key) for key in keys]
        lines.append("| " + " | ".join([row.variant, str(len(row.seeds)), *cells]) + " |")
    failures = [f"- {row.variant}, {error}" for row in rows for error in row.errors]
    if failures:
        lines += ["", "Failed runs:", *failures]
    return "\n".join(lines) + "\n"


def _cell(mean: float, spread: float, key: str) -> str:
    if math.isnan(mean):
        return "–"
    digits = 1 if key == "train_time_s" else 3
    return f"{mean:.{digits}f}" if math.isnan(spread) else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def bar_chart(rows: list[VariantSummary], metric: str, path: Path, title: str = "") -> None:
    """Bars of the mean of ``metric`` per variant, the sample std as error bars and one dot per seed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.1 * len(rows)), 3.6))
    positions = range(len(rows))
    means = [row.mean(metric) for row in rows]
    spreads = [0.0 if math.isnan(row.spread(metric)) else row.spread(metric) for row in rows]
    ax.bar(positions, [0.0 if math.isnan(m) else m for m in means], yerr=spreads, capsize=4, color="#8fb3d9",
           edgecolor="#2b5d8a")
    for x, row in zip(positions, rows):
        values = row.values.get(metric, [])
        offsets = [(i - (len(values) - 1) / 2) * 0.08 for i in range(len(values))]
        ax.scatter([x + o for o in offsets], values, color="#1b2a3a", zorder=3, s=18)
        if not row.seeds:
            ax.text(x, 0, "failed", ha="center", va="bottom", color="#b00020")
    ax.set_xticks(list(positions), [row.variant for row in rows])
    ax.set_ylabel(metric)
    ax.set_title(title or "mean ± std over seeds; dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
