"""Nothing lost on a kill: every shipped fit config saves a resumable checkpoint every N optimizer steps
(``checkpoint.every_n_train_steps``), and ``lightning-tokens fit`` stopped by SIGTERM or Ctrl+C saves one at
the step boundary and exits with 128 + the signal; resumed with ``--ckpt_path`` it ends with exactly the
weights of an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Checkpoint

from lightning_tokens.callbacks import ResumableCheckpoint
from lightning_tokens.cli import cli

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FIT_CONFIGS = [c for c in sorted((ROOT / "configs").glob("*.yaml")) if re.search(r"\bfit --config", c.read_text())]
MAX_STEPS = 10
# the quickstart shrunk: 4 batches of 64 per epoch, validation at steps 5 and 10, a checkpoint every 4 steps
FAST = [
    f"--trainer.max_steps={MAX_STEPS}",
    "--trainer.val_check_interval=5",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--model.init_args.model_config={num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64}",
    "--data.init_args.num_train=512",
    "--data.init_args.num_val=16",
    "--data.init_args.num_test=16",
    "--checkpoint.every_n_train_steps=4",
]


class WaitForSignal(pl.Callback):
    """Runs inside the CLI under test: before optimizer step ``after_step + 1``, writes ``marker`` and waits
    (at most ``timeout`` seconds) until the run has received its stop signal, so that the test stops it at a
    known step without racing it. The step then runs to its end, as it would have when the signal came."""

    def __init__(self, after_step: int = 0, marker: str = "waiting", timeout: float = 120.0) -> None:
        self.after_step, self.marker, self.timeout = after_step, marker, timeout

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.after_step or os.path.exists(self.marker):
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.01)


# ---- the shipped configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_fit_config_checkpoints_every_n_steps(config):
    settings = yaml.safe_load(config.read_text())
    every = (settings.get("checkpoint") or {}).get("every_n_train_steps")
    assert isinstance(every, int) and every > 0, f"{config.name}: set checkpoint.every_n_train_steps"
    assert settings["checkpoint"].get("save_last") is True
    max_steps = settings["trainer"].get("max_steps", -1)
    assert max_steps == -1 or every <= max_steps
    # the one checkpoint callback is the `checkpoint` section's (no second one in trainer.callbacks)
    listed = [c["class_path"] for c in settings["trainer"].get("callbacks") or []]
    assert not [c for c in listed if "Checkpoint" in c], listed


def test_the_knob_reaches_the_one_checkpoint_callback():
    assert QUICKSTART in FIT_CONFIGS and len(FIT_CONFIGS) >= 10
    built = cli(["--config", str(QUICKSTART), "--checkpoint.every_n_train_steps=7"], run=False)
    checkpoints = [c for c in built.trainer.callbacks if isinstance(c, Checkpoint)]
    assert len(checkpoints) == 1 and isinstance(checkpoints[0], ResumableCheckpoint)
    assert checkpoints[0]._every_n_train_steps == 7 and checkpoints[0].save_last is True
    # Lightning's switch still turns checkpointing off
    built = cli(["--config", str(QUICKSTART), "--trainer.enable_checkpointing=false"], run=False)
    assert not [c for c in built.trainer.callbacks if isinstance(c, Checkpoint)]


# ---- kill and resume --------------------------------------------------------------------------------
def _config(tmp_path, name):
    """The quickstart writing under tmp_path/name instead of runs/quickstart."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(QUICKSTART.read_text().replace("runs/quickstart", str(tmp_path / name)))
    return str(config)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run = cli(["fit", "--config", _config(tmp_path, "run"), *FAST])
    assert run.trainer.global_step == MAX_STEPS
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def _stop_and_resume(tmp_path, request, signum, after_step):
    """Start the CLI in a subprocess, stop it with ``signum`` before step ``after_step + 1``, resume it in
    this process; returns (exit status, step saved, max abs weight difference, timings)."""
    config, marker, log = _config(tmp_path, "run"), tmp_path / "waiting", tmp_path / "log.txt"
    command = [
        sys.executable, "-m", "lightning_tokens.cli", "fit", "--config", config, *FAST,
        "--trainer.callbacks+=tests.test_interruptions.WaitForSignal",
        f"--trainer.callbacks.init_args.after_step={after_step}", f"--trainer.callbacks.init_args.marker={marker}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    started = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(  # Ctrl+C's default handling even where the runner ignores SIGINT
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            reference = request.getfixturevalue("uninterrupted")  # computed while the subprocess starts
            while not marker.exists() and process.poll() is None and time.monotonic() - started < 300:
                time.sleep(0.05)
            assert marker.exists(), log.read_text()[-4000:]
            signalled = time.monotonic()
            process.send_signal(signum)
            status = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    stopped = time.monotonic()
    output = log.read_text()
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists(), output[-4000:]
    saved_step = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]
    name = signal.Signals(signum).name
    assert f"{name}: stopped after step {saved_step}; resume with --ckpt_path" in output, output[-4000:]

    resumed = cli(["fit", "--config", config, *FAST, f"--ckpt_path={checkpoint}"])
    assert resumed.trainer.global_step == MAX_STEPS
    weights = resumed.model.state_dict()
    assert weights.keys() == reference.keys()
    difference = max((weights[k] - reference[k]).abs().max().item() for k in reference)
    timings = f"start to signal {signalled - started:.1f} s, to exit {stopped - signalled:.1f} s, resume {time.monotonic() - stopped:.1f} s"
    print(f"\n{name}: status {status}, saved step {saved_step}, max |dw| {difference}; {timings}")
    return status, saved_step, difference


@pytest.mark.slow
def test_sigterm_mid_run_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(tmp_path, request):
    # held before step 7 (mid-epoch: 4 batches an epoch), after the periodic checkpoint of step 4
    status, saved_step, difference = _stop_and_resume(tmp_path, request, signal.SIGTERM, after_step=6)
    assert status == 128 + signal.SIGTERM
    assert saved_step == 7  # the step in progress when the signal came, not the periodic step 4
    assert difference == 0.0


@pytest.mark.slow
def test_ctrl_c_mid_run_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(tmp_path, request):
    # SIGINT takes its own path (ResumableCheckpoint's handler turns the first one into Lightning's stop)
    status, saved_step, difference = _stop_and_resume(tmp_path, request, signal.SIGINT, after_step=2)
    assert status == 128 + signal.SIGINT
    assert saved_step == 3
    assert difference == 0.0
