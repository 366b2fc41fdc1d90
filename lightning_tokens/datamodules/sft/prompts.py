"""Prediction prompts: reading ``predict_file`` (prompts, chats or plain lines) into token ids that leave room
for generation, and the dataset that holds them."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.sft.chat import _ChatTemplate, _plain_messages
from lightning_tokens.datamodules.sft.fields import _string
from lightning_tokens.datamodules.sft.records import _EXTENSIONS, FileFormat, _error, _read_records, _read_text


class _PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[str], prompt_ids: Sequence[np.ndarray]) -> None:
        self.prompts = list(prompts)
        self.prompt_ids = list(prompt_ids)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"prompt": self.prompts[index], "prompt_ids": self.prompt_ids[index]}


def _build_prompt_dataset(
    path: str,
    fmt: FileFormat,
    tokenizer: PreTrainedTokenizerBase,
    chat: _ChatTemplate,
    bos_prefix: list[int],
    max_length: int,
    max_new_tokens: int,
) -> _PromptDataset:
    """The prompts of ``path``, each cut from the left to at most ``max_length - max_new_tokens`` tokens."""
    ext = os.path.splitext(path)[1].lower()
    prompts: list[str] = []
    templated: list[bool] = []
    if fmt == "auto" and ext not in _EXTENSIONS:
        lines = [line.rstrip("\r\n") for line in io.StringIO(_read_text(path), newline=None)]
        prompts = [line for line in lines if line.strip()]
        templated = [False] * len(prompts)
    else:
        for record in _read_records(path, fmt, prompts=True):
            data = record.data
            if "messages" in data:
                plain = _plain_messages(data["messages"], record.location)
                while plain and plain[-1]["role"] == "assistant":
                    plain.pop()
                if not plain:
                    raise _error(record.location, "messages", "expected messages before the (dropped) assistant answer.")
                try:
                    prompts.append(chat.render(plain, add_generation_prompt=True))
                except Exception as err:  # the template's own error (e.g. raise_exception) on this conversation
                    raise _error(record.location, "messages", f"the chat template failed: {type(err).__name__}: {err}") from None
                templated.append(chat.uses_template)
            else:
                prompts.append(_string(data, "prompt", record.location))
                templated.append(False)
    if not prompts:
        raise ConfigError(f"predict_file {path!r} holds no prompts.")
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    budget = max(1, max_length - max_new_tokens)
    prompt_ids, cut = [], 0
    for ids, is_templated in zip(encoded, templated):
        ids = list(ids) if is_templated else list(bos_prefix) + list(ids)
        if len(ids) > budget:
            cut += 1
            bos = bos_prefix if not is_templated and bos_prefix else []
            ids = bos + ids[len(ids) - (budget - len(bos)) :]
        prompt_ids.append(np.asarray(ids, dtype=np.int32))
    if cut:
        rank_zero_warn(
            f"SFT predict: {cut}/{len(prompts)} prompts exceed max_length - max_new_tokens = {budget} tokens; "
            "they were cut from the left."
        )
    return _PromptDataset(prompts, prompt_ids)
