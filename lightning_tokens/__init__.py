"""lightning_tokens: token-level training methods for PyTorch Lightning.

Every method is a statement about which tokens a model learns from, and how much; every modality (text,
images, speech, time series) becomes tokens, and RL advantages become per-token weights, so all of them
go through one token-loss pipeline. Where things go, by Lightning role:

- ``ops/``: fused and chunked per-token statistics (NLL, entropy, log-probs, KL) without ``(tokens × vocab)``
  logits.
- ``core/``: ``TokenStats``, the method protocol, the exact token-mean reduction, ``TokenLossMixin``, the
  reference / history providers and the ``ReferenceHost`` protocol through which they reach a module.
  ``core`` never imports the packages below.
- ``callbacks/``: the token methods, one file each (``dft.py``, ``rho1.py``), or one folder for a method
  with several jobs (``qtuning/``: ``functional.py`` arithmetic + ``callback.py``; ``unlearning/`` adds its
  data-preparation step).
- ``modules/``: LightningModules, one file per model family: ``causal_lm.py`` (``TokenLM``, text) and, as
  they arrive, the image tokenizer, the vision-language module (also time series as plots), the speech
  modules, GRPO; their checkpoints, quantization and sharding helpers.
- ``datamodules/``: data per source (``sft/`` your files, ``nupa/`` generated tasks, ``filters/`` data
  selection; images, speech, time series and RL prompts as they arrive).
- ``metrics/``: torchmetrics metrics. ``models/``: offline model builders (presets, tokenizers, the packaged
  small model) and frozen judges (``guardrails.py``).
- ``rl/``: pure RL arithmetic (group advantages, policy losses, KL estimators, GRAO).
- ``layers/``: blocks shared by several modules (the Perceiver resampler). ``rewards/``: reward functions.
- ``compare/``: ``lightning-tokens compare`` (variants × seeds, the table and the chart).
- ``cli/``: the ``lightning-tokens`` command: ``app.py`` (TokensCLI, ``main``), ``trainer.py``
  (TokensTrainer), ``offline_steps.py`` (``score``, ``star_score``, ``generic_labels``),
  ``config_edits.py`` (``output_dir``), ``messages.py`` (third-party messages it silences).

Public names are imported lazily, so ``import lightning_tokens.ops`` stays light.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DFT": "lightning_tokens.callbacks",
    "CAFT": "lightning_tokens.callbacks",
    "ExcessLossSelection": "lightning_tokens.callbacks",
    "FAIT": "lightning_tokens.callbacks",
    "GenericLabels": "lightning_tokens.callbacks",
    "QTuning": "lightning_tokens.callbacks",
    "OneTokenRollout": "lightning_tokens.callbacks",
    "IntuitiveFineTuning": "lightning_tokens.callbacks",
    "ContrastiveUnlikelihood": "lightning_tokens.callbacks",
    "DualCUT": "lightning_tokens.callbacks",
    "TokenMapLogger": "lightning_tokens.callbacks",
    "Steering": "lightning_tokens.callbacks",
    "VisionTokenMask": "lightning_tokens.callbacks",
    "ContrastiveDataModule": "lightning_tokens.datamodules",
    "DivergenceWeightedAdvantage": "lightning_tokens.callbacks",
    "SafetyShaping": "lightning_tokens.callbacks",
    "SSToken": "lightning_tokens.callbacks",
    "ReferenceSettings": "lightning_tokens.core",
    "ConfigError": "lightning_tokens.core",
    "DataError": "lightning_tokens.core",
    "LightningTokensError": "lightning_tokens.core",
    "JSONLPredictionWriter": "lightning_tokens.callbacks",
    "BatchTokenMethod": "lightning_tokens.core",
    "TokenLossMixin": "lightning_tokens.core",
    "TokenMethod": "lightning_tokens.core",
    "TokenMethodOutput": "lightning_tokens.core",
    "TokenStats": "lightning_tokens.core",
    "NUPADataModule": "lightning_tokens.datamodules",
    "SFTDataModule": "lightning_tokens.datamodules",
    "LoRASettings": "lightning_tokens.modules",
    "CordaSettings": "lightning_tokens.modules",
    "OptimizerSettings": "lightning_tokens.modules",
    "TokenLM": "lightning_tokens.modules",
    "GRPO": "lightning_tokens.modules",
    "GRAO": "lightning_tokens.modules",
    "FlexibleImageTokenizer": "lightning_tokens.modules",
    "ImageCodeGenerator": "lightning_tokens.modules",
    "ImageCodesDataModule": "lightning_tokens.datamodules",
    "VisionLanguageGRPO": "lightning_tokens.modules",
    "VisionLanguageLM": "lightning_tokens.modules",
    "VisionSettings": "lightning_tokens.modules",
    "ResamplerSettings": "lightning_tokens.modules",
    "TimeSeriesDataModule": "lightning_tokens.datamodules",
    "VisualQADataModule": "lightning_tokens.datamodules",
    "VisualTokenizerDistillation": "lightning_tokens.modules",
    "ImageDataModule": "lightning_tokens.datamodules",
    "RewardSpec": "lightning_tokens.rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_tokens' has no attribute {name!r}")


#: Modules that moved, by their old import path. Code and YAML ``class_path`` entries written against an
#: old path get the module at its new home (the same module object, so classes keep their identity) and
#: a ``DeprecationWarning`` naming the new path.
MOVED_MODULES = {
    "lightning_tokens.guardrails": "lightning_tokens.models.guardrails",
    "lightning_tokens.scoring": "lightning_tokens.core.reference_scores",
    "lightning_tokens.unlearning": "lightning_tokens.callbacks.unlearning",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old import path of :data:`MOVED_MODULES` to the module at its new path."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec: Any) -> ModuleType:
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__spec__
        module.__spec__ = alias.loader_state  # the import system stamped the alias's spec on the real module
        warnings.warn(f"{alias.name} moved to {module.__name__}: import it from there.", DeprecationWarning, stacklevel=2)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
