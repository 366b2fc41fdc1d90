"""Edits of a parsed config before anything is built: the one output folder (``output_dir``) and the
token methods of a ``compare`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info


def apply_output_dir(config: Any) -> None:
    """``output_dir: runs/x`` in a parsed config becomes the Trainer's ``default_root_dir``, the
    ``save_dir`` of every logger that has one and the checkpoint folder ``runs/x/checkpoints`` (the
    ``checkpoint`` section, and any ``ModelCheckpoint`` among the callbacks). It replaces paths the config
    also gives (each replacement is reported), so one option moves a whole run. With no logger
    configured, the run logs to CSV files in ``runs/x/logs/version_<n>/metrics.csv``."""
    output_dir = config.get("output_dir")
    if not output_dir:
        return
    checkpoints = str(Path(output_dir) / "checkpoints")
    _replace(config, "trainer.default_root_dir", output_dir)
    if config.get("checkpoint") is not None:
        _replace(config, "checkpoint.dirpath", checkpoints)
    loggers = config.get("trainer.logger")
    if loggers is None or loggers is True:  # Lightning's default logger: a CSV log in the run's folder
        config["trainer.logger"] = loggers = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=output_dir, name="logs")
        )
    for index, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        arguments = _class_arguments(logger)
        if arguments is not None and "save_dir" in arguments:
            _replace(arguments, "save_dir", output_dir, label=f"trainer.logger[{index}].save_dir")
    for index, callback in enumerate(config.get("trainer.callbacks") or []):
        if _is_subclass(callback, "lightning.pytorch.callbacks.ModelCheckpoint"):
            _replace(callback["init_args"], "dirpath", checkpoints, label=f"trainer.callbacks[{index}].dirpath")


def _replace(target: Any, key: str, value: str, label: str | None = None) -> None:
    """``target[key] = value``, reporting a different value it replaces (as ``label``, default ``key``)."""
    old = target.get(key)
    if old not in (None, "", value):
        rank_zero_info(f"output_dir: {label or key} {old} -> {value}")
    target[key] = value


def _class_arguments(entry: Any) -> Any:
    """``init_args`` of a ``class_path`` entry of a parsed config (``None`` for ``True``/``False``/``None``)."""
    if entry is None or isinstance(entry, bool) or not hasattr(entry, "get"):
        return None
    return entry.get("init_args")


def _is_subclass(entry: Any, base: str | type | tuple[type, ...]) -> bool:
    """Whether a ``class_path`` entry of a parsed config names a subclass of ``base`` (a class, classes, or
    an import path)."""
    if _class_arguments(entry) is None or not entry.get("class_path"):
        return False
    from jsonargparse.typing import import_object  # type: ignore[attr-defined]

    try:
        return issubclass(import_object(entry["class_path"]), import_object(base) if isinstance(base, str) else base)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def replace_token_methods(config: Any, methods: list[Any]) -> None:
    """Drop the token methods (``TokenMethod`` / ``BatchTokenMethod`` callbacks) from a parsed config's
    ``trainer.callbacks`` and add ``methods`` (parsed ``class_path`` entries) in their place, before the
    other callbacks; what a ``compare`` run does to its base config."""
    from lightning_tokens.core.method import BatchTokenMethod, TokenMethod

    callbacks = config.get("trainer.callbacks") or []
    others = [entry for entry in callbacks if not _is_subclass(entry, (TokenMethod, BatchTokenMethod))]
    config["trainer.callbacks"] = [*methods, *others]
