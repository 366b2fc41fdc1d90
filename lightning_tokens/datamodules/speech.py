"""Speech manifests (JSONL) as batches of padded audio, for speech tokenizers and speech-as-tokens models.

A manifest holds one JSON object a line::

    {"id": "utt00002", "audio": "wavs/utt00002.wav", "text": "fourteen", "task": "sqa",
     "question": "what comes before fifteen", "speaker": "espeak:en-us", "speed": 1.0}

- ``audio`` (required): a sound file, relative to the manifest's folder (or absolute).
- ``text`` (required, non-empty): the transcript (``asr``, ``tts``) or the answer (``sqa``).
- ``task``: one of :data:`SPEECH_TASKS` (default ``asr``).
- ``id`` (default ``<manifest name>:<line>``), ``question`` (the spoken question's text), ``speaker``,
  ``speed``: passed through.
- ``speech_tokens``: precomputed token ids of the audio (a list of non-negative ints).

Batches (the contract the speech modules read)::

    {"audio": FloatTensor (B, S) zero-padded, "audio_lengths": LongTensor (B,), "text": list[str],
     "task": list[str], "ids": list[str], "question": list[str | None]}
    + "speech_tokens": list[LongTensor] when every record of the batch has them

Training batches group utterances of similar length (fewer padded samples): the epoch's shuffled order is
cut into buckets of ``50 × batch_size``, each sorted by duration and cut into batches, and the batches are
shuffled; the order depends only on ``(seed, epoch)``.

Example:
    >>> batch = collate_speech([
    ...     {"audio": torch.ones(3), "text": "one", "task": "asr", "id": "a", "question": None},
    ...     {"audio": torch.ones(5), "text": "two", "task": "asr", "id": "b", "question": None}])
    >>> batch["audio"].shape, batch["audio_lengths"].tolist()
    (torch.Size([2, 5]), [3, 5])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.datamodules.sampling import ResumableDataMixin, ResumableShuffleSampler

__all__ = [
    "SPEECH_TASKS",
    "LengthBucketBatchSampler",
    "SpeechDataModule",
    "SpeechDataset",
    "audio_duration",
    "collate_speech",
    "load_audio",
    "read_speech_manifest",
]

#: The tasks of DualSpeechLM (its ``task2id``): speech recognition, text-to-speech, voice conversion,
#: text-to-speech translation, speech continuation, spoken QA, speech-to-text translation, emotion.
SPEECH_TASKS: tuple[str, ...] = ("asr", "tts", "vc", "t2st", "sc", "sqa", "s2tt", "ser")
_BUCKET_BATCHES = 50  # a bucket holds this many batches


def _sound_error(path: Path, error: Exception) -> DataError:
    return DataError(f"{path}: not a readable sound file ({error}); use WAV, FLAC or OGG.")


def audio_duration(path: str | os.PathLike[str]) -> float:
    """Seconds of audio in a sound file, from its header.

    Example::

        audio_duration("data/speech/wavs/utt00000.wav")   # 1.52
    """
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError) as error:  # soundfile raises LibsndfileError, a RuntimeError
        raise _sound_error(Path(path), error) from error
    return info.frames / info.samplerate


def load_audio(path: str | os.PathLike[str], sample_rate: int, mix_to_mono: bool = False) -> Tensor:
    """A mono sound file as a float tensor ``(S,)`` at ``sample_rate`` Hz (polyphase resampling).

    Args:
        path: the sound file.
        sample_rate: the rate to return.
        mix_to_mono: average the channels of a multi-channel file (otherwise such a file is an error).

    Example::

        load_audio("speech_22050hz.wav", 16000).shape   # 1 s of audio: torch.Size([16000])
    """
    import soundfile

    from lightning_tokens.datamodules.speech_synthesis import resample

    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"audio file {str(file)!r} does not exist.")
    try:
        audio, rate = soundfile.read(str(file), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as error:
        raise _sound_error(file, error) from error
    if audio.shape[1] > 1:
        if not mix_to_mono:
            raise DataError(
                f"{file}: {audio.shape[1]} channels, but speech is read as mono: set mix_to_mono: true "
                "(averages the channels) or convert the file to one channel."
            )
        audio = audio.mean(axis=1, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(resample(audio[:, 0], int(rate), sample_rate)))


def _field_error(path: Path, line: int, field: str, problem: str) -> DataError:
    return DataError(f"{path}, line {line}, field {field!r}: {problem}")


def _check_tokens(path: Path, line: int, tokens: Any) -> list[int]:
    valid = isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
    if not valid:
        shown = repr(tokens) if len(repr(tokens)) < 80 else repr(tokens)[:77] + "..."
        raise _field_error(path, line, "speech_tokens", f"must be a list of non-negative integers, got {shown}.")
    return tokens


def _parse_record(path: Path, line: int, raw: str) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {line}: malformed JSON ({error.msg} at column {error.colno}); write one JSON object a line.") from error
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {line}: expected a JSON object with 'audio' and 'text', got {type(record).__name__}.")
    audio = record.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise _field_error(path, line, "audio", "missing: give the sound file's path (relative to the manifest's folder).")
    file = Path(audio) if Path(audio).is_absolute() else path.parent / audio
    if not file.is_file():
        raise _field_error(path, line, "audio", f"{str(file)!r} does not exist (paths are relative to {str(path.parent)!r}).")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _field_error(path, line, "text", "missing or empty: give the transcript (asr, tts) or the answer (sqa).")
    task = record.get("task", "asr")
    if task not in SPEECH_TASKS:
        raise _field_error(path, line, "task", f"unknown task {task!r}: use one of {list(SPEECH_TASKS)}.")
    question = record.get("question")
    if question is not None and not isinstance(question, str):
        raise _field_error(path, line, "question", f"must be a string or null, got {type(question).__name__}.")
    parsed = {
        **record,
        "id": str(record.get("id", f"{path.stem}:{line}")),
        "audio": str(file),
        "text": text,
        "task": task,
        "question": question,
        "source": f"{path}, line {line}",
    }
    if "speech_tokens" in record:
        parsed["speech_tokens"] = _check_tokens(path, line, record["speech_tokens"])
    return parsed


def read_speech_manifest(path: str | os.PathLike[str], tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The validated records of a JSONL speech manifest, keeping those whose task is in ``tasks``.

    Each record gets its ``audio`` as a resolved path, default ``id`` (``<name>:<line>``), ``task``
    (``asr``) and ``question`` (``None``), and ``source`` (``"<file>, line <n>"``, for later messages).
    Blank lines are skipped.

    Raises:
        DataError: naming the file, the line and the field: malformed JSON, a missing or nonexistent
            ``audio``, an empty ``text``, an unknown ``task``, ``speech_tokens`` that are not a list of
            non-negative integers, or no records left.

    Example::

        records = read_speech_manifest("data/speech/train.jsonl", tasks=["asr"])
        records[0]["text"]   # 'the old horse jumps on the table'
    """
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"speech manifest {str(file)!r} does not exist.")
    if tasks is not None:
        for task in tasks:
            if task not in SPEECH_TASKS:
                raise ConfigError(f"tasks=[..., {task!r}]: unknown task; use some of {list(SPEECH_TASKS)}.")
    records: list[dict[str, Any]] = []
    with file.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = _parse_record(file, number, raw)
            if tasks is None or record["task"] in tasks:
                records.append(record)
    if not records:
        wanted = f" with tasks {list(tasks)}" if tasks is not None else ""
        raise DataError(f"{file}: no records{wanted}; each line needs a JSON object with 'audio' and 'text'.")
    return records


class SpeechDataset(Dataset):
    """Records of a manifest as items ``{"audio": (S,), "text", "task", "id", "question"}`` (plus
    ``"speech_tokens"`` when the record has them), audio read and resampled on access."""

    def __init__(self, records: Sequence[dict[str, Any]], sample_rate: int, mix_to_mono: bool = False) -> None:
        self.records = list(records)
        self.sample_rate, self.mix_to_mono = sample_rate, mix_to_mono

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item = {
            "audio": load_audio(record["audio"], self.sample_rate, self.mix_to_mono),
            "text": record["text"],
            "task": record["task"],
            "id": record["id"],
            "question": record["question"],
        }
        if "speech_tokens" in record:
            item["speech_tokens"] = torch.tensor(record["speech_tokens"], dtype=torch.long)
        return item


def collate_speech(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items of :class:`SpeechDataset` as one batch: audio zero-padded to the longest, with its lengths;
    ``speech_tokens`` (a list of tensors) only when every item has them."""
    lengths = torch.tensor([len(item["audio"]) for item in items], dtype=torch.long)
    audio = torch.zeros(len(items), int(lengths.max()) if len(items) else 0)
    for row, item in enumerate(items):
        audio[row, : len(item["audio"])] = item["audio"]
    batch: dict[str, Any] = {
        "audio": audio,
        "audio_lengths": lengths,
        "text": [item["text"] for item in items],
        "task": [item["task"] for item in items],
        "ids": [item["id"] for item in items],
        "question": [item.get("question") for item in items],
    }
    if items and all("speech_tokens" in item for item in items):
        batch["speech_tokens"] = [item["speech_tokens"] for item in items]
    return batch


class LengthBucketBatchSampler(BatchSampler):
    """Batches of similar-length items: ``sampler``'s order is cut into buckets of ``bucket_size``
    items, each bucket sorted by ``lengths`` and cut into batches, and the batches are shuffled with
    ``(seed, epoch)``.

    Every index of ``sampler`` appears once per epoch. The epoch is the sampler's (Lightning sets it on
    ``batch_sampler.sampler``; :meth:`set_epoch` forwards to it), so a distributed sampler that Lightning
    injects through the ``sampler`` argument keeps working.

    Args:
        sampler: the epoch's order of indices (e.g. :class:`ResumableShuffleSampler`).
        batch_size: items per batch.
        drop_last: drop the last, smaller batch.
        lengths: a length per dataset index (e.g. seconds of audio).
        bucket_size: items per bucket (default ``50 × batch_size``; rounded up to a multiple of it).
        seed: seed of the batch order.

    Example:
        >>> sampler = LengthBucketBatchSampler(range(6), 2, lengths=[5, 1, 4, 2, 6, 3])
        >>> sorted(sorted(batch) for batch in sampler)
        [[0, 4], [1, 3], [2, 5]]
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        lengths: Sequence[float] = (),
        bucket_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"LengthBucketBatchSampler(batch_size={batch_size}): must be a positive integer.")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.lengths = [float(v) for v in lengths]
        size = bucket_size or _BUCKET_BATCHES * batch_size
        self.bucket_size = math.ceil(size / batch_size) * batch_size  # only the last bucket ends in a partial batch
        self.seed = seed
        self._epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches to skip)

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (forwarded to the sampler when it has ``set_epoch``)."""
        self._epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def skip_in_epoch(self, epoch: int, batches: int) -> None:
        """Skip the first ``batches`` batches of ``epoch``, once (an exact mid-epoch resume)."""
        self._skip = (epoch, batches)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order."""
        order = list(iter(self.sampler))
        batches: list[list[int]] = []
        for start in range(0, len(order), self.bucket_size):
            bucket = sorted(order[start : start + self.bucket_size], key=lambda i: self.lengths[i])
            batches += [bucket[i : i + self.batch_size] for i in range(0, len(bucket), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 1)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = min(self._skip[1], len(batches))
        self._skip = None
        return iter(batches[start:])

    def __len__(self) -> int:
        count = len(self.sampler)  # type: ignore[arg-type]
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)


class SpeechDataModule(ResumableDataMixin, pl.LightningDataModule):
    """Speech manifests (JSONL, see the module) as padded audio batches.

    Features:
        - Records validated on setup (errors name the file, line and field); audio longer than
          ``max_seconds`` is an error naming the file and its duration.
        - Training batches bucketed by length (``bucket_by_length``), order fixed by ``(seed, epoch)``,
          resumable mid-epoch; validation, test and prediction in manifest order.
        - Audio resampled to ``sample_rate``; multi-channel files averaged with ``mix_to_mono``.

    Args:
        train_file: the training manifest.
        val_file: the validation manifest (optional).
        test_file: the test manifest (optional).
        sample_rate: sample rate of the batches' audio.
        tasks: keep only records of these tasks (default: all).
        batch_size: utterances per batch.
        bucket_by_length: group training utterances of similar length (otherwise plain shuffling).
        max_seconds: longest audio accepted (``None``: any).
        mix_to_mono: average the channels of multi-channel files (otherwise they are an error).
        require_speech_tokens: every record must carry ``speech_tokens``.
        seed: seed of the training order.
        num_workers: data-loader workers.

    Example::

        data = SpeechDataModule("data/speech/train.jsonl", "data/speech/val.jsonl", batch_size=16)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))   # batch["audio"]: (16, S)
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        sample_rate: int = 16000,
        tasks: list[str] | None = None,
        batch_size: int = 8,
        bucket_by_length: bool = True,
        max_seconds: float | None = 20.0,
        mix_to_mono: bool = False,
        require_speech_tokens: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (("sample_rate", sample_rate), ("batch_size", batch_size)):
            if value <= 0:
                raise ConfigError(f"{owner}({name}={value}): must be a positive integer.")
        if max_seconds is not None and max_seconds <= 0:
            raise ConfigError(f"{owner}(max_seconds={max_seconds}): must be > 0, or null for no limit.")
        if num_workers < 0:
            raise ConfigError(f"{owner}(num_workers={num_workers}): must be >= 0.")
        for task in tasks or []:
            if task not in SPEECH_TASKS:
                raise ConfigError(f"{owner}(tasks=[..., {task!r}]): unknown task; use some of {list(SPEECH_TASKS)}.")
        self.save_hyperparameters()
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.sample_rate, self.tasks, self.batch_size = sample_rate, tasks, batch_size
        self.bucket_by_length, self.max_seconds = bucket_by_length, max_seconds
        self.mix_to_mono, self.require_speech_tokens = mix_to_mono, require_speech_tokens
        self.seed, self.num_workers = seed, num_workers
        self.datasets: dict[str, SpeechDataset] = {}
        self.durations: dict[str, list[float]] = {}

    def _load_split(self, split: str) -> None:
        if split in self.datasets or self.files[split] is None:
            return
        records = read_speech_manifest(self.files[split], self.tasks)  # type: ignore[arg-type]
        durations = []
        for record in records:
            if self.require_speech_tokens and "speech_tokens" not in record:
                raise DataError(
                    f"{record['source']}, field 'speech_tokens': missing, and require_speech_tokens is true: "
                    "tokenize the audio first, or set require_speech_tokens: false."
                )
            seconds = audio_duration(record["audio"])
            if self.max_seconds is not None and seconds > self.max_seconds:
                raise DataError(
                    f"{record['audio']} ({record['source']}): {seconds:.2f} s of audio, longer than max_seconds="
                    f"{self.max_seconds}: cut the file or raise max_seconds."
                )
            durations.append(seconds)
        self.datasets[split] = SpeechDataset(records, self.sample_rate, self.mix_to_mono)
        self.durations[split] = durations

    def setup(self, stage: str | None = None) -> None:
        """Read and check the manifests the stage needs (``fit``: train and val; ``validate``: val;
        ``test``: test; ``predict``: test, else val)."""
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test", "val"]}
        for split in splits.get(stage or "", ["train", "val", "test"]):
            self._load_split(split)

    def _loader(self, split: str, **kwargs: Any) -> DataLoader:
        return DataLoader(
            self.datasets[split], collate_fn=collate_speech, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, **kwargs,
        )

    def _ordered(self, split: str) -> DataLoader:
        self._load_split(split)
        return self._loader(split, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Training batches: bucketed by length (or shuffled), in an order fixed by ``(seed, epoch)``."""
        self._load_split("train")
        size = len(self.datasets["train"])
        if not self.bucket_by_length:
            sampler = self._resumable_sampler(size, self.seed, self.batch_size)
            return self._loader("train", batch_size=self.batch_size, sampler=sampler)
        batches = LengthBucketBatchSampler(
            ResumableShuffleSampler(size, self.seed), self.batch_size, lengths=self.durations["train"], seed=self.seed
        )
        if self._resume_position is not None:
            batches.skip_in_epoch(*self._resume_position)
            self._resume_position = None
        return self._loader("train", batch_sampler=batches)

    def val_dataloader(self) -> DataLoader | list[Any]:
        """Validation batches in manifest order (none without ``val_file``)."""
        return self._ordered("val") if self.files["val"] else []

    def test_dataloader(self) -> DataLoader | list[Any]:
        """Test batches in manifest order (none without ``test_file``)."""
        return self._ordered("test") if self.files["test"] else []

    def predict_dataloader(self) -> DataLoader:
        """The test set (or, without ``test_file``, the validation set) in manifest order."""
        split = "test" if self.files["test"] else "val"
        if self.files[split] is None:
            raise ConfigError(f"{type(self).__name__}: prediction needs test_file or val_file.")
        return self._ordered(split)
