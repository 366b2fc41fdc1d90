"""One run of a comparison: the base config with a variant's methods and a seed, trained, then tested;
its result is written next to its logs so that a rerun skips it."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_tokens.compare.variants import Variant

RESULT_FILE = "result.json"


@dataclass
class RunResult:
    """What one run measured. ``status`` is ``ok`` or ``failed`` (then ``error`` says why)."""

    variant: str
    seed: int
    status: str
    test: dict[str, float] = field(default_factory=dict)
    train_time_s: float = math.nan
    kept_fraction: float = math.nan
    train_nll: float = math.nan
    steps: int = 0
    error: str = ""
    fingerprint: str = ""

    @classmethod
    def load(cls, path: Path) -> RunResult | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, allow_nan=True))
        tmp.replace(path)


class TrainingRecorder(Callback):
    """Averages ``train/kept_fraction`` and ``train/nll`` over the optimizer steps of a run."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        for key in ("train/kept_fraction", "train/nll"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                value = float(value)
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
                self.last[key] = value

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan


def fingerprint(base_config: str, common_args: list[str], variant: Variant, seed: int) -> str:
    """Identity of a run: a finished result is reused only if the base config's text, the options, the
    variant and the seed are all unchanged."""
    text = Path(base_config).read_text() if Path(base_config).is_file() else base_config
    payload = json.dumps([text, common_args, variant.callbacks, variant.args, seed], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def run_dir_of(output_dir: str | Path, variant: Variant, seed: int) -> Path:
    return Path(output_dir) / variant.name / f"seed{seed}"


def finished_result(run_dir: Path, expected_fingerprint: str) -> RunResult | None:
    """The saved result of a finished, successful run with the same fingerprint, else ``None``."""
    result = RunResult.load(run_dir / RESULT_FILE)
    if result is not None and result.status == "ok" and result.fingerprint == expected_fingerprint:
        return result
    return None


def execute_run(
    base_config: str, variant: Variant, seed: int, run_dir: Path, common_args: list[str], save_checkpoints: bool
) -> RunResult:
    """Train and test one run in this process; any exception becomes a ``failed`` result (its traceback is
    written to ``error.txt`` in the run's folder). ``KeyboardInterrupt`` is not caught."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(variant.name, seed, "failed", fingerprint=fingerprint(base_config, common_args, variant, seed))
    args = ["--config", base_config, *common_args, *variant.args, f"--seed_everything={seed}", f"--output_dir={run_dir}"]
    if not save_checkpoints:
        args.append("--trainer.enable_checkpointing=false")
    try:
        from lightning_tokens.cli import cli

        with _own_argv():
            built = cli(args, run=False, cli_class=_variant_cli(variant))
        trainer, model, datamodule = built.trainer, built.model, built.datamodule
        recorder = TrainingRecorder()
        trainer.callbacks.insert(0, recorder)
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        result.train_time_s = time.perf_counter() - start
        result.steps = trainer.global_step
        result.kept_fraction = recorder.mean("train/kept_fraction")
        result.train_nll = recorder.last.get("train/nll", math.nan)
        metrics = trainer.test(model, datamodule=datamodule, verbose=False)
        result.test = {key: float(value) for row in metrics for key, value in row.items()}
        result.status = "ok"
    except Exception as error:  # noqa: BLE001 - one failing variant must not stop the comparison
        result.error = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
    finally:
        gc.collect()
    result.save(run_dir / RESULT_FILE)
    return result


def _variant_cli(variant: Variant) -> type:
    """A :class:`~lightning_tokens.cli.TokensCLI` whose config gets the variant's token methods in place of
    the base config's before anything is built (so the run's saved ``config.yaml`` says what ran)."""
    from lightning_tokens.cli import TokensCLI, replace_token_methods

    methods = _parsed_callbacks(variant.callbacks)

    class VariantCLI(TokensCLI):
        @override
        def edit_config(self, config: Any) -> None:
            super().edit_config(config)
            replace_token_methods(config, methods)

    return VariantCLI


def _parsed_callbacks(entries: list[dict[str, Any]]) -> list[Any]:
    """``{class_path, init_args}`` entries checked and completed the way the CLI parses callbacks (an
    unknown class or argument fails here, naming it)."""
    if not entries:
        return []
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    return list(parser.parse_object({"callbacks": entries}).callbacks)


@contextmanager
def _own_argv() -> Iterator[None]:
    """LightningCLI is given its arguments; the command line of ``compare`` is not theirs."""
    saved = sys.argv[1:]
    sys.argv[1:] = []
    try:
        yield
    finally:
        sys.argv[1:] = saved
