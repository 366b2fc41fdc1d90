"""Fuzzing the SFT data readers (`SFTDataModule` on JSONL / JSON / CSV files, and predict files).

Every generated file either loads, and then yields a training batch with finite, non-negative weights, or
raises the library's own error (:class:`LightningTokensError`) whose message names the file and, for a
record-level problem, the line or index. Any other exception (KeyError, TypeError, UnicodeDecodeError,
json / csv errors, OverflowError, RecursionError, numpy overflow warnings ...) fails the test.

Budgets are small for CI; ``HYPOTHESIS_PROFILE=fuzz`` runs 20 times as many examples (see tests/fuzzing.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from lightning_tokens.core.errors import LightningTokensError, MissingFileError
from lightning_tokens.datamodules import SFTDataError, SFTDataModule
from lightning_tokens.models.tokenizers import build_char_tokenizer
from tests.fuzzing import fuzz

TOKENIZER = build_char_tokenizer()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ---- values: plausible ones, and anything JSON can hold where they are expected --------------------------------
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800"])  # JSON "\ud800" escapes: not text
TEXT = st.one_of(st.text(max_size=8), st.text("ab \n<|>{}\\\"'\t", min_size=1, max_size=8))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e300, 3.5e38, 3.4e38, -0.0, 5e-324, float("nan"), float("inf")]),
    TEXT,
    SURROGATES,
)
ANY_JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3), max_leaves=5)


@st.composite
def maybe(draw, good: st.SearchStrategy, bad_percent: int):
    """Mostly ``good`` values, sometimes (``bad_percent``) any JSON value: wrong types, nulls, huge numbers, NaN ..."""
    return draw(ANY_JSON) if bad_percent and draw(st.integers(0, 99)) < bad_percent else draw(good)


def sometimes(draw, one_in: int, allowed: bool = True) -> bool:
    return allowed and draw(st.integers(0, one_in - 1)) == 0


WEIGHT = st.one_of(st.floats(0, 4), st.integers(0, 3))
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "", "Assistant"])


@st.composite
def spans(draw, length: int, bad: int):
    """``weight_spans`` over a text of ``length`` characters: inside it, or with ``bad`` noise also outside it,
    malformed or of the wrong type."""
    out = []
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, max(0, length - 1)))
        end = draw(st.integers(start + 1, max(start + 1, length)))
        if sometimes(draw, 5, bad > 0):
            start, end = draw(st.integers(-2, length + 2)), draw(st.integers(-2, length + 2))
        span = {"start": draw(maybe(st.just(start), bad)), "end": draw(maybe(st.just(end), bad)), "weight": draw(maybe(WEIGHT, bad))}
        if sometimes(draw, 10, bad > 0):
            del span[draw(st.sampled_from(sorted(span)))]
        out.append(draw(maybe(st.just(span), bad)))
    return draw(maybe(st.just(out), bad))


@st.composite
def message(draw, role: str, bad: int) -> dict:
    if sometimes(draw, 10, bad > 0):
        role = draw(ROLE)
    content = draw(maybe(TEXT.filter(bool) if role == "assistant" else TEXT, bad))
    out = {"role": draw(maybe(st.just(role), bad)), "content": content}
    if sometimes(draw, 3, role == "assistant" or bad > 0):
        out["weight_spans"] = draw(spans(len(content) if isinstance(content, str) else 3, bad))
    if sometimes(draw, 10):
        out["name"] = draw(ANY_JSON if bad else TEXT)
    if sometimes(draw, 20, bad > 0):
        del out[draw(st.sampled_from(["role", "content"]))]
    return out


@st.composite
def records(draw, bad: int) -> dict:
    """One record of a schema with ``id``, ``weight``, ``token_weights`` (often of the right length),
    ``weight_spans``, ``incorrect``, other fields, sometimes; with ``bad`` noise also of no schema, with fields
    missing or of the wrong type."""
    kind = draw(st.sampled_from(["prompt_response", "messages", "text", "none"] if bad else ["prompt_response", "messages", "text"]))
    record: dict = {}
    labelled = 3  # the labelled characters (tokens of the character tokenizer), where known
    if kind == "prompt_response":
        record["prompt"] = draw(maybe(TEXT, bad))
        record["response"] = draw(maybe(TEXT.filter(bool), bad))
        labelled = len(record["response"]) if isinstance(record["response"], str) else 3
        if sometimes(draw, 6):
            record["incorrect"] = draw(maybe(TEXT, bad))
    elif kind == "messages":
        roles = draw(st.sampled_from([["user", "assistant"], ["assistant"], ["system", "user", "assistant"], ["user", "assistant", "user"]]))
        record["messages"] = draw(maybe(st.tuples(*(maybe(message(role, bad), bad) for role in roles)).map(list), bad))
    elif kind == "text":
        record["text"] = draw(maybe(TEXT.filter(bool), bad))
        labelled = len(record["text"]) if isinstance(record["text"], str) else 3
    if record and sometimes(draw, 10, bad > 0):
        del record[draw(st.sampled_from(sorted(record)))]
    if sometimes(draw, 4):
        record["id"] = draw(maybe(st.one_of(st.integers(0, 2**64), TEXT, st.floats(-1e9, 1e9)), bad))
    if sometimes(draw, 4):
        record["weight"] = draw(maybe(WEIGHT, bad))
    if sometimes(draw, 4, kind != "messages" or bad > 0):
        count = draw(st.sampled_from([labelled, labelled + 1] + ([0, 5] if bad else [])))
        record["token_weights"] = draw(maybe(st.lists(maybe(WEIGHT, bad), min_size=count, max_size=count), bad))
    if sometimes(draw, 4, kind != "messages") or sometimes(draw, 20, bad > 0):
        record["weight_spans"] = draw(spans(labelled, bad))
    if sometimes(draw, 10):
        record["extra " + draw(TEXT)] = draw(ANY_JSON if bad else TEXT)
    return record


# ---- files -------------------------------------------------------------------------------------------------------
def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # an unpaired surrogate becomes invalid UTF-8 bytes


def _csv_cell(value) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else repr(value)


@st.composite
def serialized(draw, bad: int) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a list of records written as JSONL, a JSON array or CSV."""
    rows = draw(st.lists(records(bad), min_size=0 if sometimes(draw, 20, bad > 0) else 1, max_size=3))
    if not bad:  # unique ids
        for i, row in enumerate(rows):
            if "id" in row:
                row["id"] = f"{row['id']}#{i}"
    ext = draw(st.sampled_from(["jsonl", "json", "csv"]))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    if ext == "csv":
        columns = list(dict.fromkeys(key for row in rows for key in row)) or ["prompt", "response"]
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL] + ([csv.QUOTE_NONE] if bad else [])))
        escape = "\\" if quoting == csv.QUOTE_NONE else None  # QUOTE_NONE escapes commas, which the reader keeps
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, quoting=quoting, escapechar=escape, lineterminator=newline)
        writer.writerow(columns)
        for row in rows:
            cells = [_csv_cell(row[c]) if c in row else "" for c in columns]
            try:
                writer.writerow(cells)
            except csv.Error:  # QUOTE_NONE cannot write a row of one empty cell
                buffer.write('""' + newline)
        return ext, _encode(buffer.getvalue())
    ascii_only = draw(st.booleans())
    if ext == "json" and draw(st.booleans()):
        return ext, _encode(json.dumps(rows, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 1]))))
    lines = [json.dumps(row, ensure_ascii=ascii_only) for row in rows]
    if lines and sometimes(draw, 4):
        junk = ["", "  "] + (["[1]", '"a string"', "null", "{"] if bad else [])
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(junk)))
    return ext, _encode(newline.join(lines) + newline)


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """A serialized file: clean (values of the right types, maybe an option makes it fail), noisy (wrong values,
    missing fields), or damaged: cut at a byte, bytes inserted, a byte-order mark prepended."""
    bad = draw(st.sampled_from([0, 0, 0, 5, 12]))
    ext, data = draw(serialized(bad))
    how = draw(st.sampled_from(["none"] * 10 + ["truncate", "truncate", "insert", "bom"])) if bad else "none"
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "insert":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.one_of(st.binary(min_size=1, max_size=3), st.sampled_from([b"\xff", b"\x00", b"\xc3", b"\xed\xa0\x80", b'"', b"\r"])))
        data = data[:at] + junk + data[at:]
    elif how == "bom":
        data = b"\xef\xbb\xbf" + data
    return ext, data


JSONISH = st.text('{}[]",:0123456789.-+eEtrufalsnNI\\ \n\r\x00é\u2028', max_size=60)
CSV_CELL = st.text('ab,"\n\r\x00\\ [{}]1é', max_size=8)
HEADERS = st.sampled_from(["prompt", "response", "text", "messages", "id", "weight", "token_weights", "weight_spans", "incorrect", "", "x"])


@st.composite
def raw_files(draw) -> tuple[str, bytes]:
    """Files not written by a serializer: random bytes, JSON-like text, hand-joined (malformed) CSV."""
    kind = draw(st.sampled_from(["bytes", "jsonish", "csv"]))
    if kind == "bytes":
        return draw(st.sampled_from(["jsonl", "json", "csv"])), draw(st.binary(max_size=120))
    if kind == "jsonish":
        return draw(st.sampled_from(["jsonl", "json"])), _encode(draw(JSONISH))
    header = draw(st.lists(HEADERS, min_size=0, max_size=4))
    rows = draw(st.lists(st.lists(CSV_CELL, max_size=5), max_size=4))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = sep.join(",".join(row) for row in [header, *rows])
    return "csv", _encode(text)


OPTIONS = st.fixed_dictionaries({
    "max_length": st.sampled_from([2, 5, 64, 1024, 1024, 1024]),
    "truncation": st.sampled_from(["error", "drop", "truncate_left", "truncate_right"]),
    "packing": st.booleans(),
    "add_eos": st.booleans(),
    "schema": st.sampled_from(["auto"] * 7 + ["prompt_response", "messages", "text"]),
    "chat_template": st.sampled_from([None, None, CHATML]),
    "val_fraction": st.sampled_from([0.0, 0.0, 0.0, 0.5]),
})


# ---- the property ------------------------------------------------------------------------------------------------
def _write(directory, ext: str, data: bytes) -> str:
    path = os.path.join(str(directory), f"fuzz.{ext}")
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def _assert_names_the_place(error: LightningTokensError, path: str, data: bytes) -> None:
    message = str(error)
    assert path in message, f"the message does not name the file: {message}"
    if not isinstance(error, SFTDataError):
        return
    found = re.search(re.escape(path) + r", (line|index) (\d+)", message)
    if found is None:  # only a whole-file parse failure has no line to name
        assert re.match(re.escape(path) + r": invalid JSON", message), f"no line or index named: {message}"
        return
    number = int(found.group(2))
    if found.group(1) == "line":
        assert 1 <= number <= data.count(b"\n") + data.count(b"\r") + 1, message
    else:
        assert 0 <= number < max(1, len(data)), message


def _kind(error: Exception) -> str:
    """The kind of an error message, without file, line and values (for the statistics)."""
    text = re.sub(r"^.*?(, (line|index) \d+)?(, field '[^']*')?: ", "", str(error), count=1)
    return re.sub(r"[(\d].*", "", text)[:50]


def _check_train_file(directory, ext: str, data: bytes, options: dict) -> None:
    path = _write(directory, ext, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dropped or cut examples are reported as warnings
            warnings.simplefilter("error", RuntimeWarning)  # e.g. numpy overflow into inf weights
            dm = SFTDataModule(train_file=path, tokenizer=TOKENIZER, batch_size=2, **options)
            dm.setup("fit")
            batch = next(iter(dm.train_dataloader()))
    except LightningTokensError as error:
        _assert_names_the_place(error, path, data)
        event(f"{type(error).__name__}: {_kind(error)}")  # pytest --hypothesis-show-statistics
        return
    event("loaded")
    weights = batch["token_weights"]
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (batch["labels"] != -100).any()
    assert batch["input_ids"].shape == batch["labels"].shape == weights.shape


@fuzz(200)
@given(file=mutated(), options=OPTIONS)
def test_structured_records_load_or_raise_a_named_error(tmp_path_factory, file, options):
    _check_train_file(tmp_path_factory.getbasetemp(), *file, options)


@fuzz(150)
@given(file=raw_files(), options=OPTIONS)
def test_raw_bytes_load_or_raise_a_named_error(tmp_path_factory, file, options):
    _check_train_file(tmp_path_factory.getbasetemp(), *file, options)


@fuzz(80)
@given(file=st.one_of(mutated(), raw_files(), st.tuples(st.just("txt"), st.binary(max_size=60))), chat_template=st.sampled_from([None, CHATML]))
def test_predict_files_load_or_raise_a_named_error(tmp_path_factory, file, chat_template):
    ext, data = file
    train = _write(tmp_path_factory.getbasetemp(), "jsonl", b'{"prompt": "a", "response": "b"}\n')
    path = os.path.join(str(tmp_path_factory.getbasetemp()), f"predict.{ext}")
    with open(path, "wb") as handle:
        handle.write(data)
    dm = SFTDataModule(train_file=train, predict_file=path, tokenizer=TOKENIZER, chat_template=chat_template, max_length=16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dm.setup("predict")
            batch = next(iter(dm.predict_dataloader()))
    except LightningTokensError as error:
        _assert_names_the_place(error, path, data)
        return
    assert batch["prompt_input_ids"].shape[0] >= 1


def test_the_errors_found_by_fuzzing(tmp_path):
    """The inputs that used to escape as other exceptions, each now an SFTDataError naming file, line and field."""
    cases = {
        "utf8.jsonl": (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "\xff"}\n', "line 2: not UTF-8"),
        "deep.jsonl": (b'{"prompt": "a", "response": "b", "x": ' + b"[" * 100_000 + b"}\n", "line 1: invalid JSON (arrays or objects are nested too deeply)"),
        "digits.jsonl": (b'{"prompt": "a", "response": "b", "x": ' + b"1" * 5000 + b"}\n", "line 1: invalid JSON (an integer has too many digits)"),
        "overflow.jsonl": (b'{"prompt": "a", "response": "b", "weight": 1' + b"0" * 400 + b"}\n", "line 1, field 'weight': weights must be finite"),
        "float32.jsonl": (b'{"prompt": "a", "response": "b", "token_weights": [1e300, 1]}\n', "line 1, field 'token_weights[0]': weights must be at most"),
        "product.jsonl": (b'{"prompt": "a", "response": "b", "weight": 1e30, "token_weights": [1e30, 1]}\n', "line 1, field 'weight': weight x weight_spans x token_weights exceeds"),
        "surrogate.jsonl": (b'{"prompt": "a", "response": "\\ud800"}\n', "line 1, field 'response': holds an unpaired UTF-16 surrogate"),
        "chat.jsonl": (b'{"messages": [{"role": "assistant", "content": "x\\udfff"}]}\n', "line 1, field 'messages[0].content': holds an unpaired"),
        "long.csv": (b'prompt,response\na,"' + b"b" * 140_000 + b'"\n', "line 2: unreadable CSV: field larger than field limit"),
        "id.csv": (b"id,prompt,response\n" + b"1" * 5000 + b",a,b\n", "line 2, field 'id': an integer id of 5000 digits is too long"),
        "cell.csv": (b"prompt,response,token_weights\na,b," + b"[" * 100_000 + b"\n", "line 2, field 'token_weights': invalid JSON in the CSV cell"),
    }
    for name, (data, expected) in cases.items():
        path = _write(tmp_path, name.split(".")[1], data)
        with pytest.raises(SFTDataError) as info:
            SFTDataModule(train_file=path, tokenizer=TOKENIZER).setup("fit")
        assert f"{path}, {expected}" in str(info.value), (name, str(info.value))
    text = _write(tmp_path, "jsonl", b'{"text": "a"}\n')  # one token and no eos: nothing is left to learn
    with pytest.raises(LightningTokensError, match="no example is left") as info, pytest.warns(UserWarning, match="no labelled"):
        SFTDataModule(train_file=text, tokenizer=TOKENIZER, add_eos=False).setup("fit")
    assert text in str(info.value)
    missing = os.path.join(str(tmp_path), "absent.jsonl")
    with pytest.raises(MissingFileError, match="does not exist") as info:
        SFTDataModule(train_file=missing, tokenizer=TOKENIZER).setup("fit")
    assert isinstance(info.value, FileNotFoundError) and missing in str(info.value)
