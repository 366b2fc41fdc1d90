"""Speech metrics (`lightning_tokens.metrics.speech`): hand-computed error rates, codebook usage and
perplexity, token rates, and DDP-mergeable states."""

import math

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.metrics.speech import (
    CodebookUsage,
    NormalizedCharErrorRate,
    NormalizedWordErrorRate,
    char_error_rate,
    normalize_transcript,
    tokens_per_second,
    word_error_rate,
)


def test_normalizer():
    assert normalize_transcript("  Forty-two,  DON'T stop!\n") == "forty two dont stop"
    assert normalize_transcript("a_b...c") == "a b c"
    assert normalize_transcript("") == ""


def test_word_error_rate_hand_computed():
    assert float(word_error_rate(["a b c"], ["a x c"])) == pytest.approx(1 / 3)
    # one deletion + one insertion over 4+2 reference words, pooled over the corpus
    assert float(word_error_rate(["one two three", "five six seven"], ["one two three four", "five six"])) == pytest.approx(2 / 6)
    # the normaliser makes case and punctuation free; without it they are errors
    assert float(word_error_rate(["The cat, sat."], ["the cat sat"])) == 0.0
    assert float(word_error_rate(["The cat, sat."], ["the cat sat"], normalize=False)) == pytest.approx(3 / 3)


def test_char_error_rate_hand_computed():
    # "forty two" (9 chars) vs "forty too": one substitution
    assert float(char_error_rate(["forty too"], ["forty two"])) == pytest.approx(1 / 9)
    assert float(char_error_rate(["FORTY-TWO"], ["forty two"])) == 0.0


def test_metric_classes_accumulate_and_normalise():
    wer = NormalizedWordErrorRate()
    wer.update(["A x c!"], ["a b c"])
    wer.update(["d e"], ["d e f"])
    assert float(wer.compute()) == pytest.approx(2 / 6)
    cer = NormalizedCharErrorRate()
    cer.update(["AB"], ["ab"])
    cer.update(["ac"], ["ab"])
    assert float(cer.compute()) == pytest.approx(1 / 4)


def test_error_rate_states_merge_like_ddp():
    rank0, rank1 = NormalizedWordErrorRate(), NormalizedWordErrorRate()
    rank0.update(["a x c"], ["a b c"])
    rank1.update(["d e f g"], ["d e f"])
    rank0.merge_state(rank1)
    assert float(rank0.compute()) == pytest.approx(2 / 6)


def test_codebook_usage_hand_computed():
    metric = CodebookUsage(4)
    metric.update(torch.tensor([0, 0, 1, 1]))
    result = metric.compute()
    assert float(result["usage"]) == pytest.approx(0.5)
    assert float(result["perplexity"]) == pytest.approx(2.0)


def test_codebook_usage_skewed_histogram_and_padding():
    metric = CodebookUsage(10)
    metric.update(torch.tensor([[3, 3, 3, -1], [5, -100, -1, -1]]))  # counts {3: 3, 5: 1}
    p = torch.tensor([0.75, 0.25])
    expected = math.exp(float(-(p * p.log()).sum()))
    result = metric.compute()
    assert float(result["usage"]) == pytest.approx(0.2)
    assert float(result["perplexity"]) == pytest.approx(expected, rel=1e-5)


def test_codebook_usage_uniform_full_and_single_code():
    metric = CodebookUsage(8)
    metric.update(torch.arange(8).repeat(3))
    assert float(metric.compute()["perplexity"]) == pytest.approx(8.0)
    assert float(metric.compute()["usage"]) == 1.0
    single = CodebookUsage(8)
    single.update(torch.full((5,), 7))
    assert float(single.compute()["perplexity"]) == pytest.approx(1.0)


def test_codebook_usage_states_are_ddp_sums_and_merge():
    assert {name: fx.__name__ for name, fx in CodebookUsage(4)._reductions.items()} == {"counts": "dim_zero_sum"}
    rank0, rank1, pooled = CodebookUsage(4), CodebookUsage(4), CodebookUsage(4)
    rank0.update(torch.tensor([0, 0]))
    rank1.update(torch.tensor([1, 1]))
    pooled.update(torch.tensor([0, 0, 1, 1]))
    rank0.merge_state(rank1)
    assert torch.equal(rank0.counts, pooled.counts)
    assert float(rank0.compute()["perplexity"]) == pytest.approx(2.0)


def test_codebook_usage_rejects_bad_codes():
    metric = CodebookUsage(4)
    with pytest.raises(ConfigError, match="code 4 is outside a codebook of 4"):
        metric.update(torch.tensor([1, 4]))
    with pytest.raises(ConfigError, match="integer ids"):
        metric.update(torch.tensor([0.5]))
    with pytest.raises(ConfigError):
        CodebookUsage(0)
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = CodebookUsage(3).compute()
    assert float(empty["usage"]) == 0.0 and math.isnan(float(empty["perplexity"]))


def test_tokens_per_second():
    assert tokens_per_second(50, 32000, 16000) == 25.0
    assert tokens_per_second(40, 24000, 24000) == 40.0
    with pytest.raises(ConfigError):
        tokens_per_second(3, 0, 16000)
