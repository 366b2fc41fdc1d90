"""Speech records as :class:`~lightning_tokens.datamodules.speech.SpeechDataset` gives them, made in code
(random waveforms and speech tokens) and batched by its ``collate_speech``, for the speech module tests and
their multi-process worker."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tokens.datamodules.speech import collate_speech

WORDS = ("one", "two", "three", "four", "five", "six")
TASKS = ("asr", "tts", "sqa", "tts")


def speech_records(count: int, sample_rate: int, codebook_size: int, seed: int = 0) -> list[dict]:
    """``count`` records: a waveform of 0.2–0.4 s, a two-word text, a task cycling asr / tts / sqa / tts and
    speech tokens at 25 per second."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        seconds = 0.2 + 0.2 * float(torch.rand((), generator=generator))
        samples = int(seconds * sample_rate)
        words = torch.randint(len(WORDS), (2,), generator=generator).tolist()
        records.append({
            "id": f"utt{i}",
            "audio": 0.1 * torch.randn(samples, generator=generator),
            "text": " ".join(WORDS[w] for w in words),
            "task": TASKS[i % len(TASKS)],
            "question": None,
            "speech_tokens": torch.randint(codebook_size, (max(1, int(seconds * 25)),), generator=generator),
        })
    return records


class _Records(Dataset):
    def __init__(self, records: list[dict]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


class RecordsDataModule(pl.LightningDataModule):
    """In-order batches of :func:`speech_records` (the same global batches on any number of ranks)."""

    def __init__(self, count: int = 16, sample_rate: int = 24000, codebook_size: int = 16, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.sample_rate, self.batch_size = sample_rate, batch_size
        self.records = speech_records(count, sample_rate, codebook_size, seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Records(self.records), batch_size=self.batch_size, shuffle=False, collate_fn=collate_speech)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Records(self.records[:8]), batch_size=self.batch_size, collate_fn=collate_speech)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
