"""`linear_kl` against float64 full-logit KL (values and gradients), chunking, bias, direction; `k3_kl`."""

import pytest
import torch

from lightning_tokens.ops import linear_kl
from lightning_tokens.ops.kl import k3_kl


def naive_kl(h, w, rh, rw, b=None, rb=None, direction="policy_reference"):
    """float64, full logits, the textbook sum."""
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    rz = rh.double() @ rw.double().T + (0 if rb is None else rb.double())
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(rz, -1)
    if direction == "reference_policy":
        log_p, log_q = log_q, log_p
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _inputs(n, d, v, bias, seed=0, ref_d=None):
    g = torch.Generator().manual_seed(seed)
    ref_d = ref_d or d
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=g)).requires_grad_() if bias else None
    rh = torch.randn(n, ref_d, generator=g)
    rw = torch.randn(v, ref_d, generator=g) * 0.5
    rb = torch.randn(v, generator=g) if bias else None
    return h, w, b, rh, rw, rb


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("direction", ["policy_reference", "reference_policy"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,chunk", [(13, 4), (7, 7), (5, 100), (9, 1)])
def test_values_and_gradients_match_float64_full_logits(n, chunk, bias, direction):
    h, w, b, rh, rw, rb = _inputs(n, 12, 37, bias, ref_d=10)
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5  # a per-token weighting
    kl = linear_kl(h, w, rh, rw, b, rb, chunk_size=chunk, direction=direction)
    assert kl.dtype == torch.float32 and kl.shape == (n,)
    params = [h, w] + ([b] if bias else [])
    grads = torch.autograd.grad((kl * upstream).sum(), params)

    h64 = [p.detach().double().requires_grad_() for p in params]
    ref = naive_kl(h64[0], h64[1], rh, rw, h64[2] if bias else None, rb, direction)
    expected = torch.autograd.grad((ref * upstream.double()).sum(), h64)
    assert _rel_err(kl, ref) <= 1e-5
    for got, want in zip(grads, expected):
        assert _rel_err(got, want) <= 1e-5


def test_chunking_does_not_change_the_result_and_batch_shapes_are_kept():
    h, w, b, rh, rw, rb = _inputs(2 * 11, 8, 29, True)
    h3, rh3 = h.detach().reshape(2, 11, 8), rh.reshape(2, 11, 8)
    whole = linear_kl(h3, w, rh3, rw, b, rb, chunk_size=1000)
    for chunk in (1, 3, 10):
        torch.testing.assert_close(linear_kl(h3, w, rh3, rw, b, rb, chunk_size=chunk), whole, rtol=1e-6, atol=1e-7)
    assert whole.shape == (2, 11)


@pytest.mark.parametrize("direction", ["policy_reference", "reference_policy"])
def test_never_materialises_full_logits(direction):
    from tests.ops.test_linear_ops import _LargestTensor

    n, vocab, chunk = 512, 2048, 64
    h, w, b, rh, rw, rb = _inputs(n, 16, vocab, True)
    with _LargestTensor() as mode:
        linear_kl(h, w, rh, rw, b, rb, chunk_size=chunk, direction=direction).sum().backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None
    assert mode.largest <= chunk * vocab < n * vocab


def test_float64_inputs_are_exact_and_identical_heads_give_zero():
    h, w, _, rh, rw, _ = _inputs(6, 8, 19, False)
    kl = linear_kl(h.detach().double(), w.detach().double(), rh.double(), rw.double(), chunk_size=4)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, naive_kl(h, w, rh, rw), rtol=1e-12, atol=1e-14)
    same = linear_kl(h.detach(), w.detach(), h.detach(), w.detach())
    assert same.abs().max() < 1e-5


def test_reference_side_is_constant():
    h, w, b, rh, rw, rb = _inputs(5, 8, 19, True)
    rh, rw, rb = rh.requires_grad_(), rw.requires_grad_(), rb.requires_grad_()
    linear_kl(h, w, rh, rw, b, rb, chunk_size=2).sum().backward()
    assert rh.grad is None and rw.grad is None and rb.grad is None
    assert h.grad is not None and w.grad is not None and b.grad is not None


def test_bfloat16_hidden_runs_float32_statistics():
    h, w, _, rh, rw, _ = _inputs(9, 16, 23, False)
    kl = linear_kl(h.detach().bfloat16().requires_grad_(), w.detach(), rh.bfloat16(), rw, chunk_size=4)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), naive_kl(h.bfloat16(), w, rh.bfloat16(), rw), rtol=1e-4, atol=1e-5)
    kl.sum().backward()


def test_errors_name_the_problem():
    h, w, _, rh, rw, _ = _inputs(4, 8, 19, False)
    with pytest.raises(ValueError, match="same vocabulary"):
        linear_kl(h, w, rh, rw[:-1])
    with pytest.raises(ValueError, match="leading shape"):
        linear_kl(h, w, rh[:-1], rw)
    with pytest.raises(ValueError, match="direction"):
        linear_kl(h, w, rh, rw, direction="forward")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_kl(h, w, rh, rw, chunk_size=0)


def test_empty_input():
    w = torch.randn(11, 4, requires_grad=True)
    kl = linear_kl(torch.zeros(0, 4, requires_grad=True), w, torch.zeros(0, 4), w.detach())
    assert kl.shape == (0,)
    kl.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_k3_formula_and_gradient():
    # r = q_y / p_y: k3 = r - 1 - log r
    logp = torch.tensor([-1.2, -0.3, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-0.7, -0.3, -3.5], dtype=torch.float64)
    r = torch.exp(ref - logp.detach())
    torch.testing.assert_close(k3_kl(logp, ref), r - 1 - torch.log(r))
    (g,) = torch.autograd.grad(k3_kl(logp, ref).sum(), logp)
    torch.testing.assert_close(g, 1 - r)  # d/dlogp (r - 1 - log r) with dr/dlogp = -r
    rev = torch.exp(logp.detach() - ref)
    torch.testing.assert_close(k3_kl(logp, ref, "reference_policy"), rev - 1 - torch.log(rev))
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()
    # unbiased for KL(p||q) when y ~ p: the exact expectation over a small vocabulary
    p, q = torch.softmax(torch.randn(7, dtype=torch.float64), 0), torch.softmax(torch.randn(7, dtype=torch.float64), 0)
    expectation = (p * k3_kl(p.log(), q.log())).sum()
    torch.testing.assert_close(expectation, (p * (p.log() - q.log())).sum())


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["policy_reference", "reference_policy"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_float64_and_never_holds_all_logits(dtype, direction):
    n, d, v, chunk = 8195, 256, 32003, 512
    g = torch.Generator().manual_seed(0)
    h, rh = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w, rw = torch.randn(v, d, generator=g) / d**0.5, torch.randn(v, d, generator=g) / d**0.5
    b = torch.randn(v, generator=g) * 0.5
    upstream = torch.rand(n, generator=g)
    leaves = [x.to("cuda", dtype).requires_grad_() for x in (h, w, b)]
    rh_c, rw_c = rh.to("cuda", dtype), rw.to("cuda", dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kl = linear_kl(leaves[0], leaves[1], rh_c, rw_c, leaves[2], chunk_size=chunk, direction=direction)
    got = torch.autograd.grad((kl * upstream.cuda()).sum(), leaves)
    peak = torch.cuda.max_memory_allocated() - before
    chunk_logits, head = chunk * v * 4, v * d * 4
    assert peak < 4 * chunk_logits + 3 * head < n * v * 4 / 2, peak  # a few (chunk, V) buffers, never (N, V)

    # float64 reference on the same (rounded) inputs, on the GPU, in row blocks
    p64 = [x.detach().double().requires_grad_() for x in leaves]
    ref_total, ref_kl = 0.0, []
    for start in range(0, n, 1024):
        sl = slice(start, start + 1024)
        part = naive_kl(p64[0][sl], p64[1], rh_c[sl].double(), rw_c.double(), p64[2], None, direction)
        ref_kl.append(part.detach())
        ref_total = ref_total + (part * upstream[sl].cuda().double()).sum()
    want = torch.autograd.grad(ref_total, p64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel_err(kl, torch.cat(ref_kl)) <= tol
    for a, e in zip(got, want):
        assert a.dtype == dtype and _rel_err(a, e) <= tol


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    w = (torch.randn(1000, 64, generator=g) / 8).cuda().requires_grad_()
    rh, rw = torch.randn(300, 64, generator=g).cuda(), (torch.randn(1000, 64, generator=g) / 8).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kl = linear_kl(h, w, rh, rw, chunk_size=128)
    assert kl.dtype == torch.float32
    expected = naive_kl(h.bfloat16(), w.bfloat16(), rh.bfloat16(), rw.bfloat16())
    assert _rel_err(kl, expected) <= 2e-2
    kl.sum().backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
