"""`TokenLossMixin`: how any LightningModule joins the token-loss pipeline with one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_tokens.core.distributed import mean_over_ranks
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethodOutput, token_methods
from lightning_tokens.core.reduction import TokenCountNormalizer, global_sum
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats


class TokenLossMixin:
    """Adds :meth:`token_loss` to a LightningModule: per-token statistics, the token methods found in
    ``trainer.callbacks``, and a token-mean reduction that is exact under gradient accumulation and
    data parallelism.

    Put it before ``LightningModule`` in the bases and replace the line that computes the loss::

        class MyModule(TokenLossMixin, L.LightningModule):
            def training_step(self, batch, batch_idx):
                logits = self.net(batch["input_ids"])
                return self.token_loss(batch["labels"], logits=logits, batch=batch)

    Pass ``hidden=`` and ``head=`` (the output projection) instead of ``logits=`` to use the fused ops,
    which never materialise the ``(tokens × vocab)`` logits. If you override ``on_before_optimizer_step``
    call ``super()``: that is where the gradients get their exact token-count normalisation.

    Set the class or instance attribute ``token_loss_backend`` (``"auto"``, ``"torch"``, ``"liger"``) to
    choose the fused-op backend.

    Note:
        Automatic optimisation only. Each training step logs ``train/loss`` (the training objective:
        token mean of the micro-batch's kept, weighted per-token losses), ``train/nll`` (the plain
        token-mean NLL of the labelled tokens, whatever post-forward methods weight, select or replace:
        the one curve that runs with different methods share; tokens a pre-forward method weights 0 are
        not predicted, so not counted), ``train/kept_fraction`` (kept tokens / tokens with
        labels) and what each method reports under ``train/<MethodName>/``. Under data parallelism the
        first three are global (sums all-reduced before dividing) and the methods' logs are averaged over
        the ranks.
    """

    token_loss_backend: str = "auto"

    def token_loss(
        self,
        labels: Tensor,
        *,
        hidden: Tensor | None = None,
        head: torch.nn.Module | Tensor | None = None,
        logits: Tensor | None = None,
        batch: dict[str, Any] | None = None,
        shift_labels: bool = True,
        ignore_index: int = IGNORE_INDEX,
        reference: Any = None,
        stream: str | None = None,
    ) -> Tensor:
        """Loss of one (micro-)batch through the token-loss pipeline.

        Args:
            labels: ``(B, T)`` label ids with ``ignore_index`` where no loss is taken.
            hidden: ``(B, T, D)`` final hidden states; use with ``head``.
            head: the output head (``nn.Linear`` or a ``(V, D)`` weight).
            logits: ``(B, T, V)`` logits, if the module already has them.
            batch: the batch, for ``token_weights``, ``sample_weights`` and fields methods read.
            shift_labels: ``True`` if labels are a copy of the inputs (Hugging Face convention), ``False``
                if ``labels[:, t]`` is already the target predicted at position ``t``.
            ignore_index: label value that takes no loss.
            reference: the reference model's statistics on this batch (``stats.reference`` for methods).
            stream: ``None`` for the module's main token stream; a name (e.g. ``"acoustic"``) for a second
                stream of tokens scored by another head in the same step (an acoustic decoder beside the
                language model). A named stream is the token mean of this micro-batch over its kept tokens of
                every rank, logged as ``train/<stream>/loss``, ``train/<stream>/nll`` and
                ``train/<stream>/<Method>/...``; the methods that read the language model (a reference model,
                auxiliary heads: ``requires_reference`` or ``language_model_only``) apply to the main stream only. Under data parallelism it is exact; under gradient accumulation it is the mean of
                the micro-batches' token means (the main stream stays the exact window token mean).

        Returns:
            In training: the scalar to backpropagate (see :mod:`lightning_tokens.core.reduction`). Outside
            training: the plain token-mean NLL, methods not applied.
        """
        batch = {} if batch is None else batch
        # the vocabulary check reads label values (a device sync): once per process is enough
        vocab_size = None if self.__dict__.get("_lt_labels_checked") else _vocab_size(head, logits)
        _check_labels(labels, batch, vocab_size, ignore_index)
        self.__dict__["_lt_labels_checked"] = True
        trainer = self._trainer  # type: ignore[attr-defined]
        training = trainer is not None and trainer.training
        methods = token_methods(trainer) if training else []
        if stream is not None:
            methods = [m for m in methods if not (m.requires_reference or m.language_model_only)]
        stats = TokenStats(
            labels,
            hidden=hidden,
            head=None if head is None else OutputHead.from_module(head),
            logits=logits,
            batch=batch if training else {},
            shift_labels=shift_labels,
            ignore_index=ignore_index,
            with_entropy=any(m.needs_entropy for m in methods),
            backend=self.token_loss_backend,
            reference=reference,
        )
        if not training:
            count = stats.mask.sum()
            return stats.nll.sum() / count.clamp(min=1)
        return self._training_token_loss(stats, methods, batch, stream)

    # ---- training --------------------------------------------------------------------------------
    def _training_token_loss(self, stats: TokenStats, methods: list, batch: dict[str, Any], stream: str | None = None) -> Tensor:
        module: pl.LightningModule = self  # type: ignore[assignment]
        trainer = module._trainer
        prefix = "train/" if stream is None else f"train/{stream}/"
        outcome = run_token_methods(stats, methods, module, data_weights(stats, batch), prefix=prefix)
        per_token = stats.nll if outcome.loss is None else outcome.loss
        weights, keep, extra = outcome.weights, outcome.keep, outcome.extra_loss
        keep = keep & (weights != 0)
        token_loss = weights * per_token if extra is None else weights * per_token + extra
        token_loss = torch.where(keep, token_loss, torch.zeros_like(token_loss))
        kept = keep.sum()
        loss_sum = token_loss.sum()
        # the plain NLL of every labelled token, whatever the methods did: one curve all runs share
        # (stats.nll is 0 outside stats.mask)
        nll_sum = stats.nll.detach().sum()
        # one all-reduce serves the normaliser and the logs (global token means, not means of the ranks' means)
        total_kept, total_loss, total_labelled, total_nll = global_sum(
            torch.stack([kept.float(), loss_sum.detach().float(), stats.mask.sum().float(), nll_sum.float()]), trainer
        )
        if stream is None:
            divisor = self._token_normalizer.divisor(kept, trainer, global_count=total_kept)
        else:  # a second stream: this micro-batch's global token mean (the window rescale is the main stream's)
            divisor = max(float(total_kept), 1.0)
        batch_size = stats.labels.shape[0]
        module.log(f"{prefix}loss", total_loss / total_kept.clamp(min=1), prog_bar=stream is None, batch_size=batch_size)
        module.log(f"{prefix}nll", total_nll / total_labelled.clamp(min=1), batch_size=batch_size)
        module.log(f"{prefix}kept_fraction", total_kept / total_labelled.clamp(min=1), batch_size=batch_size)
        return loss_sum / divisor

    @property
    def _token_normalizer(self) -> TokenCountNormalizer:
        normalizer = self.__dict__.get("_lt_normalizer")
        if normalizer is None:
            normalizer = self.__dict__["_lt_normalizer"] = TokenCountNormalizer()
        return normalizer

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        module: pl.LightningModule = self  # type: ignore[assignment]
        if module.automatic_optimization:
            self._token_normalizer.finish_window(module, module.trainer)
        parent = super()
        if hasattr(parent, "on_before_optimizer_step"):
            parent.on_before_optimizer_step(optimizer)  # type: ignore[misc]


@dataclass
class MethodOutcome:
    """The post-forward methods of one step, combined: weights multiplied, masks intersected (with the
    labelled positions), at most one replacing per-token loss, extra terms summed."""

    weights: Tensor
    keep: Tensor
    loss: Tensor | None = None
    replaced_by: str | None = None
    extra_loss: Tensor | None = None
    outputs: dict[str, TokenMethodOutput] = field(default_factory=dict)


def run_token_methods(
    stats: TokenStats, methods: list, module: pl.LightningModule, weights: Tensor, log: bool = True, prefix: str = "train/"
) -> MethodOutcome:
    """Ask every post-forward method for its output, combine them, and log what they report (averaged over
    the ranks). ``weights`` are the data's weights that the methods multiply into. Shared by every module whose
    loss is built from per-token terms (``TokenLossMixin``'s token mean, ``GRPO``'s policy loss). Each method's
    own output stays in ``outcome.outputs`` (by method name); ``log=False`` logs nothing (a re-scoring outside
    the training step, e.g. :class:`~lightning_tokens.callbacks.token_maps.TokenMapLogger`'s)."""
    outcome = MethodOutcome(weights=weights, keep=stats.mask.clone())
    trainer = module._trainer
    logs: dict[str, float | Tensor] = {}
    for method in methods:
        out: TokenMethodOutput = method.compute(stats, module)
        if out.weights is not None:
            outcome.weights = outcome.weights * out.weights
        if out.mask is not None:
            outcome.keep = outcome.keep & out.mask.bool()
        if out.loss is not None:
            if outcome.replaced_by is not None:
                raise ConfigError(f"{method.name} and {outcome.replaced_by} both replace the per-token loss; keep one.")
            outcome.loss, outcome.replaced_by = out.loss, method.name
        if out.extra_loss is not None:
            outcome.extra_loss = out.extra_loss if outcome.extra_loss is None else outcome.extra_loss + out.extra_loss
        logs.update({f"{prefix}{method.name}/{key}": value for key, value in out.logs.items()})
        outcome.outputs[method.name] = out
    if not log:
        return outcome
    if trainer is not None and trainer.world_size > 1 and methods:
        logs = mean_over_ranks(logs, trainer)
    if trainer is not None:
        for key, value in logs.items():
            module.log(key, value, on_step=True, on_epoch=False)
    return outcome


def data_weights(stats: TokenStats, batch: dict[str, Any]) -> Tensor:
    """Weights that travel with the data: ``token_weights`` (B, T) times ``sample_weights`` (B,)."""
    weights = torch.ones_like(stats.labels, dtype=torch.float32)
    token_weights = batch.get("token_weights")
    if token_weights is not None:
        weights = weights * token_weights.float()
    sample_weights = batch.get("sample_weights")
    if sample_weights is not None:
        if sample_weights.shape != stats.labels.shape[:1]:
            raise ConfigError(
                f"sample_weights must have shape (batch,) = {tuple(stats.labels.shape[:1])}, "
                f"got {tuple(sample_weights.shape)}."
            )
        weights = weights * sample_weights.float().unsqueeze(1)
    return weights


def _vocab_size(head: torch.nn.Module | Tensor | None, logits: Tensor | None) -> int | None:
    if logits is not None:
        return logits.shape[-1]
    if head is None:
        return None
    return OutputHead.from_module(head).weight.shape[0]


def _check_labels(labels: Tensor, batch: dict[str, Any], vocab_size: int | None, ignore_index: int) -> None:
    """Fail early, naming the field and the fix, on malformed labels."""
    if labels.dim() != 2:
        raise ConfigError(f"labels must be 2-D (batch, sequence), got shape {tuple(labels.shape)}.")
    input_ids = batch.get("input_ids")
    if input_ids is not None and input_ids.shape != labels.shape:
        raise ConfigError(
            f"labels have shape {tuple(labels.shape)} but input_ids have {tuple(input_ids.shape)}: labels must "
            "have the shape of input_ids, with -100 where no loss is taken (pad them in the collate function)."
        )
    for key in ("token_weights",):
        value = batch.get(key)
        if value is not None and value.shape != labels.shape:
            raise ConfigError(
                f"batch['{key}'] has shape {tuple(value.shape)} but labels have {tuple(labels.shape)}: "
                "per-token weights must be indexed like labels."
            )
    if labels.dtype.is_floating_point:
        raise ConfigError(f"labels must be integer token ids, got dtype {labels.dtype}.")
    if vocab_size is not None and labels.numel():
        valid = labels[labels != ignore_index]
        if valid.numel():
            low, high = int(valid.min()), int(valid.max())
            if high >= vocab_size or low < 0:
                raise ConfigError(
                    f"labels contain token id {high if high >= vocab_size else low} outside the vocabulary "
                    f"[0, {vocab_size}): the tokenizer and the model disagree (resize the model's embeddings "
                    f"to len(tokenizer)) or labels use a padding value other than {ignore_index}."
                )

