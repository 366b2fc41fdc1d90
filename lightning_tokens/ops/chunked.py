"""Chunked PyTorch implementation of the fused linear + softmax token statistics.

The logits ``hidden @ weight.T + bias`` of shape ``(N, V)`` are never materialised: the
forward pass walks over chunks of tokens, computes the ``(chunk, V)`` logits in float32,
reduces them to per-token statistics and throws them away. Only the inputs and tiny
per-token statistics (logsumexp, entropy) are saved; the backward pass recomputes each
chunk's logits and forms the logits gradient explicitly, so the peak extra memory is a few
``(chunk, V)`` buffers whatever ``N`` is.

Everything here works on flattened inputs: ``hidden`` is ``(N, D)``, ``tokens`` is
``(N, K)``. The public, shape-aware entry points live in :mod:`lightning_tokens.ops.dispatch`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["default_chunk_size", "linear_token_stats"]

#: Upper bound on the number of tokens per chunk.
MAX_CHUNK_TOKENS = 4096
#: Target size of one chunk's float32 logits.
CHUNK_LOGITS_BYTES = 1024 * 1024 * 1024


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits stay around 1 GiB.

    Larger chunks run the matmuls at a better efficiency: on an H100 (N=8192, D=4096, V=128256, bf16)
    2048-token chunks took 75 ms for forward+backward against 98 ms with 523-token chunks.

    Args:
        vocab_size: Number of output classes ``V``.

    Returns:
        ``min(4096, 1 GiB / (4 * V))``, at least 1.

    Example:
        >>> default_chunk_size(128256)
        2092
    """
    return max(1, min(MAX_CHUNK_TOKENS, CHUNK_LOGITS_BYTES // (4 * max(vocab_size, 1))))


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """Dtype of the matmuls: autocast's dtype when autocast is on, else the promoted dtype."""
    device_type = hidden.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device type without autocast support
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast so that the explicit casts below are the only ones that happen."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    except (RuntimeError, TypeError):
        pass
    return contextlib.nullcontext()


@functools.cache
def _cuda_addmm_out_dtype_supported() -> bool:
    """Whether ``torch.addmm(..., out_dtype=float32)`` works for bf16 operands on CUDA."""
    try:
        acc = torch.zeros(2, 2, device="cuda")
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(acc[0, 0].item() == 2.0)
    except (RuntimeError, TypeError):
        return False


def _addmm_(acc: Tensor, mat1: Tensor, mat2: Tensor) -> None:
    """``acc += mat1 @ mat2`` in place, where ``acc`` may have a higher precision."""
    if mat1.dtype == acc.dtype:
        acc.addmm_(mat1, mat2)
    elif acc.is_cuda and acc.dtype == torch.float32 and _cuda_addmm_out_dtype_supported():
        torch.addmm(acc, mat1, mat2, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(mat1, mat2))


class _ProjectionGrads:
    """Gradients of ``hidden``, ``weight`` and ``bias`` of ``logits = hidden @ weight.T + bias``,
    accumulated chunk by chunk from each chunk's ``d loss / d logits`` (shared by every chunked op)."""

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        needs: tuple[bool, bool, bool],
        compute_dtype: torch.dtype,
        stat_dtype: torch.dtype,
        multi_chunk: bool,
    ) -> None:
        (n, d), v = hidden.shape, weight.shape[0]
        need_hidden, self.need_weight, need_bias = needs
        self.compute_dtype, self.multi_chunk = compute_dtype, multi_chunk
        self.hidden = torch.empty(n, d, device=hidden.device, dtype=hidden.dtype) if need_hidden else None
        self.weight = None
        if self.need_weight and multi_chunk:
            acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            self.weight = torch.zeros(v, d, device=hidden.device, dtype=acc_dtype)
        self.bias = torch.zeros(v, device=hidden.device, dtype=stat_dtype) if need_bias else None

    def add_bias(self, grad_logits: Tensor) -> None:
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(dim=0))

    def add(self, grad_logits_c: Tensor, hidden_chunk: Tensor, w: Tensor, start: int, end: int) -> None:
        """Accumulate one chunk; ``grad_logits_c`` is already in the matmul dtype (the caller frees its
        float32 original first, so the two never coexist at the peak)."""
        if self.hidden is not None:
            if self.hidden.dtype == self.compute_dtype:
                torch.mm(grad_logits_c, w, out=self.hidden[start:end])
            else:
                self.hidden[start:end] = torch.mm(grad_logits_c, w)
        if self.need_weight:
            if self.multi_chunk:
                _addmm_(self.weight, grad_logits_c.t(), hidden_chunk)
            else:
                self.weight = torch.mm(grad_logits_c.t(), hidden_chunk)

    def result(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grad_weight = self.weight
        if self.need_weight and grad_weight is None:  # n == 0
            grad_weight = torch.zeros_like(weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        grad_bias = self.bias.to(bias.dtype) if self.bias is not None else None
        return self.hidden, grad_weight, grad_bias


def _stat_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Softmax math runs in float32, or float64 for float64 inputs."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _chunk_logits(hidden_chunk: Tensor, weight: Tensor, bias: Tensor | None, stat_dtype: torch.dtype) -> Tensor:
    """A fresh (owned, writable) ``(chunk, V)`` logits tensor in ``stat_dtype``."""
    if bias is not None and weight.dtype == stat_dtype:
        return torch.addmm(bias, hidden_chunk, weight.t())
    logits = torch.mm(hidden_chunk, weight.t())
    if logits.dtype != stat_dtype:
        logits = logits.to(stat_dtype)
    if bias is not None:
        logits.add_(bias)
    return logits


class _LinearTokenStats(torch.autograd.Function):
    """Per-token log-probabilities of given ids and/or entropy of ``softmax(h W^T + b)``.

    Inputs (all flat): ``hidden`` (N, D), ``weight`` (V, D), ``bias`` (V,) or None,
    ``tokens`` (N, K) int64 or None, ``valid`` (N,) bool or None (rows whose log-probs are
    forced to 0 with zero gradient), ``negate`` (return ``-logprobs``), ``want_entropy``,
    ``chunk_size``.

    Outputs: ``(logprobs (N, K) or None, entropy (N,) or None)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, valid, negate, want_entropy, chunk_size):
        n = hidden.shape[0]
        compute_dtype = _compute_dtype(hidden, weight)
        stat_dtype = _stat_dtype(compute_dtype)
        device = hidden.device

        with _no_autocast(device.type), torch.no_grad():
            w = weight.to(compute_dtype)
            b = bias.to(stat_dtype) if bias is not None else None
            lse = torch.empty(n, device=device, dtype=stat_dtype)
            logprobs = torch.empty(tokens.shape, device=device, dtype=stat_dtype) if tokens is not None else None
            entropy = torch.empty(n, device=device, dtype=stat_dtype) if want_entropy else None

            for start, end in _chunks(n, chunk_size):
                logits = _chunk_logits(hidden[start:end].to(compute_dtype), w, b, stat_dtype)
                chunk_lse = torch.logsumexp(logits, dim=-1)
                lse[start:end] = chunk_lse
                if logprobs is not None:
                    torch.sub(logits.gather(1, tokens[start:end]), chunk_lse.unsqueeze(1), out=logprobs[start:end])
                if entropy is not None:
                    log_p = logits.sub_(chunk_lse.unsqueeze(1))
                    p_log_p = log_p.exp().mul_(log_p)
                    torch.sum(p_log_p, dim=-1, out=entropy[start:end]).neg_()
                    del log_p, p_log_p
                del logits, chunk_lse

            if logprobs is not None:
                if negate:
                    logprobs.neg_()
                if valid is not None:
                    logprobs.masked_fill_(~valid.unsqueeze(1), 0.0)

        ctx.set_materialize_grads(False)  # unused outputs give None grads: skip their work
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.negate = negate
        ctx.save_for_backward(hidden, weight, bias, tokens, valid, lse, entropy)
        if logprobs is None:
            return None, entropy
        if entropy is None:
            return logprobs, None
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, tokens, valid, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        no_grads = (None,) * 8
        if not (need_hidden or need_weight or need_bias):
            return no_grads
        if tokens is None:
            grad_logprobs = None
        if entropy is None:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return no_grads

        n, d = hidden.shape
        compute_dtype = ctx.compute_dtype
        stat_dtype = _stat_dtype(compute_dtype)
        device = hidden.device
        multi_chunk = n > ctx.chunk_size

        with _no_autocast(device.type):
            w = weight.to(compute_dtype)
            b = bias.to(stat_dtype) if bias is not None else None
            if grad_logprobs is not None:
                grad_logprobs = grad_logprobs.to(stat_dtype)
                if ctx.negate:
                    grad_logprobs = grad_logprobs.neg()
                if valid is not None:
                    grad_logprobs = grad_logprobs.masked_fill(~valid.unsqueeze(1), 0.0)
                grad_lp_sum = grad_logprobs.sum(dim=1)
            if grad_entropy is not None:
                grad_entropy = grad_entropy.to(stat_dtype)

            grads = _ProjectionGrads(
                hidden, weight, (need_hidden, need_weight, need_bias), compute_dtype, stat_dtype, multi_chunk
            )

            for start, end in _chunks(n, ctx.chunk_size):
                hidden_chunk = hidden[start:end].to(compute_dtype)
                log_p = _chunk_logits(hidden_chunk, w, b, stat_dtype).sub_(lse[start:end].unsqueeze(1))
                grad_logits = log_p.exp()  # softmax probabilities p, turned into d(loss)/d(logits)
                if grad_entropy is not None:
                    # dH/dz = -p * (log p + H);  d(log p_t)/dz = onehot(t) - p
                    coef = log_p.add_(entropy[start:end].unsqueeze(1)).mul_(-grad_entropy[start:end].unsqueeze(1))
                    if grad_logprobs is not None:
                        coef.sub_(grad_lp_sum[start:end].unsqueeze(1))
                    grad_logits.mul_(coef)
                    del coef
                else:
                    grad_logits.mul_(grad_lp_sum[start:end].unsqueeze(1).neg())
                del log_p
                if grad_logprobs is not None:
                    grad_logits.scatter_add_(1, tokens[start:end], grad_logprobs[start:end])

                grads.add_bias(grad_logits)
                grad_logits_c = grad_logits.to(compute_dtype)
                del grad_logits
                grads.add(grad_logits_c, hidden_chunk, w, start, end)
                del grad_logits_c, hidden_chunk

        return (*grads.result(weight, bias), None, None, None, None, None)


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    tokens: Tensor | None = None,
    valid: Tensor | None = None,
    negate: bool = False,
    want_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Chunked log-probabilities of ``tokens`` and/or entropy under ``softmax(hidden @ weight.T + bias)``.

    Flat, low-level entry point of the torch backend; see :func:`lightning_tokens.ops.linear_logprobs`
    and friends for the shape-aware public API.

    Args:
        hidden: ``(N, D)`` hidden states.
        weight: ``(V, D)`` output projection.
        bias: ``(V,)`` bias or ``None``.
        tokens: ``(N, K)`` int64 token ids whose log-probabilities to return, or ``None``.
        valid: ``(N,)`` bool mask; rows that are ``False`` get log-prob 0 and no gradient.
        negate: Return ``-logprobs`` (the NLL) instead, with ``+0.0`` at invalid rows.
        want_entropy: Also return the per-token entropy.
        chunk_size: Tokens per chunk, default :func:`default_chunk_size`.

    Returns:
        ``(logprobs, entropy)``: ``(N, K)`` and ``(N,)`` float32 tensors (float64 for float64
        inputs), each ``None`` when not requested.

    Example:
        >>> h, w = torch.randn(5, 8), torch.randn(11, 8)
        >>> lp, ent = linear_token_stats(h, w, tokens=torch.zeros(5, 1, dtype=torch.long), want_entropy=True)
        >>> lp.shape, ent.shape
        (torch.Size([5, 1]), torch.Size([5]))
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if tokens is None and not want_entropy:
        raise ValueError("nothing to compute: pass tokens and/or want_entropy=True")
    return _LinearTokenStats.apply(
        hidden, weight, bias, tokens, valid, bool(negate), bool(want_entropy), int(chunk_size)
    )
