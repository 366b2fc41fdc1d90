"""A generated, offline visual question answering benchmark in the spirit of GVTBench (GVT, arXiv 2305.12223).

GVTBench asks a frozen visual tokenizer + LLM to count objects ("How many people are there in the image?"
→ ``"1"``) and to identify object classes ("Does cup exist in the image?" → ``"Yes."`` / ``"No."``) on COCO and
VCR images. This module makes the same two question types on images drawn in code, plus one task on real
images shipped with scikit-learn, so a vision-language model can be trained and evaluated without a download:

* ``counting``: coloured circles, squares and triangles on a white background; "How many circles are there in
  the image?" → ``"3"``. Distractors of the other kinds share the image. Each example keeps its ground-truth
  ``count``.
* ``mci``: multi-class identification, "Does a red square exist in the image?" → ``"Yes."`` / ``"No."``,
  exactly balanced; a "No." question prefers a colour or a kind that *is* in the image (a red circle and a blue
  square, but no red square). Each example keeps ``num_objects`` (GVTBench bins MCI by it).
* ``digits``: scikit-learn's ``load_digits`` (1797 greyscale 8×8 scans of handwritten digits, upscaled to RGB);
  "Which digit is this?" → ``"7"``. Its splits are disjoint subsets of the 1797 images.

Shapes sit in distinct cells of a grid and never touch, and ``ImageDraw`` paints them without anti-aliasing, so
every shape is one connected region of exactly its colour: counts are checkable from the pixels. An image is
kept as its drawing spec (:class:`ShapeScene`, :class:`DigitImage`) and rendered when a batch needs it.

Every (seed, split, task) triple has its own random stream (:func:`derive_seed`), so a split does not change
when another task is added or another split's size changes (except digits, whose splits share one shuffled
pool: test takes its first ``num_test`` images, validation the next ``num_val``, training the rest).

Example:
    >>> examples = generate_benchmark_split("counting", "test", 2, seed=0)
    >>> examples[0].question, examples[0].answer == str(examples[0].count)
    ('How many circles are there in the image?', True)
    >>> examples[0].image.render().size
    (64, 64)
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.visual_qa.records import VisualQAExample

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "BENCHMARK_TASKS",
    "COLORS",
    "SHAPES",
    "DigitImage",
    "Shape",
    "ShapeScene",
    "derive_seed",
    "example_key",
    "generate_benchmark_split",
    "load_digits_data",
]

#: The generated tasks, in their canonical order.
BENCHMARK_TASKS: tuple[str, ...] = ("counting", "mci", "digits")
#: Shape kinds: the plural in questions is ``kind + "s"``.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Named colours and their RGB values: far apart, so a pixel's colour names its shape's colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
DIGIT_QUESTION = "Which digit is this?"
_MIN_CELL = 10  # pixels per grid cell: a shape of radius >= 3 plus a margin


def derive_seed(seed: int, split: str, task: str) -> int:
    """A stable seed for one (seed, split, task) triple, independent of ``PYTHONHASHSEED``.

    Example:
        >>> derive_seed(0, "train", "mci") == derive_seed(0, "train", "mci") != derive_seed(0, "val", "mci")
        True
    """
    digest = hashlib.sha256(f"visual_qa/{seed}/{split}/{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# -- images ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One filled shape: ``kind`` in :data:`SHAPES`, ``color`` in :data:`COLORS`, centre ``(cx, cy)`` and
    ``radius`` in pixels (half the side of its bounding box, which includes both ends)."""

    kind: str
    color: str
    cx: int
    cy: int
    radius: int

    def box(self) -> tuple[int, int, int, int]:
        """Inclusive bounding box ``(x0, y0, x1, y1)``."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class ShapeScene:
    """A drawing spec: ``shapes`` on a white ``size`` × ``size`` RGB canvas.

    Example:
        >>> scene = ShapeScene(32, (Shape("circle", "red", 8, 8, 4), Shape("square", "blue", 24, 24, 4)))
        >>> scene.count("circle"), scene.count(color="blue"), scene.render().getpixel((24, 24))
        (1, 1, (30, 70, 220))
    """

    size: int
    shapes: tuple[Shape, ...]

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        """How many shapes match ``kind`` and ``color`` (``None`` matches any)."""
        return sum((kind is None or s.kind == kind) and (color is None or s.color == color) for s in self.shapes)

    def render(self) -> Image.Image:
        """The scene as a PIL RGB image (no anti-aliasing: each shape is exactly its colour)."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.size, self.size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            x0, y0, x1, y1 = shape.box()
            fill = COLORS[shape.color]
            if shape.kind == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape.kind == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            elif shape.kind == "triangle":
                draw.polygon([(shape.cx, y0), (x0, y1), (x1, y1)], fill=fill)
            else:
                raise ConfigError(f"Shape kind {shape.kind!r} is not one of {', '.join(SHAPES)}.")
        return image


@dataclass(frozen=True)
class DigitImage:
    """A scikit-learn digit: ``pixels`` are its 64 intensities (0 = paper … 16 = ink, row-major 8×8), drawn
    dark on white and upscaled to ``size`` × ``size`` RGB with nearest-neighbour sampling; ``index`` is its
    position in ``load_digits()`` (-1 if not from there).

    Example:
        >>> DigitImage(bytes([16] + [0] * 63), 16).render().getpixel((0, 0))
        (0, 0, 0)
    """

    pixels: bytes
    size: int
    index: int = -1

    def render(self) -> Image.Image:
        """The digit as a PIL RGB image."""
        from PIL import Image

        grey = bytes(255 - (v * 255) // 16 for v in self.pixels)
        small = Image.frombytes("L", (8, 8), grey)
        return small.resize((self.size, self.size), Image.Resampling.NEAREST).convert("RGB")


# -- scene generation ------------------------------------------------------------------------------------
def _plural(kind: str) -> str:
    return kind + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _grid(image_size: int, max_objects: int) -> int:
    grid = max(4, math.ceil(math.sqrt(max_objects)))
    if image_size // grid < _MIN_CELL:
        raise ConfigError(
            f"image_size={image_size} is too small for {max_objects} shapes per image (a {grid}x{grid} grid needs "
            f"{grid * _MIN_CELL} pixels); raise image_size or lower max_count / max_objects."
        )
    return grid


def _place(rng: random.Random, image_size: int, grid: int, specs: Sequence[tuple[str, str]]) -> tuple[Shape, ...]:
    """Put each ``(kind, color)`` in its own grid cell, at a random size and offset inside the cell with a
    one-pixel margin, so no two shapes touch."""
    cell = image_size // grid
    offset = (image_size - cell * grid) // 2
    cells = rng.sample(range(grid * grid), len(specs))
    max_radius = (cell - 3) // 2  # 2r + 1 pixels wide, plus a margin of one pixel on each side
    min_radius = max(3, (cell * 3) // 10)
    min_radius = min(min_radius, max_radius)
    shapes = []
    for (kind, color), index in zip(specs, cells):
        row, col = divmod(index, grid)
        radius = rng.randint(min_radius, max_radius)
        free = cell - 2 - (2 * radius + 1)  # room left for the offset inside the margins
        x0 = offset + col * cell + 1 + rng.randint(0, free)
        y0 = offset + row * cell + 1 + rng.randint(0, free)
        shapes.append(Shape(kind, color, x0 + radius, y0 + radius, radius))
    return tuple(shapes)


def _counting_example(rng: random.Random, image_size: int, grid: int, max_count: int, max_distractors: int) -> VisualQAExample:
    kind = rng.choice(SHAPES)
    count = rng.randint(1, max_count)
    others = [k for k in SHAPES if k != kind]
    specs = [(kind, rng.choice(tuple(COLORS))) for _ in range(count)]
    specs += [(rng.choice(others), rng.choice(tuple(COLORS))) for _ in range(rng.randint(0, max_distractors))]
    rng.shuffle(specs)
    scene = ShapeScene(image_size, _place(rng, image_size, grid, specs))
    return VisualQAExample(
        image=scene,
        question=f"How many {_plural(kind)} are there in the image?",
        answer=str(count),
        domain="counting",
        count=count,
        num_objects=len(scene.shapes),
    )


def _mci_example(rng: random.Random, image_size: int, grid: int, max_objects: int, present: bool) -> VisualQAExample:
    combos = [(kind, color) for kind in SHAPES for color in COLORS]
    while True:
        n = rng.randint(1, max_objects)
        specs = [rng.choice(combos) for _ in range(n)]
        absent = [c for c in combos if c not in specs]
        if present or absent:
            break
    if present:
        kind, color = rng.choice(specs)
    else:
        # hard negatives first: a colour or a kind that is in the image, but not together
        near = [c for c in absent if any(c[0] == s[0] or c[1] == s[1] for s in specs)]
        kind, color = rng.choice(near or absent)
    scene = ShapeScene(image_size, _place(rng, image_size, grid, specs))
    return VisualQAExample(
        image=scene,
        question=f"Does {_article(color)} {color} {kind} exist in the image?",
        answer="Yes." if present else "No.",
        domain="mci",
        num_objects=n,
    )


@functools.lru_cache(maxsize=1)
def load_digits_data() -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    """scikit-learn's ``load_digits``: the 1797 images as 64-byte intensity strings (0–16) and their labels.

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ConfigError(
            "The 'digits' visual QA task reads scikit-learn's load_digits images: pip install scikit-learn, "
            "or drop 'digits' from tasks."
        ) from err
    data = load_digits()
    images = tuple(bytes(int(v) for v in image.reshape(-1)) for image in data.images)
    return images, tuple(int(t) for t in data.target)


def _digit_split_indices(split: str, num_examples: int, seed: int, num_val: int, num_test: int) -> list[int]:
    images, _ = load_digits_data()
    total = len(images)
    if num_val + num_test > total:
        raise ConfigError(
            f"The digits task has {total} images; num_val={num_val} + num_test={num_test} leave none for training. "
            f"Lower num_val/num_test to at most {total} together."
        )
    order = list(range(total))
    random.Random(derive_seed(seed, "all", "digits")).shuffle(order)
    pools = {"test": order[:num_test], "val": order[num_test : num_test + num_val], "train": order[num_test + num_val :]}
    pool = pools[split]
    if num_examples <= len(pool):
        return pool[:num_examples]
    if split != "train" or not pool:
        raise ConfigError(f"The digits task cannot give {num_examples} {split} examples from a pool of {len(pool)}.")
    # training may repeat its pool: whole passes in fresh orders, never reaching into val/test images
    rng = random.Random(derive_seed(seed, split, "digits"))
    out = list(pool)
    while len(out) < num_examples:
        extra = list(pool)
        rng.shuffle(extra)
        out += extra
    return out[:num_examples]


def generate_benchmark_split(
    task: str,
    split: str,
    num_examples: int,
    seed: int,
    *,
    image_size: int = 64,
    max_count: int = 6,
    max_distractors: int = 3,
    max_objects: int = 6,
    digit_split_sizes: tuple[int, int] | None = None,
    exclude: set[tuple[object, ...]] | None = None,
) -> list[VisualQAExample]:
    """The examples of one task and split, deterministic in ``(seed, split, task)`` and the options.

    Args:
        task: ``"counting"``, ``"mci"`` or ``"digits"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_examples: how many examples.
        seed: base seed.
        image_size: side of the square images in pixels.
        max_count: counting answers are uniform in ``1..max_count``.
        max_distractors: counting images add ``0..max_distractors`` shapes of other kinds.
        max_objects: MCI images hold ``1..max_objects`` shapes.
        digit_split_sizes: ``(num_val, num_test)`` of the digits task, which fix how its shuffled pool is cut
            (test first, then validation, training the rest; training repeats its pool if asked for more). Pass
            the same sizes to the calls of every split to keep them disjoint; ``None`` takes ``num_examples`` for
            this split and 0 for the other held-out one.
        exclude: keys (:func:`example_key`) of examples another split already holds; generated examples avoid
            them, and the keys of this split are added.

    Raises:
        ConfigError: an unknown task or split, or sizes that do not fit.

    Example:
        >>> mci = generate_benchmark_split("mci", "val", 10, seed=3)
        >>> sorted(e.answer for e in mci).count("Yes.")
        5
    """
    if task not in BENCHMARK_TASKS:
        raise ConfigError(f"Unknown visual QA task {task!r}: choose from {', '.join(BENCHMARK_TASKS)}.")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"Unknown split {split!r}: use 'train', 'val' or 'test'.")
    if num_examples < 0:
        raise ConfigError(f"num_examples must be >= 0, got {num_examples}.")
    if task == "digits":
        images, labels = load_digits_data()
        if digit_split_sizes is None:
            digit_split_sizes = (num_examples if split == "val" else 0, num_examples if split == "test" else 0)
        num_val, num_test = digit_split_sizes
        indices = _digit_split_indices(split, num_examples, seed, num_val, num_test)
        return [
            VisualQAExample(
                image=DigitImage(images[i], image_size, i),
                question=DIGIT_QUESTION,
                answer=str(labels[i]),
                domain="digits",
                location=f"benchmark digits/{split} #{n} (load_digits image {i})",
            )
            for n, i in enumerate(indices)
        ]
    rng = random.Random(derive_seed(seed, split, task))
    if task == "counting":
        grid = _grid(image_size, max_count + max_distractors)
        make = lambda n: _counting_example(rng, image_size, grid, max_count, max_distractors)  # noqa: E731
    else:
        grid = _grid(image_size, max_objects)
        answers = [True] * (num_examples - num_examples // 2) + [False] * (num_examples // 2)
        rng.shuffle(answers)
        make = lambda n: _mci_example(rng, image_size, grid, max_objects, answers[n])  # noqa: E731
    seen = exclude if exclude is not None else set()
    examples = []
    for n in range(num_examples):
        for _ in range(100):
            example = make(n)
            key = example_key(example)
            if key not in seen:
                break
        seen.add(key)  # after 100 draws a repeat is accepted: the option space is too small to avoid it
        examples.append(
            VisualQAExample(
                image=example.image,
                question=example.question,
                answer=example.answer,
                domain=example.domain,
                count=example.count,
                num_objects=example.num_objects,
                location=f"benchmark {task}/{split} #{n}",
            )
        )
    return examples


def example_key(example: VisualQAExample) -> tuple[object, ...]:
    """What makes two examples the same question about the same image (for keeping splits apart)."""
    return (example.domain, example.question, example.image)
