"""The :class:`NUPADataModule`: generates Number Cookbook splits, tokenizes them and serves the train/eval/predict
loaders and the generation-evaluation hooks (metrics, answer extraction, generation budget)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.datamodules.nupa.dataset import NUPACollator, NUPADataset, _read_prompts
from lightning_tokens.datamodules.nupa.tasks import (
    NUPA_TASKS,
    NUPAExample,
    _check_digits,
    _derive_seed,
    _generate_heldout,
    _task_spec,
    generate_nupa_examples,
)
from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.metrics.nupa import extract_answer as _extract_answer
from lightning_tokens.metrics.nupa import nupa_metric_collection
from lightning_tokens.models.tokenizers import bos_prefix, datamodule_tokenizer

__all__ = ["NUPADataModule"]


class NUPADataModule(ResumableDataMixin, L.LightningDataModule):
    """Number Cookbook tasks for supervised fine-tuning and generation-based evaluation.

    Features:
        - Tasks generated in code from a seed (see :mod:`lightning_tokens.datamodules.nupa.tasks` for tasks,
          wording and formats);
          several tasks mix into one training set.
        - Completion-only labels: only the answer and eos carry loss; labels are not shifted.
        - Validation/test batches also carry left-padded prompts for ``generate`` and the answers,
          domains, prompts and tasks as lists, for :meth:`build_metrics`.
        - Held-out sets use seeds different from training and are decontaminated: their prompts are
          unique and absent from the training set (and test prompts from validation) when the digit
          range leaves enough distinct problems; otherwise the shortfall is filled and a warning given.

    Args:
        tasks: task keys (``"Integer/add"``, ...; ``"all"`` for every task), one string or a list.
        tokenizer: ``None`` takes ``trainer.lightning_module.tokenizer`` at ``setup``; a string goes
            through :func:`~lightning_tokens.models.tokenizers.resolve_tokenizer` (``"char"``, a local
            directory, or a Hub id). A tokenizer object is accepted too (from Python).
        train_digits: ``(min, max)`` digit lengths of training examples.
        test_digits: ``(min, max)`` digit lengths of test examples.
        val_digits: ``(min, max)`` for validation; ``None`` uses ``test_digits`` (the reference validates
            on the test lengths).
        num_train: training examples **per task**.
        num_val: validation examples per task.
        num_test: test examples per task.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        max_length: longest tokenized prompt + answer + eos. Longer examples lose prompt tokens from the
            left (the answer is kept whole; a leading bos is kept) with a warning; prediction prompts are
            cut to ``max_length - generation_max_new_tokens``.
        seed: base seed; each (split, task) pair gets its own derived seed. ``None`` (the default) takes
            the seed of ``seed_everything`` (the CLI's ``seed_everything:``), else 1234.
        num_workers: DataLoader worker processes.
        max_new_tokens: generation budget; ``None`` = longest held-out answer in tokens + 2.
        predict_file: prompts for ``predict`` (``.jsonl``/``.json``: objects with a ``"prompt"``
            field; other files: one prompt per line); ``None`` predicts the test prompts.
        type_hint: prefix prompts with the reference's answer-type hint (off by default: the hint is
            80–130 characters and the same for every example of a domain).
        decontaminate: filter held-out prompts against training (and test against validation).
        train_format: ``"sft"`` (supervised batches) or ``"prompts"``: training batches also carry the
            left-padded prompts and the ``answers``/``domains``/``prompts``/``tasks`` lists, what
            :class:`~lightning_tokens.GRPO` rolls out from and its rewards score.

    Example:
        >>> dm = NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=8, num_val=4, num_test=4)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch)
        ['attention_mask', 'example_id', 'input_ids', 'labels']
    """

    seed = SeedOption()  # None: seed_everything's seed, read when used

    def __init__(
        self,
        tasks: list[str] | str = "Integer/add",
        tokenizer: str | None = None,
        train_digits: tuple[int, int] = (1, 3),
        test_digits: tuple[int, int] = (1, 3),
        val_digits: tuple[int, int] | None = None,
        num_train: int = 20000,
        num_val: int = 200,
        num_test: int = 500,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        max_length: int = 256,
        seed: int | None = None,
        num_workers: int = 0,
        max_new_tokens: int | None = None,
        predict_file: str | None = None,
        type_hint: bool = False,
        decontaminate: bool = True,
        train_format: Literal["sft", "prompts"] = "sft",
    ) -> None:
        super().__init__()
        task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        if task_list == ["all"]:
            task_list = list(NUPA_TASKS)
        if not task_list:
            raise ConfigError("tasks must name at least one NUPA task.")
        for task in task_list:
            _task_spec(task)
        for name, digits in (("train_digits", train_digits), ("test_digits", test_digits), ("val_digits", val_digits)):
            if digits is None:
                continue
            if len(digits) != 2:
                raise ConfigError(f"{name} must be (min, max), got {digits!r}.")
            _check_digits(int(digits[0]), int(digits[1]))
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}.")
        check_choice("NUPADataModule", "train_format", train_format, ("sft", "prompts"),
                     " (supervised batches, or prompts for GRPO)")
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}.")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}.")
        tokenizer_name = tokenizer if (tokenizer is None or isinstance(tokenizer, str)) else None
        self.save_hyperparameters({
            "tasks": task_list,
            "data_tokenizer": tokenizer_name,  # distinct key: merged with the module's hparams in logs
            "train_digits": tuple(train_digits),
            "test_digits": tuple(test_digits),
            "val_digits": tuple(val_digits) if val_digits is not None else None,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "max_length": max_length,
            "seed": seed,
            "num_workers": num_workers,
            "max_new_tokens": max_new_tokens,
            "predict_file": predict_file,
            "type_hint": type_hint,
            "decontaminate": decontaminate,
            "train_format": train_format,
        })
        self.tasks = task_list
        self.train_digits = (int(train_digits[0]), int(train_digits[1]))
        self.test_digits = (int(test_digits[0]), int(test_digits[1]))
        self.val_digits = (int(val_digits[0]), int(val_digits[1])) if val_digits is not None else self.test_digits
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.max_new_tokens = max_new_tokens
        self.predict_file = predict_file
        self.type_hint = type_hint
        self.decontaminate = decontaminate
        self.train_format = train_format

        self._tokenizer_arg: str | PreTrainedTokenizerBase | None = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._examples: dict[str, list[NUPAExample]] | None = None
        self._datasets: dict[str, NUPADataset] = {}
        self._bos_prefix: list[int] = []

    # -- examples ------------------------------------------------------------------------------------
    @property
    def examples(self) -> dict[str, list[NUPAExample]]:
        """Generated examples per split (``"train"``, ``"val"``, ``"test"``), built on first access."""
        if self._examples is None:
            self._examples = self._generate_all()
        return self._examples

    def _generate_all(self) -> dict[str, list[NUPAExample]]:
        splits: dict[str, list[NUPAExample]] = {"train": [], "val": [], "test": []}
        for task in self.tasks:
            train = generate_nupa_examples(
                task, self.num_train, *self.train_digits, seed=_derive_seed(self.seed, "train", task), type_hint=self.type_hint
            )
            train_prompts = {e.prompt for e in train}
            val, val_overlap = _generate_heldout(
                task, self.num_val, *self.val_digits, seed=_derive_seed(self.seed, "val", task), exclude=train_prompts,
                type_hint=self.type_hint, decontaminate=self.decontaminate,
            )
            test, test_overlap = _generate_heldout(
                task, self.num_test, *self.test_digits, seed=_derive_seed(self.seed, "test", task),
                exclude=train_prompts | {e.prompt for e in val}, type_hint=self.type_hint, decontaminate=self.decontaminate,
            )
            if val_overlap or test_overlap:
                rank_zero_warn(
                    f"NUPA task {task}: the digit ranges leave too few distinct problems to decontaminate fully; "
                    f"{val_overlap}/{self.num_val} validation and {test_overlap}/{self.num_test} test examples may "
                    "repeat or appear in training. Widen the digit ranges or lower num_val/num_test."
                )
            splits["train"] += train
            splits["val"] += val
            splits["test"] += test
        return splits

    # -- tokenizer -----------------------------------------------------------------------------------
    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        tokenizer = datamodule_tokenizer(self._tokenizer_arg, self.trainer, type(self).__name__)
        if tokenizer.eos_token_id is None:
            raise ConfigError("The NUPA datamodule needs a tokenizer with an eos token (it ends every answer).")
        self.tokenizer = tokenizer
        self._bos_prefix = bos_prefix(tokenizer)
        return tokenizer

    def _encode(self, texts: Sequence[str], chunk_size: int = 4096) -> list[array]:
        """Token ids (``array('i')``) of each text without special tokens; repeated texts are encoded once."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        unique = list(dict.fromkeys(texts))
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        use_backend = backend is not None and backend.truncation is None and backend.padding is None
        lookup: dict[str, array] = {}
        for start in range(0, len(unique), chunk_size):
            chunk = unique[start : start + chunk_size]
            if use_backend:
                # Same ids as tokenizer(chunk, add_special_tokens=False), without the per-text Python overhead.
                encoded = [enc.ids for enc in backend.encode_batch(chunk, add_special_tokens=False)]
            else:
                encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            lookup.update((text, array("i", ids)) for text, ids in zip(chunk, encoded))
        return [lookup[t] for t in texts]

    def _truncate_prompt(self, prompt_ids: array, budget: int) -> array:
        if len(prompt_ids) <= budget:
            return prompt_ids
        bos = array("i", self._bos_prefix)
        if bos and prompt_ids[: len(bos)] == bos and budget > len(bos):
            return bos + prompt_ids[len(prompt_ids) - (budget - len(bos)) :]
        return prompt_ids[len(prompt_ids) - budget :]

    def _build_dataset(self, examples: Sequence[NUPAExample], split: str) -> NUPADataset:
        tokenizer = self._resolve_tokenizer()
        bos, eos = array("i", self._bos_prefix), array("i", [int(tokenizer.eos_token_id)])
        prompt_ids = [bos + ids for ids in self._encode([e.prompt for e in examples])]
        answer_ids = [ids + eos for ids in self._encode([e.answer for e in examples])]
        truncated = 0
        for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            if len(p) + len(a) > self.max_length:
                budget = self.max_length - len(a)
                if budget < 1:
                    raise ConfigError(
                        f"max_length={self.max_length} cannot hold the {split} answer {examples[i].answer!r} "
                        f"({len(a)} tokens with eos) plus a prompt; raise max_length."
                    )
                prompt_ids[i] = self._truncate_prompt(p, budget)
                truncated += 1
        if truncated:
            rank_zero_warn(
                f"NUPA {split}: {truncated}/{len(examples)} examples exceed max_length={self.max_length}; their prompts "
                "were cut from the left. Raise max_length to keep whole prompts."
            )
        return NUPADataset(
            prompts=[e.prompt for e in examples],
            prompt_ids=prompt_ids,
            answers=[e.answer for e in examples],
            answer_ids=answer_ids,
            domains=[e.domain for e in examples],
            tasks=[e.task for e in examples],
        )

    def _build_predict_dataset(self) -> NUPADataset:
        self._resolve_tokenizer()
        prompts = _read_prompts(self.predict_file) if self.predict_file is not None else [e.prompt for e in self.examples["test"]]
        budget = max(1, self.max_length - self.generation_max_new_tokens)
        bos = array("i", self._bos_prefix)
        prompt_ids = [self._truncate_prompt(bos + ids, budget) for ids in self._encode(prompts)]
        return NUPADataset(prompts=prompts, prompt_ids=prompt_ids)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, generate the examples (once) and tokenize the splits ``stage`` needs."""
        self._resolve_tokenizer()
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test"),
        }.get(stage, ("train", "val", "test"))
        for split in needed:
            if split in self._datasets:
                continue
            if split == "predict":
                self._datasets[split] = self._build_predict_dataset()
            else:
                self._datasets[split] = self._build_dataset(self.examples[split], split)

    def _dataset(self, split: str) -> NUPADataset:
        if split not in self._datasets:
            stage = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split]
            self.setup(stage)
        return self._datasets[split]

    def _pad_id(self) -> int:
        assert self.tokenizer is not None
        return int(self.tokenizer.pad_token_id)

    def _loader(self, split: str, mode: Literal["train", "eval", "predict"], shuffle: bool, batch_size: int) -> DataLoader:
        dataset = self._dataset(split)
        seed = _derive_seed(self.seed, "shuffle", split) % (2**31)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._resumable_sampler(len(dataset), seed, batch_size) if shuffle else None,
            collate_fn=NUPACollator(self._pad_id(), mode),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: ``input_ids``, ``attention_mask``, ``labels``, ``example_id``; with
        ``train_format="prompts"`` also the keys of validation batches (prompts and answers, for GRPO)."""
        mode = "eval" if self.train_format == "prompts" else "train"
        return self._loader("train", mode, shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation batches: training keys plus generation inputs and ``answers``/``domains``/``prompts``/``tasks``."""
        return self._loader("val", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, with the same keys as validation batches."""
        return self._loader("test", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: ``prompt_input_ids``, ``prompt_attention_mask`` and ``prompts`` only."""
        return self._loader("predict", "predict", shuffle=False, batch_size=self.eval_batch_size)

    # -- used by the LightningModule -----------------------------------------------------------------
    def build_metrics(self, prefix: str) -> Any:
        """A fresh ``MetricCollection`` with ``exact_match``, ``digit_match`` and ``dlength`` under ``prefix``."""
        return nupa_metric_collection(prefix)

    def extract_answer(self, text: str, domain: str | None = None, continuation: bool | None = None) -> str:
        """The answer in generated text (the continuation alone, or prompt + continuation); see
        :func:`lightning_tokens.metrics.nupa.extract_answer`. Pass the example's ``domain`` (from
        ``batch["domains"]``) for the reference's exact per-domain pattern."""
        return _extract_answer(text, domain, continuation=continuation)

    @property
    def generation_max_new_tokens(self) -> int:
        """``max_new_tokens`` if given, else the longest validation/test answer in tokens (characters
        before a tokenizer is known) + 2."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        answers = [e.answer for split in ("val", "test") for e in self.examples[split]]
        if not answers:
            answers = [e.answer for e in self.examples["train"]]
        if not answers:
            return 2
        if self.tokenizer is not None:
            longest = max(len(ids) for ids in self._encode(sorted(set(answers))))
        else:
            longest = max(len(a) for a in answers)
        return longest + 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={self.tasks}, train_digits={self.train_digits}, test_digits={self.test_digits})"
