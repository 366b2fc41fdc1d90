"""The token-loss pipeline: statistics, the method protocol, reduction."""

from lightning_tokens.core.loss import TokenLossMixin
from lightning_tokens.core.method import BatchTokenMethod, TokenMethod, TokenMethodOutput, multiply_token_weights
from lightning_tokens.core.reduction import TokenCountNormalizer
from lightning_tokens.core.reference import ReferenceSettings, ReferenceStats
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats

__all__ = [
    "IGNORE_INDEX",
    "BatchTokenMethod",
    "OutputHead",
    "ReferenceSettings",
    "ReferenceStats",
    "TokenCountNormalizer",
    "TokenLossMixin",
    "TokenMethod",
    "TokenMethodOutput",
    "TokenStats",
    "multiply_token_weights",
]
