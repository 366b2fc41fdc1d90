"""``lightning-tokens compare`` (variants, the table, the chart, resume and failures) and the one output
knob ``--output_dir``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from jsonargparse import Namespace

from lightning_tokens.cli import apply_output_dir, main
from lightning_tokens.compare import RunResult, Variant, compare, load_variants, parse_methods
from lightning_tokens.compare import runner as compare_runner
from lightning_tokens.compare.report import bar_chart, markdown_table, summarize
from lightning_tokens.core.errors import ConfigError

QUICKSTART = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
TINY = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.model_config={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}",
    "--data.init_args.num_train=64",
    "--data.init_args.num_val=4",
    "--data.init_args.num_test=8",
    "--data.init_args.eval_batch_size=8",
]


# ---- variants ------------------------------------------------------------------------------------------
def test_methods_by_short_name_or_class_path():
    variants = parse_methods("none,dft,lightning_tokens.callbacks.SSToken")
    assert [v.name for v in variants] == ["none", "dft", "SSToken"]
    assert variants[0].callbacks == [] and variants[1].callbacks == [{"class_path": "lightning_tokens.callbacks.DFT"}]
    with pytest.raises(ConfigError, match="'dfft' is not a known method"):
        parse_methods("none,dfft")
    with pytest.raises(ConfigError, match="unique"):
        parse_methods("dft,dft")


def test_variants_file_with_arguments_and_overrides(tmp_path):
    path = tmp_path / "variants.yaml"
    path.write_text(
        "- name: ce\n"
        "- name: dft-floor\n"
        "  methods: {class_path: lightning_tokens.callbacks.DFT, init_args: {min_weight: 0.25}}\n"
        "  overrides: {model.init_args.optimizer.lr: 0.001, data.init_args.train_digits: [1, 2]}\n"
        "- name: both\n"
        "  methods: [dft, rho1]\n"
        "  args: [--trainer.max_steps=5]\n"
    )
    ce, floor, both = load_variants(path)
    assert ce.callbacks == [] and ce.args == []
    assert floor.callbacks == [{"class_path": "lightning_tokens.callbacks.DFT", "init_args": {"min_weight": 0.25}}]
    assert floor.args == ["--model.init_args.optimizer.lr=0.001", "--data.init_args.train_digits=[1, 2]"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in both.callbacks] == ["DFT", "ExcessLossSelection"]
    assert both.args == ["--trainer.max_steps=5"]
    path.write_text("- name: x\n  method: dft\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['method'\]"):
        load_variants(path)
    with pytest.raises(ConfigError, match="variant name"):
        Variant("../escape")


# ---- the table and the chart ---------------------------------------------------------------------------
def test_table_gives_mean_and_sample_std_over_seeds_and_reports_failures(tmp_path):
    results = [
        RunResult("ce", 1, "ok", test={"test/exact_match": 0.40, "test/loss": 1.0}, train_time_s=10, kept_fraction=1.0, train_nll=0.5),
        RunResult("ce", 2, "ok", test={"test/exact_match": 0.50, "test/loss": 0.8}, train_time_s=14, kept_fraction=1.0, train_nll=0.7),
        RunResult("rho1", 1, "failed", error="ConfigError: needs a reference"),
    ]
    rows = summarize(results, ["ce", "rho1"])
    assert rows[0].mean("test/exact_match") == pytest.approx(0.45)
    assert rows[0].spread("test/exact_match") == pytest.approx(math.sqrt(0.005))  # sample std of 0.4, 0.5
    assert math.isnan(rows[1].mean("test/exact_match")) and rows[1].errors == ["seed 1: ConfigError: needs a reference"]
    table = markdown_table(rows)
    assert "| ce | 2 | 0.450 ± 0.071 | 0.900 ± 0.141 | 0.600 ± 0.141 | 12.0 ± 2.8 | 1.000 ± 0.000 |" in table
    assert "| rho1 | 0 | failed" in table and "- rho1, seed 1: ConfigError: needs a reference" in table
    bar_chart(rows, "test/exact_match", tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


# ---- end to end on the quickstart model --------------------------------------------------------------
def test_compare_runs_every_variant_resumes_and_reports_a_failing_one(tmp_path, monkeypatch):
    """none and dft train and test on the tiny quickstart model; rho1 fails (the quickstart has no reference
    model) and is reported while the others finish; a rerun skips the finished runs and retries the failed."""
    out = tmp_path / "cmp"
    results = compare(QUICKSTART, parse_methods("none,rho1,dft"), seeds=[3], output_dir=out, extra_args=TINY)
    status = {r.variant: r.status for r in results}
    assert status == {"none": "ok", "rho1": "failed", "dft": "ok"}
    failed = next(r for r in results if r.variant == "rho1")
    assert "needs a reference model" in failed.error and (out / "rho1" / "seed3" / "error.txt").is_file()
    for result in results:
        if result.status == "ok":
            assert result.steps == 2 and result.kept_fraction == 1.0 and 0 <= result.test["test/exact_match"] <= 1
            assert math.isfinite(result.train_nll) and result.train_time_s > 0
    # each run in its own folder (the output knob): CSV logs with train/nll beside train/loss
    with open(out / "dft" / "seed3" / "logs" / "version_0" / "metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert {"train/nll", "train/loss", "test/exact_match"} <= set(header)
    # the variant's methods replaced the base config's DFT, and the saved config says so
    assert "lightning_tokens.callbacks.DFT" not in (out / "none" / "seed3" / "logs" / "version_0" / "config.yaml").read_text()
    assert "min_weight: 0.0" in (out / "dft" / "seed3" / "logs" / "version_0" / "config.yaml").read_text()
    table = (out / "summary.md").read_text()
    assert "| none | 1 |" in table and "| dft | 1 |" in table and "| rho1 | 0 | failed" in table
    assert (out / "summary.png").is_file() and (out / "summary.csv").is_file() and (out / "runs.csv").is_file()

    rerun = []
    real = compare_runner.execute_run

    def counting(base, variant, seed, *args, **kwargs):
        rerun.append(variant.name)
        return real(base, variant, seed, *args, **kwargs)

    monkeypatch.setattr("lightning_tokens.compare.command.execute_run", counting)
    again = compare(QUICKSTART, parse_methods("none,rho1,dft"), seeds=[3], output_dir=out, extra_args=TINY)
    assert rerun == ["rho1"]  # only the failed run is run again
    assert [r.test for r in again if r.variant == "dft"] == [r.test for r in results if r.variant == "dft"]


def test_compare_command_line_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["compare", "--config", QUICKSTART, "--methods", "none", "--variants", "v.yaml"])
    assert stop.value.code == 2
    assert "give exactly one of --methods" in capsys.readouterr().err


# ---- --output_dir ----------------------------------------------------------------------------------------
def test_output_dir_sets_root_logger_and_checkpoint_folders():
    config = Namespace(output_dir="runs/x", trainer=Namespace(default_root_dir="old", logger=None, callbacks=[
        Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath="elsewhere")),
        Namespace(class_path="lightning_tokens.callbacks.DFT", init_args=Namespace(min_weight=0.0)),
    ]), checkpoint=Namespace(dirpath=None))
    apply_output_dir(config)
    assert config.trainer.default_root_dir == "runs/x"
    assert config.checkpoint.dirpath == str(Path("runs/x/checkpoints"))
    assert config.trainer.callbacks[0].init_args.dirpath == str(Path("runs/x/checkpoints"))
    assert config.trainer.logger.class_path.endswith("CSVLogger") and config.trainer.logger.init_args.save_dir == "runs/x"
    tensorboard = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(save_dir="tb", name="n"))
    config = Namespace(output_dir="runs/y", trainer=Namespace(default_root_dir=None, logger=[tensorboard, False], callbacks=None))
    apply_output_dir(config)
    assert config.trainer.logger[0].init_args.save_dir == "runs/y"
    no_logger = Namespace(output_dir="runs/z", trainer=Namespace(default_root_dir=None, logger=False, callbacks=None))
    apply_output_dir(no_logger)
    assert no_logger.trainer.logger is False
