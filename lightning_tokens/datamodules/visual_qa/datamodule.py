"""The :class:`VisualQADataModule`: images with questions and answers from the user's files or from the generated
benchmark (:mod:`.benchmark`), batched by the vision-language module's processor, with the generation-evaluation
hooks (metrics routed by task, answer extraction, generation budget)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.datamodules.visual_qa.benchmark import (
    BENCHMARK_TASKS,
    _grid,
    derive_seed,
    example_key,
    generate_benchmark_split,
    load_digits_data,
)
from lightning_tokens.datamodules.visual_qa.records import VisualQAExample, read_visual_qa_file

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["VisionTextProcessor", "VisualQACollator", "VisualQADataModule", "VisualQADataset"]

_SPLITS = ("train", "val", "test")
_PROCESSOR_KEYS_TRAIN = ("input_ids", "attention_mask", "labels")
_PROCESSOR_KEYS_PROMPT = ("prompt_input_ids", "prompt_attention_mask")


@runtime_checkable
class VisionTextProcessor(Protocol):
    """What batches images and texts for a vision-language module (the module's ``processor`` attribute).

    Called with answers it returns right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 except on
    the answer tokens), left-padded ``prompt_input_ids`` / ``prompt_attention_mask`` (the question alone, for
    generation) and ``pixel_values``, plus any model-specific keys (``image_grid_thw``, ...). Without answers
    only the prompt keys and ``pixel_values``. ``chat=True`` wraps the question in the model's chat template.
    """

    def __call__(
        self,
        images: list[Image.Image],
        questions: list[str],
        answers: list[str] | None = None,
        chat: bool = False,
    ) -> dict[str, torch.Tensor]: ...


class VisualQADataset(Dataset):
    """Examples whose images are rendered (or loaded) when an item is read.

    Items are dicts with ``image`` (PIL RGB), ``question`` (raw), ``prompt`` (``prompt_format`` applied),
    ``answer``, ``domain``, ``count``, ``num_objects`` and ``example_id`` (the index).

    Example:
        >>> from lightning_tokens.datamodules.visual_qa.benchmark import generate_benchmark_split
        >>> dataset = VisualQADataset(generate_benchmark_split("digits", "test", 2, seed=0), "Q: {question} A:")
        >>> item = dataset[0]
        >>> item["prompt"], item["image"].mode
        ('Q: Which digit is this? A:', 'RGB')
    """

    def __init__(self, examples: Sequence[VisualQAExample], prompt_format: str = "{question}") -> None:
        self.examples = list(examples)
        self.prompt_format = prompt_format

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        return {
            "example_id": index,
            "image": example.image.render(),
            "question": example.question,
            "prompt": self.prompt_format.format(question=example.question),
            "answer": example.answer,
            "domain": example.domain,
            "count": example.count,
            "num_objects": example.num_objects,
        }


@dataclass
class VisualQACollator:
    """Collate :class:`VisualQADataset` items through the module's processor (a picklable object, so worker
    processes work when the processor pickles).

    Args:
        processor: a :class:`VisionTextProcessor`.
        mode: ``"train"``/``"eval"`` call ``processor(images, prompts, answers, chat=chat)``; ``"predict"``
            calls ``processor(images, prompts, None, chat=chat)``.
        chat: passed to the processor (the datamodule's ``template="chat"``).

    The batch holds every key the processor returned, plus ``prompts`` (the texts given to the processor),
    ``questions``, ``domains``, ``example_id``, ``answers`` (when known), ``counts`` (the ground-truth count,
    -1 where the example is not a counting one) and ``num_objects`` (-1 where unknown).
    """

    processor: Any
    mode: Literal["train", "eval", "predict"] = "train"
    chat: bool = False

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images = [item["image"] for item in items]
        prompts = [item["prompt"] for item in items]
        answers = [item["answer"] for item in items]
        with_answers = self.mode != "predict"
        if with_answers and any(a is None for a in answers):
            raise ConfigError("Training/evaluation batches need answers; a record without one is for predict only.")
        out = self.processor(images, prompts, answers if with_answers else None, chat=self.chat)
        if not isinstance(out, dict):
            raise ConfigError(
                f"The processor {type(self.processor).__name__} returned {type(out).__name__}; it must return a dict "
                "of tensors (input_ids, labels, prompt_input_ids, pixel_values, ...)."
            )
        needed = (_PROCESSOR_KEYS_TRAIN if with_answers else ()) + (_PROCESSOR_KEYS_PROMPT if self.mode != "train" else ())
        missing = [key for key in needed if key not in out]
        if missing:
            raise ConfigError(
                f"The processor {type(self.processor).__name__} returned no {', '.join(missing)} for a {self.mode} "
                f"batch (it returned {', '.join(sorted(out)) or 'nothing'}); see VisionTextProcessor for its contract."
            )
        batch: dict[str, Any] = dict(out)
        batch["prompts"] = prompts
        batch["questions"] = [item["question"] for item in items]
        batch["domains"] = [item["domain"] for item in items]
        batch["example_id"] = torch.tensor([int(item["example_id"]) for item in items], dtype=torch.long)
        if all(a is not None for a in answers):
            batch["answers"] = answers
        batch["counts"] = torch.tensor([-1 if i["count"] is None else int(i["count"]) for i in items], dtype=torch.long)
        batch["num_objects"] = torch.tensor(
            [-1 if i["num_objects"] is None else int(i["num_objects"]) for i in items], dtype=torch.long
        )
        return batch


class VisualQADataModule(ResumableDataMixin, L.LightningDataModule):
    """Visual question answering for vision-language fine-tuning and generation-based evaluation.

    Features:
        - Your files: JSON Lines, JSON or CSV records of ``{image, question, answer}`` (field names configurable;
          image paths relative to the file's folder; an optional ``domain`` field routes metrics). Errors name
          the file, the line and the field.
        - A generated offline benchmark in the spirit of GVTBench (:mod:`~.benchmark`): object ``counting`` and
          multi-class identification (``mci``) on drawn shapes, and ``digits`` on scikit-learn's handwritten
          digit scans; deterministic per (seed, split, task); MCI exactly balanced; digits splits disjoint.
        - Batches are made by the module's processor (:class:`VisionTextProcessor`), taken from
          ``trainer.lightning_module.processor`` unless given; everything it returns is passed on, plus
          ``answers``, ``prompts``, ``questions``, ``domains``, ``example_id``, ``counts`` and ``num_objects``.
        - :meth:`build_metrics` scores generated answers per task (``val/counting/mae``, ``val/mci/accuracy``,
          ...), :meth:`extract_answer` cleans them as GVTBench does.

    Sources per split: a split's file (``train_file`` ...) if given; otherwise the benchmark, if ``tasks`` are
    set. ``tasks=None`` means all three benchmark tasks when no data file is given at all, and no benchmark when
    one is (so ``train_file`` alone does not mix in generated data); ``tasks=[]`` turns the benchmark off.

    Args:
        tasks: benchmark tasks (``"counting"``, ``"mci"``, ``"digits"``; ``"all"`` for every one), one string
            or a list; see above for ``None``.
        train_file: training records (``.jsonl``, ``.json`` or ``.csv``).
        val_file: validation records.
        test_file: test records.
        predict_file: records for ``predict`` (the answer may be left out); ``None`` predicts the test split.
        processor: the :class:`VisionTextProcessor` (from Python); ``None`` takes
            ``trainer.lightning_module.processor``.
        template: ``"plain"`` or ``"chat"`` (passed to the processor as ``chat=``).
        prompt_format: applied to each question before it reaches the processor, e.g.
            ``"{question} Answer with one word."``; must contain ``{question}``.
        image_field: record field holding the image path.
        question_field: record field holding the question.
        answer_field: record field holding the answer.
        domain_field: optional record field naming the record's task (metrics are routed by it).
        default_domain: task name of records without ``domain_field``.
        check_images: check at setup that every file image exists and Pillow can open it.
        num_train: generated training examples **per task**.
        num_val: generated validation examples per task.
        num_test: generated test examples per task.
        image_size: side of the generated square RGB images, in pixels.
        max_count: counting answers are uniform in ``1..max_count``.
        max_distractors: counting images add up to this many shapes of other kinds.
        max_objects: MCI images hold ``1..max_objects`` shapes.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes (the processor must pickle).
        seed: base seed of the generated data and the shuffling; ``None`` takes ``seed_everything``'s seed
            (else 1234).
        max_new_tokens: generation budget; ``None`` = 8 for the benchmark, or with files the longest
            validation/test answer in tokens (characters without a processor tokenizer) + 2, at least 8.

    Example:
        >>> import torch
        >>> def processor(images, questions, answers=None, chat=False):
        ...     n = len(images)
        ...     out = {"prompt_input_ids": torch.ones(n, 3, dtype=torch.long),
        ...            "prompt_attention_mask": torch.ones(n, 3, dtype=torch.long),
        ...            "pixel_values": torch.zeros(n, 3, 8, 8)}
        ...     if answers is not None:
        ...         out |= {"input_ids": torch.ones(n, 4, dtype=torch.long),
        ...                 "attention_mask": torch.ones(n, 4, dtype=torch.long),
        ...                 "labels": torch.full((n, 4), -100)}
        ...     return out
        >>> dm = VisualQADataModule(tasks=["counting", "mci"], processor=processor, num_train=4, num_val=2,
        ...                         num_test=2, batch_size=4, seed=0)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.val_dataloader()))
        >>> batch["domains"], batch["answers"][2:]
        (['counting', 'counting', 'mci', 'mci'], ['No.', 'Yes.'])
    """

    seed = SeedOption()  # None: seed_everything's seed, read when used

    def __init__(
        self,
        tasks: list[str] | str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        predict_file: str | None = None,
        processor: Any = None,
        template: Literal["plain", "chat"] = "plain",
        prompt_format: str = "{question}",
        image_field: str = "image",
        question_field: str = "question",
        answer_field: str = "answer",
        domain_field: str = "domain",
        default_domain: str = "vqa",
        check_images: bool = True,
        num_train: int = 1000,
        num_val: int = 100,
        num_test: int = 300,
        image_size: int = 64,
        max_count: int = 6,
        max_distractors: int = 3,
        max_objects: int = 6,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        super().__init__()
        files = {"train": train_file, "val": val_file, "test": test_file}
        if tasks is None:
            task_list = [] if any(f is not None for f in (*files.values(), predict_file)) else list(BENCHMARK_TASKS)
        else:
            task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        if task_list == ["all"]:
            task_list = list(BENCHMARK_TASKS)
        for task in task_list:
            if task not in BENCHMARK_TASKS:
                raise ConfigError(
                    f"VisualQADataModule(tasks=...): unknown task {task!r}; choose from {', '.join(BENCHMARK_TASKS)} "
                    "(or 'all')."
                )
        task_list = list(dict.fromkeys(task_list))
        check_choice("VisualQADataModule", "template", template, ("plain", "chat"), " (plain text, or the model's chat template)")
        if "{question}" not in prompt_format:
            raise ConfigError(
                f"VisualQADataModule(prompt_format={prompt_format!r}): prompt_format must contain '{{question}}', "
                "e.g. '{question} Answer with a number.'"
            )
        try:
            prompt_format.format(question="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"VisualQADataModule(prompt_format={prompt_format!r}) is not a format string with only {{question}} "
                f"({err!r}); write literal braces as '{{{{' and '}}}}'."
            ) from None
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test), ("num_workers", num_workers)):
            if value < 0:
                raise ConfigError(f"VisualQADataModule({name}={value}): {name} must be >= 0.")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_count", max_count),
                            ("max_objects", max_objects)):
            if value < 1:
                raise ConfigError(f"VisualQADataModule({name}={value}): {name} must be >= 1.")
        if max_distractors < 0:
            raise ConfigError(f"VisualQADataModule(max_distractors={max_distractors}): must be >= 0.")
        if image_size < 8:
            raise ConfigError(f"VisualQADataModule(image_size={image_size}): use at least 8 pixels (64 is the default).")
        if "counting" in task_list:
            _grid(image_size, max_count + max_distractors)  # fails now, not at the first batch, if shapes cannot fit
        if "mci" in task_list:
            _grid(image_size, max_objects)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"VisualQADataModule(max_new_tokens={max_new_tokens}): must be >= 1 or None.")
        if processor is not None and not callable(processor):
            raise ConfigError(
                f"VisualQADataModule(processor=...) must be callable as processor(images, questions, answers, chat=...); "
                f"got {type(processor).__name__}."
            )
        # "data_" keys where a vision-language module may have an option of the same name but another meaning
        # (Lightning refuses to log two different values under one key)
        self.save_hyperparameters({
            "tasks": task_list, "train_file": train_file, "val_file": val_file, "test_file": test_file,
            "predict_file": predict_file, "data_template": template, "prompt_format": prompt_format,
            "image_field": image_field, "question_field": question_field, "answer_field": answer_field,
            "domain_field": domain_field, "default_domain": default_domain, "check_images": check_images,
            "num_train": num_train, "num_val": num_val, "num_test": num_test, "data_image_size": image_size,
            "max_count": max_count, "max_distractors": max_distractors, "max_objects": max_objects,
            "batch_size": batch_size, "eval_batch_size": eval_batch_size, "num_workers": num_workers, "seed": seed,
            "max_new_tokens": max_new_tokens,
        })
        self.tasks = task_list
        self.files = files
        self.predict_file = predict_file
        self.template = template
        self.prompt_format = prompt_format
        self.fields = {"image_field": image_field, "question_field": question_field, "answer_field": answer_field,
                       "domain_field": domain_field}
        self.default_domain = default_domain
        self.check_images = check_images
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = image_size
        self.max_count, self.max_distractors, self.max_objects = max_count, max_distractors, max_objects
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.processor = processor
        self._examples: dict[str, list[VisualQAExample]] = {}
        self._generated: dict[tuple[str, str], list[VisualQAExample]] = {}

    # -- examples ------------------------------------------------------------------------------------------
    def _read(self, path: str, option: str, require_answer: bool = True) -> list[VisualQAExample]:
        return read_visual_qa_file(
            path, **self.fields, default_domain=self.default_domain, require_answer=require_answer,
            check_images=self.check_images, option=option,
        )

    def _benchmark(self, task: str, split: str) -> list[VisualQAExample]:
        """The generated examples of one task and split (kept); counting/MCI avoid the (question, image) pairs of
        the earlier splits (train, then val, then test), digits splits are disjoint by construction."""
        key = (task, split)
        if key not in self._generated:
            exclude: set[tuple[object, ...]] = set()
            if task != "digits":
                for earlier in _SPLITS[: _SPLITS.index(split)]:
                    exclude |= {example_key(e) for e in self._benchmark(task, earlier)}
            if task == "digits" and split == "train":
                total = len(load_digits_data()[0])
                available = total - self.sizes["val"] - self.sizes["test"]
                if self.sizes["train"] > available > 0:
                    rank_zero_warn(
                        f"VisualQADataModule: the digits task has {available} training images ({total} minus num_val "
                        f"and num_test) for num_train={self.sizes['train']}; training repeats them."
                    )
            self._generated[key] = generate_benchmark_split(
                task, split, self.sizes[split], self.seed, image_size=self.image_size, max_count=self.max_count,
                max_distractors=self.max_distractors, max_objects=self.max_objects,
                digit_split_sizes=(self.sizes["val"], self.sizes["test"]), exclude=exclude,
            )
        return self._generated[key]

    def split_examples(self, split: Literal["train", "val", "test", "predict"]) -> list[VisualQAExample]:
        """The examples of a split (read or generated on first use, then kept).

        Raises:
            ConfigError: the split has no source (no file and no benchmark tasks).
        """
        if split in self._examples:
            return self._examples[split]
        if split == "predict":
            if self.predict_file is not None:
                examples = self._read(self.predict_file, "predict_file", require_answer=False)
            else:
                examples = self.split_examples("test")
        elif split not in _SPLITS:
            raise ConfigError(f"Unknown split {split!r}: use 'train', 'val', 'test' or 'predict'.")
        elif self.files[split] is not None:
            examples = self._read(self.files[split], f"{split}_file")
        elif self.tasks:
            examples = [e for task in self.tasks for e in self._benchmark(task, split)]
        else:
            raise ConfigError(
                f"VisualQADataModule has no {split} data: set {split}_file, or tasks (e.g. [counting, mci, digits]) "
                "for the generated benchmark."
            )
        self._examples[split] = examples
        return examples

    def has_split(self, split: str) -> bool:
        """Whether ``split`` (``"train"``, ``"val"``, ``"test"``, ``"predict"``) has a source: its file or the
        benchmark (``"predict"``: ``predict_file`` or the test split)."""
        if split == "predict":
            return self.predict_file is not None or self.has_split("test")
        return self.files.get(split) is not None or bool(self.tasks)

    # -- processor -----------------------------------------------------------------------------------------
    def _resolve_processor(self, required: bool = True) -> Any:
        if self.processor is not None:
            return self.processor
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        processor = getattr(module, "processor", None)
        if processor is None:
            if not required:
                return None
            raise ConfigError(
                "VisualQADataModule(processor=None) batches with the LightningModule's `processor` attribute, but "
                + ("no trainer is attached" if trainer is None else f"{type(module).__name__} has no `processor`")
                + "; use a vision-language module that has one, or pass processor= (from Python)."
            )
        if not callable(processor):
            raise ConfigError(f"The LightningModule's `processor` ({type(processor).__name__}) is not callable.")
        self.processor = processor
        return processor

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read or generate the splits ``stage`` needs, and take the module's processor if it has one already
        (else when the first dataloader is made)."""
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }.get(stage or "", ("train", "val", "test"))
        for split in needed:
            if split == "val" and stage == "fit" and not self.has_split("val"):
                continue  # training without validation
            self.split_examples(split)  # type: ignore[arg-type]
        self._resolve_processor(required=False)

    def _loader(self, split: str, mode: Literal["train", "eval", "predict"], shuffle: bool, batch_size: int) -> DataLoader:
        dataset = VisualQADataset(self.split_examples(split), self.prompt_format)  # type: ignore[arg-type]
        seed = derive_seed(self.seed, "shuffle", split) % (2**31)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._resumable_sampler(len(dataset), seed, batch_size) if shuffle else None,
            collate_fn=VisualQACollator(self._resolve_processor(), mode, chat=self.template == "chat"),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: the processor's keys plus ``answers``, ``prompts``, ``domains``, ...."""
        return self._loader("train", "train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches: training keys plus the left-padded ``prompt_input_ids``/``prompt_attention_mask``
        (an empty list, i.e. no validation, when there is neither ``val_file`` nor a benchmark)."""
        if not self.has_split("val"):
            return []
        return self._loader("val", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, with the keys of validation batches."""
        return self._loader("test", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: the processor's prompt keys and ``pixel_values``, ``prompts``, ``domains`` (and
        ``answers`` when every record has one)."""
        return self._loader("predict", "predict", shuffle=False, batch_size=self.eval_batch_size)

    # -- used by the LightningModule -----------------------------------------------------------------------
    def _eval_domains(self) -> list[str]:
        domains: list[str] = []
        for split in ("val", "test"):
            if self.files[split] is not None:
                domains += [e.domain for e in self.split_examples(split)]  # type: ignore[arg-type]
            else:
                domains += self.tasks
        if not domains and self.files["train"] is not None:
            domains = [e.domain for e in self.split_examples("train")]
        return list(dict.fromkeys(domains)) or [self.default_domain]

    def build_metrics(self, prefix: str) -> Any:
        """A fresh :class:`~lightning_tokens.metrics.visual_qa.VisualQAMetrics` for the tasks of the evaluation
        data, keyed ``{prefix}{task}/{metric}``: ``counting`` → ``accuracy``, ``mae``, ``rmse``; ``mci`` →
        ``accuracy``; ``digits`` → ``accuracy``; other domains of your files → ``exact_match``.

        ``update(predictions, targets, domains)`` takes extracted answers (:meth:`extract_answer`), the batch's
        ``answers`` and ``domains``.
        """
        from lightning_tokens.metrics.visual_qa import VisualQAMetrics

        return VisualQAMetrics(self._eval_domains(), prefix=prefix)

    def extract_answer(self, text: str, domain: str | None = None) -> str:
        """The answer in generated text, cleaned as GVTBench does (cut at the first sentence end, ``"."``
        appended; see :func:`lightning_tokens.metrics.gvtbench.postprocess`). ``domain`` is accepted for the
        datamodule protocol; the clean-up is the same for every task."""
        from lightning_tokens.metrics.gvtbench import postprocess

        return postprocess(text)

    @property
    def generation_max_new_tokens(self) -> int:
        """``max_new_tokens`` if given; else 8 for the benchmark, or with files the longest validation/test
        answer in tokens of the processor's ``tokenizer`` (characters without one) + 2, at least 8."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        answers = [
            e.answer for split in ("val", "test") if self.files[split] is not None
            for e in self.split_examples(split) if e.answer is not None  # type: ignore[arg-type]
        ]
        if not answers:
            return 8
        unique = sorted(set(answers))
        tokenizer = getattr(self._resolve_processor(required=False), "tokenizer", None)
        if tokenizer is not None and callable(tokenizer):
            try:
                longest = max(len(ids) for ids in tokenizer(unique, add_special_tokens=False)["input_ids"])
            except Exception:  # noqa: BLE001 - any tokenizer that does not take this call: count characters
                longest = max(len(a) for a in unique)
        else:
            longest = max(len(a) for a in unique)
        return max(8, longest + 2)

    def __repr__(self) -> str:
        sources = {k: v for k, v in self.files.items() if v is not None}
        return f"{type(self).__name__}(tasks={self.tasks}, files={sources}, image_size={self.image_size})"
