"""Paired-context data for Contrastive Unlikelihood Training (:mod:`lightning_tokens.callbacks.cut`) and the
token saliency maps (:mod:`lightning_tokens.analysis.saliency`): one response scored under two contexts.

Records (JSON Lines, JSON or CSV; one per line)::

    {"id": "q1", "positive_context": "What is 7 + 5?\\n",
     "negative_context": "What is 7 + 5?\\nA reviewer: the answer below wrongly says 13.\\n",
     "response": "7 + 5 = 13"}

``negative_context`` may be missing or null: that row is trained with the plain NLL (CUT's Align-P examples).
Other fields are kept out of the batch.

The response is tokenized **once** and appended to each context, so both sides label exactly the same token
ids (tokenizing each concatenation separately could merge differently at the boundary). Batches::

    input_ids, attention_mask, labels                           # the response under the positive context
    negative_input_ids, negative_attention_mask, negative_labels # the same response under the negative context
    has_negative (B,) bool, example_id (B,) int64

Rows without a negative context repeat the positive one on the negative side (``has_negative`` false), so
the negative forward never sees an empty row. Right padding; labels are ``-100`` on contexts and padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.core.stats import IGNORE_INDEX
from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.datamodules.sft.chat import _ChatTemplate
from lightning_tokens.datamodules.sft.datamodule import check_data_sizes
from lightning_tokens.datamodules.sft.records import _error, _read_records, stable_example_id
from lightning_tokens.models.tokenizers import bos_prefix, datamodule_tokenizer, ensure_pad_token

__all__ = [
    "ContrastiveCollator",
    "ContrastiveDataModule",
    "ContrastiveExample",
    "collate_contrastive",
    "encode_contrastive",
    "read_contrastive_records",
]

ContextTemplate = Literal["plain", "chat"]


@dataclass
class ContrastiveExample:
    """One tokenized record: the response under the positive and the negative context.

    Attributes:
        input_ids: positive context + response.
        labels: ``-100`` on the context, the response ids after it.
        negative_input_ids: negative context + the same response ids.
        negative_labels: ``-100`` on the negative context, the response ids after it.
        has_negative: whether the record had a negative context (else the negative side repeats the positive).
        example_id: stable integer id of the record's ``id`` (or its position).
        response_length: tokens of the response (after truncation).
    """

    input_ids: list[int]
    labels: list[int]
    negative_input_ids: list[int]
    negative_labels: list[int]
    has_negative: bool
    example_id: int
    response_length: int


def read_contrastive_records(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL / JSON / CSV file, each checked for ``positive_context`` and ``response``
    (strings) and an optional ``negative_context``; errors name the file, line and field.

    Each returned record has a ``location`` (``"file, line 3"``) and ``index`` added.
    """
    out = []
    for record in _read_records(path, "auto"):
        data = dict(record.data)
        for key in ("positive_context", "response"):
            if not isinstance(data.get(key), str):
                raise _error(record.location, key, f"must be a string, got {type(data.get(key)).__name__}.")
        if not data["response"]:
            raise _error(record.location, "response", "is empty; there would be nothing to learn.")
        negative = data.get("negative_context")
        if negative is not None and not isinstance(negative, str):
            raise _error(record.location, "negative_context", f"must be a string or null, got {type(negative).__name__}.")
        data["location"], data["index"] = record.location, record.index
        out.append(data)
    return out


def _context_ids(
    text: str, tokenizer: PreTrainedTokenizerBase, template: ContextTemplate, bos: list[int], chat_template: str | None
) -> list[int]:
    if template == "chat":
        text = _ChatTemplate(tokenizer, chat_template).render([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_contrastive(
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 1024,
    add_eos: bool = True,
    template: ContextTemplate = "plain",
    chat_template: str | None = None,
) -> ContrastiveExample:
    """Tokenize one ``{positive_context, negative_context, response}`` record.

    Contexts longer than ``max_length`` minus the response lose tokens from their start (after a leading bos),
    as the CUT reference truncates, so the response stays whole; a response alone longer than
    ``max_length - 1`` is cut at its end (on both sides alike).

    Args:
        record: the record (``id`` optional).
        tokenizer: the tokenizer.
        max_length: longest sequence on either side.
        add_eos: append the tokenizer's eos to the response (labelled).
        template: ``plain`` (bos + context text) or ``chat`` (the context as a user turn of the chat template,
            with the generation prompt; the response is the assistant's reply).
        chat_template: a Jinja template overriding the tokenizer's (``chat`` only).

    Example:
        >>> from lightning_tokens.models.tokenizers import resolve_tokenizer
        >>> tok = resolve_tokenizer("char")
        >>> ex = encode_contrastive({"positive_context": "Q:", "negative_context": "Q, bad:", "response": "42"}, tok)
        >>> [t for t in ex.labels if t != -100] == [t for t in ex.negative_labels if t != -100]
        True
    """
    check_choice("encode_contrastive", "template", template, ("plain", "chat"))
    location = record.get("location", "record")
    bos = bos_prefix(tokenizer) if template == "plain" else []
    response = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ConfigError("add_eos=True needs a tokenizer with an eos token; set add_eos: false or use another tokenizer.")
        response.append(int(tokenizer.eos_token_id))
    response = response[: max_length - 1]
    if not response:
        raise _error(location, "response", "tokenizes to nothing.")
    negative_text = record.get("negative_context")
    sides = []
    for text in (record["positive_context"], negative_text if negative_text is not None else record["positive_context"]):
        context = _context_ids(text, tokenizer, template, bos, chat_template)
        room = max_length - len(response)
        if len(context) > room:
            keep = len(bos) if context[: len(bos)] == bos and bos else 0
            context = context[:keep] + context[len(context) - (room - keep) :] if room > keep else context[:room]
        if not context:  # the first response token needs a position to be predicted from
            raise ConfigError(f"{location}: the response fills max_length={max_length}; raise max_length.")
        sides.append((context + response, [IGNORE_INDEX] * len(context) + response))
    identifier = record.get("id", record.get("index", 0))
    return ContrastiveExample(
        input_ids=sides[0][0], labels=sides[0][1], negative_input_ids=sides[1][0], negative_labels=sides[1][1],
        has_negative=negative_text is not None, example_id=stable_example_id(identifier), response_length=len(response),
    )


class ContrastiveCollator:
    """Right-pads :class:`ContrastiveExample` lists into the paired batch (see the module docstring).

    Args:
        pad_token_id: id written into padded ``input_ids``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def __call__(self, examples: list[ContrastiveExample]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for prefix, ids, labels in (("", "input_ids", "labels"), ("negative_", "negative_input_ids", "negative_labels")):
            id_rows = [getattr(e, ids) for e in examples]
            batch[f"{prefix}input_ids"] = self._pad(id_rows, self.pad_token_id)
            batch[f"{prefix}attention_mask"] = self._pad([[1] * len(r) for r in id_rows], 0)
            batch[f"{prefix}labels"] = self._pad([getattr(e, labels) for e in examples], IGNORE_INDEX)
        batch["has_negative"] = torch.tensor([e.has_negative for e in examples], dtype=torch.bool)
        batch["example_id"] = torch.tensor([e.example_id for e in examples], dtype=torch.long)
        return batch


def collate_contrastive(
    records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int = 1024, add_eos: bool = True,
    template: ContextTemplate = "plain", chat_template: str | None = None,
) -> dict[str, torch.Tensor]:
    """``{positive_context, negative_context, response}`` records → one paired batch (for hand-built batches,
    tests and the saliency map).

    Example:
        >>> from lightning_tokens.models.tokenizers import resolve_tokenizer
        >>> batch = collate_contrastive([{"positive_context": "Q:", "negative_context": "Q, wrong:", "response": "4"}],
        ...                             resolve_tokenizer("char"))
        >>> batch["input_ids"].shape, batch["negative_input_ids"].shape, batch["has_negative"].tolist()
        (torch.Size([1, 4]), torch.Size([1, 11]), [True])
    """
    tokenizer = ensure_pad_token(tokenizer)
    examples = [encode_contrastive(r, tokenizer, max_length, add_eos, template, chat_template) for r in records]
    return ContrastiveCollator(int(tokenizer.pad_token_id))(examples)


class _Examples(Dataset):
    def __init__(self, examples: list[ContrastiveExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> ContrastiveExample:
        return self.examples[index]


class ContrastiveDataModule(ResumableDataMixin, L.LightningDataModule):
    """Responses paired with a positive and a negative context (CUT / DualCUT, saliency maps).

    Features:
        - ``{positive_context, negative_context, response}`` records from JSONL / JSON / CSV; errors name the
          file, line and field; a missing ``negative_context`` makes a plain-NLL row.
        - The response tokenized once and appended to both contexts (identical labels on both sides).
        - Contexts as plain text (with the tokenizer's bos) or as a user turn of the chat template.
        - Exact mid-epoch resume of the training order (:class:`~lightning_tokens.datamodules.sampling.ResumableShuffleSampler`).

    Args:
        train_file: training records.
        val_file: validation records (the validation loss is the plain NLL under the positive context).
        tokenizer: ``None`` takes the LightningModule's at ``setup``; a name goes through ``resolve_tokenizer``.
        template: ``plain`` or ``chat`` (see :func:`encode_contrastive`).
        chat_template: a Jinja template overriding the tokenizer's.
        max_length: longest sequence on either side (contexts are cut from their start).
        add_eos: append eos to every response.
        batch_size: training batch size.
        eval_batch_size: validation batch size.
        num_workers: DataLoader workers.
        seed: shuffling and hold-out seed (``None``: ``seed_everything``'s).
        val_fraction: share of ``train_file`` held out for validation when ``val_file`` is ``None``.

    Example:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "cut.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"positive_context": "1+1=", "negative_context": "1+1= (wrong:)", "response": "3"}) + "\\n")
        >>> dm = ContrastiveDataModule(train_file=path, tokenizer="char", batch_size=1)
        >>> dm.setup("fit")
        >>> sorted(next(iter(dm.train_dataloader())))[:3]
        ['attention_mask', 'example_id', 'has_negative']
    """

    seed = SeedOption()

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer: str | None = None,
        template: ContextTemplate = "plain",
        chat_template: str | None = None,
        max_length: int = 1024,
        add_eos: bool = True,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int | None = None,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice(type(self).__name__, "template", template, ("plain", "chat"))
        check_data_sizes(max_length, batch_size, eval_batch_size, val_file, val_fraction)
        self.save_hyperparameters({
            "train_file": train_file, "val_file": val_file, "data_tokenizer": tokenizer if isinstance(tokenizer, str) else None,
            "template": template, "max_length": max_length, "add_eos": add_eos, "batch_size": batch_size,
            "eval_batch_size": eval_batch_size, "seed": seed, "val_fraction": val_fraction,
        })
        self.train_file, self.val_file, self._tokenizer_arg = train_file, val_file, tokenizer
        self.template, self.chat_template, self.max_length, self.add_eos = template, chat_template, max_length, add_eos
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed, self.val_fraction = seed, val_fraction
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._datasets: dict[str, _Examples] = {}

    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.tokenizer = datamodule_tokenizer(self._tokenizer_arg, getattr(self, "trainer", None), type(self).__name__)
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the files (once)."""
        if self._datasets:
            return
        tokenizer = self._resolve_tokenizer()
        train = read_contrastive_records(self.train_file)
        splits = {"train": train}
        if self.val_file is not None:
            splits["val"] = read_contrastive_records(self.val_file)
        elif self.val_fraction > 0:
            count = max(1, round(len(train) * self.val_fraction))
            if count >= len(train):
                raise ConfigError(f"val_fraction={self.val_fraction} leaves no training record out of {len(train)}.")
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            held = set(order[:count])
            splits = {"train": [r for i, r in enumerate(train) if i not in held], "val": [r for i, r in enumerate(train) if i in held]}
        self.records = splits
        for name, records in splits.items():
            self._datasets[name] = _Examples([
                encode_contrastive(r, tokenizer, self.max_length, self.add_eos, self.template, self.chat_template) for r in records
            ])

    def dataset(self, split: Literal["train", "val"] = "train") -> Dataset:
        """The tokenized examples of ``split``, in file order."""
        if split not in self._datasets:
            raise ConfigError(f"{type(self).__name__} has no {split!r} split (call setup first; val needs val_file or val_fraction).")
        return self._datasets[split]

    def collate(self) -> ContrastiveCollator:
        assert self.tokenizer is not None
        return ContrastiveCollator(int(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        sampler = self._resumable_sampler(len(dataset), self.seed % (2**31), self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate(),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self._datasets:
            return []
        return DataLoader(self.dataset("val"), batch_size=self.eval_batch_size, collate_fn=self.collate(), num_workers=self.num_workers)
