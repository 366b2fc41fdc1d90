"""STAR-DSS arithmetic: chunk prefixes, per-token chunk values and the loss terms (pure tensor functions)."""

from __future__ import annotations

import math
from typing import Literal

import torch  # noqa: F401 - the doctests use it
from torch import Tensor

from lightning_tokens.core.errors import ConfigError

ChunkPrefix = Literal["chunk_end", "chunk_start"]

# A token whose V is exactly 0 still carries its KL term: its weight is floored here so that the
# pipeline (which drops zero-weight tokens from the loss and from N) keeps it. 1e-30 · CE vanishes next
# to any other term in float32, so the loss is the formula's to the last bit.
_WEIGHT_FLOOR = 1e-30


def chunk_prefix_lengths(response_length: int, chunk_size: int, chunk_prefix: ChunkPrefix = "chunk_end") -> list[int]:
    """Length (in response tokens) of the prefix the guardrail reads for each chunk.

    ``chunk_end`` (the paper's STAR): chunk ``k`` (1-based) is scored on ``y_{1:min(kM, T)}``, the prefix
    ending at the chunk's end. ``chunk_start``: on ``y_{1:(k-1)M}``, the prefix *before* the chunk (a
    causal reading in which a chunk is judged before it is seen; the first chunk gets the empty response).

    Example:
        >>> chunk_prefix_lengths(12, 5), chunk_prefix_lengths(12, 5, "chunk_start")
        ([5, 10, 12], [0, 5, 10])
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}.")
    if chunk_prefix not in ("chunk_end", "chunk_start"):
        raise ConfigError(f"chunk_prefix must be 'chunk_end' or 'chunk_start', got {chunk_prefix!r}.")
    chunks = math.ceil(response_length / chunk_size)
    if chunk_prefix == "chunk_end":
        return [min(k * chunk_size, response_length) for k in range(1, chunks + 1)]
    return [(k - 1) * chunk_size for k in range(1, chunks + 1)]


def chunk_weights(chunk_scores: Tensor, response_length: int, chunk_size: int) -> Tensor:
    """Per-token ``V`` of a response from its chunk scores: token ``j`` (0-based) gets ``chunk_scores[j // M]``.

    Args:
        chunk_scores: ``(..., K)`` scores with ``K = ceil(T / M)``.
        response_length: ``T``, the number of response tokens.
        chunk_size: ``M``.

    Returns:
        ``(..., T)`` tensor of the same dtype.

    Example:
        >>> chunk_weights(torch.tensor([0.95, 0.20, 0.60], dtype=torch.float64), 12, 5).tolist() == [0.95] * 5 + [0.2] * 5 + [0.6] * 2
        True
        >>> chunk_weights(torch.tensor([1.0, 0.5]), 7, 4)
        tensor([1.0000, 1.0000, 1.0000, 1.0000, 0.5000, 0.5000, 0.5000])
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}.")
    expected = math.ceil(response_length / chunk_size)
    if chunk_scores.shape[-1] != expected:
        raise ConfigError(
            f"a response of {response_length} tokens in chunks of {chunk_size} has {expected} chunks, "
            f"got {chunk_scores.shape[-1]} chunk scores."
        )
    return chunk_scores.repeat_interleave(chunk_size, dim=-1)[..., :response_length]


def star_dss_terms(
    v: Tensor, kl: Tensor, lam: float, data_weights: Tensor | None = None, scale: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """The pipeline's view of STAR-DSS: ``(weights, extra_loss)`` such that ``weights·CE + extra_loss``
    is ``data_weights · scale · [V·CE + (1 − V)·λ·KL]`` per token.

    ``weights = max(V, 1e-30) · scale`` (detached) and ``extra_loss = data_weights·scale·(1 − V)·λ·KL``
    (differentiable through ``kl``); the data weights are left out of ``weights`` because the pipeline
    multiplies them in itself. The floor keeps a token with ``V = 0`` in the pipeline's kept set (a zero
    weight would drop its KL term too) and changes no float32 sum.

    Example:
        >>> w, extra = star_dss_terms(torch.tensor([1.0, 0.25, 0.0]), torch.tensor([0.3, 0.3, 0.3]), 2.0)
        >>> w, extra
        (tensor([1.0000e+00, 2.5000e-01, 1.0000e-30]), tensor([0.0000, 0.4500, 0.6000]))
    """
    v = v.detach().float()
    extra = (1.0 - v) * lam * kl
    if data_weights is not None:
        extra = extra * data_weights
    weights = v.clamp(min=_WEIGHT_FLOOR)
    return weights * scale, extra * scale


def star_dss_loss(ce: Tensor, kl: Tensor, v: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """The STAR-DSS loss, token mean: ``Σ_mask [V·CE + (1 − V)·λ·KL] / |mask|``.

    Args:
        ce: per-token cross-entropy (NLL of the label).
        kl: per-token ``KL(π_θ ‖ π_ref)`` (or any per-token divergence).
        v: per-token STAR value ``V`` in ``[0, 1]`` (see :func:`chunk_weights`).
        lam: ``λ_KL``.
        mask: which tokens count (default: all).

    Example (specs/text_methods.md §4 (f): T=12, M=5, STAR [0.95, 0.20, 0.60], CE ≡ 2, KL ≡ 0.3, λ=1):
        >>> v = chunk_weights(torch.tensor([0.95, 0.20, 0.60], dtype=torch.float64), 12, 5)
        >>> round(float(star_dss_loss(torch.full((12,), 2.0), torch.full((12,), 0.3), v, 1.0)), 6)
        1.284583
    """
    per_token = v * ce + (1.0 - v) * lam * kl
    if mask is None:
        return per_token.mean()
    mask = mask.bool()
    return per_token[mask].sum() / mask.sum().clamp(min=1)
