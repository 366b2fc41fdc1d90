r"""
One-Token Rollout
^^^^^^^^^^^^^^^^^

OTR (arXiv 2509.26313, spec §6) treats every labelled position as a one-step episode: ``K`` candidate tokens
are drawn from the tempered policy :math:`\pi'_\theta = \mathrm{softmax}(z_t/\tau)`, each rewarded 1 if it is
the ground truth :math:`x_t` and :math:`\beta` otherwise, and REINFORCE is applied with the reward detached:

.. math::

    \mathcal{L}_t = -\frac{1}{K} \sum_k \operatorname{sg}\big(R(a_k, x_t)\big) \log \pi_\theta(a_k \mid s_t),
    \qquad a_k \sim \pi'_\theta

Its expectation over the draws (``estimator="exact"``, variance-free, the default) is
:math:`-[\pi'(x_t)\log\pi(x_t) + \beta \sum_{a \ne x_t} \pi'(a) \log \pi(a)]` with :math:`\pi'` detached. At
:math:`\tau = 1` its gradient is :math:`-(1-\beta)\,\pi(x_t)\nabla\log\pi(x_t)`: DFT's, scaled.

Both estimators are a weighted log-likelihood over the vocabulary with weights computed from the detached
logits, so each chunk of positions is one matmul; chunks run under activation checkpointing, so no more than
one chunk of ``(tokens × vocab)`` logits exists at a time, in the backward pass too.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import TokenStats

__all__ = ["OneTokenRollout", "otr_loss"]

Estimator = Literal["exact", "sample"]


def _chunk_loss(
    logits: Tensor, targets: Tensor, beta: float, temperature: float, estimator: str, num_samples: int
) -> Tensor:
    log_probs = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        tempered = F.softmax(logits.detach().float() / temperature, dim=-1)
        if estimator == "exact":
            weights = tempered
        else:
            draws = torch.multinomial(tempered, num_samples, replacement=True)
            weights = torch.zeros_like(tempered).scatter_add_(-1, draws, torch.ones_like(draws, dtype=tempered.dtype))
            weights = weights / num_samples
        reward = torch.full_like(weights, beta)
        reward.scatter_(-1, targets.unsqueeze(-1), 1.0)
        weights = weights * reward
    return -(weights * log_probs).sum(-1)


def otr_loss(
    rows: Tensor,
    targets: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    beta: float = -0.1,
    temperature: float = 1.0,
    estimator: Estimator = "exact",
    num_samples: int = 256,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-position OTR loss of ``N`` positions.

    Args:
        rows: ``(N, D)`` hidden states (with ``weight``/``bias``, the output head) or ``(N, V)`` logits.
        targets: ``(N,)`` ground-truth token ids.
        weight: the output head's ``(V, D)`` weight, or ``None`` when ``rows`` are logits.
        bias: the output head's bias.
        beta: the reward of a wrong sample (below 1; the paper uses small negative values).
        temperature: ``τ`` of the sampling policy.
        estimator: ``exact`` (the expectation) or ``sample`` (``num_samples`` draws per position, from the
            global RNG: seed it for reproducibility).
        num_samples: ``K``.
        chunk_size: positions per chunk.

    Returns:
        ``(N,)`` losses, differentiable with respect to ``rows``, ``weight`` and ``bias``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
        >>> round(otr_loss(logits, torch.tensor([0]), beta=-0.1).item(), 6)
        0.179585
        >>> round(otr_loss(logits, torch.tensor([0]), beta=-0.1, temperature=1.5).item(), 6)
        0.094858
    """
    check_choice("otr_loss", "estimator", estimator, ("exact", "sample"))
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0.")
    if not beta < 1:
        raise ConfigError(f"beta={beta} must be < 1: the ground truth's reward (1) must exceed a wrong token's.")
    if num_samples < 1 or chunk_size < 1:
        raise ConfigError(f"num_samples={num_samples} and chunk_size={chunk_size} must be >= 1.")
    losses = []
    for start in range(0, rows.shape[0], chunk_size):
        chunk, chunk_targets = rows[start : start + chunk_size], targets[start : start + chunk_size]

        def run(chunk: Tensor, weight: Tensor | None = weight, bias: Tensor | None = bias, targets: Tensor = chunk_targets) -> Tensor:
            logits = chunk if weight is None else F.linear(chunk, weight, bias)
            return _chunk_loss(logits, targets, beta, temperature, estimator, num_samples)

        if torch.is_grad_enabled() and (chunk.requires_grad or (weight is not None and weight.requires_grad)):
            # recomputed in backward with the same RNG state, so the sampled estimator draws the same tokens
            losses.append(checkpoint(run, chunk, use_reentrant=False, preserve_rng_state=True))
        else:
            losses.append(run(chunk))
    return torch.cat(losses) if losses else rows.new_zeros(0)


class OneTokenRollout(TokenMethod):
    """One-Token Rollout: each labelled token's loss becomes OTR's policy-gradient loss (replaces the NLL).

    Args:
        beta: reward of a sampled token that is not the ground truth (< 1; the paper: small negative).
        temperature: ``τ`` of the sampling policy (the paper: > 1 for exploration).
        estimator: ``exact`` (default: the expectation over the draws, no variance) or ``sample`` (``K``
            draws per position, the paper's Monte Carlo form).
        num_samples: ``K`` (the paper: 256).
        chunk_size: positions per chunk of ``(chunk × vocab)`` logits.
        seed: base seed of the draws (``sample``); step ``s`` draws from ``seed + s``, so a resumed run draws
            what the uninterrupted one would have.

    Example::

        trainer = L.Trainer(callbacks=[OneTokenRollout(beta=-0.1, temperature=1.5)])
    """

    def __init__(
        self, beta: float = -0.1, temperature: float = 1.0, estimator: Estimator = "exact", num_samples: int = 256,
        chunk_size: int = 1024, seed: int = 0,
    ) -> None:
        otr_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), None, None, beta, temperature, estimator,
                 num_samples, chunk_size)  # validates the settings, naming the argument
        self.beta, self.temperature, self.estimator = beta, temperature, estimator
        self.num_samples, self.chunk_size, self.seed = num_samples, chunk_size, seed

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        rows, targets = stats._rows(), stats._targets
        head = stats.head
        step = pl_module.global_step if pl_module._trainer is not None else 0
        devices = [rows.device] if rows.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + step)
            values = otr_loss(
                rows, targets, None if head is None else head.weight, None if head is None else head.bias,
                self.beta, self.temperature, self.estimator, self.num_samples, self.chunk_size,
            )
        loss = stats.scatter(values)
        active = stats.mask.sum().clamp(min=1)
        return TokenMethodOutput(loss=loss, logs={"loss": loss.detach().sum() / active})
