"""Reference and history models: one provider, four explicit modes.

- ``adapter_disabled``: with LoRA, the base model with its adapters switched off; zero extra weights.
- ``model``: a separate frozen model (hub id, local folder, preset or packaged name), created in
  ``configure_model`` (so sharding strategies wrap it), in eval mode, optionally loaded in 4-bit.
- ``ema``: history weights ``target ← (1 − α)·target + α·current`` every ``k`` optimizer steps, over the
  trainable parameters (the LoRA adapters when LoRA is on), saved in and restored from checkpoints.
- ``offline``: per-token losses computed once by ``lightning-tokens score`` and stored keyed by example
  id; looked up per batch.

A provider returns the reference's statistics for a batch, indexed like ``labels`` (the same alignment
as :class:`~lightning_tokens.core.stats.TokenStats`); methods read ``stats.reference.nll``. Providers talk to
the module they serve only through :class:`ReferenceHost`, so any module on the pipeline can have one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_tokens.core.distributed import reshard_all
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.reference_scores import load_reference_scores, lookup_reference_nll
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats, tempered

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy

ReferenceMode = Literal["adapter_disabled", "model", "ema", "offline"]


@dataclass
class ReferenceSettings:
    """Where a method's reference (or history) statistics come from.

    Attributes:
        mode: ``adapter_disabled`` (needs LoRA), ``model``, ``ema`` or ``offline``.
        model: ``mode=model``: the reference model (hub id, local folder, preset or packaged name).
        model_config: ``mode=model``: config overrides (presets) or ``from_pretrained`` keyword arguments.
        quantization: ``mode=model``: load the reference in 4-bit (``nf4``, ``nf4-dq``, ``fp4``) or ``int8``.
        ema_alpha: ``mode=ema``: weight α of the current model in each update.
        ema_every: ``mode=ema``: update every this many optimizer steps.
        scores_file: ``mode=offline``: the file written by ``lightning-tokens score``.
    """

    mode: ReferenceMode = "adapter_disabled"
    model: str | None = None
    model_config: dict[str, Any] | None = None
    quantization: Literal["nf4", "nf4-dq", "fp4", "int8"] | None = None
    ema_alpha: float = 0.01
    ema_every: int = 1
    scores_file: str | None = None

    def validate(self, has_lora: bool) -> None:
        """Fail early, naming the field and the fix."""
        if self.mode == "adapter_disabled" and not has_lora:
            raise ConfigError(
                "reference.mode=adapter_disabled needs LoRA adapters to switch off: set `lora`, or choose "
                "reference.mode=model (a separate frozen model), ema or offline."
            )
        if self.mode == "model" and not self.model:
            raise ConfigError("reference.mode=model needs `reference.model` (a hub id, local folder or preset).")
        if self.mode == "ema" and not (0.0 < self.ema_alpha <= 1.0 and self.ema_every >= 1):
            raise ConfigError(
                f"reference.ema_alpha={self.ema_alpha} must lie in (0, 1] and reference.ema_every="
                f"{self.ema_every} must be >= 1."
            )
        if self.mode == "offline":
            if not self.scores_file:
                raise ConfigError(
                    "reference.mode=offline needs `reference.scores_file`: compute it once with "
                    "`lightning-tokens score --config <reference config> --output FILE`."
                )
            if not os.path.exists(self.scores_file):
                raise ConfigError(
                    f"reference.scores_file={self.scores_file!r} does not exist: compute it with "
                    "`lightning-tokens score --config <reference config> --output FILE`."
                )


@runtime_checkable
class ReferenceHost(Protocol):
    """What a reference provider needs from the module it serves (``TokenLM`` is one; so can be any module
    whose loss is the token loss of a causal LM's final hidden states and output head).

    Attributes:
        model: the trained causal LM; a peft model when LoRA is on (``adapter_disabled`` switches its
            adapters off, ``ema`` averages its trainable parameters).
        reference_model: the ``model`` mode's frozen causal LM, set by the provider in ``setup`` (a
            submodule, so that strategies place and shard it with the rest).
        token_loss_backend: the fused-op backend of the module's own token loss.
    """

    model: torch.nn.Module | None
    reference_model: torch.nn.Module | None
    token_loss_backend: str

    def hidden_states(self, batch: dict[str, Any], causal_lm: torch.nn.Module | None = None) -> Tensor:
        """Final hidden states ``(B, T, D)`` of the batch, from the trained model or from ``causal_lm``."""
        ...

    def output_head(self) -> OutputHead:
        """The trained model's output head."""
        ...

    def load_frozen_causal_lm(
        self, name: str, overrides: dict[str, Any] | None = None, quantization: str | None = None
    ) -> torch.nn.Module:
        """A causal LM (preset, folder or hub id) for this module's vocabulary and dtype, in eval mode and
        without gradients; ``quantization`` loads it in 4/8-bit."""
        ...

    @property
    def strategy(self) -> Strategy | None:
        """The attached trainer's strategy, ``None`` outside a trainer."""
        ...


@dataclass
class ReferenceStats:
    """Reference statistics known only as per-token NLL (the offline mode)."""

    nll: Tensor
    mask: Tensor


class ReferenceProvider:
    """Base class: ``stats(batch, module)`` returns the reference's statistics for the batch."""

    settings: ReferenceSettings

    def setup(self, module: ReferenceHost) -> None:
        """Create what the mode needs; called from ``configure_model``."""

    def stats(self, batch: dict[str, Any], module: ReferenceHost, temperature: float = 1.0) -> TokenStats | ReferenceStats:
        """The reference's statistics on ``batch``; ``temperature`` divides its logits (a sampling policy's
        tempered distribution, as GRPO's KL compares)."""
        raise NotImplementedError

    def on_optimizer_step(self, module: ReferenceHost) -> None:
        """Called after each optimizer step (EMA updates)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _frozen_stats(
    batch: dict[str, Any], hidden: Tensor, head: OutputHead, backend: str, temperature: float = 1.0
) -> TokenStats:
    """Reference statistics without any autograd graph, of the logits divided by ``temperature``; the NLL is
    computed eagerly."""
    head = OutputHead(head.weight.detach(), None if head.bias is None else head.bias.detach())
    hidden, head = tempered(hidden.detach(), head, temperature)
    stats = TokenStats(batch["labels"], hidden=hidden, head=head, batch=batch, backend=backend)
    with torch.no_grad():
        stats.nll  # noqa: B018 - computed and cached now, under no_grad
    return stats


class AdapterDisabledReference(ReferenceProvider):
    """The LoRA base model: the same weights with every adapter switched off."""

    def __init__(self, settings: ReferenceSettings) -> None:
        self.settings = settings

    def stats(self, batch: dict[str, Any], module: ReferenceHost, temperature: float = 1.0) -> TokenStats:
        with torch.no_grad(), module.model.disable_adapter():
            hidden = module.hidden_states(batch)
        return _frozen_stats(batch, hidden, module.output_head(), module.token_loss_backend, temperature)


class ModelReference(ReferenceProvider):
    """A separate frozen model, a submodule of the LightningModule (``reference_model``), so that
    strategies place and shard it with the rest."""

    def __init__(self, settings: ReferenceSettings) -> None:
        self.settings = settings

    def setup(self, module: ReferenceHost) -> None:
        if getattr(module, "reference_model", None) is not None:
            return
        settings = self.settings
        module.reference_model = module.load_frozen_causal_lm(settings.model, settings.model_config, settings.quantization)

    def stats(self, batch: dict[str, Any], module: ReferenceHost, temperature: float = 1.0) -> TokenStats:
        model = module.reference_model
        model.eval()  # Lightning's train() calls reach submodules; the reference stays in eval mode
        with torch.no_grad():
            hidden = module.hidden_states(batch, causal_lm=model)
        head = OutputHead.from_module(model.get_output_embeddings())
        return _frozen_stats(batch, hidden, head, module.token_loss_backend, temperature)


class EMAReference(ReferenceProvider):
    """History weights: an exponential moving average of the trainable parameters.

    The reference forward swaps the averaged values into the live parameters, runs without gradients
    and swaps back; it runs before the training forward of the step, so no autograd graph ever sees the
    swapped values.
    """

    def __init__(self, settings: ReferenceSettings) -> None:
        self.settings = settings
        self.average: dict[str, Tensor] = {}
        self.steps = 0

    def _tracked(self, module: ReferenceHost) -> dict[str, torch.nn.Parameter]:
        """The module's trainable parameters: its ``reference_parameters()`` when it has one (a vision-language
        module adds its connector), else those of ``module.model``."""
        own = getattr(module, "reference_parameters", None)
        params = own() if own is not None else dict(module.model.named_parameters())
        return {name: p for name, p in params.items() if p.requires_grad}

    def setup(self, module: ReferenceHost) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(module.strategy, FSDPStrategy):
            raise ConfigError(
                "reference.mode=ema under FSDPStrategy is not supported (its flat-parameter shards cannot be swapped "
                "per tensor): use ModelParallelStrategy (FSDP2), or reference.mode=model / adapter_disabled / offline."
            )
        for name, p in self._tracked(module).items():  # parameters built after an earlier setup call join too
            if name not in self.average:
                self.average[name] = p.detach().clone()

    def match_layout(self, module: ReferenceHost) -> dict[str, torch.nn.Parameter]:
        """Give every average the device, dtype and (under FSDP2) the sharding of its parameter; returns
        the tracked parameters. Averages taken before sharding, or loaded from a full checkpoint, are
        cut into this rank's shard locally (every rank holds the same full average)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = self._tracked(module)
        for name, p in params.items():
            average = self.average[name]
            if isinstance(p, DTensor) and not isinstance(average, DTensor):
                average = distribute_tensor(
                    average.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None
                )
            elif average.device != p.device or average.dtype != p.dtype:
                average = average.to(device=p.device, dtype=p.dtype)
            self.average[name] = average
        return params

    @torch.no_grad()
    def stats(self, batch: dict[str, Any], module: ReferenceHost, temperature: float = 1.0) -> TokenStats:
        params = self.match_layout(module)
        live = {name: p.detach().clone() for name, p in params.items()}
        reshard_all(module)  # an FSDP2 root still gathered from an earlier forward would ignore the swap
        try:
            for name, p in params.items():
                p.copy_(self.average[name])
            hidden = module.hidden_states(batch)
            stats = _frozen_stats(batch, hidden, module.output_head(), module.token_loss_backend, temperature)
        finally:
            reshard_all(module)
            for name, p in params.items():
                p.copy_(live[name])
        return stats

    @torch.no_grad()
    def on_optimizer_step(self, module: ReferenceHost) -> None:
        self.steps += 1
        if self.steps % self.settings.ema_every:
            return
        params = self.match_layout(module)
        alpha = self.settings.ema_alpha
        averages = [self.average[name] for name in params]
        torch._foreach_lerp_(averages, [p.detach() for p in params.values()], alpha)

    def state_dict(self) -> dict[str, Any]:
        """``average`` (CPU copies; FSDP2-sharded averages stay DTensors, see ``TokenLM.on_save_checkpoint``)
        and ``steps``."""
        from torch.distributed.tensor import DTensor

        average = {
            name: t.detach().clone() if isinstance(t, DTensor) else t.detach().cpu().clone()
            for name, t in self.average.items()
        }
        return {"average": average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averages given (others keep their current values) and the step count."""
        self.average.update({name: t.clone() for name, t in state["average"].items()})
        self.steps = state["steps"]


class OfflineReference(ReferenceProvider):
    """Per-token reference losses precomputed by ``lightning-tokens score``, looked up by example id."""

    def __init__(self, settings: ReferenceSettings) -> None:
        self.settings = settings
        self.scores: dict[int, Tensor] | None = None

    def setup(self, module: ReferenceHost) -> None:
        if self.scores is None:
            self.scores = load_reference_scores(self.settings.scores_file)

    def stats(self, batch: dict[str, Any], module: ReferenceHost, temperature: float = 1.0) -> ReferenceStats:
        if temperature != 1.0:
            raise ConfigError(
                f"reference.mode=offline holds the losses of untempered logits; temperature={temperature} needs a "
                "reference that runs: adapter_disabled, model or ema."
            )
        if self.scores is None:
            self.setup(module)
        nll = lookup_reference_nll(self.scores, batch, self.settings.scores_file)
        return ReferenceStats(nll=nll, mask=batch["labels"] != IGNORE_INDEX)


def build_reference(settings: ReferenceSettings) -> ReferenceProvider:
    providers = {
        "adapter_disabled": AdapterDisabledReference,
        "model": ModelReference,
        "ema": EMAReference,
        "offline": OfflineReference,
    }
    return providers[settings.mode](settings)
