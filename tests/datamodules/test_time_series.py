"""TimeSeriesDataModule: shipped sets, user files (CSV / NPZ / NPY / .ts), bad input, prompts, batches."""

import numpy as np
import pytest
import torch

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.datamodules.time_series import SHIPPED_TASKS, TimeSeriesDataModule, load_shipped, read_series_file
from lightning_tokens.datamodules.time_series.archive import apply_nan_policy
from lightning_tokens.rewards import TimeMasterReward

# (train size, test size, channels, length or None when unequal), from environment.md's list of aeon's sets
SIZES = {
    "GunPoint": (50, 150, 1, 150), "ItalyPowerDemand": (67, 1029, 1, 24), "ArrowHead": (36, 175, 1, 251),
    "BasicMotions": (40, 40, 6, 100), "OSULeaf": (200, 242, 1, 427), "JapaneseVowels": (270, 370, 12, None),
    "ACSF1": (100, 100, 1, 1460),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_TASKS))
def test_every_shipped_set_loads_with_the_archive_splits_and_all_labels_mapped(name):
    n_train, n_test, channels, length = SIZES[name]
    for split, n in (("train", n_train), ("test", n_test)):
        series, labels = load_shipped(name, split)
        assert len(series) == len(labels) == n
        assert all(s.shape[0] == channels and s.dtype == np.float64 for s in series)
        if length is not None:
            assert {s.shape[1] for s in series} == {length}
        assert set(labels) <= set(SHIPPED_TASKS[name].classes), (name, set(labels))
    if name == "JapaneseVowels":
        assert {s.shape[1] for s in series} <= set(range(7, 30)) and len({s.shape[1] for s in series}) > 1


def test_computers_is_not_shipped_and_says_how_to_load_it():
    with pytest.raises(ConfigError, match="Computers"):
        TimeSeriesDataModule(dataset="Computers")


def write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_univariate_and_multivariate(tmp_path):
    uni = write(tmp_path / "u.csv", "label,t0,t1,t2\nup,1,2,3\ndown,3,2,1\n")
    series, labels = read_series_file(uni)
    assert labels == ["up", "down"] and series[1].tolist() == [[3.0, 2.0, 1.0]]
    multi = write(tmp_path / "m.csv", "id,label,a,b\ns1,up,1,2\ns1,up,3,4\ns2,down,5,6\ns2,down,7,8\n")
    series, labels = read_series_file(multi, id_column="id")
    assert labels == ["up", "down"] and series[0].tolist() == [[1, 2], [3, 4]] and series[1].shape == (2, 2)


def test_csv_bad_input_names_line_and_field(tmp_path):
    with pytest.raises(DataError, match=r"line 3: column 't2' is empty \(a ragged row\)"):
        read_series_file(write(tmp_path / "r.csv", "label,t0,t1,t2\nup,1,2,3\ndown,3,2\n"))
    with pytest.raises(DataError, match="line 2: column 't1' holds 'x'"):
        read_series_file(write(tmp_path / "x.csv", "label,t0,t1\nup,1,x\n"))
    with pytest.raises(DataError, match="no column 'class'"):
        read_series_file(write(tmp_path / "c.csv", "label,t0\nup,1\n"), label_column="class")
    with pytest.raises(DataError, match="label 'down' here but 'up' on line 2"):
        read_series_file(write(tmp_path / "g.csv", "id,label,a\ns,up,1\ns,down,2\n"), id_column="id")
    with pytest.raises(MissingFileError):
        read_series_file(str(tmp_path / "none.csv"))


def test_numpy_and_ts_files(tmp_path):
    X = np.arange(12.0).reshape(3, 2, 2)
    np.savez(tmp_path / "d.npz", X=X, y=np.array(["a", "b", "a"]))
    series, labels = read_series_file(str(tmp_path / "d.npz"))
    assert labels == ["a", "b", "a"] and series[2].tolist() == X[2].tolist()
    np.save(tmp_path / "e.npy", X[:, 0])
    with pytest.raises(MissingFileError, match="e.labels.txt"):
        read_series_file(str(tmp_path / "e.npy"))
    (tmp_path / "e.labels.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="3 series but 2 labels"):
        read_series_file(str(tmp_path / "e.npy"))
    ts = write(tmp_path / "f.ts", "@problemName f\n@timeStamps false\n@univariate true\n@equalLength true\n"
               "@seriesLength 3\n@classLabel true up down\n@data\n1,2,3:up\n3,2,1:down\n")
    series, labels = read_series_file(ts)
    assert labels == ["up", "down"] and series[0].tolist() == [[1.0, 2.0, 3.0]]


def test_nan_policy():
    bad = [np.array([[1.0, 2.0]]), np.array([[1.0, np.nan, 5.0]])]
    with pytest.raises(DataError, match="series 1: nan at channel 0, position 1.*nan_policy: interpolate"):
        apply_nan_policy(bad, "error", "f.csv")
    assert apply_nan_policy(bad, "interpolate", "f.csv")[1].tolist() == [[1.0, 3.0, 5.0]]
    with pytest.raises(DataError, match="inf"):
        apply_nan_policy([np.array([[1.0, np.inf, np.nan]])], "interpolate", "f")
    with pytest.raises(DataError, match="all NaN"):
        apply_nan_policy([np.array([[np.nan, np.nan]])], "interpolate", "f")


def stub_processor(images, questions, answers=None, chat=False):
    n = len(questions)
    out = {"prompt_input_ids": torch.ones(n, 2, dtype=torch.long), "prompt_attention_mask": torch.ones(n, 2, dtype=torch.long),
           "pixel_values": torch.tensor([np.asarray(im).shape for im in images]) if images[0] is not None else torch.zeros(n)}
    if answers is not None:
        out |= {"input_ids": torch.ones(n, 3, dtype=torch.long), "attention_mask": torch.ones(n, 3, dtype=torch.long),
                "labels": torch.full((n, 3), -100)}
    return out


def user_files(tmp_path, train_rows="label,a,b,c\n1,0,1,0\n2,1,0,1\n1,0,2,0\n", test_rows="label,a,b,c\n2,1,0,2\n1,0,3,0\n"):
    return write(tmp_path / "train.csv", train_rows), write(tmp_path / "test.csv", test_rows)


def test_labels_missing_from_the_allowed_set_are_named(tmp_path):
    train, test = user_files(tmp_path, test_rows="label,a,b,c\n3,1,0,2\n")
    dm = TimeSeriesDataModule(train_file=train, test_file=test, class_names={"1": "Low", "2": "High"}, processor=stub_processor,
                              cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="label '3' is not in class_names"):
        dm.setup("fit")


def test_plot_batches_carry_labels_for_rewards_and_metrics(tmp_path):
    train, test = user_files(tmp_path)
    dm = TimeSeriesDataModule(train_file=train, test_file=test, class_names={"1": "Low", "2": "High"},
                              description="You are analyzing a sensor.", processor=stub_processor, batch_size=3,
                              cache_dir=str(tmp_path / "plots"), seed=0)
    dm.setup("fit")
    assert dm.labels == ["Low", "High"]
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["answers"]) == ["Low", "Low", "High"][::-1] or sorted(batch["answers"]) == ["High", "Low", "Low"]
    assert batch["allowed_labels"] == [["Low", "High"]] * 3
    # the reference's plot: 6 x 2.5 in at 100 dpi, cropped to its tight bounding box (width varies with the ticks)
    sizes = batch["pixel_values"]
    assert (sizes[:, 0] == 230).all() and ((sizes[:, 1] > 560) & (sizes[:, 1] <= 600)).all() and (sizes[:, 2] == 3).all()
    prompt = batch["prompts"][0]
    assert prompt.startswith("You are analyzing a sensor.") and '"Low" or "High".' in prompt and "<think> </think>" in prompt
    for target, label in zip(batch["targets"], batch["answers"]):
        assert target.startswith("<think>The signal spans ") and target.endswith(f"<class>{label}</class>")
    # the batch's columns are what TimeMasterReward reads: the SFT targets themselves score 1.0
    rewards = TimeMasterReward()(completions=batch["targets"], prompts=batch["prompts"], answers=batch["answers"],
                                 allowed_labels=batch["allowed_labels"])
    assert rewards == [1.0, 1.0, 1.0]
    assert len(list((tmp_path / "plots").rglob("*.png"))) == 3
    val = next(iter(dm.val_dataloader()))
    assert val["answers"] == ["High", "Low"]  # the whole test split, in file order


def test_numbers_input_writes_the_values_and_validation_can_come_from_train(tmp_path):
    train, test = user_files(tmp_path)
    dm = TimeSeriesDataModule(train_file=train, test_file=test, input="numbers", processor=stub_processor,
                              val_source="train", num_val=1, seed=0, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    train_ids = {e.index for e in dm.split_examples("train")}
    val_ids = {e.index for e in dm.split_examples("val")}
    assert len(train_ids) == 2 and len(val_ids) == 1 and not train_ids & val_ids
    example = dm.split_examples("train")[0]
    prompt = dm.prompt(example)
    assert "The time series:\n" + ", ".join(f"{v:.3g}" for v in example.values[0]) in prompt
    assert not (tmp_path / "c").exists()  # nothing rendered for numeric input


def test_extract_answer_and_metrics_follow_the_reward_parser():
    dm = TimeSeriesDataModule(dataset="GunPoint", num_val=2)
    assert dm.extract_answer("<think>x</think><class> point </class>") == "Point"
    assert dm.extract_answer("<class>Rifle</class>") == ""
    metrics = dm.build_metrics("val/")
    metrics.update([dm.extract_answer(t) for t in ["<class>Gun</class>", "Gun", "<class>Point</class>"]], ["Gun", "Gun", "Gun"], ["g"] * 3)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values == pytest.approx({"val/accuracy": 1 / 3, "val/format": 2 / 3})


def test_bad_options_fail_early():
    with pytest.raises(ConfigError, match="reasoning_template"):
        TimeSeriesDataModule(reasoning_template="{colour}")
    with pytest.raises(ConfigError, match="both train_file and test_file"):
        TimeSeriesDataModule(train_file="a.csv")
    with pytest.raises(ConfigError, match="needs num_val"):
        TimeSeriesDataModule(val_source="train")
    with pytest.raises(ConfigError, match="input"):
        TimeSeriesDataModule(input="audio")


def test_the_hugging_face_path_runs_grpo_on_plots(tmp_path):
    """A Qwen2-VL-family model (tiny config) samples answers to rendered plots and trains on TimeMasterReward."""
    import lightning as L

    from lightning_tokens.modules.vision_language_grpo import VisionLanguageGRPO
    from lightning_tokens.rewards import RewardSpec

    train, test = user_files(tmp_path)
    dm = TimeSeriesDataModule(train_file=train, test_file=test, class_names={"1": "Low", "2": "High"}, batch_size=2,
                              eval_batch_size=2, cache_dir=str(tmp_path / "plots"), seed=0, max_new_tokens=4)
    model = VisionLanguageGRPO(model="tiny-qwen2-vl", rewards=[RewardSpec("lightning_tokens.rewards.TimeMasterReward", name="timemaster")],
                               num_generations=2, max_completion_length=6, rollout_seed=0)
    trainer = L.Trainer(max_steps=1, val_check_interval=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/reward", "train/rewards/timemaster/mean", "val/accuracy", "val/format"} <= set(metrics)
    assert 0.0 <= float(metrics["train/reward"]) <= 1.0
