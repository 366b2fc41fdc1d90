"""lightning_tokens: token-level training methods for PyTorch Lightning.

Public names are imported lazily, so ``import lightning_tokens.ops`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DFT": "lightning_tokens.callbacks",
    "ExcessLossSelection": "lightning_tokens.callbacks",
    "FAIT": "lightning_tokens.callbacks",
    "GenericLabels": "lightning_tokens.callbacks",
    "QTuning": "lightning_tokens.callbacks",
    "SafetyShaping": "lightning_tokens.callbacks",
    "SSToken": "lightning_tokens.callbacks",
    "ReferenceSettings": "lightning_tokens.core",
    "JSONLPredictionWriter": "lightning_tokens.callbacks",
    "BatchTokenMethod": "lightning_tokens.core",
    "TokenLossMixin": "lightning_tokens.core",
    "TokenMethod": "lightning_tokens.core",
    "TokenMethodOutput": "lightning_tokens.core",
    "TokenStats": "lightning_tokens.core",
    "NUPADataModule": "lightning_tokens.datamodules",
    "SFTDataModule": "lightning_tokens.datamodules",
    "LoRASettings": "lightning_tokens.modules",
    "OptimizerSettings": "lightning_tokens.modules",
    "TokenLM": "lightning_tokens.modules",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_tokens' has no attribute {name!r}")
