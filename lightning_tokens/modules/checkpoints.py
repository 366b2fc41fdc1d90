"""Checkpoints of ``TokenLM``: reference-provider state under sharding, and consolidated export.

Sharded checkpoints. ``ModelParallelStrategy`` (FSDP2) saves a folder: every rank writes its shards of
``state_dict`` and the optimizer states with ``torch.distributed.checkpoint`` and rank 0 writes the rest
(``meta.pt``). The EMA history is sharded like the parameters it averages, so its averages travel in
that folder too, as extra ``state_dict`` entries under :data:`HISTORY_PREFIX`, and are read back into
the current shards on resume. With a full-state-dict save they are gathered into ``meta.pt`` instead.

Export. :func:`consolidated_state_dict` reads either a single-file checkpoint or a sharded folder into
one full state dict without any process group; :func:`export_checkpoint` (the ``export`` subcommand)
writes it as a Hugging Face folder (the LoRA adapter in peft's format when LoRA is on, the full model
otherwise) or as one ``torch.save`` file.

Safe loading. A checkpoint is a pickle, and unpickling can run code. Everything here reads checkpoints
with ``torch.load(weights_only=True)``, which rebuilds only tensors, containers, primitives and the
library types registered with :func:`torch.serialization.add_safe_globals` (the settings dataclasses that
hyper-parameters hold); a sharded folder's ``.metadata`` pickle (which ``torch.distributed.checkpoint``
unpickles without restriction) is first checked against an allowlist of its metadata classes
(:func:`check_sharded_metadata`). Anything else stops with :class:`~lightning_tokens.core.errors.UntrustedCheckpointError`
naming the type; ``trust=True`` (the CLI's ``--trust_checkpoint``) loads files the user trusts as they are.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError, UntrustedCheckpointError

if TYPE_CHECKING:
    from lightning_tokens.core.reference import ReferenceProvider
    from lightning_tokens.modules.causal_lm import TokenLM

__all__ = [
    "HISTORY_PREFIX",
    "TRUST_FLAG",
    "check_sharded_metadata",
    "consolidated_state_dict",
    "export_checkpoint",
    "is_sharded_checkpoint",
    "load_checkpoint_file",
    "load_provider_state",
    "untrusted_checkpoint_error",
    "provider_state_for_checkpoint",
]

HISTORY_PREFIX = "reference_provider.average."
ExportFormat = Literal["hf", "state_dict"]


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder written by ``torch.distributed.checkpoint`` through a Lightning strategy."""
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file()


#: How a user opts in to loading a checkpoint as it is (the CLI flag the safety errors name).
TRUST_FLAG = "--trust_checkpoint true"

# What a torch.distributed.checkpoint `.metadata` pickle may name: its metadata dataclasses, sizes,
# dtypes and paths. Nothing that runs code when called with attacker-chosen arguments.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _refuse(path: Any, what: str, detail: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path}: the {what} holds {detail}, which safe loading does not rebuild (unpickling it could run "
        f"code). If you trust this file, pass {TRUST_FLAG} (trust=True in Python)."
    )


def load_checkpoint_file(path: str | os.PathLike, trust: bool = False, what: str = "checkpoint") -> Any:
    """``torch.load`` onto the CPU, safely: only tensors, containers, primitives and allowlisted library
    types are rebuilt unless ``trust``.

    Raises:
        UntrustedCheckpointError: the file names anything else (the message names it and the opt-in).
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise untrusted_checkpoint_error(path, error, what) from None


def untrusted_checkpoint_error(path: Any, error: pickle.UnpicklingError, what: str = "checkpoint") -> UntrustedCheckpointError:
    """The library's error for torch's refusal of a ``weights_only`` load, naming the refused type."""
    found = re.search(r"GLOBAL\s+([\w.]+)", str(error))
    return _refuse(path, what, f"the Python object {found.group(1)!r}" if found else "a Python object")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def check_sharded_metadata(path: str | os.PathLike, trust: bool = False) -> None:
    """Check a sharded checkpoint folder before ``torch.distributed.checkpoint`` unpickles its ``.metadata``
    without restriction: every global it names must be one of its metadata classes, sizes, dtypes or paths."""
    if trust:
        return
    metadata = Path(path) / ".metadata"
    if not metadata.is_file():
        return  # dcp itself reports the missing file
    try:
        _MetadataUnpickler(io.BytesIO(metadata.read_bytes())).load()
    except pickle.UnpicklingError as error:
        raise _refuse(metadata, "sharded checkpoint's metadata", f"the Python object {str(error)!r}") from None
    except Exception as error:  # noqa: BLE001 - a damaged file is a data problem, not a crash
        raise DataError(f"{metadata}: not a readable sharded-checkpoint metadata file ({error}).") from None


def _saves_sharded(trainer: Any) -> bool:
    return bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))


def provider_state_for_checkpoint(provider: ReferenceProvider, checkpoint: dict[str, Any], trainer: Any) -> dict[str, Any]:
    """The provider's state for ``checkpoint["reference_provider"]``; FSDP2-sharded EMA averages move
    into ``checkpoint["state_dict"]`` (sharded save) or are gathered to full tensors (full save).

    Called on every rank (Lightning dumps the checkpoint on all ranks), as gathering needs.
    """
    from torch.distributed.tensor import DTensor

    state = provider.state_dict()
    average = state.get("average")
    if not average or not any(isinstance(t, DTensor) for t in average.values()):
        return state
    sharded = {name: t for name, t in average.items() if isinstance(t, DTensor)}
    if _saves_sharded(trainer):
        checkpoint["state_dict"].update({HISTORY_PREFIX + name: t for name, t in sharded.items()})
        state["average"] = {name: t for name, t in average.items() if name not in sharded}
        state["average_in_state_dict"] = sorted(sharded)
    else:
        state["average"] = {name: t.full_tensor().cpu() if name in sharded else t for name, t in average.items()}
    return state


def load_provider_state(provider: ReferenceProvider, module: TokenLM, state: dict[str, Any], trainer: Any) -> None:
    """Restore what :func:`provider_state_for_checkpoint` saved; sharded averages are read from the
    checkpoint folder being resumed (``trainer.ckpt_path``) into this rank's shards."""
    state = dict(state)
    names = state.pop("average_in_state_dict", None)
    provider.load_state_dict(state)
    if not names:
        return
    path = trainer.ckpt_path
    if path is None or not is_sharded_checkpoint(path):
        raise RuntimeError(
            f"the checkpoint keeps the EMA history sharded in its folder but the resumed path {path!r} is not a "
            "sharded checkpoint folder: resume from the folder itself."
        )
    import torch.distributed.checkpoint as dcp

    provider.match_layout(module)  # averages become DTensors shaped like this run's shards
    wanted = {HISTORY_PREFIX + name: provider.average[name] for name in names}
    dcp.load({"state_dict": wanted}, checkpoint_id=path)
    for name in names:
        provider.average[name] = wanted[HISTORY_PREFIX + name]


def consolidated_state_dict(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """One full checkpoint dict (``state_dict`` + the rest) from a ``.ckpt`` file or a sharded folder.

    Needs no process group: sharded folders are read with ``torch.distributed.checkpoint``'s offline
    conversion. Optimizer states of sharded folders are left out (they are keyed for the sharded run).
    Loading is safe unless ``trust`` (see the module docstring).

    Example::

        state = consolidated_state_dict("runs/fsdp/checkpoints/last.ckpt")
        module.load_state_dict(model_weights(state["state_dict"]))
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist.")
    if not path.is_dir():
        return load_checkpoint_file(path, trust)
    if not is_sharded_checkpoint(path):
        raise ConfigError(f"{str(path)!r} is a folder but not a sharded checkpoint (no meta.pt): give a .ckpt file or a sharded folder.")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_sharded_metadata(path, trust)
    checkpoint = load_checkpoint_file(path / "meta.pt", trust)
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(path, full)
        shards = load_checkpoint_file(full, trust)
    checkpoint["state_dict"] = shards["state_dict"]
    return checkpoint


def model_weights(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The module's own entries of a checkpoint's ``state_dict`` (the EMA history left out)."""
    return {name: value for name, value in state_dict.items() if not name.startswith(HISTORY_PREFIX)}


def export_checkpoint(
    module: TokenLM, ckpt_path: str, output: str, format: ExportFormat = "hf", trust: bool = False
) -> str:
    """Write a training checkpoint (single file or sharded folder) as one consolidated artefact.

    Args:
        module: a ``TokenLM`` configured as in training (same model, LoRA and reference settings).
        ckpt_path: the ``.ckpt`` file or the sharded checkpoint folder.
        output: ``hf``: a folder for ``from_pretrained`` (peft adapter with LoRA, full model without),
            with the tokenizer; ``state_dict``: a ``torch.save`` file ``{"state_dict": ...}`` loadable
            into ``TokenLM`` on any strategy.
        format: ``hf`` or ``state_dict``.
        trust: load the checkpoint as it is, without the safe-loading allowlist (a file you trust).

    Returns:
        ``output``.

    Example::

        export_checkpoint(TokenLM(model="tiny-llama", tokenizer="char"), "runs/fsdp/checkpoints/last.ckpt", "export/")
    """
    if format not in ("hf", "state_dict"):
        raise ConfigError(f"export format={format!r}: choose 'hf' (save_pretrained folder) or 'state_dict' (one file).")
    checkpoint = consolidated_state_dict(ckpt_path, trust)
    weights = model_weights(checkpoint["state_dict"])
    if format == "state_dict":
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        torch.save({"state_dict": weights, "hyper_parameters": checkpoint.get("hyper_parameters")}, output)
        return output
    module.configure_model()
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.startswith("reference_model.")]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {ckpt_path!r} does not match the configured model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): export with the config the checkpoint was trained with."
        )
    module.save_pretrained(output)
    return output
