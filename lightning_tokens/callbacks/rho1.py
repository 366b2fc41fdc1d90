r"""
Rho-1: Selective Language Modeling
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Rho-1 (Lin et al., "Not All Tokens Are What You Need", arXiv 2404.07965) scores every label token by its
*excess loss* against a reference model and trains only on the highest-scoring tokens:

.. math::

    \Delta_t = \mathcal{L}_\theta(x_t) - \mathcal{L}_\mathrm{ref}(x_t), \qquad
    \mathcal{L}_\mathrm{SLM} = -\frac{1}{N \cdot k\%} \sum_t I_{k\%}(x_t) \log P_\theta(x_t \mid x_{<t})

with :math:`I_{k\%}` the indicator of the top :math:`k\%` tokens by :math:`\Delta` in the batch (the
paper) or in each sample. The normaliser is the number of kept tokens, as the pipeline's reduction does.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.distributed import RankScope, check_rank_scope, gather_rows
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import TokenStats

__all__ = ["ExcessLossSelection", "select_by_excess_loss"]

Scope = Literal["batch", "sample"]


def select_by_excess_loss(nll: Tensor, ref_nll: Tensor, mask: Tensor, ratio: float, scope: Scope = "batch") -> Tensor:
    """0/1 float mask of the top ``ratio`` of scored tokens by excess loss ``nll - ref_nll``.

    Among the ``n`` tokens where ``mask`` is true (per batch, or per row with ``scope="sample"``) the
    ``ceil(ratio · n)`` with the largest excess loss are kept. Ties are broken deterministically: the
    earlier position (row-major) wins.

    Args:
        nll: ``(B, T)`` current per-token NLL.
        ref_nll: ``(B, T)`` reference per-token NLL.
        mask: ``(B, T)`` bool, the tokens that can be selected.
        ratio: fraction to keep, in ``(0, 1]``.
        scope: ``"batch"`` (the paper: top tokens of the whole batch) or ``"sample"`` (per row).

    Example:
        >>> nll = torch.tensor([[1.84235, 1.720653, 1.386294]])
        >>> select_by_excess_loss(nll, torch.tensor([[0.5, 1.0, 2.5]]), torch.ones(1, 3, dtype=torch.bool), 0.6)
        tensor([[1., 1., 0.]])
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio={ratio} must lie in (0, 1].")
    if scope not in ("batch", "sample"):
        raise ConfigError(f"scope={scope!r} must be 'batch' or 'sample'.")
    mask = mask.bool()
    score = (nll.detach() - ref_nll.detach()).float()
    rows = score.reshape(1, -1) if scope == "batch" else score
    row_mask = mask.reshape(1, -1) if scope == "batch" else mask
    # unselectable tokens sort last; a stable descending sort keeps the earlier position first on ties
    keyed = torch.where(row_mask, rows, torch.full_like(rows, -math.inf))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    counts = row_mask.sum(-1, keepdim=True)
    keep_counts = torch.ceil(counts.double() * ratio).long()
    rank = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
    selected_sorted = rank < keep_counts
    selected = torch.zeros_like(row_mask).scatter(-1, order, selected_sorted) & row_mask
    return selected.reshape(mask.shape).float()


class ExcessLossSelection(TokenMethod):
    """Rho-1 selective language modeling: train on the tokens with the largest excess loss.

    Needs a reference (``TokenLM(reference=...)``): a model fine-tuned on high-quality data in the paper;
    any mode of the reference provider works (``offline`` costs nothing at train time).

    Args:
        ratio: fraction of scored tokens kept (0.6 for the paper's 1B math runs).
        scope: ``batch`` (the paper: the top tokens of the whole micro-batch) or ``sample`` (per row).
        ranks: with ``scope="batch"`` under data parallelism: ``local`` (default) selects among each
            rank's own tokens; ``global`` selects the top tokens of the batch gathered from all
            data-parallel ranks, exactly what one process would select on the global batch (one
            all-gather of the scores per step).

    Logs ``kept_fraction``, and the mean excess loss of kept and of dropped tokens.

    Example::

        model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(), reference=ReferenceSettings("adapter_disabled"))
        trainer = L.Trainer(callbacks=[ExcessLossSelection(ratio=0.6)])
        trainer.fit(model, datamodule=SFTDataModule(train_file="data/examples/sft_chat.jsonl"))
    """

    requires_reference = True

    def __init__(self, ratio: float = 0.6, scope: Scope = "batch", ranks: RankScope = "local") -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"ExcessLossSelection(ratio={ratio}): ratio must lie in (0, 1].")
        check_choice("ExcessLossSelection", "scope", scope, ("batch", "sample"))
        check_rank_scope("ExcessLossSelection", ranks)
        self.ratio = ratio
        self.scope = scope
        self.ranks = ranks

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        ref_nll = self.reference_of(stats).nll.to(stats.nll.device)
        if self.scope == "batch" and self.ranks == "global":
            rows = {"nll": stats.nll.detach().float(), "ref_nll": ref_nll.float(), "mask": stats.mask}
            gathered, mine = gather_rows(rows, pl_module.trainer)
            selected = select_by_excess_loss(gathered["nll"], gathered["ref_nll"], gathered["mask"], self.ratio)
            keep = selected[mine, : stats.mask.shape[1]]
        else:
            keep = select_by_excess_loss(stats.nll, ref_nll, stats.mask, self.ratio, self.scope)
        excess = (stats.nll.detach() - ref_nll)[stats.mask]
        kept = keep[stats.mask].bool()
        logs = {"kept_fraction": kept.float().mean() if kept.numel() else torch.tensor(0.0)}
        if kept.any():
            logs["excess_kept"] = excess[kept].mean()
        if (~kept).any():
            logs["excess_dropped"] = excess[~kept].mean()
        return TokenMethodOutput(mask=keep.bool(), logs=logs)
