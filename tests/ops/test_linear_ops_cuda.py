"""CUDA tests: the Liger backend against the chunked torch backend, and chunked torch on CUDA.

Skipped without a CUDA device; the Liger tests are also skipped without ``liger-kernel>=0.8.2``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.ops import (
    is_liger_available,
    linear_cross_entropy,
    linear_entropy,
    linear_logprobs,
    linear_nll_entropy,
    resolve_backend,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# short-circuit: never import Liger (slow) on a machine without CUDA
needs_liger = pytest.mark.skipif(
    not torch.cuda.is_available() or not is_liger_available(), reason="needs CUDA and liger-kernel>=0.8.2"
)

IGNORE = -100
V, D = 4099, 256  # V not a power of two: exercises Liger's masked last block


def make_inputs(lead_shape, dtype, *, bias=True, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead_shape, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, lead_shape, generator=g)
    labels[torch.rand(lead_shape, generator=g) < ignore_frac] = IGNORE
    per_token = torch.randn(lead_shape, generator=g)

    def leaf(t):
        return None if t is None else t.to("cuda", dtype).requires_grad_()

    return leaf(hidden), leaf(weight), leaf(b), labels.cuda(), per_token.cuda()


def grads(loss, tensors):
    present = [t for t in tensors if t is not None]
    out = iter(torch.autograd.grad(loss, present))
    return [next(out) if t is not None else None for t in tensors]


def assert_grads_close(actual, expected, dtype):
    """fp32: tight elementwise; bf16: elementwise w.r.t. the largest magnitude, plus a relative norm."""
    for name, a, e in zip(("hidden", "weight", "bias"), actual, expected):
        if e is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype == dtype, name
        a, e = a.double(), e.double()
        scale = e.abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * scale, msg=name)
        else:
            torch.testing.assert_close(a, e, rtol=5e-2, atol=5e-2 * scale, msg=name)
            rel = ((a - e).norm() / e.norm()).item()
            assert rel < 2e-2, f"{name}: relative norm error {rel:.3g}"


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------- Liger vs torch


@needs_liger
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_matches_torch(dtype, bias):
    hidden, weight, b, labels, per_token = make_inputs((3, 517), dtype, bias=bias)
    assert resolve_backend("auto", hidden, weight) == "liger"
    leaves = [hidden, weight, b]

    nll_liger = linear_cross_entropy(hidden, weight, labels, b, backend="liger")
    nll_torch = linear_cross_entropy(hidden, weight, labels, b, backend="torch", chunk_size=256)
    assert nll_liger.dtype == torch.float32 and nll_liger.shape == labels.shape
    assert (nll_liger[labels == IGNORE] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(nll_liger, nll_torch, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(nll_liger, nll_torch, rtol=2e-2, atol=2e-2)

    g_liger = grads((nll_liger * per_token).sum(), leaves)
    g_torch = grads((nll_torch * per_token).sum(), leaves)
    assert g_liger[0][labels == IGNORE].abs().max() == 0
    assert_grads_close(g_liger, g_torch, dtype)


@needs_liger
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_auto_backend_default(dtype):
    hidden, weight, b, labels, per_token = make_inputs((700,), dtype)
    leaves = [hidden, weight, b]
    nll_auto = linear_cross_entropy(hidden, weight, labels, b)  # backend="auto" -> liger on CUDA
    nll_torch = linear_cross_entropy(hidden, weight, labels, b, backend="torch")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(nll_auto, nll_torch, rtol=tol, atol=tol)
    assert_grads_close(grads((nll_auto * per_token).sum(), leaves), grads((nll_torch * per_token).sum(), leaves), dtype)


@needs_liger
def test_liger_frozen_weight_and_no_grad():
    hidden, weight, b, labels, per_token = make_inputs((300,), torch.bfloat16)
    frozen = weight.detach()
    nll_liger = linear_cross_entropy(hidden, frozen, labels, b, backend="liger")
    nll_torch = linear_cross_entropy(hidden, frozen, labels, b, backend="torch")
    gl = torch.autograd.grad((nll_liger * per_token).sum(), [hidden, b])
    gt = torch.autograd.grad((nll_torch * per_token).sum(), [hidden, b])
    assert_grads_close([gl[0], None, gl[1]], [gt[0], None, gt[1]], torch.bfloat16)

    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, labels, b, backend="liger")
    assert not out.requires_grad
    torch.testing.assert_close(out, nll_torch.detach(), rtol=2e-2, atol=2e-2)


@needs_liger
def test_liger_all_ignored_and_empty():
    hidden, weight, b, labels, per_token = make_inputs((2, 64), torch.bfloat16, ignore_frac=1.0)
    nll = linear_cross_entropy(hidden, weight, labels, b, backend="liger")
    assert torch.equal(nll, torch.zeros_like(nll))
    for g in grads((nll * per_token).sum(), [hidden, weight, b]):
        assert torch.isfinite(g).all() and g.abs().max() == 0

    hidden, weight, b, labels, _ = make_inputs((0,), torch.bfloat16)
    nll = linear_cross_entropy(hidden, weight, labels, b, backend="liger")
    assert nll.shape == (0,) and nll.dtype == torch.float32
    nll.sum().backward()
    assert weight.grad is not None and weight.grad.abs().max() == 0


# ----------------------------------------------------------------------------- chunked torch on CUDA


def _reference(hidden, weight, b, labels):
    logits = hidden.double() @ weight.double().T + (b.double() if b is not None else 0)
    logp = torch.log_softmax(logits, -1)
    valid = labels != IGNORE
    nll = torch.where(valid, -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)
    ent = -(logp.exp() * logp).sum(-1)
    return nll, ent, logp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_torch_on_cuda_matches_reference(dtype):
    hidden, weight, b, labels, per_token = make_inputs((2, 333), dtype)
    leaves = [hidden, weight, b]
    nll, ent = linear_nll_entropy(hidden, weight, labels, b, chunk_size=128)
    tokens = torch.randint(0, V, (2, 333, 3), device="cuda")
    lp = linear_logprobs(hidden, weight, tokens, b, chunk_size=100)
    ref_nll, ref_ent, ref_logp = _reference(hidden, weight, b, labels)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(nll.double(), ref_nll, rtol=tol, atol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=tol, atol=tol)
    torch.testing.assert_close(lp.double(), ref_logp.gather(-1, tokens), rtol=tol, atol=tol)

    loss = (nll * per_token + ent * per_token.flip(-1)).sum() + lp.sum()
    ref_loss = (ref_nll * per_token + ref_ent * per_token.flip(-1)).sum() + ref_logp.gather(-1, tokens).sum()
    ours = grads(loss, leaves)
    ref = [g.to(dtype) for g in grads(ref_loss, leaves)]
    assert_grads_close(ours, ref, dtype)


def test_chunked_torch_under_cuda_autocast():
    hidden, weight, b, labels, per_token = make_inputs((400,), torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ent = linear_entropy(hidden, weight, b, chunk_size=128)
        nll = linear_cross_entropy(hidden, weight, labels, b, backend="torch", chunk_size=128)
    assert ent.dtype == nll.dtype == torch.float32
    ref_nll, ref_ent, _ = _reference(hidden, weight, b, labels)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(nll.double(), ref_nll, rtol=3e-2, atol=3e-2)
    ours = grads((nll * per_token + ent).sum(), [hidden, weight, b])
    ref = grads((ref_nll * per_token + ref_ent).sum(), [hidden, weight, b])
    for a, e in zip(ours, ref):
        assert a.dtype == torch.float32
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double(), e.double(), rtol=5e-2, atol=5e-2 * scale)
