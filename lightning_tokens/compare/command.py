"""``lightning-tokens compare``: every variant × seed from one base config, trained and tested in turn,
then one table and one chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_tokens.compare.report import (
    bar_chart,
    default_metric,
    markdown_table,
    summarize,
    write_csv,
    write_runs_csv,
)
from lightning_tokens.compare.runner import (
    RunResult,
    execute_run,
    finished_result,
    fingerprint,
    run_dir_of,
)
from lightning_tokens.compare.variants import METHODS, Variant, load_variants, parse_methods
from lightning_tokens.core.errors import ConfigError, MissingFileError

USAGE = """lightning-tokens compare --config BASE.yaml (--methods none,dft,rho1 | --variants VARIANTS.yaml)
                        [--seeds 1,2] [--output_dir runs/compare] [--metric test/exact_match]
                        [--save_checkpoints] [any option of `fit`, for every run, e.g. --trainer.max_steps=150]"""


def compare(
    config: str,
    variants: list[Variant],
    seeds: list[int],
    output_dir: str | Path = "runs/compare",
    extra_args: list[str] | None = None,
    metric: str | None = None,
    save_checkpoints: bool = False,
) -> list[RunResult]:
    """Run every variant with every seed (sequentially, in this process), test each run on the
    datamodule's test split, and write ``summary.csv``, ``summary.md``, ``runs.csv`` and ``summary.png``
    to ``output_dir``.

    Each run lives in ``output_dir/<variant>/seed<seed>/`` (its CSV logs, ``result.json``). A run whose
    ``result.json`` is finished with the same base config, options, variant and seed is skipped, so an
    interrupted comparison continues where it stopped; a failed run is retried. A run that raises is
    reported in the table and the others go on.

    Args:
        config: the base config (a ``fit`` config whose datamodule has a test split).
        variants: what to compare (see :func:`~lightning_tokens.compare.variants.parse_methods`).
        seeds: one run per seed: ``seed_everything`` (which also seeds the datamodules without a ``seed``).
        output_dir: where runs and the table go.
        extra_args: options given to every run, as on the command line.
        metric: the test metric of the chart (default: the first test metric other than the loss).
        save_checkpoints: keep the checkpointing of the base config (off: runs save no checkpoint).

    Returns:
        The result of every run, in the order run.

    Example::

        compare("configs/compare_smollm2_nupa.yaml", parse_methods("none,dft"), seeds=[1, 2])
    """
    if not Path(config).is_file():
        raise MissingFileError(f"--config: {config} does not exist.")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 1,2.")
    output_dir, extra_args = Path(output_dir), list(extra_args or [])
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    total = len(variants) * len(seeds)
    # seed by seed: an interrupted comparison has every variant of the first seeds
    for index, (seed, variant) in enumerate(((s, v) for s in seeds for v in variants), start=1):
        run_dir = run_dir_of(output_dir, variant, seed)
        done = finished_result(run_dir, fingerprint(config, extra_args, variant, seed))
        if done is not None:
            _say(f"[{index}/{total}] {variant.name} seed {seed}: finished before, skipped ({run_dir})")
            results.append(done)
            continue
        _say(f"[{index}/{total}] {variant.name} seed {seed}: training in {run_dir}")
        result = execute_run(config, variant, seed, run_dir, extra_args, save_checkpoints)
        _say(f"[{index}/{total}] {variant.name} seed {seed}: {result.status}" + (f" ({result.error})" if result.error else ""))
        results.append(result)
    write_report(results, [v.name for v in variants], output_dir, metric)
    return results


def write_report(results: list[RunResult], variant_order: list[str], output_dir: Path, metric: str | None = None) -> str:
    """Write the four report files; returns the Markdown table."""
    rows = summarize(results, variant_order)
    write_csv(rows, output_dir / "summary.csv")
    write_runs_csv(results, output_dir / "runs.csv")
    table = markdown_table(rows)
    (output_dir / "summary.md").write_text(table)
    chart_metric = metric or default_metric(rows)
    if chart_metric is not None:
        bar_chart(rows, chart_metric, output_dir / "summary.png")
    _say(f"\n{table}\nwritten: {output_dir}/summary.csv, summary.md, runs.csv" + (", summary.png" if chart_metric else ""))
    return table


def _say(message: str) -> None:
    print(f"compare: {message}" if not message.startswith("\n") else message, file=sys.stderr, flush=True)


def main(argv: list[str]) -> list[RunResult]:
    """``lightning-tokens compare ...`` (``argv`` without the subcommand)."""
    parser = argparse.ArgumentParser(
        prog="lightning-tokens compare",
        usage=USAGE,
        description="Compare token methods on one task: every variant x seed from one base config, each trained "
        "and tested, then a table (CSV, Markdown) and a bar chart.",
        epilog=f"Method short names: {', '.join(METHODS)}. Options not listed here go to every run.",
    )
    parser.add_argument("--config", required=True, help="the base fit config")
    parser.add_argument("--methods", help="comma-separated short names or class paths, e.g. none,dft,rho1")
    parser.add_argument("--variants", help="YAML list of variants: name, methods, args / overrides")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    parser.add_argument("--output_dir", default="runs/compare", help="where the runs and the table go")
    parser.add_argument("--metric", default=None, help="test metric of the chart (default: first non-loss metric)")
    parser.add_argument("--save_checkpoints", action="store_true", help="let each run save checkpoints")
    options, extra = parser.parse_known_args(argv)
    if (options.methods is None) == (options.variants is None):
        raise ConfigError("compare: give exactly one of --methods (e.g. none,dft,rho1) and --variants FILE.")
    variants = parse_methods(options.methods) if options.methods is not None else load_variants(options.variants)
    try:
        seeds = [int(seed) for seed in options.seeds.split(",") if seed.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, e.g. 1,2; got {options.seeds!r}.") from None
    return compare(options.config, variants, seeds, options.output_dir, extra, options.metric, options.save_checkpoints)
