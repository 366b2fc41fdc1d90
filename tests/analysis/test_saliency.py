"""Token saliency maps: the arithmetic, the fused log-probabilities against a float64 reference, the map between
two contexts and between two models, the files, and `lightning-tokens saliency`."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.analysis.saliency import response_logprobs, saliency_map, saliency_scores
from lightning_tokens.datamodules.contrastive import collate_contrastive
from lightning_tokens.models.presets import load_causal_lm
from lightning_tokens.models.tokenizers import resolve_tokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
RECORDS = [
    {"id": "a", "positive_context": "7+5=", "negative_context": "7+5= (wrong: 13)", "response": "13"},
    {"id": "b", "positive_context": "What is 2+2? ", "negative_context": "2+2, judged: bad ", "response": "5 apples"},
    {"id": "c", "positive_context": "no judgment here ", "response": "ok"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return resolve_tokenizer("char")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return load_causal_lm("tiny-llama", vocab_size=len(tokenizer), overrides=TINY).eval()


def test_scores_are_the_log_probability_difference():
    s = saliency_scores(torch.tensor([0.4, 0.3]).log(), torch.tensor([0.5, 0.2]).log())
    assert s.tolist() == pytest.approx([math.log(0.4 / 0.5), math.log(0.3 / 0.2)], abs=1e-6)
    assert saliency_scores(torch.zeros(2), torch.ones(2), torch.tensor([True, False])).tolist() == [-1.0, 0.0]


def _naive_logprobs(model, ids):
    """float64 log p(ids[t] | ids[<t]) for t >= 1 of one unpadded sequence, from the full logits."""
    m64 = model.double()
    try:
        with torch.no_grad():
            logits = m64(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        model.float()
    return F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def test_fused_logprobs_equal_a_float64_reference(model, tokenizer):
    batch = collate_contrastive(RECORDS, tokenizer)
    logp = response_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"], backend="torch")
    for row in range(3):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n].tolist()
        reference = _naive_logprobs(model, ids)
        labelled = batch["labels"][row, 1:n] != -100
        torch.testing.assert_close(logp[row, 1:n][labelled].double(), reference[labelled], rtol=1e-4, atol=1e-5)
        assert (logp[row][batch["labels"][row] == -100] == 0).all()


def test_map_between_contexts(model, tokenizer, tmp_path):
    batch = collate_contrastive(RECORDS, tokenizer)
    report = saliency_map(batch, model, tokenizer, backend="torch")
    assert report.mode == "contexts" and report.names == ("positive", "negative")
    assert len(report.examples) == 2  # the record without a negative context has no map
    for example, record in zip(report.examples, RECORDS):
        response = [tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]][0]
        assert example.token_ids == response and "".join(example.tokens[:-1]) == record["response"]
        pos = tokenizer(record["positive_context"], add_special_tokens=False)["input_ids"] + response
        neg = tokenizer(record["negative_context"], add_special_tokens=False)["input_ids"] + response
        logp_pos = _naive_logprobs(model, pos)[-len(response):]
        logp_neg = _naive_logprobs(model, neg)[-len(response):]
        assert example.saliency == pytest.approx((logp_pos - logp_neg).tolist(), abs=1e-4)
        assert example.context == record["positive_context"]
    summary = report.summary()
    assert summary["tokens"] == sum(len(e.tokens) for e in report.examples)
    flagged = sum(-v > math.log(1.1) for e in report.examples for v in e.saliency)
    assert summary["fraction_flagged"] == pytest.approx(flagged / summary["tokens"])
    paths = report.write(str(tmp_path / "map"))
    for key in ("png", "html", "json", "csv", "summary"):
        assert (tmp_path / "map").joinpath(paths[key].split("/")[-1]).exists()
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == summary["tokens"]
    assert float(rows[0]["saliency"]) == pytest.approx(report.examples[0].saliency[0], abs=1e-6)
    html = open(paths["html"], encoding="utf-8").read()
    assert "log p (negative)" in html and "flagged (CUT)" in html


def test_map_between_models(model, tokenizer):
    batch = collate_contrastive(RECORDS, tokenizer)
    same = saliency_map(batch, model, tokenizer, reference=model, backend="torch")
    assert same.mode == "models" and len(same.examples) == 3
    assert all(v == 0 for e in same.examples for v in e.saliency)
    torch.manual_seed(1)
    other = load_causal_lm("tiny-llama", vocab_size=len(tokenizer), overrides=TINY).eval()
    report = saliency_map(batch, other, tokenizer, reference=model, backend="torch")
    tuned = response_logprobs(other, batch["input_ids"], batch["labels"], batch["attention_mask"], backend="torch")
    base = response_logprobs(model, batch["input_ids"], batch["labels"], batch["attention_mask"], backend="torch")
    expected = (tuned - base)[0][batch["labels"][0] != -100]
    assert report.examples[0].saliency == pytest.approx(expected.tolist(), abs=1e-5)


def _config(tmp_path, tokenizer):
    data = tmp_path / "cut.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    config = tmp_path / "saliency.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  logger: false
model:
  class_path: lightning_tokens.TokenLM
  init_args:
    model: tiny-llama
    tokenizer: char
    model_config: {json.dumps(TINY)}
    loss_backend: torch
data:
  class_path: lightning_tokens.datamodules.contrastive.ContrastiveDataModule
  init_args:
    train_file: {data}
""")
    return str(config)


def test_cli_between_contexts_and_between_models(tmp_path, tokenizer):
    from lightning_tokens.cli import cli

    config = _config(tmp_path, tokenizer)
    cli(["saliency", "--config", config, f"--output={tmp_path / 'contexts'}", "--num_examples=2"])
    summary = json.loads((tmp_path / "contexts" / "summary.json").read_text())
    assert summary["mode"] == "contexts" and summary["examples"] == 2
    assert all((tmp_path / "contexts" / name).exists() for name in ("saliency.png", "saliency.html", "saliency_tokens.csv"))

    for seed, name in ((0, "base"), (1, "tuned")):
        torch.manual_seed(seed)
        load_causal_lm("tiny-llama", vocab_size=len(tokenizer), overrides=TINY).save_pretrained(str(tmp_path / name))
    cli(["saliency", "--config", config, f"--output={tmp_path / 'models'}", f"--base={tmp_path / 'base'}",
         f"--tuned={tmp_path / 'tuned'}", "--num_examples=3"])
    summary = json.loads((tmp_path / "models" / "summary.json").read_text())
    assert summary["mode"] == "models" and summary["names"] == ["tuned", "base"] and summary["examples"] == 3
    assert summary["mean_saliency"] != 0
