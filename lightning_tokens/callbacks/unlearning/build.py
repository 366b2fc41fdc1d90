"""The WHP data-preparation step: run the baseline (on the translated text) and the reinforced model (on the
original) over a datamodule's training examples and write their generic targets to a file."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_tokens.callbacks.unlearning.anchors import AlignedTokens, align_translation, load_anchors
from lightning_tokens.callbacks.unlearning.functional import generic_targets_from_logits
from lightning_tokens.callbacks.unlearning.targets_file import GenericTargets, save_generic_targets
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.stats import IGNORE_INDEX

if TYPE_CHECKING:
    from lightning_tokens.datamodules.sft import SFTDataModule
    from lightning_tokens.modules.causal_lm import TokenLM

__all__ = ["build_generic_labels"]

TargetKind = Literal["hard", "soft"]


@dataclass
class _Models:
    """How to run the baseline and the reinforced model: a context to enter and a causal LM each."""

    baseline: Callable[[], Any]
    reinforced: Callable[[], Any]
    baseline_lm: torch.nn.Module | None
    reinforced_lm: torch.nn.Module | None


@contextmanager
def _attach_reinforced(model: TokenLM, path: str) -> Iterator[_Models]:
    """The reinforced model next to the baseline: a peft adapter folder loaded onto the baseline's own
    weights (baseline = adapter disabled), or a full model folder loaded as a second model."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from lightning_tokens.modules.lazy_backends import hide_unused_bitsandbytes, import_peft

        PeftModel = import_peft().PeftModel
        base = model.model
        with hide_unused_bitsandbytes():
            peft_model = PeftModel.from_pretrained(base, path).eval()
        model.model = peft_model
        try:
            yield _Models(peft_model.disable_adapter, nullcontext, None, None)
        finally:
            model.model = peft_model.unload()
    elif os.path.isfile(os.path.join(path, "config.json")):
        from lightning_tokens.models.presets import load_causal_lm

        reinforced = load_causal_lm(path, vocab_size=len(model.tokenizer))
        reinforced.to(next(model.model.parameters()).device).eval()
        yield _Models(nullcontext, nullcontext, model.causal_lm, reinforced)
    else:
        raise ConfigError(
            f"reinforced_adapter={path!r} holds neither a peft adapter (adapter_config.json) nor a model "
            "(config.json): give the folder written by SavePretrained / TokenLM.save_pretrained in step 1."
        )


def _hidden(model: TokenLM, causal_lm: torch.nn.Module | None, rows: list[list[int]], pad_id: int, device: Any) -> Tensor:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    return model.hidden_states(batch, causal_lm=causal_lm)


def _head(model: TokenLM, causal_lm: torch.nn.Module | None) -> torch.nn.Module:
    return (causal_lm if causal_lm is not None else model.causal_lm).get_output_embeddings()


def _example_segments(datamodule: SFTDataModule) -> dict[int, Any]:
    """Parsed training records by example id (texts of the segments, bos/eos flags)."""
    return {p.example_id: p for p in datamodule._split_records()["train"]}


def _aligned_example(
    tokenizer: Any, parsed: Any, stored_ids: Tensor, anchors: dict[str, str], bos: list[int]
) -> AlignedTokens:
    eos = [int(tokenizer.eos_token_id)] if parsed.eos else []
    aligned = align_translation(tokenizer, [s.text for s in parsed.segments], anchors, bos if parsed.bos else [], eos)
    n = stored_ids.numel()
    if aligned.original_ids[:n] != stored_ids.tolist():
        raise ConfigError(
            f"{parsed.location}: re-tokenizing the example does not reproduce the datamodule's tokens "
            "(truncate_left or a chat template that renders differently?); use truncation: truncate_right or error."
        )
    if n < len(aligned.original_ids):  # truncate_right cut the end: keep the first n positions
        aligned.original_ids = aligned.original_ids[:n]
        aligned.position_map = aligned.position_map[:n]
        aligned.repeated = aligned.repeated[:n]
        aligned.lowered = aligned.lowered[:n]
    return aligned


def _check_arguments(model: TokenLM, datamodule: Any, targets: str, alpha: float, top_k: int, seen_penalty: float) -> None:
    """The argument errors of :func:`build_generic_labels`, raised before any work."""
    from lightning_tokens.datamodules.sft import SFTDataModule

    if targets not in ("hard", "soft"):
        raise ConfigError(f"targets={targets!r} must be 'hard' or 'soft'.")
    if alpha < 0 or top_k < 1 or seen_penalty < 0:
        raise ConfigError(f"alpha={alpha} and seen_penalty={seen_penalty} must be >= 0 and top_k={top_k} >= 1.")
    if not isinstance(datamodule, SFTDataModule):
        raise TypeError(f"generic labels are built from an SFTDataModule's files, got {type(datamodule).__name__}.")
    if getattr(model, "lora", None) is not None:
        raise ConfigError(
            "the generic-labels step runs the baseline model: set the model's `lora` to null (the reinforced "
            "adapter of step 1 is attached from `reinforced_adapter`)."
        )


def _target_positions(
    items: list[dict[str, Any]], aligned: list[AlignedTokens], counts: dict[str, int]
) -> list[tuple[int, int, int]]:
    """The positions of a batch that get a target, as ``(row, original position, translated position)``:
    labelled in the data (position 0 never is), mapped, not a repeated anchor. Adds the batch's anchored
    terms, labelled tokens, and tokens of repeated terms or without a counterpart to ``counts``."""
    where: list[tuple[int, int, int]] = []
    for row, (item, a) in enumerate(zip(items, aligned)):
        data_labels = torch.as_tensor(item["labels"]).tolist()
        counts["anchors"] += a.num_anchors
        for t, label in enumerate(data_labels):
            if t == 0 or label == IGNORE_INDEX:
                continue
            counts["labelled"] += 1
            s = a.position_map[t]
            if a.repeated[t]:
                counts["repeated"] += 1
            elif s < 1:
                counts["unmapped"] += 1
            else:
                where.append((row, t, s))
    return where


def _hidden_states(
    model: TokenLM, models: _Models, aligned: list[AlignedTokens], pad_id: int, device: Any
) -> tuple[Tensor, Tensor]:
    """The batch's hidden states (what the output heads read): the reinforced model's on the original tokens,
    then the baseline's on the translated tokens."""
    with models.reinforced():
        hidden_r = _hidden(model, models.reinforced_lm, [a.original_ids for a in aligned], pad_id, device)
    with models.baseline():
        hidden_b = _hidden(model, models.baseline_lm, [a.translated_ids for a in aligned], pad_id, device)
    return hidden_r, hidden_b


def _batch_targets(
    models: _Models,
    aligned: list[AlignedTokens],
    where: list[tuple[int, int, int]],
    *,
    hidden_r: Tensor,
    hidden_b: Tensor,
    head_reinforced: torch.nn.Module,
    head_base: torch.nn.Module,
    alpha: float,
    top_k: int | None,
    seen_penalty: float,
    chunk_rows: int,
) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor] | None]:
    """Per row of the batch, indexed like its original tokens: the generic labels (-100 where there is no
    target) and, with ``top_k`` (soft targets), the top-k ids and probabilities (0 where there is none).

    The full-vocabulary logits of both heads are materialised for ``chunk_rows`` positions of ``where`` at a
    time: the reinforced model's at original position ``t``, the baseline's at translated position ``s``.
    """
    soft = top_k is not None
    rows = torch.tensor([w[0] for w in where], dtype=torch.long)
    t_idx = torch.tensor([w[1] for w in where], dtype=torch.long)
    s_idx = torch.tensor([w[2] for w in where], dtype=torch.long)
    labels_b = [torch.full((len(a.original_ids),), IGNORE_INDEX, dtype=torch.long) for a in aligned]
    ids_b = [torch.zeros((len(a.original_ids), top_k), dtype=torch.long) for a in aligned] if soft else None
    probs_b = [torch.zeros((len(a.original_ids), top_k), dtype=torch.float32) for a in aligned] if soft else None
    for c in range(0, len(where), chunk_rows):
        sl = slice(c, c + chunk_rows)
        r, t, s = rows[sl], t_idx[sl], s_idx[sl]
        with models.reinforced():
            v_reinforced = head_reinforced(hidden_r[r.to(hidden_r.device), (t - 1).to(hidden_r.device)]).float()
        with models.baseline():
            v_base = head_base(hidden_b[r.to(hidden_b.device), (s - 1).to(hidden_b.device)]).float()
        lowered = [aligned[int(ri)].lowered[int(ti)] for ri, ti in zip(r, t)]
        labels, top_ids, top_probs = generic_targets_from_logits(
            v_base, v_reinforced, alpha, top_k, lowered, seen_penalty
        )
        labels = labels.cpu()
        for j, (ri, ti) in enumerate(zip(r.tolist(), t.tolist())):
            labels_b[ri][ti] = labels[j]
            if soft:
                k = top_ids.shape[1]
                ids_b[ri][ti, :k] = top_ids[j].cpu()
                probs_b[ri][ti, :k] = top_probs[j].cpu()
    return labels_b, ids_b, probs_b


def _example_targets(
    items: list[dict[str, Any]],
    aligned: list[AlignedTokens],
    labels_b: list[Tensor],
    ids_b: list[Tensor] | None,
    probs_b: list[Tensor] | None,
    counts: dict[str, int],
) -> dict[int, GenericTargets]:
    """The batch's targets by example id. Adds its tokens that get a target, and those of them whose target
    differs from the text, to ``counts``."""
    out: dict[int, GenericTargets] = {}
    for row, (item, a) in enumerate(zip(items, aligned)):
        original = torch.as_tensor(a.original_ids, dtype=torch.long)
        has = labels_b[row] != IGNORE_INDEX
        counts["targets"] += int(has.sum())
        counts["changed"] += int((labels_b[row][has] != original[has]).sum())
        soft_ids = ids_b[row] if ids_b is not None else None
        soft_probs = probs_b[row] if probs_b is not None else None
        out[int(item["example_id"])] = GenericTargets(original, labels_b[row], soft_ids, soft_probs)
    return out


def _log_summary(targets: str, out: dict[int, GenericTargets], output: str, counts: dict[str, int]) -> None:
    """The one info line of :func:`build_generic_labels` (rank zero): how many tokens got a target, and why
    the others did not."""
    from lightning.pytorch.utilities import rank_zero_info

    labelled = max(counts["labelled"], 1)
    rank_zero_info(
        f"generic targets ({targets}) of {len(out)} examples written to {output}: {counts['targets']}/{counts['labelled']} "
        f"labelled tokens get a target ({counts['targets'] / labelled:.1%}), {counts['changed']} of them differ from the "
        f"text; {counts['repeated']} tokens of repeated anchored terms and {counts['unmapped']} without a translated "
        f"counterpart take no loss; {counts['anchors']} anchored terms replaced."
    )


@torch.no_grad()
def build_generic_labels(
    model: TokenLM,
    datamodule: SFTDataModule,
    output: str,
    reinforced_adapter: str,
    anchors_file: str,
    alpha: float = 5.0,
    targets: TargetKind = "hard",
    top_k: int = 20,
    seen_penalty: float = 10.0,
    device: torch.device | str = "cpu",
    chunk_rows: int = 512,
) -> dict[int, GenericTargets]:
    """Generic targets for every training example of ``datamodule``, written to ``output``.

    For each example: translate its anchored terms (:func:`align_translation`), run the baseline on the
    translation and the reinforced model on the original, combine the logits at the mapped positions
    with :func:`generic_logits` and keep the argmax (``hard``) and, with ``soft``, the ``top_k`` most
    likely ids of ``softmax(v_generic)`` with their probabilities. Positions without a label in the data,
    without a translated counterpart, or inside a repeated anchored term get label -100.

    Args:
        model: the baseline ``TokenLM`` (without LoRA: the adapter of step 1 is attached here).
        datamodule: the corpus as step 3 will read it (an ``SFTDataModule``: same file, tokenizer,
            ``max_length`` and truncation; packing does not matter).
        output: the safetensors file to write (``GenericLabels(targets_file=...)`` reads it).
        reinforced_adapter: the reinforced model of step 1: a peft adapter folder (written by
            ``SavePretrained`` / ``TokenLM.save_pretrained`` with LoRA), attached to the baseline's own
            weights, or a full model folder.
        anchors_file: JSON ``{term: generic term}`` (:func:`load_anchors`).
        alpha: the coefficient of Eq. 1 (5, the value reported for the paper's runs).
        targets: ``hard`` (labels only) or ``soft`` (labels plus top-k distributions).
        top_k: ids kept per position for soft targets.
        seen_penalty: logit decrease of translations of anchored terms already in the context.
        device: where the models run.
        chunk_rows: positions whose full-vocabulary logits are materialised at once.

    Returns:
        The targets by example id (also written to ``output``).

    Ambiguities, with the choices made:
        - hard or soft targets (spec gap 9): the paper's Sec. 3 takes "the token with maximal logit" as
          the generic prediction *label*, so ``targets="hard"``; ``soft`` stores the top-k of
          ``softmax(v_generic)`` (a secondary note's reading) for ``GenericLabels(mode="soft")``. A soft
          file holds the hard labels too.
        - ``alpha=5``: from a secondary note on the paper's runs (the spec marks it [S]).
        - the block: the paper processes 512-token blocks; here a block is one example (examples are
          never split), so "first occurrence in the block" means in the example.
        - how much the translations of already-seen anchored terms are lowered: the paper gives no
          amount; ``seen_penalty=10`` takes them out of the argmax unless they lead by more than 10
          logits and leaves at most ``e^-10`` of their soft mass; 0 turns it off. Only first tokens of
          the translations that the original example never uses are lowered.
        - tokens with no translated counterpart (inside a multi-token anchored term): no loss, since the
          baseline has no prediction made from the translation of their context.
        - raw logits (the paper's Eq. 1 as written), not log-probabilities: a reinforced model that
          shifts every logit of a position by the same amount shifts the argmax of neither.
    """
    from lightning_tokens.models.tokenizers import bos_prefix

    _check_arguments(model, datamodule, targets, alpha, top_k, seen_penalty)
    anchors = load_anchors(anchors_file)
    model.configure_model()
    model.to(device).eval()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    dataset = datamodule._examples("train")
    parsed = _example_segments(datamodule)
    bos = bos_prefix(tokenizer)
    pad_id = int(tokenizer.pad_token_id)
    out: dict[int, GenericTargets] = {}
    counts = {"labelled": 0, "targets": 0, "changed": 0, "repeated": 0, "unmapped": 0, "anchors": 0}
    batch_size = max(1, int(getattr(datamodule, "eval_batch_size", 8)))
    with _attach_reinforced(model, reinforced_adapter) as models:
        head_base = _head(model, models.baseline_lm)
        head_reinforced = _head(model, models.reinforced_lm)
        for begin in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))]
            aligned = [
                _aligned_example(tokenizer, parsed[item["example_id"]], torch.as_tensor(item["input_ids"]), anchors, bos)
                for item in items
            ]
            where = _target_positions(items, aligned, counts)
            hidden_r, hidden_b = _hidden_states(model, models, aligned, pad_id, device)
            labels_b, ids_b, probs_b = _batch_targets(
                models,
                aligned,
                where,
                hidden_r=hidden_r,
                hidden_b=hidden_b,
                head_reinforced=head_reinforced,
                head_base=head_base,
                alpha=alpha,
                top_k=top_k if targets == "soft" else None,
                seen_penalty=seen_penalty,
                chunk_rows=chunk_rows,
            )
            out.update(_example_targets(items, aligned, labels_b, ids_b, probs_b, counts))
    metadata = {
        "targets": targets,
        "alpha": repr(float(alpha)),
        "top_k": str(top_k),
        "seen_penalty": repr(float(seen_penalty)),
        "anchors_file": anchors_file,
        "reinforced_adapter": reinforced_adapter,
    }
    save_generic_targets(output, out, metadata)
    _log_summary(targets, out, output, counts)
    return out
