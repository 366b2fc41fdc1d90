r"""Token saliency maps: how much each response token's log-probability moves between two contexts, or between
two models (FaGeL, arXiv 2412.20297, spec §9; its saliency map visualises what feedback fine-tuning changed).

- **Contexts** (one model): :math:`S_t = \log p(y_t \mid x, f^+, y_{<t}) - \log p(y_t \mid x, f^-, y_{<t})`:
  negative where the negative feedback makes the token more likely (the tokens CUT flags when
  :math:`-S_t > \log\lambda`).
- **Models** (one context): :math:`S_t = \log p_\text{tuned}(y_t \mid x, y_{<t}) - \log p_\text{base}(y_t \mid x, y_{<t})`:
  what fine-tuning changed.

:func:`saliency_scores` is the arithmetic, :func:`response_logprobs` the per-token log-probabilities (fused
token ops, no ``(tokens × vocab)`` logits), :func:`saliency_map` both on a paired batch
(:mod:`lightning_tokens.datamodules.contrastive`), and :meth:`SaliencyReport.write` the heat map (PNG + HTML
through :mod:`lightning_tokens.analysis.token_maps`) with the values (JSON, CSV). ``lightning-tokens
saliency`` runs it from a config.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_tokens.analysis.token_maps import ColorScale, TokenMap, write_token_maps
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats

__all__ = ["SaliencyExample", "SaliencyReport", "response_logprobs", "saliency_command", "saliency_map", "saliency_scores"]


def saliency_scores(logp_a: Tensor, logp_b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token saliency ``S_t = log p_a(y_t) - log p_b(y_t)``, 0 outside ``mask``.

    Example:
        >>> s = saliency_scores(torch.tensor([0.4, 0.3]).log(), torch.tensor([0.5, 0.2]).log())
        >>> [round(v, 4) for v in s.tolist()]
        [-0.2231, 0.4055]
    """
    if logp_a.shape != logp_b.shape:
        raise ConfigError(f"saliency needs log-probabilities of the same tokens: shapes {tuple(logp_a.shape)} and {tuple(logp_b.shape)}.")
    scores = logp_a.double() - logp_b.double()
    return scores if mask is None else torch.where(mask.bool(), scores, torch.zeros_like(scores))


def _hidden_and_head(model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
    """Final hidden states and output head of a module with ``hidden_states``/``output_head`` (TokenLM) or of a
    Hugging Face causal LM."""
    if callable(getattr(model, "hidden_states", None)) and callable(getattr(model, "output_head", None)):
        return model.hidden_states(batch), model.output_head()
    if callable(getattr(model, "get_decoder", None)) and callable(getattr(model, "get_output_embeddings", None)):
        out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        return out.last_hidden_state, OutputHead.from_module(model.get_output_embeddings())
    raise ConfigError(
        f"saliency scores a TokenLM-like module (hidden_states, output_head) or a Hugging Face causal LM; got {type(model).__name__}."
    )


@torch.no_grad()
def response_logprobs(
    model: Any, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """``(B, T)`` float32 ``log p(labels[:, t] | input_ids[:, <t])`` (Hugging Face label convention), 0 where
    ``labels`` is ``-100``, through the fused token ops.

    Args:
        model: a TokenLM-like module or a Hugging Face causal LM.
        input_ids: ``(B, T)`` token ids.
        labels: ``(B, T)`` labels (a copy of ``input_ids`` with ``-100`` on what is not scored).
        attention_mask: ``(B, T)`` padding mask.
        backend: fused-op backend.
    """
    batch = {"input_ids": input_ids, "labels": labels}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask
    hidden, head = _hidden_and_head(model, batch)
    head = head if isinstance(head, OutputHead) else OutputHead.from_module(head)
    stats = TokenStats(labels, hidden=hidden, head=head, backend=backend)
    return -stats.nll.float()


@dataclass
class SaliencyExample:
    """One response, token by token.

    Attributes:
        example_id: the record's id.
        context: the context the response is scored under (the positive one in ``contexts`` mode).
        tokens: the response tokens' text.
        token_ids: their ids.
        logp_a: log-probabilities under A (the positive context, or the tuned model).
        logp_b: under B (the negative context, or the base model).
        saliency: ``logp_a - logp_b``.
    """

    example_id: int
    context: str
    tokens: list[str]
    token_ids: list[int]
    logp_a: list[float]
    logp_b: list[float]
    saliency: list[float]


@dataclass
class SaliencyReport:
    """A saliency map of several responses.

    Attributes:
        mode: ``contexts`` or ``models``.
        names: what A and B are (``("positive", "negative")`` or ``("tuned", "base")``).
        examples: the responses.
        threshold: CUT's ``λ``: tokens with ``p_b / p_a > λ`` are marked ``flagged`` on hover (contexts mode).
    """

    mode: Literal["contexts", "models"]
    names: tuple[str, str]
    examples: list[SaliencyExample] = field(default_factory=list)
    threshold: float = 1.1

    def summary(self) -> dict[str, float]:
        """Token counts, mean saliency, the share of tokens more likely under B, and (contexts mode) under CUT's rule."""
        values = [v for e in self.examples for v in e.saliency]
        out: dict[str, float] = {"examples": float(len(self.examples)), "tokens": float(len(values))}
        if values:
            out["mean_saliency"] = sum(values) / len(values)
            out["fraction_more_likely_under_b"] = sum(v < 0 for v in values) / len(values)
            if self.mode == "contexts":
                out["fraction_flagged"] = sum(-v > math.log(self.threshold) for v in values) / len(values)
        return out

    def token_maps(self, width: int = 96) -> list[TokenMap]:
        """One :class:`~lightning_tokens.analysis.token_maps.TokenMap` per response, ``S_t`` as the value, titled by the
        end of its context (what fits ``width`` characters)."""
        a, b = self.names
        maps = []
        for i, example in enumerate(self.examples):
            details = []
            for la, lb, s in zip(example.logp_a, example.logp_b, example.saliency):
                item: dict[str, Any] = {f"log p ({a})": la, f"log p ({b})": lb, f"p ({a})": math.exp(la), f"p ({b})": math.exp(lb)}
                if self.mode == "contexts":
                    item[f"ratio p({b})/p({a})"] = math.exp(-s)
                    item["flagged (CUT)"] = bool(-s > math.log(self.threshold))
                details.append(item)
            context = example.context.replace("\n", " ").strip()
            room = max(width - len(f"#{i} · "), 8)
            context = context if len(context) <= room else "…" + context[-(room - 1) :]
            maps.append(TokenMap(example.tokens, list(example.saliency), details=details, title=f"#{i} · {context}"))
        return maps

    def scale(self) -> ColorScale:
        a, b = self.names
        return ColorScale(cmap="RdBu", center=0.0, label=f"log p({a}) − log p({b})")

    def write(self, folder: str, width: int = 96) -> dict[str, str]:
        """``saliency.png``, ``saliency.html``, ``saliency.json`` (the maps), ``saliency_tokens.csv`` (one row per
        token) and ``summary.json`` in ``folder``; returns their paths."""
        a, b = self.names
        title = f"Token saliency: log p({a}) − log p({b})"
        paths = write_token_maps(self.token_maps(width), folder, "saliency", self.scale(), title=title, width=width)
        paths["csv"] = os.path.join(folder, "saliency_tokens.csv")
        with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["example", "example_id", "position", "token_id", "token", f"logp_{a}", f"logp_{b}", "saliency"])
            for i, e in enumerate(self.examples):
                for t, (tid, tok, la, lb, s) in enumerate(zip(e.token_ids, e.tokens, e.logp_a, e.logp_b, e.saliency)):
                    writer.writerow([i, e.example_id, t, tid, tok, f"{la:.6f}", f"{lb:.6f}", f"{s:.6f}"])
        paths["summary"] = os.path.join(folder, "summary.json")
        with open(paths["summary"], "w", encoding="utf-8") as handle:
            json.dump({"mode": self.mode, "names": list(self.names), **self.summary()}, handle, indent=2)
        return paths


def _token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def saliency_map(
    batch: dict[str, Tensor],
    model: Any,
    tokenizer: Any = None,
    reference: Any = None,
    threshold: float = 1.1,
    backend: str = "auto",
) -> SaliencyReport:
    """The saliency map of a paired batch.

    Args:
        batch: ``input_ids`` / ``attention_mask`` / ``labels`` (the response under the positive context) and,
            without ``reference``, ``negative_input_ids`` / ``negative_attention_mask`` / ``negative_labels``
            (:func:`~lightning_tokens.datamodules.contrastive.collate_contrastive` builds it).
        model: a TokenLM-like module or a Hugging Face causal LM (the tuned model in ``models`` mode).
        tokenizer: decodes the tokens (ids are shown without one).
        reference: the base model: ``models`` mode, ``S_t = log p_model - log p_reference`` on the positive side.
            ``None``: ``contexts`` mode, ``S_t = log p(y | positive) - log p(y | negative)`` under ``model``.
        threshold: CUT's ``λ`` for the ``flagged`` mark (contexts mode).
        backend: fused-op backend.

    Returns:
        :class:`SaliencyReport`.
    """
    from lightning_tokens.callbacks.cut import align_negative, response_positions

    labels = batch["labels"]
    logp_a = response_logprobs(model, batch["input_ids"], labels, batch.get("attention_mask"), backend)
    if reference is not None:
        mode, names = "models", ("tuned", "base")
        logp_b = response_logprobs(reference, batch["input_ids"], labels, batch.get("attention_mask"), backend)
    else:
        if "negative_input_ids" not in batch or "negative_labels" not in batch:
            raise ConfigError(
                "a saliency map between contexts needs paired batches (negative_input_ids, negative_labels): use "
                "ContrastiveDataModule, or give a reference model (base vs tuned)."
            )
        mode, names = "contexts", ("positive", "negative")
        negative = response_logprobs(
            model, batch["negative_input_ids"], batch["negative_labels"], batch.get("negative_attention_mask"), backend
        )
        rows = batch.get("has_negative")
        logp_b = align_negative(negative, labels, batch["negative_labels"], rows=None if rows is None else rows.to(labels.device))
    positions = response_positions(labels)
    scores = saliency_scores(logp_a, logp_b, positions)
    report = SaliencyReport(mode=mode, names=names, threshold=threshold)  # type: ignore[arg-type]
    has_negative = batch.get("has_negative")
    example_ids = batch.get("example_id")
    for row in range(labels.shape[0]):
        if mode == "contexts" and has_negative is not None and not bool(has_negative[row]):
            continue
        where = positions[row]
        ids = labels[row][where].tolist()
        context_ids = batch["input_ids"][row][: int(where.nonzero()[0, 0])].tolist() if where.any() else []
        report.examples.append(SaliencyExample(
            example_id=int(example_ids[row]) if example_ids is not None else row,
            context=tokenizer.decode(context_ids, skip_special_tokens=True) if tokenizer is not None else "",
            tokens=_token_texts(tokenizer, ids),
            token_ids=ids,
            logp_a=logp_a[row][where].tolist(),
            logp_b=logp_b[row][where].tolist(),
            saliency=scores[row][where].tolist(),
        ))
    return report


def saliency_command(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    base: str | None = None,
    tuned: str | None = None,
    split: Literal["train", "val"] = "train",
    num_examples: int = 8,
    ckpt_path: str | None = None,
    trust_checkpoint: bool = False,
    threshold: float = 1.1,
    width: int = 96,
) -> dict[str, float]:
    """``lightning-tokens saliency``: the first ``num_examples`` records of the datamodule's ``split`` (file order
    for :class:`~lightning_tokens.datamodules.contrastive.ContrastiveDataModule`), scored between their two contexts
    (no ``tuned``) or between ``base`` and ``tuned``; writes the map to ``output``."""
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_tokens.cli.offline_steps import _load_tuned, attach_to_trainer

    if num_examples < 1:
        raise ConfigError(f"num_examples={num_examples} must be >= 1.")
    attach_to_trainer(trainer, model, datamodule)
    load = getattr(model, "load_frozen_causal_lm", None)
    if load is None:
        raise ConfigError(f"saliency loads and scores models through a TokenLM-like module; got {type(model).__name__}.")
    device = trainer.strategy.root_device
    reference = None
    if tuned is not None:
        base_name = base or getattr(model, "model_name", None)
        if base_name is None:
            raise ConfigError("saliency with `tuned` compares it to `base`: set --base (the model before fine-tuning).")
        scorer, reference = _load_tuned(load, base_name, tuned).to(device), load(base_name).to(device)
    elif base is not None:
        scorer = load(base).to(device)
    else:
        model.configure_model()
        if ckpt_path:
            from lightning_tokens.modules.checkpoints import consolidated_state_dict, model_weights

            state: dict[str, Any] = consolidated_state_dict(ckpt_path, trust_checkpoint)
            model.load_state_dict(model_weights(state["state_dict"]))
        model.to(device).eval()
        scorer = model
    batch = _first_examples(datamodule, split, num_examples)
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    report = saliency_map(batch, scorer, getattr(model, "tokenizer", None), reference, threshold, getattr(model, "token_loss_backend", "auto"))
    paths = report.write(output, width=width)
    rank_zero_info(", ".join(f"{k}={v:.4f}" for k, v in report.summary().items()) + f"\nwritten: {', '.join(paths.values())}")
    return report.summary()


def _first_examples(datamodule: pl.LightningDataModule, split: str, count: int) -> dict[str, Tensor]:
    """The first ``count`` examples of ``split``: in file order from a datamodule with ``dataset(split)`` and
    ``collate()`` (ContrastiveDataModule), else the first rows of its dataloader."""
    datamodule.setup("fit")
    dataset = getattr(datamodule, "dataset", None)
    collate = getattr(datamodule, "collate", None)
    if callable(dataset) and callable(collate):
        examples = dataset(split)
        return collate()([examples[i] for i in range(min(count, len(examples)))])
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    rows: list[dict[str, Tensor]] = []
    taken = 0
    for batch in loader:
        n, length = batch["labels"].shape
        take = min(count - taken, n)
        # per-row fields only: (B,) values and (B, T) values indexed like labels
        rows.append({
            k: v[:take] for k, v in batch.items()
            if isinstance(v, Tensor) and v.shape[:1] == (n,) and (v.dim() == 1 or (v.dim() == 2 and v.shape[1] == length))
        })
        taken += take
        if taken >= count:
            break
    if not rows:
        raise ConfigError(f"the datamodule's {split} split has no examples.")
    keys = set.intersection(*(set(r) for r in rows))
    width = max(r["labels"].shape[1] for r in rows)
    out = {}
    for key in keys:
        parts = []
        for r in rows:
            value = r[key]
            if value.dim() == 2 and value.shape[1] < width:  # right padding, as the collators pad
                fill = IGNORE_INDEX if key == "labels" else 0
                value = torch.nn.functional.pad(value, (0, width - value.shape[1]), value=fill)
            parts.append(value)
        out[key] = torch.cat(parts)
    return out
