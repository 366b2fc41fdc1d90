"""The ``offline`` reference's score files: per-token losses of a model on the training data, computed once
(:func:`score_reference`, the ``lightning-tokens score`` command), saved keyed by example id, and looked up
per batch during training.

``lightning-tokens score --config reference.yaml --output scores.safetensors`` runs this with the
config's model as the reference; training then uses ``reference: {mode: offline, scores_file: ...}``.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_tokens.core.artifacts import artifact_error, check_format, example_id_key, read_safetensors
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.stats import TokenStats

#: ``format`` metadata of reference score files.
REFERENCE_FORMAT = "lightning_tokens.reference_scores"


@torch.no_grad()
def score_reference(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Per-token NLL of ``model`` on every training example, keyed by example id, written to ``output``.

    The model must offer ``hidden_states(batch)`` and ``output_head()`` (``TokenLM`` does). Each stored
    tensor is indexed like the example's own label positions (0 where a position has no label), which
    is how :func:`lookup_reference_nll` reads it back, packed or not.

    Example::

        scores = score_reference(TokenLM(model="smollm2-135m-instruct"), SFTDataModule(...), "ref.safetensors")
    """
    model.configure_model()
    model.to(device).eval()
    datamodule.setup("fit")
    scores: dict[int, Tensor] = {}
    packed: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for batch in datamodule.train_dataloader():
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        hidden = model.hidden_states(batch)
        head = model.output_head()
        nll = TokenStats(batch["labels"], hidden=hidden, head=head, backend=getattr(model, "token_loss_backend", "auto")).nll.cpu()
        token_ids = batch.get("token_example_ids")
        if token_ids is not None and "example_id" not in batch:
            ids, positions = token_ids.cpu(), batch["position_ids"].cpu()
            for key in ids.unique().tolist():
                if key >= 0:
                    where = ids == key
                    packed.setdefault(int(key), []).append((positions[where], nll[where]))
            continue
        lengths = batch["attention_mask"].sum(-1).cpu() if batch.get("attention_mask") is not None else None
        for row, key in enumerate(batch["example_id"].cpu().tolist()):
            length = int(lengths[row]) if lengths is not None else nll.shape[1]
            scores[int(key)] = nll[row, :length].clone()
    for key, parts in packed.items():
        size = max(int(pos.max()) for pos, _ in parts) + 1
        values = torch.zeros(size)
        for pos, vals in parts:
            values[pos] = vals
        scores[key] = values
    save_reference_scores(output, scores)
    rank_zero_info(f"reference scores of {len(scores)} examples written to {output}")
    return scores


def save_reference_scores(path: str, scores: dict[int, Tensor]) -> None:
    """Write per-example per-token losses (float32, indexed like each example's own label positions)."""
    from safetensors.torch import save_file

    tensors = {str(int(key)): value.detach().float().cpu().contiguous() for key, value in scores.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={"format": REFERENCE_FORMAT, "version": "1"})


def load_reference_scores(path: str) -> dict[int, Tensor]:
    """Per-example per-token losses written by :func:`save_reference_scores` (float32, keyed by example id).

    A file without ``format`` metadata is accepted (hand-made score files); one of another format (e.g.
    STAR scores) is not. Raises :class:`~lightning_tokens.core.errors.MissingFileError` for a missing file
    and :class:`~lightning_tokens.core.errors.DataError` naming the file and tensor for a malformed one.
    """
    hint = "Compute it with `lightning-tokens score --config <config> --output FILE`."
    tensors, metadata = read_safetensors(path, "reference scores file", hint)
    check_format(path, metadata, REFERENCE_FORMAT, "reference scores file", hint, required=False)
    return read_score_tensors(path, tensors)


def read_score_tensors(path: str, tensors: dict[str, Tensor]) -> dict[int, Tensor]:
    """Score tensors keyed by example id: each name an example id, each tensor 1-D floating point (returned
    as float32); otherwise a :class:`~lightning_tokens.core.errors.DataError` naming ``path`` and the tensor."""
    scores: dict[int, Tensor] = {}
    for name, value in tensors.items():
        key = example_id_key(path, name)
        where = f"tensor {name[:80]!r}"
        if key in scores:
            raise artifact_error(path, where, f"example id {key} appears twice (as another name spelling the same number).")
        if value.dim() != 1 or not value.is_floating_point():
            raise artifact_error(
                path, where, f"expected a 1-D floating-point tensor (one score per position), got {value.dtype} of shape {tuple(value.shape)}."
            )
        scores[key] = value.float()
    return scores


def lookup_reference_nll(scores: dict[int, Tensor], batch: dict[str, Any], source: str = "scores") -> Tensor:
    """``(B, T)`` reference NLL for a batch from stored per-example losses.

    Rows are either one example each (``example_id`` (B,), tokens from position 0) or packed
    (``token_example_ids`` (B, T) and ``position_ids`` (B, T)).
    """
    labels = batch["labels"]
    out = torch.zeros(labels.shape, dtype=torch.float32)
    token_ids = batch.get("token_example_ids")
    if token_ids is not None and batch.get("position_ids") is not None:
        ids, positions = token_ids.cpu(), batch["position_ids"].cpu()
        for key in ids.unique().tolist():
            if key < 0:
                continue
            stored = _stored(scores, key, source)
            where = ids == key
            pos = positions[where]
            if int(pos.max()) >= stored.numel():
                raise ConfigError(
                    f"reference scores in {source} hold {stored.numel()} tokens for example id {key} but the batch "
                    f"has {int(pos.max()) + 1}: the data changed since scoring (re-run `lightning-tokens score`)."
                )
            out[where] = stored[pos]
        return out.to(labels.device)
    example_ids = batch.get("example_id")
    if example_ids is None:
        raise ConfigError("the offline reference needs `example_id` in each batch to look up its scores.")
    lengths = (
        batch["attention_mask"].sum(-1).cpu()
        if batch.get("attention_mask") is not None
        else torch.full((labels.shape[0],), labels.shape[1])
    )
    for row, (key, length) in enumerate(zip(example_ids.cpu().tolist(), lengths.tolist())):
        stored = _stored(scores, key, source)
        if stored.numel() != length:
            raise ConfigError(
                f"reference scores in {source} hold {stored.numel()} tokens for example id {key} but the batch row "
                f"has {length}: the data or the tokenizer changed since scoring (re-run `lightning-tokens score`)."
            )
        out[row, :length] = stored
    return out.to(labels.device)


def _stored(scores: dict[int, Tensor], key: int, source: str) -> Tensor:
    stored = scores.get(int(key))
    if stored is None:
        raise ConfigError(
            f"example id {key} has no reference scores in {source}: score the same data with "
            "`lightning-tokens score` (ids must match the training data's)."
        )
    return stored
