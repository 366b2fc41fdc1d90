"""Objects named by import path (YAML names callables this way: reward functions, indicators, embedders)."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_tokens.core.errors import ConfigError


def import_object(path: str) -> Any:
    """The object an import path names: ``"package.module.name"`` or ``"package.module:name"``.

    Example:
        >>> import_object("math.sqrt")(9.0)
        3.0
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"expected an import path such as 'my_package.module.function', got {path!r}.")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{path!r} is not an import path: write 'my_package.module.function' (or 'module:function').")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import module {module_name!r} of {path!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{path!r}: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj
