import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.callbacks import DFT
from lightning_tokens.callbacks.dft import dft_weights
from lightning_tokens.core import TokenStats
from tests.helpers import MixinLM, loader, make_examples, trainer


def _logits_with_target_probs(probs, vocab=4):
    """One position per probability: the target (id 0) gets p, the rest share 1 - p."""
    rows = []
    for p in probs:
        rest = (1 - p) / (vocab - 1)
        rows.append([math.log(p)] + [math.log(rest)] * (vocab - 1))
    return torch.tensor(rows, dtype=torch.float64)


def trl_dft_loss(logits, labels, num_items_in_batch):
    """TRL's dft_loss semantics (sft_trainer.py): -exp(logp).detach() * logp, summed, / num_items."""
    logp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels != -100
    return (-(logp.exp().detach() * logp) * mask).sum() / num_items_in_batch


def test_dft_weights_hand_computed_paper_case():
    # shared toy of specs/text_methods.md §18.2
    nll = torch.tensor([1.84235, 1.720653, 1.386294], dtype=torch.float64)
    per_token = dft_weights(nll) * nll
    torch.testing.assert_close(per_token, torch.tensor([0.291911, 0.30791, 0.346574], dtype=torch.float64), atol=1e-6, rtol=0)
    assert per_token.mean().item() == pytest.approx(0.315465, abs=1e-6)


def test_dft_through_the_pipeline_matches_hand_computation_and_trl():
    probs = [0.158445, 0.178949, 0.25]
    logits = _logits_with_target_probs(probs).float().unsqueeze(0)  # (1, 3, V)
    labels = torch.zeros(1, 3, dtype=torch.long)
    stats = TokenStats(labels, logits=logits, shift_labels=False)
    out = DFT().compute(stats, pl_module=None)
    loss = (out.weights * stats.nll).sum() / stats.mask.sum()
    assert loss.item() == pytest.approx(0.315465, abs=1e-5)
    assert loss.item() == pytest.approx(trl_dft_loss(logits.double()[0], labels[0], 3).item(), abs=1e-6)
    assert out.logs["mean_weight"].item() == pytest.approx(sum(probs) / 3, abs=1e-5)


def test_dft_weights_are_detached_and_float64_reference():
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    logits = (hidden @ torch.randn(8, 10, dtype=torch.float64)).float().requires_grad_()
    labels = torch.randint(0, 10, (2, 6))
    labels[1, :4] = -100
    stats = TokenStats(labels, logits=logits)
    out = DFT().compute(stats, pl_module=None)
    assert not out.weights.requires_grad
    logp = F.log_softmax(logits.double()[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels[:, 1:] != -100
    expected = torch.where(mask, logp.exp(), torch.zeros_like(logp))
    torch.testing.assert_close(out.weights[:, 1:].double(), expected, rtol=1e-5, atol=1e-7)
    # gradient of the DFT loss equals the peer's (TRL) gradient
    ours = (out.weights * stats.nll).sum() / mask.sum()
    g_ours = torch.autograd.grad(ours, logits)[0]
    flat = logits[:, :-1].reshape(-1, 10)
    theirs = trl_dft_loss(flat, labels[:, 1:].reshape(-1), mask.sum())
    g_theirs = torch.autograd.grad(theirs, logits)[0]
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


def test_dft_min_weight_validation():
    with pytest.raises(ValueError, match="min_weight"):
        DFT(min_weight=2.0)


def test_a_foreign_module_trains_with_dft_after_adding_the_mixin():
    # a learnable pattern: each token is the previous one plus one
    examples = [{"input_ids": [(s + i) % 17 for i in range(10)], "labels": [-100] + [(s + i) % 17 for i in range(1, 10)]} for s in range(8)]
    model = MixinLM(lr=0.03, adam=True)
    batch = next(iter(loader(examples, 8)))
    model.train()
    initial = model.token_loss(batch["labels"], logits=model.head(model.hidden(batch["input_ids"])))
    trainer(max_epochs=30, callbacks=[DFT()]).fit(model, loader(examples, 4))
    final = model.token_loss(batch["labels"], logits=model.head(model.hidden(batch["input_ids"])))
    assert final < 0.5 * initial


def test_listing_a_method_twice_fails_before_training():
    with pytest.raises(ValueError, match="listed 2 times"):
        trainer(max_steps=1, callbacks=[DFT(), DFT()]).fit(MixinLM(), loader(make_examples([5]), 1))
