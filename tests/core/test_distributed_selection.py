"""``ranks="global"``: selections over the batch gathered from all ranks equal one process's selection on
the global batch (2 gloo processes, uneven rows and lengths)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_tokens.callbacks.qtuning import QTuning, qtuning_mask
from lightning_tokens.callbacks.rho1 import ExcessLossSelection, select_by_excess_loss
from lightning_tokens.core.distributed import gather_rows, mean_over_ranks
from lightning_tokens.core.stats import TokenStats
from tests.helpers import free_port

TRAINER = SimpleNamespace(strategy=SimpleNamespace())


def _shards():
    """Rank 0: 3 rows of 7 tokens; rank 1: 2 rows of 5 (what DDP gives with uneven data)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for rows, length in ((3, 7), (2, 5)):
        nll = torch.rand(rows, length, generator=g, dtype=torch.float64).float() * 4
        ref = torch.rand(rows, length, generator=g, dtype=torch.float64).float() * 4
        ent = torch.rand(rows, length, generator=g, dtype=torch.float64).float() * 3
        mask = torch.ones(rows, length, dtype=torch.bool)
        mask[:, :2] = False  # prompts
        out.append((nll, ref, ent, mask))
    return out


def _global_batch():
    shards = _shards()
    width = max(s[0].shape[1] for s in shards)

    def cat(i, fill):
        return torch.cat([torch.nn.functional.pad(s[i], (0, width - s[i].shape[1]), value=fill) for s in shards])

    return cat(0, 0.0), cat(1, 0.0), cat(2, 0.0), cat(3, False)


class _Stats(TokenStats):
    """Statistics given directly (no model): what the methods read."""

    def __init__(self, nll, ent, mask, ref):
        self.labels = torch.where(mask, 5, -100)
        self._nll, self._ent, self._mask = nll, ent, mask
        self.batch = {}
        self.reference = SimpleNamespace(nll=ref)

    nll = property(lambda self: self._nll)
    entropy = property(lambda self: self._ent)
    mask = property(lambda self: self._mask)


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        nll, ref, ent, mask = _shards()[rank]
        gathered, mine = gather_rows({"nll": nll, "mask": mask}, TRAINER)
        module = SimpleNamespace(trainer=TRAINER)
        stats = _Stats(nll, ent, mask, ref)
        rho1 = ExcessLossSelection(ratio=0.4, scope="batch", ranks="global").compute(stats, module).mask
        qtuning = QTuning(sample_ratio=0.5, token_ratio=0.6, token_budget="batch", ranks="global")
        q_keep = qtuning.select(stats, TRAINER).keep
        # rank 1 reports a statistic rank 0 has not (a mean over an empty set there)
        logs = mean_over_ranks({"kept": 0.25 + 0.5 * rank, **({"dropped": 3.0} if rank else {})}, TRAINER)
        torch.save(
            {"gathered": gathered, "mine": mine, "rho1": rho1, "qtuning": q_keep, "logs": logs},
            os.path.join(out, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("selection"))
    mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"{rank}.pt"), weights_only=False) for rank in range(2)]


@pytest.mark.slow
def test_gather_rows_concatenates_in_rank_order_with_padding(results):
    nll, _, _, mask = _global_batch()
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["gathered"]["nll"], nll, rtol=0, atol=0)
        assert torch.equal(result["gathered"]["mask"], mask)
    assert results[0]["mine"] == slice(0, 3) and results[1]["mine"] == slice(3, 5)


@pytest.mark.slow
def test_global_rho1_equals_one_process_on_the_global_batch(results):
    nll, ref, _, mask = _global_batch()
    expected = select_by_excess_loss(nll, ref, mask, 0.4, "batch").bool()
    got = torch.cat([torch.nn.functional.pad(r["rho1"].bool(), (0, 7 - r["rho1"].shape[1])) for r in results])
    assert torch.equal(got, expected)
    # and per-rank selection would differ here: the global cut is not each rank's own top 40%
    per_rank = torch.cat([
        torch.nn.functional.pad(select_by_excess_loss(s[0], s[1], s[3], 0.4, "batch").bool(), (0, 7 - s[0].shape[1]))
        for s in _shards()
    ])
    assert not torch.equal(per_rank, expected)


@pytest.mark.slow
def test_global_qtuning_equals_one_process_on_the_global_batch(results):
    nll, _, ent, mask = _global_batch()
    expected = qtuning_mask(nll, ent, mask, 0.5, 0.6, token_budget="batch").keep.bool()
    got = torch.cat([torch.nn.functional.pad(r["qtuning"].bool(), (0, 7 - r["qtuning"].shape[1])) for r in results])
    assert torch.equal(got, expected)
    assert got.any() and not got[mask].all()


@pytest.mark.slow
def test_logs_are_averaged_over_the_ranks_that_report_them(results):
    """Different names on different ranks neither deadlock nor get diluted by the silent rank."""
    for result in results:
        assert result["logs"] == {"kept": 0.5, "dropped": 3.0}
