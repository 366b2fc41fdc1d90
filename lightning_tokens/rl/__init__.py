"""Pure RL arithmetic (torch only): GRPO advantages, the clipped policy loss and its aggregations, KL
penalties, divergence-weighted advantages and GRAO's objective.

Nothing here knows about modules, callbacks or a trainer; ``modules/`` and ``callbacks/`` build on it.
The reference implementation is verl's ``verl/trainer/ppo/core_algos.py``. TRL's ``GRPOTrainer`` names
are aliases (:data:`TRL_LOSS_TYPES`), with the differences spelled out.

Example:
    >>> import torch
    >>> adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), [0, 0, 1, 1])
    >>> mask = torch.ones(4, 3)
    >>> logp = torch.full((4, 3), -1.0, requires_grad=True)
    >>> loss, stats = policy_loss(logp, logp.detach(), adv, mask, agg="seq-mean-token-mean")
    >>> loss.backward(); stats.pg_clipfrac.item()
    0.0
"""

from lightning_tokens.rl.advantages import (
    divergence_weighted_advantages,
    divergence_weights,
    group_advantages,
    token_advantages,
)
from lightning_tokens.rl.grao import GraoOutput, grao_objective, sequence_log_likelihood
from lightning_tokens.rl.losses import (
    AGG_MODES,
    KL_KINDS,
    TRL_LOSS_TYPES,
    PolicyLossStats,
    TrlLossType,
    aggregate,
    kl_penalty,
    masked_mean,
    policy_loss,
    policy_loss_per_token,
)

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "TRL_LOSS_TYPES",
    "GraoOutput",
    "PolicyLossStats",
    "TrlLossType",
    "aggregate",
    "divergence_weighted_advantages",
    "divergence_weights",
    "grao_objective",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "policy_loss_per_token",
    "sequence_log_likelihood",
    "token_advantages",
]
