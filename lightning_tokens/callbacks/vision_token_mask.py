r"""
Vision-token masking
^^^^^^^^^^^^^^^^^^^^

The masking of "Vision Token Masking Alone Cannot Prevent PHI Leakage in Medical Document OCR" (Young,
arXiv 2511.18272, spec §5): the vision tokens whose grid cells overlap a PHI bounding box are zeroed (or
replaced) at a chosen module of the vision tower, so the decoder never sees those pixels.

Token grid. An image of ``H × W`` pixels is cut into ``gh × gw`` cells; cell ``(i, j)`` covers rows
``[i·H/gh, (i+1)·H/gh)`` and columns ``[j·W/gw, (j+1)·W/gw)``. A box ``[x0, y0, x1, y1]`` holds the pixels
``x0..x1`` and ``y0..y1`` (inclusive ends, pixel ``p`` spanning ``[p, p+1)``), so it marks the cells

.. math::

    j \in \Big[\big\lfloor x_0 \tfrac{g_w}{W} \big\rfloor,\ \big\lceil (x_1 + 1) \tfrac{g_w}{W} \big\rceil - 1\Big]

(rows likewise); the mask is then dilated by ``r`` cells in Chebyshev distance (a ``(2r+1)²`` square),
clipped at the border. On a 1024-px page with a 16 × 16 grid, ``[64, 64, 127, 127]`` marks cell ``(1, 1)``
only; ``r = 1`` marks 9 cells and ``r = 2`` 16 (the border clips the 5 × 5 square).

Measurement. Per HIPAA category, the reduction is the fraction of its ground-truth PHI instances absent
from the OCR output; the overall reduction is their mean over the categories (the paper: 7 categories,
3 fully removed, 4 not at all → 3/7 = 0.428571). A post-filter of recall ``ρ`` on what masking left gives
``mean_c(r_c + (1 − r_c)·ρ)`` (ρ = 0.8 → 0.885714).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.options import check_choice

__all__ = [
    "VisionTokenMask",
    "apply_token_mask",
    "hybrid_reduction",
    "phi_reduction",
    "token_mask_from_boxes",
    "token_masks_from_boxes",
]

Mode = Literal["zero", "mean"]
Stage = Literal["train", "validate", "test", "predict"]
_MODES = ("zero", "mean")
_STAGES = ("train", "validate", "test", "predict")
_FIELDS = ("x0", "y0", "x1", "y1")


# ---- the token mask ------------------------------------------------------------------------------
def _pair(value: int | Sequence[int], field: str) -> tuple[int, int]:
    """``n`` → ``(n, n)``; ``(a, b)`` kept; both positive integers, else a ConfigError naming ``field``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ConfigError(f"{field}={value!r} must be a positive integer or a pair of them (height, width).")
    return int(pair[0]), int(pair[1])


def _cell_span(start: float, end: float, pixels: int, cells: int) -> tuple[int, int]:
    """First and last cell that the inclusive pixel range ``start..end`` overlaps (exact rational arithmetic)."""
    first = math.floor(Fraction(start) * cells / pixels)
    last = math.ceil((Fraction(end) + 1) * cells / pixels) - 1
    return first, min(last, cells - 1)


def _check_box(box: Any, label: str, height: int, width: int) -> tuple[float, float, float, float]:
    values = box.tolist() if isinstance(box, Tensor) else list(box)
    if len(values) != 4:
        raise DataError(f"{label} has {len(values)} values; a box is [x0, y0, x1, y1] in pixels.")
    for name, v in zip(_FIELDS, values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{label}.{name}={v!r} must be a finite number (box [x0, y0, x1, y1] in pixels).")
    x0, y0, x1, y1 = values
    for lo, hi, lo_name, hi_name in ((x0, x1, "x0", "x1"), (y0, y1, "y0", "y1")):
        if hi < lo:
            raise DataError(f"{label}.{hi_name}={hi} < {lo_name}={lo}: a box is [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0.")
    for name, v, size, axis in (("x0", x0, width, "width"), ("y0", y0, height, "height"), ("x1", x1, width, "width"), ("y1", y1, height, "height")):
        if not 0 <= v <= size - 1:
            raise DataError(
                f"{label}.{name}={v} lies outside the image ({axis} {size}: pixels 0..{size - 1}, inclusive ends); "
                "give boxes in the pixel coordinates of an image of `image_size`."
            )
    return x0, y0, x1, y1


def _mask(boxes: Any, size: tuple[int, int], grid: tuple[int, int], radius: int, label: str) -> Tensor:
    height, width = size
    rows, cols = grid
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    boxes = boxes.tolist() if isinstance(boxes, Tensor) else boxes
    for index, box in enumerate(boxes):
        x0, y0, x1, y1 = _check_box(box, f"{label}[{index}]", height, width)
        first_col, last_col = _cell_span(x0, x1, width, cols)
        first_row, last_row = _cell_span(y0, y1, height, rows)
        # dilating a union of rectangles by a square = the union of the grown rectangles
        mask[max(first_row - radius, 0) : last_row + radius + 1, max(first_col - radius, 0) : last_col + radius + 1] = True
    return mask


def _check_radius(radius: int) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ConfigError(f"radius={radius!r} must be an integer >= 0 (cells of dilation; the paper uses 1, 2, 3).")


def token_mask_from_boxes(
    boxes: Sequence[Sequence[float]] | Tensor,
    image_size: int | Sequence[int],
    grid_size: int | Sequence[int],
    radius: int = 0,
) -> Tensor:
    """The token cells that any box overlaps, dilated by ``radius`` cells (Chebyshev), as a bool grid.

    Args:
        boxes: ``[x0, y0, x1, y1]`` per box, in pixels with inclusive ends (a list, or a ``(K, 4)`` tensor);
            empty for an image without boxes.
        image_size: the image side in pixels, or ``(height, width)``.
        grid_size: token cells per side, or ``(rows, cols)``.
        radius: dilation in cells; the border clips it.

    Returns:
        ``(rows, cols)`` bool tensor, row-major like a ViT's patch tokens.

    Raises:
        DataError: a box outside the image, with ``x1 < x0`` or ``y1 < y0``, or not 4 finite numbers (the
            message names the box index and the field).

    Example:
        >>> int(token_mask_from_boxes([[64, 64, 127, 127]], 1024, 16).sum())
        1
        >>> int(token_mask_from_boxes([[64, 64, 127, 127]], 1024, 16, radius=2).sum())
        16
    """
    _check_radius(radius)
    return _mask(boxes, _pair(image_size, "image_size"), _pair(grid_size, "grid_size"), radius, "boxes")


def token_masks_from_boxes(
    batch_boxes: Sequence[Sequence[Sequence[float]] | Tensor],
    image_size: int | Sequence[int],
    grid_size: int | Sequence[int],
    radius: int = 0,
) -> Tensor:
    """:func:`token_mask_from_boxes` for a batch: one box list per image → ``(B, rows, cols)`` bool.

    Example:
        >>> token_masks_from_boxes([[[0, 0, 3, 3]], []], 8, 2).tolist()
        [[[True, False], [False, False]], [[False, False], [False, False]]]
    """
    _check_radius(radius)
    size, grid = _pair(image_size, "image_size"), _pair(grid_size, "grid_size")
    masks = [_mask(boxes, size, grid, radius, f"boxes[{b}]") for b, boxes in enumerate(batch_boxes)]
    return torch.stack(masks) if masks else torch.zeros(0, *grid, dtype=torch.bool)


# ---- replacing the hidden states -----------------------------------------------------------------
def _masked_mean(values: Tensor, keep: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean of ``values`` over ``dims`` where ``keep`` (broadcast) is 1; zero where nothing is kept."""
    keep = keep.to(values.dtype)
    return (values * keep).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp(min=1)


def apply_token_mask(hidden: Tensor, masks: Tensor, mode: Mode = "zero", prefix_tokens: int = 0) -> Tensor:
    """Replace the hidden states of the masked cells (a new tensor; ``hidden`` is left as it is).

    Args:
        hidden: ``(B, prefix_tokens + rows·cols, D)`` tokens (grid row-major after the prefix tokens, e.g. a
            CLS token, which are never masked) or a ``(B, D, rows, cols)`` feature map.
        masks: ``(B, rows, cols)`` bool, true where the cell is replaced.
        mode: ``zero`` (the paper) or ``mean``: each image's mean over its unmasked cells (zero when every
            cell is masked).
        prefix_tokens: leading tokens of ``hidden`` outside the grid (token layout only).

    Raises:
        ConfigError: the token count or feature-map size does not match the grid.
        DataError: ``hidden`` and ``masks`` hold different numbers of images.

    Example:
        >>> apply_token_mask(torch.ones(1, 4, 1), torch.tensor([[[True, False], [False, False]]]))[0, :, 0]
        tensor([0., 1., 1., 1.])
    """
    check_choice("apply_token_mask", "mode", mode, _MODES)
    rows, cols = masks.shape[-2:]
    if hidden.shape[0] != masks.shape[0]:
        raise DataError(f"the hidden states hold {hidden.shape[0]} images but the boxes cover {masks.shape[0]}: give one box list per image.")
    masks = masks.to(hidden.device)
    if hidden.dim() == 3:
        if hidden.shape[1] != prefix_tokens + rows * cols:
            raise ConfigError(
                f"the hooked module outputs {hidden.shape[1]} tokens but grid_size={(rows, cols)} with prefix_tokens={prefix_tokens} "
                f"needs {prefix_tokens + rows * cols}: set grid_size to the token grid (image side / patch size) and "
                "prefix_tokens to the leading non-patch tokens (CLS, registers)."
            )
        grid, flat = hidden[:, prefix_tokens:], masks.flatten(1).unsqueeze(-1)
        fill = torch.zeros_like(grid) if mode == "zero" else _masked_mean(grid, ~flat, (1,)).expand_as(grid)
        return torch.cat([hidden[:, :prefix_tokens], torch.where(flat, fill, grid)], dim=1)
    if hidden.dim() == 4:
        if tuple(hidden.shape[-2:]) != (rows, cols):
            raise ConfigError(
                f"the hooked module outputs a {tuple(hidden.shape[-2:])} feature map but grid_size={(rows, cols)}: "
                "set grid_size to the map's (height, width), channels first (B, D, h, w)."
            )
        flat = masks.unsqueeze(1)
        fill = torch.zeros_like(hidden) if mode == "zero" else _masked_mean(hidden, ~flat, (2, 3)).expand_as(hidden)
        return torch.where(flat, fill, hidden)
    raise ConfigError(
        f"the hooked module outputs shape {tuple(hidden.shape)}; vision-token masking needs (B, T, D) tokens or a (B, D, h, w) map."
    )


# ---- measurement ---------------------------------------------------------------------------------
def _check_fractions(values: Sequence[float], field: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise DataError(f"{field} is empty: give one reduction in [0, 1] per PHI category.")
    for index, v in enumerate(values):
        if not 0.0 <= v <= 1.0:
            raise DataError(f"{field}[{index}]={v} must lie in [0, 1] (the fraction of the category's PHI instances removed).")
    return values


def phi_reduction(found_per_category: Sequence[float]) -> float:
    """Overall PHI reduction: the mean over categories of each category's reduction.

    Args:
        found_per_category: per HIPAA category, the fraction of its ground-truth PHI instances that masking
            removed, i.e. that are *not* found in the OCR output (1 = none leaked, 0 = all leaked).

    Example:
        >>> round(phi_reduction([1, 1, 1, 0, 0, 0, 0]), 6)  # the paper: names, DOB, address removed
        0.428571
    """
    values = _check_fractions(found_per_category, "found_per_category")
    return sum(values) / len(values)


def hybrid_reduction(found_per_category: Sequence[float], recall: float) -> float:
    """Overall reduction when a text post-filter of ``recall`` also catches that share of what masking left:
    ``mean_c(r_c + (1 − r_c)·recall)`` (the paper's simulated hybrid).

    Example:
        >>> round(hybrid_reduction([1, 1, 1, 0, 0, 0, 0], 0.8), 6)  # (3 + 4·0.8) / 7
        0.885714
    """
    if not 0.0 <= recall <= 1.0:
        raise ConfigError(f"recall={recall} must lie in [0, 1].")
    values = _check_fractions(found_per_category, "found_per_category")
    return sum(v + (1.0 - v) * recall for v in values) / len(values)


# ---- the callback ----------------------------------------------------------------------------------
def _find_module(pl_module: nn.Module, name: str) -> nn.Module:
    try:
        module = pl_module.get_submodule(name) if name else None
    except AttributeError:
        module = None
    if isinstance(module, nn.Module) and module is not pl_module:
        return module
    names = [n for n, _ in pl_module.named_modules() if n]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5) or [n for n in names if "." not in n][:8]
    raise ConfigError(
        f"VisionTokenMask(module_name={name!r}): {type(pl_module).__name__} has no submodule {name!r}; "
        f"close names: {', '.join(close) or '(none)'} (all of them: `dict(model.named_modules())`, after configure_model)."
    )


class VisionTokenMask(Callback):
    """Zero (or replace) the vision tokens under each image's boxes, at any named module, through a forward hook.

    Features:
        - At ``on_{fit,validation,test,predict}_start`` a forward hook goes on ``pl_module.<module_name>``
          (any dotted path: the vision encoder, one of its blocks, a compressor or projector); ``teardown``
          and exceptions remove it.
        - At each batch start of the chosen ``stages`` it reads ``batch[boxes_key]`` (one list of
          ``[x0, y0, x1, y1]`` pixel boxes per image; ``[]`` for an image without any) and builds the
          ``(B, rows, cols)`` masks with :func:`token_masks_from_boxes`; the hook then rewrites the module's
          output with :func:`apply_token_mask` on every call in that batch (generation included). Outside
          those batches (and in other stages) the hook passes outputs through unchanged.
        - Output layouts: ``(B, prefix_tokens + rows·cols, D)`` tokens, row-major, or ``(B, D, rows, cols)``
          maps; a tuple output has its first element masked.

    Args:
        module_name: dotted name of the submodule of the LightningModule whose output is masked
            (e.g. ``vision_encoder`` or ``vision_encoder.backbone.blocks.0`` in ``VisionLanguageLM``).
        grid_size: token cells per side, or ``(rows, cols)``.
        image_size: the side, or ``(height, width)``, in pixels of the images the boxes refer to.
        radius: dilation of the mask in cells (Chebyshev); the paper tries 1, 2, 3.
        mode: ``zero`` (the paper) or ``mean`` (each image's mean over its unmasked cells).
        prefix_tokens: leading tokens outside the grid (a ViT block's CLS token: 1), never masked.
        boxes_key: the batch key holding the per-image box lists.
        stages: where to mask (default all four).

    Example::

        mask = VisionTokenMask(module_name="vision_encoder", grid_size=16, image_size=1024, radius=1)
        trainer = L.Trainer(callbacks=[mask])
        trainer.predict(model, datamodule=dm)  # each batch carries batch["boxes"]
    """

    def __init__(
        self,
        module_name: str,
        grid_size: int | tuple[int, int],
        image_size: int | tuple[int, int],
        radius: int = 0,
        mode: Mode = "zero",
        prefix_tokens: int = 0,
        boxes_key: str = "boxes",
        stages: list[Stage] | None = None,
    ) -> None:
        super().__init__()
        self.grid_size = _pair(grid_size, "VisionTokenMask.grid_size")
        self.image_size = _pair(image_size, "VisionTokenMask.image_size")
        _check_radius(radius)
        check_choice("VisionTokenMask", "mode", mode, _MODES)
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
            raise ConfigError(f"VisionTokenMask(prefix_tokens={prefix_tokens!r}) must be an integer >= 0.")
        self.stages = list(_STAGES if stages is None else stages)
        for stage in self.stages:
            check_choice("VisionTokenMask", "stages", stage, _STAGES)
        self.module_name, self.radius, self.mode = module_name, radius, mode
        self.prefix_tokens, self.boxes_key = prefix_tokens, boxes_key
        self.masks: Tensor | None = None
        self._handle: RemovableHandle | None = None

    # -- hook management
    def attach(self, pl_module: nn.Module) -> None:
        """Register the hook on ``pl_module.<module_name>`` (idempotent)."""
        if self._handle is None:
            self._handle = _find_module(pl_module, self.module_name).register_forward_hook(self._hook)

    def detach(self) -> None:
        """Remove the hook and forget the current masks."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.masks = None

    @property
    def active(self) -> bool:
        """Whether the hook is registered now."""
        return self._handle is not None

    def set_boxes(self, batch_boxes: Sequence[Sequence[Sequence[float]] | Tensor] | None) -> None:
        """Masks for the next forward calls from one box list per image (``None``: mask nothing)."""
        self.masks = None if batch_boxes is None else token_masks_from_boxes(batch_boxes, self.image_size, self.grid_size, self.radius)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.masks is None:
            return None
        if isinstance(output, Tensor):
            return self._apply(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            masked = (self._apply(output[0]), *output[1:])
            return masked if isinstance(output, tuple) else list(masked)
        raise ConfigError(
            f"VisionTokenMask(module_name={self.module_name!r}): the module returns {type(output).__name__}; "
            "hook a submodule whose output is a tensor (or a tuple starting with one)."
        )

    def _apply(self, hidden: Tensor) -> Tensor:
        assert self.masks is not None
        if hidden.shape[0] != self.masks.shape[0]:
            raise DataError(
                f"VisionTokenMask(boxes_key={self.boxes_key!r}): {self.module_name!r} ran on {hidden.shape[0]} images "
                f"but the batch gives {self.masks.shape[0]} box lists: give one list per image ([] for none)."
            )
        return apply_token_mask(hidden, self.masks, self.mode, self.prefix_tokens)

    # -- batches
    def _batch_boxes(self, batch: Any) -> Any:
        if not isinstance(batch, Mapping) or self.boxes_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DataError(
                f"VisionTokenMask(boxes_key={self.boxes_key!r}): the batch has no {self.boxes_key!r} entry (it has {keys}); "
                "put each image's [x0, y0, x1, y1] pixel boxes there ([] for an image without any), or set boxes_key."
            )
        return batch[self.boxes_key]

    def _batch_start(self, stage: str, pl_module: pl.LightningModule, batch: Any) -> None:
        self.masks = None
        if stage in self.stages:
            self.attach(pl_module)
            self.set_boxes(self._batch_boxes(batch))

    def _batch_end(self) -> None:
        self.masks = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start("train", pl_module, batch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_end()

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start("validate", pl_module, batch)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_end()

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start("test", pl_module, batch)

    @override
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_end()

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start("predict", pl_module, batch)

    @override
    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_end()

    # -- loops (after configure_model, so lazily built submodules exist)
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()
