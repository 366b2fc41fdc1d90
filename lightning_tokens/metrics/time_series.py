"""Classification answers of time series prompts: accuracy of the parsed ``<class>`` label and the share of
answers that hold a valid label (TimeMaster's ``acc`` and ``fmt``, averaged).

Predictions are labels already parsed from the generated text (``TimeSeriesDataModule.extract_answer``: the
allowed label as spelled in the label set, ``""`` when none was found); targets are the true labels.

Example:
    >>> metrics = time_series_metrics("val/")
    >>> metrics.update(["Gun", "", "Point"], ["Gun", "Point", "Gun"], ["GunPoint"] * 3)
    >>> {k: round(float(v), 3) for k, v in sorted(metrics.compute().items())}
    {'val/accuracy': 0.333, 'val/format': 0.667}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmetrics import MetricCollection

from lightning_tokens.metrics.visual_qa import _MeanMetric

__all__ = ["LabelAccuracy", "LabelFormat", "time_series_metrics"]


class _LabelMean(_MeanMetric):
    """A per-answer 0/1 score averaged (visual QA's mean metric), with the datamodule protocol's ``domains``."""

    def update(self, predictions: Sequence[str], targets: Sequence[str], domains: Any = None) -> None:  # type: ignore[override]
        """Add parsed labels and true labels (``domains`` is accepted for the datamodule protocol, unused)."""
        super().update(predictions, targets)


class LabelAccuracy(_LabelMean):
    """Share of parsed labels equal to the true label (case-insensitive, stripped)."""

    _state_prefix = "label_correct"

    def _score(self, prediction: str, target: str) -> bool:
        return prediction.strip().lower() == target.strip().lower() != ""


class LabelFormat(_LabelMean):
    """Share of answers from which a valid label was parsed (non-empty predictions)."""

    _state_prefix = "label_parsed"

    def _score(self, prediction: str, target: str) -> bool:
        return prediction.strip() != ""


def time_series_metrics(prefix: str = "val/") -> MetricCollection:
    """``{prefix}accuracy`` and ``{prefix}format`` as one collection with ``update(predictions, targets, domains)``."""
    return MetricCollection({"accuracy": LabelAccuracy(), "format": LabelFormat()}, prefix=prefix, compute_groups=False)
