"""Classical time series classifiers from aeon on a :class:`~lightning_tokens.TimeSeriesDataModule`'s own splits,
so their accuracy sits beside the language models' in one table (TimeMaster compares with such models).

- ``1nn_dtw``: 1-nearest neighbour under dynamic time warping (``KNeighborsTimeSeriesClassifier``), the
  archive's classic benchmark.
- ``rocket``: ROCKET random convolution kernels + a ridge classifier (``RocketClassifier``).
- ``minirocket``: MiniRocket, its faster, mostly deterministic successor (``MiniRocketClassifier``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_tokens.core.errors import ConfigError

__all__ = ["CLASSICAL_BASELINES", "classical_baselines"]


def _knn_dtw(seed: int) -> Any:
    from aeon.classification.distance_based import KNeighborsTimeSeriesClassifier

    return KNeighborsTimeSeriesClassifier(n_neighbors=1, distance="dtw")


def _rocket(seed: int) -> Any:
    from aeon.classification.convolution_based import RocketClassifier

    return RocketClassifier(n_kernels=2000, random_state=seed)


def _minirocket(seed: int) -> Any:
    from aeon.classification.convolution_based import MiniRocketClassifier

    return MiniRocketClassifier(random_state=seed)


#: Baseline name → a function of the seed that builds the (unfitted) aeon classifier.
CLASSICAL_BASELINES: dict[str, Callable[[int], Any]] = {"1nn_dtw": _knn_dtw, "rocket": _rocket, "minirocket": _minirocket}


def _stack(series: Sequence[np.ndarray], name: str) -> np.ndarray:
    lengths = {s.shape for s in series}
    if len(lengths) != 1:
        raise ConfigError(
            f"{name}: the classical baselines here need equal-length series, got shapes {sorted(lengths)[:3]}...; "
            "resample the series first (aeon's unequal-length tools) or compare on an equal-length set."
        )
    return np.stack(series)


def classical_baselines(datamodule: Any, names: Sequence[str] = ("1nn_dtw", "rocket"), seed: int = 0) -> dict[str, float]:
    """Test accuracy of each baseline, trained on the datamodule's training split and scored on its test split
    (the same series the language models see: ``num_train`` / ``num_test`` subsets included).

    Args:
        datamodule: a :class:`~lightning_tokens.TimeSeriesDataModule`.
        names: baselines of :data:`CLASSICAL_BASELINES`.
        seed: the random state of the randomised ones (ROCKET).

    Example:
        >>> from lightning_tokens import TimeSeriesDataModule
        >>> classical_baselines(TimeSeriesDataModule(dataset="GunPoint"), ["1nn_dtw"])  # doctest: +SKIP
        {'1nn_dtw': 0.9066666666666666}
    """
    unknown = [n for n in names if n not in CLASSICAL_BASELINES]
    if unknown:
        raise ConfigError(f"unknown baselines {unknown}; choose from {', '.join(CLASSICAL_BASELINES)}.")
    train, test = datamodule.split_examples("train"), datamodule.split_examples("test")
    X_train = _stack([e.values for e in train], "train split")
    X_test = _stack([e.values for e in test], "test split")
    y_train = np.array([e.label for e in train])
    y_test = np.array([e.label for e in test])
    results = {}
    for name in names:
        model = CLASSICAL_BASELINES[name](seed)
        model.fit(X_train, y_train)
        results[name] = float((model.predict(X_test) == y_test).mean())
    return results
