"""Number Cookbook scoring (`lightning_tokens.metrics.nupa`), checked against the reference's StringMetrics."""

import math

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from lightning_tokens.metrics import (
    NUPADigitLengthError,
    NUPADigitMatch,
    NUPAExactMatch,
    extract_answer,
    nupa_digit_parts,
    nupa_metric_collection,
    nupa_scores,
)


# --- the spec's numeric checks (text_methods.md §15 (f)) -------------------------------------------
@pytest.mark.parametrize(
    ("pred", "target", "domain", "expected"),
    [
        ("1244", "1234", "Integer", (0, 0.75, 0)),
        ("234", "1234", "Integer", (0, 0.75, 1)),
        ("12.35", "2.345", "Float", (0, 0.5, 0)),
    ],
)
def test_spec_numeric_checks(pred, target, domain, expected):
    em, dm, dlen = nupa_scores(pred, target, domain)
    assert (em, dlen) == (expected[0], expected[2])
    assert dm == pytest.approx(expected[1])


@pytest.mark.parametrize(
    ("pred", "target", "domain", "expected"),
    [
        ("1234", "1234", "Integer", (1.0, 1.0, 0)),
        ("", "123", "Integer", (0.0, 0.0, 3)),  # empty prediction
        ("12345", "345", "Integer", (0.0, 1.0, 2)),  # extra leading digits: aligned from the right
        ("-123", "123", "Integer", (1.0, 1.0, 0)),  # signs are not digits: dropped as in the reference
        ("1,234", "1234", "Integer", (1.0, 1.0, 0)),
        ("12.50", "12.5", "Float", (0.0, 1.0, 1)),  # fractional part aligned from the left
        ("12", "12.0", "Float", (0.0, 0.0, 3)),  # missing '.' -> empty parts
        ("", "2.5", "Float", (0.0, 0.0, 2)),
        ("3/4", "3/4", "Fraction", (1.0, 1.0, 0)),
        ("13/4", "3/4", "Fraction", (0.0, 1.0, 1)),  # numerator aligned from the right
        ("3/14", "3/4", "Fraction", (0.0, 1.0, 1)),  # denominator aligned from the right
        ("34", "3/4", "Fraction", (0.0, 0.0, 2)),  # missing '/'
        ("1.23e4", "1.23e4", "ScientificNotation", (1.0, 1.0, 0)),
        ("1.24e5", "1.23e4", "ScientificNotation", (0.0, 0.5, 0)),
        ("1.23", "1.23e4", "ScientificNotation", (0.0, 0.0, 4)),  # no exponent
        ("12e4", "1.2e4", "ScientificNotation", (0.0, 0.0, 3)),  # no '.' in the mantissa
        ("1.2E4", "1.2e4", "ScientificNotation", (0.0, 0.0, 3)),  # only a lowercase 'e' splits (reference)
        ("1.2e10", "1.2e1", "ScientificNotation", (0.0, 2 / 3, 1)),  # exponent aligned from the right
        ("7", "7", "int", (1.0, 1.0, 0)),  # the reference's output type 'int' = Integer
    ],
)
def test_scores_edge_cases(pred, target, domain, expected):
    em, dm, dlen = nupa_scores(pred, target, domain)
    assert em == expected[0]
    assert dm == pytest.approx(expected[1])
    assert dlen == expected[2]
    assert isinstance(em, float) and isinstance(dm, float) and isinstance(dlen, int)


def test_empty_target_does_not_divide_by_zero():
    assert nupa_scores("", "", "Integer") == (1.0, 1.0, 0)
    assert nupa_scores("1", "", "Integer") == (0.0, 0.0, 1)


def test_digit_parts():
    assert nupa_digit_parts("-12.50", "Float") == ["12", "50"]
    assert nupa_digit_parts("1.2e3", "ScientificNotation") == ["1", "2", "3"]
    assert nupa_digit_parts("7/13", "Fraction") == ["7", "13"]
    assert nupa_digit_parts("x", "Fraction") == ["", ""]


def test_unknown_domain():
    with pytest.raises(ValueError, match="Integer, Float, Fraction, ScientificNotation"):
        nupa_scores("1", "1", "Complex")
    with pytest.raises(ValueError, match="valid domains"):
        extract_answer("1", domain="integer")


# --- answer extraction (MetricsRecorder.retrieve_answer) ---------------------------------------------
@pytest.mark.parametrize(
    ("text", "domain", "expected"),
    [
        ("Add two numbers: 744 + 543 = 1287", None, "1287"),
        ("Add two numbers: 744 + 543 = 1287", "Integer", "1287"),
        ("Add two numbers: 744 + 543 = 1287 = 12", None, "1287"),  # the first ' = '
        ("1287 = 12", None, "1287"),  # a continuation that goes on
        ("1287", None, "1287"),  # a bare continuation
        ("  42 \nAdd two numbers", None, "42"),
        ("1287</s>", None, "1287"),
        ("abc", None, ""),
        ("", None, ""),
        ("-5", None, ""),  # no leading sign, as in the reference's patterns
        (" = 12.5", "Integer", "12"),
        (" = 12", "Float", ""),
        (" = 12.5x", "Float", "12.5"),
        ("3/4 ok", "Fraction", "3/4"),
        ("3/4 ok", None, "3/4"),
        ("1.5e3", None, "1.5e3"),
        ("12.5", None, "12.5"),
        ("1.2E+3", "ScientificNotation", "1.2e3"),  # signs removed, E -> e
        ("1.2e-3", None, "1.2e3"),
        ("1.2", "ScientificNotation", ""),
        ("7", "int", "7"),
    ],
)
def test_extract_answer(text, domain, expected):
    assert extract_answer(text, domain) == expected


def test_extract_answer_continuation_modes():
    rambling = "1287 Add two numbers: 1 + 2 = 3"
    assert extract_answer(rambling) == "1287"  # starts with a digit: a bare continuation
    assert extract_answer(rambling, continuation=False) == "3"  # the reference's first ' = '
    assert extract_answer(" x = 5") == "5"
    assert extract_answer(" x = 5", continuation=True) == ""
    assert extract_answer("Q: 1 + 2 => 3", start_answer=" => ") == "3"


# --- Metric classes ---------------------------------------------------------------------------------
def test_metric_classes_mean_over_examples():
    preds = ["1244", "234", "12.35", "3/4"]
    targets = ["1234", "1234", "2.345", "3/4"]
    domains = ["Integer", "Integer", "Float", "Fraction"]
    scores = [nupa_scores(p, t, d) for p, t, d in zip(preds, targets, domains)]
    em, dm, dl = NUPAExactMatch(), NUPADigitMatch(), NUPADigitLengthError()
    for metric in (em, dm, dl):
        metric.update(preds[:2], targets[:2], domains[:2])
        metric.update(preds[2:], targets[2:], domains[2:])
    assert float(em.compute()) == pytest.approx(sum(s[0] for s in scores) / 4)
    assert float(dm.compute()) == pytest.approx(sum(s[1] for s in scores) / 4)
    assert float(dl.compute()) == pytest.approx(sum(s[2] for s in scores) / 4)


def test_metric_single_domain_string_and_errors():
    m = NUPAExactMatch()
    m.update(["1", "2"], ["1", "3"], "Integer")
    assert float(m.compute()) == 0.5
    with pytest.raises(ValueError):
        m.update(["1"], ["1", "2"], "Integer")
    with pytest.raises(ValueError):
        m.update(["1"], ["1"], ["Integer", "Integer"])
    with pytest.raises(TypeError):
        m.update("1", "1", "Integer")


def test_metric_properties_and_states():
    for cls, better in ((NUPAExactMatch, True), (NUPADigitMatch, True), (NUPADigitLengthError, False)):
        m = cls()
        assert cls.higher_is_better is better
        assert cls.is_differentiable is False
        assert cls.full_state_update is False
        assert len(m._reductions) == 2
        assert all(fx is dim_zero_sum for fx in m._reductions.values())
        with pytest.warns(UserWarning):
            assert math.isnan(float(m.compute()))  # nothing seen yet
        m.update(["1"], ["1"], "Integer")
        m.reset()
        m.update(["12"], ["13"], "Integer")
        assert float(m.compute()) == pytest.approx([0.0, 0.5, 0.0][[NUPAExactMatch, NUPADigitMatch, NUPADigitLengthError].index(cls)])


def test_metric_collection_keys_and_no_state_sharing():
    metrics = nupa_metric_collection("val/")
    assert sorted(metrics.keys()) == ["val/digit_match", "val/dlength", "val/exact_match"]
    # First batch all right (exact == digit match == 1): the metrics must not be merged into one group.
    metrics.update(["12", "34"], ["12", "34"], ["Integer", "Integer"])
    metrics.update(["1244", "1234"], ["1234", "123"], ["Integer", "Integer"])
    out = metrics.compute()
    assert float(out["val/exact_match"]) == pytest.approx(2 / 4)
    assert float(out["val/digit_match"]) == pytest.approx((1 + 1 + 0.75 + 0) / 4)
    assert float(out["val/dlength"]) == pytest.approx(1 / 4)
    assert isinstance(out["val/exact_match"], torch.Tensor)
    assert list(nupa_metric_collection(prefix="test/").keys())[0].startswith("test/")
