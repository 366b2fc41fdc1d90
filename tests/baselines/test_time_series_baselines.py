"""Classical baselines on the datamodule's splits: 1-NN DTW on GunPoint reproduces the UCR archive's figure."""

import numpy as np
import pytest

from lightning_tokens.baselines import classical_baselines
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.time_series import TimeSeriesDataModule


def test_1nn_dtw_on_gunpoint_matches_the_archive():
    # the UCR archive lists 1-NN DTW (full window) at 0.907 test accuracy on GunPoint: 136 of 150
    accuracy = classical_baselines(TimeSeriesDataModule(dataset="GunPoint"), ["1nn_dtw"])["1nn_dtw"]
    assert accuracy == pytest.approx(136 / 150)


def test_baselines_use_the_datamodule_subsets_and_refuse_unequal_lengths(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["label," + ",".join(f"t{i}" for i in range(8))]
    for k in range(12):  # two well-separated classes: any baseline gets them all
        label = k % 2
        rows.append(f"{label}," + ",".join(f"{v:.3f}" for v in rng.normal(3 * label, 0.1, 8)))
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    dm = TimeSeriesDataModule(train_file=str(tmp_path / "a.csv"), test_file=str(tmp_path / "a.csv"), num_test=5, seed=0)
    assert classical_baselines(dm, ["1nn_dtw"]) == {"1nn_dtw": 1.0}
    with pytest.raises(ConfigError, match="unknown baselines"):
        classical_baselines(dm, ["svm"])
    vowels = TimeSeriesDataModule(dataset="JapaneseVowels")
    with pytest.raises(ConfigError, match="equal-length"):
        classical_baselines(vowels, ["1nn_dtw"])
