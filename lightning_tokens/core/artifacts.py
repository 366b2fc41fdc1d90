"""Reading the library's safetensors artifacts (reference scores, STAR scores, generic targets) as untrusted
files: a missing file is a :class:`~lightning_tokens.core.errors.MissingFileError`, and anything that is not a
well-formed artifact (not safetensors, truncated, wrong metadata, tensor names or dtypes, shapes) a
:class:`~lightning_tokens.core.errors.DataError` that names the file and the tensor or metadata field.

Example:
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "scores.safetensors")
    >>> save_file({"7": torch.zeros(3)}, path, metadata={"format": "demo"})
    >>> tensors, metadata = read_safetensors(path, "scores file")
    >>> sorted(tensors), metadata, example_id_key(path, "7")
    (['7'], {'format': 'demo'}, 7)
    >>> with open(path, "r+b") as f:
    ...     _ = f.truncate(20)
    >>> try:
    ...     read_safetensors(path, "scores file")
    ... except DataError as error:
    ...     "is not a readable safetensors file" in str(error)
    True
"""

from __future__ import annotations

import os
import re

from torch import Tensor

from lightning_tokens.core.errors import DataError, MissingFileError

__all__ = ["artifact_error", "check_format", "example_id_key", "read_safetensors"]

_ID = re.compile(r"-?[0-9]{1,19}")


def artifact_error(path: str, where: str | None, message: str) -> DataError:
    """A :class:`DataError` ``"<path>, <where>: <message>"`` (``where``: e.g. ``tensor '7'``, ``metadata 'format'``)."""
    return DataError(f"{path}, {where}: {message}" if where else f"{path}: {message}")


def read_safetensors(path: str, what: str, hint: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors by name, metadata)`` of the safetensors file ``path``, loaded on the CPU.

    ``what`` names the file in messages (``"reference scores file"``); ``hint`` says how to make one.
    Raises :class:`MissingFileError` when ``path`` is not a file, :class:`DataError` when it cannot be read
    as safetensors (any failure of the parser: the file is untrusted input).
    """
    from safetensors import SafetensorError, safe_open

    suffix = f" {hint}" if hint else ""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path!r} does not exist.{suffix}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, TypeError, ValueError, OverflowError) as err:
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise artifact_error(path, None, f"is not a readable safetensors file ({detail}).{suffix}") from None
    return tensors, metadata


def check_format(path: str, metadata: dict[str, str], expected: str, what: str, hint: str = "", required: bool = True) -> None:
    """Raise a :class:`DataError` unless ``metadata["format"]`` is ``expected`` (or absent, when not ``required``)."""
    found = metadata.get("format")
    if found == expected or (found is None and not required):
        return
    suffix = f" {hint}" if hint else ""
    raise artifact_error(path, "metadata 'format'", f"is not a {what} (format {found!r}, expected {expected!r}).{suffix}")


def example_id_key(path: str, name: str, where: str | None = None) -> int:
    """The example id a tensor name spells (a decimal integer within int64), else a :class:`DataError`."""
    if not _ID.fullmatch(name) or not -(2**63) <= int(name) < 2**63:
        raise artifact_error(
            path, where or f"tensor {name[:80]!r}", "the name must be an example id (a decimal integer in the int64 range)."
        )
    return int(name)
