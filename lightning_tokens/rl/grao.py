"""GRAO's objective ("Learning to Align, Aligning to Learn", arXiv 2508.07750, Eq. 3; spec §11), as a pure function.

For each query there are ``G`` sampled responses ``o_i`` and one reference answer ``y``. A reward model
scores all of them. The objective to *maximise* is

``J = (1/G) Σ_i [ Â_{o_i}·J_exp(o_i) + β·Â_y·J_imit(y) + λ·Â_{o_i}·(J_exp(o_i) − J_imit(y)) ]``

* ``J_exp(o) = (1/|o|) Σ_t log π_θ(o_t | q, o_<t)`` and ``J_imit(y)`` is the same mean log-likelihood of
  the reference answer. :func:`sequence_log_likelihood` computes both from per-token log-probabilities.
* ``Â = (R − μ)/σ`` within the query's group. The paper computes ``Â_y`` "in one group ``(o_i, y)``", so
  ``y`` always joins the statistics of its own advantage.
* Whether ``y`` also joins the statistics of the ``Â_{o_i}`` is ambiguous; the ``reference_in_group``
  flag chooses. The default ``True`` is the spec's numeric check.
* ``σ`` is the population standard deviation by default, again as in the spec's check.
* The paper has no code, and the prose's list of terms disagrees with Eq. 3; Eq. 3 is used.

There is no KL term. The loss to minimise is ``−J``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl._checks import check_finite, check_ndim, check_same_shape, float_tensor

__all__ = ["GraoOutput", "grao_objective", "sequence_log_likelihood"]


@dataclass(frozen=True)
class GraoOutput:
    """:func:`grao_objective`'s result. The three parts sum to ``objective``; each is averaged over queries."""

    objective: Tensor
    """``J`` (maximise)."""
    loss: Tensor
    """``−J`` (minimise)."""
    exploration: Tensor
    """``(1/G) Σ_i Â_{o_i}·J_exp(o_i)``."""
    imitation: Tensor
    """``β·Â_y·J_imit(y)``."""
    alignment: Tensor
    """``(λ/G) Σ_i Â_{o_i}·(J_exp(o_i) − J_imit(y))``."""
    sample_advantages: Tensor
    """``Â_{o_i}``, shaped like the rewards (detached)."""
    reference_advantage: Tensor
    """``Â_y``, one per query (detached)."""


def sequence_log_likelihood(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean log-likelihood per sequence, ``Σ_t logp·mask / Σ_t mask``: GRAO's ``J_exp`` and ``J_imit``.

    A sequence with no kept token gets 0.

    Args:
        logp: ``(..., T)`` per-token log-probabilities of the given tokens.
        mask: same shape, 0/1.

    Raises:
        ConfigError: shapes differ.

    Example:
        >>> sequence_log_likelihood(torch.tensor([[-1.0, -3.0, -9.0]]), torch.tensor([[1, 1, 0]]))
        tensor([-2.])
    """
    logp = float_tensor("logp", logp)
    mask = torch.as_tensor(mask)
    check_same_shape("mask", mask, "logp", logp)
    mask = mask.to(logp.dtype)
    kept = torch.where(mask.bool(), logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    count = mask.sum(-1)
    return (kept * mask).sum(-1) / torch.where(count > 0, count, torch.ones_like(count))


def _standardise(values: Tensor, members: Tensor, unbiased: bool, eps: float) -> Tensor:
    """``(values − μ)/(σ + eps)`` with ``μ``, ``σ`` over the last dimension of ``members`` (0 where ``σ + eps = 0``)."""
    mean = members.mean(-1, keepdim=True)
    std = members.std(-1, unbiased=unbiased, keepdim=True) + eps
    centered = values - mean
    return torch.where(std > 0, centered / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(centered))


def grao_objective(
    rewards: Tensor,
    reference_reward: Tensor | float,
    exploration: Tensor,
    imitation: Tensor | float,
    beta: float = 0.5,
    lam: float = 0.6,
    reference_in_group: bool = True,
    unbiased: bool = False,
    eps: float = 1e-6,
) -> GraoOutput:
    """GRAO's objective ``J`` (Eq. 3) and its three parts, for one query or a batch of queries.

    Args:
        rewards: ``(G,)`` rewards of the sampled responses of one query, or ``(Q, G)`` for Q queries.
        reference_reward: ``R_y``, a scalar, or ``(Q,)``.
        exploration: ``J_exp(o_i)``, shaped like ``rewards``. These are the differentiable mean
            log-likelihoods of the samples (:func:`sequence_log_likelihood`).
        imitation: ``J_imit(y)``, shaped like ``reference_reward`` (differentiable).
        beta: ``β``, the imitation weight (paper: 0.5).
        lam: ``λ``, the alignment-regulariser weight (paper: 0.6).
        reference_in_group: whether ``R_y`` joins the mean and std of the samples' advantages. ``Â_y``
            always uses the joint group.
        unbiased: the N − 1 standard deviation instead of the population one.
        eps: added to ``σ``. With ``eps = 0``, a group of equal rewards gets advantage 0.

    Returns:
        :class:`GraoOutput`. The advantages are constants: gradients flow only through ``exploration``
        and ``imitation``.

    Raises:
        ConfigError: shapes that disagree, no samples, ``unbiased`` on a group of one, or bad coefficients.

    Example:
        >>> out = grao_objective(torch.tensor([1.0, 0.0, 0.5]), 1.0, torch.tensor([-0.8, -1.5, -1.0]), -1.2)
        >>> round(out.objective.item(), 6)
        0.221108
    """
    rewards = float_tensor("rewards", rewards)
    check_ndim("rewards", rewards, (1, 2), "(G,) or (Q, G)")
    single = rewards.ndim == 1
    rewards = rewards.unsqueeze(0) if single else rewards
    queries, group = rewards.shape
    if group == 0 or queries == 0:
        raise ConfigError(
            f"rewards has shape {tuple(rewards.shape)}: GRAO needs at least one sampled response per query."
        )
    exploration = float_tensor("exploration", exploration)
    exploration = exploration.unsqueeze(0) if single and exploration.ndim == 1 else exploration
    check_same_shape("exploration", exploration, "rewards", rewards)
    ref_reward = _per_query("reference_reward", reference_reward, queries, rewards)
    imitation = _per_query("imitation", imitation, queries, exploration)
    beta, lam, eps = check_finite("beta", beta), check_finite("lam", lam), check_finite("eps", eps)
    if eps < 0:
        raise ConfigError(f"eps={eps} must be >= 0 (it is added to the group's standard deviation).")
    if unbiased and not reference_in_group and group < 2:
        raise ConfigError(
            "unbiased=True needs two or more samples per query without the reference: set unbiased=False."
        )

    with torch.no_grad():
        rewards = rewards.detach()
        ref_reward = ref_reward.detach().to(rewards.dtype)
        joint = torch.cat([rewards, ref_reward], dim=-1)
        sample_adv = _standardise(rewards, joint if reference_in_group else rewards, unbiased, eps)
        ref_adv = _standardise(ref_reward, joint, unbiased, eps)
    sample_adv = sample_adv.to(exploration.dtype)
    ref_adv = ref_adv.to(exploration.dtype)

    explore = (sample_adv * exploration).mean(-1)  # (Q,)
    imitate = beta * ref_adv.squeeze(-1) * imitation.squeeze(-1)
    align = lam * (sample_adv * (exploration - imitation)).mean(-1)
    explore, imitate, align = explore.mean(), imitate.mean(), align.mean()
    objective = explore + imitate + align
    return GraoOutput(
        objective=objective,
        loss=-objective,
        exploration=explore,
        imitation=imitate,
        alignment=align,
        sample_advantages=sample_adv.squeeze(0) if single else sample_adv,
        reference_advantage=ref_adv.reshape(()) if single else ref_adv.squeeze(-1),
    )


def _per_query(name: str, value: Tensor | float, queries: int, like: Tensor) -> Tensor:
    """A scalar or ``(Q,)`` value → ``(Q, 1)``."""
    tensor = float_tensor(name, value).to(device=like.device)
    if tensor.numel() != queries or tensor.ndim > 1:
        expected = "a scalar or (1,)" if queries == 1 else f"({queries},)"
        raise ConfigError(f"{name} has shape {tuple(tensor.shape)}: pass {expected}, one value per query.")
    return tensor.reshape(queries, 1)
