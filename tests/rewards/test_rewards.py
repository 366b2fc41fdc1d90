"""Reward specs, their checks, and the built-in rewards."""

import math

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rewards import FormatReward, Rewards, RewardSpec, nupa_digit_match, nupa_exact_match, resolve_reward


def count_digits(completions, **_):
    return [float(sum(c.isdigit() for c in text)) for text in completions]


def needs_answers(completions, answers, **_):
    return [float(text.strip() == answer) for text, answer in zip(completions, answers)]


def test_weighted_sum_of_functions_with_columns():
    rewards = Rewards([
        RewardSpec("tests.rewards.test_rewards.count_digits", weight=0.5),
        RewardSpec("tests.rewards.test_rewards:needs_answers", weight=2.0, name="exact"),
    ])
    result = rewards(["12", " 7", "ab"], ["p0", "p1", "p2"], {"answers": ["12", "8", "ab"]})
    assert rewards.names == ["count_digits", "exact"]
    torch.testing.assert_close(result.per_function["count_digits"], torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(result.per_function["exact"], torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(result.total, torch.tensor([0.5 * 2 + 2.0, 0.5, 2.0]))


def test_class_spec_is_built_with_kwargs_and_callables_are_accepted():
    name, fn, weight = resolve_reward(RewardSpec("lightning_tokens.rewards.FormatReward", 0.3, {"pattern": "^a"}))
    assert (name, weight) == ("FormatReward", 0.3) and fn(completions=["ab", "ba"]) == [1.0, 0.0]
    assert resolve_reward(count_digits)[0] == "count_digits"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (RewardSpec("no_such_module.fn"), "cannot import module 'no_such_module'"),
        (RewardSpec("lightning_tokens.rewards.no_such_fn"), "has no attribute 'no_such_fn'"),
        (RewardSpec("count_digits"), "is not an import path"),
        (RewardSpec("tests.rewards.test_rewards.count_digits", kwargs={"x": 1}), "takes no kwargs"),
        (RewardSpec("lightning_tokens.rewards.FormatReward", kwargs={"bogus": 1}), "kwargs"),
        (RewardSpec("lightning_tokens.rewards.FormatReward", kwargs={"pattern": "("}), "not a valid regular expression"),
        (RewardSpec("tests.rewards.test_rewards.count_digits", weight=math.nan), "weight=nan"),
    ],
)
def test_bad_specs_fail_when_built(spec, message):
    with pytest.raises(ConfigError, match=message):
        Rewards([spec])


def test_empty_and_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="rewards is empty"):
        Rewards([])
    with pytest.raises(ConfigError, match="distinct `name`"):
        Rewards([count_digits, count_digits])


def _raises(completions, **_):
    raise KeyError("answers")


@pytest.mark.parametrize(
    ("function", "message"),
    [
        (_raises, r"reward function '_raises' raised KeyError: 'answers' \(first prompt of the batch: 'What is 2\+2\?'\)"),
        (lambda completions, **_: [1.0], r"returned 1 rewards for 2 completions"),
        (lambda completions, **_: [1.0, math.nan], r"returned nan for completion 1 of prompt 'second prompt'"),
        (lambda completions, **_: [1.0, None], r"returned None for completion 1"),
        (lambda completions, **_: 3.0, r"returned float; it must return a list"),
    ],
)
def test_bad_rewards_stop_with_the_function_and_the_prompt(function, message):
    rewards = Rewards([function])
    with pytest.raises(RuntimeError, match=message):
        rewards(["4", "5"], ["What is 2+2?", "second prompt"], {})


def test_nupa_rewards_score_the_continuation():
    completions = ["1287", " 1287 and more", "1288", "", "12.5"]
    answers = ["1287"] * 4 + ["12.5"]
    domains = ["Integer"] * 4 + ["Float"]
    assert nupa_exact_match(completions, answers=answers, domains=domains) == [1.0, 1.0, 0.0, 0.0, 1.0]
    # digit match: 1288 vs 1287 -> 3 of 4 digits, read right to left
    assert nupa_digit_match(["1288"], answers=["1287"], domains=["Integer"]) == [0.75]
    with pytest.raises(ConfigError, match="answers` and `domains`"):
        nupa_exact_match(["1"])


def test_format_reward_full_match_and_search():
    assert FormatReward(r"\d+", full_match=True)([" 12 ", "12a"]) == [1.0, 0.0]
    assert FormatReward(r"<think>.*?</think>\s*<answer>.*?</answer>")(["<think>a\nb</think> <answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]
