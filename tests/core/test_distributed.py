"""Two CPU processes under DDP (gloo) give the same update as one process on the union."""

import copy

import pytest
import torch

from lightning_tokens.callbacks import DFT
from tests.helpers import FusedLM, loader, make_examples, trainer


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_two_processes_equal_one_process_on_union(accumulate):
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
        max_steps=1, accumulate_grad_batches=accumulate, callbacks=[DFT()], strategy="ddp_spawn", devices=2
    ).fit(ddp, loader(examples, batch_size=2 // accumulate))

    for name, value in single.state_dict().items():
        assert not torch.equal(value, before[name])
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-5, atol=1e-6)
