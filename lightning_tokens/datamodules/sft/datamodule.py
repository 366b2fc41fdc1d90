"""The :class:`SFTDataModule`: its options, the train/val/test/predict splits, and Lightning's data hooks; the
files, schemas and batches it handles are described in :mod:`lightning_tokens.datamodules.sft`."""

from __future__ import annotations

import random
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.datamodules.filters import RecordFilter
from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.datamodules.sft.chat import _ChatTemplate
from lightning_tokens.datamodules.sft.collate import SFTCollator
from lightning_tokens.datamodules.sft.dataset import SFTDataset
from lightning_tokens.datamodules.sft.packing import PackedSFTDataset, pack_examples
from lightning_tokens.datamodules.sft.parsing import _SCHEMAS, Schema, _Parsed, _RecordParser
from lightning_tokens.datamodules.sft.prompts import _build_prompt_dataset, _PromptDataset
from lightning_tokens.datamodules.sft.records import _FORMATS, FileFormat
from lightning_tokens.datamodules.sft.tokenization import _POLICIES, TruncationPolicy, _ExampleBuilder
from lightning_tokens.models.tokenizers import bos_prefix, datamodule_tokenizer

__all__ = ["SFTDataModule"]


def check_data_sizes(
    max_length: int, batch_size: int, eval_batch_size: int, val_file: str | None, val_fraction: float
) -> None:
    """The size arguments shared by the datamodules that tokenize your files (SFT, contrastive pairs)."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}.")
    if batch_size < 1 or eval_batch_size < 1:
        raise ConfigError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if val_file is not None and val_fraction > 0:
        raise ConfigError("Give either val_file or val_fraction (a hold-out of train_file), not both.")


class SFTDataModule(ResumableDataMixin, L.LightningDataModule):
    """Supervised fine-tuning on your own JSONL / JSON / CSV files: completions, chats or plain text.

    Features:
        - Three record schemas, detected per record: ``{prompt, response}`` (labels on the response and
          eos), ``{messages}`` (chat template; labels on assistant turns only, found by rendering
          conversation prefixes, so templates need no ``{% generation %}`` block; a documented fallback
          template without one) and ``{text}`` (labels everywhere). See :mod:`lightning_tokens.datamodules.sft`.
        - Weights that travel with the data: a sample ``weight``, ``token_weights`` lists and
          character ``weight_spans`` mapped to tokens through offsets; all end up in
          ``batch["token_weights"]``.
        - Stable integer example ids from the records' ``id`` (:func:`stable_example_id`), per example
          (``example_id``) and per token (``token_example_ids``).
        - An explicit policy for examples longer than ``max_length``: ``error``, ``drop``,
          ``truncate_right`` (cut the end), ``truncate_left`` (cut the start, keeping a leading bos).
        - Packing of whole examples into rows, with attention and loss that never cross an example
          boundary (``position_ids`` restart per example; no ``attention_mask`` in packed batches).
        - Every data error is raised at ``setup`` with the file, line (or index) and field.
        - Exact mid-epoch resume of the training order (:class:`ResumableShuffleSampler`).
        - ``predict`` on prompts or chats (generation prompt added), left-padded.
        - FAIT code pairs: ``{prompt, response, incorrect}`` records carry per-token edit masks of the
          correct response (``fait_line_mask``, ``fait_token_mask`` in the batches) for
          :class:`~lightning_tokens.callbacks.fait.FAIT`.
        - Data-level ``filters`` (:mod:`lightning_tokens.datamodules.filters`: InstructMining, long-CoT
          branching density, your own :class:`~lightning_tokens.datamodules.filters.RecordFilter`)
          select training records before tokenization.

    Args:
        train_file: training data (``.jsonl``, ``.json`` or ``.csv``).
        val_file: validation data; ``None`` holds out ``val_fraction`` of the training file (or has no
            validation when that is 0).
        test_file: test data for ``trainer.test``.
        predict_file: prompts for ``trainer.predict``: records with ``prompt`` (a ``response`` is ignored)
            or ``messages`` (trailing assistant messages are dropped and the generation prompt added),
            or JSON strings; a file with another extension holds one prompt per line.
        tokenizer: ``None`` takes ``trainer.lightning_module.tokenizer`` at ``setup``; a string goes
            through :func:`~lightning_tokens.models.tokenizers.resolve_tokenizer` (``"char"``, a local
            directory, or a Hub id). A tokenizer object is accepted too (from Python).
        format: file format; ``auto`` decides by extension (``.jsonl``/``.ndjson``, ``.json``, ``.csv``).
        schema: ``auto`` detects each record's schema from its fields; otherwise every record must have
            that schema's fields.
        chat_template: a Jinja chat template overriding the tokenizer's (``None``: the tokenizer's, or
            :data:`FALLBACK_CHAT_TEMPLATE` when it has none).
        max_length: longest example in tokens, and the row length when packing.
        truncation: what to do with longer examples: ``error`` (raise, naming file and line), ``drop``
            (skip them, with a warning that counts them), ``truncate_right`` (keep the first
            ``max_length`` tokens: the response's end goes), ``truncate_left`` (keep the last ones: the
            prompt's start goes, a leading bos stays). Examples left without any labelled token are
            dropped with a warning.
        packing: pack whole training examples into rows of ``max_length`` tokens.
        pack_eval: pack validation/test examples too (off by default).
        batch_size: training batch size (rows when packing).
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        seed: seed of the validation hold-out, the packing order and the shuffling. ``None`` (the
            default) takes the seed of ``seed_everything`` (the CLI's ``seed_everything:``), else 1234.
        val_fraction: fraction of the training file held out for validation when ``val_file`` is
            ``None`` (chosen with ``seed``).
        add_eos: append the tokenizer's eos (labelled) to responses, texts and fallback-template chats.
        max_new_tokens: generation length for ``predict`` (also the room kept free when long
            prediction prompts are cut from the left).
        filters: :class:`~lightning_tokens.datamodules.filters.RecordFilter` objects applied in order to the
            raw training records (after the ``val_fraction`` hold-out; validation and test files are never
            filtered). Each sees the survivors of the previous one; counts are logged and kept in
            :attr:`filter_report`.
        fait_char_diff: character alignment of FAIT's edit masks: ``levenshtein`` (a minimal edit script,
            the paper's description) or ``difflib`` (see :func:`~lightning_tokens.callbacks.fait.edit_masks`).
        fait_insertions: what an insertion in the incorrect code marks in the correct one: ``adjacent``
            (the line / character on each side) or ``ignore``.

    Attributes:
        example_ids: raw ``id`` (or default position) → integer ``example_id``, for every loaded example.
        filter_report: one ``{"filter", "before", "kept"}`` entry per applied filter.
        tokenizer: the tokenizer, once resolved.

    Example:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write(json.dumps({"id": "q1", "prompt": "2+2=", "response": "4"}) + "\\n")
        ...     _ = f.write(json.dumps({"messages": [{"role": "user", "content": "Hi"},
        ...                                          {"role": "assistant", "content": "Hello"}]}) + "\\n")
        >>> dm = SFTDataModule(train_file=path, tokenizer="char", batch_size=2, packing=True)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch)
        ['input_ids', 'labels', 'position_ids', 'token_example_ids', 'token_weights']
        >>> batch["input_ids"].shape  # one packed row: 6 + 33 tokens
        torch.Size([1, 39])

        From YAML: ``data: {class_path: lightning_tokens.datamodules.SFTDataModule, init_args:
        {train_file: data/examples/sft_chat.jsonl, packing: true, max_length: 512}}`` with
        ``tokenizer`` left out (the module's is used).
    """

    seed = SeedOption()  # None: seed_everything's seed, read when used

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        tokenizer: str | None = None,
        format: FileFormat = "auto",
        schema: Schema = "auto",
        chat_template: str | None = None,
        max_length: int = 1024,
        truncation: TruncationPolicy = "truncate_right",
        packing: bool = False,
        pack_eval: bool = False,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int | None = None,
        val_fraction: float = 0.0,
        add_eos: bool = True,
        max_new_tokens: int = 256,
        filters: list[RecordFilter] | None = None,
        fait_char_diff: Literal["levenshtein", "difflib"] = "levenshtein",
        fait_insertions: Literal["adjacent", "ignore"] = "adjacent",
    ) -> None:
        super().__init__()
        for name, value, allowed in (("format", format, _FORMATS), ("schema", schema, _SCHEMAS), ("truncation", truncation, _POLICIES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}.")
        check_data_sizes(max_length, batch_size, eval_batch_size, val_file, val_fraction)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if fait_char_diff not in ("levenshtein", "difflib"):
            raise ConfigError(f"fait_char_diff must be one of levenshtein, difflib; got {fait_char_diff!r}.")
        if fait_insertions not in ("adjacent", "ignore"):
            raise ConfigError(f"fait_insertions must be one of adjacent, ignore; got {fait_insertions!r}.")
        for f in filters or []:
            if not isinstance(f, RecordFilter):
                raise TypeError(f"filters must be RecordFilter objects (lightning_tokens.datamodules.filters), got {type(f).__name__}.")
        tokenizer_name = tokenizer if (tokenizer is None or isinstance(tokenizer, str)) else None
        self.save_hyperparameters({
            "train_file": train_file,
            "val_file": val_file,
            "test_file": test_file,
            "predict_file": predict_file,
            "data_tokenizer": tokenizer_name,  # distinct keys: merged with the module's hparams in logs
            "format": format,
            "schema": schema,
            "chat_template": chat_template,
            "max_length": max_length,
            "truncation": truncation,
            "packing": packing,
            "pack_eval": pack_eval,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "num_workers": num_workers,
            "seed": seed,
            "val_fraction": val_fraction,
            "add_eos": add_eos,
            "data_max_new_tokens": max_new_tokens,
            "filters": [repr(f) for f in filters] if filters else None,
            "fait_char_diff": fait_char_diff,
            "fait_insertions": fait_insertions,
        })
        self.train_file, self.val_file, self.test_file, self.predict_file = train_file, val_file, test_file, predict_file
        self.format, self.schema, self.chat_template = format, schema, chat_template
        self.max_length, self.truncation = max_length, truncation
        self.packing, self.pack_eval = packing, pack_eval
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_fraction, self.add_eos, self.max_new_tokens = val_fraction, add_eos, max_new_tokens
        self.filters: list[RecordFilter] = list(filters or [])
        self.fait_char_diff, self.fait_insertions = fait_char_diff, fait_insertions
        self.filter_report: list[dict[str, Any]] = []

        self._tokenizer_arg: str | PreTrainedTokenizerBase | None = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._bos_prefix: list[int] = []
        self._datasets: dict[str, Dataset] = {}
        self.example_ids: dict[str | int | float, int] = {}

    # -- tokenizer -----------------------------------------------------------------------------------
    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        tokenizer = datamodule_tokenizer(self._tokenizer_arg, self.trainer, type(self).__name__)
        if self.add_eos and tokenizer.eos_token_id is None:
            raise ConfigError("add_eos=True needs a tokenizer with an eos token; set add_eos: false or use another tokenizer.")
        self.tokenizer = tokenizer
        self._bos_prefix = bos_prefix(tokenizer)
        return tokenizer

    def _chat(self) -> _ChatTemplate:
        """How conversations are rendered: ``chat_template``, else the tokenizer's (once resolved), else the
        fallback."""
        return _ChatTemplate(self.tokenizer, self.chat_template)

    # -- parsing and tokenization (parsing.py, tokenization.py) --------------------------------------
    def _parse_file(self, path: str) -> list[_Parsed]:
        chat = self._chat()
        parser = _RecordParser(self.format, self.schema, self.add_eos, chat, self.fait_char_diff, self.fait_insertions)
        return parser.parse_file(path)

    def _build_examples(self, parsed: list[_Parsed], split: str, source: str | None = None) -> SFTDataset:
        tokenizer = self._resolve_tokenizer()
        return _ExampleBuilder(tokenizer, self._bos_prefix, self.max_length, self.truncation).build(parsed, split, source)

    # -- splits --------------------------------------------------------------------------------------
    def _split_records(self) -> dict[str, list[_Parsed]]:
        train = self._parse_file(self.train_file)
        if self.val_file is not None or self.val_fraction == 0:
            return {"train": train}
        count = max(1, round(len(train) * self.val_fraction))
        if count >= len(train):
            raise ConfigError(
                f"val_fraction={self.val_fraction} leaves no training example out of {len(train)} in {self.train_file!r}."
            )
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        held = set(order[:count])
        return {
            "train": [p for i, p in enumerate(train) if i not in held],
            "val": [p for i, p in enumerate(train) if i in held],
        }

    def _register_ids(self, parsed: list[_Parsed]) -> None:
        self.example_ids.update((p.raw_id, p.example_id) for p in parsed)

    def _build_predict_dataset(self) -> _PromptDataset:
        if self.predict_file is None:
            raise ConfigError("trainer.predict needs predict_file (JSONL prompts or chats) on the SFTDataModule.")
        tokenizer = self._resolve_tokenizer()
        return _build_prompt_dataset(
            self.predict_file,
            self.format,
            tokenizer,
            self._chat(),
            self._bos_prefix,
            self.max_length,
            self.max_new_tokens,
        )

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, then read, check and tokenize the files ``stage`` needs (errors here)."""
        self._resolve_tokenizer()
        if stage in ("fit", None):
            self._prepare_train_val()
            if stage is None and self.test_file is not None:
                self._prepare_file_split("test")
        elif stage == "validate":
            if self.val_file is None and self.val_fraction == 0:
                raise ConfigError("trainer.validate needs val_file or val_fraction > 0 on the SFTDataModule.")
            self._prepare_train_val(train=False)
        elif stage == "test":
            self._prepare_file_split("test")
        elif stage == "predict" and "predict" not in self._datasets:
            self._datasets["predict"] = self._build_predict_dataset()

    def _prepare_train_val(self, train: bool = True) -> None:
        if self.val_file is not None:
            if "val" not in self._datasets:
                self._prepare_file_split("val")
            if not train:
                return
        if "train" in self._datasets:
            return
        for name, parsed in self._split_records().items():
            if name == "train":
                parsed = self._apply_filters(parsed)
            self._register_ids(parsed)
            self._datasets[name] = self._build_examples(parsed, name, self.train_file)

    def _apply_filters(self, parsed: list[_Parsed]) -> list[_Parsed]:
        """The training records that every filter keeps (each filter sees the previous one's survivors)."""
        self.filter_report = []
        for record_filter in self.filters:
            before = len(parsed)
            keep = record_filter.keep([p.data for p in parsed], self.tokenizer)
            if len(keep) != before:
                raise ConfigError(f"{record_filter!r} returned {len(keep)} keep flags for {before} records.")
            parsed = [p for p, k in zip(parsed, keep) if k]
            self.filter_report.append({"filter": type(record_filter).__name__, "before": before, "kept": len(parsed)})
            rank_zero_info(f"SFT train: {type(record_filter).__name__} kept {len(parsed)}/{before} records.")
            if not parsed:
                raise ConfigError(f"SFT train: {record_filter!r} kept no record of {before}; loosen its threshold or fraction.")
        return parsed

    def _prepare_file_split(self, split: Literal["val", "test"]) -> None:
        if split in self._datasets:
            return
        path = self.val_file if split == "val" else self.test_file
        if path is None:
            raise ConfigError(f"trainer.{'test' if split == 'test' else 'validate'} needs {split}_file on the SFTDataModule.")
        parsed = self._parse_file(path)
        self._register_ids(parsed)
        self._datasets[split] = self._build_examples(parsed, split, path)

    def _examples(self, split: str) -> SFTDataset:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        dataset = self._datasets[split]
        assert isinstance(dataset, SFTDataset)
        return dataset

    def dataset(self, split: Literal["train", "val", "test"]) -> Dataset:
        """The dataset a loader of ``split`` iterates: examples, or packed rows when packing applies."""
        examples = self._examples(split)
        if not (self.packing if split == "train" else self.pack_eval):
            return examples
        key = f"{split}/packed"
        if key not in self._datasets:
            seed = self.seed if split == "train" else None
            self._datasets[key] = PackedSFTDataset(examples, pack_examples(examples.lengths(), self.max_length, seed))
        return self._datasets[key]

    def _pad_id(self) -> int:
        assert self.tokenizer is not None
        return int(self.tokenizer.pad_token_id)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any = None, mode: Literal["train", "predict"] = "train") -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=SFTCollator(self._pad_id(), mode),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (packed rows with ``packing=True``)."""
        dataset = self.dataset("train")
        sampler = self._resumable_sampler(len(dataset), self.seed % (2**31), self.batch_size)
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches (the training keys; packed only with ``pack_eval``); ``[]`` without validation data."""
        if self.val_file is None and self.val_fraction == 0:
            return []
        return self._loader(self.dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, like validation batches."""
        return self._loader(self.dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: ``prompt_input_ids`` (left-padded), ``prompt_attention_mask``, ``prompts``."""
        if "predict" not in self._datasets:
            self.setup("predict")
        return self._loader(self._datasets["predict"], self.eval_batch_size, mode="predict")

    # -- used by the LightningModule -----------------------------------------------------------------
    def extract_answer(self, text: str) -> str:
        """The answer in generated text: the text without surrounding whitespace."""
        return text.strip()

    @property
    def generation_max_new_tokens(self) -> int:
        """How many tokens ``predict`` generates (``max_new_tokens``)."""
        return self.max_new_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train_file={self.train_file!r}, packing={self.packing}, max_length={self.max_length})"
