"""`SFTDataModule` (`lightning_tokens.datamodules.sft`): schemas, labels, weights, errors, truncation,
packing (alignment and attention that never crosses examples), the shipped example data, and training."""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_tokens.datamodules import (
    SFTCollator,
    SFTDataError,
    SFTDataModule,
    pack_examples,
    packed_attention_mask,
    stable_example_id,
)
from lightning_tokens.models.tokenizers import char_vocab, resolve_tokenizer
from tests.helpers import trainer as make_trainer

EXAMPLES = Path(__file__).resolve().parents[2] / "data" / "examples"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be short."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def write_jsonl(path: Path, records: list) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def setup_dm(path: str, stage: str = "fit", **kwargs) -> SFTDataModule:
    kwargs.setdefault("tokenizer", "char")
    dm = SFTDataModule(train_file=path, **kwargs)
    dm.setup(stage)
    return dm


def items(dm: SFTDataModule, split: str = "train") -> list[dict]:
    examples = dm._examples(split)
    return [examples[i] for i in range(len(examples))]


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


def labelled(tok, item) -> str:
    return decode(tok, [i for i in item["labels"] if i != -100])


def labelled_weights(item) -> list[float]:
    return [float(w) for w, lab in zip(item["token_weights"], item["labels"]) if lab != -100]


def bos_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer, but adding ``<s>`` in front of encoded text."""
    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words (and single punctuation/space-free pieces): tokens spanning several characters."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "big": 5, "world": 6, "say": 7}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


# ----------------------------------------------------------------------------------------------------
# Schemas and labels
# ----------------------------------------------------------------------------------------------------
def test_prompt_response_labels_exactly_the_response_and_eos(tmp_path):
    records = [{"prompt": "Q: hi ", "response": "hello"}, {"prompt": "", "response": "ab"}, {"prompt": "x = ", "response": " 7\n"}]
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", records))
    tok = dm.tokenizer
    for record, item in zip(records, items(dm)):
        assert decode(tok, item["input_ids"]) == record["prompt"] + record["response"] + "</s>"
        expected = record["response"] + "</s>"
        if not record["prompt"]:
            expected = expected[1:]  # the first token of an example is never labelled
        assert labelled(tok, item) == expected
        # not shifted: a labelled position holds its own token
        assert all(lab == tok_id for lab, tok_id in zip(item["labels"], item["input_ids"]) if lab != -100)
        assert item["labels"][0] == -100
        assert labelled_weights(item) == [1.0] * int((item["labels"] != -100).sum())


def test_text_labels_every_token_but_the_first(tmp_path):
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [{"text": "plain text"}]))
    (item,) = items(dm)
    assert decode(dm.tokenizer, item["input_ids"]) == "plain text</s>"
    assert labelled(dm.tokenizer, item) == "lain text</s>"


def test_add_eos_false(tmp_path):
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "bc"}, {"text": "xyz"}]), add_eos=False)
    first, second = items(dm)
    assert labelled(dm.tokenizer, first) == "bc" and labelled(dm.tokenizer, second) == "yz"


def test_messages_fallback_template_labels_only_assistant_turns(tmp_path):
    records = [{"messages": CHAT}, {"messages": CHAT[:3] + [{"role": "user", "content": "thanks"}]}]
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", records))
    tok = dm.tokenizer
    assert tok.chat_template is None
    full, ends_with_user = items(dm)
    rendered = "<|system|>\nBe short.\n<|user|>\n1+1?\n<|assistant|>\n2\n<|user|>\n2+2?\n<|assistant|>\n4\n"
    assert decode(tok, full["input_ids"]) == rendered + "</s>"
    assert labelled(tok, full) == "2\n4\n</s>"
    # the labelled tokens are exactly the assistant contents + their newline, at the right positions
    text = decode(tok, full["input_ids"])
    positions = [i for i, lab in enumerate(full["labels"]) if lab != -100]
    first = rendered.index("<|assistant|>\n2") + len("<|assistant|>\n")
    second = rendered.index("<|assistant|>\n4") + len("<|assistant|>\n")
    assert positions == [first, first + 1, second, second + 1, len(text) - 4]
    # a conversation that ends with a user turn: its eos is not labelled
    assert labelled(tok, ends_with_user) == "2\n"


def test_messages_with_a_chat_template_label_content_and_end_of_turn(tmp_path):
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}]), chat_template=CHATML)
    (item,) = items(dm)
    tok = dm.tokenizer
    text = decode(tok, item["input_ids"])
    assert text == tok.apply_chat_template(CHAT, chat_template=CHATML, tokenize=False)  # no eos added to templates
    assert labelled(tok, item) == "2<|im_end|>\n4<|im_end|>\n"
    assert "assistant" not in labelled(tok, item)  # the generation prompt (header) is not labelled


def test_messages_with_the_tokenizers_own_template(tmp_path):
    tok = resolve_tokenizer("char")
    tok.chat_template = CHATML
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}]), tokenizer=tok)
    assert labelled(tok, items(dm)[0]) == "2<|im_end|>\n4<|im_end|>\n"


def test_messages_template_without_consistent_prefixes_labels_the_contents(tmp_path):
    # a header that counts the messages: no rendered prefix is a prefix of the full conversation
    template = "{{ messages|length }} messages\n" + CHATML
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}]), chat_template=template)
    assert labelled(dm.tokenizer, items(dm)[0]) == "24"


def test_messages_template_that_rewrites_the_content_is_an_error(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content']|upper }}\n{% endfor %}"
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}])
    with pytest.raises(SFTDataError, match=r"t\.jsonl, line 1, field 'messages\[1\]\.content'.*verbatim"):
        setup_dm(path, chat_template=template)


def test_explicit_schema_requires_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    with pytest.raises(SFTDataError, match="line 1, field 'prompt': missing"):
        setup_dm(path, schema="prompt_response")


# ----------------------------------------------------------------------------------------------------
# Weights and ids
# ----------------------------------------------------------------------------------------------------
def test_token_weights_and_spans_hand_computed(tmp_path):
    records = [
        # spans [1, 3) = "bc" weigh 0.5, times the list, times the sample weight 2; eos 1 * 2
        {"prompt": "P:", "response": "abcd", "token_weights": [1, 2, 3, 4], "weight_spans": [{"start": 1, "end": 3, "weight": 0.5}], "weight": 2},
        # one more value than response tokens: it is the eos's
        {"prompt": "P:", "response": "ab", "token_weights": [0.5, 0.25, 3]},
        # text: spans into the text; overlapping spans: the last listed wins
        {"text": "abcdef", "weight_spans": [{"start": 0, "end": 4, "weight": 2}, {"start": 3, "end": 5, "weight": 0}]},
        # messages: spans into one assistant message's content
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "xyz", "weight_spans": [{"start": 2, "end": 3, "weight": 4}]}]},
        # messages: a token_weights list aligned to all labelled tokens ("xyz\n" + eos)
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "xyz"}], "token_weights": [1, 2, 3, 4, 5]},
    ]
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", records))
    got = [labelled_weights(item) for item in items(dm)]
    assert got[0] == [2.0, 2.0, 3.0, 8.0, 2.0]
    assert got[1] == [0.5, 0.25, 3.0]
    assert got[2] == [2.0, 2.0, 0.0, 0.0, 1.0, 1.0]  # "bcdef</s>" labelled; "a" is the first token
    assert got[3] == [1.0, 1.0, 4.0, 1.0, 1.0]  # "x", "y", "z", "\n", eos
    assert got[4] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # the sample weight multiplies every token of its example, prompt included
    assert all(float(w) == 2.0 for w, lab in zip(items(dm)[0]["token_weights"], items(dm)[0]["labels"]) if lab == -100)


def test_spans_map_to_every_token_they_overlap(tmp_path):
    dm = setup_dm(
        write_jsonl(tmp_path / "t.jsonl", [{"prompt": "say", "response": "hello big world", "weight_spans": [{"start": 4, "end": 7, "weight": 3}]}]),
        tokenizer=word_tokenizer(),
    )
    (item,) = items(dm)
    assert item["input_ids"].tolist() == [7, 4, 5, 6, 2]
    assert labelled_weights(item) == [3.0, 3.0, 1.0, 1.0]  # "o b" overlaps "hello" and "big"


def test_sample_weights_reach_the_batch(tmp_path):
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b", "weight": 0.5}, {"prompt": "a", "response": "cd"}]))
    batch = SFTCollator(0)(items(dm))
    assert batch["token_weights"].dtype == torch.float32
    assert batch["token_weights"][0, :3].tolist() == [0.5, 0.5, 0.5] and batch["token_weights"][0, 3] == 0  # padding weighs 0
    assert batch["token_weights"][1].tolist() == [1.0] * 4


def test_example_ids(tmp_path):
    records = [{"id": 7, "text": "ab"}, {"id": "q-1", "text": "ab"}, {"text": "ab"}, {"id": 2.5, "text": "ab"}]
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", records))
    assert [item["example_id"] for item in items(dm)] == [7, stable_example_id("q-1"), 2, stable_example_id(2.5)]
    assert dm.example_ids == {7: 7, "q-1": stable_example_id("q-1"), 2: 2, 2.5: stable_example_id(2.5)}
    assert stable_example_id("q-1") == 0x7FFFFFFFFFFFFFFF & int.from_bytes(__import__("hashlib").sha256(b'"q-1"').digest()[:8], "little")
    assert stable_example_id("7") != 7 and stable_example_id(-1) >= 0
    batch = SFTCollator(0)(items(dm)[:2])
    assert batch["example_id"].tolist() == [7, stable_example_id("q-1")]
    assert batch["token_example_ids"][0].tolist() == [7, 7, 7]


# ----------------------------------------------------------------------------------------------------
# Errors: file, line (or index) and field, at setup
# ----------------------------------------------------------------------------------------------------
GOOD = {"prompt": "p", "response": "r"}


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ({"prompt": "p"}, r"line 2, field 'response': missing field"),
        ({"response": "r"}, r"line 2, field 'prompt': missing field"),
        ({"foo": 1}, r"line 2, field 'prompt': missing field.*'messages', or 'text'"),
        ({"prompt": "p", "response": ""}, r"line 2, field 'response': is empty"),
        ({"text": ""}, r"line 2, field 'text': is empty"),
        ('{"prompt": "p", "response": ', r"line 2: invalid JSON"),
        ('["not", "an object"]', r"line 2: expected a JSON object"),
        ({"prompt": "p", "response": "ab", "weight_spans": [{"start": 1, "end": 3, "weight": 1}]}, r"line 2, field 'weight_spans\[0\]': span \[1, 3\) is outside the response text \(length 2\)"),
        ({"text": "ab", "weight_spans": [{"start": -1, "end": 1, "weight": 1}]}, r"line 2, field 'weight_spans\[0\]': span \[-1, 1\) is outside the text"),
        ({"prompt": "p", "response": "ab", "weight_spans": [{"start": 0, "end": 1}]}, r"line 2, field 'weight_spans\[0\]': expected an object"),
        ({"prompt": "p", "response": "ab", "weight_spans": [{"start": 0, "end": 1, "weight": -2}]}, r"line 2, field 'weight_spans\[0\]\.weight': weights must be finite and >= 0"),
        ({"prompt": "p", "response": "abc", "token_weights": [1, 1]}, r"line 2, field 'token_weights': has 2 values but the example has 3 labelled tokens \(4 with the eos\)"),
        ({"prompt": "p", "response": "abc", "token_weights": [1, -1, 1]}, r"line 2, field 'token_weights\[1\]': weights must be finite and >= 0"),
        ({"prompt": "p", "response": "r", "weight": -0.5}, r"line 2, field 'weight': weights must be finite and >= 0, got -0.5"),
        ({"prompt": "p", "response": "r", "weight": "heavy"}, r"line 2, field 'weight': expected a number"),
        ({"prompt": "p", "response": "r", "id": [1]}, r"line 2, field 'id': expected a string or a number"),
        ({"prompt": 3, "response": "r"}, r"line 2, field 'prompt': expected a string"),
        ({"messages": []}, r"line 2, field 'messages': expected a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"line 2, field 'messages': has no assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, r"line 2, field 'messages\[1\]\.content': missing field"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, r"line 2, field 'messages\[1\]\.content': is empty"),
        ({"messages": [{"role": "user", "content": "hi", "weight_spans": []}, {"role": "assistant", "content": "a"}]}, r"line 2, field 'messages\[0\]\.weight_spans': only assistant"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab", "weight_spans": [{"start": 0, "end": 9, "weight": 1}]}]}, r"line 2, field 'messages\[1\]\.weight_spans\[0\]': span \[0, 9\) is outside the message content"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], "weight_spans": []}, r"line 2, field 'weight_spans': in a messages record"),
        ({"id": 0, "prompt": "p", "response": "r"}, r"line 2, field 'id': duplicate id 0 \(first at .*line 1\)"),
    ],
)
def test_data_errors_name_file_line_and_field(tmp_path, bad, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    dm = SFTDataModule(train_file=path, tokenizer="char")
    with pytest.raises(SFTDataError, match=r"bad\.jsonl, " + pattern):
        dm.setup("fit")


def test_errors_in_json_arrays_name_the_index_and_in_csv_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "p", "response": ""}]))
    with pytest.raises(SFTDataError, match=r"bad\.json, index 2, field 'response': is empty"):
        setup_dm(str(path))
    path.write_text('[{"prompt": "p",\n "response": }]')
    with pytest.raises(SFTDataError, match=r"bad\.json, line 2: invalid JSON"):
        setup_dm(str(path))
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('prompt,response,weight\np,r,1\n"multi\nline",r,2\np,r,-3\n')
    with pytest.raises(SFTDataError, match=r"bad\.csv, line 5, field 'weight': weights must be finite and >= 0"):
        setup_dm(str(csv_path))


def test_unusual_line_breaks_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a\u2028b", "response": "c"}, ensure_ascii=False).encode() + b"\r\n\r\n")
    (item,) = items(setup_dm(str(path)))
    assert labelled(resolve_tokenizer("char"), item) == "c</s>"
    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes(b'\xef\xbb\xbfprompt,response\r\n"x\r\ny",z\r\n')
    (item,) = items(setup_dm(str(csv_path)))
    assert decode(resolve_tokenizer("char"), item["input_ids"]) == "x\ny" + "z</s>"


def test_val_file_errors_are_raised_at_fit_setup(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    val = write_jsonl(tmp_path / "val.jsonl", [GOOD, {"prompt": "p"}])
    with pytest.raises(SFTDataError, match=r"val\.jsonl, line 2, field 'response'"):
        setup_dm(train, val_file=val)


def test_argument_errors(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    with pytest.raises(ValueError, match="either val_file or val_fraction"):
        SFTDataModule(train_file=path, val_file=path, val_fraction=0.1)
    with pytest.raises(ValueError, match="truncation must be one of"):
        SFTDataModule(train_file=path, truncation="middle")
    with pytest.raises(ValueError, match="format of"):
        setup_dm(str(Path(path).rename(tmp_path / "t.txt")))
    with pytest.raises(ValueError, match="needs test_file"):
        setup_dm(str(tmp_path / "t.txt"), "test", format="jsonl")


# ----------------------------------------------------------------------------------------------------
# Truncation policies
# ----------------------------------------------------------------------------------------------------
LONG = {"prompt": "abcd", "response": "wxyz"}  # 4 + 4 + eos = 9 tokens


def test_truncation_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, LONG])
    with pytest.raises(SFTDataError, match=r"t\.jsonl, line 2: the example has 9 tokens, more than max_length=8"):
        setup_dm(path, max_length=8, truncation="error")


def test_truncation_drop_counts(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, LONG, GOOD])
    with pytest.warns(UserWarning, match=r"1/3 examples have more than max_length=8 tokens and were dropped"):
        dm = setup_dm(path, max_length=8, truncation="drop")
    assert len(items(dm)) == 2


def test_truncate_right_cuts_the_end_of_the_response(tmp_path):
    with pytest.warns(UserWarning, match="truncate_right"):
        dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [LONG]), max_length=8, truncation="truncate_right")
    (item,) = items(dm)
    assert decode(dm.tokenizer, item["input_ids"]) == "abcdwxyz"
    assert labelled(dm.tokenizer, item) == "wxyz"


def test_truncate_left_cuts_the_start_of_the_prompt(tmp_path):
    with pytest.warns(UserWarning, match="truncate_left"):
        dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [LONG]), max_length=6, truncation="truncate_left")
    (item,) = items(dm)
    assert decode(dm.tokenizer, item["input_ids"]) == "dwxyz</s>"
    assert labelled(dm.tokenizer, item) == "wxyz</s>"
    # a tokenizer that adds bos keeps it in front
    with pytest.warns(UserWarning, match="truncate_left"):
        dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [LONG]), max_length=6, truncation="truncate_left", tokenizer=bos_char_tokenizer())
    (item,) = items(dm)
    assert item["input_ids"].tolist()[0] == 1
    assert decode(dm.tokenizer, item["input_ids"]) == "<s>wxyz</s>"
    assert labelled(dm.tokenizer, item) == "wxyz</s>"


def test_examples_without_labels_after_truncation_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "abcdefghij", "response": "x"}, GOOD])
    with pytest.warns(UserWarning, match="1/2 examples have no labelled token left"), pytest.warns(UserWarning, match="were cut"):
        dm = setup_dm(path, max_length=8)
    assert len(items(dm)) == 1


# ----------------------------------------------------------------------------------------------------
# Formats, splits, prediction
# ----------------------------------------------------------------------------------------------------
def test_csv_and_json_give_the_same_examples_as_jsonl(tmp_path):
    records = [
        {"id": "a", "prompt": "Q:", "response": "yes", "weight": 2.0, "token_weights": [1, 2, 3]},
        {"id": 5, "messages": CHAT},
        {"id": "c", "text": "hello", "weight_spans": [{"start": 0, "end": 2, "weight": 0.5}]},
    ]
    jsonl = setup_dm(write_jsonl(tmp_path / "t.jsonl", records))
    (tmp_path / "t.json").write_text(json.dumps(records, indent=1))
    as_json = setup_dm(str(tmp_path / "t.json"))
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "prompt", "response", "messages", "text", "weight", "token_weights", "weight_spans"])
        writer.writeheader()
        for r in records:
            writer.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})
    as_csv = setup_dm(str(tmp_path / "t.csv"))
    reference = items(jsonl)
    for other in (as_json, as_csv):
        for a, b in zip(reference, items(other), strict=True):
            assert a["example_id"] == b["example_id"]
            for key in ("input_ids", "labels", "token_weights"):
                assert a[key].tolist() == b[key].tolist()


def test_val_fraction_holds_out_a_seeded_part_of_train(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": i, "prompt": "p", "response": str(i)} for i in range(20)])
    dm = setup_dm(path, val_fraction=0.2, seed=3)
    train_ids = {item["example_id"] for item in items(dm, "train")}
    val_ids = {item["example_id"] for item in items(dm, "val")}
    assert len(val_ids) == 4 and len(train_ids) == 16 and not train_ids & val_ids
    again = setup_dm(path, val_fraction=0.2, seed=3)
    assert {item["example_id"] for item in items(again, "val")} == val_ids
    assert len(list(dm.val_dataloader())) == 1
    assert setup_dm(path).val_dataloader() == []  # no validation data: validation is skipped


def test_predict_batches_are_left_padded_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2="}, {"messages": CHAT}, json.dumps("plain string prompt")])
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [GOOD]), "predict", predict_file=path)
    batch = next(iter(dm.predict_dataloader()))
    assert sorted(batch) == ["prompt_attention_mask", "prompt_input_ids", "prompts"]
    expected_chat = "<|system|>\nBe short.\n<|user|>\n1+1?\n<|assistant|>\n2\n<|user|>\n2+2?\n<|assistant|>\n"
    assert batch["prompts"] == ["2+2=", expected_chat, "plain string prompt"]
    tok = dm.tokenizer
    for row, mask, prompt in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["prompts"]):
        assert decode(tok, row[mask.bool()]) == prompt
        assert mask.tolist() == sorted(mask.tolist())  # left padding
    assert dm.extract_answer("  42\n") == "42"
    assert not hasattr(dm, "build_metrics")
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt = \n\nsecond\n")
    dm = setup_dm(write_jsonl(tmp_path / "t.jsonl", [GOOD]), "predict", predict_file=str(txt))
    assert next(iter(dm.predict_dataloader()))["prompts"] == ["first prompt = ", "second"]


# ----------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------
def test_pack_examples_keeps_examples_whole():
    lengths = [5, 9, 3, 12, 1, 7, 7, 2, 16, 4]
    rows = pack_examples(lengths, capacity=16, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 16)  # these lengths pack perfectly with best-fit
    assert pack_examples(lengths, 16, seed=0) == rows
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_examples([17], 16)


def packed_dm(tmp_path, **kwargs) -> SFTDataModule:
    records = [
        {"id": i, "prompt": f"Q{i}: " + "p" * (i % 7), "response": "r" * (1 + i % 5), "weight": 1 + (i % 3)}
        for i in range(24)
    ] + [{"id": 100, "text": "some plain text"}, {"id": 101, "messages": CHAT[:3]}]
    kwargs.setdefault("max_length", 64)
    return setup_dm(write_jsonl(tmp_path / "t.jsonl", records), packing=True, batch_size=4, **kwargs)


def test_packed_rows_keep_labels_weights_and_ids_aligned(tmp_path):
    dm = packed_dm(tmp_path)
    examples = {item["example_id"]: item for item in items(dm)}
    seen: list[int] = []
    rows = 0
    for batch in dm.train_dataloader():
        assert sorted(batch) == ["input_ids", "labels", "position_ids", "token_example_ids", "token_weights"]
        assert batch["input_ids"].shape[1] <= 64
        for r in range(batch["input_ids"].shape[0]):
            rows += 1
            ids_row = batch["token_example_ids"][r].tolist()
            cursor = 0
            while cursor < len(ids_row) and ids_row[cursor] != -1:
                example_id = ids_row[cursor]
                item = examples[example_id]
                n = len(item["input_ids"])
                span = slice(cursor, cursor + n)
                assert ids_row[span] == [example_id] * n  # contiguous: never split
                assert batch["input_ids"][r, span].tolist() == item["input_ids"].tolist()
                assert batch["labels"][r, span].tolist() == item["labels"].tolist()
                assert batch["token_weights"][r, span].tolist() == item["token_weights"].tolist()
                assert batch["position_ids"][r, span].tolist() == list(range(n))
                assert batch["labels"][r, cursor] == -100  # not predicted from the previous example
                seen.append(example_id)
                cursor += n
            pad = len(ids_row) - cursor
            assert ids_row[cursor:] == [-1] * pad
            assert batch["labels"][r, cursor:].eq(-100).all() and batch["token_weights"][r, cursor:].eq(0).all()
            assert batch["position_ids"][r, cursor:].tolist() == list(range(pad))
            assert batch["input_ids"][r, cursor:].eq(dm.tokenizer.pad_token_id).all()
    assert sorted(seen) == sorted(examples)  # every example exactly once
    assert rows < len(examples)  # rows really hold several examples
    # sample weights travel per token in packed rows
    assert any(w != 1.0 for item in examples.values() for w in item["token_weights"])


def test_packing_is_train_only_unless_asked(tmp_path):
    dm = packed_dm(tmp_path, val_fraction=0.25)
    assert "attention_mask" in next(iter(dm.val_dataloader()))
    dm = packed_dm(tmp_path, val_fraction=0.25, pack_eval=True)
    assert "attention_mask" not in next(iter(dm.val_dataloader()))


def tiny_llama(attn: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_attention_never_crosses_examples(tmp_path, attn):
    """The proof: hidden states of each packed example equal those of the example run alone."""
    dm = packed_dm(tmp_path)
    examples = {item["example_id"]: item for item in items(dm)}
    batch = SFTCollator(dm.tokenizer.pad_token_id)([dm.dataset("train")[i] for i in range(4)])
    assert (batch["token_example_ids"] == -1).any()  # padding, a pseudo-example of its own, is in the test too
    model = tiny_llama(attn)
    with torch.no_grad():
        packed = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        explicit = model.model(
            input_ids=batch["input_ids"], attention_mask=packed_attention_mask(batch["position_ids"]), position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
        plain_causal = model.model(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
        # each example alone: one row per example, right-padded (causal attention: the padding after an
        # example cannot change its hidden states); one forward instead of one per example length
        order = [e for e in dict.fromkeys(batch["token_example_ids"].flatten().tolist()) if e != -1]
        alone_rows = SFTCollator(0)([examples[e] for e in order])
        alone_all = model.model(input_ids=alone_rows["input_ids"], use_cache=False).last_hidden_state
        checked = crossed = 0
        for r in range(batch["input_ids"].shape[0]):
            for example_id in dict.fromkeys(batch["token_example_ids"][r].tolist()):
                if example_id == -1:
                    continue
                where = batch["token_example_ids"][r] == example_id
                k = order.index(example_id)
                alone = alone_all[k, : len(examples[example_id]["input_ids"])]
                torch.testing.assert_close(packed[r][where], alone, atol=1e-5, rtol=0)
                torch.testing.assert_close(explicit[r][where], alone, atol=1e-5, rtol=0)
                checked += 1
                crossed += not torch.allclose(plain_causal[r][where], alone, atol=1e-5)
    assert checked > 4 and crossed > 0  # several examples per row; without the packing mask they would mix


def test_packed_and_unpacked_batches_give_the_same_token_loss(tmp_path):
    """End to end through `TokenLM.forward` (position_ids handed to the decoder): the same NLL per token."""
    from lightning_tokens import TokenLM

    module = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    module.configure_model()
    module.eval()
    packed_dm_ = packed_dm(tmp_path)
    unpacked = [SFTCollator(0)(items(packed_dm_)[i : i + 8]) for i in range(0, len(items(packed_dm_)), 8)]
    rows = packed_dm_.dataset("train")
    packed = [SFTCollator(0)([rows[i] for i in range(j, min(j + 4, len(rows)))]) for j in range(0, len(rows), 4)]

    def total(batches):
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                n = int((b["labels"][:, 1:] != -100).sum())
                loss_sum += float(module._loss(b)) * n
                count += n
        return loss_sum, count

    (packed_loss, packed_count), (plain_loss, plain_count) = total(packed), total(unpacked)
    assert packed_count == plain_count
    assert packed_loss / packed_count == pytest.approx(plain_loss / plain_count, rel=1e-5)


def test_collator_and_datasets_pickle_for_worker_processes(tmp_path):
    dm = packed_dm(tmp_path)
    dataset = pickle.loads(pickle.dumps(dm.dataset("train")))
    collate = pickle.loads(pickle.dumps(SFTCollator(0)))
    assert collate([dataset[0]])["input_ids"].shape[0] == 1


# ----------------------------------------------------------------------------------------------------
# Shipped example data and training
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, count", [("sft_chat.jsonl", 300), ("sft_prompt_response.jsonl", 200), ("sft_text.jsonl", 100)])
def test_shipped_examples_load(name, count):
    dm = setup_dm(str(EXAMPLES / name), max_length=512, truncation="error", packing=True)
    loaded = items(dm)
    assert len(loaded) == count == len(dm.example_ids)
    unk = dm.tokenizer.unk_token_id
    assert all(unk not in item["input_ids"] for item in loaded)  # every character is in the char vocabulary
    assert all((item["labels"] != -100).any() for item in loaded)
    assert any((item["token_weights"] != 1).any() for item in loaded)  # some weights travel with the data
    assert sum(1 for _ in dm.train_dataloader()) >= 1


def test_shipped_generator_is_deterministic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, make in (("sft_chat.jsonl", module.chat_records), ("sft_prompt_response.jsonl", module.prompt_response_records), ("sft_text.jsonl", module.text_records)):
        lines = (EXAMPLES / name).read_text().splitlines()
        assert [json.loads(line) for line in lines] == make()
    assert sum((EXAMPLES / n).stat().st_size for n in ("sft_chat.jsonl", "sft_prompt_response.jsonl", "sft_text.jsonl")) < 200_000


@pytest.mark.parametrize("packing", [False, True])
def test_tokenlm_trains_on_the_shipped_chats(packing):
    from lightning_tokens import TokenLM

    module = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    dm = SFTDataModule(
        train_file=str(EXAMPLES / "sft_chat.jsonl"), tokenizer=None, max_length=384, packing=packing,
        batch_size=4, eval_batch_size=8, val_fraction=0.05,
    )
    trainer = make_trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert dm.tokenizer is module.tokenizer  # tokenizer=None took the module's
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
