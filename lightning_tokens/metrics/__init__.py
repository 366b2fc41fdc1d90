"""torchmetrics Metrics for token-level training (NUPA exact/digit match, ...)."""

from lightning_tokens.metrics.nupa import (
    NUPA_DOMAINS,
    NUPADigitLengthError,
    NUPADigitMatch,
    NUPAExactMatch,
    extract_answer,
    normalize_domain,
    nupa_digit_parts,
    nupa_metric_collection,
    nupa_scores,
)

__all__ = [
    "NUPA_DOMAINS",
    "NUPADigitLengthError",
    "NUPADigitMatch",
    "NUPAExactMatch",
    "extract_answer",
    "normalize_domain",
    "nupa_digit_parts",
    "nupa_metric_collection",
    "nupa_scores",
]
