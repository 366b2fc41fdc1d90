"""Divergences between next-token distributions, as pure functions over log-probabilities ``(..., V)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError

__all__ = ["js_divergence", "top_k_overlap", "truncate_logprobs"]


def truncate_logprobs(logp: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution a top-k / top-p sampler draws from: tokens outside the kept set get ``-inf`` and
    the rest are renormalised (``top_k=0`` and ``top_p=1`` keep everything).

    Top-p keeps the smallest set of most probable tokens whose mass reaches ``top_p`` (the token that
    crosses it included), as Hugging Face's sampler does.

    Example:
        >>> truncate_logprobs(torch.tensor([0.5, 0.3, 0.2]).log(), top_p=0.7).exp()
        tensor([0.6250, 0.3750, 0.0000])
    """
    if top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1].")
    logp = torch.log_softmax(logp.float(), dim=-1)
    if top_k and top_k < logp.shape[-1]:
        threshold = logp.topk(top_k, dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < threshold, -math.inf)
    if top_p < 1:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        drop_sorted = mass_before >= top_p  # the mass before this token already reached top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = logp.masked_fill(drop, -math.inf)
    return torch.log_softmax(logp, dim=-1)


def js_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen–Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = (p + q)/2``, in nats, over the last dim.

    Bounded in ``[0, ln 2]`` and defined when ``p`` and ``q`` have different supports (``-inf`` entries,
    as truncated samplers give), unlike KL. Computed in float64.

    Example:
        >>> p, q = torch.tensor([0.7, 0.2, 0.1]).log(), torch.tensor([0.2, 0.7, 0.1]).log()
        >>> round(js_divergence(p, q).item(), 6)
        0.147097
    """
    if logp.shape != logq.shape:
        raise ConfigError(f"the two distributions have shapes {tuple(logp.shape)} and {tuple(logq.shape)}.")
    logp, logq = logp.double(), logq.double()
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    p, q = logp.exp(), logq.exp()
    # p·(log p − log m) is 0 where p = 0: mask instead of computing 0·(−inf)
    kl_pm = torch.where(p > 0, p * (logp - logm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (logq - logm), torch.zeros_like(q)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0)


def top_k_overlap(logp: Tensor, logq: Tensor, k: int = 5) -> Tensor:
    """The share of the ``k`` most probable tokens the two distributions have in common, in ``[0, 1]``.

    Example:
        >>> top_k_overlap(torch.tensor([0.5, 0.3, 0.2, 0.0]).log(), torch.tensor([0.1, 0.3, 0.6, 0.0]).log(), k=2)
        tensor(0.5000)
    """
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1.")
    k = min(k, logp.shape[-1])
    top_p, top_q = logp.topk(k, dim=-1).indices, logq.topk(k, dim=-1).indices
    shared = (top_p.unsqueeze(-1) == top_q.unsqueeze(-2)).any(-1).sum(-1)
    return shared.float() / k
