"""torchmetrics Metrics for token-level training (NUPA exact/digit match, GVTBench counting and MCI, visual QA per task)."""

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
from lightning_tokens.metrics.gvtbench import (
    CountingAccuracy,
    CountingMAE,
    CountingRMSE,
    MCIAccuracy,
    counting_metric_collection,
    counting_scores,
    mci_correct,
    mci_scores,
)
from lightning_tokens.metrics.visual_qa import (
    DigitAccuracy,
    DomainMetric,
    ExactMatch,
    VisualQAMetrics,
    visual_qa_metric_collection,
)

__all__ = [
    "CountingAccuracy",
    "CountingMAE",
    "CountingRMSE",
    "DigitAccuracy",
    "DomainMetric",
    "ExactMatch",
    "MCIAccuracy",
    "VisualQAMetrics",
    "counting_metric_collection",
    "counting_scores",
    "mci_correct",
    "mci_scores",
    "visual_qa_metric_collection",
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
