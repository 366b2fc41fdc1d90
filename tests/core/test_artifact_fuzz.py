"""Fuzzing the readers of the offline artifacts (safetensors files): reference scores
(:func:`load_reference_scores`), STAR scores (:func:`load_star_scores`) and WHP generic targets
(:func:`load_generic_targets`).

Every generated file either loads, into values the lookups then use without error, or raises a
:class:`DataError` that names the file; a missing file is a :class:`MissingFileError`. Inputs: random bytes,
valid files cut at a byte or with bytes changed, hand-written headers (unknown dtypes, bad offsets and
shapes, non-string metadata), and valid files with wrong tensor names, dtypes, shapes, values and metadata.

Budgets are small for CI; ``HYPOTHESIS_PROFILE=fuzz`` runs 20 times as many examples (see tests/fuzzing.py).
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import save, save_file

from lightning_tokens.callbacks.safety_shaping.scores import STAR_FORMAT, load_star_scores, save_star_scores
from lightning_tokens.callbacks.unlearning.targets_file import (
    FILE_FORMAT,
    GenericTargets,
    load_generic_targets,
    lookup_generic_targets,
    save_generic_targets,
)
from lightning_tokens.core.errors import DataError, LightningTokensError, MissingFileError
from lightning_tokens.core.reference_scores import REFERENCE_FORMAT, load_reference_scores, lookup_reference_nll, save_reference_scores
from tests.fuzzing import fuzz

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.int64, torch.int32,
          torch.int16, torch.uint8, torch.uint16, torch.uint64, torch.bool, torch.complex64]
TEXT = st.text(max_size=12)
FORMATS = st.sampled_from([REFERENCE_FORMAT, STAR_FORMAT, FILE_FORMAT])


def _tensor(draw, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` holding small, negative, huge or non-finite values."""
    values = draw(st.lists(
        st.one_of(st.integers(-200, 200), st.sampled_from([-100, 0, 1, 2**31, float("nan"), float("inf"), -1.5, 0.25])),
        min_size=1, max_size=4,
    ))
    flat = torch.tensor([values[i % len(values)] for i in range(int(torch.Size(shape).numel()))], dtype=torch.float64)
    return flat.reshape(shape).to(dtype)


@st.composite
def metadata(draw, fmt: str, soft: bool = False) -> dict[str, str]:
    meta = {"format": fmt, "version": "1"}
    if fmt == STAR_FORMAT:
        meta.update(chunk_size="5", chunk_prefix="chunk_end")
    if fmt == FILE_FORMAT:
        meta["targets"] = "soft" if soft else "hard"
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # changed, removed or added entries
        key = draw(st.sampled_from(["format", "version", "chunk_size", "chunk_prefix", "targets", "other"]))
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = draw(st.one_of(TEXT, FORMATS, st.sampled_from(["0", "-3", "1e3", "99999999999", "chunk_start", "soft", "hard"])))
    return meta


@st.composite
def score_files(draw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reference or STAR score files: ``{example id: (n,) float}``, names, dtypes, shapes sometimes wrong."""
    tensors = {}
    for _ in range(draw(st.integers(0, 3))):
        good = draw(st.integers(0, 3)) > 0
        name = str(draw(st.integers(0, 2**63 - 1))) if good else draw(st.one_of(
            st.integers(-(2**64), 2**64).map(str), st.sampled_from(["07", "7", "x", "1.5", " 1", "", "٣"]), TEXT
        ))
        good = good and draw(st.integers(0, 3)) > 0
        shape = (draw(st.integers(0, 6)),) if good else tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        tensors[name] = _tensor(draw, shape, torch.float32 if good else draw(st.sampled_from(DTYPES)))
    fmt = draw(st.sampled_from([REFERENCE_FORMAT, STAR_FORMAT])) if draw(st.integers(0, 4)) else draw(FORMATS)
    return tensors, draw(metadata(fmt))


@st.composite
def target_files(draw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Generic-targets files: ``{"<id>.input_ids", "<id>.labels"[, "<id>.topk_ids", "<id>.topk_probs"]}``, with
    tensors sometimes missing, renamed, of the wrong dtype or shape, holding negative ids or bad probabilities."""
    soft = draw(st.booleans())
    k = draw(st.integers(1, 3))
    tensors: dict[str, torch.Tensor] = {}
    for key in draw(st.lists(st.integers(0, 2**63 - 1), max_size=3, unique=True)):
        n = draw(st.integers(0, 5))
        parts = {
            "input_ids": (torch.int32, (n,)),
            "labels": (torch.int64, (n,)),
            **({"topk_ids": (torch.int32, (n, k)), "topk_probs": (torch.float32, (n, k))} if soft else {}),
        }
        for part, (dtype, shape) in parts.items():
            change = draw(st.sampled_from(["none"] * 24 + ["drop", "rename", "dtype", "shape"]))
            if change == "drop":
                continue
            if change == "dtype":
                dtype = draw(st.sampled_from(DTYPES))
            if change == "shape":
                shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
            name = f"{key}.{part}" if change != "rename" else draw(st.sampled_from([f"{key}", f"{key}.other", f"x.{part}", f"{key}.{part}.1", f"-{key}.{part}"]))
            if part == "topk_probs" and change == "none" and draw(st.booleans()):
                tensors[name] = torch.rand(shape)
            elif part in ("topk_ids", "input_ids") and change == "none" and draw(st.booleans()):
                tensors[name] = torch.randint(0, 50, shape, dtype=dtype)
            elif part == "labels" and change == "none" and draw(st.booleans()):
                tensors[name] = torch.where(torch.rand(shape) < 0.3, -100, torch.randint(0, 50, shape))
            else:
                tensors[name] = _tensor(draw, shape, dtype)
    fmt = FILE_FORMAT if draw(st.integers(0, 4)) else draw(FORMATS)
    return tensors, draw(metadata(fmt, soft))


def _header_file(draw) -> bytes:
    """A hand-written safetensors file: header length, JSON header (any dtype string, shape, offsets, metadata), data."""
    header: dict = {}
    for name in draw(st.lists(st.sampled_from(["0", "1", "2.labels", "2.input_ids", "x"]), max_size=3, unique=True)):
        header[name] = {
            "dtype": draw(st.sampled_from(["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F8_E4M3", "U64", "C64", "F4", "XYZ", ""])),
            "shape": draw(st.lists(st.integers(-1, 4), max_size=3) | st.just("3")),
            "data_offsets": draw(st.lists(st.integers(-1, 40), min_size=0, max_size=3)),
        }
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(
            st.dictionaries(TEXT, TEXT, max_size=2),
            st.just({"format": REFERENCE_FORMAT, "n": 3}),
            st.just([1, 2]),
            st.just(None),
        ))
    text = json.dumps(header).encode() if draw(st.integers(0, 5)) else draw(st.binary(max_size=20))
    size = len(text) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", size) + text + draw(st.binary(max_size=48))


@st.composite
def files(draw) -> bytes:
    """The bytes of a file to read: structured artifacts (maybe damaged), hand-written headers, random bytes."""
    kind = draw(st.sampled_from(["scores"] * 3 + ["targets"] * 3 + ["header"] * 2 + ["bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "header":
        return _header_file(draw)
    tensors, meta = draw(score_files() if kind == "scores" else target_files())
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    how = draw(st.sampled_from(["none"] * 6 + ["truncate", "flip", "append"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "flip":
        at = draw(st.integers(0, max(0, len(data) - 1)))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=8))
    return data


def _use_scores(scores: dict[int, torch.Tensor], path: str) -> None:
    """Look up every loaded example as a batch would (rows of one example each)."""
    for key, values in scores.items():
        assert values.dtype == torch.float32 and values.dim() == 1
        n = values.numel()
        if n == 0 or not -(2**63) <= key < 2**63:
            continue
        batch = {"labels": torch.zeros(1, n, dtype=torch.long), "example_id": torch.tensor([key]), "attention_mask": torch.ones(1, n, dtype=torch.long)}
        assert lookup_reference_nll(scores, batch, path).shape == (1, n)


def _use_targets(targets: dict[int, GenericTargets], path: str) -> None:
    soft = bool(targets) and next(iter(targets.values())).topk_ids is not None
    for key, t in targets.items():
        n = t.input_ids.numel()
        if n == 0:
            continue
        batch = {"input_ids": t.input_ids[None], "labels": t.input_ids[None], "example_id": torch.tensor([key])}
        labels, ids, probs = lookup_generic_targets(targets, batch, soft=soft, source=path)
        assert labels.shape == (1, n) and (ids is None) == (not soft)


def _load_all(path: str) -> None:
    """Each loader loads the file (and its values serve a lookup) or raises a DataError naming the file."""
    for name, load, use in (
        ("reference", load_reference_scores, _use_scores),
        ("star", lambda p: load_star_scores(p)[0], _use_scores),
        ("targets", lambda p: load_generic_targets(p)[0], _use_targets),
    ):
        try:
            loaded = load(path)
        except DataError as error:
            assert path in str(error), f"the message does not name the file: {error}"
            event(f"{name}: DataError: {str(error).replace(path, '')[:40]}")
            continue
        except LightningTokensError as error:  # another of the library's errors is still wrong here
            raise AssertionError(f"{name}: expected a DataError, got {type(error).__name__}: {error}") from error
        event(f"{name}: loaded")
        use(loaded, path)


@fuzz(300)
@given(data=files())
def test_artifact_files_load_or_raise_a_data_error(tmp_path_factory, data):
    path = os.path.join(str(tmp_path_factory.getbasetemp()), "artifact.safetensors")
    with open(path, "wb") as handle:
        handle.write(data)
    _load_all(path)


def test_missing_artifacts_raise_missing_file_error(tmp_path):
    path = str(tmp_path / "absent.safetensors")
    for load in (load_reference_scores, load_star_scores, load_generic_targets):
        with pytest.raises(MissingFileError, match="does not exist") as info:
            load(path)
        assert path in str(info.value) and isinstance(info.value, FileNotFoundError)


def test_the_errors_found_by_fuzzing(tmp_path):
    """Inputs that used to escape as other exceptions (or load into values that fail later), now DataErrors."""
    path = str(tmp_path / "a.safetensors")

    def raises(load, match: str) -> None:
        with pytest.raises(DataError, match=match) as info:
            load(path)
        assert path in str(info.value)

    with open(path, "wb") as handle:  # not safetensors: SafetensorError
        handle.write(b"\x00" * 3)
    for load in (load_reference_scores, load_star_scores, load_generic_targets):
        raises(load, "is not a readable safetensors file")
    save_file({"x": torch.zeros(2)}, path)  # a name that is no example id: ValueError from int()
    raises(load_reference_scores, "tensor 'x': the name must be an example id")
    save_file({"3": torch.zeros(2, 2)}, path)  # 2-D scores: a RuntimeError at lookup
    raises(load_reference_scores, "tensor '3': expected a 1-D floating-point tensor")
    save_reference_scores(path, {3: torch.zeros(2)})
    raises(load_star_scores, "metadata 'format': is not a STAR score file")
    save_star_scores(path, {3: torch.zeros(2)}, 5, "chunk_end")
    raises(load_reference_scores, "is not a reference scores file")
    save_file({"3": torch.zeros(2)}, path, metadata={"format": STAR_FORMAT, "chunk_size": "five"})  # int() in the callback
    raises(load_star_scores, "metadata 'chunk_size': expected a positive integer")
    save_file({"3": torch.zeros(2)}, path, metadata={"format": FILE_FORMAT})  # KeyError / ValueError before
    raises(load_generic_targets, "tensor '3': expected a name '<example id>.<field>'")
    save_file({"3.input_ids": torch.zeros(2, dtype=torch.int32)}, path, metadata={"format": FILE_FORMAT})  # KeyError
    raises(load_generic_targets, "tensor '3.labels': missing")
    save_file({"3.input_ids": torch.zeros(2, dtype=torch.int32), "3.labels": torch.zeros(3, dtype=torch.int64)}, path,
              metadata={"format": FILE_FORMAT})  # a shape mismatch: IndexError / RuntimeError at lookup
    raises(load_generic_targets, r"tensor '3.labels': expected shape \(2,\)")
    targets = {3: GenericTargets(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), 2.0))}
    save_generic_targets(path, targets)  # probabilities above 1
    raises(load_generic_targets, "topk_probs': probabilities must lie in")
    save_file({"3.input_ids": torch.zeros(2)}, path, metadata={"format": "lightning_tokens.reference_scores"})
    raises(load_generic_targets, "metadata 'format': is not a generic-targets file")
