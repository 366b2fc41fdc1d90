"""Image codes for class-conditional generation over a 1D image tokenizer's tokens (ReTok §AR generation).

``lightning-tokens extract_codes`` writes every image's full-length code sequence and class to a
safetensors file (:func:`extract_codes`, :func:`save_codes`); :class:`ImageCodesDataModule` turns that file
into causal-LM batches for :class:`~lightning_tokens.modules.causal_lm.TokenLM`: a class token first, then
the codes as vocabulary entries, labels on the codes only. Every token method (DFT, Rho-1, ...) then
applies to image tokens unchanged.

The vocabulary (a word-level ``PreTrainedTokenizerFast``, written next to the codes file as
``<codes>.tokenizer/``; name that folder as the model's ``tokenizer``)::

    <pad> <eos> <unk> <class_0> ... <class_{C-1}> <class_null> <code_0> ... <code_{K-1}>

``<class_null>`` is the unconditional token of classifier-free guidance: training rows get it with
probability ``class_dropout``, and always for images without a class (label −1).

Example::

    data = ImageCodesDataModule(codes_file="runs/retok_codes.safetensors", max_tokens=16)
    model = TokenLM(model="tiny-llama", tokenizer="runs/retok_codes.tokenizer")
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.datamodules.sampling import ResumableDataMixin, ResumableShuffleSampler

__all__ = [
    "CODE_SPECIAL_TOKENS",
    "CodeVocabulary",
    "ImageCodes",
    "ImageCodesDataModule",
    "build_code_tokenizer",
    "code_tokenizer_dir",
    "extract_codes",
    "load_codes",
    "save_codes",
    "write_code_tokenizer",
]

CODE_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<unk>")
METADATA_FIELDS: tuple[str, ...] = ("codebook_size", "num_tokens", "num_classes", "image_size")


# ---- extraction ------------------------------------------------------------------------------------
@torch.no_grad()
def extract_codes(tokenizer: Any, dataloader: Iterable[dict[str, Tensor]], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Full-length codes and class ids of every image a dataloader yields.

    Args:
        tokenizer: an image tokenizer with ``encode(images) -> (B, N)`` (e.g. ``FlexibleImageTokenizer``).
        dataloader: batches ``{"images": (B, 3, S, S) in [0, 1], "labels": (B,) optional}``.
        device: where to encode (``None``: the tokenizer's device).

    Returns:
        ``{"codes": (num_images, N) int64, "labels": (num_images,) int64}`` (−1 where a batch has no labels).

    Example:
        >>> tok = FlexibleImageTokenizer(preset="tiny", semantic_teacher=None, perceptual_weight=0)  # doctest: +SKIP
        >>> extract_codes(tok.eval(), [{"images": torch.rand(2, 3, 32, 32)}])["codes"].shape  # doctest: +SKIP
        torch.Size([2, 32])
    """
    if device is not None:
        tokenizer = tokenizer.to(device)
    tokenizer.eval()
    codes, labels = [], []
    for batch in dataloader:
        images = batch["images"]
        codes.append(tokenizer.encode(images.to(getattr(tokenizer, "device", images.device))).long().cpu())
        given = batch.get("labels")
        labels.append(given.long().cpu() if given is not None else torch.full((images.shape[0],), -1, dtype=torch.long))
    if not codes:
        raise DataError("extract_codes: the dataloader yielded no images.")
    return {"codes": torch.cat(codes), "labels": torch.cat(labels)}


# ---- the codes file --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageCodes:
    """A codes file's content: ``codes (num_images, N)``, ``labels (num_images,)`` and its metadata."""

    codes: Tensor
    labels: Tensor
    codebook_size: int
    num_tokens: int
    num_classes: int
    image_size: int
    tokenizer_ckpt: str | None


def save_codes(path: str | Path, tensors: dict[str, Tensor], codebook_size: int, num_classes: int, image_size: int, tokenizer_ckpt: str | None) -> ImageCodes:
    """Check and write codes (:func:`extract_codes`'s output) with their metadata to a safetensors file.

    Example::

        save_codes("codes.safetensors", extract_codes(tok, loader), 256, 10, 32, "tok/last.ckpt")
    """
    from safetensors.torch import save_file

    codes = ImageCodes(
        tensors["codes"].long().contiguous(), tensors["labels"].long().contiguous(), int(codebook_size),
        int(tensors["codes"].shape[1]), int(num_classes), int(image_size), tokenizer_ckpt,
    )
    _check_codes(codes, str(path))
    metadata = {name: str(getattr(codes, name)) for name in METADATA_FIELDS}
    metadata["tokenizer_ckpt"] = tokenizer_ckpt or ""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"codes": codes.codes, "labels": codes.labels}, str(path), metadata=metadata)
    return codes


def load_codes(path: str | Path) -> ImageCodes:
    """Read and check a codes file written by ``extract_codes``.

    Raises:
        MissingFileError: no such file.
        DataError: a missing tensor or metadata field, codes outside ``[0, codebook_size)``, labels outside
            ``[-1, num_classes)``; the message names the field.
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise MissingFileError(f"codes_file {str(path)!r} does not exist: write it with `lightning-tokens extract_codes`.")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        missing = [k for k in ("codes", "labels") if k not in handle.keys()] + [k for k in METADATA_FIELDS if k not in metadata]
        if missing:
            raise DataError(f"codes file {str(path)!r} lacks {missing}: write it with `lightning-tokens extract_codes`.")
        tensors = {k: handle.get_tensor(k) for k in ("codes", "labels")}
    codes = ImageCodes(
        tensors["codes"], tensors["labels"], *(int(metadata[k]) for k in METADATA_FIELDS),
        tokenizer_ckpt=metadata.get("tokenizer_ckpt") or None,
    )
    _check_codes(codes, str(path))
    return codes


def _check_codes(codes: ImageCodes, where: str) -> None:
    values, labels = codes.codes, codes.labels
    if values.dim() != 2 or values.is_floating_point() or values.shape[1] != codes.num_tokens:
        raise DataError(f"{where}: field 'codes' must be (num_images, num_tokens) integers; got {tuple(values.shape)} {values.dtype}.")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= codes.codebook_size):
        raise DataError(
            f"{where}: field 'codes' holds values in [{int(values.min())}, {int(values.max())}], outside "
            f"[0, codebook_size={codes.codebook_size}): the codes and the metadata come from different tokenizers."
        )
    if labels.shape != (values.shape[0],) or labels.is_floating_point():
        raise DataError(f"{where}: field 'labels' must be ({values.shape[0]},) integers; got {tuple(labels.shape)} {labels.dtype}.")
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= codes.num_classes):
        raise DataError(f"{where}: field 'labels' must lie in [-1, num_classes={codes.num_classes}); got max {int(labels.max())}.")


# ---- the vocabulary --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeVocabulary:
    """Token ids of a code vocabulary: ``<class_j>`` = ``class_offset + j``, ``<class_null>``,
    ``<code_i>`` = ``code_offset + i``.

    Example:
        >>> vocab = CodeVocabulary(num_classes=10, codebook_size=256)
        >>> vocab.class_offset, vocab.null_class_id, vocab.code_offset, vocab.size
        (3, 13, 14, 270)
    """

    num_classes: int
    codebook_size: int

    @property
    def class_offset(self) -> int:
        return len(CODE_SPECIAL_TOKENS)

    @property
    def null_class_id(self) -> int:
        return self.class_offset + self.num_classes

    @property
    def code_offset(self) -> int:
        return self.null_class_id + 1

    @property
    def size(self) -> int:
        return self.code_offset + self.codebook_size

    def class_token_ids(self, classes: Tensor) -> Tensor:
        """Token ids of class indices (−1: ``<class_null>``)."""
        classes = classes.long()
        return torch.where(classes < 0, torch.full_like(classes, self.null_class_id), classes + self.class_offset)

    def tokens(self) -> list[str]:
        """The vocabulary in id order."""
        classes = [f"<class_{j}>" for j in range(self.num_classes)] + ["<class_null>"]
        return [*CODE_SPECIAL_TOKENS, *classes, *(f"<code_{i}>" for i in range(self.codebook_size))]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> CodeVocabulary:
        """The layout of a tokenizer built by :func:`build_code_tokenizer` (checked)."""
        vocab = tokenizer.get_vocab()
        classes = sum(1 for t in vocab if t.startswith("<class_") and t != "<class_null>")
        layout = cls(classes, sum(1 for t in vocab if t.startswith("<code_")))
        if layout.codebook_size == 0 or vocab.get("<code_0>") != layout.code_offset or vocab.get("<class_null>") != layout.null_class_id:
            raise ConfigError("the model's tokenizer is not an image-code vocabulary: name the `<codes>.tokenizer` folder that extract_codes wrote.")
        return layout


def build_code_tokenizer(num_classes: int, codebook_size: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over :meth:`CodeVocabulary.tokens` (pad ``<pad>``, eos ``<eos>``).

    Example:
        >>> tok = build_code_tokenizer(2, 4)
        >>> tok("<class_1> <code_0> <code_3>")["input_ids"]
        [4, 6, 9]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = CodeVocabulary(num_classes, codebook_size).tokens()
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def code_tokenizer_dir(codes_file: str | Path) -> Path:
    """The tokenizer folder of a codes file: ``runs/codes.safetensors`` → ``runs/codes.tokenizer``."""
    return Path(codes_file).with_suffix(".tokenizer")


def write_code_tokenizer(codes_file: str | Path, num_classes: int, codebook_size: int) -> Path:
    """Write (or keep, when it already matches) the tokenizer folder next to ``codes_file``."""
    folder = code_tokenizer_dir(codes_file)
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        if CodeVocabulary.from_tokenizer(AutoTokenizer.from_pretrained(str(folder))) == CodeVocabulary(num_classes, codebook_size):
            return folder
    build_code_tokenizer(num_classes, codebook_size).save_pretrained(str(folder))
    return folder


# ---- batches ---------------------------------------------------------------------------------------
class _EpochSampler(Sampler):
    """Yields ``(epoch, index)`` so that the rows' class dropout depends on ``(seed, epoch, index)`` only."""

    def __init__(self, inner: ResumableShuffleSampler) -> None:
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.inner.epoch
        return ((epoch, index) for index in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class CodeRows(Dataset):
    """Rows ``[class token, code_1 .. code_k]`` of token ids; training rows (``dropout > 0``) take
    ``<class_null>`` with probability ``dropout``, drawn from ``(seed, epoch, index)``.

    Items are keyed by ``index`` or ``(epoch, index)``.
    """

    def __init__(self, codes: Tensor, labels: Tensor, vocab: CodeVocabulary, num_tokens: int, dropout: float = 0.0, seed: int = 0) -> None:
        self.codes = codes[:, :num_tokens] + vocab.code_offset
        self.classes = vocab.class_token_ids(labels)
        self.null_id, self.dropout, self.seed = vocab.null_class_id, float(dropout), int(seed)

    def __len__(self) -> int:
        return self.codes.shape[0]

    def dropped(self, epoch: int, index: int) -> bool:
        """Whether the class of row ``index`` is dropped in ``epoch``."""
        return self.dropout > 0 and np.random.default_rng([self.seed, epoch, index]).random() < self.dropout

    def __getitem__(self, key: int | tuple[int, int]) -> Tensor:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        token = self.null_id if self.dropped(epoch, index) else int(self.classes[index])
        return torch.cat([torch.tensor([token]), self.codes[index]])


def collate_code_rows(rows: list[Tensor]) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (the codes; −100 on the class token)."""
    input_ids = torch.stack(rows)
    labels = input_ids.clone()
    labels[:, 0] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


class ImageCodesDataModule(ResumableDataMixin, pl.LightningDataModule):
    """Causal-LM batches of image codes for a class-conditional generator (LlamaGen-style ``c2i``).

    Features:
        - Rows ``[<class_j>, <code_c1>, ..., <code_ck>]``, ``k = max_tokens`` (default all N codes; any
          prefix of a flexible tokenizer's codes decodes); ``labels`` on the code tokens only.
        - Class dropout (``class_dropout``, the reference's 0.1): ``<class_null>`` in place of the class,
          drawn from ``(seed, epoch, row)``: deterministic and exact on resume (resumable order too).
          Images without a class (label −1) always get ``<class_null>``.
        - ``num_val`` rows held out by ``seed`` (no class dropout there).
        - Writes the vocabulary to ``<codes>.tokenizer/`` (if missing): the model's ``tokenizer``.
        - ``predict``: one batch ``{"classes": (C,)}`` with every class (``[-1]`` without classes), for
          ``ImageCodeGenerator``'s sample grid.

    Args:
        codes_file: the safetensors file ``extract_codes`` wrote.
        max_tokens: codes per row, k ≤ N (``None``: N).
        class_dropout: probability of ``<class_null>`` in training rows.
        num_val: rows held out for validation.
        batch_size: training batch size.
        eval_batch_size: validation batch size (default ``batch_size``).
        num_workers: data-loader workers.
        seed: held-out split, shuffling and class dropout (``None``: ``seed_everything``'s).

    Example::

        data = ImageCodesDataModule(codes_file="runs/retok_codes.safetensors", batch_size=64)
        model = TokenLM(model="tiny-llama", tokenizer="runs/retok_codes.tokenizer")
        pl.Trainer(max_steps=1000, callbacks=[DFT()]).fit(model, datamodule=data)
    """

    seed = SeedOption()

    def __init__(
        self,
        codes_file: str,
        max_tokens: int | None = None,
        class_dropout: float = 0.1,
        num_val: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not 0.0 <= class_dropout < 1.0:
            raise ConfigError(f"{owner}(class_dropout={class_dropout}): must lie in [0, 1) (the reference uses 0.1).")
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens or 1)):
            if value <= 0:
                raise ConfigError(f"{owner}({name}={value}): must be a positive integer.")
        if num_val < 0:
            raise ConfigError(f"{owner}(num_val={num_val}): must be >= 0.")
        self.save_hyperparameters()
        self.codes_file, self.class_dropout, self.num_val = codes_file, float(class_dropout), num_val
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size or batch_size, num_workers
        self.seed = seed
        self.data = load_codes(codes_file)
        self.max_tokens = self.data.num_tokens if max_tokens is None else int(max_tokens)
        if self.max_tokens > self.data.num_tokens:
            raise ConfigError(
                f"{owner}(max_tokens={max_tokens}): the codes file {codes_file!r} holds N={self.data.num_tokens} codes per image; use k <= N."
            )
        self.vocab = CodeVocabulary(self.data.num_classes, self.data.codebook_size)
        self.tokenizer_dir = write_code_tokenizer(codes_file, self.data.num_classes, self.data.codebook_size)
        self.train_set: CodeRows | None = None
        self.val_set: CodeRows | None = None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def split_indices(self) -> tuple[list[int], list[int]]:
        """``(train, val)`` row indices: ``num_val`` rows (at most half) held out by ``seed``."""
        total = self.data.codes.shape[0]
        held = min(self.num_val, total // 2)
        order = random.Random(self.seed).sample(range(total), total)
        return sorted(order[held:]), sorted(order[:held])

    def setup(self, stage: str | None = None) -> None:
        """Build the row sets (once) and check the model's tokenizer against the vocabulary."""
        self._check_model_tokenizer()
        if self.train_set is not None:
            return
        train, val = (torch.as_tensor(i, dtype=torch.long) for i in self.split_indices())
        codes, labels = self.data.codes, self.data.labels
        self.train_set = CodeRows(codes[train], labels[train], self.vocab, self.max_tokens, self.class_dropout, self.seed)
        self.val_set = CodeRows(codes[val], labels[val], self.vocab, self.max_tokens) if len(val) else None

    def _check_model_tokenizer(self) -> None:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is not None and CodeVocabulary.from_tokenizer(tokenizer) != self.vocab:
            raise ConfigError(
                f"the model's tokenizer does not match {self.codes_file!r}: set the model's tokenizer to {str(self.tokenizer_dir)!r}."
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training rows (resumable order, class dropout)."""
        self.setup("fit")
        assert self.train_set is not None
        size = len(self.train_set)
        sampler = _EpochSampler(self._resumable_sampler(size, self.seed, self.batch_size))
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_code_rows,
            num_workers=self.num_workers, drop_last=size >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        """Held-out rows with their classes (no dropout)."""
        self.setup("validate")
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, collate_fn=collate_code_rows, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """One batch ``{"classes": (C,)}``: every class index, or ``[-1]`` (unconditional) without classes."""
        classes = torch.arange(self.num_classes) if self.num_classes else torch.tensor([-1])
        return DataLoader([{"classes": classes}], batch_size=None)
