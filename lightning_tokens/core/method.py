"""The two hook points every token method plugs into.

1. **Pre-forward** (:class:`BatchTokenMethod`): a callback that knows something from the data, a
   reference model's offline losses or a guardrail, and writes ``batch["token_weights"]`` (multiplying
   what is already there) or sets labels to ``-100``, in ``on_train_batch_start``. It works with any
   module that honours ``token_weights``; it needs no statistics of the current model.
2. **Post-forward** (:class:`TokenMethod`): a callback that needs the current model's statistics. The
   module (through :class:`~lightning_tokens.core.loss.TokenLossMixin`) builds a
   :class:`~lightning_tokens.core.stats.TokenStats` after its forward and asks every ``TokenMethod`` in
   ``trainer.callbacks``, in callback order, for a :class:`TokenMethodOutput`.

Composition: weights multiply, masks intersect, extra per-token terms add up. At most one method may
replace the per-token loss. The loss reduced is ``Σ (w · loss + extra) / N`` over kept tokens, where
``N`` counts the tokens with a label and a non-zero weight over the accumulation window and all ranks.

Room left in the protocol for the methods that come next (they need no change to this file):
- a reference or history model's statistics arrive as ``stats.reference`` (set by a provider before
  methods run); methods declaring ``requires_reference = True`` fail at setup when none is configured;
- soft targets and policy-gradient objectives return ``loss`` (a per-token loss replacing the NLL,
  e.g. cross-entropy to soft targets or ``-A_t · ratio_t`` with per-token advantages from the batch);
- additive per-token terms (a KL to the reference, an auxiliary head's loss) return ``extra_loss``;
- a second forward (Intuitive Fine-Tuning's mixed embeddings) or extra prediction heads (concept-aware
  multi-token heads) read ``stats.hidden`` and ``stats.extras`` and run through ``pl_module``, which
  every call receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError

if TYPE_CHECKING:
    from lightning_tokens.core.stats import TokenStats


@dataclass
class TokenMethodOutput:
    """What a post-forward method returns; every field is optional and indexed like ``labels``.

    Attributes:
        weights: ``(B, T)`` per-token multipliers (detach them unless the gradient through them is intended).
        mask: ``(B, T)`` bool or 0/1 keep mask; dropped tokens leave the loss and the token count ``N``.
        loss: ``(B, T)`` per-token loss that replaces the NLL (soft targets, policy-gradient surrogates).
        extra_loss: ``(B, T)`` per-token term added after weighting (e.g. ``λ·KL`` to a reference).
        logs: scalars to log under ``train/<method name>/``.
    """

    weights: Tensor | None = None
    mask: Tensor | None = None
    loss: Tensor | None = None
    extra_loss: Tensor | None = None
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class _UniqueTokenCallback(Callback):
    """Shared by both hook points: a method may appear once per Trainer, and needs what it declares."""

    requires_reference: ClassVar[bool] = False
    #: The method reads the language model itself (a reference, auxiliary heads on its hidden states), so it
    #: applies to a module's main token stream only, not to a second one (``token_loss(stream=...)``).
    language_model_only: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        same = [cb for cb in trainer.callbacks if type(cb) is type(self)]
        if len(same) > 1:
            raise ConfigError(
                f"The token method {self.name} is listed {len(same)} times in trainer.callbacks. "
                "Each method may appear once: remove the duplicate (its arguments would be ambiguous)."
            )
        if self.requires_reference and getattr(pl_module, "reference", None) is None:
            raise ConfigError(
                f"{self.name} needs a reference model but the module has none configured: set the module's "
                "`reference` to one of the modes `adapter_disabled`, `model`, `ema` or `offline`."
            )


class TokenMethod(_UniqueTokenCallback):
    """Base class of post-forward token methods.

    Subclasses implement :meth:`compute`; set ``needs_entropy = True`` when ``stats.entropy`` is used so
    the module computes it in the same fused pass as the NLL.
    """

    needs_entropy: ClassVar[bool] = False

    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        """Return weights, a mask or loss terms for the active tokens of ``stats``."""
        raise NotImplementedError

    def reference_of(
        self, stats: TokenStats, modes: str = "adapter_disabled, model, ema or offline", what: str = "reference"
    ) -> Any:
        """``stats.reference``, or an error naming the modes to configure when the module computed none."""
        if stats.reference is None:
            raise RuntimeError(f"{self.name} got no {what} statistics: configure the module's `reference` ({modes}).")
        return stats.reference


class BatchTokenMethod(_UniqueTokenCallback):
    """Base class of pre-forward token methods: weights that are known before the forward pass.

    Subclasses implement :meth:`token_weights`; the result multiplies ``batch["token_weights"]``.
    Tokens whose weight becomes 0 are never sent through the output head by the fused loss.
    """

    def token_weights(self, batch: dict[str, Any], pl_module: pl.LightningModule) -> Tensor | None:
        """Return ``(B, T)`` weights indexed like ``batch["labels"]``, or ``None`` to leave them."""
        raise NotImplementedError

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        weights = self.token_weights(batch, pl_module)
        if weights is not None:
            multiply_token_weights(batch, weights)


def multiply_token_weights(batch: dict[str, Any], weights: Tensor) -> None:
    """Multiply ``batch["token_weights"]`` (created as ones if absent) by ``weights`` in place."""
    labels = batch["labels"]
    if weights.shape != labels.shape:
        raise ConfigError(
            f"token weights have shape {tuple(weights.shape)} but labels have {tuple(labels.shape)}: "
            "weights must be indexed like labels, (batch, sequence)."
        )
    current = batch.get("token_weights")
    weights = weights.to(device=labels.device, dtype=torch.float32)
    batch["token_weights"] = weights if current is None else current.float() * weights


def token_methods(trainer: pl.Trainer | None) -> list[TokenMethod]:
    """The post-forward methods of a trainer, in callback order."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, TokenMethod)]
