"""Per-token KL divergence between two output heads, chunked over tokens.

:func:`linear_kl` computes, for every token, the full-vocabulary divergence between the current model's
next-token distribution ``p = softmax(hidden @ weight.T + bias)`` and a frozen reference's
``q = softmax(ref_hidden @ ref_weight.T + ref_bias)``, without ever holding the ``(N, V)`` logits of all
tokens: the forward pass walks over chunks of tokens and keeps only per-token statistics (two
log-sum-exps and the KL); the backward pass recomputes each chunk's logits of both sides and forms the
logits gradient explicitly, like :mod:`lightning_tokens.ops.chunked`. The reference side is a constant:
no gradient reaches ``ref_hidden``, ``ref_weight`` or ``ref_bias``.

Gradients with respect to the current logits ``z``:

* ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)``:  ``∂/∂z = p ⊙ (log p − log q − KL)``
* ``KL(q‖p) = Σ_v q_v (log q_v − log p_v)``:  ``∂/∂z = p − q``

:func:`k3_kl` is the single-token alternative (Schulman's ``k3`` estimator on the label token), which
needs only the two models' log-probabilities of the label.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_tokens.ops.chunked import (
    _ProjectionGrads,
    _chunk_logits,
    _chunks,
    _compute_dtype,
    _no_autocast,
    _stat_dtype,
    default_chunk_size,
)

__all__ = ["KLDirection", "k3_kl", "linear_kl"]

#: ``"policy_reference"``: ``KL(π_θ ‖ π_ref)`` (the STAR-DSS summaries); ``"reference_policy"``: ``KL(π_ref ‖ π_θ)``.
KLDirection = Literal["policy_reference", "reference_policy"]
_DIRECTIONS = ("policy_reference", "reference_policy")


class _LinearKL(torch.autograd.Function):
    """Flat inputs: ``hidden`` (N, D), ``weight`` (V, D), ``bias`` (V,) or None, and the reference's
    ``ref_hidden`` (N, D'), ``ref_weight`` (V, D'), ``ref_bias``; returns ``kl`` (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, reverse, chunk_size):
        n = hidden.shape[0]
        compute_dtype = _compute_dtype(hidden, weight)
        ref_dtype = _compute_dtype(ref_hidden, ref_weight)
        stat_dtype = _stat_dtype(compute_dtype)
        device = hidden.device

        with _no_autocast(device.type), torch.no_grad():
            w = weight.to(compute_dtype)
            b = bias.to(stat_dtype) if bias is not None else None
            rw = ref_weight.to(ref_dtype)
            rb = ref_bias.to(stat_dtype) if ref_bias is not None else None
            lse = torch.empty(n, device=device, dtype=stat_dtype)
            ref_lse = torch.empty(n, device=device, dtype=stat_dtype)
            kl = torch.empty(n, device=device, dtype=stat_dtype)
            for start, end in _chunks(n, chunk_size):
                log_p = _chunk_logits(hidden[start:end].to(compute_dtype), w, b, stat_dtype)
                log_q = _chunk_logits(ref_hidden[start:end].to(ref_dtype), rw, rb, stat_dtype)
                chunk_lse = torch.logsumexp(log_p, dim=-1)
                chunk_ref_lse = torch.logsumexp(log_q, dim=-1)
                lse[start:end], ref_lse[start:end] = chunk_lse, chunk_ref_lse
                log_p.sub_(chunk_lse.unsqueeze(1))
                log_q.sub_(chunk_ref_lse.unsqueeze(1))
                # in place: two (chunk, V) buffers in all
                if reverse:  # Σ q (log q − log p)
                    diff, dist = log_p.sub_(log_q).neg_(), log_q.exp_()
                else:  # Σ p (log p − log q)
                    diff, dist = log_q.sub_(log_p).neg_(), log_p.exp_()
                torch.sum(diff.mul_(dist), dim=-1, out=kl[start:end])
                del log_p, log_q, diff, dist

        ctx.set_materialize_grads(False)
        ctx.compute_dtype, ctx.ref_dtype = compute_dtype, ref_dtype
        ctx.chunk_size, ctx.reverse = chunk_size, reverse
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        none = (None,) * 8
        if grad_kl is None or not (need_hidden or need_weight or need_bias):
            return none

        n, d = hidden.shape
        compute_dtype, ref_dtype = ctx.compute_dtype, ctx.ref_dtype
        stat_dtype = _stat_dtype(compute_dtype)
        device = hidden.device
        multi_chunk = n > ctx.chunk_size

        with _no_autocast(device.type):
            w = weight.to(compute_dtype)
            b = bias.to(stat_dtype) if bias is not None else None
            rw = ref_weight.to(ref_dtype)
            rb = ref_bias.to(stat_dtype) if ref_bias is not None else None
            grad_kl = grad_kl.to(stat_dtype)

            grads = _ProjectionGrads(
                hidden, weight, (need_hidden, need_weight, need_bias), compute_dtype, stat_dtype, multi_chunk
            )

            for start, end in _chunks(n, ctx.chunk_size):
                hidden_chunk = hidden[start:end].to(compute_dtype)
                log_p = _chunk_logits(hidden_chunk, w, b, stat_dtype).sub_(lse[start:end].unsqueeze(1))
                log_q = _chunk_logits(ref_hidden[start:end].to(ref_dtype), rw, rb, stat_dtype)
                log_q.sub_(ref_lse[start:end].unsqueeze(1))
                g = grad_kl[start:end].unsqueeze(1)
                if ctx.reverse:  # d KL(q‖p) / dz = p − q
                    grad_logits = log_p.exp_().sub_(log_q.exp_()).mul_(g)
                else:  # d KL(p‖q) / dz = p ⊙ (log p − log q − KL), the coefficient in log_q's buffer
                    coef = log_q.sub_(log_p).neg_().sub_(kl[start:end].unsqueeze(1)).mul_(g)
                    grad_logits = log_p.exp_().mul_(coef)
                    del coef
                del log_q

                grads.add_bias(grad_logits)
                grad_logits_c = grad_logits.to(compute_dtype)
                del grad_logits
                grads.add(grad_logits_c, hidden_chunk, w, start, end)
                del grad_logits_c, hidden_chunk

        return (*grads.result(weight, bias), None, None, None, None, None)


def linear_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    direction: KLDirection = "policy_reference",
) -> Tensor:
    """Full-vocabulary KL divergence per token between the current and a reference output head.

    ``p = softmax(hidden @ weight.T + bias)`` is the current model's distribution, ``q =
    softmax(ref_hidden @ ref_weight.T + ref_bias)`` the reference's, row by row. The ``(N, V)`` logits
    are never materialised for all tokens at once: at most one chunk of ``chunk_size`` tokens (two
    ``(chunk, V)`` float32 buffers and their temporaries) lives at a time, in forward and in backward.

    Differentiable with respect to ``hidden``, ``weight`` and ``bias``; the reference side is treated as
    a constant (detached). Softmax math runs in float32 (float64 for float64 inputs) whatever the input
    dtype; under autocast the matmuls run in autocast's dtype, like the other fused ops.

    Args:
        hidden: ``(..., D)`` current hidden states.
        weight: ``(V, D)`` current output projection.
        ref_hidden: ``(..., D_ref)`` reference hidden states, same leading shape as ``hidden``.
        ref_weight: ``(V, D_ref)`` reference output projection (same vocabulary ``V``).
        bias: optional ``(V,)`` current bias.
        ref_bias: optional ``(V,)`` reference bias.
        chunk_size: tokens per chunk (default :func:`~lightning_tokens.ops.default_chunk_size`).
        direction: ``"policy_reference"`` for ``KL(p ‖ q)`` (default), ``"reference_policy"`` for ``KL(q ‖ p)``.

    Returns:
        float32 tensor of shape ``hidden.shape[:-1]`` (float64 for float64 inputs), in nats.

    Example:
        >>> h, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(50, 16)
        >>> kl = linear_kl(h, w, torch.randn(3, 5, 16), w)
        >>> kl.shape, bool((kl >= -1e-6).all())
        (torch.Size([3, 5]), True)
        >>> kl.sum().backward()
        >>> float(linear_kl(h[0].detach(), w, h[0].detach(), w).abs().max()) < 1e-5  # identical heads: KL = 0
        True
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}.")
    for name, h, w, b in (("", hidden, weight, bias), ("ref_", ref_hidden, ref_weight, ref_bias)):
        if h.dim() < 1 or w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name}weight must be (V, D={h.shape[-1]}), got {tuple(w.shape)}.")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name}bias must be (V={w.shape[0]},), got {tuple(b.shape)}.")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"the reference head scores {ref_weight.shape[0]} tokens but the current head {weight.shape[0]}: "
            "a full-vocabulary KL needs the same vocabulary (use the model's own tokenizer for the reference)."
        )
    if ref_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(
            f"ref_hidden has leading shape {tuple(ref_hidden.shape[:-1])} but hidden has {tuple(hidden.shape[:-1])}."
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    ref_flat = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    kl = _LinearKL.apply(
        flat,
        weight,
        bias,
        ref_flat,
        ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        direction == "reference_policy",
        int(chunk_size),
    )
    return kl.reshape(hidden.shape[:-1])


def k3_kl(logprob: Tensor, ref_logprob: Tensor, direction: KLDirection = "policy_reference") -> Tensor:
    """Schulman's ``k3`` single-sample KL estimate on given tokens: ``r − 1 − log r``.

    For ``KL(π_θ ‖ π_ref)``, ``r = π_ref(y) / π_θ(y)``; for ``KL(π_ref ‖ π_θ)``, ``r = π_θ(y) / π_ref(y)``.
    ``k3 ≥ 0`` always, and it is an unbiased estimate of the KL when ``y`` is drawn from the first
    distribution; on the *label* token (drawn from the data, not from ``π_θ``) it is a biased but cheap
    pull of the label's probability toward the reference's. Differentiable through both arguments
    (detach ``ref_logprob`` for a frozen reference).

    Args:
        logprob: log-probabilities of the tokens under the current model (``-nll``).
        ref_logprob: log-probabilities of the same tokens under the reference.
        direction: ``"policy_reference"`` or ``"reference_policy"``.

    Example:
        >>> k3_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0]))  # r = e^1 on the second token
        tensor([0.0000, 0.7183])
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}.")
    log_r = ref_logprob - logprob if direction == "policy_reference" else logprob - ref_logprob
    return torch.expm1(log_r) - log_r
