"""Tokenized Number Cookbook examples: the :class:`NUPADataset`, its :class:`NUPACollator` (completion-only
labels, left-padded generation prompts) and reading prediction prompts from a file."""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from lightning_tokens.core.errors import ConfigError

__all__ = ["NUPACollator", "NUPADataset"]


def _as_int_array(ids: Sequence[int]) -> array:
    return ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)


class NUPADataset(Dataset):
    """Tokenized examples: prompt ids (with bos if the tokenizer adds one) and answer ids + eos.

    Items are dicts with ``example_id``, ``prompt_ids``, ``answer_ids`` (``None`` when there is no
    answer, as for prediction prompts), ``prompt``, ``answer``, ``domain`` and ``task``.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        prompt_ids: Sequence[Sequence[int]],
        answers: Sequence[str] | None = None,
        answer_ids: Sequence[Sequence[int]] | None = None,
        domains: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
    ) -> None:
        self.prompts = list(prompts)
        # Compact int32 storage: a few hundred thousand examples stay small in memory and in worker pickles.
        self.prompt_ids = [_as_int_array(ids) for ids in prompt_ids]
        n = len(self.prompts)
        self.answers = list(answers) if answers is not None else None
        self.answer_ids = [_as_int_array(ids) for ids in answer_ids] if answer_ids is not None else None
        self.domains = list(domains) if domains is not None else None
        self.tasks = list(tasks) if tasks is not None else None
        for name in ("prompt_ids", "answers", "answer_ids", "domains", "tasks"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ConfigError(f"{name} has {len(value)} entries for {n} prompts.")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "example_id": index,
            "prompt_ids": self.prompt_ids[index].tolist(),
            "answer_ids": self.answer_ids[index].tolist() if self.answer_ids is not None else None,
            "prompt": self.prompts[index],
            "answer": self.answers[index] if self.answers is not None else None,
            "domain": self.domains[index] if self.domains is not None else None,
            "task": self.tasks[index] if self.tasks is not None else None,
        }


def _pad(rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if side == "right":
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        else:
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class NUPACollator:
    """Collate :class:`NUPADataset` items into a batch (a picklable object, so worker processes work).

    Args:
        pad_token_id: id used for padding ``input_ids`` and ``prompt_input_ids``.
        mode: ``"train"`` gives ``input_ids``, ``attention_mask``, ``labels``, ``example_id``;
            ``"eval"`` adds the generation inputs ``prompt_input_ids`` (left-padded),
            ``prompt_attention_mask`` and the lists ``answers``, ``domains``, ``prompts``, ``tasks``;
            ``"predict"`` gives only ``prompt_input_ids``, ``prompt_attention_mask`` and ``prompts``.

    ``input_ids`` = prompt + answer + eos, right-padded. ``labels`` equal ``input_ids`` on the answer and
    eos and are -100 on the prompt and padding; they are **not** shifted (the library shifts once, in
    ``ops``).
    """

    pad_token_id: int
    mode: Literal["train", "eval", "predict"] = "train"

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if self.mode in ("train", "eval"):
            sequences, labels = [], []
            for item in items:
                prompt, answer = item["prompt_ids"], item["answer_ids"]
                if answer is None:
                    raise ConfigError("Training/evaluation batches need answers.")
                sequences.append(list(prompt) + list(answer))
                labels.append([-100] * len(prompt) + list(answer))
            batch["input_ids"] = _pad(sequences, self.pad_token_id, "right")
            batch["attention_mask"] = _pad([[1] * len(s) for s in sequences], 0, "right")
            batch["labels"] = _pad(labels, -100, "right")
            batch["example_id"] = torch.tensor([int(item["example_id"]) for item in items], dtype=torch.long)
        if self.mode in ("eval", "predict"):
            prompts = [item["prompt_ids"] for item in items]
            batch["prompt_input_ids"] = _pad(prompts, self.pad_token_id, "left")
            batch["prompt_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, "left")
            batch["prompts"] = [item["prompt"] for item in items]
        if self.mode == "eval":
            batch["answers"] = [item["answer"] for item in items]
            batch["domains"] = [item["domain"] for item in items]
            batch["tasks"] = [item["task"] for item in items]
        return batch


def _read_prompts(path: str) -> list[str]:
    """Prompts from a ``.jsonl``/``.json`` file (one object per line with a ``"prompt"`` field, or a JSON
    string per line) or from a plain text file (one prompt per non-empty line, kept verbatim without its
    line ending, so a trailing space after ``=`` survives)."""
    prompts: list[str] = []
    is_json = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not is_json:
                prompts.append(line)
                continue
            record = json.loads(line)
            if isinstance(record, str):
                prompts.append(record)
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            else:
                raise ConfigError(f"{path}:{lineno}: expected a JSON object with a string 'prompt' field.")
    if not prompts:
        raise ConfigError(f"predict_file {path!r} holds no prompts.")
    return prompts

