"""The token-mean reduction is exact under gradient accumulation and DDP."""

import copy

import pytest
import torch

from lightning_tokens.callbacks import DFT
from tests.helpers import FusedLM, loader, make_examples, trainer


def _step(model, examples, batch_size, accumulate, callbacks=()):
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=list(callbacks))
    t.fit(model, loader(examples, batch_size))
    # SGD with lr=1: the update is minus the gradient
    return {k: before[k] - v for k, v in model.state_dict().items()}


def _naive_update(model, examples, use_dft):
    """float64 gradient of Σ w·nll / N over all examples at once."""
    model = copy.deepcopy(model).double()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        logits = model.head(model.hidden(ids))[0, :-1]
        target = labels[0, 1:]
        keep = target != -100
        nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="none")
        w = torch.exp(-nll.detach()) if use_dft else torch.ones_like(nll)
        total = total + (w * nll).sum()
        count += int(keep.sum())
    (total / count).backward()
    return {k: p.grad.float() for k, p in model.named_parameters()}


@pytest.mark.parametrize("use_dft", [False, True])
def test_accumulation_equals_one_big_batch_and_naive(use_dft):
    model = FusedLM(lr=1.0)
    examples = make_examples([12, 5, 9, 3], prompt=2)  # micro-batches of very different token counts
    callbacks = [DFT()] if use_dft else []
    accumulated = _step(model, examples, batch_size=1, accumulate=4, callbacks=callbacks)
    two_by_two = _step(model, examples, batch_size=2, accumulate=2, callbacks=callbacks)
    big = _step(model, examples, batch_size=4, accumulate=1, callbacks=callbacks)
    naive = _naive_update(model, examples, use_dft)
    for name, grad in naive.items():
        torch.testing.assert_close(big[name], grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two_by_two[name], big[name], rtol=1e-4, atol=1e-6)


def test_all_ignored_batch_gives_zero_loss_and_gradient():
    model = FusedLM(lr=1.0)
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]
    update = _step(model, examples, batch_size=1, accumulate=1)
    for delta in update.values():
        assert torch.isfinite(delta).all()
        assert delta.abs().max() == 0


def test_all_ignored_microbatch_inside_a_window_is_harmless():
    model = FusedLM(lr=1.0)
    live = make_examples([8], prompt=2)
    dead = [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4}]
    with_dead = _step(model, dead + live, batch_size=1, accumulate=2)
    alone = _step(model, live, batch_size=1, accumulate=1)
    for name in alone:
        torch.testing.assert_close(with_dead[name], alone[name], rtol=1e-5, atol=1e-7)


class _NoSuperLM(FusedLM):
    def on_before_optimizer_step(self, optimizer):  # forgets super()
        pass


def test_override_without_super_is_detected():
    with pytest.raises(RuntimeError, match="super"):
        trainer(max_steps=2).fit(_NoSuperLM(), loader(make_examples([6, 6, 6]), 1))
