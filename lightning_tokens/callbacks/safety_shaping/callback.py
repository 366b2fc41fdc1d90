"""The ``SafetyShaping`` callback: STAR-DSS as a post-forward token method."""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tokens.callbacks.safety_shaping.functional import ChunkPrefix, star_dss_terms
from lightning_tokens.callbacks.safety_shaping.scores import load_star_scores, star_values_for_batch
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.loss import data_weights as _data_weights
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.reference_scores import lookup_reference_nll
from lightning_tokens.core.stats import TokenStats
from lightning_tokens.models.guardrails import Guardrail
from lightning_tokens.ops.kl import KLDirection, k3_kl, linear_kl

KLEstimator = Literal["full", "k3"]
Normalization = Literal["token_mean", "sequence_sum"]

#: The batch key under which the callback places the per-token values ``V`` (``(B, T)``, like ``labels``).
STAR_VALUES_KEY = "star_values"


class SafetyShaping(TokenMethod):
    r"""STAR-DSS dynamic safety shaping: cross-entropy where the response is safe, KL to the reference where not.

    Per token (``V`` the STAR value of its chunk, see the module docstring):
    ``loss_t = V·CE_t + (1 − V)·λ·KL(π_θ ‖ π_ref)_t``, token mean over the scored tokens. Returned as
    ``TokenMethodOutput(weights=V, extra_loss=(1 − V)·λ·KL)``.

    Needs a reference: the frozen initial aligned model. With LoRA, ``reference: {mode: adapter_disabled}``
    costs no memory; ``model`` (a separate frozen copy) and ``ema`` work too. The full KL reads the
    reference's hidden states and output head; the ``offline`` mode has per-token losses only, so it
    works with ``kl_estimator="k3"`` alone.

    Scores: ``scores_file`` from :func:`precompute_star_scores` / ``lightning-tokens star_score`` (the
    paper's way: one guardrail pass before training), or ``guardrail`` to score each batch on the fly in
    ``on_train_batch_start`` (⌈T/M⌉ guardrail forwards per example and step). Give exactly one.

    Ambiguities of the method (specs/text_methods.md §4 (b)), each an option:

    - ``kl_estimator``: ``full`` (default), the exact full-vocabulary KL per token, computed chunked
      (:func:`lightning_tokens.ops.linear_kl`); the formula as stated. ``k3``: Schulman's ``r − 1 − log r``
      on the label token (a third-party implementation's choice; cheap, works with offline references,
      but biased because the label is not drawn from π_θ).
    - ``kl_direction``: ``policy_reference`` = ``KL(π_θ ‖ π_ref)`` (default; what both paper summaries
      write) or ``reference_policy`` = ``KL(π_ref ‖ π_θ)``.
    - ``kl_coef`` (λ_KL): 1.0 by default. The paper ablates it (Table 19) but its value was not
      retrievable; 1 makes the per-token loss a plain interpolation between CE and KL, and is the value of
      the spec's numeric check.
    - ``normalization``: ``token_mean`` (default): ``Σ / N`` over the scored tokens, the pipeline's exact
      reduction and the spec's numeric check. ``sequence_sum``: ``Σ / (number of sequences)``, i.e. each
      sequence's summed loss averaged over sequences (the micro-batch's token/sequence ratio is folded
      into the weights: exact for one micro-batch per step, per micro-batch under accumulation).
    - ``chunk_prefix``: ``chunk_end`` (default): chunk ``k`` is scored on the prefix ending at its last
      token, as the spec's formula ``V_safe(x, y_{1:min(kM,T)})`` and one summary state; ``chunk_start``
      scores it on the prefix before it. Applies to on-the-fly scoring; a scores file records its own and
      must agree.
    - ``chunk_size`` ``M``: 5, the paper's value (its precompute timing table).
    - The guardrail's prompt template and verdict tokens: options of
      :class:`~lightning_tokens.models.guardrails.CausalLMGuardrail` (``template``, ``safe_token``,
      ``unsafe_token``, ``verdict_prefix``).

    Args:
        scores_file: STAR values from :func:`precompute_star_scores`.
        guardrail: a :class:`~lightning_tokens.models.guardrails.Guardrail` for on-the-fly scoring.
        chunk_size: response tokens per chunk ``M``.
        kl_coef: ``λ_KL``.
        kl_estimator: ``full`` or ``k3``.
        kl_direction: ``policy_reference`` or ``reference_policy``.
        chunk_prefix: ``chunk_end`` or ``chunk_start``.
        normalization: ``token_mean`` or ``sequence_sum``.
        skip_special_tokens: on-the-fly scoring: drop special tokens from the decoded texts.
        kl_chunk_size: tokens per chunk of the full KL (default: about 1 GiB of float32 logits per side).

    Logs ``mean_safety`` (mean V over scored tokens), ``unsafe_fraction`` (V < 0.5) and ``mean_kl``.

    Example::

        model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(), reference=ReferenceSettings("adapter_disabled"))
        trainer = L.Trainer(callbacks=[SafetyShaping(scores_file="star.safetensors", kl_coef=1.0)])
        trainer.fit(model, datamodule=SFTDataModule(train_file="data/examples/sft_chat.jsonl"))
    """

    language_model_only: ClassVar[bool] = True  # its STAR scores index the language model's tokens

    requires_reference = True

    def __init__(
        self,
        scores_file: str | None = None,
        guardrail: Guardrail | None = None,
        chunk_size: int = 5,
        kl_coef: float = 1.0,
        kl_estimator: KLEstimator = "full",
        kl_direction: KLDirection = "policy_reference",
        chunk_prefix: ChunkPrefix = "chunk_end",
        normalization: Normalization = "token_mean",
        skip_special_tokens: bool = True,
        kl_chunk_size: int | None = None,
    ) -> None:
        name = type(self).__name__
        if (scores_file is None) == (guardrail is None):
            raise ConfigError(
                f"{name} needs exactly one source of STAR values: `scores_file` (precomputed with "
                "`lightning-tokens star_score`) or `guardrail` (scored on the fly)."
            )
        if chunk_size < 1:
            raise ConfigError(f"{name}(chunk_size={chunk_size}): chunk_size must be >= 1.")
        if not (kl_coef >= 0 and math.isfinite(kl_coef)):
            raise ConfigError(f"{name}(kl_coef={kl_coef}): kl_coef must be a finite number >= 0.")
        for option, value, allowed in (
            ("kl_estimator", kl_estimator, ("full", "k3")),
            ("kl_direction", kl_direction, ("policy_reference", "reference_policy")),
            ("chunk_prefix", chunk_prefix, ("chunk_end", "chunk_start")),
            ("normalization", normalization, ("token_mean", "sequence_sum")),
        ):
            check_choice(name, option, value, allowed)
        if kl_chunk_size is not None and kl_chunk_size < 1:
            raise ConfigError(f"{name}(kl_chunk_size={kl_chunk_size}): must be >= 1.")
        self.scores_file = scores_file
        self.guardrail = guardrail
        self.chunk_size = chunk_size
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.kl_direction = kl_direction
        self.chunk_prefix = chunk_prefix
        self.normalization = normalization
        self.skip_special_tokens = skip_special_tokens
        self.kl_chunk_size = kl_chunk_size
        self._scores: dict[int, Tensor] | None = None

    # ---- setup ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":  # the method acts in training only
            return
        mode = getattr(getattr(getattr(pl_module, "reference", None), "settings", None), "mode", None)
        if self.kl_estimator == "full" and mode == "offline":
            raise ConfigError(
                f"{self.name}(kl_estimator='full') needs the reference's hidden states and output head for the "
                "full-vocabulary KL, but reference.mode=offline stores per-token losses only: use "
                "kl_estimator='k3' (the single-token estimator) or reference.mode adapter_disabled (LoRA), "
                "model or ema."
            )
        if self.scores_file is not None and self._scores is None:
            self._load_scores()

    def _load_scores(self) -> None:
        path = self.scores_file
        if not os.path.exists(path):
            raise ConfigError(
                f"{self.name}(scores_file={path!r}): no such file; compute it first with `lightning-tokens "
                "star_score --config <config> --guardrail ... --output FILE` (precompute_star_scores)."
            )
        scores, metadata = load_star_scores(path)
        stored = (int(metadata.get("chunk_size", self.chunk_size)), metadata.get("chunk_prefix", self.chunk_prefix))
        if stored != (self.chunk_size, self.chunk_prefix):
            raise ConfigError(
                f"{path} was scored with chunk_size={stored[0]}, chunk_prefix={stored[1]!r} but {self.name} is set to "
                f"chunk_size={self.chunk_size}, chunk_prefix={self.chunk_prefix!r}: make them agree or re-score."
            )
        self._scores = scores

    # ---- V per batch ------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict) and "labels" in batch:
            batch[STAR_VALUES_KEY] = self.batch_values(batch, pl_module)

    def batch_values(self, batch: dict[str, Any], pl_module: pl.LightningModule | None = None) -> Tensor:
        """``(B, T)`` STAR values of a batch (NaN where nothing was scored), from the file or the guardrail."""
        if self.guardrail is not None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise ConfigError(f"{self.name}(guardrail=...) decodes batches with the module's `tokenizer`, which it lacks.")
            device = getattr(pl_module, "device", None)
            if device is not None:
                self.guardrail.to(device)
            return star_values_for_batch(
                self.guardrail, batch, tokenizer, self.chunk_size, self.chunk_prefix, self.skip_special_tokens
            )
        if self._scores is None:
            self._load_scores()
        try:
            return lookup_reference_nll(self._scores, batch, self.scores_file)
        except ValueError as err:
            raise ConfigError(
                f"{err} [{self.name}: the STAR scores no longer match the data; re-run `lightning-tokens star_score`]"
            ) from None

    def _values(self, stats: TokenStats, pl_module: pl.LightningModule | None) -> Tensor:
        batch = stats.batch
        values = batch.get(STAR_VALUES_KEY)
        if values is None:
            if "input_ids" not in batch:
                raise ConfigError(
                    f"{self.name} needs the batch (with input_ids, labels and example ids) in the token loss: "
                    "pass `batch=` to token_loss."
                )
            values = self.batch_values(batch, pl_module)
        values = values.to(device=stats.mask.device, dtype=torch.float32)
        active = values[stats.mask]
        if torch.isnan(active).any():
            raise ConfigError(
                f"{self.name}: {int(torch.isnan(active).sum())} labelled tokens have no STAR value (the scores were "
                "computed on other labels): re-run `lightning-tokens star_score` on this data."
            )
        if (active < 0).any() or (active > 1).any():
            raise ConfigError(f"{self.name}: STAR values must lie in [0, 1].")
        return torch.where(stats.mask, values, torch.ones_like(values))

    # ---- KL ------------------------------------------------------------------------------------------
    def _kl(self, stats: TokenStats, needed: Tensor) -> Tensor:
        """``(B, T)`` per-token KL at ``needed`` positions (a subset of ``stats.mask``), 0 elsewhere."""
        reference = stats.reference
        if reference is None:
            raise RuntimeError(
                f"{self.name} got no reference statistics: configure the module's `reference` "
                "(adapter_disabled with LoRA, model or ema)."
            )
        if self.kl_estimator == "k3":
            ref_nll = reference.nll.detach().to(stats.nll.device).float()
            kl = k3_kl(-stats.nll, -ref_nll, self.kl_direction)
            return torch.where(needed, kl, torch.zeros_like(kl))
        ref_hidden = getattr(reference, "hidden", None)
        ref_logits = getattr(reference, "logits", None)
        if ref_hidden is None and ref_logits is None:
            raise ConfigError(
                f"{self.name}(kl_estimator='full') needs the reference's hidden states and head; this reference has "
                "per-token losses only (offline): use kl_estimator='k3' or another reference mode."
            )
        selected = needed[stats.mask]  # over the active rows, in stats order
        rows = stats._rows()[selected]
        aligned = stats._aligned_mask()
        if stats.hidden is not None and ref_hidden is not None:
            ref_rows = stats._predictions(ref_hidden)[aligned][selected]
            head, ref_head = stats.head, reference.head
            values = linear_kl(
                rows, head.weight, ref_rows.to(rows.device), ref_head.weight.to(rows.device), head.bias,
                None if ref_head.bias is None else ref_head.bias.to(rows.device),
                chunk_size=self.kl_chunk_size, direction=self.kl_direction,
            )
        elif stats.logits is not None and ref_logits is not None:
            ref_rows = stats._predictions(ref_logits)[aligned][selected].detach()
            log_p = torch.log_softmax(rows.float(), dim=-1)
            log_q = torch.log_softmax(ref_rows.float().to(rows.device), dim=-1)
            if self.kl_direction == "reference_policy":
                values = (log_q.exp() * (log_q - log_p)).sum(-1)
            else:
                values = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            raise ConfigError(
                f"{self.name}: the current statistics and the reference's must both come from hidden states + head "
                "or both from logits."
            )
        active = torch.zeros(selected.shape, dtype=values.dtype, device=values.device).masked_scatter(selected, values)
        return stats.scatter(active)

    # ---- the method ----------------------------------------------------------------------------------
    def _scale(self, stats: TokenStats) -> float:
        if self.normalization == "token_mean":
            return 1.0
        active = int(stats.mask.sum())
        token_ids = stats.batch.get("token_example_ids")
        if token_ids is not None:
            sequences = int(token_ids.to(stats.mask.device)[stats.mask].unique().numel())
        else:
            sequences = int(stats.mask.any(dim=1).sum())
        return active / max(sequences, 1)

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        mask = stats.mask
        v = self._values(stats, pl_module)
        needed = mask & (v < 1) if self.kl_coef > 0 else torch.zeros_like(mask)
        kl = self._kl(stats, needed) if bool(needed.any()) else torch.zeros_like(v)
        data_weights = _data_weights(stats, stats.batch)
        weights, extra = star_dss_terms(v, kl, self.kl_coef, data_weights, self._scale(stats))
        weights = torch.where(mask, weights, torch.ones_like(weights))
        extra = torch.where(mask, extra, torch.zeros_like(extra))
        logs: dict[str, float | Tensor] = {}
        active = v[mask]
        if active.numel():
            logs["mean_safety"] = active.mean()
            logs["unsafe_fraction"] = (active < 0.5).float().mean()
            logs["mean_kl"] = kl.detach()[mask].mean()
        return TokenMethodOutput(weights=weights, extra_loss=extra, logs=logs)
