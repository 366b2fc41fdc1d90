"""Divergence-weighted advantages ("Sparse but Critical", arXiv 2603.22446, §10) as a post-forward token
method for :class:`~lightning_tokens.GRPO`: the advantage of each sampled token is multiplied by
``w_t = 1 + s·(σ(α·KL_t) − ½)``, with ``KL_t`` the k3 estimate of ``KL(π_old ‖ π_θ)`` at that token."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.stats import TokenStats
from lightning_tokens.rl.advantages import divergence_weights
from lightning_tokens.rl.losses import kl_penalty


class DivergenceWeightedAdvantage(TokenMethod):
    """Reweights GRPO's per-token advantages by how far the policy moved at each token since sampling.

    ``α > 0`` ("high-KL boost") raises the weight of the tokens where ``π_θ`` left ``π_old`` most, the
    sparse positions the paper finds responsible for RLVR's gains; ``α < 0`` does the opposite. The weights
    are detached and lie in ``[1 − s/2, 1 + s/2]``.

    ``KL_t`` is 0 on a rollout's first update (``π_θ = π_old``), so the weighting acts only with
    ``GRPO(num_iterations > 1)``, from the second update of each rollout on, as in the paper's DAPO runs.
    It reads ``stats.batch["old_logp"]``, which ``GRPO`` provides.

    Args:
        scale: ``s`` in ``[0, 2]``.
        alpha: ``α``, the sigmoid's slope; its sign chooses the boosted tokens.

    Example::

        model = GRPO(..., num_iterations=2)
        trainer = L.Trainer(callbacks=[DivergenceWeightedAdvantage(scale=1.0, alpha=10.0)])
    """

    def __init__(self, scale: float = 1.0, alpha: float = 10.0) -> None:
        divergence_weights(torch.zeros(1), scale, alpha)  # validates both, naming the argument
        self.scale = scale
        self.alpha = alpha

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not hasattr(pl_module, "rollout"):
            raise ConfigError(
                f"{self.name} reweights policy-gradient advantages; {type(pl_module).__name__} has none: use it with "
                "lightning_tokens.GRPO."
            )

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        old_logp = stats.batch.get("old_logp")
        if old_logp is None:
            raise RuntimeError(f"{self.name} found no batch['old_logp']: it runs under GRPO, which provides it.")
        logp = -stats.nll.detach()
        kl = kl_penalty(old_logp.detach(), logp, "low_var_kl")
        weights = torch.where(stats.mask, divergence_weights(kl, self.scale, self.alpha), torch.ones_like(kl))
        active = stats.mask.sum().clamp(min=1)
        logs = {
            "mean_weight": (weights * stats.mask).sum() / active,
            "mean_kl": (kl * stats.mask).sum() / active,
        }
        return TokenMethodOutput(weights=weights, logs=logs)
