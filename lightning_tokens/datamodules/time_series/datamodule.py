"""The :class:`TimeSeriesDataModule`: labelled time series as TimeMaster prompts for a vision-language model (each
series rendered as the reference's plot) or, for the numeric-input ablation, for a text LM (the series written as
numbers in the prompt)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.datamodules.time_series.archive import (
    SHIPPED_TASKS,
    apply_nan_policy,
    load_shipped,
    read_series_file,
)
from lightning_tokens.datamodules.time_series.prompts import answer_text, numeric_series_text, task_prompt
from lightning_tokens.datamodules.time_series.render import PlotCache, PlotSettings, load_plot
from lightning_tokens.datamodules.visual_qa.benchmark import derive_seed
from lightning_tokens.datamodules.visual_qa.datamodule import VisualQACollator

__all__ = ["NumericPromptProcessor", "TimeSeriesCollator", "TimeSeriesDataModule", "TimeSeriesExample"]

_DEFAULT_REASONING = "The signal spans {min:.2f} to {max:.2f} and peaks at {peak_position:.0%} of its length."
_GENERIC_DESCRIPTION = "You are analyzing a time series signal."
#: Extra new tokens for an ``<extension>`` recommendation, which the SFT targets do not hold.
_EXTENSION_BUDGET = 64


@dataclass
class TimeSeriesExample:
    """One labelled series of a split: ``values`` ``(C, T)``, its class word ``label``, and its index in the split
    as the archive or file orders it (the plot cache key)."""

    values: np.ndarray
    label: str
    index: int


def reasoning_fields(values: np.ndarray, label: str) -> dict[str, Any]:
    """The placeholders a reasoning template may use: ``label``, ``min``, ``max``, ``mean``, ``std``, ``length``,
    ``channels``, ``peak_position`` (where the largest value is, as a fraction of the length), ``trend``
    (``rising``/``falling``/``flat``: last value against the first, relative to the range).

    Example:
        >>> fields = reasoning_fields(np.array([[0.0, 2.0, 1.0]]), "Up")
        >>> fields["max"], fields["peak_position"], fields["trend"]
        (2.0, 0.5, 'rising')
    """
    flat = values.reshape(-1)
    first = values[:, 0].mean()
    last = values[:, -1].mean()
    span = float(flat.max() - flat.min())
    change = (last - first) / span if span > 0 else 0.0
    trend = "rising" if change > 0.1 else "falling" if change < -0.1 else "flat"
    length = values.shape[1]
    return {
        "label": label, "min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()),
        "std": float(flat.std()), "length": length, "channels": values.shape[0],
        "peak_position": int(values.max(0).argmax()) / max(length - 1, 1), "trend": trend,
    }


class NumericPromptProcessor:
    """Text-only batches for the numeric-input ablation, with the vision-language processors' protocol (images are
    ignored): answer-only labels, left-padded ``prompt_*`` keys for generation.

    Args:
        tokenizer: the language model's tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str] | None = None,
                 chat: bool = False) -> dict[str, torch.Tensor]:
        from lightning_tokens.modules.visual_inputs import answer_only_batch

        tok = self.tokenizer
        if chat:
            from lightning_tokens.datamodules.sft.chat import _ChatTemplate

            texts = [_ChatTemplate(tok, None).render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
            prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            prompts = [tok(q, add_special_tokens=True)["input_ids"] for q in questions]
        answer_ids = None
        if answers is not None:
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            answer_ids = [tok(a, add_special_tokens=False)["input_ids"] + eos for a in answers]
        return answer_only_batch(prompts, answer_ids, tok.pad_token_id)


class _TimeSeriesDataset(Dataset):
    def __init__(self, module: TimeSeriesDataModule, split: str, examples: list[TimeSeriesExample]) -> None:
        self.module, self.split, self.examples = module, split, examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.module.item(self.split, self.examples[index], index)


@dataclass
class TimeSeriesCollator(VisualQACollator):
    """:class:`~lightning_tokens.datamodules.visual_qa.VisualQACollator`'s batches, with ``answers`` = the class
    words (what rewards and metrics score; the processor saw the full SFT targets) and ``allowed_labels`` (one
    list per example, for :class:`~lightning_tokens.rewards.TimeMasterReward`)."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(items)
        batch["answers"] = [item["label"] for item in items]
        batch["allowed_labels"] = [list(item["allowed_labels"]) for item in items]
        batch["targets"] = [item["answer"] for item in items]
        for key in ("counts", "num_objects"):
            batch.pop(key, None)
        return batch


class TimeSeriesDataModule(ResumableDataMixin, L.LightningDataModule):
    """Time series classification as TimeMaster prompts: plot (or numbers) → ``<think>…</think><class>label</class>``.

    Data: a shipped UCR/UEA set (``dataset``, from aeon's wheel: see
    :data:`~lightning_tokens.datamodules.time_series.archive.SHIPPED_TASKS`) or your files (``train_file`` /
    ``test_file``: ``.ts``, ``.csv``, ``.npz``/``.npy``, see
    :func:`~lightning_tokens.datamodules.time_series.archive.read_series_file`), split as the archive defines.
    Validation is ``num_val`` series drawn (seeded) from ``val_source``: the test split (TimeMaster validates on
    it) or the training split (then held out of training).

    Each example is rendered once as the reference's plot (``plot`` settings; PNG files under ``cache_dir`` keyed
    by dataset, split, index and settings; a stale file is re-rendered) and batched by the LightningModule's
    ``processor`` (a :class:`~lightning_tokens.VisionLanguageLM`). With ``input: numbers`` the series is written
    into the prompt instead and batched with the module's ``tokenizer`` (any ``TokenLM``).

    Batches hold the processor's keys plus ``prompts``, ``answers`` (class words), ``allowed_labels``, ``targets``
    (the SFT texts) and ``domains``, so ``GRPO``/``VisionLanguageGRPO`` with
    :class:`~lightning_tokens.rewards.TimeMasterReward` train on them, and validation reports ``val/accuracy``
    (the parsed ``<class>`` label) and ``val/format`` (the share of answers with a valid label).

    Args:
        dataset: a shipped set's name; ignored when ``train_file`` is given (then it only names the cache folder).
        train_file: your training series.
        test_file: your test series.
        label_column: the CSV column of the labels.
        id_column: the CSV column that groups rows into multivariate series (``None``: one row, one series).
        class_names: raw label → the word used in prompts and answers (shipped sets have theirs; for files the raw
            labels are used). A label missing from it is an error naming it.
        class_descriptions: word → one line on what the class means (listed in the prompt).
        description: the task/domain text that opens the prompt (shipped sets have theirs).
        channel_names: names of the channels (legend, numeric prompt).
        input: ``plot`` (a vision-language model reads the rendered plot) or ``numbers`` (a text LM reads the
            values: the paper's numeric-input ablation).
        reasoning: ``template`` (SFT targets reason with ``reasoning_template``, a templated stand-in for real
            rationales) or ``none`` (the target is the ``<class>`` part alone).
        reasoning_template: format string over :func:`reasoning_fields`.
        extension: ask for an ``<extension>`` recommendation as well (the EMG variant; SFT targets do not hold one).
        nan_policy: ``error`` or ``interpolate`` (see :func:`~.archive.apply_nan_policy`).
        plot: the rendering settings (the reference's by default).
        cache_dir: where the PNG files go (``None``: ``~/.cache/lightning_tokens/time_series_plots``).
        val_source: ``test`` or ``train``.
        num_val: validation series (``None``: all of ``val_source``, which must then be ``test``).
        num_test: test series used by ``trainer.test`` (``None``: all), the first of a seeded permutation.
        num_train: training series (``None``: all), the first of a seeded permutation.
        number_format: how each value is written with ``input: numbers``.
        template: ``plain`` or ``chat`` (passed to the processor).
        processor: a processor (from Python); ``None`` takes the LightningModule's ``processor`` (``plot``) or wraps
            its ``tokenizer`` (``numbers``).
        batch_size: training batch size (prompts per batch under GRPO).
        eval_batch_size: validation/test/predict batch size.
        num_workers: DataLoader worker processes.
        seed: base seed of the subsets and the shuffling; ``None`` takes ``seed_everything``'s.
        max_new_tokens: generation budget; ``None``: the longest SFT target in tokens (characters without a
            tokenizer) + 8.

    Example:
        >>> dm = TimeSeriesDataModule(dataset="GunPoint", num_val=4, input="numbers")
        >>> dm.setup("fit")
        >>> len(dm.split_examples("train")), len(dm.split_examples("val")), dm.labels
        (50, 4, ['Gun', 'Point'])
    """

    seed = SeedOption()

    def __init__(
        self,
        dataset: str = "GunPoint",
        train_file: str | None = None,
        test_file: str | None = None,
        label_column: str = "label",
        id_column: str | None = None,
        class_names: dict[str, str] | None = None,
        class_descriptions: dict[str, str] | None = None,
        description: str | None = None,
        channel_names: list[str] | None = None,
        input: Literal["plot", "numbers"] = "plot",
        reasoning: Literal["template", "none"] = "template",
        reasoning_template: str = _DEFAULT_REASONING,
        extension: bool = False,
        nan_policy: Literal["error", "interpolate"] = "error",
        plot: PlotSettings | None = None,
        cache_dir: str | None = None,
        val_source: Literal["test", "train"] = "test",
        num_val: int | None = None,
        num_test: int | None = None,
        num_train: int | None = None,
        number_format: str = "{:.3g}",
        template: Literal["plain", "chat"] = "plain",
        processor: Any = None,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        super().__init__()
        # "data_" names where a LightningModule has an option of the same name (Lightning refuses two values)
        params = {k: v for k, v in locals().items() if k not in ("self", "__class__", "processor", "plot")}
        for name in ("max_new_tokens", "template", "input"):
            params[f"data_{name}"] = params.pop(name)
        self.save_hyperparameters(params)
        check_choice("TimeSeriesDataModule", "input", input, ("plot", "numbers"))
        check_choice("TimeSeriesDataModule", "reasoning", reasoning, ("template", "none"))
        check_choice("TimeSeriesDataModule", "nan_policy", nan_policy, ("error", "interpolate"))
        check_choice("TimeSeriesDataModule", "val_source", val_source, ("test", "train"))
        check_choice("TimeSeriesDataModule", "template", template, ("plain", "chat"))
        if (train_file is None) != (test_file is None):
            raise ConfigError("TimeSeriesDataModule: give both train_file and test_file (the archive's two splits), or neither.")
        if train_file is None and dataset not in SHIPPED_TASKS:
            raise ConfigError(
                f"TimeSeriesDataModule(dataset={dataset!r}): not a shipped set ({', '.join(SHIPPED_TASKS)}); the "
                "paper's CTU ('Computers') is not shipped: give its files as train_file / test_file."
            )
        if val_source == "train" and num_val is None:
            raise ConfigError("TimeSeriesDataModule(val_source='train') needs num_val: how many training series to hold out.")
        for name, value in (("num_val", num_val), ("num_test", num_test), ("num_train", num_train)):
            if value is not None and value < 0:
                raise ConfigError(f"TimeSeriesDataModule({name}={value}): must be >= 0 or None (all).")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ConfigError(f"TimeSeriesDataModule({name}={value}): must be >= 1.")
        try:
            reasoning_template.format(**reasoning_fields(np.zeros((1, 2)), "x"))
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(
                f"TimeSeriesDataModule(reasoning_template={reasoning_template!r}) uses an unknown field ({error!r}); "
                "the fields are label, min, max, mean, std, length, channels, peak_position, trend."
            ) from None
        try:
            number_format.format(1.5)
        except (IndexError, ValueError, KeyError) as error:
            raise ConfigError(f"TimeSeriesDataModule(number_format={number_format!r}) does not format a number: {error!r}.") from None
        shipped = SHIPPED_TASKS.get(dataset) if train_file is None else None
        self.dataset = dataset
        self.files = {"train": train_file, "test": test_file}
        self.label_column, self.id_column = label_column, id_column
        self.class_names = dict(class_names) if class_names is not None else (dict(shipped.classes) if shipped else None)
        self.class_descriptions = dict(class_descriptions or (shipped.class_descriptions if shipped else {}))
        self.description = description or (shipped.description if shipped else _GENERIC_DESCRIPTION)
        self.channel_names = list(channel_names) if channel_names else (list(shipped.channel_names) if shipped and shipped.channel_names else None)
        self.input = input
        self.reasoning, self.reasoning_template = reasoning, reasoning_template
        self.extension = extension
        self.nan_policy = nan_policy
        self.plot_settings = plot or PlotSettings()
        self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lightning_tokens", "time_series_plots")
        self.val_source, self.num_val, self.num_test, self.num_train = val_source, num_val, num_test, num_train
        self.number_format = number_format
        self.template = template
        self.processor = processor
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self._raw: dict[str, list[TimeSeriesExample]] = {}
        self._splits: dict[str, list[TimeSeriesExample]] = {}
        self._labels: list[str] | None = None
        self._cache: PlotCache | None = None

    # -- data ----------------------------------------------------------------------------------------------
    def _read(self, split: str) -> list[TimeSeriesExample]:
        """A whole archive split (``train``/``test``), labels mapped to words, NaNs handled."""
        if split not in self._raw:
            path = self.files[split]
            where = f"{self.dataset} {split}" if path is None else path
            series, raw = load_shipped(self.dataset, split) if path is None else read_series_file(path, self.label_column, self.id_column)
            series = apply_nan_policy(series, self.nan_policy, where)
            if self.channel_names is not None:
                bad = next((i for i, s in enumerate(series) if s.shape[0] != len(self.channel_names)), None)
                if bad is not None:
                    raise DataError(f"{where}, series {bad}: {series[bad].shape[0]} channels but channel_names has {len(self.channel_names)}.")
            words = [self._word(label, where) for label in raw]
            self._raw[split] = [TimeSeriesExample(values, word, i) for i, (values, word) in enumerate(zip(series, words))]
        return self._raw[split]

    def _word(self, raw: str, where: str) -> str:
        if self.class_names is None:
            return raw
        if raw in self.class_names:
            return self.class_names[raw]
        raise DataError(
            f"{where}: label {raw!r} is not in class_names ({sorted(self.class_names)}); add it to class_names "
            "(raw label → the word the prompt uses)."
        )

    @property
    def labels(self) -> list[str]:
        """The class words, in the order of ``class_names`` (else sorted as found in the training split)."""
        if self._labels is None:
            if self.class_names is not None:
                self._labels = list(dict.fromkeys(self.class_names.values()))
            else:
                self._labels = sorted({e.label for split in ("train", "test") for e in self._read(split)})
        return self._labels

    def _permutation(self, n: int, name: str) -> list[int]:
        rng = np.random.default_rng(derive_seed(self.seed, "time_series", name) % (2**32))
        return rng.permutation(n).tolist()

    def split_examples(self, split: Literal["train", "val", "test", "predict"]) -> list[TimeSeriesExample]:
        """The examples of a split (``predict`` = ``test``), subsets as configured, kept after the first call."""
        if split in self._splits:
            return self._splits[split]
        if split == "predict":
            return self.split_examples("test")
        if split not in ("train", "val", "test"):
            raise ConfigError(f"Unknown split {split!r}: use 'train', 'val', 'test' or 'predict'.")
        train, test = self._read("train"), self._read("test")
        held_out: set[int] = set()
        if self.val_source == "train":
            held_out = set(self._permutation(len(train), "val")[: self.num_val])
        if split == "val":
            source = train if self.val_source == "train" else test
            order = self._permutation(len(source), "val")
            chosen = order if self.num_val is None else order[: self.num_val]
            examples = [source[i] for i in sorted(chosen)]
        elif split == "train":
            kept = [e for e in train if e.index not in held_out]
            if self.num_train is not None:
                picked = set(self._permutation(len(kept), "train")[: self.num_train])
                kept = [e for i, e in enumerate(kept) if i in picked]
            examples = kept
        else:
            order = self._permutation(len(test), "test")
            chosen = order if self.num_test is None else order[: self.num_test]
            examples = [test[i] for i in sorted(chosen)]
        unknown = sorted({e.label for e in examples} - set(self.labels))
        if unknown:
            raise DataError(f"{self.dataset} {split}: labels {unknown} are not among the allowed labels {self.labels}.")
        self._splits[split] = examples
        return examples

    def prompt(self, example: TimeSeriesExample) -> str:
        """The prompt of one example (with its values written out under ``input: numbers``)."""
        series_text = None
        if self.input == "numbers":
            series_text = numeric_series_text(example.values, self.channel_names, self.number_format)
        return task_prompt(self.description, self.labels, self.class_descriptions, self.extension, series_text)

    def target(self, example: TimeSeriesExample) -> str:
        """The SFT target of one example."""
        reasoning = None
        if self.reasoning == "template":
            reasoning = self.reasoning_template.format(**reasoning_fields(example.values, example.label))
        return answer_text(example.label, reasoning)

    def plot_path(self, split: str, example: TimeSeriesExample) -> str:
        """The example's rendered plot (rendered now unless cached and current)."""
        if self._cache is None:
            self._cache = PlotCache(self.cache_dir, self.plot_settings)
        source = "test" if split in ("val", "test", "predict") and not (split == "val" and self.val_source == "train") else "train"
        return str(self._cache.get(self._cache_name, source, example.index, example.values, self.channel_names))

    @property
    def _cache_name(self) -> str:
        if self.files["train"] is None:
            return self.dataset
        stem = os.path.splitext(os.path.basename(self.files["train"]))[0]
        return f"file-{stem}"

    def item(self, split: str, example: TimeSeriesExample, position: int) -> dict[str, Any]:
        """The dataset item of an example (what :class:`TimeSeriesCollator` batches)."""
        image = load_plot(self.plot_path(split, example)) if self.input == "plot" else None
        prompt = self.prompt(example)
        return {
            "example_id": example.index, "image": image, "question": prompt, "prompt": prompt,
            "answer": self.target(example), "label": example.label, "allowed_labels": self.labels,
            "domain": self.dataset, "count": None, "num_objects": None,
        }

    # -- processor -----------------------------------------------------------------------------------------
    def _resolve_processor(self) -> Any:
        if self.processor is not None:
            return self.processor
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if self.input == "numbers":
            tokenizer = getattr(module, "tokenizer", None)
            if tokenizer is None:
                raise ConfigError("TimeSeriesDataModule(input='numbers') batches with the LightningModule's tokenizer; attach a TokenLM or pass processor=.")
            self.processor = NumericPromptProcessor(tokenizer)
        else:
            processor = getattr(module, "processor", None)
            if processor is None:
                raise ConfigError(
                    "TimeSeriesDataModule(input='plot') batches with the LightningModule's `processor`: use a "
                    "VisionLanguageLM / VisionLanguageGRPO, or input: numbers for a text LM."
                )
            self.processor = processor
        return self.processor

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read the splits ``stage`` needs (rendering happens when items are read)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage or "", ("train", "val", "test")):
            if split == "val" and self.num_val == 0:
                continue
            self.split_examples(split)  # type: ignore[arg-type]

    def _loader(self, split: str, mode: Literal["train", "eval", "predict"], shuffle: bool, batch_size: int) -> DataLoader:
        dataset = _TimeSeriesDataset(self, split, self.split_examples(split))  # type: ignore[arg-type]
        seed = derive_seed(self.seed, "shuffle", split) % (2**31)
        return DataLoader(
            dataset, batch_size=batch_size,
            sampler=self._resumable_sampler(len(dataset), seed, batch_size) if shuffle else None,
            collate_fn=TimeSeriesCollator(self._resolve_processor(), mode, chat=self.template == "chat"),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", "train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.num_val == 0:
            return []
        return self._loader("val", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", "predict", shuffle=False, batch_size=self.eval_batch_size)

    # -- used by the LightningModule -----------------------------------------------------------------------
    def build_metrics(self, prefix: str) -> Any:
        """``{prefix}accuracy`` (parsed label = truth) and ``{prefix}format`` (a valid label was parsed)."""
        from lightning_tokens.metrics.time_series import time_series_metrics

        return time_series_metrics(prefix)

    def extract_answer(self, text: str, domain: str | None = None) -> str:
        """The label parsed from a generated answer as the reward does (TimeMaster's CTU rule), ``""`` if none."""
        from lightning_tokens.rewards.timemaster import parse_class_label

        return parse_class_label(text, self.labels) or ""

    @property
    def generation_max_new_tokens(self) -> int:
        """``max_new_tokens`` if given; else the longest training/validation SFT target + 8 (in the processor's
        tokens, characters without a tokenizer), + 64 when an ``<extension>`` is asked for."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        targets = [self.target(e) for split in ("train", "val") if split != "val" or self.num_val != 0
                   for e in self.split_examples(split)]  # type: ignore[arg-type]
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and callable(tokenizer):
            longest = max(len(ids) for ids in tokenizer(sorted(set(targets)), add_special_tokens=False)["input_ids"])
        else:
            longest = max(len(t) for t in targets)
        return longest + 8 + (_EXTENSION_BUDGET if self.extension else 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dataset={self.dataset!r}, input={self.input!r}, files={self.files})"
