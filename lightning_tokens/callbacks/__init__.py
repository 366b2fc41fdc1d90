"""Token methods as Lightning callbacks, and utility callbacks.

A method is one file (``dft.py``); a method with several jobs is one folder (``qtuning/``,
``safety_shaping/``, ``unlearning/``) holding ``functional.py`` (its pure tensor arithmetic),
``callback.py`` (the callback) and one file per other job (score files, data preparation), with the
package re-exporting its public names.
"""

from lightning_tokens.callbacks.caft import CAFT
from lightning_tokens.callbacks.cut import ContrastiveUnlikelihood, DualCUT
from lightning_tokens.callbacks.dft import DFT
from lightning_tokens.callbacks.divergence_weighting import DivergenceWeightedAdvantage
from lightning_tokens.callbacks.fait import FAIT
from lightning_tokens.callbacks.ift import IntuitiveFineTuning
from lightning_tokens.callbacks.otr import OneTokenRollout
from lightning_tokens.callbacks.prediction_writer import JSONLPredictionWriter
from lightning_tokens.callbacks.qtuning import QTuning
from lightning_tokens.callbacks.resumable_checkpoint import ResumableCheckpoint
from lightning_tokens.callbacks.rho1 import ExcessLossSelection
from lightning_tokens.callbacks.safety_shaping import SafetyShaping
from lightning_tokens.callbacks.sstoken import SSToken
from lightning_tokens.callbacks.steering import Steering
from lightning_tokens.callbacks.token_maps import TokenMapLogger
from lightning_tokens.callbacks.unlearning import GenericLabels, SavePretrained
from lightning_tokens.callbacks.vision_token_mask import VisionTokenMask

__all__ = [
    "CAFT",
    "ContrastiveUnlikelihood",
    "DFT",
    "DivergenceWeightedAdvantage",
    "DualCUT",
    "ExcessLossSelection",
    "FAIT",
    "GenericLabels",
    "IntuitiveFineTuning",
    "JSONLPredictionWriter",
    "OneTokenRollout",
    "QTuning",
    "ResumableCheckpoint",
    "SafetyShaping",
    "SavePretrained",
    "SSToken",
    "Steering",
    "TokenMapLogger",
    "VisionTokenMask",
]
