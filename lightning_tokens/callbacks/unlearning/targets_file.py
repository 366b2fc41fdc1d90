"""The generic-targets file: per-example targets saved to and loaded from safetensors, and looked up for the
tokens of a training batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tokens.core.artifacts import artifact_error, check_format, example_id_key, read_safetensors
from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.stats import IGNORE_INDEX

__all__ = ["FILE_FORMAT", "GenericTargets", "load_generic_targets", "lookup_generic_targets", "save_generic_targets"]

FILE_FORMAT = "lightning_tokens.whp_generic_targets"

_FIELDS = ("input_ids", "labels", "topk_ids", "topk_probs")


@dataclass
class GenericTargets:
    """Generic targets of one example, indexed like its tokens (position ``t``: the target predicted
    from the tokens ``< t``).

    Attributes:
        input_ids: ``(n,)`` the example's tokens (checked against the batches that use the targets).
        labels: ``(n,)`` the generic label (argmax of the generic logits), -100 where no loss is taken.
        topk_ids: ``(n, k)`` soft targets: the ``k`` most likely ids (0 where ``labels`` is -100).
        topk_probs: ``(n, k)`` their probabilities under ``softmax(v_generic)`` (0 where ``labels`` is -100).
    """

    input_ids: Tensor
    labels: Tensor
    topk_ids: Tensor | None = None
    topk_probs: Tensor | None = None


def save_generic_targets(path: str, targets: dict[int, GenericTargets], metadata: dict[str, str] | None = None) -> None:
    """Write per-example targets to a safetensors file: keys ``"<example id>.<field>"``."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    soft = None
    for key, target in targets.items():
        has_soft = target.topk_ids is not None
        if soft is not None and has_soft != soft:
            raise ConfigError("every example must have soft targets, or none.")
        soft = has_soft
        tensors[f"{int(key)}.input_ids"] = target.input_ids.to(torch.int32).cpu().contiguous()
        tensors[f"{int(key)}.labels"] = target.labels.to(torch.int64).cpu().contiguous()
        if has_soft:
            tensors[f"{int(key)}.topk_ids"] = target.topk_ids.to(torch.int32).cpu().contiguous()
            tensors[f"{int(key)}.topk_probs"] = target.topk_probs.float().cpu().contiguous()
    meta = {"format": FILE_FORMAT, "version": "1", "targets": "soft" if soft else "hard", **(metadata or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})


def load_generic_targets(path: str) -> tuple[dict[int, GenericTargets], dict[str, str]]:
    """Read a file written by :func:`save_generic_targets`: ``(targets by example id, metadata)``.

    Raises :class:`~lightning_tokens.core.errors.MissingFileError` for a missing file and
    :class:`~lightning_tokens.core.errors.DataError` naming the file and the tensor (or metadata field) for
    a malformed one: not safetensors, another format, names other than ``"<example id>.<field>"``, missing
    or misshapen fields, wrong dtypes, negative ids, probabilities outside [0, 1].
    """
    hint = "Build it with `lightning-tokens generic_labels` (lightning_tokens.callbacks.unlearning.build_generic_labels)."
    tensors, metadata = read_safetensors(path, "targets_file", hint)
    check_format(path, metadata, FILE_FORMAT, "generic-targets file", hint)
    fields: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        key_text, dot, part = name.partition(".")
        if not dot or part not in _FIELDS:
            raise artifact_error(
                path, f"tensor {name[:80]!r}", f"expected a name '<example id>.<field>' with a field among {', '.join(_FIELDS)}."
            )
        key = example_id_key(path, key_text, f"tensor {name[:80]!r}")
        if part in fields.setdefault(key, {}):
            raise artifact_error(path, f"tensor {name[:80]!r}", f"example id {key} has two {part} tensors.")
        fields[key][part] = value
    targets = {key: _checked_targets(path, key, f) for key, f in fields.items()}
    kinds = {t.topk_ids is not None for t in targets.values()}
    if len(kinds) > 1:
        raise artifact_error(path, None, "some examples have soft targets (topk_ids, topk_probs) and others not; rebuild the file.")
    k_values = {int(t.topk_ids.shape[1]) for t in targets.values() if t.topk_ids is not None}
    if len(k_values) > 1:
        raise artifact_error(path, None, f"the examples keep different numbers of top-k targets ({sorted(k_values)}); rebuild the file.")
    declared = metadata.get("targets")
    if declared is not None and declared not in ("hard", "soft"):
        raise artifact_error(path, "metadata 'targets'", f"expected 'hard' or 'soft', got {declared[:80]!r}.")
    if declared == "soft" and kinds == {False}:
        raise artifact_error(path, "metadata 'targets'", "says 'soft' but the file holds no topk_ids / topk_probs tensors.")
    return targets, metadata


def _checked_targets(path: str, key: int, f: dict[str, Tensor]) -> GenericTargets:
    """The :class:`GenericTargets` of example ``key`` from its tensors, each checked (dtype, shape, values)."""

    def fail(part: str, message: str) -> DataError:
        return artifact_error(path, f"tensor '{key}.{part}'", message)

    for part in ("input_ids", "labels"):
        if part not in f:
            raise fail(part, "missing: every example needs input_ids and labels.")
    if ("topk_ids" in f) != ("topk_probs" in f):
        raise fail("topk_ids" if "topk_ids" not in f else "topk_probs", "missing: soft targets need topk_ids and topk_probs.")
    for part, value in f.items():
        floating = part == "topk_probs"
        if floating != value.is_floating_point() or value.dtype == torch.bool or value.is_complex():
            raise fail(part, f"expected {'a floating-point' if floating else 'an integer'} tensor, got {value.dtype}.")
    n = f["input_ids"].numel()
    for part in ("input_ids", "labels"):
        if f[part].dim() != 1 or f[part].numel() != n:
            raise fail(part, f"expected shape ({n},) like input_ids, got {tuple(f[part].shape)}.")
    labels = f["labels"].long()
    if ((labels < 0) & (labels != IGNORE_INDEX)).any():
        raise fail("labels", f"token ids must be >= 0 (or {IGNORE_INDEX} where no loss is taken).")
    topk_ids = topk_probs = None
    if "topk_ids" in f:
        for part in ("topk_ids", "topk_probs"):
            if f[part].dim() != 2 or f[part].shape[0] != n or f[part].shape[1] < 1:
                raise fail(part, f"expected shape ({n}, k) with k >= 1, got {tuple(f[part].shape)}.")
        if f["topk_ids"].shape != f["topk_probs"].shape:
            raise fail("topk_probs", f"expected the shape of topk_ids {tuple(f['topk_ids'].shape)}, got {tuple(f['topk_probs'].shape)}.")
        topk_ids, topk_probs = f["topk_ids"].long(), f["topk_probs"].float()
        if (topk_ids < 0).any():
            raise fail("topk_ids", "token ids must be >= 0.")
        if not (torch.isfinite(topk_probs) & (topk_probs >= 0) & (topk_probs <= 1)).all():
            raise fail("topk_probs", "probabilities must lie in [0, 1].")
    return GenericTargets(f["input_ids"].long(), labels, topk_ids, topk_probs)


def lookup_generic_targets(
    targets: dict[int, GenericTargets], batch: dict[str, Any], soft: bool = False, source: str = "targets"
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Targets of a batch, ``(B, T)`` labels (-100 where none) and with ``soft`` ``(B, T, k)`` ids and
    probabilities, on the device of ``batch["labels"]``.

    Tokens are found by ``token_example_ids`` and ``position_ids`` (SFTDataModule batches, packed or
    not), else rows are one example each (``example_id`` (B,), tokens from position 0, the row's length
    from ``attention_mask``). The batch's tokens must
    be the stored ones: a changed tokenizer or data file is an error, not a silent misalignment.
    """
    labels_in = batch["labels"]
    shape = tuple(labels_in.shape)
    input_ids = batch["input_ids"].cpu()
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    k = 0
    if soft:
        first = next(iter(targets.values()), None)
        if first is None or first.topk_ids is None:
            raise ConfigError(f"{source} holds hard targets only; rebuild it with targets=soft for mode=soft.")
        k = first.topk_ids.shape[1]
    ids = torch.zeros(shape + (k,), dtype=torch.long) if soft else None
    probs = torch.zeros(shape + (k,), dtype=torch.float32) if soft else None

    def place(key: int, where: tuple[Tensor, ...], positions: Tensor) -> None:
        stored = targets.get(int(key))
        if stored is None:
            raise ConfigError(
                f"example id {key} has no generic targets in {source}: build them on the same data "
                "(ids must match the training data's)."
            )
        if positions.numel() and int(positions.max()) >= stored.labels.numel():
            raise ConfigError(
                f"{source} holds {stored.labels.numel()} tokens for example id {key} but the batch has more: the data "
                "or the tokenizer changed since the targets were built (rebuild them)."
            )
        if not torch.equal(stored.input_ids[positions], input_ids[where]):
            raise ConfigError(
                f"the tokens of example id {key} differ from those {source} was built on: the data or the tokenizer "
                "changed (rebuild the targets with the training config's data and model)."
            )
        labels[where] = stored.labels[positions]
        if soft:
            ids[where] = stored.topk_ids[positions]
            probs[where] = stored.topk_probs[positions]

    token_ids = batch.get("token_example_ids")
    if token_ids is not None and batch.get("position_ids") is not None:
        # SFTDataModule batches, packed or not: each token names its example and its position in it
        token_ids, positions = token_ids.cpu(), batch["position_ids"].cpu()
        for key in token_ids.unique().tolist():
            if key >= 0:
                where = (token_ids == key).nonzero(as_tuple=True)
                place(key, where, positions[where])
    else:
        example_ids = batch.get("example_id")
        if example_ids is None:
            raise ConfigError("GenericLabels needs `example_id` (or `token_example_ids` with `position_ids`) in each batch to find its targets.")
        lengths = (
            batch["attention_mask"].sum(-1).cpu().tolist()
            if batch.get("attention_mask") is not None
            else [shape[1]] * shape[0]
        )
        for row, (key, length) in enumerate(zip(example_ids.cpu().tolist(), lengths)):
            positions = torch.arange(int(length))
            place(key, (torch.full_like(positions, row), positions), positions)
    device = labels_in.device
    labels = torch.where(labels_in.cpu() != IGNORE_INDEX, labels, torch.full_like(labels, IGNORE_INDEX)).to(device)
    if soft:
        return labels, ids.to(device), probs.to(device)
    return labels, None, None
