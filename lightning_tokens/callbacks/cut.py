r"""
Contrastive Unlikelihood Training (CUT) and DualCUT
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

CUT (Xu et al., "Reasons to Reject? Aligning Language Models with Judgments", arXiv 2312.14591; reference
code ``wwxu21/CUT@bb1d5de``, ``modeling_llama_unlikelihood.py::unlikelihood``) scores one response
:math:`y` under two contexts: a **negative** one that carries a judgment of the response (the instruction
plus "the answer wrongly says 13") and a **positive** one (the plain instruction; in FaGeL's DualCUT, the
instruction with positive feedback). A token that the judgment makes more likely is one the judgment
blames:

.. math::

    s_t = \operatorname{sg}\!\left(\frac{p(y_t \mid \text{neg}, y_{<t})}{p(y_t \mid \text{pos}, y_{<t})}\right),
    \qquad U = \{t : s_t > \lambda\}\ (\lambda = 1.1)

and the loss of the response, the reference's, is

.. math::

    \mathcal{L} = \tfrac12\Big[\underbrace{-\tfrac1N\sum_t \log p(y_t \mid \text{neg})}_{\text{Align-N likelihood}}
    \;\underbrace{-\tfrac1N\sum_t \big(\mathbb{1}_{t \in U}\, w\log(1 - p(y_t \mid \text{pos}))
    + \mathbb{1}_{t \notin U} \log p(y_t \mid \text{pos})\big)}_{L_{UL}}\Big]

Check (spec §9): :math:`p_\text{neg} = [0.5, 0.2]`, :math:`p_\text{pos} = [0.4, 0.3]` give ratios
:math:`[1.25, 0.667]`, token 0 flagged, :math:`L_{UL} = -(\log 0.6 + \log 0.3)/2 = 0.8574`.

**DualCUT** (FaGeL, arXiv 2412.20297; no code public, the spec's inferred form): :math:`L_1` the NLL of
:math:`y` under the positive-feedback context on every token, :math:`L_2` the unlikelihood term on the flagged
tokens with a per-token *dynamic scale* :math:`w_t = \mathrm{clip}(s_t - \lambda, 0, c)` (or
:math:`|\log s_t|` normalised to mean 1 over the flagged tokens), :math:`\mathcal{L} = L_1 + L_2`.

Batches (:mod:`lightning_tokens.datamodules.contrastive` builds them): ``input_ids`` / ``attention_mask`` /
``labels`` hold the response under the positive context, ``negative_input_ids`` /
``negative_attention_mask`` / ``negative_labels`` the same response tokens under the negative context, and an
optional ``has_negative`` ``(B,)`` marks rows that have one (rows without are plain NLL, the reference's
Align-P examples). Response tokens are matched row by row in order, so the two contexts may differ in
length and padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats

__all__ = [
    "NEGATIVE_KEYS",
    "CUTTerms",
    "ContrastiveUnlikelihood",
    "DualCUT",
    "align_negative",
    "cut_loss",
    "dual_cut_scale",
    "response_positions",
]

#: The batch keys of the negative context (``negative_attention_mask`` optional; any other ``negative_<key>``, e.g.
#: ``negative_position_ids`` or a module's ``negative_pixel_values``, reaches the negative forward as ``<key>``).
NEGATIVE_KEYS = ("negative_input_ids", "negative_attention_mask", "negative_labels")

Combine = Literal["mean", "sum"]
LikelihoodOn = Literal["unflagged", "all"]
Scale = Literal["constant", "margin", "saliency"]


@dataclass
class CUTTerms:
    """What :func:`cut_loss` computed, per token.

    Attributes:
        loss: the per-token likelihood / unlikelihood loss on the positive context.
        flagged: ``s_t > λ`` (bool).
        ratio: ``s_t = p(y_t | neg) / p(y_t | pos)``, detached.
    """

    loss: Tensor
    flagged: Tensor
    ratio: Tensor


def _log_one_minus_exp(logp: Tensor, eps: float) -> Tensor:
    """``log(1 - exp(logp))``, where an exact ``1 - p = 0`` becomes ``eps`` (the reference adds 1e-5 to zeros)."""
    one_minus = -torch.expm1(logp)
    return torch.log(torch.where(one_minus == 0, torch.full_like(one_minus, eps), one_minus))


def cut_loss(
    logp_pos: Tensor,
    logp_neg: Tensor,
    threshold: float = 1.1,
    unlikelihood_weight: float = 1.0,
    scale: Tensor | None = None,
    likelihood_on: LikelihoodOn = "unflagged",
    eps: float = 1e-5,
    mask: Tensor | None = None,
) -> CUTTerms:
    r"""CUT's per-token term on the positive context (the reference's ``unlikelihood``, per token).

    ``loss_t = -w·s·log(1 - p_pos,t)`` where ``s_t > threshold``, else ``-log p_pos,t`` (``likelihood_on=
    "unflagged"``, the reference); with ``likelihood_on="all"`` every token keeps ``-log p_pos,t`` and the flagged
    ones add the unlikelihood term (DualCUT's ``L1 + L2``). Gradients flow through ``logp_pos`` only.

    Args:
        logp_pos: log-probabilities of the response tokens under the positive context (differentiable).
        logp_neg: the same tokens' log-probabilities under the negative context (only its value is used).
        threshold: ``λ``.
        unlikelihood_weight: ``w`` on the unlikelihood term (the reference's ``weight_unlike``).
        scale: optional per-token dynamic scale of the unlikelihood term (DualCUT), shaped like ``logp_pos``.
        likelihood_on: ``unflagged`` or ``all`` (see above).
        eps: what an exact ``1 - p = 0`` becomes inside the log.
        mask: tokens that take part; others are never flagged and get loss 0.

    Returns:
        :class:`CUTTerms`.

    Example:
        >>> terms = cut_loss(torch.tensor([0.4, 0.3]).log(), torch.tensor([0.5, 0.2]).log())
        >>> terms.flagged.tolist(), round(terms.loss.mean().item(), 4)
        ([True, False], 0.8574)
    """
    check_choice("cut_loss", "likelihood_on", likelihood_on, ("unflagged", "all"))
    ratio = torch.exp(logp_neg.detach().float() - logp_pos.detach().float())
    flagged = ratio > threshold
    if mask is not None:
        flagged = flagged & mask.bool()
    # the unlikelihood branch only sees flagged tokens (a token with p = 1 elsewhere would give inf * 0 = nan)
    safe = torch.where(flagged, logp_pos.float(), torch.full_like(logp_pos, -1.0, dtype=torch.float32))
    weight = unlikelihood_weight if scale is None else unlikelihood_weight * scale.detach()
    unlikely = -weight * _log_one_minus_exp(safe, eps)
    likely = -logp_pos.float()
    if likelihood_on == "unflagged":
        loss = torch.where(flagged, unlikely, likely)
    else:
        loss = likely + torch.where(flagged, unlikely, torch.zeros_like(unlikely))
    if mask is not None:
        loss = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    return CUTTerms(loss=loss, flagged=flagged, ratio=ratio)


def dual_cut_scale(
    ratio: Tensor, flagged: Tensor, threshold: float = 1.1, mode: Scale = "margin", max_scale: float = 1.0
) -> Tensor:
    r"""DualCUT's per-token dynamic scale of the unlikelihood term (spec §9, inferred: a configurable option).

    - ``constant``: 1 (CUT).
    - ``margin``: :math:`\mathrm{clip}(s_t - \lambda, 0, c)`: tokens just past the threshold are pushed down
      gently, the ones the negative feedback explains most up to ``c = max_scale``.
    - ``saliency``: :math:`|\log s_t|`, normalised to mean 1 over the flagged tokens.

    Returns:
        ``(…)`` detached scales, 0 where not flagged.

    Example:
        >>> r = torch.tensor([1.25, 0.5, 3.0])
        >>> [round(v, 4) for v in dual_cut_scale(r, r > 1.1, 1.1, "margin", 1.0).tolist()]
        [0.15, 0.0, 1.0]
    """
    check_choice("dual_cut_scale", "mode", mode, ("constant", "margin", "saliency"))
    ratio, flagged = ratio.detach().float(), flagged.bool()
    if mode == "constant":
        scale = torch.ones_like(ratio)
    elif mode == "margin":
        scale = (ratio - threshold).clamp(min=0.0, max=max_scale)
    else:
        magnitude = ratio.clamp(min=1e-30).log().abs()
        count = flagged.sum()
        mean = (magnitude * flagged).sum() / count.clamp(min=1)
        scale = magnitude / mean.clamp(min=1e-12)
    return torch.where(flagged, scale, torch.zeros_like(scale))


def response_positions(labels: Tensor, shift_labels: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B, T)`` bool: the positions scored for ``labels`` (column 0 never, under the Hugging Face shift)."""
    mask = labels != ignore_index
    if shift_labels:
        mask = mask.clone()
        mask[:, 0] = False
    return mask


def _dense(values: Tensor, mask: Tensor, width: int) -> Tensor:
    """``values`` at ``mask`` packed to the left of a ``(B, width)`` tensor, row by row, in order."""
    rank = mask.long().cumsum(1) - 1
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    out = values.new_zeros(mask.shape[0], width)
    return out.index_put((rows[mask], rank[mask]), values[mask])


def align_negative(
    values: Tensor,
    labels: Tensor,
    negative_labels: Tensor,
    shift_labels: bool = True,
    ignore_index: int = IGNORE_INDEX,
    rows: Tensor | None = None,
) -> Tensor:
    """Move per-token ``values`` of the negative-context batch onto the positions of the positive one.

    The k-th scored token of row ``b`` of ``negative_labels`` is the k-th scored token of row ``b`` of
    ``labels`` (the same response under another context); rows marked by ``rows`` must have the same
    response tokens on both sides. Differentiable with respect to ``values``.

    Args:
        values: ``(B, T_neg)`` per-token values of the negative batch.
        labels: ``(B, T)`` labels of the positive batch.
        negative_labels: ``(B, T_neg)`` labels of the negative batch.
        shift_labels: the Hugging Face label convention (column 0 is never scored).
        ignore_index: label value that takes no loss.
        rows: ``(B,)`` bool, the rows that must match (default all); others are aligned as far as they go.

    Returns:
        ``(B, T)`` values at the positive batch's scored positions, 0 elsewhere.

    Example:
        >>> labels = torch.tensor([[-100, -100, 5, 6]])
        >>> negative = torch.tensor([[-100, 5, 6, -100, -100]])
        >>> align_negative(torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0]]), labels, negative).tolist()
        [[0.0, 0.0, 1.0, 2.0]]
    """
    if values.shape != negative_labels.shape:
        raise ConfigError(f"negative values have shape {tuple(values.shape)} but negative_labels {tuple(negative_labels.shape)}.")
    if labels.shape[0] != negative_labels.shape[0]:
        raise ConfigError(
            f"the positive batch has {labels.shape[0]} rows but the negative one {negative_labels.shape[0]}: "
            "pair every response with its negative context (one negative row per positive row)."
        )
    pos = response_positions(labels, shift_labels, ignore_index)
    neg = response_positions(negative_labels, shift_labels, ignore_index)
    counts_pos, counts_neg = pos.sum(1), neg.sum(1)
    checked = torch.ones_like(counts_pos, dtype=torch.bool) if rows is None else rows.bool().to(counts_pos.device)
    width = int(torch.maximum(counts_pos.max(), counts_neg.max()).clamp(min=1)) if labels.numel() else 1
    ids_pos, ids_neg = _dense(labels, pos, width), _dense(negative_labels, neg, width)
    bad = checked & ((counts_pos != counts_neg) | (ids_pos != ids_neg).any(1))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ConfigError(
            f"row {row}: the response under the negative context ({int(counts_neg[row])} labelled tokens) is not the "
            f"response under the positive context ({int(counts_pos[row])}): both must label the same token ids "
            "(tokenize the response once and append it to each context, as datamodules.contrastive does)."
        )
    dense = _dense(values, neg, width)
    rank = pos.long().cumsum(1) - 1
    index = rank.clamp(min=0, max=width - 1)
    gathered = dense.gather(1, index)
    inside = pos & (rank < counts_neg.unsqueeze(1))
    return torch.where(inside, gathered, torch.zeros_like(gathered))


class ContrastiveUnlikelihood(TokenMethod):
    """Contrastive Unlikelihood Training: unlikelihood on the tokens a negative judgment explains, likelihood
    on the others (replaces the per-token loss; the Align-N likelihood enters as an extra term).

    Features:
        - One extra forward of the negative context per step through ``pl_module.hidden_states`` and the
          fused token ops (never ``(tokens × vocab)`` logits); with gradients when ``judgment_nll`` (the
          reference trains both contexts), without otherwise.
        - Rows without a negative context (``has_negative`` false) are plain NLL (the reference's Align-P).
        - Logs ``flagged_fraction`` (flagged / scored tokens of rows with a negative context),
          ``mean_log_ratio``, ``unlikelihood`` and ``judgment_nll``; shares per-token ``ratio``, ``flagged``
          and ``negative_logp`` in ``stats.extras[name]`` (the token maps show them).

    Args:
        threshold: ``λ``; tokens with ``s_t > λ`` get the unlikelihood term (reference: 1.1; 1.2 for its
            offline Shepherd run).
        unlikelihood_weight: ``w`` of the unlikelihood term (the reference's ``weight_unlike``: 1 in its
            online script, 0.5 offline, 0.1 as the script's default).
        judgment_nll: add the Align-N likelihood ``-log p(y_t | neg)`` (the reference; the negative forward then
            keeps its graph). ``False`` runs that forward without gradients and uses it for ``s_t`` only.
        combine: ``mean``: ``(Align-N + L_UL) / 2`` (the reference code); ``sum``: ``Align-N + L_UL``.
        likelihood_on: ``unflagged`` (reference: likelihood only on tokens not flagged) or ``all``.
        scale: per-token scale of the unlikelihood term: ``constant`` (CUT), ``margin`` or ``saliency``
            (DualCUT, :func:`dual_cut_scale`).
        max_scale: ``c``, the cap of the ``margin`` scale.
        eps: what an exact ``1 - p = 0`` becomes inside the log (the reference adds 1e-5 to zeros).

    Example::

        from lightning_tokens.datamodules.contrastive import ContrastiveDataModule
        trainer = L.Trainer(callbacks=[ContrastiveUnlikelihood(threshold=1.1)])
        trainer.fit(TokenLM(model="smollm2-135m-instruct"), ContrastiveDataModule(train_file="cut.jsonl"))
    """

    language_model_only: ClassVar[bool] = True  # its paired contexts are the language model's inputs

    def __init__(
        self,
        threshold: float = 1.1,
        unlikelihood_weight: float = 1.0,
        judgment_nll: bool = True,
        combine: Combine = "mean",
        likelihood_on: LikelihoodOn = "unflagged",
        scale: Scale = "constant",
        max_scale: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        owner = type(self).__name__
        check_choice(owner, "combine", combine, ("mean", "sum"))
        check_choice(owner, "likelihood_on", likelihood_on, ("unflagged", "all"))
        check_choice(owner, "scale", scale, ("constant", "margin", "saliency"))
        if not threshold > 0:
            raise ConfigError(f"{owner}(threshold={threshold}): the ratio threshold λ must be > 0 (the paper: 1.1).")
        if not unlikelihood_weight >= 0:
            raise ConfigError(f"{owner}(unlikelihood_weight={unlikelihood_weight}) must be >= 0.")
        if not max_scale > 0:
            raise ConfigError(f"{owner}(max_scale={max_scale}) must be > 0.")
        if not 0 < eps < 1:
            raise ConfigError(f"{owner}(eps={eps}) must lie in (0, 1).")
        self.threshold, self.unlikelihood_weight, self.judgment_nll = threshold, unlikelihood_weight, judgment_nll
        self.combine, self.likelihood_on, self.scale = combine, likelihood_on, scale
        self.max_scale, self.eps = max_scale, eps

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if hasattr(pl_module, "rollout"):
            raise ConfigError(
                f"{self.name} needs batches that pair a response with a negative context; "
                f"{type(pl_module).__name__}'s rollouts have none: train it with TokenLM and a ContrastiveDataModule."
            )
        if not (callable(getattr(pl_module, "hidden_states", None)) and callable(getattr(pl_module, "output_head", None))):
            raise ConfigError(
                f"{self.name} scores the negative context through the module's `hidden_states(batch)` and "
                f"`output_head()`; {type(pl_module).__name__} has none: use TokenLM (or add both methods)."
            )
        if self.judgment_nll:
            from lightning_tokens.core.attention_probe import AttentionProbe

            mine = trainer.callbacks.index(self)
            later = [cb for cb in trainer.callbacks[mine + 1 :] if isinstance(getattr(cb, "probe", None), AttentionProbe)]
            if later:
                raise ConfigError(
                    f"{type(later[0]).__name__} reads the attention of the last forward with gradients, and {self.name}"
                    "(judgment_nll=True) runs one on the negative context before it: list "
                    f"{type(later[0]).__name__} before {self.name} in trainer.callbacks."
                )

    def _negative_logp(self, stats: TokenStats, pl_module: pl.LightningModule) -> Tensor:
        """``log p(y_t | negative context)`` at the positive batch's positions, with gradients iff ``judgment_nll``."""
        batch = stats.batch
        missing = [key for key in ("negative_input_ids", "negative_labels") if key not in batch]
        if missing:
            raise ConfigError(
                f"{self.name} found no {', '.join(missing)} in the batch: each row must pair the response under the "
                "positive context (input_ids, labels) with the same response under a negative context "
                "(negative_input_ids, negative_attention_mask, negative_labels); "
                "lightning_tokens.datamodules.contrastive.ContrastiveDataModule builds such batches."
            )
        # every negative_<key> is the negative context's <key> (input_ids, attention_mask, labels, position_ids,
        # or a module's extra inputs such as negative_pixel_values)
        negative = {key[len("negative_") :]: value for key, value in batch.items() if key.startswith("negative_") and value is not None}
        grad = self.judgment_nll and torch.is_grad_enabled()
        head = stats.head if stats.head is not None else pl_module.output_head()
        if not grad:
            head = OutputHead(head.weight.detach(), None if head.bias is None else head.bias.detach())
        with torch.set_grad_enabled(grad):
            hidden = pl_module.hidden_states(negative)
            negative_stats = TokenStats(
                negative["labels"], hidden=hidden, head=head, shift_labels=stats.shift_labels,
                ignore_index=stats.ignore_index, backend=stats.backend,
            )
            nll = negative_stats.nll
        rows = _has_negative(batch, stats.labels)
        return -align_negative(nll, stats.labels, negative["labels"], stats.shift_labels, stats.ignore_index, rows)

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        logp_neg = self._negative_logp(stats, pl_module)
        rows = _has_negative(stats.batch, stats.labels).unsqueeze(1)
        active = stats.mask & rows
        logp_pos = -stats.nll
        ratio = torch.exp(logp_neg.detach() - logp_pos.detach())
        scale = None
        if self.scale != "constant":
            scale = dual_cut_scale(ratio, (ratio > self.threshold) & active, self.threshold, self.scale, self.max_scale)
        terms = cut_loss(
            logp_pos, logp_neg, self.threshold, self.unlikelihood_weight, scale, self.likelihood_on, self.eps, mask=active
        )
        half = 0.5 if self.combine == "mean" else 1.0
        loss = torch.where(active, half * terms.loss, stats.nll)
        extra = None
        if self.judgment_nll:
            extra = torch.where(active, -half * logp_neg, torch.zeros_like(logp_neg))
        stats.extras[self.name] = {
            "ratio": torch.where(active, terms.ratio, torch.zeros_like(terms.ratio)),
            "flagged": terms.flagged.float(),
            "negative_logp": logp_neg.detach(),
        }
        count = active.sum()
        flagged = terms.flagged.sum()
        logs: dict[str, Any] = {"flagged_fraction": flagged.float() / count.clamp(min=1)}
        if count > 0:
            log_ratio = (logp_neg.detach() - logp_pos.detach())[active]
            logs["mean_log_ratio"] = log_ratio.mean()
            logs["judgment_nll"] = (-logp_neg.detach())[active].mean()
        if flagged > 0:
            logs["unlikelihood"] = terms.loss.detach()[terms.flagged].mean()
        return TokenMethodOutput(loss=loss, extra_loss=extra, logs=logs)


class DualCUT(ContrastiveUnlikelihood):
    """DualCUT (FaGeL, arXiv 2412.20297): CUT with positive and negative feedback and per-token dynamic scales.

    ``L = L1 + L2``: ``L1`` the NLL of the response under the positive-feedback context (every token), ``L2`` the
    unlikelihood term on the tokens the negative feedback makes more likely (``s_t > λ``), each scaled by
    :func:`dual_cut_scale`. FaGeL has no public code; this is the spec's inferred form, every choice an option
    (the defaults below; ``scale="constant"``, ``likelihood_on="unflagged"``, ``combine="mean"``,
    ``judgment_nll=True`` give CUT back).

    Args:
        threshold: ``λ``.
        unlikelihood_weight: weight of ``L2``.
        judgment_nll: also train ``-log p(y | negative feedback)`` (CUT's Align-N; off for DualCUT).
        combine: ``sum`` (``L1 + L2``) or ``mean``.
        likelihood_on: ``all`` (``L1`` on every token) or ``unflagged``.
        scale: ``margin`` (``clip(s_t - λ, 0, c)``), ``saliency`` (normalised ``|log s_t|``) or ``constant``.
        max_scale: ``c``.
        eps: what an exact ``1 - p = 0`` becomes inside the log.

    Example::

        trainer = L.Trainer(callbacks=[DualCUT(scale="margin", max_scale=1.0)])
        trainer.fit(TokenLM(model="smollm2-135m-instruct"), ContrastiveDataModule(train_file="feedback.jsonl"))
    """

    def __init__(
        self,
        threshold: float = 1.1,
        unlikelihood_weight: float = 1.0,
        judgment_nll: bool = False,
        combine: Combine = "sum",
        likelihood_on: LikelihoodOn = "all",
        scale: Scale = "margin",
        max_scale: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(threshold, unlikelihood_weight, judgment_nll, combine, likelihood_on, scale, max_scale, eps)


def _has_negative(batch: dict[str, Any], labels: Tensor) -> Tensor:
    """``(B,)`` bool: the rows that have a negative context (all, unless the batch says otherwise)."""
    rows = batch.get("has_negative")
    if rows is None:
        return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    rows = torch.as_tensor(rows, device=labels.device).bool()
    if rows.shape != labels.shape[:1]:
        raise ConfigError(f"batch['has_negative'] must have shape (batch,) = {tuple(labels.shape[:1])}, got {tuple(rows.shape)}.")
    return rows
