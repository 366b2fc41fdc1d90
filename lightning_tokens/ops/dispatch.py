"""Public fused token ops: shape handling and backend selection.

None of these functions materialise the ``(tokens, vocab)`` logits. Backends:

* ``"torch"``: chunked PyTorch (:mod:`lightning_tokens.ops.chunked`), any device.
* ``"liger"``: Liger-Kernel's Triton fused linear cross-entropy, CUDA only, used for
  :func:`linear_cross_entropy` alone (the other ops always use the torch backend).
* ``"auto"``: Liger for :func:`linear_cross_entropy` on CUDA when ``liger-kernel>=0.8.2`` is
  importable, chunked torch otherwise.

Inputs are already aligned: row ``i`` of ``hidden`` scores ``labels[i]``; nothing is shifted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tokens.ops.chunked import linear_token_stats
from lightning_tokens.ops.liger import LIGER_INSTALL_HINT, liger_linear_cross_entropy, liger_unavailable_reason

__all__ = [
    "BACKENDS",
    "linear_cross_entropy",
    "linear_entropy",
    "linear_logprobs",
    "linear_nll_entropy",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "liger")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_projection(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if hidden.dim() < 1:
        raise ValueError("hidden must have a trailing hidden dimension (..., D)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, D={hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},), got {tuple(bias.shape)}")


def _check_index(name: str, index: Tensor, lead_shape: torch.Size, allow_k: bool) -> None:
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    with_k = allow_k and index.dim() == len(lead_shape) + 1 and index.shape[:-1] == lead_shape
    ok = index.shape == lead_shape or with_k
    if not ok:
        expected = f"{tuple(lead_shape)}" + (f" or {tuple(lead_shape) + ('K',)}" if allow_k else "")
        raise ValueError(f"{name} must have shape {expected} (hidden.shape[:-1]), got {tuple(index.shape)}")


def resolve_backend(backend: str, hidden: Tensor, weight: Tensor) -> str:
    """Pick the backend that :func:`linear_cross_entropy` will use.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"liger"``.
        hidden: Hidden states (device and dtype matter).
        weight: Output projection.

    Returns:
        ``"torch"`` or ``"liger"``.

    Raises:
        ValueError: For an unknown backend name.
        RuntimeError: If ``backend="liger"`` but Liger cannot run (not installed, too old,
            or tensors not on CUDA).

    Example:
        >>> resolve_backend("auto", torch.randn(2, 4), torch.randn(8, 4))
        'torch'
    """
    _check_backend(backend)
    if backend == "torch":
        return "torch"
    on_cuda = hidden.is_cuda and weight.is_cuda
    reason = liger_unavailable_reason() if on_cuda else "tensors are not on a CUDA device"
    if backend == "liger":
        if reason is not None:
            raise RuntimeError(
                f"backend='liger' was requested but Liger cannot be used: {reason}. "
                f"Install it with: {LIGER_INSTALL_HINT}, or pass backend='auto'/'torch'."
            )
        return "liger"
    # auto: Liger needs matching dtypes unless autocast reconciles them.
    same_dtype = hidden.dtype == weight.dtype or (on_cuda and torch.is_autocast_enabled("cuda"))
    return "liger" if reason is None and same_dtype else "torch"


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-token negative log-likelihood of ``labels`` under ``softmax(hidden @ weight.T + bias)``.

    The ``(N, V)`` logits are never materialised. Gradients flow to ``hidden``, ``weight``
    and ``bias`` for any per-token upstream gradient (e.g. ``(nll * w).sum().backward()``).

    Args:
        hidden: ``(..., D)`` hidden states, ``hidden.shape[:-1] == labels.shape``.
        weight: ``(V, D)`` output projection (e.g. the LM head).
        labels: Integer targets, already aligned with ``hidden`` rows.
        bias: Optional ``(V,)`` bias.
        ignore_index: Label value whose positions get NLL 0 and no gradient.
        chunk_size: Tokens per chunk for the torch backend (default: ~256 MiB of float32
            logits per chunk, at most 4096 tokens). Liger picks its own chunking.
        backend: ``"auto"`` (Liger on CUDA when available, else torch), ``"torch"`` or ``"liger"``.

    Returns:
        float32 tensor shaped like ``labels`` (float64 with the torch backend if the inputs
        are float64).

    Example:
        >>> h, w = torch.randn(2, 3, 16, requires_grad=True), torch.randn(50, 16)
        >>> y = torch.tensor([[1, 2, -100], [4, 5, 6]])
        >>> nll = linear_cross_entropy(h, w, y)
        >>> nll.shape, nll[0, 2].item()
        (torch.Size([2, 3]), 0.0)
        >>> (nll * torch.rand(2, 3)).sum().backward()
    """
    _check_projection(hidden, weight, bias)
    _check_index("labels", labels, hidden.shape[:-1], allow_k=False)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if resolve_backend(backend, hidden, weight) == "liger" and flat_labels.numel() > 0:
        nll = liger_linear_cross_entropy(flat_hidden, weight, flat_labels, bias, ignore_index)
        return nll.reshape(labels.shape)
    valid = flat_labels != ignore_index
    tokens = torch.where(valid, flat_labels, 0).long().unsqueeze(1)
    nll, _ = linear_token_stats(flat_hidden, weight, bias, tokens, valid, negate=True, chunk_size=chunk_size)
    return nll.reshape(labels.shape)


def linear_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Per-token entropy of ``softmax(hidden @ weight.T + bias)``, differentiable.

    Always computed by the chunked torch backend (Liger has no per-token entropy kernel);
    ``backend="liger"`` is accepted and means the same. The gradient uses
    ``dH/dz = -p * (log p + H)`` on recomputed chunk logits.

    Args:
        hidden: ``(..., D)`` hidden states.
        weight: ``(V, D)`` output projection.
        bias: Optional ``(V,)`` bias.
        chunk_size: Tokens per chunk (default: ~256 MiB of float32 logits, at most 4096).
        backend: ``"auto"``, ``"torch"`` or ``"liger"`` (all use chunked torch here).

    Returns:
        float32 tensor of shape ``hidden.shape[:-1]`` (in nats).

    Example:
        >>> h, w = torch.randn(4, 16), torch.randn(50, 16)
        >>> linear_entropy(h, w).shape
        torch.Size([4])
        >>> bool(linear_entropy(torch.zeros(1, 16), w).isclose(torch.tensor(50.0).log()))
        True
    """
    _check_backend(backend)
    _check_projection(hidden, weight, bias)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    _, entropy = linear_token_stats(flat_hidden, weight, bias, want_entropy=True, chunk_size=chunk_size)
    return entropy.reshape(hidden.shape[:-1])


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Log-probabilities of the given token ids under ``softmax(hidden @ weight.T + bias)``.

    Always computed by the chunked torch backend; ``backend`` is accepted for uniformity.

    Args:
        hidden: ``(..., D)`` hidden states.
        weight: ``(V, D)`` output projection.
        tokens: Integer ids in ``[0, V)`` of shape ``hidden.shape[:-1]``, or
            ``hidden.shape[:-1] + (K,)`` to score K candidate tokens per position.
        bias: Optional ``(V,)`` bias.
        chunk_size: Tokens per chunk (default: ~256 MiB of float32 logits, at most 4096).
        backend: ``"auto"``, ``"torch"`` or ``"liger"`` (all use chunked torch here).

    Returns:
        float32 tensor with the shape of ``tokens``.

    Example:
        >>> h, w = torch.randn(2, 5, 16), torch.randn(50, 16)
        >>> linear_logprobs(h, w, torch.randint(50, (2, 5, 3))).shape
        torch.Size([2, 5, 3])
    """
    _check_backend(backend)
    _check_projection(hidden, weight, bias)
    _check_index("tokens", tokens, hidden.shape[:-1], allow_k=True)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    k = 1 if tokens.shape == hidden.shape[:-1] else tokens.shape[-1]
    flat_tokens = tokens.reshape(-1, k).long()
    logprobs, _ = linear_token_stats(flat_hidden, weight, bias, flat_tokens, chunk_size=chunk_size)
    return logprobs.reshape(tokens.shape)


def linear_nll_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-token NLL and entropy in one pass (one matmul per chunk), both differentiable.

    Always computed by the chunked torch backend. The entropy is computed for every position,
    including those whose label is ``ignore_index`` (their NLL is 0).

    Args:
        hidden: ``(..., D)`` hidden states, ``hidden.shape[:-1] == labels.shape``.
        weight: ``(V, D)`` output projection.
        labels: Integer targets, already aligned with ``hidden`` rows.
        bias: Optional ``(V,)`` bias.
        ignore_index: Label value whose positions get NLL 0 (and no NLL gradient).
        chunk_size: Tokens per chunk (default: ~256 MiB of float32 logits, at most 4096).
        backend: ``"auto"``, ``"torch"`` or ``"liger"`` (all use chunked torch here).

    Returns:
        ``(nll, entropy)``, two float32 tensors shaped like ``labels``.

    Example:
        >>> h, w = torch.randn(6, 16), torch.randn(50, 16)
        >>> nll, ent = linear_nll_entropy(h, w, torch.randint(50, (6,)))
        >>> nll.shape == ent.shape == (6,)
        True
    """
    _check_backend(backend)
    _check_projection(hidden, weight, bias)
    _check_index("labels", labels, hidden.shape[:-1], allow_k=False)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    tokens = torch.where(valid, flat_labels, 0).long().unsqueeze(1)
    nll, entropy = linear_token_stats(
        flat_hidden, weight, bias, tokens, valid, negate=True, want_entropy=True, chunk_size=chunk_size
    )
    return nll.reshape(labels.shape), entropy.reshape(labels.shape)
