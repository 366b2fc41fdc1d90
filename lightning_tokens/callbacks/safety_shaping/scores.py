"""STAR scores: guardrail P(safe) of each response chunk's prefix, for a batch on the fly or for a whole
dataset once (``lightning-tokens star_score``), and the score files that hold them."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_tokens.callbacks.safety_shaping.functional import ChunkPrefix, chunk_prefix_lengths, chunk_weights
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.artifacts import artifact_error, check_format, read_safetensors
from lightning_tokens.core.reference_scores import read_score_tensors
from lightning_tokens.core.stats import IGNORE_INDEX
from lightning_tokens.models.guardrails import Guardrail

#: ``format`` metadata of STAR score files.
STAR_FORMAT = "lightning_tokens.star_scores"


def _batch_examples(batch: dict[str, Any]) -> list[tuple[int, Tensor, Tensor, int | None]]:
    """``(row, columns, positions, example id)`` of every example in a batch, on the CPU.

    Rows hold one example each (``example_id`` + right padding by ``attention_mask``) or several
    (``token_example_ids``, -1 on padding, with ``position_ids`` restarting per example), as
    :mod:`lightning_tokens.datamodules` make them; ``positions`` index the example's own tokens.
    """
    labels = batch["labels"]
    rows, width = labels.shape
    out: list[tuple[int, Tensor, Tensor, int | None]] = []
    token_ids = batch.get("token_example_ids")
    if token_ids is not None:
        token_ids = token_ids.cpu()
        position_ids = batch.get("position_ids")
        position_ids = position_ids.cpu() if position_ids is not None else None
        for row in range(rows):
            for key in token_ids[row].unique().tolist():
                if key < 0:
                    continue
                columns = (token_ids[row] == key).nonzero().squeeze(1)
                positions = position_ids[row, columns] if position_ids is not None else torch.arange(columns.numel())
                out.append((row, columns, positions, int(key)))
        return out
    mask = batch.get("attention_mask")
    ids = batch.get("example_id")
    for row in range(rows):
        length = int(mask[row].sum()) if mask is not None else width
        columns = torch.arange(length)
        out.append((row, columns, columns, None if ids is None else int(ids[row])))
    return out


def _prefix_texts(
    input_ids: Tensor, labels: Tensor, tokenizer: Any, chunk_size: int, chunk_prefix: ChunkPrefix, skip_special_tokens: bool
) -> tuple[str, list[str], Tensor] | None:
    """The prompt text, the response prefix text of every chunk, and the response token indices of one
    example (``None`` if it has no labelled token).

    The prompt is everything before the first labelled token; a prefix runs from the first labelled
    token through the last response token of the prefix (for multi-turn chats it includes the turns in
    between, as the guard would read them).
    """
    response = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if response.numel() == 0:
        return None
    first = int(response[0])
    ids = input_ids.tolist()
    prompt = tokenizer.decode(ids[:first], skip_special_tokens=skip_special_tokens)
    prefixes = []
    for n in chunk_prefix_lengths(response.numel(), chunk_size, chunk_prefix):
        end = int(response[n - 1]) + 1 if n > 0 else first
        prefixes.append(tokenizer.decode(ids[first:end], skip_special_tokens=skip_special_tokens))
    return prompt, prefixes, response


def _score_examples(
    guardrail: Guardrail,
    examples: Sequence[tuple[Tensor, Tensor]],
    tokenizer: Any,
    chunk_size: int,
    chunk_prefix: ChunkPrefix,
    skip_special_tokens: bool,
) -> list[Tensor]:
    """Per-position ``V`` (float32, NaN where the example has no label) of each ``(input_ids, labels)``,
    with one guardrail call for all their prefixes."""
    prepared = [_prefix_texts(ids, labels, tokenizer, chunk_size, chunk_prefix, skip_special_tokens) for ids, labels in examples]
    prompts = [p[0] for p in prepared if p is not None for _ in p[1]]
    prefixes = [text for p in prepared if p is not None for text in p[1]]
    scores = guardrail.score(prompts, prefixes).detach().float().cpu().reshape(-1)
    if scores.numel() != len(prompts):
        raise ConfigError(f"the guardrail returned {scores.numel()} scores for {len(prompts)} (prompt, response) pairs.")
    if not torch.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ConfigError("the guardrail returned scores outside [0, 1]; P(safe) must be a probability.")
    out, cursor = [], 0
    for (ids, _), p in zip(examples, prepared):
        values = torch.full((ids.numel(),), math.nan)
        if p is not None:
            count = len(p[1])
            values[p[2]] = chunk_weights(scores[cursor : cursor + count], p[2].numel(), chunk_size)
            cursor += count
        out.append(values)
    return out


def star_values_for_batch(
    guardrail: Guardrail,
    batch: dict[str, Any],
    tokenizer: Any,
    chunk_size: int = 5,
    chunk_prefix: ChunkPrefix = "chunk_end",
    skip_special_tokens: bool = True,
) -> Tensor:
    """``(B, T)`` STAR values of a batch, computed now with ``guardrail`` (NaN where there is no label).

    Example::

        values = star_values_for_batch(guard, batch, model.tokenizer)   # then V = values at label positions
    """
    labels = batch["labels"]
    input_ids = batch["input_ids"].cpu()
    labels_cpu = labels.cpu()
    located = _batch_examples(batch)
    examples = [(input_ids[row, cols], labels_cpu[row, cols]) for row, cols, _, _ in located]
    values = _score_examples(guardrail, examples, tokenizer, chunk_size, chunk_prefix, skip_special_tokens)
    out = torch.full(labels.shape, math.nan)
    for (row, cols, _, _), v in zip(located, values):
        out[row, cols] = v
    return out.to(labels.device)


# ---- score files ----------------------------------------------------------------------------------------
def save_star_scores(path: str, scores: dict[int, Tensor], chunk_size: int, chunk_prefix: ChunkPrefix) -> None:
    """Write per-example per-position ``V`` (float32, NaN at unlabelled positions) keyed by example id,
    in the layout of :func:`~lightning_tokens.core.reference_scores.save_reference_scores`, with the chunking
    recorded in the metadata."""
    from safetensors.torch import save_file

    tensors = {str(int(key)): value.detach().float().cpu().contiguous() for key, value in scores.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {"format": STAR_FORMAT, "version": "1", "chunk_size": str(chunk_size), "chunk_prefix": chunk_prefix}
    save_file(tensors, path, metadata=metadata)


def load_star_scores(path: str) -> tuple[dict[int, Tensor], dict[str, str]]:
    """``(scores by example id, metadata)`` of a file written by :func:`save_star_scores`.

    Raises :class:`~lightning_tokens.core.errors.MissingFileError` for a missing file and
    :class:`~lightning_tokens.core.errors.DataError` naming the file (and tensor or metadata field) for a
    malformed one: not safetensors, another format, a bad ``chunk_size`` / ``chunk_prefix``, tensors that
    are not 1-D floating point or not named by example ids.
    """
    hint = "Compute one with `lightning-tokens star_score` (precompute_star_scores)."
    tensors, metadata = read_safetensors(path, "STAR score file", hint)
    check_format(path, metadata, STAR_FORMAT, "STAR score file", hint)
    chunk_size = metadata.get("chunk_size")
    if chunk_size is not None and not (re.fullmatch(r"[0-9]{1,9}", chunk_size) and int(chunk_size) > 0):
        raise artifact_error(path, "metadata 'chunk_size'", f"expected a positive integer, got {chunk_size[:80]!r}.")
    chunk_prefix = metadata.get("chunk_prefix")
    if chunk_prefix is not None and chunk_prefix not in get_args(ChunkPrefix):
        raise artifact_error(
            path, "metadata 'chunk_prefix'", f"expected one of {', '.join(get_args(ChunkPrefix))}, got {chunk_prefix[:80]!r}."
        )
    return read_score_tensors(path, tensors), metadata


def _iter_examples(data: Any) -> Iterable[list[tuple[int, Tensor, Tensor, Tensor]]]:
    """Groups of ``(example id, positions, input_ids, labels)`` from a datamodule's training batches,
    an iterable of batches, or an iterable of single examples (``example_id``, ``input_ids``, ``labels``)."""
    if isinstance(data, pl.LightningDataModule):
        data = data.train_dataloader()
    pending: list[tuple[int, Tensor, Tensor, Tensor]] = []
    for item in data:
        ids = torch.as_tensor(item["input_ids"])
        if ids.dim() == 2:  # a batch
            if pending:
                yield pending
                pending = []
            labels = torch.as_tensor(item["labels"]).cpu()
            ids = ids.cpu()
            group = []
            for row, cols, positions, key in _batch_examples(item):
                if key is None:
                    raise ConfigError("batches need `example_id` or `token_example_ids` to key their STAR scores.")
                group.append((key, positions, ids[row, cols], labels[row, cols]))
            yield group
        else:
            n = ids.numel()
            pending.append((int(item["example_id"]), torch.arange(n), ids.reshape(-1).long(), torch.as_tensor(item["labels"]).reshape(-1).long()))
            if len(pending) >= 64:
                yield pending
                pending = []
    if pending:
        yield pending


@torch.no_grad()
def precompute_star_scores(
    guardrail: Guardrail,
    data: pl.LightningDataModule | Iterable[dict[str, Any]],
    output: str | None,
    chunk_size: int = 5,
    tokenizer: Any = None,
    *,
    chunk_prefix: ChunkPrefix = "chunk_end",
    skip_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> dict[int, Tensor]:
    """STAR values of every training example, keyed by example id, written to ``output`` (safetensors).

    For each example, the response tokens (its labelled positions, in order) are cut into chunks of
    ``chunk_size``; the guardrail scores ``(prompt text, response prefix text)`` once per chunk (the
    texts are decoded with ``tokenizer``, so the guard may use another tokenizer), and every response
    token gets its chunk's score. The stored tensor of an example is indexed like the example's own
    positions (as :func:`~lightning_tokens.core.reference_scores.score_reference` stores reference losses), NaN where
    a position has no label, so :class:`SafetyShaping` finds V at the label positions of packed and
    unpacked batches alike and notices when the data changed.

    Args:
        guardrail: the safety scorer.
        data: a datamodule (its training data, exactly as training will see it: same tokenizer, ids,
            truncation), an iterable of batches, or an iterable of examples ``{"example_id", "input_ids",
            "labels"}`` (labels unshifted, -100 where no loss is taken).
        output: the file to write, or ``None`` to only return the scores.
        chunk_size: ``M``, response tokens per chunk (5 in the paper).
        tokenizer: decodes token ids to text (default: the datamodule's ``tokenizer``).
        chunk_prefix: ``chunk_end`` or ``chunk_start`` (see :func:`chunk_prefix_lengths`).
        skip_special_tokens: drop special tokens (chat-template markers, bos/eos) from the decoded texts.
        device: where the guardrail runs.

    Example::

        scores = precompute_star_scores(CausalLMGuardrail("meta-llama/Llama-Guard-3-1B"), datamodule, "star.safetensors")
    """
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        tokenizer = tokenizer if tokenizer is not None else getattr(data, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("precompute_star_scores needs a `tokenizer` to decode the examples into text for the guardrail.")
    chunk_prefix_lengths(0, chunk_size, chunk_prefix)  # validates both
    if device is not None:
        guardrail.to(device)
    scores: dict[int, Tensor] = {}
    for group in _iter_examples(data):
        values = _score_examples(
            guardrail, [(ids, labels) for _, _, ids, labels in group], tokenizer, chunk_size, chunk_prefix, skip_special_tokens
        )
        for (key, positions, _, _), v in zip(group, values):
            stored = torch.full((int(positions.max()) + 1 if positions.numel() else 0,), math.nan)
            stored[positions] = v
            scores[key] = stored
    if output is not None:
        save_star_scores(output, scores, chunk_size, chunk_prefix)
        rank_zero_info(f"STAR scores of {len(scores)} examples written to {output}")
    return scores
