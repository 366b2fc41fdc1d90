"""CPU tests of the fused token ops (chunked torch backend) against a float64 naive reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_tokens.ops import (
    default_chunk_size,
    is_liger_available,
    linear_cross_entropy,
    linear_entropy,
    linear_logprobs,
    linear_nll_entropy,
    resolve_backend,
)

V, D = 53, 24
IGNORE = -100


# ----------------------------------------------------------------------------- helpers


def make_inputs(lead_shape, *, bias=True, dtype=torch.float32, seed=0, ignore_frac=0.3):
    """Leaf tensors (hidden, weight, bias) and labels with some ignored positions."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead_shape, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, lead_shape, generator=g)
    labels[torch.rand(lead_shape, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, b, labels


def upstream(shape, seed=1):
    """Random per-token grad_output weights (some negative, some zero)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w * (torch.rand(shape, generator=g) > 0.1)


def ref_log_softmax(hidden, weight, bias):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits, dim=-1)


def ref_nll(hidden, weight, bias, labels, ignore_index=IGNORE):
    logp = ref_log_softmax(hidden, weight, bias)
    valid = labels != ignore_index
    picked = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, -picked, torch.zeros_like(picked))


def ref_entropy(hidden, weight, bias):
    logp = ref_log_softmax(hidden, weight, bias)
    return -(logp.exp() * logp).sum(-1)


def ref_logprobs(hidden, weight, bias, tokens):
    logp = ref_log_softmax(hidden, weight, bias)
    if tokens.dim() == logp.dim() - 1:
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logp.gather(-1, tokens)


def grads(loss, tensors):
    """Gradients of ``loss`` w.r.t. ``tensors`` (None entries stay None)."""
    present = [t for t in tensors if t is not None]
    out = iter(torch.autograd.grad(loss, present, allow_unused=True))
    return [next(out) if t is not None else None for t in tensors]


def assert_rel_close(actual, expected, rtol=1e-5):
    """Relative error bounded by ``rtol`` w.r.t. the largest reference magnitude."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def check_grads(ours, ref, rtol=1e-5):
    for name, a, e in zip(("hidden", "weight", "bias"), ours, ref):
        if e is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert_rel_close(a, e, rtol)


# ----------------------------------------------------------------------------- values + grads

SHAPES = [((37,), 8), ((3, 5), 4), ((37,), None), ((16,), 16)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead_shape,chunk", SHAPES)
def test_cross_entropy_matches_reference(lead_shape, chunk, bias):
    hidden, weight, b, labels = make_inputs(lead_shape, bias=bias)
    nll = linear_cross_entropy(hidden, weight, labels, b, chunk_size=chunk)
    expected = ref_nll(hidden, weight, b, labels)
    assert nll.dtype == torch.float32 and nll.shape == labels.shape
    assert_rel_close(nll, expected)
    assert (nll[labels == IGNORE] == 0).all()

    w = upstream(labels.shape)
    ours = grads((nll * w).sum(), [hidden, weight, b])
    ref = grads((expected * w.double()).sum(), [hidden, weight, b])
    check_grads(ours, ref)
    assert ours[0][labels == IGNORE].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead_shape,chunk", SHAPES)
def test_entropy_matches_reference(lead_shape, chunk, bias):
    hidden, weight, b, _ = make_inputs(lead_shape, bias=bias)
    ent = linear_entropy(hidden, weight, b, chunk_size=chunk)
    expected = ref_entropy(hidden, weight, b)
    assert ent.dtype == torch.float32 and ent.shape == hidden.shape[:-1]
    assert_rel_close(ent, expected)

    w = upstream(ent.shape)
    check_grads(grads((ent * w).sum(), [hidden, weight, b]), grads((expected * w.double()).sum(), [hidden, weight, b]))


@pytest.mark.parametrize("k", [None, 1, 4])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_logprobs_matches_reference(k, bias):
    hidden, weight, b, _ = make_inputs((3, 7), bias=bias)
    shape = (3, 7) if k is None else (3, 7, k)
    tokens = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(3))
    lp = linear_logprobs(hidden, weight, tokens, b, chunk_size=5)
    expected = ref_logprobs(hidden, weight, b, tokens)
    assert lp.dtype == torch.float32 and lp.shape == tokens.shape
    assert_rel_close(lp, expected)

    w = upstream(shape)
    check_grads(grads((lp * w).sum(), [hidden, weight, b]), grads((expected * w.double()).sum(), [hidden, weight, b]))


def test_logprobs_repeated_tokens_accumulate_grads():
    hidden, weight, b, _ = make_inputs((9,))
    tokens = torch.tensor([[1, 1, 2]] * 9)
    lp = linear_logprobs(hidden, weight, tokens, b, chunk_size=4)
    expected = ref_logprobs(hidden, weight, b, tokens)
    w = upstream(tokens.shape)
    check_grads(grads((lp * w).sum(), [hidden, weight, b]), grads((expected * w.double()).sum(), [hidden, weight, b]))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_nll_entropy_equals_separate_ops(bias):
    hidden, weight, b, labels = make_inputs((4, 9), bias=bias)
    nll, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=8)
    nll_sep = linear_cross_entropy(hidden, weight, labels, b, chunk_size=8)
    ent_sep = linear_entropy(hidden, weight, b, chunk_size=8)
    torch.testing.assert_close(nll, nll_sep, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent_sep, rtol=1e-6, atol=1e-6)

    wa, wb = upstream(labels.shape, seed=5), upstream(labels.shape, seed=6)
    leaves = [hidden, weight, b]
    joint = grads((nll * wa + ent * wb).sum(), leaves)
    separate = grads((nll_sep * wa + ent_sep * wb).sum(), leaves)
    ref = grads((ref_nll(hidden, weight, b, labels) * wa + ref_entropy(hidden, weight, b) * wb).sum(), leaves)
    check_grads(joint, ref)
    for a, e in zip(joint, separate):
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_nll_entropy_single_output_used():
    hidden, weight, b, labels = make_inputs((11,))
    nll, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=4)
    check_grads(grads(ent.sum(), [hidden, weight, b]), grads(ref_entropy(hidden, weight, b).sum(), [hidden, weight, b]))
    nll, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=4)
    expected = ref_nll(hidden, weight, b, labels)
    check_grads(grads(nll.sum(), [hidden, weight, b]), grads(expected.sum(), [hidden, weight, b]))


def test_chunk_size_does_not_change_results():
    hidden, weight, b, labels = make_inputs((37,))
    outs = []
    for chunk in (1, 7, 8, 36, 37, 1000, None):
        nll, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=chunk)
        outs.append((nll, ent, *grads((nll + ent).sum(), [hidden, weight, b])))
    for other in outs[1:]:
        for a, e in zip(other, outs[0]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_custom_ignore_index():
    hidden, weight, b, labels = make_inputs((20,), ignore_frac=0.0)
    labels[::3] = -1
    nll = linear_cross_entropy(hidden, weight, labels, b, ignore_index=-1, chunk_size=6)
    expected = ref_nll(hidden, weight, b, labels, ignore_index=-1)
    assert_rel_close(nll, expected)
    check_grads(grads(nll.sum(), [hidden, weight, b]), grads(expected.sum(), [hidden, weight, b]))


def test_float64_gradcheck():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, IGNORE, 10, 4, IGNORE, 7])
    tokens = torch.randint(0, 11, (7, 2), generator=g)

    def fn(h, w, bb):
        nll, ent = linear_nll_entropy(h, w, labels, bb, chunk_size=3)
        return nll, ent, linear_logprobs(h, w, tokens, bb, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_all_ignored_gives_zeros_and_zero_grads(bias):
    hidden, weight, b, labels = make_inputs((2, 6), bias=bias, ignore_frac=1.0)
    assert (labels == IGNORE).all()
    nll = linear_cross_entropy(hidden, weight, labels, b, chunk_size=4)
    assert torch.equal(nll, torch.zeros_like(nll))
    for g in grads((nll * upstream(labels.shape)).sum(), [hidden, weight, b]):
        if g is not None:
            assert torch.isfinite(g).all()
            assert g.abs().max() == 0

    nll2, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=4)
    assert torch.equal(nll2, torch.zeros_like(nll2))
    assert torch.isfinite(ent).all() and (ent > 0).all()  # entropy is defined on every position


@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)])
def test_zero_tokens(lead_shape):
    hidden, weight, b, labels = make_inputs(lead_shape)
    nll, ent = linear_nll_entropy(hidden, weight, labels, b)
    lp = linear_logprobs(hidden, weight, labels.clamp(min=0).unsqueeze(-1).expand(*lead_shape, 3), b)
    single = linear_cross_entropy(hidden, weight, labels, b)
    assert nll.shape == ent.shape == single.shape == labels.shape
    assert lp.shape == (*lead_shape, 3)
    gh, gw, gb = grads(nll.sum() + ent.sum() + lp.sum() + single.sum(), [hidden, weight, b])
    assert gh.shape == hidden.shape
    assert torch.equal(gw, torch.zeros_like(weight)) and torch.equal(gb, torch.zeros_like(b))


def test_frozen_weight_and_detached_hidden():
    hidden, weight, b, labels = make_inputs((13,))
    expected = ref_nll(hidden, weight, b, labels)
    ref_h, _, ref_b = grads(expected.sum(), [hidden, weight, b])

    frozen_w = weight.detach()
    nll = linear_cross_entropy(hidden, frozen_w, labels, b, chunk_size=5)
    gh, gb = torch.autograd.grad(nll.sum(), [hidden, b])
    assert_rel_close(gh, ref_h)
    assert_rel_close(gb, ref_b)

    nll = linear_cross_entropy(hidden.detach(), weight, labels, None, chunk_size=5)
    (gw,) = torch.autograd.grad(nll.sum(), [weight])
    assert_rel_close(gw, grads(ref_nll(hidden, weight, None, labels).sum(), [weight])[0])

    with torch.no_grad():
        nll = linear_cross_entropy(hidden, weight, labels, b, chunk_size=5)
    assert not nll.requires_grad
    assert_rel_close(nll, expected)


def test_non_contiguous_inputs():
    hidden, weight, b, labels = make_inputs((6, 5))
    # hidden as a transposed view, weight stored as (D, V) and viewed as (V, D), strided labels
    hidden_t = hidden.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    weight_t = weight.detach().T.contiguous().T.requires_grad_()
    labels_big = torch.stack([labels, labels], dim=-1)
    labels_nc = labels_big[..., 0]
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous() and not labels_nc.is_contiguous()
    nll = linear_cross_entropy(hidden_t, weight_t, labels_nc, b, chunk_size=7)
    expected = ref_nll(hidden, weight, b, labels)
    assert_rel_close(nll, expected)
    w = upstream(labels.shape)
    ours = grads((nll * w).sum(), [hidden_t, weight_t, b])
    check_grads(ours, grads((expected * w.double()).sum(), [hidden, weight, b]))


def test_int32_labels():
    hidden, weight, b, labels = make_inputs((10,))
    nll = linear_cross_entropy(hidden, weight, labels.int(), b, chunk_size=3)
    assert_rel_close(nll, ref_nll(hidden, weight, b, labels))


# ----------------------------------------------------------------------------- low precision


def test_bfloat16_inputs():
    hidden, weight, b, labels = make_inputs((4, 9), dtype=torch.bfloat16)
    tokens = torch.randint(0, V, (4, 9, 2), generator=torch.Generator().manual_seed(2))
    nll, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=8)
    lp = linear_logprobs(hidden, weight, tokens, b, chunk_size=8)
    assert nll.dtype == ent.dtype == lp.dtype == torch.float32
    # reference: float64 math on the same (bf16-valued) inputs; the logits go through bf16
    exp_nll = ref_nll(hidden, weight, b, labels)
    exp_ent = ref_entropy(hidden, weight, b)
    torch.testing.assert_close(nll.double(), exp_nll, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(ent.double(), exp_ent, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(lp.double(), ref_logprobs(hidden, weight, b, tokens), rtol=2e-2, atol=3e-2)

    wa, wb = upstream(labels.shape), upstream(labels.shape, seed=9)
    leaves = [hidden, weight, b]
    ours = grads((nll * wa + ent * wb).sum(), leaves)
    ref = grads((exp_nll * wa.double() + exp_ent * wb.double()).sum(), leaves)
    for a, e in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e.double(), rtol=3e-2, atol=3e-2 * scale)


def test_cpu_autocast_bfloat16():
    hidden, weight, b, labels = make_inputs((21,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = linear_cross_entropy(hidden, weight, labels, b, chunk_size=8)
    assert nll.dtype == torch.float32
    expected = ref_nll(hidden, weight, b, labels)
    torch.testing.assert_close(nll.double(), expected, rtol=2e-2, atol=3e-2)
    gh, gw, gb = grads(nll.sum(), [hidden, weight, b])
    assert gh.dtype == gw.dtype == gb.dtype == torch.float32
    for a, e in zip((gh, gw, gb), grads(expected.sum(), [hidden, weight, b])):
        torch.testing.assert_close(a.double(), e.double(), rtol=3e-2, atol=3e-2 * e.abs().max().item())


def test_mixed_dtypes_promote():
    hidden, weight, b, labels = make_inputs((9,))
    nll = linear_cross_entropy(hidden.detach().bfloat16().requires_grad_(), weight, labels, b, chunk_size=4)
    assert nll.dtype == torch.float32
    assert_rel_close(nll, ref_nll(hidden.detach().bfloat16(), weight, b, labels))


# ----------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits():
    n, vocab, chunk = 512, 2048, 64
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 16, generator=g, requires_grad=True)
    weight = torch.randn(vocab, 16, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    with _LargestTensor() as mode:
        nll, ent = linear_nll_entropy(hidden, weight, labels, bias, chunk_size=chunk)
        (nll + ent).sum().backward()
    assert hidden.grad is not None and weight.grad is not None
    assert mode.largest <= chunk * vocab < n * vocab


# ----------------------------------------------------------------------------- API


def test_default_chunk_size():
    assert default_chunk_size(1000) == 4096
    assert default_chunk_size(65536) == 4096
    assert default_chunk_size(131072) == 2048
    assert default_chunk_size(262144) == 1024
    assert default_chunk_size(10**12) == 1


def test_backend_selection_on_cpu():
    hidden, weight, _, labels = make_inputs((5,))
    assert resolve_backend("auto", hidden, weight) == "torch"
    assert resolve_backend("torch", hidden, weight) == "torch"
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        linear_entropy(hidden, weight, backend="nope")
    with pytest.raises(RuntimeError, match=r"lightning-tokens\[cuda\]"):
        linear_cross_entropy(hidden, weight, labels, backend="liger")
    # entropy/logprobs always run on chunked torch, whatever the backend
    torch.testing.assert_close(linear_entropy(hidden, weight, backend="liger"), linear_entropy(hidden, weight))
    assert isinstance(is_liger_available(), bool)


def test_shape_validation():
    hidden, weight, b, labels = make_inputs((2, 3))
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels.reshape(-1))
    with pytest.raises(ValueError, match="weight"):
        linear_entropy(hidden, weight[:, :-1])
    with pytest.raises(ValueError, match="bias"):
        linear_entropy(hidden, weight, b[:-1])
    with pytest.raises(ValueError, match="tokens"):
        linear_logprobs(hidden, weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        linear_logprobs(hidden, weight, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_entropy(hidden, weight, chunk_size=0)
