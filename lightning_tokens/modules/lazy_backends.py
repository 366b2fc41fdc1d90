"""Optional back-ends imported only by the runs that use them.

peft imports bitsandbytes whenever it is installed: ``peft.helpers`` at import time, and LoRA's layer
dispatch each time it wraps a model. bitsandbytes then loads its native library (about 2 s) and, on CPUs
with AVX512-BF16, logs ``Failed to load CPU gemm_4bit_forward from kernels-community`` when the optional
``kernels`` package is missing: a message about 4-bit kernels on every LoRA run, quantized or not.

A model can only hold bitsandbytes layers once bitsandbytes has been imported (the ``quantization:``
option and the ``BitsandbytesPrecision`` plugin import it first), so peft's work is done inside
:func:`hide_unused_bitsandbytes`: until something imports bitsandbytes, peft sees it as not installed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def hide_unused_bitsandbytes() -> Iterator[None]:
    """Inside, ``import bitsandbytes`` fails (and peft treats it as absent) unless it is already imported.

    Example:
        >>> with hide_unused_bitsandbytes():
        ...     peft = import_peft()
        >>> hasattr(peft, "LoraConfig")
        True
    """
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # makes the import raise ImportError
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        _forget_cached_absence()


def import_peft() -> ModuleType:
    """peft, imported without importing an unused bitsandbytes (see :func:`hide_unused_bitsandbytes`)."""
    with hide_unused_bitsandbytes():
        import peft
    return peft


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, for a run that quantizes; also handed to ``peft.helpers`` if peft was imported
    while bitsandbytes was hidden."""
    import bitsandbytes

    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", bitsandbytes) is None:
        helpers.bnb = bitsandbytes  # type: ignore[attr-defined]
    _forget_cached_absence()
    return bitsandbytes


def _forget_cached_absence() -> None:
    """peft caches whether 4-bit bitsandbytes is usable; a check made while it was hidden must not stick."""
    import_utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_4bit_available", "is_bnb_available"):
        cached = getattr(import_utils, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
