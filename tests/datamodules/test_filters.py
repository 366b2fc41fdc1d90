"""Data-level filters (`lightning_tokens.datamodules.filters`): InstructMining's linear rules and
indicators, the long-CoT branching density, and SFTDataModule keeping exactly the expected records."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import SFTDataModule
from lightning_tokens.datamodules.filters import (
    BRANCHING_KEYWORDS,
    INSTRUCT_MINING_RULES,
    BranchingDensityFilter,
    CallableIndicator,
    InstructMiningFilter,
    KNNDistance,
    Length,
    Perplexity,
    RecordField,
    RecordFilter,
    branching_density,
    hashed_ngram_embedder,
    instruct_mining_score,
    knn_distances,
    record_texts,
    select_lowest,
    split_steps,
)
from lightning_tokens.models.tokenizers import resolve_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "data" / "examples"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
SPEC_TRACE = "Let x=2. Wait, maybe we should use y. Alternatively set z. So answer 4."


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# functions for CallableIndicator, by import path
def reward_by_length(instructions, responses):
    return [len(r) - 0.5 * len(i) for i, r in zip(instructions, responses)]


def one_reward(instruction, response, bonus=0.0):
    return float(response.count("a")) + bonus


# ----------------------------------------------------------------------------------------------------
# InstructMining: the rules (spec §13 f)
# ----------------------------------------------------------------------------------------------------
def test_spec_check_both_published_rules():
    v1 = instruct_mining_score({"reward": 2, "length": 300, "knn6": 0.9}, "v1")
    assert v1 == pytest.approx(1.0694 - 0.1498 * 2 + 8.257e-5 * 300 - 0.9350 * 0.9, abs=1e-15)
    assert round(v1, 6) == -0.046929
    v3 = instruct_mining_score({"reward": 2, "understandability": 0.9, "naturalness": 0.8, "coherence": 0.85}, "v3")
    assert v3 == pytest.approx(0.0274 - 0.0078 * 2 + 0.4421 * 0.9 - 0.3212 * 0.8 - 0.1520 * 0.85, abs=1e-15)
    assert round(v3, 5) == 0.02353
    assert INSTRUCT_MINING_RULES["v1"] == (1.0694, {"reward": -0.1498, "length": 8.257e-5, "knn6": -0.9350})
    assert INSTRUCT_MINING_RULES["v3"] == (0.0274, {"reward": -0.0078, "understandability": 0.4421, "naturalness": -0.3212, "coherence": -0.1520})


def test_score_on_arrays_tensors_and_custom_rules():
    values = {"reward": np.array([2.0, 0.0]), "length": np.array([300.0, 10.0]), "knn6": np.array([0.9, 0.1])}
    scores = instruct_mining_score(values, "v1")
    expected = [1.0694 - 0.1498 * r + 8.257e-5 * n - 0.9350 * k for r, n, k in zip([2.0, 0.0], [300.0, 10.0], [0.9, 0.1])]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-15)
    as_tensors = instruct_mining_score({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}, "v1")
    np.testing.assert_allclose(as_tensors.numpy(), expected, rtol=0, atol=1e-15)
    assert instruct_mining_score({"ppl": 3.0, "input": 2.0}, "custom", {"ppl": 0.5, "input": -1.0}, 0.25) == 0.25 + 1.5 - 2.0
    with pytest.raises(ValueError, match="needs the indicators knn6"):
        instruct_mining_score({"reward": 1, "length": 1}, "v1")
    with pytest.raises(ValueError, match="custom"):
        instruct_mining_score({"reward": 1}, "v1", coefficients={"reward": 1.0})
    with pytest.raises(ValueError, match="coefficients"):
        instruct_mining_score({"reward": 1}, "custom")


def test_filter_ranks_by_the_rule_computed_by_hand():
    records = [
        {"id": i, "prompt": "q", "response": "a" * (i + 1), "reward": r, "und": u, "nat": n, "coh": c}
        for i, (r, u, n, c) in enumerate([(2, 0.9, 0.8, 0.85), (-1, 0.2, 0.9, 0.9), (0.5, 0.5, 0.5, 0.5), (3, 0.95, 0.1, 0.2), (1, 0.3, 0.7, 0.6)])
    ]
    indicators = {"reward": RecordField("reward"), "understandability": RecordField("und"),
                  "naturalness": RecordField("nat"), "coherence": RecordField("coh")}
    by_hand = [0.0274 - 0.0078 * r["reward"] + 0.4421 * r["und"] - 0.3212 * r["nat"] - 0.1520 * r["coh"] for r in records]
    f = InstructMiningFilter(indicators=indicators, keep_fraction=0.4)
    keep = f.keep(records)
    np.testing.assert_allclose(f.last_scores, by_hand, rtol=0, atol=1e-15)
    best_two = sorted(range(5), key=lambda i: by_hand[i])[:2]
    assert keep.nonzero()[0].tolist() == sorted(best_two)
    threshold = sorted(by_hand)[2]
    keep = InstructMiningFilter(indicators=indicators, max_score=threshold).keep(records)
    assert keep.tolist() == [s <= threshold for s in by_hand]
    assert set(f.last_indicators) == {"reward", "understandability", "naturalness", "coherence"}  # "length" unused by v3


def test_filter_arguments():
    with pytest.raises(ValueError, match="keep_fraction"):
        InstructMiningFilter(indicators={"reward": RecordField("r")}, version="v1")
    with pytest.raises(ValueError, match="needs the indicators knn6"):
        InstructMiningFilter(indicators={"reward": RecordField("r")}, version="v1", keep_fraction=0.5)
    with pytest.raises(ValueError, match="needs the indicators reward"):
        InstructMiningFilter(keep_fraction=0.5)
    with pytest.raises(ValueError, match="custom"):
        InstructMiningFilter(version="v1", coefficients={"length": 1.0}, keep_fraction=0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        InstructMiningFilter(version="custom", coefficients={"length": 1.0}, keep_fraction=1.5)
    with pytest.raises(TypeError, match="Indicator"):
        InstructMiningFilter(version="custom", coefficients={"length": 1.0}, indicators={"length": len}, keep_fraction=0.5)
    custom = InstructMiningFilter(version="custom", coefficients={"length": 1.0}, intercept=2.0, keep_fraction=0.5)
    records = [{"text": "abc"}, {"text": "a"}]
    assert custom.keep(records, resolve_tokenizer("char")).tolist() == [False, True]
    np.testing.assert_array_equal(custom.last_scores, [5.0, 3.0])


# ----------------------------------------------------------------------------------------------------
# Indicators
# ----------------------------------------------------------------------------------------------------
def test_record_texts_and_lengths():
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A1"},
                         {"role": "user", "content": "V"}, {"role": "assistant", "content": "A2"}]}
    assert record_texts(chat) == ("S\nU\nV", "A1\nA2")
    assert record_texts({"prompt": "p", "response": "r"}) == ("p", "r")
    assert record_texts({"text": "t"}) == ("", "t")
    records = [{"prompt": "Sort: 3 1", "response": "1 3 done"}, {"text": "hello world"}]
    tok = resolve_tokenizer("char")
    assert Length(unit="chars")(records).tolist() == [8.0, 11.0]
    assert Length(unit="words")(records).tolist() == [3.0, 2.0]
    assert Length(unit="tokens")(records, tok).tolist() == [8.0, 11.0]  # one token per character
    assert Length(of="instruction", unit="chars")(records).tolist() == [9.0, 0.0]
    with pytest.raises(ValueError, match="tokenizer"):
        Length()(records)


def test_record_field_and_callable_indicators():
    records = [{"prompt": "ab", "response": "aaa", "r": "1.5"}, {"prompt": "", "response": "b", "r": -2}]
    assert RecordField("r")(records).tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="no field 'x'"):
        RecordField("x")(records)
    with pytest.raises(ValueError, match="not a number"):
        RecordField("prompt")(records)
    batched = CallableIndicator("tests.datamodules.test_filters.reward_by_length")
    assert batched(records).tolist() == [3 - 1.0, 1 - 0.0]
    single = CallableIndicator("tests.datamodules.test_filters:one_reward", batched=False, kwargs={"bonus": 0.5})
    assert single(records).tolist() == [3.5, 0.5]
    with pytest.raises(ValueError, match="no attribute"):
        CallableIndicator("tests.datamodules.test_filters.missing")(records)


def naive_knn(x, k, metric):
    out = []
    for i in range(len(x)):
        dists = []
        for j in range(len(x)):
            if i == j:
                continue
            if metric == "euclidean":
                dists.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j]))))
            else:
                dot = sum(a * b for a, b in zip(x[i], x[j]))
                norm = math.sqrt(sum(a * a for a in x[i])) * math.sqrt(sum(b * b for b in x[j]))
                dists.append(max(0.0, 1 - dot / norm))
        out.append(sorted(dists)[k - 1])
    return out


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_distances_match_naive_loops(metric):
    x = np.random.default_rng(0).normal(size=(13, 5))
    for k in (1, 6, 12):
        np.testing.assert_allclose(knn_distances(x, k, metric, chunk=4), naive_knn(x.tolist(), k, metric), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 14"):
        knn_distances(x, 13)


def test_knn_indicator_with_the_offline_embedder():
    records = [{"prompt": "p", "response": w} for w in ("apple pie", "apple pies", "banana", "cherry", "apple tart", "bananas", "grape", "melon")]
    ind = KNNDistance(k=2, text="response")
    texts = [r["response"] for r in records]
    np.testing.assert_allclose(ind(records), naive_knn(hashed_ngram_embedder(texts).tolist(), 2, "euclidean"), rtol=1e-10)
    both = KNNDistance(k=2)(records)
    np.testing.assert_allclose(both, naive_knn(hashed_ngram_embedder([f"p\n{t}" for t in texts]).tolist(), 2, "euclidean"), rtol=1e-10)


def test_perplexity_indicator_matches_the_model_by_hand():
    records = [{"prompt": "2+2=", "response": "4"}, {"prompt": "Say hi: ", "response": "hello there"}, {"text": "abcabc"}]
    ind = Perplexity(model="tiny-llama", tokenizer="char", model_config=TINY, batch_size=2, device="cpu")
    ours = ind(records)
    lm = ind.load()  # the same seeded random weights
    tok = lm.tokenizer
    expected = []
    for r in records:
        instruction, response = record_texts(r)
        head = tok(instruction, add_special_tokens=False)["input_ids"] if instruction else []
        ids = head + tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.causal_lm(input_ids=torch.tensor([ids])).logits[0].double()
        nll = [-F.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(max(len(head), 1), len(ids))]
        expected.append(math.exp(sum(nll) / len(nll)))
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert Perplexity(model="tiny-llama", tokenizer="char", model_config=TINY, seed=1)(records[:1])[0] != pytest.approx(ours[0], rel=1e-6)
    with pytest.raises(ValueError, match="no response token"):
        Perplexity(model="tiny-llama", tokenizer="char", model_config=TINY, max_length=4)(records[:1])


# ----------------------------------------------------------------------------------------------------
# Long-CoT branching density (spec §12 f)
# ----------------------------------------------------------------------------------------------------
def test_spec_check_branching_density():
    assert split_steps(SPEC_TRACE) == ["Let x=2", "Wait, maybe we should use y", "Alternatively set z", "So answer 4"]
    assert branching_density(SPEC_TRACE) == 0.5  # 4 steps, 2 branching
    assert BranchingDensityFilter().keep([{"prompt": "q", "response": SPEC_TRACE}]).tolist() == [False]  # 0.5 > 0.30
    # the third-party segmentation keeps steps longer than 10 characters: 3 steps, 2 branching
    assert branching_density(SPEC_TRACE, min_step_chars=11) == pytest.approx(2 / 3)


def naive_density(text, keywords):
    steps = [s.strip() for s in text.replace("!", ".").replace("?", ".").replace("\n", ".").split(".")]
    steps = [s for s in steps if s]
    hits = 0
    for s in steps:
        words = s.lower()
        if any(re.search(r"\b" + k + r"\b", words) for k in keywords):
            hits += 1
    return hits / len(steps) if steps else 0.0


@pytest.mark.parametrize("text, density", [
    ("We compute 3+4. It is 7.", 0.0),
    ("Perhaps 7? Let me try 8! WAIT. Hmm.\nOn second thought 7.", 0.8),
    ("The process awaited nothing. What iffy logic. Another approach: none.", 1 / 3),  # word boundaries
    ("Maybe I should check. Maybe they should not. What if not.", 2 / 3),
    ("", 0.0),
])
def test_density_cases_and_naive_reference(text, density):
    assert branching_density(text) == pytest.approx(density)
    assert branching_density(text) == pytest.approx(naive_density(text, BRANCHING_KEYWORDS))


def test_filter_options_think_tags_keywords_and_fraction():
    think = {"prompt": "q", "response": "<think>Wait. Wait. Fine.</think>Alternatively, the answer. Wait. Perhaps."}
    assert BranchingDensityFilter(max_density=0.7).keep([think]).tolist() == [True]  # 2/3 inside the tags
    assert BranchingDensityFilter(max_density=0.7, think_tags=None).keep([think]).tolist() == [False]  # 5/6 overall
    f = BranchingDensityFilter(keywords=["hmm"], max_density=0.0)
    assert f.keep([{"text": "Hmm. Ok."}, {"text": "Wait. Ok."}]).tolist() == [False, True]
    records = [{"text": t} for t in ("Wait. a. b.", "ok. fine.", "Wait. Perhaps. c.", "Wait. x. y. z.", "so. done.")]
    f = BranchingDensityFilter(keep_fraction=0.6)  # takes precedence over max_density
    assert f.keep(records).tolist() == [False, True, False, True, True]
    np.testing.assert_allclose(f.last_scores, [1 / 3, 0.0, 2 / 3, 0.25, 0.0])
    with pytest.raises(ValueError, match="keep_fraction"):
        BranchingDensityFilter(max_density=None)
    with pytest.raises(ValueError, match="min_step_chars"):
        BranchingDensityFilter(min_step_chars=0)


def test_select_lowest_ties_and_nan():
    assert select_lowest([1.0, 0.0, 0.0, 0.0], keep_fraction=0.5).tolist() == [False, True, True, False]
    assert select_lowest([float("nan"), 2.0, 1.0], keep_fraction=0.5).tolist() == [False, True, True]
    assert select_lowest([float("nan"), 2.0, 1.0], max_score=5).tolist() == [False, True, True]
    assert select_lowest([0.1] * 10, keep_fraction=0.3).sum() == 3  # no float round-up to 4


# ----------------------------------------------------------------------------------------------------
# SFTDataModule with filters
# ----------------------------------------------------------------------------------------------------
def loaded_ids(dm: SFTDataModule) -> set:
    return set(dm.example_ids)


def test_datamodule_branching_filter_keeps_exactly_the_linear_traces():
    path = str(EXAMPLES / "long_cot.jsonl")
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    dm = SFTDataModule(train_file=path, tokenizer="char", max_length=512, filters=[BranchingDensityFilter(max_density=0.3)])
    dm.setup("fit")
    assert loaded_ids(dm) == {r["id"] for r in records if r["style"] == "linear"}
    assert len(dm.dataset("train")) == 12
    assert dm.filter_report == [{"filter": "BranchingDensityFilter", "before": 24, "kept": 12}]


def test_datamodule_chained_filters_and_validation_untouched(tmp_path):
    records = [
        {"id": f"r{i}", "prompt": f"Question {i}?\n", "response": resp, "reward": rew}
        for i, (resp, rew) in enumerate([
            ("Yes.", 2.0), ("Wait. No. Perhaps yes.", 3.0), ("No.", -1.0), ("Maybe. Sure.", 0.5),
            ("Wait. Alternatively. Yes.", 1.0), ("Indeed.", 1.5), ("Certainly.", -0.5), ("Fine.", 0.0),
        ])
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    im = InstructMiningFilter(version="custom", coefficients={"reward": -1.0, "length": 0.01},
                              indicators={"reward": RecordField("reward"), "length": Length(unit="chars")}, keep_fraction=0.5)
    filters = [BranchingDensityFilter(max_density=0.3), im]
    dm = SFTDataModule(train_file=path, tokenizer="char", val_fraction=0.25, seed=3, filters=filters)
    dm.setup("fit")
    plain = SFTDataModule(train_file=path, tokenizer="char", val_fraction=0.25, seed=3)
    plain.setup("fit")
    val_ids = set(plain._examples("val").example_ids)
    assert set(dm._examples("val").example_ids) == val_ids  # validation is never filtered
    # by hand: the training part, then density <= 0.3, then the best half by -reward + 0.01 len
    train = [r for r in records if plain.example_ids[r["id"]] not in val_ids]
    low_branching = [r for r in train if branching_density(r["response"]) <= 0.3]
    scores = [-r["reward"] + 0.01 * len(r["response"]) for r in low_branching]
    order = sorted(range(len(low_branching)), key=lambda i: (scores[i], i))[: math.ceil(len(low_branching) / 2)]
    expected = {low_branching[i]["id"] for i in order}
    train_ids = {rid for rid, eid in dm.example_ids.items() if eid in set(dm._examples("train").example_ids)}
    assert train_ids == expected
    assert [r["kept"] for r in dm.filter_report] == [len(low_branching), len(expected)]


def test_datamodule_instruct_mining_on_the_shipped_data_by_hand():
    path = str(EXAMPLES / "instruct_mining.jsonl")
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    im = InstructMiningFilter(version="v1", keep_fraction=0.5, indicators={"reward": RecordField("reward"), "knn6": KNNDistance()})
    dm = SFTDataModule(train_file=path, tokenizer="char", filters=[im])
    dm.setup("fit")
    texts = [f"{r['prompt']}\n{r['response']}" for r in records]
    knn = naive_knn(hashed_ngram_embedder(texts).tolist(), 6, "euclidean")
    scores = [1.0694 - 0.1498 * r["reward"] + 8.257e-5 * len(r["response"]) - 0.9350 * k for r, k in zip(records, knn)]
    np.testing.assert_allclose(im.last_scores, scores, rtol=1e-10)
    expected = {records[i]["id"] for i in sorted(range(40), key=lambda i: (scores[i], i))[:20]}
    assert loaded_ids(dm) == expected
    assert sum(r["reward"] > 0 for r in records if r["id"] in expected) >= 15  # the stand-in reward dominates


def test_a_filter_that_keeps_nothing_and_a_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Wait. Perhaps."}])
    with pytest.raises(ValueError, match="kept no record"):
        SFTDataModule(train_file=path, tokenizer="char", filters=[BranchingDensityFilter()]).setup("fit")
    with pytest.raises(TypeError, match="RecordFilter"):
        SFTDataModule(train_file=path, filters=[lambda records: records])

    class KeepFirst(RecordFilter):
        def keep(self, records, tokenizer=None):
            return [i == 0 for i in range(len(records))]

    dm = SFTDataModule(train_file=write_jsonl(tmp_path / "e.jsonl", [{"text": "a"}, {"text": "b"}]), tokenizer="char", filters=[KeepFirst()])
    dm.setup("fit")
    assert list(dm.example_ids) == [0]


def test_filters_from_yaml_through_the_cli(tmp_path):
    from lightning_tokens.cli import cli

    config = tmp_path / "c.yaml"
    config.write_text(f"""
model:
  class_path: lightning_tokens.TokenLM
  init_args: {{model: tiny-llama, tokenizer: char}}
data:
  class_path: lightning_tokens.SFTDataModule
  init_args:
    train_file: {EXAMPLES / "long_cot.jsonl"}
    tokenizer: char
    max_length: 512
    filters:
      - class_path: lightning_tokens.datamodules.filters.BranchingDensityFilter
        init_args:
          keep_fraction: 0.25
          keywords: [wait, alternatively]
          min_step_chars: 11
          think_tags: ["<think>", "</think>"]
      - class_path: lightning_tokens.datamodules.filters.InstructMiningFilter
        init_args:
          version: custom
          coefficients: {{ppl: 1.0}}
          keep_fraction: 0.5
          indicators:
            ppl:
              class_path: lightning_tokens.datamodules.filters.CallableIndicator
              init_args: {{function: tests.datamodules.test_filters.reward_by_length}}
""")
    built = cli(["--config", str(config)], run=False)
    branching, mining = built.datamodule.filters
    assert isinstance(branching, BranchingDensityFilter) and branching.keywords == ["wait", "alternatively"]
    assert branching.think_tags == ("<think>", "</think>") and branching.min_step_chars == 11
    assert isinstance(mining.indicators["ppl"], CallableIndicator)
    built.datamodule.setup("fit")
    assert [r["kept"] for r in built.datamodule.filter_report] == [6, 3]
