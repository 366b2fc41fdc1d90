"""Reading a data file as text, shared by the datamodules that read user files (``sft/``, ``visual_qa/``)."""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable

from lightning_tokens.core.errors import MissingFileError


def read_utf8_text(path: str, missing: str, not_utf8: Callable[[int, int, int, str], Exception]) -> str:
    """The UTF-8 text of ``path``: a leading byte-order mark dropped, newlines universal (``\\r\\n`` and
    ``\\r`` read as ``\\n``, as ``open()`` in text mode).

    Args:
        path: the file.
        missing: the :class:`~lightning_tokens.core.errors.MissingFileError` message when ``path`` is no file.
        not_utf8: builds the error for invalid UTF-8 from ``(line, byte column, byte, reason)``, 1-based,
            lines counted as text mode ends them (``\\n``, ``\\r\\n`` or ``\\r``).
    """
    if not os.path.isfile(path):
        raise MissingFileError(missing)
    with open(path, "rb") as handle:
        data = handle.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[: err.start]
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        line_start = max(before.rfind(b"\n"), before.rfind(b"\r")) + 1
        raise not_utf8(line, err.start - line_start + 1, data[err.start], err.reason) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")
