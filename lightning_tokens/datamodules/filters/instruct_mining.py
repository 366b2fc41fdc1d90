"""InstructMining (Cao et al., arXiv 2307.06290): the published linear rules, their predicted log loss and
:class:`InstructMiningFilter`, which keeps the records with the lowest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.filters.base import Record, RecordFilter, _check_selection
from lightning_tokens.datamodules.filters.indicators import Indicator, Length

__all__ = ["INSTRUCT_MINING_RULES", "InstructMiningFilter", "instruct_mining_score"]


#: The two published InstructMining rules: ``(intercept, {indicator: coefficient})``; the rule predicts
#: ``log L`` (evaluation loss after fine-tuning), lower is better. ``v1`` is the early arXiv version's,
#: ``v3`` the later one's (R² = 0.522). Indicators: ``reward`` (reward-model score), ``length``
#: (response length), ``knn6`` (embedding distance to the 6th nearest neighbour),
#: ``understandability`` / ``naturalness`` / ``coherence`` (UniEval).
INSTRUCT_MINING_RULES: dict[str, tuple[float, dict[str, float]]] = {
    "v1": (1.0694, {"reward": -0.1498, "length": 8.257e-5, "knn6": -0.9350}),
    "v3": (0.0274, {"reward": -0.0078, "understandability": 0.4421, "naturalness": -0.3212, "coherence": -0.1520}),
}


def instruct_mining_score(
    indicators: Mapping[str, Any],
    version: Literal["v1", "v3", "custom"] = "v3",
    coefficients: Mapping[str, float] | None = None,
    intercept: float | None = None,
) -> Any:
    """InstructMining's predicted log evaluation loss ``intercept + Σ_i c_i · x_i`` (lower is better).

    Args:
        indicators: indicator name → value (a float, a numpy array or a tensor; arrays broadcast).
        version: ``v1`` (``1.0694 − 0.1498·reward + 8.257e-5·length − 0.9350·knn6``), ``v3``
            (``0.0274 − 0.0078·reward + 0.4421·understandability − 0.3212·naturalness −
            0.1520·coherence``) or ``custom`` (give ``coefficients`` and ``intercept``).
        coefficients: the custom rule's coefficients.
        intercept: the custom rule's intercept (default 0).

    Example:
        >>> round(instruct_mining_score({"reward": 2, "length": 300, "knn6": 0.9}, "v1"), 6)
        -0.046929
        >>> round(instruct_mining_score({"reward": 2, "understandability": .9, "naturalness": .8, "coherence": .85}), 5)
        0.02353
    """
    if version == "custom":
        if not coefficients:
            raise ConfigError("version='custom' needs coefficients (indicator name -> coefficient).")
        bias, coefs = (0.0 if intercept is None else float(intercept)), dict(coefficients)
    elif version in INSTRUCT_MINING_RULES:
        if coefficients is not None or intercept is not None:
            raise ConfigError(f"version={version!r} has its published coefficients; use version='custom' to give your own.")
        bias, coefs = INSTRUCT_MINING_RULES[version]
    else:
        raise ConfigError(f"version={version!r} must be 'v1', 'v3' or 'custom'.")
    missing = [name for name in coefs if name not in indicators]
    if missing:
        raise ConfigError(f"the {version} rule needs the indicators {', '.join(missing)}.")
    score: Any = bias
    for name, coef in coefs.items():
        score = score + coef * indicators[name]
    return score


class InstructMiningFilter(RecordFilter):
    """InstructMining: keep the records whose indicators predict the lowest fine-tuned evaluation loss.

    Paper: Cao et al., "Instruction Mining: Instruction Data Selection for Tuning Large Language Models"
    (arXiv 2307.06290). A linear rule, fitted on many fine-tuning runs, predicts ``log L`` from
    data-quality indicators (:func:`instruct_mining_score`); records are ranked by it and the best kept.

    Indicators are :class:`Indicator` objects by name (the rule's names): :class:`Length` (``length``,
    on by default), :class:`KNNDistance` (``knn6``, with your embedder's import path),
    :class:`Perplexity` (a reference LM through the fused ops; for custom rules),
    :class:`CallableIndicator` (a reward model, a UniEval dimension: your function's import path) or
    :class:`RecordField` (scores precomputed into the data).

    Ambiguities (``shared/specs/text_methods.md`` §13):
        - *Two published rules* (the early arXiv ``v1`` and the later ``v3``): ``version`` chooses;
          default ``v3``, the later (final) version. ``custom`` fits your own rule.
        - *Subset size*: the paper picks it with BlendSearch over fine-tuning runs (not done here);
          give ``keep_fraction`` (the best part) or ``max_score`` (a threshold on the predicted log loss).
        - *Length unit* and *kNN metric*: options of :class:`Length` (tokens) and :class:`KNNDistance`
          (euclidean).

    Args:
        indicators: indicator name → :class:`Indicator`; merged over the default ``{"length": Length()}``.
        version: ``v1``, ``v3`` or ``custom``.
        coefficients: the ``custom`` rule's coefficients by indicator name.
        intercept: the ``custom`` rule's intercept.
        keep_fraction: keep this fraction of the records with the lowest predicted loss.
        max_score: otherwise keep the records whose predicted log loss is at most this.

    Example::

        InstructMiningFilter(version="v1", keep_fraction=0.3, indicators={
            "reward": CallableIndicator("my_rm.score"), "knn6": KNNDistance("my_embedder.embed", k=6)})
        dm = SFTDataModule(train_file="train.jsonl", filters=[...])   # the filter above
    """

    def __init__(
        self,
        indicators: dict[str, Indicator] | None = None,
        version: Literal["v1", "v3", "custom"] = "v3",
        coefficients: dict[str, float] | None = None,
        intercept: float = 0.0,
        keep_fraction: float | None = None,
        max_score: float | None = None,
    ) -> None:
        _check_selection("InstructMiningFilter", keep_fraction, "max_score", max_score)
        if version not in ("v1", "v3", "custom"):
            raise ConfigError(f"InstructMiningFilter(version={version!r}): version must be 'v1', 'v3' or 'custom'.")
        if version == "custom" and not coefficients:
            raise ConfigError("InstructMiningFilter(version='custom') needs coefficients (indicator name -> coefficient).")
        if version != "custom" and coefficients:
            raise ConfigError(f"InstructMiningFilter(version={version!r}) has its published coefficients; use version='custom'.")
        merged: dict[str, Indicator] = {"length": Length(), **(indicators or {})}
        for key, value in merged.items():
            if not isinstance(value, Indicator):
                raise TypeError(f"InstructMiningFilter: indicator {key!r} must be an Indicator, got {type(value).__name__}.")
        needed = list(coefficients) if version == "custom" else list(INSTRUCT_MINING_RULES[version][1])
        missing = [name for name in needed if name not in merged]
        if missing:
            raise ConfigError(
                f"InstructMiningFilter(version={version!r}) needs the indicators {', '.join(missing)}: give each as "
                "an Indicator, e.g. reward: CallableIndicator('my_package.reward') or RecordField('reward'), "
                "knn6: KNNDistance('my_package.embed', k=6)."
            )
        self.indicators = {name: merged[name] for name in needed}
        self.version = version
        self.coefficients = dict(coefficients) if coefficients else None
        self.intercept = float(intercept)
        self.keep_fraction = keep_fraction
        self.max_score = max_score
        self.last_indicators: dict[str, np.ndarray] = {}

    def threshold(self) -> float | None:
        return self.max_score

    def scores(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        values = {name: np.asarray(ind(records, tokenizer), dtype=np.float64) for name, ind in self.indicators.items()}
        self.last_indicators = values
        if self.version == "custom":
            return np.asarray(instruct_mining_score(values, "custom", self.coefficients, self.intercept), dtype=np.float64)
        return np.asarray(instruct_mining_score(values, self.version), dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"InstructMiningFilter(version={self.version!r}, indicators={self.indicators!r}, coefficients={self.coefficients!r}, "
            f"intercept={self.intercept!r}, keep_fraction={self.keep_fraction!r}, max_score={self.max_score!r})"
        )
