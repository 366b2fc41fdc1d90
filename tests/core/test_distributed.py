"""Two CPU processes under DDP (gloo) give the same update as one process on the union."""

import copy

import pytest
import lightning.pytorch as pl
import torch

from lightning_tokens.callbacks import DFT
from tests.helpers import FusedLM, free_port, loader, make_examples, trainer


class DestroyProcessGroup(pl.Callback):
    """Tear the gloo group down inside the worker: left to interpreter exit, gloo's threads sometimes
    abort the spawned process ("terminate called without an active exception")."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_two_processes_equal_one_process_on_union(accumulate, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    # rank 0 sees examples 0, 2; rank 1 sees 1, 3 (DistributedSampler, no shuffle): uneven token counts
    examples = make_examples([12, 4, 3, 9], prompt=2)
    model = FusedLM(lr=1.0)
    before = copy.deepcopy(model.state_dict())

    single = copy.deepcopy(model)
    trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[DFT()]).fit(
        single, loader(examples, batch_size=4 // accumulate)
    )

    ddp = copy.deepcopy(model)
    trainer(
        max_steps=1, accumulate_grad_batches=accumulate, callbacks=[DFT(), DestroyProcessGroup()], strategy="ddp_spawn",
        devices=2,
    ).fit(ddp, loader(examples, batch_size=2 // accumulate))

    for name, value in single.state_dict().items():
        assert not torch.equal(value, before[name])
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-5, atol=1e-6)
