"""Group-relative advantages (GRPO, Dr. GRPO) and their per-token forms, as pure functions.

:func:`group_advantages` follows verl's ``compute_grpo_outcome_advantage``
(``verl/trainer/ppo/core_algos.py`` @ b178a3c), the loop version:

* Each outcome reward is normalised within its group (the responses to one prompt):
  ``A_i = (r_i − mean_g) / (std_g + eps)``.
* ``std_g`` is the *unbiased* standard deviation (``torch.std``, N − 1).
* A group of one response gets ``mean = 0`` and ``std = 1``. Its advantage is therefore
  ``r / (1 + eps)``, not 0, exactly as in the reference.
* ``norm_by_std=False`` gives Dr. GRPO's ``A_i = r_i − mean_g``.

verl's vectorised variant (``grpo_vectorized``) differs in one way. It floors the variance at ``eps``
before the square root, so a group with equal rewards divides by ``sqrt(eps) + eps`` instead of ``eps``.
The numerator is 0 there anyway.

TRL (``GRPOTrainer``, ``scale_rewards="group"``) also uses the unbiased std and ``eps = 1e-4``. It
requires ``num_generations >= 2``, so it has no groups of one.

:func:`divergence_weights` is the divergence-weighted advantage of "Sparse but Critical" (arXiv 2603.22446,
spec §10): ``w_t = 1 + s·(σ(α·KL_t) − ½)``. ``KL_t`` is the per-token k3 estimate of
``KL(π_old ‖ π_θ)`` on the sampled token, and the weights are detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl._checks import check_finite, check_ndim, check_same_shape, float_tensor
from lightning_tokens.rl.losses import kl_penalty

__all__ = ["divergence_weighted_advantages", "divergence_weights", "group_advantages", "token_advantages"]


def _group_index(group_ids: Tensor | Sequence, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Group ids (a tensor, or any sequence of hashable ids such as verl's array of uid strings) →
    ``(index, G)`` with ``index`` in ``0..G-1``."""
    if isinstance(group_ids, Tensor):
        if group_ids.ndim != 1 or group_ids.shape[0] != n:
            raise ConfigError(
                f"group_ids has shape {tuple(group_ids.shape)} but rewards has {n} rows: pass one group id per response."
            )
        _, index = torch.unique(group_ids, return_inverse=True)
        return index.to(device), int(index.max()) + 1 if n else 0
    try:
        ids = list(group_ids)
    except TypeError:
        raise ConfigError(f"group_ids must be a tensor or a sequence of ids, got {type(group_ids).__name__}.") from None
    if len(ids) != n:
        raise ConfigError(f"group_ids has {len(ids)} entries but rewards has {n} rows: pass one group id per response.")
    positions: dict = {}
    try:
        index = [positions.setdefault(i, len(positions)) for i in ids]
    except TypeError:
        raise ConfigError("group_ids must be hashable (ints or strings, one per response).") from None
    return torch.tensor(index, dtype=torch.long, device=device), len(positions)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor | Sequence,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> Tensor:
    """Per-sequence GRPO advantages from outcome rewards, normalised within each group.

    Args:
        rewards: ``(B,)`` outcome rewards. ``(B, T)`` token-level rewards are summed over ``T`` first,
            as in the reference.
        group_ids: ``(B,)`` group of each response: a tensor, or a sequence of hashable ids (e.g.
            prompt uids). Groups need not be contiguous.
        eps: added to the group's standard deviation.
        norm_by_std: ``False`` for Dr. GRPO (no division by the std).

    Returns:
        ``(B,)`` advantages, detached. The dtype is that of ``rewards``, at least float32.

    Raises:
        ConfigError: no rewards; ``group_ids`` of another length; rewards neither ``(B,)`` nor ``(B, T)``.

    Example:
        >>> group_advantages(torch.tensor([1.0, 0.1, 0.0, 1.0, 1.0]), [0, 0, 0, 0, 0])
        tensor([ 0.7286, -0.9971, -1.1888,  0.7286,  0.7286])
        >>> group_advantages(torch.tensor([1.0, 0.0, 0.5]), ["a", "a", "b"], norm_by_std=False)  # "b": a group of one
        tensor([ 0.5000, -0.5000,  0.5000])
    """
    rewards = float_tensor("rewards", rewards)
    check_ndim("rewards", rewards, (1, 2), "(B,) or (B, T)")
    eps = check_finite("eps", eps)
    if eps < 0:
        raise ConfigError(f"eps={eps} must be >= 0 (it is added to the group's standard deviation).")
    if rewards.ndim == 2:
        rewards = rewards.sum(-1)
    n = rewards.shape[0]
    if n == 0:
        raise ConfigError("rewards is empty: group_advantages needs at least one response (one group of one).")
    index, groups = _group_index(group_ids, n, rewards.device)
    with torch.no_grad():
        scores = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
        counts = torch.zeros(groups, dtype=scores.dtype, device=scores.device).index_add_(
            0, index, torch.ones_like(scores)
        )
        sums = torch.zeros_like(counts).index_add_(0, index, scores)
        mean = sums / counts
        centered = scores - mean[index]
        squares = torch.zeros_like(counts).index_add_(0, index, centered.square())
        single = counts == 1
        std = torch.where(single, torch.ones_like(counts), (squares / (counts - 1).clamp(min=1.0)).sqrt())
        mean = torch.where(single, torch.zeros_like(mean), mean)
        centered = scores - mean[index]
        return centered / (std[index] + eps) if norm_by_std else centered


def token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcasts per-sequence advantages over the response tokens: ``A[:, None] · mask`` (``(B, T)``).

    ``(B, T)`` advantages are only masked. The result is the per-token weight that the token-loss
    pipeline multiplies into the policy-gradient term.

    Args:
        advantages: ``(B,)`` or ``(B, T)``.
        mask: ``(B, T)`` 0/1 response mask.

    Raises:
        ConfigError: ``mask`` not 2-D, or ``advantages`` of neither ``(B,)`` nor the mask's shape.

    Example:
        >>> token_advantages(torch.tensor([0.5, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
        tensor([[ 0.5000,  0.5000,  0.0000],
                [-1.0000, -0.0000, -0.0000]])
    """
    advantages = float_tensor("advantages", advantages)
    mask = torch.as_tensor(mask)
    check_ndim("mask", mask, (2,), "(B, T)")
    if advantages.ndim == 1 and advantages.shape[0] == mask.shape[0]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != mask.shape:
        raise ConfigError(
            f"advantages has shape {tuple(advantages.shape)}; with a mask of shape {tuple(mask.shape)} it must be "
            f"({mask.shape[0]},) per sequence or {tuple(mask.shape)} per token."
        )
    return advantages * mask.to(advantages.dtype)


def divergence_weights(kl: Tensor, scale: float = 1.0, alpha: float = 10.0) -> Tensor:
    """Per-token advantage weights ``w_t = 1 + s·(σ(α·KL_t) − ½)``, detached ("Sparse but Critical", §10).

    ``α > 0`` boosts the tokens where the policy moved most ("high-KL boost"); ``α < 0`` boosts the
    others. ``w ∈ [1 − s/2, 1 + s/2]``, and ``w = 1`` where ``KL_t = 0``. The paper's ``s`` and ``α`` were
    not retrieved, so the defaults (``s = 1``, ``α = 10``) are those of the spec's numeric check.

    Args:
        kl: per-token divergences ``KL_t`` (any shape), e.g. from :func:`divergence_weighted_advantages`.
        scale: ``s`` in ``[0, 2]``. Above 2 a weight could turn negative and flip an advantage's sign.
        alpha: ``α``, the sigmoid's slope (its sign chooses which tokens are boosted).

    Raises:
        ConfigError: ``scale`` outside ``[0, 2]`` or a non-finite ``alpha``.

    Example:
        >>> divergence_weights(torch.tensor([0.0, 0.01, 0.1, 1.0]))
        tensor([1.0000, 1.0250, 1.2311, 1.5000])
    """
    scale = check_finite("scale", scale)
    alpha = check_finite("alpha", alpha)
    if not 0.0 <= scale <= 2.0:
        raise ConfigError(f"scale={scale} must lie in [0, 2] so the weights 1 ± scale/2 stay >= 0.")
    kl = float_tensor("kl", kl).detach()
    return 1.0 + scale * (torch.sigmoid(alpha * kl) - 0.5)


def divergence_weighted_advantages(
    advantages: Tensor,
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    scale: float = 1.0,
    alpha: float = 10.0,
) -> Tensor:
    """``Ã_{i,t} = w_t · A_i`` with ``KL_t`` the k3 estimate of ``KL(π_old ‖ π_θ)`` at each sampled token.

    The tokens were sampled from ``π_old``, so k3 uses ``log r = logp − old_logp``:
    ``KL_t = e^{log r} − 1 − log r``. This is ``kl_penalty(old_logp, logp, "low_var_kl")``, clamped to
    ``[0, 10]`` like verl's k3. Everything is detached. On the first step after a rollout
    (``logp = old_logp``), every ``KL_t`` is 0 and every ``w_t`` is 1. The weighting acts only from the
    second PPO mini-batch or epoch of a rollout.

    Args:
        advantages: ``(B,)`` or ``(B, T)`` advantages.
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        old_logp: ``(B, T)`` the same under the sampling (old) policy.
        mask: ``(B, T)`` 0/1 response mask; masked positions come out 0.
        scale: ``s``, see :func:`divergence_weights`.
        alpha: ``α``, see :func:`divergence_weights`.

    Returns:
        ``(B, T)`` weighted per-token advantages.

    Raises:
        ConfigError: shapes that disagree, or the weight parameters (see :func:`divergence_weights`).

    Example:
        >>> logp = torch.tensor([[-1.0, -2.0]])
        >>> divergence_weighted_advantages(torch.tensor([2.0]), logp, logp, torch.ones(1, 2))  # on-policy: w = 1
        tensor([[2., 2.]])
    """
    logp, old_logp = float_tensor("logp", logp), float_tensor("old_logp", old_logp)
    check_ndim("logp", logp, (2,), "(B, T)")
    check_same_shape("old_logp", old_logp, "logp", logp)
    check_same_shape("mask", torch.as_tensor(mask), "logp", logp)
    kl = kl_penalty(old_logp.detach(), logp.detach(), "low_var_kl")
    return token_advantages(advantages, mask).detach() * divergence_weights(kl, scale, alpha)
