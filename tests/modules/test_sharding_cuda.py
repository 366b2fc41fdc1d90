"""Sharding strategies on one GPU: Lightning's FSDPStrategy (FSDP1, auto-wrapped decoder layers) and
ModelParallelStrategy (FSDP2) train TokenLM + Rho-1 with a separate reference model like a plain run.

The 2-process CPU tests (tests/core/test_multiprocess.py) cover the arithmetic across ranks; these
check that the GPU-only strategy and the CUDA paths (fused Liger loss, NCCL) accept the module."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tokens import ExcessLossSelection, TokenLM
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.modules import OptimizerSettings
from tests.distributed_worker import TINY, RecordLoss, collate, examples
from tests.helpers import free_port

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _fit(strategy, monkeypatch) -> list[float]:
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    torch.manual_seed(0)
    model = TokenLM(
        model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch",
        optimizer=OptimizerSettings(lr=1e-2, warmup=0, min_lr_ratio=1.0),
        reference=ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY),
    )
    record = RecordLoss()
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, strategy=strategy, max_steps=4, precision="32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # under a distributed strategy Lightning swaps in a DistributedSampler that always shuffles training
        # data: keep the plain run's order, or the runs would compare different batches
        use_distributed_sampler=False,
        callbacks=[ExcessLossSelection(ratio=0.6), record],
    )
    loader = DataLoader(examples(len(model.tokenizer)), batch_size=4, shuffle=False, collate_fn=collate)
    trainer.fit(model, loader)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return record.losses


def test_fsdp1_and_fsdp2_follow_the_plain_run(monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.backends.cuda.matmul.allow_tf32 = False
    plain = _fit("auto", monkeypatch)
    fsdp1 = _fit(FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}), monkeypatch)
    fsdp2 = _fit(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1), monkeypatch)
    assert len(plain) == 4 and plain[-1] < plain[0]
    torch.testing.assert_close(torch.tensor(fsdp1), torch.tensor(plain), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(fsdp2), torch.tensor(plain), rtol=0, atol=1e-4)
