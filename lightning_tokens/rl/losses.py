"""The PPO/GRPO clipped surrogate, its loss aggregations and the KL penalty estimators, as pure functions.

They follow verl's ``verl/trainer/ppo/core_algos.py`` (``compute_policy_loss_vanilla``, ``agg_loss``,
``kl_penalty``; read at commit b178a3c, January 2026) function by function; TRL's ``GRPOTrainer._compute_loss``
(``trl/trainer/grpo_trainer.py`` @ f2cd577) is the second reference, for its ``loss_type`` names. Every
tensor is ``(B, T)``: B sequences (responses) of T response positions, with a 0/1 ``mask`` of the tokens
that count. Values at masked positions never reach a result, not even a NaN.

Where the two references and this module differ (each default is ours):

* **Dual clip.** verl always applies the dual-clip bound (``clip_ratio_c=3.0``) to negative advantages;
  TRL only when ``delta`` is set (its ``delta`` caps the ratio, which gives the same values and gradients
  as verl's dual clip with ``c = delta`` whenever ``delta > 1 + clip_high``). Here it is off by default
  (``dual_clip=None``, TRL's default); pass ``dual_clip=3.0`` for verl's.
* **Ratio clamp.** verl clamps ``log π − log π_old`` to ±20 before ``exp`` (the ratio's gradient is 0
  beyond); TRL does not. We clamp, like verl.
* **Empty masks.** verl's ``token-mean`` and seq-mean modes divide 0 by 0 (NaN) when nothing is kept and
  add 1e-8 to per-sequence token counts; here an empty divisor counts as 1 (the loss is 0) and token
  counts are used as they are.
* **Aggregation names.** :data:`TRL_LOSS_TYPES` maps TRL's names to verl's modes and spells out where
  the normalisers differ; :func:`aggregate` accepts both kinds of names, and a TRL name computes TRL's
  own formula for one micro-batch on one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl._checks import check_choice, check_finite, check_ndim, check_same_shape, float_tensor

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "TRL_LOSS_TYPES",
    "PolicyLossStats",
    "TrlLossType",
    "aggregate",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "policy_loss_per_token",
]

#: verl's ``loss_agg_mode`` values.
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

#: verl's ``kl_penalty`` names (``k1``/``k2``/``k3`` are its aliases); a ``+`` suffix (``"k3+"``,
#: ``"low_var_kl+"``, ``"kl+"``, ``"abs+"``) keeps the value and takes the gradient of ``k2``.
KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")

#: The clamp verl puts on log-ratios before ``exp`` (policy ratio and ``k3``).
LOG_RATIO_CLAMP = 20.0
#: The clamp verl puts on the ``k3`` value.
K3_CLAMP = 10.0


class TrlLossType(NamedTuple):
    """How one TRL ``GRPOConfig.loss_type`` relates to verl's aggregation modes."""

    agg: str
    """The verl mode (:data:`AGG_MODES`) that computes the same thing, or the nearest one."""
    notes: str
    """Exactly where the two normalisers differ."""


#: TRL's ``loss_type`` names for the clipped surrogate (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``) → the verl
#: aggregation mode and the differences. TRL adds its ``beta``-weighted k3 KL to the per-token loss *before*
#: aggregating; verl aggregates it separately with the same mode. Both are the same sum, since aggregation
#: is linear. TRL 1.16 multiplies that k3 by the ratio ``π/π_old`` by default (``use_bias_correction_kl=True``),
#: which changes the gradient even on-policy; verl and this library add plain k3 (TRL with
#: ``use_bias_correction_kl=False``; tests/modules/test_grpo_trl.py checks both). Every TRL mode except ``dapo``
#: divides each micro-batch loss by the gradient accumulation steps.
TRL_LOSS_TYPES: dict[str, TrlLossType] = {
    "grpo": TrlLossType(
        "seq-mean-token-mean",
        "Same value whenever every sequence keeps at least one token. TRL divides each sequence's token sum "
        "by max(count, 1) and averages over all B rows, so a fully masked row counts in the batch mean as a "
        "0. verl divides by count + 1e-8 and averages over the rows that keep a token. Under gradient "
        "accumulation, TRL and verl's legacy actor (1/accumulation steps) give the mean of the per-micro-batch "
        "means, which is the global sequence mean only when micro-batches hold equally many sequences. verl's "
        "engine path divides by global_batch_size / dp_size instead, which gives the exact global mean. Here, "
        "pass num_seqs = global sequence count / world size for that.",
    ),
    "bnpo": TrlLossType(
        "token-mean",
        "Same value: the token sum over the micro-batch divided by its kept-token count (TRL clamps the "
        "count at 1). Under gradient accumulation, or on several processes, this is the mean of per-micro-batch "
        "token means, not the global token mean. That is verl's token-mean without batch_num_tokens "
        "(aggregate(..., num_tokens=None)).",
    ),
    "dapo": TrlLossType(
        "token-mean",
        "On one process with one micro-batch, the same value as bnpo and token-mean. The normaliser is "
        "global: TRL divides the micro-batch token sum by num_items_in_batch / num_processes, the kept tokens "
        "of the whole accumulation window on all processes. TRL skips the division by the accumulation "
        "steps, and DDP averages over processes. The result is the exact global token mean. verl's "
        "token-mean does the same with batch_num_tokens and dp_size (sum / batch_num_tokens * dp_size). "
        "Here, pass num_tokens = global kept tokens / world size.",
    ),
    "dr_grpo": TrlLossType(
        "seq-mean-token-sum-norm",
        "Differ by a factor B. TRL divides the micro-batch token sum by B * max_completion_length, with B "
        "the micro-batch's sequence count. verl's seq-mean-token-sum-norm divides only by "
        "loss_scale_factor (the padded response length when unset), so its value is B times TRL's, "
        "despite the name; its actor then multiplies by 1/gradient-accumulation. aggregate(..., "
        "'dr_grpo', max_len=L) computes TRL's value; aggregate(..., 'seq-mean-token-sum-norm', max_len=L) "
        "computes verl's. With Adam the factor only rescales the gradient, but that matters under "
        "gradient clipping. The Dr. GRPO paper also turns off the std normalisation "
        "(group_advantages(..., norm_by_std=False)), which TRL controls by scale_rewards.",
    ),
}

_TRL_NAMES = tuple(TRL_LOSS_TYPES)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is non-zero (0 when none is).

    Example:
        >>> masked_mean(torch.tensor([[1.0, 2.0, float("nan")]]), torch.tensor([[1, 1, 0]]))
        tensor(1.5000)
    """
    mask = mask.to(values.dtype) if values.is_floating_point() else mask.float()
    total = _masked_sum(values, mask)
    count = mask.sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ values·mask``, with masked positions replaced by 0 first (a NaN in the padding stays out)."""
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    product = kept * mask
    return product.sum() if dim is None else product.sum(dim)


def _nonzero(count: Tensor) -> Tensor:
    return torch.where(count > 0, count, torch.ones_like(count))


def _check_pair(name: str, tensor: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    check_ndim(name, tensor, (2,), "(B, T)")
    mask = mask if isinstance(mask, Tensor) else torch.as_tensor(mask)
    check_same_shape("mask", mask, name, tensor)
    return tensor, mask.to(tensor.dtype)


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    max_len: int | None = None,
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduces a ``(B, T)`` per-token loss to a scalar, as verl's ``agg_loss`` (or TRL's loss types) do.

    With ``ℓ`` the loss, ``m`` the 0/1 mask, ``n_i = Σ_t m_it`` and ``S`` the number of sequences with
    ``n_i > 0``:

    * ``"token-mean"``: ``Σ_it ℓ·m / N``, with ``N = num_tokens`` or ``Σ n_i`` (the DAPO/TRL-``bnpo`` mean).
    * ``"seq-mean-token-sum"``: ``Σ_i (Σ_t ℓ·m) / S'``, with ``S' = num_seqs`` or ``S``.
    * ``"seq-mean-token-mean"``: ``Σ_i (Σ_t ℓ·m / n_i) / S'`` (the original GRPO).
    * ``"seq-mean-token-sum-norm"``: ``Σ_it ℓ·m / L``, with ``L = max_len`` or ``T``. This is verl's
      Dr. GRPO mode and its ``loss_scale_factor``: the constant keeps every response token's weight
      independent of its response's length *and* of the batch's padding, which is the point of Dr. GRPO.
      Pass the generation limit (``max_response_length``) as ``max_len``. The default ``T`` (verl's
      default too) changes with the longest response of each batch. Like verl, it does **not** divide
      by the number of sequences; TRL's ``"dr_grpo"`` does (see :data:`TRL_LOSS_TYPES`).

    The TRL names compute TRL's formula for one micro-batch: ``"grpo"``
    ``mean_i(Σ_t ℓ·m / max(n_i, 1))`` over all B rows; ``"bnpo"`` ``Σ ℓ·m / max(Σ n_i, 1)``; ``"dapo"``
    the same with ``num_tokens`` as the divisor when given (TRL's ``num_items_in_batch / num_processes``);
    ``"dr_grpo"`` ``Σ ℓ·m / (B·L)``.

    Under data parallelism, ``num_tokens`` / ``num_seqs`` turn the local means into exact global ones.
    Pass the global count divided by the world size: DDP averages gradients over the ranks. That matches
    verl's ``batch_num_tokens / dp_size`` and ``global_batch_size / dp_size``.

    Args:
        loss_mat: ``(B, T)`` per-token losses.
        mask: ``(B, T)`` 0/1 mask of the tokens that count.
        mode: one of :data:`AGG_MODES` or a key of :data:`TRL_LOSS_TYPES`.
        max_len: the constant ``L`` of ``"seq-mean-token-sum-norm"`` and ``"dr_grpo"``; ``None`` means ``T``.
        num_tokens: the token-mean divisor (``"token-mean"``, ``"dapo"``) instead of the local count.
        num_seqs: the seq-mean divisor (``"seq-mean-*"`` but ``-norm``) instead of the local count.

    Returns:
        The scalar loss (0 when nothing is kept).

    Raises:
        ConfigError: unknown ``mode``; ``loss_mat`` not 2-D or ``mask`` of another shape; ``max_len`` < 1.

    Example:
        >>> loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
        >>> [round(aggregate(loss, mask, m).item(), 4) for m in AGG_MODES]
        [2.5, 5.0, 3.0, 3.3333]
        >>> round(aggregate(loss, mask, "dr_grpo", max_len=3).item(), 4)  # verl's value / B
        1.6667
    """
    mode = check_choice("mode (agg)", mode, AGG_MODES + _TRL_NAMES)
    loss_mat, mask = _check_pair("loss_mat", float_tensor("loss_mat", loss_mat), mask)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ConfigError(f"max_len={max_len!r} must be a positive int (the response-length limit) or None.")
    seq_sums = _masked_sum(loss_mat, mask, dim=-1)  # (B,)
    counts = mask.sum(-1)  # (B,)

    if mode in ("token-mean", "bnpo", "dapo"):
        divisor = counts.sum() if num_tokens is None or mode == "bnpo" else num_tokens
        return seq_sums.sum() / _divisor("num_tokens", divisor, loss_mat)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        per_seq = seq_sums if mode == "seq-mean-token-sum" else seq_sums / _nonzero(counts)
        kept = (counts > 0).to(loss_mat.dtype)
        divisor = kept.sum() if num_seqs is None else num_seqs
        return (per_seq * kept).sum() / _divisor("num_seqs", divisor, loss_mat)
    if mode == "grpo":
        return (seq_sums / counts.clamp(min=1.0)).mean() if loss_mat.shape[0] else seq_sums.sum()
    length = loss_mat.shape[-1] if max_len is None else max_len
    if mode == "seq-mean-token-sum-norm":
        return seq_sums.sum() / max(length, 1)
    return seq_sums.sum() / max(loss_mat.shape[0] * length, 1)  # dr_grpo


def _divisor(name: str, value: float | Tensor, like: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        if check_finite(name, value) <= 0:
            raise ConfigError(f"{name}={value!r} must be > 0 (a token or sequence count), or None for the local count.")
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    value = value.to(dtype=like.dtype, device=like.device)
    return _nonzero(value)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from the log-probabilities of tokens sampled from ``π``.

    With ``δ = logp − ref_logp`` (Schulman, "Approximating KL divergence", 2020):

    * ``"kl"`` / ``"k1"``: ``δ`` (unbiased, high variance, can be negative).
    * ``"abs"``: ``|δ|``.
    * ``"mse"`` / ``"k2"``: ``δ²/2`` (its gradient is the KL's gradient in expectation).
    * ``"low_var_kl"`` / ``"k3"``: ``e^{−δ} + δ − 1 ≥ 0`` (unbiased, low variance). As in verl, ``−δ`` is
      clamped to ±20 before ``exp`` and the result to ±10.
    * a ``+`` suffix (e.g. ``"k3+"``): the value of the named estimator with the gradient of ``k2``
      (verl's straight-through option).

    Args:
        logp: log-probabilities under the policy that sampled the tokens (any shape).
        ref_logp: log-probabilities of the same tokens under the reference (same shape).
        kind: the estimator, one of :data:`KL_KINDS`, optionally with ``+``.

    Returns:
        The per-token estimate, shaped like ``logp``.

    Raises:
        ConfigError: unknown ``kind``; shapes differ.

    Example:
        >>> kl_penalty(torch.tensor([-1.0]), torch.tensor([-1.2]), "low_var_kl")
        tensor([0.0187])
    """
    kinds = KL_KINDS + tuple(k + "+" for k in KL_KINDS)
    kind = check_choice("kind", kind, kinds)
    logp, ref_logp = float_tensor("logp", logp), float_tensor("ref_logp", ref_logp)
    check_same_shape("ref_logp", ref_logp, "logp", logp)
    value = _kl_forward(logp, ref_logp, kind.rstrip("+"))
    if not kind.endswith("+") or kind.rstrip("+") in ("mse", "k2"):
        return value
    k2 = 0.5 * (logp - ref_logp).square()
    return k2 - k2.detach() + value.detach()


def _kl_forward(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    delta = logp - ref_logp
    if kind in ("kl", "k1"):
        return delta
    if kind == "abs":
        return delta.abs()
    if kind in ("mse", "k2"):
        return 0.5 * delta.square()
    neg = (-delta).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log(π_ref / π)
    return (torch.exp(neg) - neg - 1.0).clamp(-K3_CLAMP, K3_CLAMP)


@dataclass(frozen=True)
class PolicyLossStats:
    """Detached diagnostics of :func:`policy_loss` (0-d tensors, so reading them does not synchronise)."""

    pg_clipfrac: Tensor
    """Fraction of kept tokens where the clipped term is the larger loss (verl's ``actor/pg_clipfrac``)."""
    ppo_kl: Tensor
    """Masked mean of ``log π_old − log π`` (k1 estimate of ``KL(π_old ‖ π)``; verl's ``actor/ppo_kl``)."""
    pg_clipfrac_lower: Tensor | None = None
    """With ``dual_clip``: fraction of kept tokens with ``A < 0`` where the dual-clip bound is active
    (verl's ``actor/pg_clipfrac_lower``); ``None`` without dual clip."""


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO's clipped surrogate loss per token, aggregated (verl's ``compute_policy_loss_vanilla``).

    With ``r = exp(clamp(logp − old_logp, ±20))`` and advantage ``A``, the per-token loss is
    ``ℓ = max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))`` (``clip_high > clip_low`` is DAPO's
    clip-higher). With ``dual_clip = c``, tokens with ``A < 0`` get ``min(ℓ, −A·c)``, so an arbitrarily
    large ratio cannot drive an unbounded loss (Ye et al. 2020). ``ℓ`` is then reduced by
    :func:`aggregate` with ``agg``.

    Args:
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the policy being trained.
        old_logp: ``(B, T)`` the same under the policy that sampled them (no gradient flows into it).
        advantages: ``(B,)`` per-sequence or ``(B, T)`` per-token advantages (constants).
        mask: ``(B, T)`` 0/1 response mask.
        clip_low: ``ε_low`` in ``[0, 1)``.
        clip_high: ``ε_high`` ≥ 0.
        dual_clip: the dual-clip constant ``c > 1`` (verl uses 3.0 always), or ``None`` for none (TRL's default).
        agg: an aggregation mode of :func:`aggregate` (verl or TRL name).
        max_len: the constant of ``"seq-mean-token-sum-norm"`` / ``"dr_grpo"``.

    Returns:
        ``(loss, stats)``: the scalar loss and :class:`PolicyLossStats`.

    Raises:
        ConfigError: shapes that disagree, clip ranges out of range, ``dual_clip <= 1``, unknown ``agg``.

    Example:
        >>> logp = torch.log(torch.tensor([[0.5, 0.9], [0.3, 0.3]]))
        >>> old = torch.log(torch.tensor([[0.25, 0.9], [0.3, 0.6]]))
        >>> loss, stats = policy_loss(logp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2))
        >>> round(loss.item(), 4), stats.pg_clipfrac.item()  # ratios 2, 1, 1, 0.5: two clipped
        (-0.1, 0.5)
    """
    agg = check_choice("agg", agg, AGG_MODES + _TRL_NAMES)
    losses, stats = policy_loss_per_token(logp, old_logp, advantages, mask, clip_low, clip_high, dual_clip)
    return aggregate(losses, mask, agg, max_len), stats


def policy_loss_per_token(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """The ``(B, T)`` per-token losses of :func:`policy_loss`, before aggregation, and its statistics.

    For callers that reduce the tokens themselves (``GRPO``'s exact token mean over an accumulation window
    and all ranks). Arguments as in :func:`policy_loss`; masked positions may hold any finite value.

    Example:
        >>> logp = torch.log(torch.tensor([[0.5, 0.9]]))
        >>> losses, _ = policy_loss_per_token(logp, logp - 1.0, torch.tensor([1.0]), torch.ones(1, 2))
        >>> losses  # ratios e > 1.2: clipped at -A * 1.2
        tensor([[-1.2000, -1.2000]])
    """
    logp = float_tensor("logp", logp)
    old_logp = float_tensor("old_logp", old_logp)
    logp, mask = _check_pair("logp", logp, mask)
    check_same_shape("old_logp", old_logp, "logp", logp)
    advantages = _per_token_advantages(advantages, logp)
    clip_low = check_finite("clip_low", clip_low)
    clip_high = check_finite("clip_high", clip_high)
    if not 0.0 <= clip_low < 1.0:
        raise ConfigError(
            f"clip_low={clip_low} must lie in [0, 1): the ratio's lower bound 1 - clip_low must stay > 0."
        )
    if clip_high < 0.0:
        raise ConfigError(f"clip_high={clip_high} must be >= 0: the ratio's upper bound is 1 + clip_high.")
    if dual_clip is not None and check_finite("dual_clip", dual_clip) <= 1.0:
        raise ConfigError(f"dual_clip={dual_clip} must be > 1 (verl uses 3.0), or None to turn dual clip off.")

    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        ppo_kl = masked_mean(-log_ratio, mask)
    lower_frac = None
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = advantages < 0
        with torch.no_grad():
            lower_frac = masked_mean(((losses > bound) & negative).to(logp.dtype), mask)
        losses = torch.where(negative, torch.minimum(losses, bound), losses)
    return losses, PolicyLossStats(pg_clipfrac=clipfrac, ppo_kl=ppo_kl, pg_clipfrac_lower=lower_frac)


def _per_token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    advantages = float_tensor("advantages", advantages).detach()
    if advantages.ndim == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.to(like.dtype).unsqueeze(-1)
    if advantages.shape == like.shape:
        return advantages.to(like.dtype)
    raise ConfigError(
        f"advantages has shape {tuple(advantages.shape)}; with logp of shape {tuple(like.shape)} it must be "
        f"({like.shape[0]},) per sequence or {tuple(like.shape)} per token."
    )
