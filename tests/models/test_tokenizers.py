"""Tokenizers built in code (`lightning_tokens.models.tokenizers`)."""

import string

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lightning_tokens.models import tokenizers as tok_mod
from lightning_tokens.models.tokenizers import (
    CHAR_VOCAB_CHARS,
    build_char_tokenizer,
    char_vocab,
    ensure_pad_token,
    resolve_tokenizer,
)

SAMPLES = [
    "Add two numbers: 744 + 543 = 1287",
    "  leading and trailing spaces  ",
    "a  b   c",
    "line one\nline two\n",
    "".join(chr(i) for i in range(32, 127)),
    "Directly return the answer as an integer without any comma separator, like 123 . Add",
    "x . y , z ' s n't",  # what Hugging Face's clean-up would rewrite
    "",
]


def test_vocabulary_is_deterministic():
    tok = build_char_tokenizer()
    vocab = char_vocab()
    assert tok.get_vocab() == vocab == build_char_tokenizer().get_vocab()
    assert len(tok) == len(vocab) == 100
    assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert set(string.printable) - {"\t", "\r", "\x0b", "\x0c"} == set(CHAR_VOCAB_CHARS)
    assert vocab[" "] == 4 and vocab["~"] == 98 and vocab["\n"] == 99
    assert tok.padding_side == "right"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_one_token_per_char(text):
    tok = build_char_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert ids == [char_vocab()[c] for c in text]
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == text


def test_no_special_tokens_added_and_unknown_chars():
    tok = build_char_tokenizer()
    assert tok("12", add_special_tokens=True)["input_ids"] == tok("12", add_special_tokens=False)["input_ids"]
    assert tok("12")["attention_mask"] == [1, 1]
    assert "token_type_ids" not in tok("12")
    assert tok.encode("a\té", add_special_tokens=False) == [char_vocab()["a"], 3, 3]
    ids = tok.encode("7 = 7", add_special_tokens=False) + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "7 = 7"


def test_batch_padding():
    tok = build_char_tokenizer()
    batch = tok(["1", "123"], padding=True)
    assert batch["input_ids"][0][1:] == [0, 0]
    assert batch["attention_mask"][0] == [1, 0, 0]


def test_save_and_reload(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.padding_side == "right"
    for text in SAMPLES:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    # resolve_tokenizer loads local directories too
    resolved = resolve_tokenizer(str(tmp_path))
    assert resolved.decode(resolved.encode(SAMPLES[0], add_special_tokens=False)) == SAMPLES[0]


def test_resolve_char():
    tok = resolve_tokenizer("char")
    assert tok.get_vocab() == char_vocab()
    assert tok.pad_token_id == 0


def test_resolve_hub_failure_is_a_clear_value_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(tok_mod.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ValueError, match=r"tokenizer='no-such/tokenizer'.*tokenizer: char"):
        resolve_tokenizer("no-such/tokenizer")
    with pytest.raises(ValueError, match="tokenizer"):
        resolve_tokenizer("")


def test_ensure_pad_token_falls_back_to_eos():
    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token is None
    assert ensure_pad_token(tok).pad_token == "</s>"
    assert tok.pad_token_id == tok.eos_token_id == 2


def test_resolve_hub_id_sets_pad(monkeypatch):
    def fake(name, *args, **kwargs):
        backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")

    monkeypatch.setattr(tok_mod.AutoTokenizer, "from_pretrained", fake)
    assert resolve_tokenizer("some/hub-id").pad_token_id == 2
