"""Visual QA metrics routed by task: each example goes to the metrics of its domain (``counting``: accuracy,
MAE, RMSE; ``mci``: accuracy; ``digits``: accuracy; any other domain: exact match), logged as
``{prefix}{domain}/{metric}``.

The GVTBench scorers come from :mod:`lightning_tokens.metrics.gvtbench`; predictions are answers already
passed through its ``postprocess`` (what ``VisualQADataModule.extract_answer`` returns).

Example:
    >>> metrics = visual_qa_metric_collection(["counting", "mci"], prefix="val/")
    >>> metrics.update(["3.", "Yes.", "2."], ["3", "No.", "4"], ["counting", "mci", "counting"])
    >>> {k: round(float(v), 3) for k, v in sorted(metrics.compute().items())}
    {'val/counting/accuracy': 0.5, 'val/counting/mae': 1.0, 'val/counting/rmse': 1.414, 'val/mci/accuracy': 0.0}
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.wrappers.abstract import WrapperMetric

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.metrics.gvtbench import _check_pair, _SumCountMetric

__all__ = [
    "DigitAccuracy",
    "DomainMetric",
    "ExactMatch",
    "VisualQAMetrics",
    "domain_metric_factories",
    "visual_qa_metric_collection",
]

_NUMBER = re.compile(r"\d+")


class _MeanMetric(_SumCountMetric):
    """Mean of a per-example 0/1 score (GVTBench's sum / count states); NaN before any example."""

    higher_is_better = True

    def _score(self, prediction: str, target: str) -> bool:
        raise NotImplementedError

    def _batch_sum(self, predictions: Sequence[str], targets: Sequence[str]) -> tuple[float, int]:
        predictions, targets = _check_pair(predictions, targets)
        return float(sum(self._score(p, t) for p, t in zip(predictions, targets))), len(predictions)


class DigitAccuracy(_MeanMetric):
    """Fraction of answers whose first number equals the target digit (the ``digits`` task).

    Unlike GVTBench's ``extract_digit`` an answer with no number is wrong (it would otherwise read as 0, a
    right answer for every image of a zero), and number words are not read.

    Example:
        >>> m = DigitAccuracy()
        >>> m.update(["7.", "It is 3.", "", "seven."], ["7", "3", "0", "7"])
        >>> float(m.compute())
        0.5
    """

    _state_prefix = "digit_correct"

    def _score(self, prediction: str, target: str) -> bool:
        match = _NUMBER.search(prediction)
        return match is not None and int(match.group()) == int(target.strip().rstrip("."))


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!?").strip()


class ExactMatch(_MeanMetric):
    """Fraction of answers equal to the target after lower-casing, collapsing spaces and dropping a final
    ``.``/``!``/``?`` (the metric of user-file domains that have no task-specific scorer).

    Example:
        >>> m = ExactMatch()
        >>> m.update(["A red Ball.", "blue"], ["a red ball", "green"])
        >>> float(m.compute())
        0.5
    """

    _state_prefix = "exact_match"

    def _score(self, prediction: str, target: str) -> bool:
        return _normalize(prediction) == _normalize(target)


_COMPUTE_BEFORE_UPDATE = r".*was called before the ``update`` method.*"


class DomainMetric(WrapperMetric):
    """Feeds one metric the examples of one domain: ``update(predictions, targets, domains)`` keeps the
    examples whose domain is ``domain`` and passes them to ``metric.update(predictions, targets)``.

    The wrapped metric does the state keeping and the cross-process reduction; ``compute`` before any example
    of the domain gives the wrapped metric's empty value (NaN for the GVTBench metrics) without a warning.

    Args:
        domain: the task name to keep.
        metric: a metric with ``update(predictions, targets)``.

    Example:
        >>> m = DomainMetric("digits", DigitAccuracy())
        >>> m.update(["7.", "Yes."], ["7", "No."], ["digits", "mci"])
        >>> float(m.compute())
        1.0
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, domain: str, metric: Metric, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(metric, Metric):
            raise ConfigError(f"DomainMetric({domain!r}) wraps a torchmetrics Metric, got {type(metric).__name__}.")
        self.domain = domain
        self.metric = metric

    @property
    def higher_is_better(self) -> bool | None:  # type: ignore[override]
        """The wrapped metric's direction."""
        return getattr(self.metric, "higher_is_better", None)

    def _select(
        self, predictions: Sequence[str], targets: Sequence[str], domains: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        predictions, targets = _check_pair(predictions, targets)
        if isinstance(domains, str):
            domains = [domains] * len(predictions)
        if len(domains) != len(predictions):
            raise ConfigError(f"Got {len(predictions)} predictions but {len(domains)} domains.")
        keep = [i for i, d in enumerate(domains) if d == self.domain]
        return [predictions[i] for i in keep], [targets[i] for i in keep]

    def update(self, predictions: Sequence[str], targets: Sequence[str], domains: Sequence[str]) -> None:
        """Pass the examples of ``self.domain`` on to the wrapped metric."""
        predictions, targets = self._select(predictions, targets, domains)
        if predictions:
            self.metric.update(predictions, targets)

    def forward(self, predictions: Sequence[str], targets: Sequence[str], domains: Sequence[str]) -> Any:
        """Update with the batch and return the wrapped metric's value on the batch (NaN without examples of
        the domain)."""
        predictions, targets = self._select(predictions, targets, domains)
        if not predictions:
            return torch.tensor(float("nan"))
        return self.metric(predictions, targets)

    def compute(self) -> Any:
        """The wrapped metric's value over everything seen."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_COMPUTE_BEFORE_UPDATE)
            return self.metric.compute()

    def reset(self) -> None:
        """Reset the wrapped metric."""
        self.metric.reset()
        super().reset()


def domain_metric_factories(domain: str) -> dict[str, Callable[[], Metric]]:
    """The metrics of a domain, by name: ``counting`` → ``accuracy``, ``mae``, ``rmse`` (GVTBench OC);
    ``mci`` → ``accuracy`` (GVTBench's yes/no rule); ``digits`` → ``accuracy`` (:class:`DigitAccuracy`);
    anything else → ``exact_match`` (:class:`ExactMatch`).

    Example:
        >>> sorted(domain_metric_factories("counting"))
        ['accuracy', 'mae', 'rmse']
    """
    if domain in ("counting", "mci"):
        from lightning_tokens.metrics.gvtbench import CountingAccuracy, CountingMAE, CountingRMSE, MCIAccuracy

        if domain == "counting":
            return {"accuracy": CountingAccuracy, "mae": CountingMAE, "rmse": CountingRMSE}
        return {"accuracy": MCIAccuracy}
    if domain == "digits":
        return {"accuracy": DigitAccuracy}
    return {"exact_match": ExactMatch}


class VisualQAMetrics(MetricCollection):
    """One :class:`DomainMetric` per (domain, metric), keyed ``{domain}/{metric}`` under ``prefix``; ``update``
    takes ``(predictions, targets, domains)`` and refuses a domain it has no metrics for (it would be dropped
    from every score silently).

    ``LightningModule.log_dict(metrics)`` logs ``{prefix}{domain}/{metric}``, e.g. ``val/counting/mae``.

    Args:
        domains: the task names the data holds (order kept, repeats dropped).
        prefix: key prefix, e.g. ``"val/"``.

    Example:
        >>> metrics = VisualQAMetrics(["digits", "vqa"], prefix="test/")
        >>> metrics.update(["7.", "A cat."], ["7", "a dog"], ["digits", "vqa"])
        >>> {k: float(v) for k, v in sorted(metrics.compute().items())}
        {'test/digits/accuracy': 1.0, 'test/vqa/exact_match': 0.0}
    """

    def __init__(self, domains: Sequence[str], prefix: str = "val/") -> None:
        domains = list(dict.fromkeys([domains] if isinstance(domains, str) else domains))
        if not domains:
            raise ConfigError("VisualQAMetrics needs at least one domain (a task name such as 'counting').")
        metrics = {}
        for domain in domains:
            if not isinstance(domain, str) or not domain or "." in domain:
                raise ConfigError(f"Domain {domain!r} cannot name a metric: use a non-empty name without '.'.")
            for name, factory in domain_metric_factories(domain).items():
                metrics[f"{domain}/{name}"] = DomainMetric(domain, factory())
        super().__init__(metrics, prefix=prefix, compute_groups=False)
        self.domains = tuple(domains)

    def update(self, predictions: Sequence[str], targets: Sequence[str], domains: Sequence[str]) -> None:  # type: ignore[override]
        """Route each example to the metrics of its domain.

        Raises:
            ConfigError: a domain has no metrics here (build the collection with every domain of the data).
        """
        unknown = sorted({domains} if isinstance(domains, str) else set(domains)) if domains is not None else []
        unknown = [d for d in unknown if d not in self.domains]
        if unknown:
            raise ConfigError(
                f"VisualQAMetrics has metrics for {', '.join(self.domains)} but got examples of {', '.join(map(repr, unknown))}; "
                "build it with every domain of the evaluation data."
            )
        super().update(predictions, targets, domains)


def visual_qa_metric_collection(domains: Sequence[str], prefix: str = "val/") -> VisualQAMetrics:
    """A :class:`VisualQAMetrics` for ``domains`` under ``prefix``.

    Example:
        >>> sorted(visual_qa_metric_collection(["mci", "digits"], "val/").keys(keep_base=False))
        ['val/digits/accuracy', 'val/mci/accuracy']
    """
    return VisualQAMetrics(domains, prefix=prefix)
