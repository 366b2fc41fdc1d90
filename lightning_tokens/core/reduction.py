"""Token-mean reduction that stays exact under gradient accumulation and data parallelism.

The loss we want is ``Σ w·loss / N`` where the sums run over every kept token of every micro-batch
of the accumulation window on every rank, and ``N`` counts those tokens. Lightning divides each
micro-batch loss by ``accumulate_grad_batches`` and DDP/FSDP average gradients over ranks, which gives
the mean of per-micro-batch means, wrong as soon as micro-batches hold different token counts
(Lightning issue #20350). ``N`` is only known once the window has run, so:

1. each micro-batch backpropagates ``Σ w·loss / c``, with ``c`` the global kept-token count of the
   window's first micro-batch (one scalar all-reduce; identical on every rank, so the ranks' gradients
   stay commensurable, and the returned loss keeps a per-token scale);
2. before the optimizer step (after AMP unscaling, before clipping) the gradients are multiplied by
   ``c · accumulate_grad_batches · replicas / N``, undoing Lightning's and the strategy's divisions.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor


class TokenCountNormalizer:
    """Tracks the kept-token count of one accumulation window and rescales gradients at its end."""

    def __init__(self) -> None:
        self.scale: float | None = None  # c, fixed at the window's first micro-batch
        self.local_count = 0.0  # kept tokens seen on this rank in the window
        self.opened_at_step = -1  # trainer.global_step when the window opened

    def divisor(self, local_count: Tensor, trainer: pl.Trainer | None, global_count: Tensor | None = None) -> float:
        """Register a micro-batch's kept-token count; return the ``c`` to divide its summed loss by.

        ``global_count``: the count already summed over the ranks by the caller (saves a collective)."""
        step = trainer.global_step if trainer is not None else 0
        if self.scale is not None and step != self.opened_at_step:
            raise RuntimeError(
                "An optimizer step ran without the token-count normalisation: the module overrides "
                "`on_before_optimizer_step` without calling `super().on_before_optimizer_step(optimizer)`."
            )
        self.local_count += float(local_count)
        if self.scale is None:
            self.opened_at_step = step
            total = global_count if global_count is not None else global_sum(local_count.detach().float(), trainer)
            self.scale = max(float(total), 1.0)
        return self.scale

    def finish_window(self, module: torch.nn.Module, trainer: pl.Trainer) -> float:
        """Rescale the accumulated gradients to ``Σ w·loss / N`` and reset; returns ``N``."""
        if self.scale is None:  # no token loss this window (e.g. manual optimisation elsewhere)
            return 0.0
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        total = float(global_sum(torch.tensor(self.local_count, device=device), trainer))
        factor = self.scale * trainer.accumulate_grad_batches * _replicas(trainer) / total if total > 0 else 0.0
        if factor != 1.0:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, factor)
        self.scale, self.local_count = None, 0.0
        return total



def global_sum(value: Tensor, trainer: pl.Trainer | None) -> Tensor:
    """``value`` summed over the data-parallel ranks (itself in one process)."""
    if trainer is None or trainer.world_size == 1:
        return value
    total = trainer.strategy.reduce(value.clone(), reduce_op="sum")
    # ranks that share a data shard (tensor parallelism) see the same tokens: count them once
    return total * _replicas(trainer) / trainer.world_size


def global_mean(value: Tensor, trainer: pl.Trainer | None) -> Tensor:
    """``value`` averaged over the data-parallel ranks (itself in one process): what one process would hold
    for the global batch when ``value`` is a gradient or a per-rank mean."""
    if trainer is None or trainer.world_size == 1:
        return value
    return global_sum(value, trainer) / _replicas(trainer)


def _replicas(trainer: pl.Trainer) -> int:
    """Number of data-parallel replicas, the divisor the strategy applies when averaging gradients."""
    try:
        return int(trainer.strategy.distributed_sampler_kwargs.get("num_replicas", trainer.world_size))
    except (AttributeError, NotImplementedError):
        return trainer.world_size
