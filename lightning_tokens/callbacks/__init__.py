"""Token methods as Lightning callbacks, one file per method, and utility callbacks."""

from lightning_tokens.callbacks.dft import DFT
from lightning_tokens.callbacks.fait import FAIT
from lightning_tokens.callbacks.prediction_writer import JSONLPredictionWriter
from lightning_tokens.callbacks.qtuning import QTuning
from lightning_tokens.callbacks.rho1 import ExcessLossSelection
from lightning_tokens.callbacks.safety_shaping import SafetyShaping
from lightning_tokens.callbacks.sstoken import SSToken
from lightning_tokens.callbacks.unlearning import GenericLabels, SavePretrained

__all__ = [
    "DFT",
    "FAIT",
    "ExcessLossSelection",
    "GenericLabels",
    "JSONLPredictionWriter",
    "QTuning",
    "SSToken",
    "SafetyShaping",
    "SavePretrained",
]
