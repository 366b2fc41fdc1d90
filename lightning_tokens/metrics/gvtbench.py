"""GVTBench scoring: Object Counting (OC) and Multi-Class Identification (MCI).

Re-implements the GVTBench evaluation of GVT (Wang et al., "What Makes for Good Visual Tokenizers for
Large Language Models?", arXiv 2305.12223). Reference code: ``TencentARC/GVT`` @fead7e3 (commit
``fead7e3393c8f315075e5d6a5adea887fcdd6a90``):

* ``gvt/gvt/modules/modeling_gvt.py::postprocess``: answer clean-up applied to every generated answer
  (``GVT.generate``) before scoring; see :func:`postprocess`.
* ``gvt/gvt/modules/evaluations/count.py``: ``str2d``, ``extract_digit``, ``_report_metrics`` and
  ``stat``; see :func:`extract_digit` and :func:`counting_scores`.
* ``gvt/gvt/modules/evaluations/multiclass.py::eval``: the yes/no substring rule and the
  ``n_obj_exist`` bins; see :func:`mci_correct` and :func:`mci_scores`.

The scorers take predictions *as the reference scores them*, i.e. already passed through
:func:`postprocess` (it is idempotent, so applying it twice is harmless). Deliberate deviations: inputs
of different lengths raise instead of being truncated by ``zip``; an empty input raises instead of
dividing by zero; figures are returned as unrounded floats (the reference prints 4 decimals).

The ``torchmetrics`` classes (:class:`CountingAccuracy`, :class:`CountingMAE`, :class:`CountingRMSE`,
:class:`MCIAccuracy`) keep sum/count states reduced with ``"sum"``, so they are DDP-safe and return
scalars that ``LightningModule.log_dict`` accepts.

Example:
    >>> postprocess("There are two dogs. One is brown.")
    'There are two dogs.'
    >>> extract_digit("There are two dogs.")
    2
    >>> scores = counting_scores(["two.", "3.", "nine."], ["2", "4", "9"])
    >>> {k: round(v, 4) for k, v in scores.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'accuracy': 0.3333, 'mae': 3.3333, 'rmse': 5.2281, '0~3/acc': 1.0, '0~3/mae': 0.0,
     '0~3/rmse': 0.0, '3~6/acc': 0.0, '3~6/mae': 1.0, '3~6/rmse': 1.0, '9~12/acc': 0.0,
     '9~12/mae': 9.0, '9~12/rmse': 9.0}
    >>> mci_correct("I do not know.", "No.")
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

from lightning_tokens.core.errors import ConfigError

__all__ = [
    "CountingAccuracy",
    "CountingMAE",
    "CountingRMSE",
    "MCIAccuracy",
    "counting_metric_collection",
    "counting_scores",
    "extract_digit",
    "mci_correct",
    "mci_scores",
    "postprocess",
]

# The reference's `str2d`, in its order; "nive" is its typo for "nine", kept on purpose.
_NUMBER_WORDS: tuple[tuple[str, int], ...] = (
    ("none", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nive", 9),
)
_NUMBER = re.compile(r"\d+")

# MCI bins of `multiclass.eval`: n_obj_exist < 10, 10..19, >= 20 (printed as "1 - 9", "10 - 19", ">= 20").
_MCI_BINS: tuple[tuple[str, float], ...] = (("1-9", 10), ("10-19", 20), (">=20", math.inf))


def postprocess(text: str) -> str:
    """Cut a generated answer at its first sentence end, as GVTBench does after generation.

    Steps of the reference: every ``"."`` becomes a standalone word, newlines are deleted (not turned
    into spaces), the text is stripped and split on single spaces (empty words dropped), one leading
    ``"."`` word is dropped, everything from the next ``"."`` word on is dropped, and the words are
    joined by spaces with a final ``"."``. Text with no words gives ``""``.

    Args:
        text: one decoded answer.

    Returns:
        The cleaned answer: ``""`` or words ending in ``"."``.

    Example:
        >>> postprocess(" Yes, it does.\\nThe cup is on the table.")
        'Yes, it does.'
        >>> postprocess("3.5")
        '3.'
        >>> postprocess("two\\ndogs")
        'twodogs.'
        >>> postprocess(". .")
        '.'
        >>> postprocess(" \\n ")
        ''
    """
    words = [word for word in text.replace(".", " . ").replace("\n", "").strip().split(" ") if word]
    if not words:
        return ""
    if words[0] == ".":
        words = words[1:]
    if "." in words:
        words = words[: words.index(".")]
    return " ".join(words) + "."


def extract_digit(text: str) -> int:
    """Read the predicted count from an answer, with the reference's quirks.

    Number words are replaced by their digits as plain, case-sensitive substrings, in the order
    ``none, one, two, ..., eight, nive`` (``"nive"``, the reference's typo, so ``"nine"`` is never
    read); then the first run of digits is the count, 0 if there is none. Consequences: capitalised
    words are not read (``"Two"`` → 0), words inside words are (``"someone"`` → 1,
    ``"eighteen"`` → 8), ``"none"`` wins over its ``"one"``, and adjacent words fuse into one number
    (``"onetwo"`` → 12).

    Args:
        text: one (post-processed) answer.

    Returns:
        The count, a non-negative int.

    Example:
        >>> extract_digit("There are two dogs.")
        2
        >>> extract_digit("nine.")
        0
        >>> extract_digit("someone is there")
        1
    """
    for word, value in _NUMBER_WORDS:
        text = text.replace(word, str(value))
    match = _NUMBER.search(text)
    return int(match.group()) if match else 0


def _check_pair(predictions: Sequence[Any], targets: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    if isinstance(predictions, str) or isinstance(targets, str):
        raise TypeError("predictions and targets must be sequences of strings, not a single string.")
    predictions, targets = list(predictions), list(targets)
    if len(predictions) != len(targets):
        raise ConfigError(f"Got {len(predictions)} predictions but {len(targets)} targets.")
    return predictions, targets


def _count_pairs(predictions: Sequence[str], targets: Sequence[str | int]) -> list[tuple[int, int]]:
    """``(extract_digit(prediction), int(target))`` for each example."""
    predictions, targets = _check_pair(predictions, targets)
    return [(extract_digit(pred), int(gt)) for pred, gt in zip(predictions, targets)]


def _count_stats(pairs: Sequence[tuple[int, int]]) -> tuple[float, float, float]:
    """Accuracy, MAE and RMSE of non-empty ``(pred, gt)`` pairs."""
    n = len(pairs)
    correct = sum(pred == gt for pred, gt in pairs)
    abs_error = sum(abs(gt - pred) for pred, gt in pairs)
    sq_error = sum((gt - pred) ** 2 for pred, gt in pairs)
    return correct / n, abs_error / n, math.sqrt(sq_error / n)


def counting_scores(predictions: Sequence[str], targets: Sequence[str | int]) -> dict[str, float]:
    """Object Counting figures overall and per ground-truth bin (reference: ``count.py``).

    Each prediction is read with :func:`extract_digit`, each target with ``int``. Overall figures
    (keys as ``_report_metrics``): ``accuracy`` (exact count match), ``mae`` and ``rmse``. Per bin
    ``k = gt // 3`` (only bins that occur, in ascending order, labelled ``f"{3k}~{3k + 3}"`` like the
    reference's printout, upper end exclusive) the keys of ``stat``: ``"{label}/acc"``,
    ``"{label}/mae"`` and ``"{label}/rmse"``, e.g. ``"0~3/acc"`` for ground truths 0, 1 and 2.

    Args:
        predictions: post-processed answers, e.g. ``["two.", "3."]``.
        targets: ground-truth counts, as the benchmark's strings (``"2"``) or ints.

    Returns:
        A flat dict of floats, overall keys first, then bins.

    Raises:
        ConfigError: the inputs differ in length or are empty.
        TypeError: a single string was passed instead of a sequence.
        ValueError: a target is not an integer string.

    Example:
        >>> counting_scores(["1."], [1])
        {'accuracy': 1.0, 'mae': 0.0, 'rmse': 0.0, '0~3/acc': 1.0, '0~3/mae': 0.0, '0~3/rmse': 0.0}
    """
    pairs = _count_pairs(predictions, targets)
    if not pairs:
        raise ConfigError("counting_scores needs at least one prediction.")
    accuracy, mae, rmse = _count_stats(pairs)
    scores = {"accuracy": accuracy, "mae": mae, "rmse": rmse}
    bins: dict[int, list[tuple[int, int]]] = {}
    for pred, gt in pairs:
        bins.setdefault(gt // 3, []).append((pred, gt))
    for k in sorted(bins):
        label = f"{3 * k}~{3 * k + 3}"
        accuracy, mae, rmse = _count_stats(bins[k])
        scores.update({f"{label}/acc": accuracy, f"{label}/mae": mae, f"{label}/rmse": rmse})
    return scores


def mci_correct(prediction: str, target: str) -> bool:
    """Whether a yes/no answer is right, by the reference's substring rule (``multiclass.py``).

    Right iff (``"Yes"`` in the target and ``"yes"`` in the lower-cased prediction) or (``"No"`` in
    the target and ``"no"`` in the lower-cased prediction). The target is matched case-sensitively
    (``"yes."`` is never right); the prediction is matched anywhere, so ``"I do not know"``,
    ``"None"`` and ``"Not sure"`` count as no, ``"eyes"`` as yes, and ``"Yes, or no"`` is right for
    both targets.

    Example:
        >>> mci_correct("Yes.", "Yes.")
        True
        >>> mci_correct("I do not know.", "No.")
        True
        >>> mci_correct("yes.", "No.")
        False
    """
    pred = prediction.lower()
    return ("Yes" in target and "yes" in pred) or ("No" in target and "no" in pred)


def mci_scores(
    predictions: Sequence[str], targets: Sequence[str], n_obj_exist: Sequence[int] | None = None
) -> dict[str, float]:
    """MCI accuracy overall and, given ``n_obj_exist``, per bin (reference: ``multiclass.eval``).

    Bins by the number of objects in the image: ``"1-9/acc"`` (``n_obj_exist < 10``, 0 included as
    in the reference despite its "1 - 9" label), ``"10-19/acc"`` and ``">=20/acc"``. An empty bin is
    NaN, as the reference's ``np.sum([]) / 0``.

    Args:
        predictions: post-processed answers.
        targets: ``"Yes."`` / ``"No."`` ground truths.
        n_obj_exist: objects in each image (the benchmark's ``n_obj_exist``); ``None`` skips the bins.

    Returns:
        ``{"accuracy": ...}`` plus the three bins when ``n_obj_exist`` is given.

    Raises:
        ConfigError: the inputs differ in length or are empty.
        TypeError: a single string was passed instead of a sequence.

    Example:
        >>> mci_scores(["Yes.", "No.", "yes"], ["Yes.", "Yes.", "Yes."], [3, 12, 12])
        {'accuracy': 0.6666666666666666, '1-9/acc': 1.0, '10-19/acc': 0.5, '>=20/acc': nan}
    """
    predictions, targets = _check_pair(predictions, targets)
    if not predictions:
        raise ConfigError("mci_scores needs at least one prediction.")
    hits = [mci_correct(pred, gt) for pred, gt in zip(predictions, targets)]
    scores = {"accuracy": sum(hits) / len(hits)}
    if n_obj_exist is None:
        return scores
    _, n_obj_exist = _check_pair(hits, n_obj_exist)
    lower = -math.inf
    for label, upper in _MCI_BINS:
        in_bin = [hit for hit, n in zip(hits, n_obj_exist) if lower <= n < upper]
        scores[f"{label}/acc"] = sum(in_bin) / len(in_bin) if in_bin else math.nan
        lower = upper
    return scores


class _SumCountMetric(Metric):
    """Mean of one per-example quantity over all examples seen (sums reduced across processes).

    Subclasses set :meth:`_batch_sum` and a distinct ``_state_prefix`` (distinct state names keep a
    ``MetricCollection`` from merging the metrics into one compute group).
    """

    is_differentiable = False
    full_state_update = False
    _state_prefix: str = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state(f"{self._state_prefix}_sum", default=zero, dist_reduce_fx="sum")
        self.add_state(f"{self._state_prefix}_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _batch_sum(self, predictions: Sequence[str], targets: Sequence[Any]) -> tuple[float, int]:
        raise NotImplementedError

    def update(self, predictions: Sequence[str], targets: Sequence[Any]) -> None:
        """Add a batch of post-processed answers and their ground truths."""
        total, n = self._batch_sum(predictions, targets)
        name = self._state_prefix
        setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + total)
        setattr(self, f"{name}_count", getattr(self, f"{name}_count") + n)

    def _mean(self) -> torch.Tensor:
        total = getattr(self, f"{self._state_prefix}_sum")
        count = getattr(self, f"{self._state_prefix}_count")
        if int(count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=total.device)
        return total / count

    def compute(self) -> torch.Tensor:
        """Mean over all examples (NaN before any example), as a float32 scalar."""
        return self._mean().float()


class CountingAccuracy(_SumCountMetric):
    """Fraction of counts read by :func:`extract_digit` that equal the ground truth (OC accuracy).

    Example:
        >>> m = CountingAccuracy()
        >>> m.update(["two.", "nine."], ["2", "9"])
        >>> float(m.compute())
        0.5
    """

    higher_is_better = True
    _state_prefix = "count_correct"

    def _batch_sum(self, predictions: Sequence[str], targets: Sequence[Any]) -> tuple[float, int]:
        pairs = _count_pairs(predictions, targets)
        return float(sum(pred == gt for pred, gt in pairs)), len(pairs)


class CountingMAE(_SumCountMetric):
    """Mean absolute error of the counts read by :func:`extract_digit` (OC MAE).

    Example:
        >>> m = CountingMAE()
        >>> m.update(["two.", "nine."], ["2", "9"])
        >>> float(m.compute())
        4.5
    """

    higher_is_better = False
    _state_prefix = "count_abs_error"

    def _batch_sum(self, predictions: Sequence[str], targets: Sequence[Any]) -> tuple[float, int]:
        pairs = _count_pairs(predictions, targets)
        return float(sum(abs(gt - pred) for pred, gt in pairs)), len(pairs)


class CountingRMSE(_SumCountMetric):
    """Root mean squared error of the counts read by :func:`extract_digit` (OC RMSE).

    Example:
        >>> m = CountingRMSE()
        >>> m.update(["two.", "nine."], ["2", "9"])
        >>> round(float(m.compute()), 4)
        6.364
    """

    higher_is_better = False
    _state_prefix = "count_sq_error"

    def _batch_sum(self, predictions: Sequence[str], targets: Sequence[Any]) -> tuple[float, int]:
        pairs = _count_pairs(predictions, targets)
        return float(sum((gt - pred) ** 2 for pred, gt in pairs)), len(pairs)

    def compute(self) -> torch.Tensor:
        """Square root of the mean squared error (NaN before any example), as a float32 scalar."""
        return self._mean().sqrt().float()


class MCIAccuracy(_SumCountMetric):
    """Fraction of yes/no answers judged right by :func:`mci_correct` (MCI accuracy).

    Example:
        >>> m = MCIAccuracy()
        >>> m.update(["Yes.", "I do not know."], ["Yes.", "Yes."])
        >>> float(m.compute())
        0.5
    """

    higher_is_better = True
    _state_prefix = "mci_correct"

    def _batch_sum(self, predictions: Sequence[str], targets: Sequence[Any]) -> tuple[float, int]:
        predictions, targets = _check_pair(predictions, targets)
        return float(sum(mci_correct(pred, gt) for pred, gt in zip(predictions, targets))), len(predictions)


def counting_metric_collection(prefix: str = "val/") -> MetricCollection:
    """The three OC metrics under keys ``accuracy``, ``mae`` and ``rmse`` (the reference's names).

    Example:
        >>> metrics = counting_metric_collection("val/oc_")
        >>> metrics.update(["two.", "3."], ["2", "4"])
        >>> {k: float(v) for k, v in sorted(metrics.compute().items())}
        {'val/oc_accuracy': 0.5, 'val/oc_mae': 0.5, 'val/oc_rmse': 0.7071067690849304}
    """
    return MetricCollection(
        {"accuracy": CountingAccuracy(), "mae": CountingMAE(), "rmse": CountingRMSE()},
        prefix=prefix,
        compute_groups=False,
    )
