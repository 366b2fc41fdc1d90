"""Images for visual-tokenizer pretraining (GVT feature distillation): a folder of your images, and
offline sources that need no download.

Every batch is ``{"images": (B, 3, S, S) float tensor in [0, 1]}``: raw pixels, so that each network of a
distillation (student, teacher) resizes and normalises them its own way. With ``labels: true`` batches also
hold ``"labels": (B,)`` class ids (the digit for ``digits``, −1 for sources without classes).

Sources (``sources:``):

- ``shapes``: coloured circles, squares and triangles on plain backgrounds, drawn in code from a seed.
- ``digits``: scikit-learn's handwritten digits (1797 real 8×8 scans, shipped with the package), white on
  black, upscaled bilinearly to RGB.
- ``photo_crops``: random square crops (random side, place and mirror) of scikit-learn's two sample
  photographs (``china.jpg``, ``flower.jpg``, 427×640): a small real-image set.
- ``root:`` a folder of images, searched recursively (random resized crops and mirrors in training,
  resize and centre crop in validation).

Example:
    >>> data = ImageDataModule(sources=["shapes"], image_size=32, num_train=4, num_val=2, batch_size=2)
    >>> data.setup("fit")
    >>> next(iter(data.train_dataloader()))["images"].shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import bisect
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.seeding import SeedOption
from lightning_tokens.datamodules.sampling import ResumableDataMixin

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_SOURCES",
    "DigitImages",
    "ImageDataModule",
    "ImageFolderDataset",
    "LabelledImages",
    "PhotoCrops",
    "ShapeImages",
    "collate_images",
    "draw_shapes",
]

ImageSource = Literal["shapes", "digits", "photo_crops"]
IMAGE_SOURCES: tuple[str, ...] = ("shapes", "digits", "photo_crops")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: Named colours of the generated shapes (RGB).
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")


def _resize(pixels: Tensor, size: int) -> Tensor:
    """``(3, h, w)`` → ``(3, size, size)``, bilinear with antialiasing when shrinking."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    shrink = min(pixels.shape[-2:]) > size
    return F.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)[0].clamp(0, 1)


def _stream(seed: int, split: str, index: int) -> np.random.Generator:
    """An independent generator per (seed, split, item): items do not depend on the dataset's length."""
    return np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}[split], index])


def draw_shapes(rng: np.random.Generator, size: int, max_shapes: int = 6) -> Any:
    """A PIL image of ``1..max_shapes`` coloured shapes (circle, square, triangle) on a light background.

    Example:
        >>> draw_shapes(np.random.default_rng(0), 32).size
        (32, 32)
    """
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    names = list(SHAPE_COLOURS)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        colour = SHAPE_COLOURS[names[int(rng.integers(len(names)))]]
        side = float(rng.uniform(0.12, 0.3)) * size
        cx, cy = (float(v) for v in rng.uniform(side / 2, size - side / 2, size=2))
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


def _pil_to_tensor(image: Any) -> Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)


class ShapeImages(Dataset):
    """``count`` generated shape images (see :func:`draw_shapes`); item ``i`` depends only on
    ``(seed, split, i)``."""

    def __init__(self, count: int, image_size: int, seed: int, split: str = "train") -> None:
        self.count, self.image_size, self.seed, self.split = count, image_size, seed, split

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        return _pil_to_tensor(draw_shapes(_stream(self.seed, self.split, index), self.image_size))


class DigitImages(Dataset):
    """scikit-learn's handwritten digits (8×8, 17 grey levels) as RGB images upscaled to ``image_size``;
    ``indices`` selects the scans (default all 1797)."""

    def __init__(self, image_size: int, indices: Sequence[int] | None = None) -> None:
        from sklearn.datasets import load_digits

        scans = torch.from_numpy(load_digits().images).float().div(16.0)  # (1797, 8, 8) in [0, 1]
        self.indices = list(range(len(scans))) if indices is None else [int(i) for i in indices]
        self.scans = scans[torch.as_tensor(self.indices, dtype=torch.long)]
        self.targets = torch.from_numpy(load_digits().target).long()[torch.as_tensor(self.indices, dtype=torch.long)]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> Tensor:
        return _resize(self.scans[index].expand(3, -1, -1), self.image_size)


class PhotoCrops(Dataset):
    """``count`` random square crops of scikit-learn's sample photographs: side uniform in
    ``[min_fraction, 1]`` of the photo's short side, uniform place, mirrored with probability 1/2,
    resized to ``image_size``; item ``i`` depends only on ``(seed, split, i)``."""

    def __init__(self, count: int, image_size: int, seed: int, split: str = "train", min_fraction: float = 0.15) -> None:
        from sklearn.datasets import load_sample_images

        self.photos = [torch.from_numpy(np.array(p, dtype=np.uint8, copy=True)).permute(2, 0, 1) for p in load_sample_images().images]
        self.count, self.image_size, self.seed, self.split = count, image_size, seed, split
        self.min_fraction = min_fraction

    def __len__(self) -> int:
        return self.count

    def crop_box(self, index: int) -> tuple[int, int, int, int, bool]:
        """Item ``index``'s crop: ``(photo, top, left, side, mirrored)``."""
        rng = _stream(self.seed, self.split, index)
        photo = int(rng.integers(len(self.photos)))
        height, width = self.photos[photo].shape[-2:]
        side = max(1, int(round(float(rng.uniform(self.min_fraction, 1.0)) * min(height, width))))
        top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
        return photo, top, left, side, bool(rng.random() < 0.5)

    def __getitem__(self, index: int) -> Tensor:
        photo, top, left, side, mirrored = self.crop_box(index)
        crop = self.photos[photo][:, top : top + side, left : left + side].float().div(255.0)
        return _resize(crop.flip(-1) if mirrored else crop, self.image_size)


class ImageFolderDataset(Dataset):
    """Image files (found recursively under a folder, or given) as ``[0, 1]`` tensors of ``image_size``:
    training applies a random resized crop (area ``[0.35, 1]``, aspect ``[3/4, 4/3]``) and a mirror,
    evaluation a resize of the short side and a centre crop."""

    def __init__(self, files: Sequence[str | os.PathLike[str]], image_size: int, train: bool = False) -> None:
        self.files = [Path(f) for f in files]
        self.image_size, self.train = image_size, train

    @staticmethod
    def find(root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
        """The image files under ``root`` (recursive, sorted), by extension (case-insensitive)."""
        folder = Path(root)
        if not folder.is_dir():
            raise MissingFileError(f"image folder {str(folder)!r} does not exist (root: ...).")
        wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
        if not files:
            raise DataError(f"image folder {str(folder)!r} holds no images with extensions {sorted(wanted)}.")
        return files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                pixels = _pil_to_tensor(image)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"{path}: not a readable image ({error}).") from error
        height, width = pixels.shape[-2:]
        if self.train:
            from torchvision.transforms import v2

            top, left, h, w = v2.RandomResizedCrop.get_params(pixels, scale=[0.35, 1.0], ratio=[3 / 4, 4 / 3])
            pixels = pixels[:, top : top + h, left : left + w]
            if torch.rand(()) < 0.5:
                pixels = pixels.flip(-1)
            return _resize(pixels, self.image_size)
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return _resize(pixels[:, top : top + side, left : left + side], self.image_size)


class LabelledImages(Dataset):
    """``(image, class id)`` items of an image dataset (or a ``ConcatDataset`` of them): the part's
    ``targets[i]`` where it has ``targets`` (:class:`DigitImages`), else −1 (no class).

    Example:
        >>> LabelledImages(DigitImages(8, indices=[3]))[0][1]
        3
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.parts: list[Dataset] = list(dataset.datasets) if isinstance(dataset, ConcatDataset) else [dataset]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + len(part))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.starts[-1]

    def label(self, index: int) -> int:
        """The class id of item ``index`` (−1: its source has no classes)."""
        part = bisect.bisect_right(self.starts, index) - 1
        targets = getattr(self.parts[part], "targets", None)
        return -1 if targets is None else int(targets[index - self.starts[part]])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[index], self.label(index)


def collate_images(items: Sequence[Tensor | tuple[Tensor, int]]) -> dict[str, Tensor]:
    """``{"images": (B, 3, S, S)}``, plus ``"labels": (B,)`` when the items are ``(image, label)`` pairs."""
    if items and isinstance(items[0], tuple):
        images, labels = zip(*items)
        return {"images": torch.stack(list(images)), "labels": torch.tensor(labels, dtype=torch.long)}
    return {"images": torch.stack(list(items))}  # type: ignore[arg-type]


class ImageDataModule(ResumableDataMixin, pl.LightningDataModule):
    """Raw images for visual-tokenizer pretraining, from a folder and / or offline sources.

    Features:
        - ``root``: your images, found recursively; a seeded ``num_val`` of them (at most a tenth) held out
          for validation, or a separate ``val_root``.
        - Offline ``sources``: ``shapes`` (generated), ``digits`` (scikit-learn scans, ``num_val`` held out),
          ``photo_crops`` (crops of scikit-learn's two sample photos); mixed with each other and ``root``.
        - Generated items depend only on ``(seed, split, index)``: validation never repeats a training item's
          stream; the training order is resumable mid-epoch (exact resume).
        - Batches ``{"images": (B, 3, image_size, image_size)}`` in ``[0, 1]``; with ``labels``, also
          ``"labels": (B,)`` class ids (−1 for sources without classes).

    Args:
        root: a folder of images (searched recursively), or ``None``.
        sources: offline sources to add; default ``["shapes", "digits", "photo_crops"]`` without ``root``,
            none with it.
        val_root: a folder of validation images (default: held out from ``root``).
        image_size: side of the square images served.
        num_train: training items per generated source (``shapes``, ``photo_crops``).
        num_val: validation items per source.
        batch_size: training batch size.
        eval_batch_size: validation batch size (default ``batch_size``).
        num_workers: data-loader workers.
        seed: seed of the generated items, the held-out split and the shuffling (``None``: ``seed_everything``'s).
        extensions: image file extensions for ``root``.
        labels: add the class ids to the batches (``digits``: 0-9; other sources: −1).

    Example::

        data = ImageDataModule(sources=["shapes", "digits", "photo_crops"], image_size=128)
        data = ImageDataModule(root="~/pictures", image_size=224)
    """

    seed = SeedOption()

    def __init__(
        self,
        root: str | None = None,
        sources: list[ImageSource] | None = None,
        val_root: str | None = None,
        image_size: int = 224,
        num_train: int = 2048,
        num_val: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        extensions: list[str] | None = None,
        labels: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        chosen = list(sources) if sources is not None else ([] if root else list(IMAGE_SOURCES))
        for source in chosen:
            check_choice(owner, "sources", source, IMAGE_SOURCES)
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"{owner}(sources={chosen}): each source may appear once.")
        if not chosen and not root:
            raise ConfigError(f"{owner}: no images: set root (a folder of images) or sources (e.g. [shapes, digits]).")
        for name, value in (("image_size", image_size), ("batch_size", batch_size), ("num_train", num_train)):
            if value <= 0:
                raise ConfigError(f"{owner}({name}={value}): must be a positive integer.")
        if num_val < 0:
            raise ConfigError(f"{owner}(num_val={num_val}): must be >= 0.")
        self.save_hyperparameters()
        self.root, self.val_root = root, val_root
        self.sources = chosen
        self.image_size = image_size
        self.num_train, self.num_val = num_train, num_val
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.extensions = tuple(extensions) if extensions else IMAGE_EXTENSIONS
        self.labels = labels
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the training and validation sets (once)."""
        if self.train_set is not None:
            return
        seed = self.seed
        train: list[Dataset] = []
        val: list[Dataset] = []
        if self.root:
            files = ImageFolderDataset.find(self.root, self.extensions)
            if self.val_root:
                held, kept = ImageFolderDataset.find(self.val_root, self.extensions), files
            else:
                held_out = min(self.num_val, len(files) // 10)
                order = random.Random(seed).sample(range(len(files)), len(files))
                held = [files[i] for i in sorted(order[:held_out])]
                kept = [files[i] for i in sorted(order[held_out:])]
            train.append(ImageFolderDataset(kept, self.image_size, train=True))
            if held:
                val.append(ImageFolderDataset(held, self.image_size, train=False))
        for source in self.sources:
            if source == "shapes":
                train.append(ShapeImages(self.num_train, self.image_size, seed, "train"))
                val.append(ShapeImages(self.num_val, self.image_size, seed, "val"))
            elif source == "photo_crops":
                train.append(PhotoCrops(self.num_train, self.image_size, seed, "train"))
                val.append(PhotoCrops(self.num_val, self.image_size, seed, "val"))
            else:
                digits = DigitImages(self.image_size)
                held_out = min(self.num_val, len(digits) // 10)
                order = random.Random(seed).sample(range(len(digits)), len(digits))
                train.append(DigitImages(self.image_size, sorted(order[held_out:])))
                val.append(DigitImages(self.image_size, sorted(order[:held_out])))
        self.train_set = ConcatDataset(train)
        val = [part for part in val if len(part) > 0]  # type: ignore[arg-type]
        self.val_set = ConcatDataset(val) if val else None

    @property
    def num_classes(self) -> int:
        """Classes of the labelled items: 10 with ``digits``, else 0 (no source has classes)."""
        return 10 if "digits" in self.sources else 0

    def _served(self, dataset: Dataset) -> Dataset:
        return LabelledImages(dataset) if self.labels else dataset

    def ordered_dataloader(self, split: Literal["train", "val"] = "train") -> DataLoader | None:
        """The ``split``'s items in order (no shuffling), with their ``labels``: for offline passes over the
        data (``extract_codes``); ``None`` when the split is empty."""
        self.setup("fit")
        dataset = self.train_set if split == "train" else self.val_set
        if dataset is None:
            return None
        return DataLoader(
            LabelledImages(dataset), batch_size=self.eval_batch_size, collate_fn=collate_images, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``{"images"}`` (resumable order)."""
        self.setup("fit")
        assert self.train_set is not None
        size = len(self.train_set)  # type: ignore[arg-type]
        return DataLoader(
            self._served(self.train_set), batch_size=self.batch_size, sampler=self._resumable_sampler(size, self.seed, self.batch_size),
            collate_fn=collate_images, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            drop_last=size >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list[Any]:
        """Validation batches ``{"images"}`` (no validation when nothing is held out)."""
        self.setup("validate")
        if self.val_set is None:
            return []
        return DataLoader(
            self._served(self.val_set), batch_size=self.eval_batch_size, collate_fn=collate_images,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

