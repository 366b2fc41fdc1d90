"""GVTBench scoring (`lightning_tokens.metrics.gvtbench`), checked against TencentARC/GVT @fead7e3.

Expected values are computed by hand from the reference's ``count.py``, ``multiclass.py`` and
``modeling_gvt.py::postprocess``.
"""

import math

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.metrics.gvtbench import (
    CountingAccuracy,
    CountingMAE,
    CountingRMSE,
    MCIAccuracy,
    counting_metric_collection,
    counting_scores,
    extract_digit,
    mci_correct,
    mci_scores,
    postprocess,
)


# --- the spec's checks (multimodal_methods.md §2, GVTBench) ----------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [("There are two dogs.", 2), ("nine.", 0), ("someone is there", 1)],
)
def test_spec_extract_digit(text, expected):
    assert extract_digit(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("There are 12 cats.", 12),
        ("007", 7),
        ("-2", 2),  # no sign: the first run of digits
        ("2.5", 2),
        ("3 or four", 3),
        ("four or 3", 4),  # words are replaced before the first number is taken
        ("one two", 1),
        ("onetwo", 12),  # adjacent words fuse into one number
        ("twone", 1),  # "one" is replaced before "two" can match
        ("none", 0),  # "none" before its "one"
        ("noone", 1),
        ("None.", 1),  # case-sensitive: "None" is not "none", but holds "one"
        ("Two dogs.", 0),  # case-sensitive: capitalised words are not read
        ("nine", 0),  # the table has the typo "nive"
        ("nive", 9),
        ("ten", 0),
        ("eighteen", 8),
        ("seventy", 7),
        ("fiftyfive", 5),
        ("nineteen", 0),
        ("weight", 8),
        ("alone", 1),
        ("\u0663 cats", 3),  # a Unicode digit matches r"\d"
    ],
)
def test_extract_digit_quirks(text, expected):
    assert extract_digit(text) == expected


# --- postprocess --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("   ", ""),
        ("\n", ""),
        (" \n ", ""),
        ("Yes", "Yes."),
        ("Yes.", "Yes."),
        ("Yes.\nNo.", "Yes."),
        ("There are two dogs. One is brown.", "There are two dogs."),
        (" . Yes. No", "Yes."),  # one leading "." dropped
        (". . Yes", "."),  # only one: the second "." ends the answer at once
        ("...", "."),
        (".", "."),
        ("two\ndogs", "twodogs."),  # newlines are deleted, not spaced
        ("one\ntwo", "onetwo."),
        ("a  b", "a b."),
        ("3.5", "3."),
        ("Mr. Smith", "Mr."),
        ("a\tb", "a\tb."),  # only single spaces split
        ("a \t b", "a \t b."),
        ("\tYes \t", "Yes."),  # but the ends are stripped of all whitespace
        ("Yes, it is!", "Yes, it is!."),
    ],
)
def test_postprocess(text, expected):
    assert postprocess(text) == expected


@pytest.mark.parametrize("text", ["", "Yes.", ". . Yes", "two\ndogs. 3", "a \t b", "3.5 cats", " x .y. z"])
def test_postprocess_idempotent(text):
    once = postprocess(text)
    assert postprocess(once) == once


def test_postprocess_changes_the_count():
    assert extract_digit("1\n2") == 1
    assert extract_digit(postprocess("1\n2")) == 12
    assert extract_digit("There are. 3 dogs") == 3
    assert extract_digit(postprocess("There are. 3 dogs")) == 0


# --- counting_scores ----------------------------------------------------------------------------------
def test_counting_scores_hand_computed():
    preds = ["two.", "1.", "5.", "There are 4.", "nine.", "12."]
    gts = ["2", 2, "4", 4, "10", "12"]
    # read counts 2, 1, 5, 4, 0, 12; errors 0, 1, 1, 0, 10, 0; squared 0, 1, 1, 0, 100, 0
    scores = counting_scores(preds, gts)
    expected = {
        "accuracy": 3 / 6,
        "mae": 12 / 6,
        "rmse": math.sqrt(102 / 6),
        "0~3/acc": 1 / 2,  # gt 2, 2
        "0~3/mae": 1 / 2,
        "0~3/rmse": math.sqrt(1 / 2),
        "3~6/acc": 1 / 2,  # gt 4, 4
        "3~6/mae": 1 / 2,
        "3~6/rmse": math.sqrt(1 / 2),
        "9~12/acc": 0.0,  # gt 10
        "9~12/mae": 10.0,
        "9~12/rmse": 10.0,
        "12~15/acc": 1.0,  # gt 12
        "12~15/mae": 0.0,
        "12~15/rmse": 0.0,
    }
    assert list(scores) == list(expected)  # overall first, then occurring bins in numeric order
    assert scores == pytest.approx(expected)


def test_counting_scores_target_parsing():
    assert counting_scores(["3."], [" 3\n"])["accuracy"] == 1.0
    with pytest.raises(ValueError):
        counting_scores(["3."], ["3."])


@pytest.mark.parametrize(
    ("preds", "gts", "error"),
    [
        (["1."], ["1", "2"], ConfigError),
        ([], [], ConfigError),
        ("1.", ["1"], TypeError),
    ],
)
def test_counting_scores_bad_inputs(preds, gts, error):
    with pytest.raises(error):
        counting_scores(preds, gts)


# --- MCI ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pred", "gt", "expected"),
    [
        ("Yes.", "Yes.", True),
        ("YES", "Yes.", True),
        ("No.", "No.", True),
        ("No.", "Yes.", False),
        ("yes.", "No.", False),
        ("I do not know.", "No.", True),  # substring rule
        ("I do not know.", "Yes.", False),
        ("Not sure.", "No.", True),
        ("None.", "No.", True),
        ("eyes.", "Yes.", True),
        ("Yes, or no.", "Yes.", True),
        ("Yes, or no.", "No.", True),
        ("Sure.", "Yes.", False),
        ("", "Yes.", False),
        ("", "No.", False),
        ("yes.", "yes.", False),  # the target is matched case-sensitively
        ("no.", "no.", False),
        ("no", "None", True),  # "None" holds "No"
    ],
)
def test_mci_correct(pred, gt, expected):
    assert mci_correct(pred, gt) is expected


def test_mci_scores_bins():
    preds = ["Yes.", "No.", "Yes.", "No.", "yes", "No."]
    gts = ["Yes.", "Yes.", "No.", "No.", "Yes.", "No."]
    n_obj = [0, 9, 10, 19, 20, 35]
    # hits 1, 0, 0, 1, 1, 1; bins {0, 9} {10, 19} {20, 35}
    scores = mci_scores(preds, gts, n_obj)
    assert scores == pytest.approx({"accuracy": 4 / 6, "1-9/acc": 0.5, "10-19/acc": 0.5, ">=20/acc": 1.0})
    assert mci_scores(preds, gts) == pytest.approx({"accuracy": 4 / 6})


def test_mci_scores_empty_bin_is_nan():
    scores = mci_scores(["No."], ["No."], [25])
    assert math.isnan(scores["1-9/acc"]) and math.isnan(scores["10-19/acc"])
    assert scores[">=20/acc"] == 1.0


def test_mci_scores_bad_inputs():
    with pytest.raises(ConfigError):
        mci_scores(["No."], ["No.", "Yes."])
    with pytest.raises(ConfigError):
        mci_scores(["No."], ["No."], [1, 2])
    with pytest.raises(ConfigError):
        mci_scores([], [])


# --- torchmetrics classes -----------------------------------------------------------------------------
_PREDS = [["two.", "1.", "5."], ["There are 4.", "nine.", "12."]]
_GTS = [["2", "2", "4"], ["4", "10", "12"]]


@pytest.mark.parametrize(
    ("metric_cls", "key"),
    [(CountingAccuracy, "accuracy"), (CountingMAE, "mae"), (CountingRMSE, "rmse")],
)
def test_counting_metrics_accumulate(metric_cls, key):
    metric = metric_cls()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()))
    for preds, gts in zip(_PREDS, _GTS):
        metric.update(preds, gts)
    value = metric.compute()
    assert value.ndim == 0 and value.dtype == torch.float32
    expected = counting_scores(_PREDS[0] + _PREDS[1], _GTS[0] + _GTS[1])[key]
    assert float(value) == pytest.approx(expected, rel=1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()))


@pytest.mark.parametrize("metric_cls", [CountingAccuracy, CountingMAE, CountingRMSE, MCIAccuracy])
def test_states_are_ddp_sums(metric_cls):
    for name, reduce_fx in metric_cls()._reductions.items():
        assert reduce_fx is not None and reduce_fx.__name__ == "dim_zero_sum", name


def test_merged_states_equal_functional():
    """Two ranks' states merged by sum (what DDP sync does) give the pooled figures."""
    rank0, rank1 = CountingRMSE(), CountingRMSE()
    rank0.update(_PREDS[0], _GTS[0])
    rank1.update(_PREDS[1], _GTS[1])
    rank0.merge_state(rank1)
    expected = counting_scores(_PREDS[0] + _PREDS[1], _GTS[0] + _GTS[1])["rmse"]
    assert float(rank0.compute()) == pytest.approx(expected, rel=1e-6)


def test_mci_accuracy_accumulates():
    preds = [["Yes.", "I do not know."], ["No.", "eyes."]]
    gts = [["Yes.", "Yes."], ["No.", "Yes."]]
    metric = MCIAccuracy()
    for p, g in zip(preds, gts):
        metric.update(p, g)
    assert float(metric.compute()) == pytest.approx(mci_scores(preds[0] + preds[1], gts[0] + gts[1])["accuracy"])
    assert float(metric.compute()) == pytest.approx(3 / 4)


def test_metric_update_rejects_bad_inputs():
    with pytest.raises(ConfigError):
        CountingAccuracy().update(["1."], ["1", "2"])
    with pytest.raises(TypeError):
        MCIAccuracy().update("Yes.", ["Yes."])


def test_huge_counts_do_not_overflow():
    metric = CountingMAE()
    metric.update(["99999999999999999999."], ["0"])
    assert float(metric.compute()) == pytest.approx(1e20)


def test_counting_collection_logs_scalars():
    metrics = counting_metric_collection("test/oc_")
    for preds, gts in zip(_PREDS, _GTS):
        metrics.update(preds, gts)
    values = metrics.compute()
    expected = counting_scores(_PREDS[0] + _PREDS[1], _GTS[0] + _GTS[1])
    assert sorted(values) == ["test/oc_accuracy", "test/oc_mae", "test/oc_rmse"]
    for key in ("accuracy", "mae", "rmse"):
        assert values[f"test/oc_{key}"].ndim == 0
        assert float(values[f"test/oc_{key}"]) == pytest.approx(expected[key], rel=1e-6)
