r"""
ssToken: Self-modulated and Semantic-aware Token Selection
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

ssToken ("ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning", arXiv
2510.18250, ICLR 2026) scores every response token of a sample by two signals and trains only on
the top ``ρ`` fraction of each sample's response:

.. math::

    \mathrm{REL}_i = \mathcal{L}_\mathrm{his}(x_i) - \mathcal{L}_\theta(x_i), \qquad
    \mathrm{Attn}_i = \frac{1}{H} \sum_h \sum_{j \in \mathrm{prompt}} A^h_{ij}, \qquad
    s_i = \gamma \, \frac{\mathrm{REL}_i - \min \mathrm{REL}}{\max \mathrm{REL} - \min \mathrm{REL} + 10^{-8}}
        + (1 - \gamma) \, \mathrm{Attn}_i

(min and max over the sample's response tokens, ``A`` the last decoder layer's attention of token ``i``
as a query), keeping the ``⌈ρ · n_\mathrm{resp}⌉`` highest scores of each sample. The loss is the token
mean of the NLL over the kept tokens of the micro-batch (the code's ``CrossEntropyLoss(reduction="mean")``
on the filtered labels), which is what the pipeline's reduction does with a mask.

The arithmetic follows ``filter_tokens_with_attention_loss`` of the authors' code (``jianke0604/ssToken``
``scripts/finetune.py``); the attention comes from :class:`~lightning_tokens.core.attention_probe.AttentionProbe`,
which computes the last layer's queries and keys in a forward hook and the attention from them, like
``scripts/finetune_with_hook.py``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.attention_probe import (
    AttentionProbe,
    PromptKeys,
    prompt_key_mask,
    segment_ids_from_positions,
)
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import TokenStats

__all__ = ["SSToken", "select_tokens", "sstoken_scores"]


def sstoken_scores(nll: Tensor, history_nll: Tensor, attn_to_prompt: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """``(B, T)`` float32 ssToken scores ``γ · minmax(REL) + (1 − γ) · attn`` (0 outside ``response_mask``).

    ``REL = history_nll − nll``, min-max normalised per row over the response tokens with ``+1e-8`` in the
    denominator (a row whose REL is constant normalises to 0).
    """
    mask = response_mask.bool()
    rel = (history_nll.detach().float() - nll.detach().float()).to(mask.device)
    low = torch.where(mask, rel, torch.full_like(rel, math.inf)).amin(-1, keepdim=True)
    high = torch.where(mask, rel, torch.full_like(rel, -math.inf)).amax(-1, keepdim=True)
    has_response = mask.any(-1, keepdim=True)
    low = torch.where(has_response, low, torch.zeros_like(low))
    high = torch.where(has_response, high, torch.zeros_like(high))
    rel_norm = (rel - low) / (high - low + 1e-8)
    score = gamma * rel_norm + (1 - gamma) * attn_to_prompt.detach().float().to(mask.device)
    return torch.where(mask, score, torch.zeros_like(score))


def select_tokens(
    nll: Tensor, history_nll: Tensor, attn_to_prompt: Tensor, response_mask: Tensor, ratio: float, gamma: float
) -> Tensor:
    """ssToken's selection: a 0/1 float mask ``(B, T)`` of the tokens kept in each sample.

    Per row: ``REL = history_nll − nll`` over the response tokens, min-max normalised as the reference
    code (``(REL − min) / (max − min + 1e-8)``), score ``γ · REL_norm + (1 − γ) · attn_to_prompt``, keep the
    ``ceil(ratio · n)`` highest-scoring of the row's ``n`` response tokens. Ties are broken
    deterministically: a stable sort, the earlier position wins (the reference's ``torch.topk`` leaves
    ties unspecified). Positions outside ``response_mask`` (the prompt, padding) are never kept.

    Args:
        nll: ``(B, T)`` current per-token NLL (detached here), indexed like labels.
        history_nll: ``(B, T)`` the history (reference) model's per-token NLL.
        attn_to_prompt: ``(B, T)`` head-averaged attention of each token, as a query, to the prompt keys.
        response_mask: ``(B, T)`` bool, the selectable response tokens.
        ratio: ``ρ``, fraction of each row's response tokens kept, in ``(0, 1]``.
        gamma: ``γ``, weight of the normalised REL against the attention score, in ``[0, 1]``.

    Example:
        >>> nll = torch.tensor([[0.0, 0.0, 1.2, 0.4, 2.0, 0.9]])
        >>> his = torch.tensor([[0.0, 0.0, 1.5, 0.5, 1.8, 2.0]])
        >>> attn = torch.tensor([[0.0, 0.0, 0.7, 0.2, 0.6, 0.1]])
        >>> select_tokens(nll, his, attn, torch.tensor([[False, False, True, True, True, True]]), 0.6, 0.5)
        tensor([[0., 0., 1., 0., 1., 1.]])
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio={ratio} must lie in (0, 1].")
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"gamma={gamma} must lie in [0, 1].")
    mask = response_mask.bool()
    score = sstoken_scores(nll, history_nll, attn_to_prompt, mask, gamma)
    # non-response positions sort last; a stable descending sort puts the earlier position first on ties
    keyed = torch.where(mask, score, torch.full_like(score, -math.inf))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    keep_counts = torch.ceil(mask.sum(-1, keepdim=True).double() * ratio).long()
    rank = torch.arange(score.shape[-1], device=score.device).expand_as(score)
    selected = torch.zeros_like(mask).scatter(-1, order, rank < keep_counts) & mask
    return selected.float()


class SSToken(TokenMethod):
    """ssToken: keep each sample's response tokens with the highest mix of retrospective excess loss
    (history NLL − current NLL, min-max normalised per sample) and last-layer attention to the prompt.

    Needs a reference (``TokenLM(reference=...)``), used as the *history* model. Modes and their
    correspondence to the paper: ``ema`` is the paper's history (an exponential moving average of the
    trained weights); ``adapter_disabled`` (LoRA) or ``offline`` (scores of the base model from
    ``lightning-tokens score``) is the released code's fixed history, the base model; ``model`` is any other
    frozen model. The attention comes from an :class:`~lightning_tokens.core.attention_probe.AttentionProbe`
    hooked on ``pl_module.causal_lm``'s decoder layer in ``on_fit_start`` and removed in ``teardown``;
    the module must therefore be a Hugging Face Llama/Qwen-style causal LM (``TokenLM``) whose labels
    follow the Hugging Face convention (``shift_labels=True``).

    Choices where the paper and code leave room (default, and why):

    - ``gamma`` (the code's ``--ratio``) = 0.5: the code's default and the paper's main setting.
    - ``ratio`` (the code's ``--data_prop``) = 0.6: the code's default (the paper prefers 0.8 for
      Qwen-2.5-14B).
    - ``warmup_steps`` = 0: the released code scores by attention alone (γ = 0) until it has seen the
      sample with index 10,000 (``pre_index``, an unshuffled loader), a cold start for a history model
      that equals the current one early on. With a fixed base-model history REL is informative from the
      first step, so the default starts mixing at once; set ``warmup_steps`` to the optimizer steps
      that cover those samples to reproduce the code.
    - ``layer`` = -1: the code reads the last layer (the paper says "deep layers").
    - ``prompt`` = ``first``: the prompt is the unlabelled prefix before the first labelled token of a
      row (of each example in packed rows), the code's ``prompt_len`` for single-turn data (the code
      counts *all* unlabelled tokens, which only equals the prefix when there is one prompt);
      ``unlabelled`` counts every unlabelled earlier token (earlier turns of multi-turn chats). Rows
      without a prompt (``{text}`` records, labelled from the start) score 0 attention: REL alone ranks them.
    - Scope: per sample, ``⌈ρ · n_resp⌉`` tokens, as the code; the response of a row is its scored tokens
      (labels set, non-zero pre-forward weight; for single-turn rows the code's ``[prompt_len, seq_len)``).
    - Ties: stable sort, the earlier position wins (``torch.topk`` in the code leaves them unspecified).
    - The attention is recomputed without dropout (deterministic), from the training forward's input.

    Stateless: the warm-up reads ``trainer.global_step``, which checkpoints restore.

    Args:
        ratio: ``ρ``, fraction of each sample's response tokens kept, in ``(0, 1]``.
        gamma: ``γ``, weight of the normalised REL (``1 − γ`` on attention), in ``[0, 1]``.
        warmup_steps: optimizer steps with ``γ = 0`` (attention only) before ``gamma`` applies.
        layer: index of the decoder layer whose attention is read (``-1``: the last).
        prompt: which keys count as the prompt, ``first`` or ``unlabelled`` (see above).

    Logs ``kept_fraction``, ``gamma`` (the effective one), ``rel_kept`` / ``rel_dropped`` (mean REL of kept
    and dropped tokens) and ``attention_kept`` / ``attention_dropped`` (mean attention to the prompt).

    Example::

        model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(), reference=ReferenceSettings("adapter_disabled"))
        trainer = L.Trainer(callbacks=[SSToken(ratio=0.6, gamma=0.5)])
        trainer.fit(model, datamodule=SFTDataModule(train_file="data/examples/sft_chat.jsonl"))
    """

    requires_reference = True

    def __init__(
        self, ratio: float = 0.6, gamma: float = 0.5, warmup_steps: int = 0, layer: int = -1, prompt: PromptKeys = "first"
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"SSToken(ratio={ratio}): ratio must lie in (0, 1].")
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"SSToken(gamma={gamma}): gamma must lie in [0, 1].")
        if warmup_steps < 0:
            raise ConfigError(f"SSToken(warmup_steps={warmup_steps}): warmup_steps must be >= 0.")
        check_choice("SSToken", "prompt", prompt, ("first", "unlabelled"))
        self.ratio = ratio
        self.gamma = gamma
        self.warmup_steps = warmup_steps
        self.layer = layer
        self.prompt = prompt
        self.probe = AttentionProbe(layer_index=layer)

    # ---- hook lifetime ---------------------------------------------------------------------------
    def attach(self, pl_module: pl.LightningModule) -> None:
        """Hook the probe on ``pl_module.causal_lm`` (done in ``on_fit_start``, after ``configure_model``)."""
        causal_lm = getattr(pl_module, "causal_lm", None)
        if causal_lm is None:
            raise ConfigError(
                f"SSToken reads the attention of a Hugging Face causal LM at `pl_module.causal_lm`; "
                f"{type(pl_module).__name__} has none (use TokenLM)."
            )
        self.probe.attach(causal_lm)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # gradient checkpointing re-runs the layer in the backward pass, which records its input again
        self.probe.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.probe.detach()

    # ---- the method --------------------------------------------------------------------------------
    def effective_gamma(self, pl_module: pl.LightningModule | None) -> float:
        """``gamma``, or 0 during the first ``warmup_steps`` optimizer steps."""
        trainer = getattr(pl_module, "_trainer", None) if pl_module is not None else None
        step = trainer.global_step if trainer is not None else 0
        return 0.0 if step < self.warmup_steps else self.gamma

    def attention_to_prompt(self, stats: TokenStats) -> Tensor:
        """``(B, T)`` attention of each token to its prompt, from the probe's recorded training forward."""
        batch = stats.batch
        segments = batch.get("token_example_ids")
        if segments is None and batch.get("position_ids") is not None and batch.get("attention_mask") is None:
            segments = segment_ids_from_positions(batch["position_ids"])
        keys = prompt_key_mask(stats.labels, batch.get("attention_mask"), segments, self.prompt, stats.ignore_index)
        try:
            return self.probe.attention_to(keys).to(stats.labels.device)
        finally:
            self.probe.clear()  # the cached queries and keys are not needed past this step

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        self.reference_of(
            stats,
            "ema for the paper's history, adapter_disabled or offline for the code's fixed base model",
            what="history (reference)",
        )
        if not stats.shift_labels:
            raise ConfigError("SSToken needs labels in the Hugging Face convention (shift_labels=True).")
        if not self.probe.attached:
            raise RuntimeError("SSToken's attention probe is not attached: it is hooked in on_fit_start.")
        history = stats.reference.nll.to(stats.nll.device)
        attention = self.attention_to_prompt(stats)
        gamma = self.effective_gamma(pl_module)
        keep = select_tokens(stats.nll, history, attention, stats.mask, self.ratio, gamma).bool()
        return TokenMethodOutput(mask=keep, logs=_logs(stats, history, attention, keep, gamma))


def _logs(stats: TokenStats, history: Tensor, attention: Tensor, keep: Tensor, gamma: float) -> dict[str, Any]:
    rel = (history - stats.nll.detach().float())[stats.mask]
    attn = attention[stats.mask]
    kept = keep[stats.mask]
    logs: dict[str, Any] = {"kept_fraction": kept.float().mean() if kept.numel() else torch.tensor(0.0), "gamma": gamma}
    if kept.any():
        logs["rel_kept"] = rel[kept].mean()
        logs["attention_kept"] = attn[kept].mean()
    if (~kept).any():
        logs["rel_dropped"] = rel[~kept].mean()
        logs["attention_dropped"] = attn[~kept].mean()
    return logs
