"""The token-loss pipeline: statistics, the method protocol, reduction, reference providers (and the
``ReferenceHost`` protocol through which they talk to a module)."""

from lightning_tokens.core.loss import TokenLossMixin
from lightning_tokens.core.method import BatchTokenMethod, TokenMethod, TokenMethodOutput, multiply_token_weights
from lightning_tokens.core.reduction import TokenCountNormalizer
from lightning_tokens.core.reference import ReferenceHost, ReferenceSettings, ReferenceStats
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats

__all__ = [
    "IGNORE_INDEX",
    "BatchTokenMethod",
    "OutputHead",
    "ReferenceHost",
    "ReferenceSettings",
    "ReferenceStats",
    "TokenCountNormalizer",
    "TokenLossMixin",
    "TokenMethod",
    "TokenMethodOutput",
    "TokenStats",
    "multiply_token_weights",
]
