"""Speech manifests and batches (`lightning_tokens.datamodules.speech`): audio loading and resampling,
manifest validation messages, length bucketing, the collate contract, and the datamodule's loaders."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.datamodules.sampling import ResumableShuffleSampler
from lightning_tokens.datamodules.speech import (
    LengthBucketBatchSampler,
    SpeechDataModule,
    collate_speech,
    load_audio,
    read_speech_manifest,
)


def _tone(seconds: float, rate: int, frequency: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    wave = (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] + [np.zeros_like(wave)] * (channels - 1), axis=1)


def _write_wav(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, _tone(seconds, rate, channels=channels), rate, subtype="PCM_16")
    return path


def _manifest(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def corpus(tmp_path):
    """20 utterances of 0.1..2.0 s (ids u00..u19) in train.jsonl, 3 in val.jsonl, 2 in test.jsonl."""
    records = []
    for i in range(20):
        _write_wav(tmp_path / "wavs" / f"u{i:02d}.wav", 0.1 * (i + 1))
        task = ("asr", "tts", "sqa")[i % 3]
        record = {"id": f"u{i:02d}", "audio": f"wavs/u{i:02d}.wav", "text": f"word {i}", "task": task}
        if task == "sqa":
            record["question"] = f"question {i}"
        records.append(record)
    _manifest(tmp_path / "train.jsonl", records)
    _manifest(tmp_path / "val.jsonl", [dict(r, id=f"v{i}") for i, r in enumerate(records[:3])])
    _manifest(tmp_path / "test.jsonl", [dict(r, id=f"t{i}") for i, r in enumerate(records[3:5])])
    return tmp_path


# --- load_audio --------------------------------------------------------------------------------------
def test_load_audio_resamples_one_second_to_sample_rate(tmp_path):
    path = _write_wav(tmp_path / "tone.wav", 1.0, rate=22050)
    audio = load_audio(path, 16000)
    assert audio.dtype == torch.float32 and audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(audio.numpy()))
    assert int(np.argmax(spectrum)) == 440  # 1 Hz bins over 1 s: the tone keeps its pitch
    assert load_audio(path, 22050).shape == (22050,)
    assert load_audio(path, 8000).shape == (8000,)


def test_load_audio_multichannel_needs_mix_to_mono(tmp_path):
    path = _write_wav(tmp_path / "stereo.wav", 0.5, rate=16000, channels=2)
    with pytest.raises(DataError) as error:
        load_audio(path, 16000)
    assert str(path) in str(error.value) and "2 channels" in str(error.value) and "mix_to_mono: true" in str(error.value)
    mixed = load_audio(path, 16000, mix_to_mono=True)
    left = load_audio(_write_wav(tmp_path / "mono.wav", 0.5), 16000)
    assert torch.allclose(mixed, left / 2, atol=1e-4)  # right channel is silent: the mean halves the left


def test_load_audio_missing_and_unreadable(tmp_path):
    with pytest.raises(MissingFileError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav", 16000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="junk.wav: not a readable sound file"):
        load_audio(junk, 16000)


# --- manifests ---------------------------------------------------------------------------------------
def test_manifest_resolves_paths_and_fills_defaults(corpus):
    (corpus / "sub").mkdir()
    _manifest(corpus / "sub" / "m.jsonl", [{"audio": "../wavs/u00.wav", "text": "zero"}, "", {"audio": str(corpus / "wavs/u01.wav"), "text": "one", "speech_tokens": [3, 0, 7]}])
    records = read_speech_manifest(corpus / "sub" / "m.jsonl")
    assert [r["id"] for r in records] == ["m:1", "m:3"]  # blank line 2 skipped, numbering kept
    assert Path(records[0]["audio"]).resolve() == (corpus / "wavs/u00.wav").resolve()
    assert records[0]["task"] == "asr" and records[0]["question"] is None
    assert records[1]["speech_tokens"] == [3, 0, 7]
    assert records[1]["source"].endswith("m.jsonl, line 3")


def test_manifest_task_filter(corpus):
    records = read_speech_manifest(corpus / "train.jsonl", tasks=["sqa"])
    assert [r["id"] for r in records] == [f"u{i:02d}" for i in range(2, 20, 3)]
    assert all(r["question"] == f"question {int(r['id'][1:])}" for r in records)
    with pytest.raises(ConfigError, match="'speak'"):
        read_speech_manifest(corpus / "train.jsonl", tasks=["speak"])
    _manifest(corpus / "asr_only.jsonl", [{"audio": "wavs/u00.wav", "text": "a"}])
    with pytest.raises(DataError, match="no records with tasks \\['tts'\\]"):
        read_speech_manifest(corpus / "asr_only.jsonl", tasks=["tts"])


GOOD = {"audio": "wavs/u00.wav", "text": "zero"}


@pytest.mark.parametrize(
    ("bad_line", "field", "words"),
    [
        ('{"audio": "wavs/u00.wav", "text": ', None, "malformed JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        ({"text": "zero"}, "audio", "missing"),
        ({"audio": "wavs/missing.wav", "text": "zero"}, "audio", "does not exist"),
        ({"audio": "wavs/u00.wav", "text": "   "}, "text", "empty"),
        ({"audio": "wavs/u00.wav"}, "text", "missing"),
        ({"audio": "wavs/u00.wav", "text": "zero", "task": "dance"}, "task", "unknown task 'dance'"),
        ({"audio": "wavs/u00.wav", "text": "zero", "question": 3}, "question", "string or null"),
        ({**GOOD, "speech_tokens": [1, -2]}, "speech_tokens", "non-negative integers"),
        ({**GOOD, "speech_tokens": [1, 2.5]}, "speech_tokens", "non-negative integers"),
        ({**GOOD, "speech_tokens": [True]}, "speech_tokens", "non-negative integers"),
        ({**GOOD, "speech_tokens": "1 2 3"}, "speech_tokens", "non-negative integers"),
    ],
)
def test_manifest_errors_name_file_line_and_field(corpus, bad_line, field, words):
    path = _manifest(corpus / "bad.jsonl", [GOOD, GOOD, bad_line])
    with pytest.raises(DataError) as error:
        read_speech_manifest(path)
    message = str(error.value)
    assert str(path) in message and "line 3" in message and words in message
    if field is not None:
        assert f"field {field!r}" in message


def test_manifest_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="absent.jsonl"):
        read_speech_manifest(tmp_path / "absent.jsonl")


# --- collate -----------------------------------------------------------------------------------------
def test_collate_pads_and_keeps_fields():
    items = [
        {"audio": torch.full((3,), 0.5), "text": "one", "task": "asr", "id": "a", "question": None, "speech_tokens": torch.tensor([1, 2])},
        {"audio": torch.full((5,), -0.25), "text": "two", "task": "sqa", "id": "b", "question": "what", "speech_tokens": torch.tensor([3])},
    ]
    batch = collate_speech(items)
    assert batch["audio"].shape == (2, 5) and batch["audio"].dtype == torch.float32
    assert batch["audio_lengths"].tolist() == [3, 5] and batch["audio_lengths"].dtype == torch.long
    assert batch["audio"][0].tolist() == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert batch["audio"][1].tolist() == [-0.25] * 5
    assert (batch["text"], batch["task"], batch["ids"], batch["question"]) == (["one", "two"], ["asr", "sqa"], ["a", "b"], [None, "what"])
    assert [t.tolist() for t in batch["speech_tokens"]] == [[1, 2], [3]]
    del items[1]["speech_tokens"]
    assert "speech_tokens" not in collate_speech(items)  # only when every record has them


# --- bucketing ---------------------------------------------------------------------------------------
def _epoch(sampler: LengthBucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_bucketing_deterministic_and_covers_every_record_once():
    rng = np.random.default_rng(0)
    lengths = rng.uniform(0.5, 3.0, size=203).tolist()

    def make(seed):
        return LengthBucketBatchSampler(ResumableShuffleSampler(203, seed), 4, lengths=lengths, bucket_size=40, seed=seed)

    first, again, other_seed = make(7), make(7), make(8)
    epochs = [_epoch(first, e) for e in range(3)]
    assert epochs[1] == _epoch(again, 1) and epochs[0] == _epoch(again, 0)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != _epoch(other_seed, 0)
    for batches in epochs:
        assert Counter(i for b in batches for i in b) == Counter(range(203))
        assert len(batches) == len(first) == 51
        assert sum(len(b) < 4 for b in batches) == 1  # buckets are whole batches: one partial batch
        # each batch lies inside one sorted bucket: its lengths are non-decreasing
        assert all(sorted(b, key=lambda i: lengths[i]) == b for b in batches)


def test_bucketing_pads_less_than_random_batches():
    lengths = np.random.default_rng(1).uniform(0.5, 3.0, size=400).tolist()
    bucketed = LengthBucketBatchSampler(ResumableShuffleSampler(400, 0), 8, lengths=lengths, seed=0)
    order = torch.randperm(400).tolist()
    plain = [order[i : i + 8] for i in range(0, 400, 8)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(list(bucketed)) < 0.2 * padding(plain)


def test_bucketing_drop_last_and_skip():
    sampler = LengthBucketBatchSampler(range(10), 4, drop_last=True, lengths=list(range(10)))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and all(len(b) == 4 for b in batches)
    resumable = LengthBucketBatchSampler(ResumableShuffleSampler(30, 3), 4, lengths=[float(i % 7) for i in range(30)], seed=3)
    full = _epoch(resumable, 2)
    resumable.skip_in_epoch(2, 3)
    assert list(resumable) == full[3:]
    assert list(resumable) == full  # the skip applies once


# --- the datamodule ----------------------------------------------------------------------------------
def test_datamodule_train_epoch_covers_all_and_val_in_order(corpus):
    data = SpeechDataModule(str(corpus / "train.jsonl"), str(corpus / "val.jsonl"), batch_size=4, seed=1)
    data.setup("fit")
    batches = list(data.train_dataloader())
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == [f"u{i:02d}" for i in range(20)]
    for batch in batches:
        durations = (batch["audio_lengths"].float() / 16000).tolist()
        assert durations == sorted(durations)  # one bucket here (200 ≥ 20 records): sorted batches
        assert batch["audio"].shape == (len(batch["ids"]), int(batch["audio_lengths"].max()))
        assert set(batch) == {"audio", "audio_lengths", "text", "task", "ids", "question"}
    again = SpeechDataModule(str(corpus / "train.jsonl"), str(corpus / "val.jsonl"), batch_size=4, seed=1)
    again.setup("fit")
    assert [b["ids"] for b in again.train_dataloader()] == [b["ids"] for b in batches]
    val = list(data.val_dataloader())
    assert [i for b in val for i in b["ids"]] == ["v0", "v1", "v2"]
    assert val[0]["question"] == [None, None, "question 2"]
    assert [b["ids"] for b in data.predict_dataloader()] == [["v0", "v1", "v2"]]


def test_datamodule_plain_shuffle_and_predict_prefers_test(corpus):
    data = SpeechDataModule(str(corpus / "train.jsonl"), str(corpus / "val.jsonl"), str(corpus / "test.jsonl"), batch_size=8, bucket_by_length=False)
    data.setup("fit")
    ids = [i for b in data.train_dataloader() for i in b["ids"]]
    assert sorted(ids) == [f"u{i:02d}" for i in range(20)] and ids != sorted(ids)
    assert [i for b in data.predict_dataloader() for i in b["ids"]] == ["t0", "t1"]
    assert [i for b in data.test_dataloader() for i in b["ids"]] == ["t0", "t1"]


def test_datamodule_tasks_and_sample_rate(corpus):
    data = SpeechDataModule(str(corpus / "train.jsonl"), tasks=["tts"], sample_rate=8000, batch_size=16)
    batch = next(iter(data.train_dataloader()))
    assert set(batch["task"]) == {"tts"} and len(batch["ids"]) == 7
    lengths = {i: n for i, n in zip(batch["ids"], batch["audio_lengths"].tolist())}
    assert lengths["u01"] == 1600  # 0.2 s at 8 kHz
    assert data.val_dataloader() == []
    with pytest.raises(ConfigError, match="prediction needs test_file or val_file"):
        data.predict_dataloader()


def test_datamodule_max_seconds_names_file_and_duration(corpus):
    data = SpeechDataModule(str(corpus / "train.jsonl"), max_seconds=1.5)
    with pytest.raises(DataError) as error:
        data.setup("fit")
    message = str(error.value)
    assert "u15.wav" in message and "1.60 s" in message and "line 16" in message and "max_seconds" in message


def test_datamodule_speech_tokens(corpus):
    records = [{"audio": f"wavs/u{i:02d}.wav", "text": "x", "speech_tokens": [i, i + 1]} for i in range(3)]
    _manifest(corpus / "tokens.jsonl", records)
    data = SpeechDataModule(str(corpus / "tokens.jsonl"), require_speech_tokens=True, batch_size=3)
    batch = next(iter(data.train_dataloader()))
    assert sorted(t.tolist() for t in batch["speech_tokens"]) == [[0, 1], [1, 2], [2, 3]]
    assert all(t.dtype == torch.long for t in batch["speech_tokens"])
    _manifest(corpus / "partial.jsonl", records[:2] + [{"audio": "wavs/u05.wav", "text": "x"}])
    with pytest.raises(DataError) as error:
        SpeechDataModule(str(corpus / "partial.jsonl"), require_speech_tokens=True).setup("fit")
    assert "partial.jsonl, line 3, field 'speech_tokens'" in str(error.value)


def test_datamodule_rejects_bad_options(corpus):
    train = str(corpus / "train.jsonl")
    with pytest.raises(ConfigError, match="batch_size=0"):
        SpeechDataModule(train, batch_size=0)
    with pytest.raises(ConfigError, match="'talk'"):
        SpeechDataModule(train, tasks=["talk"])
    with pytest.raises(ConfigError, match="max_seconds=0"):
        SpeechDataModule(train, max_seconds=0)


def test_trainer_sets_the_bucket_epoch(corpus):
    """Under a Trainer, each epoch gets a new (seeded) batch order through batch_sampler.sampler.set_epoch."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.seen.append([])
            self.seen[-1].append(",".join(batch["ids"]))
            return (self.weight * batch["audio"].mean()) ** 2 + self.weight**2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = SpeechDataModule(str(corpus / "train.jsonl"), batch_size=4, seed=5)
    model = Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert len(model.seen) == 2 and model.seen[0] != model.seen[1]
    reference = LengthBucketBatchSampler(ResumableShuffleSampler(20, 5), 4, lengths=data.durations["train"], seed=5)
    for epoch in range(2):
        expected = [",".join(f"u{i:02d}" for i in batch) for batch in _epoch(reference, epoch)]
        assert model.seen[epoch] == expected


def test_distributed_sampler_injection_shards_the_buckets(corpus):
    """What Lightning does under DDP: re-create the loader with a DistributedSampler passed as the batch
    sampler's ``sampler``; the two ranks' batches then cover every record once."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    data = SpeechDataModule(str(corpus / "train.jsonl"), batch_size=3, seed=2)
    data.setup("fit")
    seen = []
    for rank in range(2):
        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = data.train_dataloader()
        sharded = _update_dataloader(loader, DistributedSampler(data.datasets["train"], num_replicas=2, rank=rank, seed=2))
        assert isinstance(sharded.batch_sampler, LengthBucketBatchSampler)
        sharded.batch_sampler.sampler.set_epoch(1)
        seen += [i for batch in sharded for i in batch["ids"]]
    assert sorted(seen) == [f"u{i:02d}" for i in range(20)]
