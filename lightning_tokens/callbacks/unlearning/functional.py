"""The WHP arithmetic on tensors (no Lightning): generic logits, the generic targets read from them, and the
cross-entropy to soft targets kept as their top-k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError

__all__ = ["generic_logits", "generic_targets_from_logits", "soft_target_loss"]


def generic_logits(v_base: Tensor, v_reinforced: Tensor, alpha: float = 5.0) -> Tensor:
    r"""The paper's Eq. 1: :math:`v_\mathrm{base} - \alpha\,\mathrm{ReLU}(v_\mathrm{reinforced} - v_\mathrm{base})`.

    Logits the reinforced model raised above the baseline's are pushed down by ``alpha`` times the
    rise; the others keep the baseline's value. Works on any shape (the vocabulary last) and keeps the
    dtype of the inputs.

    Example:
        >>> generic_logits(torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([4.0, 0.5, 0.5, 1.0]))
        tensor([ -8.0000,   1.0000,   0.5000, -11.0000])
    """
    if alpha < 0:
        raise ConfigError(f"alpha={alpha} must be >= 0.")
    return v_base - alpha * torch.relu(v_reinforced - v_base)


def generic_targets_from_logits(
    v_base: Tensor,
    v_reinforced: Tensor,
    alpha: float = 5.0,
    top_k: int | None = None,
    lowered: Sequence[Sequence[int]] | None = None,
    seen_penalty: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Generic targets of ``N`` positions from the two models' logits.

    Args:
        v_base: ``(N, V)`` baseline logits (on the translated text, at the mapped positions).
        v_reinforced: ``(N, V)`` reinforced logits (on the original text).
        alpha: the coefficient of :func:`generic_logits`.
        top_k: also return the ``top_k`` most likely ids of ``softmax(v_generic)`` and their probabilities.
        lowered: per position, token ids whose generic logit is lowered by ``seen_penalty`` (translations
            of anchored terms already in the context).
        seen_penalty: how much those logits are lowered.

    Returns:
        ``(labels (N,), topk_ids (N, k) | None, topk_probs (N, k) | None)``: the argmax of the generic
        logits (the first maximal id on ties) and, with ``top_k``, the soft targets (probabilities of the
        full softmax, not renormalised), in float32.

    Example:
        >>> labels, ids, probs = generic_targets_from_logits(
        ...     torch.tensor([[2.0, 1.0, 0.5, -1.0]]), torch.tensor([[4.0, 0.5, 0.5, 1.0]]), top_k=2)
        >>> labels.tolist(), ids.tolist(), [round(p, 4) for p in probs[0].tolist()]
        ([1], [[1, 2]], [0.6224, 0.3775])
    """
    v = generic_logits(v_base.float(), v_reinforced.float(), alpha)
    if lowered is not None and seen_penalty:
        v = v.clone()
        for row, ids in enumerate(lowered):
            if ids:
                v[row, list(ids)] -= seen_penalty
    labels = v.argmax(-1)
    if top_k is None:
        return labels, None, None
    probs = torch.softmax(v, dim=-1)
    values, ids = probs.topk(min(top_k, v.shape[-1]), dim=-1)
    return labels, ids, values


def soft_target_loss(logprobs: torch.Tensor, probs: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
    r"""Cross-entropy to soft targets kept as their top-k: :math:`-\sum_k \tilde p_k \log q_\theta(i_k)`.

    Args:
        logprobs: ``(..., k)`` the model's log-probabilities of the target ids.
        probs: ``(..., k)`` the targets' probabilities (all 0 where there is no target).
        renormalize: divide ``probs`` by their sum, so they form a distribution over the ``k`` ids (the
            mass outside the top-k is dropped); ``False`` keeps the truncated full-softmax values.

    Example:
        >>> q = torch.log(torch.tensor([[0.5, 0.25]]))
        >>> round(soft_target_loss(q, torch.tensor([[0.6, 0.2]])).item(), 6)  # -(0.75 log .5 + .25 log .25)
        0.866434
    """
    p = probs.float()
    if renormalize:
        p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    return -(p * logprobs.float()).sum(-1)

