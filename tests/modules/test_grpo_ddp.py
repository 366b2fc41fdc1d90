"""GRPO under DDP (two CPU processes, gloo, torchrun): groups stay on their rank, and with the same
completions per prompt two processes follow one process on the global batch (tests/grpo_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "grpo_worker.py")


def _launch(strategy: str, out: str, attempt: int = 0) -> None:
    command = [sys.executable, WORKER] if strategy == "single" else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), WORKER,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([*command, "--strategy", strategy, "--out", out], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and attempt == 0 and strategy != "single":  # a port taken meanwhile: one more try
        return _launch(strategy, out, attempt=1)
    if result.returncode != 0:
        raise AssertionError(f"{strategy} run failed (rc {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


@pytest.mark.slow
def test_two_processes_follow_one_process(tmp_path):
    for strategy in ("single", "ddp"):
        _launch(strategy, str(tmp_path))
    for agg in ("token-mean", "seq-mean-token-mean"):
        single_losses, single_weights = torch.load(tmp_path / f"single_{agg}.pt", weights_only=False)
        losses, weights = torch.load(tmp_path / f"ddp_{agg}.pt", weights_only=False)
        assert len(losses) == len(single_losses) == 4 and len(set(single_losses)) > 1
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=0, atol=1e-6, msg=agg)
        moved = max(float((w - single_weights[k]).abs().max()) for k, w in weights.items())
        assert moved < 1e-4, (agg, moved)
