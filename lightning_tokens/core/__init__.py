"""The token-loss pipeline: statistics, the method protocol, reduction, reference providers (and the
``ReferenceHost`` protocol through which they talk to a module), the library's error types.

Names are imported lazily, so light modules (``core.errors``, ``core.options``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IGNORE_INDEX": "stats",
    "OutputHead": "stats",
    "TokenStats": "stats",
    "TokenLossMixin": "loss",
    "BatchTokenMethod": "method",
    "TokenMethod": "method",
    "TokenMethodOutput": "method",
    "multiply_token_weights": "method",
    "TokenCountNormalizer": "reduction",
    "ReferenceHost": "reference",
    "ReferenceSettings": "reference",
    "ReferenceStats": "reference",
    "ConfigError": "errors",
    "DataError": "errors",
    "LightningTokensError": "errors",
    "MissingFileError": "errors",
    "UntrustedCheckpointError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_tokens.core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_tokens.core' has no attribute {name!r}")
