import math

import pytest
import torch

from lightning_tokens.callbacks import ExcessLossSelection
from lightning_tokens.callbacks.rho1 import select_by_excess_loss
from lightning_tokens.core import ReferenceStats, TokenStats


def naive_select(nll, ref, mask, ratio, scope):
    """float64, pure Python: sort (score desc, position asc), keep ceil(ratio * n)."""
    nll, ref, mask = nll.double(), ref.double(), mask.bool()
    out = torch.zeros_like(nll)
    groups = [[(b, t) for b in range(nll.shape[0]) for t in range(nll.shape[1])]] if scope == "batch" else [
        [(b, t) for t in range(nll.shape[1])] for b in range(nll.shape[0])
    ]
    for group in groups:
        cands = [(float(nll[p] - ref[p]), i, p) for i, p in enumerate(group) if mask[p]]
        cands.sort(key=lambda c: (-c[0], c[1]))
        for _, _, p in cands[: math.ceil(len(cands) * ratio)]:
            out[p] = 1
    return out


def test_paper_toy_case():
    # specs/text_methods.md §18.1 (f): excess [1.342, 0.721, -1.114], top-60% keeps {0, 1}, SLM loss 1.781501
    nll = torch.tensor([[1.84235, 1.720653, 1.386294]])
    ref = torch.tensor([[0.5, 1.0, 2.5]])
    keep = select_by_excess_loss(nll, ref, torch.ones(1, 3, dtype=torch.bool), 0.6)
    assert keep.tolist() == [[1.0, 1.0, 0.0]]
    assert ((keep * nll).sum() / keep.sum()).item() == pytest.approx(1.781501, abs=1e-6)


@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("ratio", [0.1, 0.6, 1.0])
def test_matches_naive_reference_with_ties_and_masks(scope, ratio):
    g = torch.Generator().manual_seed(3)
    nll = torch.randint(0, 4, (4, 9), generator=g).float()  # many ties
    ref = torch.randint(0, 2, (4, 9), generator=g).float()
    mask = torch.rand(4, 9, generator=g) > 0.3
    mask[2] = False  # a row with nothing to score
    ours = select_by_excess_loss(nll, ref, mask, ratio, scope)
    assert torch.equal(ours.double(), naive_select(nll, ref, mask, ratio, scope))
    assert ours[~mask].sum() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        ExcessLossSelection(ratio=0)
    with pytest.raises(ValueError, match="scope"):
        ExcessLossSelection(scope="token")


def test_compute_reads_the_reference_and_logs_what_it_kept():
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    stats = TokenStats(labels, logits=logits)
    ref_nll = torch.rand(2, 6) * stats.mask
    stats.reference = ReferenceStats(nll=ref_nll, mask=stats.mask)
    out = ExcessLossSelection(ratio=0.5).compute(stats, pl_module=None)
    expected = naive_select(stats.nll.detach(), ref_nll, stats.mask, 0.5, "batch").bool()
    assert torch.equal(out.mask, expected)
    excess = (stats.nll.detach() - ref_nll)[stats.mask]
    kept = expected[stats.mask]
    assert out.logs["excess_kept"].item() == pytest.approx(excess[kept].mean().item(), rel=1e-6)
    assert out.logs["excess_dropped"].item() == pytest.approx(excess[~kept].mean().item(), rel=1e-6)
    assert out.logs["kept_fraction"].item() == pytest.approx(kept.float().mean().item())
