import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.core import OutputHead, TokenStats


def naive(hidden, weight, labels, shift=True):
    """float64 full-logit statistics aligned to label positions."""
    logits = hidden.double() @ weight.double().T
    logp = F.log_softmax(logits, -1)
    B, T = labels.shape
    nll = torch.zeros(B, T, dtype=torch.float64)
    ent = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            src = t - 1 if shift else t
            if src < 0 or labels[b, t] == -100:
                continue
            nll[b, t] = -logp[b, src, labels[b, t]]
            ent[b, t] = -(logp[b, src].exp() * logp[b, src]).sum()
    return nll, ent


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("source", ["head", "logits"])
def test_stats_match_naive(shift, source):
    B, T, D, V = 3, 7, 8, 11
    hidden = torch.randn(B, T, D)
    weight = torch.randn(V, D)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[2] = -100
    kwargs = dict(hidden=hidden, head=OutputHead(weight)) if source == "head" else dict(logits=hidden @ weight.T)
    stats = TokenStats(labels, shift_labels=shift, **kwargs)
    nll, ent = naive(hidden, weight, labels, shift)
    torch.testing.assert_close(stats.nll.double(), nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.entropy.double(), ent, rtol=1e-5, atol=1e-6)
    assert stats.mask.sum() == (nll != 0).sum()
    if shift:
        assert not stats.mask[:, 0].any()


def test_token_weights_zero_are_inactive_and_logprobs():
    B, T, D, V = 2, 5, 4, 9
    hidden, weight = torch.randn(B, T, D), torch.randn(V, D)
    labels = torch.randint(0, V, (B, T))
    weights = torch.ones(B, T)
    weights[1, 3] = 0
    stats = TokenStats(labels, hidden=hidden, head=OutputHead(weight), batch={"token_weights": weights})
    assert not stats.mask[1, 3] and stats.nll[1, 3] == 0
    tokens = torch.randint(0, V, (B, T, 3))
    lp = stats.logprobs(tokens)
    logp = F.log_softmax(hidden.double() @ weight.double().T, -1)
    expected = logp[0, 1, tokens[0, 2]]  # position 2 is predicted from hidden position 1
    torch.testing.assert_close(lp[0, 2].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.logprobs(labels), -stats.nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.probs, torch.exp(-stats.nll.detach()) * stats.mask)


def test_entropy_and_nll_in_one_pass_match_separate():
    B, T, D, V = 2, 6, 4, 13
    hidden, weight = torch.randn(B, T, D), torch.randn(V, D)
    labels = torch.randint(0, V, (B, T))
    joint = TokenStats(labels, hidden=hidden, head=OutputHead(weight), with_entropy=True)
    separate = TokenStats(labels, hidden=hidden, head=OutputHead(weight))
    torch.testing.assert_close(joint.nll, separate.nll)
    torch.testing.assert_close(joint.entropy, separate.entropy)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="shape of input_ids"):
        TokenStats(torch.zeros(2, 4, dtype=torch.long), logits=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="exactly one"):
        TokenStats(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="without `head`"):
        TokenStats(torch.zeros(2, 4, dtype=torch.long), hidden=torch.randn(2, 4, 3))


def test_nll_gradient_flows_to_hidden_and_head():
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    head = torch.nn.Linear(3, 5)
    labels = torch.randint(0, 5, (2, 4))
    stats = TokenStats(labels, hidden=hidden, head=OutputHead.from_module(head))
    stats.nll.sum().backward()
    logits = head(hidden)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), reduction="sum")
    g_hidden, g_weight = torch.autograd.grad(ref, [hidden, head.weight])
    torch.testing.assert_close(hidden.grad, g_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, g_weight, rtol=1e-5, atol=1e-6)
