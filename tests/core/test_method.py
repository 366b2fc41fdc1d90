"""Both hook points, composition in callback order, and the errors of the protocol."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tokens.callbacks import DFT
from lightning_tokens.core import BatchTokenMethod, TokenMethod, TokenMethodOutput, multiply_token_weights
from tests.helpers import FusedLM, loader, make_examples, trainer


class EveryOtherToken(BatchTokenMethod):
    """Pre-forward: weight 0 on even positions, 2 on odd ones."""

    def token_weights(self, batch, pl_module):
        weights = torch.full(batch["labels"].shape, 2.0)
        weights[:, ::2] = 0
        return weights


class KeepLowLoss(TokenMethod):
    """Post-forward: keep tokens with nll below the median, plus an extra term."""

    def compute(self, stats, pl_module):
        nll = stats.nll.detach()
        median = nll[stats.mask].median()
        return TokenMethodOutput(mask=nll <= median, extra_loss=0.5 * stats.nll, logs={"median": median})


class ReplaceLoss(TokenMethod):
    def compute(self, stats, pl_module):
        return TokenMethodOutput(loss=stats.nll * 0)


class ReplaceLossToo(ReplaceLoss):
    pass


def _update(callbacks, examples):
    model = FusedLM(lr=1.0)
    before = copy.deepcopy(model.state_dict())
    trainer(max_steps=1, callbacks=callbacks).fit(model, loader(examples, len(examples)))
    return model, {k: before[k] - v for k, v in model.state_dict().items()}


def test_pre_and_post_forward_methods_compose_in_order():
    examples = make_examples([9, 7, 8], prompt=1)
    model, update = _update([EveryOtherToken(), DFT(), KeepLowLoss()], examples)
    # the same loss by hand, float64, from the same initial weights
    torch.manual_seed(0)
    ref = FusedLM(lr=1.0).double()
    batch = next(iter(loader(examples, 3)))
    logits = ref.head(ref.hidden(batch["input_ids"]))[:, :-1]
    target = batch["labels"][:, 1:]
    valid = target != -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none") * valid
    w = torch.full(target.shape, 2.0, dtype=torch.float64)
    w[:, 1::2] = 0  # positions 2, 4, ... of the label tensor are even there
    active = valid & (w != 0)
    w = w * torch.exp(-nll.detach())
    median = nll.detach()[active].median()
    keep = active & (nll.detach() <= median)
    loss = ((w * nll + 0.5 * nll) * keep).sum() / keep.sum()
    loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(update[name].double(), p.grad, rtol=1e-4, atol=1e-7)


def test_two_methods_replacing_the_loss_is_an_error():
    with pytest.raises(ValueError, match="both replace"):
        _update([ReplaceLoss(), ReplaceLossToo()], make_examples([5, 5]))


def test_multiply_token_weights_checks_shape_and_multiplies():
    batch = {"labels": torch.zeros(2, 3, dtype=torch.long)}
    multiply_token_weights(batch, torch.full((2, 3), 2.0))
    multiply_token_weights(batch, torch.full((2, 3), 3.0))
    assert torch.equal(batch["token_weights"], torch.full((2, 3), 6.0))
    with pytest.raises(ValueError, match="indexed like labels"):
        multiply_token_weights(batch, torch.ones(2, 4))


def test_bad_labels_fail_before_the_first_step():
    model = FusedLM()
    bad_shape = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match="shape of input_ids"):
        trainer(max_steps=1).fit(model, DataLoader([bad_shape], batch_size=None))
    too_big = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.tensor([[1, 2, 99, -100]])}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trainer(max_steps=1).fit(FusedLM(), DataLoader([too_big], batch_size=None))


def test_train_nll_is_the_plain_token_mean_nll_whatever_the_methods_do():
    """``train/nll`` is the mean NLL of every labelled token that reaches the output head (float64 by hand):
    post-forward weights (DFT) and masks (KeepLowLoss) do not change it, tokens a pre-forward method weights
    0 (EveryOtherToken) never get a prediction. ``train/loss`` is the methods' objective."""
    examples = make_examples([9, 7, 8], prompt=1)
    torch.manual_seed(0)
    model = FusedLM(lr=1.0)
    torch.manual_seed(0)
    ref = FusedLM(lr=1.0).double()
    run = trainer(max_steps=1, callbacks=[EveryOtherToken(), DFT(), KeepLowLoss()])
    run.fit(model, loader(examples, len(examples)))
    batch = next(iter(loader(examples, 3)))
    with torch.no_grad():
        logits = ref.head(ref.hidden(batch["input_ids"]))[:, :-1]
    target = batch["labels"][:, 1:]
    valid = target != -100
    valid[:, 1::2] = False  # EveryOtherToken's zero weights (label positions 2, 4, ...)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    expected = (nll * valid).sum() / valid.sum()
    assert float(run.callback_metrics["train/nll"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(run.callback_metrics["train/loss"]) != pytest.approx(float(expected), rel=1e-2)
