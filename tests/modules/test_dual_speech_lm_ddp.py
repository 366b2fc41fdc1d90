"""Two CPU processes (gloo, torchrun): a DDP run of DualSpeechLM follows one process on the same global batch,
both token-loss streams (language model and acoustic decoder) included. Worker: ``tests/speech_distributed_worker.py``."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import single_and_ddp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "speech_distributed_worker.py")


@pytest.mark.slow
def test_dual_speech_lm_ddp_follows_one_process(tmp_path):
    (single_losses, single), (ddp_losses, ddp) = single_and_ddp(WORKER, str(tmp_path), "speech")
    assert len(single_losses) == len(ddp_losses) == 3
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=0, atol=1e-5)
    assert single.keys() == ddp.keys()
    # Adam turns float32 rounding differences of near-zero gradients into small weight differences
    worst = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    assert worst < 2e-4, worst
    assert any(k.startswith("acoustic_decoder.") for k in single)
