"""GVT visual-tokenizer pretraining: a student ViT learns a frozen teacher's patch features.

"What Makes for Good Visual Tokenizers for Large Language Models?" (GVT, arXiv 2305.12223) pretrains its
visual tokenizer by patch-level feature distillation from a CLIP-family teacher, **without masking**
(finding 4: "mask-based strategies are not suitable for good visual tokenizers"). The pretraining code is
not released; the loss follows EVA-02's, whose masked-image form is the paper's ablation
(baaivision/EVA@006ca794 ``EVA-02/asuka/engine_for_pretraining.py::compute_loss`` and
``modeling_pretrain.py::VisionTransformerForMaskedImageModeling``):

    L = - 1/|P| · Σ_{p ∈ P} cos( W · norm(s_p) + b , t_p )

``s_p`` the student's patch token ``p`` (its final ``norm`` applied, as timm's ``forward_features`` does),
``W, b`` a trained linear head to the teacher's width, ``t_p`` the frozen teacher's feature at the same
place of the image, ``P`` every patch (``loss_on: all``, the spec's choice) or the masked patches only
(``loss_on: masked``, EVA-02's). With ``mask_ratio > 0``, ``round(mask_ratio · N)`` patches per image, drawn
uniformly, have their patch embeddings replaced by a learned mask token before the position embedding and
the blocks (EVA-02 draws BEiT's block-wise masks; uniform draws here).

The offline default teacher, torchvision's ImageNet MobileNetV2 (``mobilenet_v2``), stands in for CLIP.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice
from lightning_tokens.models.vision import VisionEncoder, build_vision_encoder
from lightning_tokens.modules.causal_lm import OptimizerSettings, adamw_with_schedule

__all__ = [
    "GVT_OPTIMIZER",
    "VisualTokenizerDistillation",
    "num_masked",
    "replace_masked",
    "resample_grid",
    "sample_patch_mask",
]

#: GVT's optimisation settings (spec §2: lr 1e-4, weight decay 0.05, cosine, warm-up 0.1), cosine to 0.
GVT_OPTIMIZER = OptimizerSettings(lr=1e-4, weight_decay=0.05, warmup=0.1, min_lr_ratio=0.0)

Resample = Literal["area", "bilinear", "bicubic"]


def num_masked(mask_ratio: float, num_patches: int) -> int:
    """Patches masked per image: ``round(mask_ratio · num_patches)``, halves rounded up (0.4 · 64 → 26).

    Example:
        >>> num_masked(0.4, 64), num_masked(0.4, 256), num_masked(0.5, 5)
        (26, 102, 3)
    """
    return int(math.floor(mask_ratio * num_patches + 0.5))


def sample_patch_mask(
    batch_size: int, num_patches: int, mask_ratio: float, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A boolean ``(batch_size, num_patches)`` mask with exactly :func:`num_masked` ``True`` per row, the
    positions drawn uniformly without replacement, independently per row.

    Example:
        >>> sample_patch_mask(2, 10, 0.4).sum(1).tolist()
        [4, 4]
    """
    count = num_masked(mask_ratio, num_patches)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    chosen = noise.argsort(dim=1)[:, :count]
    return torch.zeros(batch_size, num_patches, dtype=torch.bool, device=noise.device).scatter_(1, chosen, True)


def replace_masked(tokens: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Patch embeddings with the masked ones replaced by ``mask_token``.

    Args:
        tokens: ``(B, N, C)``, or ``(B, H, W, C)`` as timm's patch embedding gives with ``dynamic_img_size``.
        mask: boolean ``(B, N)``, row-major over the patch grid.
        mask_token: ``(C,)`` or ``(1, 1, C)``.

    Example:
        >>> replace_masked(torch.zeros(1, 3, 2), torch.tensor([[False, True, False]]), torch.ones(2)).tolist()
        [[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]
    """
    flat = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    if mask.shape != flat.shape[:2]:
        raise ConfigError(f"the patch mask is {tuple(mask.shape)} but the student has {tuple(flat.shape[:2])} patches.")
    filled = torch.where(mask.unsqueeze(-1), mask_token.reshape(1, 1, -1).to(flat.dtype), flat)
    return filled.reshape(tokens.shape)


def resample_grid(features: Tensor, size: tuple[int, int], mode: Resample = "area") -> Tensor:
    """Teacher features ``(B, h·w, C)`` on a square ``h × w`` grid (row-major), resampled to the student's
    ``size`` grid: ``(B, size[0]·size[1], C)``.

    ``area`` is adaptive average pooling: student patch ``(i, j)`` gets the mean of the teacher cells its
    region overlaps (an exact block mean when the teacher grid is a multiple of the student's, e.g.
    16×16 → 8×8; overlapping bins when it is smaller, e.g. MobileNetV2's 7×7 → 8×8). ``bilinear`` and
    ``bicubic`` interpolate cell centres (antialiased when shrinking). Equal grids are returned as they are.

    Example:
        >>> grid = torch.arange(16.0).view(1, 16, 1)          # a 4×4 map, one channel
        >>> resample_grid(grid, (2, 2)).flatten().tolist()   # 2×2 block means
        [2.5, 4.5, 10.5, 12.5]
    """
    batch, count, channels = features.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ConfigError(f"teacher features have {count} positions, not a square grid: use a square teacher input.")
    if (side, side) == tuple(size):
        return features
    grid = features.transpose(1, 2).reshape(batch, channels, side, side)
    if mode == "area":
        grid = F.adaptive_avg_pool2d(grid, size)
    else:
        grid = F.interpolate(grid, size=size, mode=mode, align_corners=False, antialias=size[0] < side)
    return grid.flatten(2).transpose(1, 2)


class VisualTokenizerDistillation(pl.LightningModule):
    """GVT visual-tokenizer pretraining (arXiv 2305.12223): patch-level feature distillation from a frozen
    teacher into a student ViT, ``L = -mean_p cos(Linear(norm(student_p)), teacher_p)``.

    Features:
        - Student: any timm model by name (a ViT for masking), random or pretrained or from a local timm
          checkpoint, with ``student_overrides`` (``patch_size``, ``depth``, ...) and its own input size.
        - Teacher: frozen (no gradients, kept in eval mode so BatchNorm statistics never move) and any
          :func:`~lightning_tokens.models.vision.build_vision_encoder` backbone: ``mobilenet_v2`` (the
          offline ImageNet weights, standing in for CLIP; default), a timm name, or a local checkpoint.
        - Each network gets the images at its own size and normalisation: batches carry raw ``[0, 1]``
          images (``batch["images"]``, a tensor or PIL images) and the module resizes and normalises them
          per network.
        - Teacher features are resampled to the student's patch grid (``resample``: ``area`` = adaptive
          average pooling over the teacher cells each student patch overlaps; no-op for equal grids).
        - ``mask_ratio`` (default 0, GVT's choice; 0.4 = the spec's masked-image ablation): that
          fraction of patch embeddings replaced by a learned mask token before the position embedding;
          the loss over all patches (``loss_on: all``) or the masked ones (``masked``, EVA-02's MIM).
        - AdamW with warm-up and cosine decay (GVT's lr 1e-4, weight decay 0.05, warm-up 0.1; no decay on
          norms, biases, position/cls/mask tokens).
        - Logs ``train/loss``, ``train/cosine``, ``train/lr``, with masking ``train/loss_masked`` and
          ``train/loss_visible``; ``val/loss`` and ``val/cosine`` on unmasked images (the tokenizer as it
          will be used).
        - :meth:`save_student` writes a timm-loadable student (``student_output`` at the end of ``fit``):
          ``timm.create_model(name, num_classes=0, checkpoint_path=path, **overrides)`` or
          ``build_vision_encoder(name, pretrained=False, checkpoint=path, image_size=..., overrides=...)``.

    Args:
        student: timm model name of the student.
        student_overrides: extra ``timm.create_model`` arguments (``{"patch_size": 8, "depth": 4}``).
        student_image_size: student input side (``None``: the model's default).
        student_pretrained: start from timm's pretrained weights (cached or downloaded).
        student_checkpoint: start from a local timm checkpoint instead.
        teacher: ``mobilenet_v2`` or a timm name.
        teacher_pretrained: load the teacher's pretrained weights (offline for ``mobilenet_v2``).
        teacher_image_size: teacher input side (``None``: its default, 224 for MobileNetV2 → a 7×7 grid;
            256 gives 8×8).
        teacher_checkpoint: a local checkpoint for the teacher.
        teacher_overrides: extra ``timm.create_model`` arguments for a timm teacher.
        projection: ``linear`` (the head ``W, b``) or ``identity`` (student width = teacher width; the check
            "student = teacher → loss −1").
        mask_ratio: fraction of patches masked, in ``[0, 1)``.
        loss_on: ``all`` patches (default) or ``masked`` only (needs ``mask_ratio > 0``).
        resample: how teacher features meet the student grid: ``area``, ``bilinear`` or ``bicubic``.
        optimizer: AdamW and schedule settings (default :data:`GVT_OPTIMIZER`).
        student_output: file to write the student to at the end of ``fit`` (``.safetensors`` or a
            ``torch.save`` file; ``None``: don't).

    Example::

        module = VisualTokenizerDistillation(student="vit_tiny_patch16_224", student_image_size=64,
                                             student_overrides={"patch_size": 8, "depth": 4})
        pl.Trainer(max_steps=300).fit(module, datamodule=ImageDataModule(sources=["shapes", "digits"]))
        module.save_student("runs/gvt/student.safetensors")
    """

    def __init__(
        self,
        student: str = "vit_tiny_patch16_224",
        student_overrides: dict[str, Any] | None = None,
        student_image_size: int | None = None,
        student_pretrained: bool = False,
        student_checkpoint: str | None = None,
        teacher: str = "mobilenet_v2",
        teacher_pretrained: bool = True,
        teacher_image_size: int | None = None,
        teacher_checkpoint: str | None = None,
        teacher_overrides: dict[str, Any] | None = None,
        projection: Literal["linear", "identity"] = "linear",
        mask_ratio: float = 0.0,
        loss_on: Literal["all", "masked"] = "all",
        resample: Resample = "area",
        optimizer: OptimizerSettings | None = None,
        student_output: str | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_choice(owner, "projection", projection, ("linear", "identity"))
        check_choice(owner, "loss_on", loss_on, ("all", "masked"))
        check_choice(owner, "resample", resample, ("area", "bilinear", "bicubic"))
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ConfigError(
                f"{owner}(mask_ratio={mask_ratio}): mask_ratio must lie in [0, 1): 0 (GVT, no masking) or e.g. 0.4 "
                "(the masked-image ablation)."
            )
        if loss_on == "masked" and mask_ratio == 0:
            raise ConfigError(f"{owner}(loss_on='masked'): nothing is masked with mask_ratio=0; set mask_ratio > 0 or loss_on: all.")
        if student == "mobilenet_v2":
            raise ConfigError(
                f"{owner}(student='mobilenet_v2'): the student is a timm model (e.g. vit_tiny_patch16_224, or "
                "timm's mobilenetv2_100); torchvision's MobileNetV2 is the offline teacher."
            )
        for name, size in (("student_image_size", student_image_size), ("teacher_image_size", teacher_image_size)):
            if size is not None and size <= 0:
                raise ConfigError(f"{owner}({name}={size}): an image side must be a positive number of pixels.")
        self.save_hyperparameters()
        self.student_name = student
        self.student_overrides = dict(student_overrides or {})
        self.student_image_size = student_image_size
        self.student_pretrained = student_pretrained
        self.student_checkpoint = student_checkpoint
        self.teacher_name = teacher
        self.teacher_pretrained = teacher_pretrained
        self.teacher_image_size = teacher_image_size
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_overrides = dict(teacher_overrides or {}) or None
        self.projection = projection
        self.mask_ratio = float(mask_ratio)
        self.loss_on = loss_on
        self.resample = resample
        self.optimizer_settings = optimizer or dataclasses.replace(GVT_OPTIMIZER)  # a copy: never edit the default
        self.student_output = student_output
        self.student: VisionEncoder | None = None
        self.teacher: VisionEncoder | None = None
        self.head: nn.Module | None = None
        self.mask_token: nn.Parameter | None = None
        self.student_grid: tuple[int, int] | None = None

    # ---- models ----------------------------------------------------------------------------------
    @override
    def configure_model(self) -> None:
        """Build the student, the frozen teacher, the head and (with masking) the mask token; once."""
        if self.student is not None:
            return
        student = build_vision_encoder(
            self.student_name, pretrained=self.student_pretrained, image_size=self.student_image_size,
            checkpoint=self.student_checkpoint, overrides=self.student_overrides,
        )
        teacher = build_vision_encoder(
            self.teacher_name, pretrained=self.teacher_pretrained, image_size=self.teacher_image_size,
            checkpoint=self.teacher_checkpoint, overrides=self.teacher_overrides,
        )
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.to(memory_format=torch.channels_last)  # oneDNN's fast (depthwise) convolutions: ~2x on the CPU
        if self.projection == "identity":
            if student.num_features != teacher.num_features:
                raise ConfigError(
                    f"{type(self).__name__}(projection='identity'): the student's width {student.num_features} differs "
                    f"from the teacher's {teacher.num_features}; use projection: linear."
                )
            head: nn.Module = nn.Identity()
        else:
            head = nn.Linear(student.num_features, teacher.num_features)
            nn.init.trunc_normal_(head.weight, std=0.02, a=-0.02, b=0.02)  # EVA-02's lm_head init
            nn.init.zeros_(head.bias)
        self.student, self.teacher, self.head = student, teacher, head
        self.student_grid = _student_grid(student, self.mask_ratio > 0)
        patches = self.student_grid[0] * self.student_grid[1]
        if self.mask_ratio > 0 and num_masked(self.mask_ratio, patches) == 0:
            raise ConfigError(
                f"{type(self).__name__}(mask_ratio={self.mask_ratio}): masks no patch of the student's {patches}; "
                f"use mask_ratio >= {0.5 / patches:g} or 0."
            )
        if self.mask_ratio > 0:
            width = int(getattr(student.backbone, "embed_dim", student.num_features))
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    @override
    def train(self, mode: bool = True) -> VisualTokenizerDistillation:
        """As ``nn.Module.train``, except that the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _require_model(self, action: str) -> None:
        if self.student is None:
            raise RuntimeError(f"{action}: the models are not built yet; call configure_model() or fit first.")

    # ---- features and loss -----------------------------------------------------------------------
    def forward(self, images: Any) -> Tensor:
        """The student's patch features ``(B, N, C)`` (the visual tokens) for raw ``[0, 1]`` images."""
        self._require_model("forward")
        student_in, _ = self._network_inputs(images, teacher=False)
        return self.student_features(student_in)

    def student_features(self, pixel_values: Tensor, mask: Tensor | None = None) -> Tensor:
        """Student patch tokens ``(B, N, C)`` after its final norm, for normalised ``pixel_values``; patches
        where ``mask`` ``(B, N)`` is ``True`` enter the blocks as the mask token (plus their position)."""
        self._require_model("student_features")
        assert self.student is not None
        if mask is None:
            return self.student(pixel_values)
        if self.mask_token is None:
            raise ConfigError(f"{type(self).__name__}: a patch mask needs mask_ratio > 0 (there is no mask token).")
        with self._masking(mask):
            return self.student(pixel_values)

    @contextmanager
    def _masking(self, mask: Tensor) -> Iterator[None]:
        """Replace the masked patch embeddings on the way out of the student's ``patch_embed`` (before the
        position embedding, patch dropout, ``norm_pre`` and the blocks, as in EVA-02)."""
        assert self.student is not None and self.mask_token is not None
        mask_token = self.mask_token

        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            return replace_masked(output, mask, mask_token)

        handle = self.student.backbone.patch_embed.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def teacher_features(self, pixel_values: Tensor) -> Tensor:
        """The frozen teacher's features ``(B, N, C)`` resampled to the student's patch grid."""
        self._require_model("teacher_features")
        assert self.teacher is not None and self.student_grid is not None
        with torch.no_grad():
            features = self.teacher(pixel_values.contiguous(memory_format=torch.channels_last))
        return resample_grid(features, self.student_grid, self.resample)

    def distillation_loss(self, images: Any, mask_ratio: float | None = None) -> dict[str, Tensor | None]:
        """Loss and per-patch cosines for a batch of raw images.

        Args:
            images: ``(B, 3, H, W)`` in ``[0, 1]`` (or uint8), or PIL images.
            mask_ratio: overrides the module's (0 for unmasked evaluation).

        Returns:
            ``loss`` (scalar), ``cosine`` ``(B, N)`` and ``mask`` ``(B, N)`` or ``None``.
        """
        self._require_model("distillation_loss")
        ratio = self.mask_ratio if mask_ratio is None else float(mask_ratio)
        student_in, teacher_in = self._network_inputs(images)
        target = self.teacher_features(teacher_in)
        mask = None
        if ratio > 0:
            batch, count = target.shape[:2]
            mask = sample_patch_mask(batch, count, ratio, device=target.device)
        features = self.student_features(student_in, mask)
        if features.shape[1] != target.shape[1]:
            raise ConfigError(
                f"the student gives {features.shape[1]} patch tokens but its patch grid is {self.student_grid}: "
                "use a plain ViT student (patch tokens on one grid)."
            )
        prediction = self.head(features)  # type: ignore[misc]
        compute = torch.promote_types(prediction.dtype, torch.float32)  # float32 under mixed precision, float64 kept
        cosine = F.cosine_similarity(prediction.to(compute), target.to(compute), dim=-1)
        selected = cosine[mask] if (self.loss_on == "masked" and mask is not None) else cosine
        return {"loss": -selected.mean(), "cosine": cosine, "mask": mask}

    def _network_inputs(self, images: Any, teacher: bool = True) -> tuple[Tensor, Tensor | None]:
        """Each network's resized and normalised input from raw images (a batch dict, a tensor, PIL)."""
        assert self.student is not None and self.teacher is not None
        if isinstance(images, dict):
            if "images" not in images:
                raise ConfigError(f"a distillation batch holds raw images under 'images'; got keys {sorted(images)}.")
            images = images["images"]
        dtype = next(self.student.parameters()).dtype
        if isinstance(images, Tensor):
            images = images.to(self.device)
            student_in = self.student.transform.preprocess_tensor(images).to(dtype)
            teacher_in = self.teacher.transform.preprocess_tensor(images).to(dtype) if teacher else None
        elif isinstance(images, Sequence) and images:
            student_in = self.student.preprocess(images).to(self.device, dtype)
            teacher_in = self.teacher.preprocess(images).to(self.device, dtype) if teacher else None
        else:
            raise ConfigError(f"images must be a (B, 3, H, W) tensor in [0, 1] or a list of PIL images, got {type(images).__name__}.")
        return student_in, teacher_in

    # ---- Lightning steps -------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.distillation_loss(batch)
        loss, cosine, mask = out["loss"], out["cosine"], out["mask"]
        assert isinstance(loss, Tensor) and isinstance(cosine, Tensor)
        size = cosine.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/cosine", cosine.detach().mean(), batch_size=size)
        if mask is not None:
            self.log("train/loss_masked", -cosine.detach()[mask].mean(), batch_size=size)
            if (~mask).any():
                self.log("train/loss_visible", -cosine.detach()[~mask].mean(), batch_size=size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        cosine = self.distillation_loss(batch, mask_ratio=0.0)["cosine"]
        assert isinstance(cosine, Tensor)
        self.log("val/loss", -cosine.mean(), prog_bar=True, sync_dist=True, batch_size=cosine.shape[0])
        self.log("val/cosine", cosine.mean(), sync_dist=True, batch_size=cosine.shape[0])

    @override
    def configure_optimizers(self) -> Any:
        self._require_model("configure_optimizers")
        assert self.student is not None
        exempt = {f"student.backbone.{name}" for name in _no_weight_decay(self.student.backbone)} | {"mask_token"}
        return adamw_with_schedule(self.named_parameters(), self.optimizer_settings, self.trainer, no_decay=exempt.__contains__)

    # ---- the student as a timm checkpoint --------------------------------------------------------
    def student_config(self, checkpoint: str | None = None) -> dict[str, Any]:
        """The :func:`~lightning_tokens.models.vision.build_vision_encoder` arguments that rebuild the student."""
        self._require_model("student_config")
        assert self.student is not None
        return {
            "name": self.student_name,
            "pretrained": False,
            "image_size": self.student.image_size,
            "checkpoint": checkpoint,
            "overrides": self.student_overrides,
        }

    def save_student(self, path: str) -> None:
        """Write the student's weights as a timm checkpoint (no classifier head: ``num_classes=0``), as
        safetensors for a ``.safetensors`` path, else with ``torch.save``; and next to it ``<stem>.json``,
        the :func:`~lightning_tokens.models.vision.build_vision_encoder` arguments that load it.

        Load it with ``timm.create_model(name, num_classes=0, checkpoint_path=path, img_size=..., **overrides)``
        or ``build_vision_encoder(**json.load(open("<stem>.json")))``.
        """
        self._require_model("save_student")
        assert self.student is not None
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.student.backbone.state_dict().items()}
        if target.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(target))
        else:
            torch.save(state, target)
        target.with_suffix(".json").write_text(json.dumps(self.student_config(os.fspath(target)), indent=2) + "\n")

    @override
    def on_train_end(self) -> None:
        if self.student_output:
            self._save_student_output()

    @rank_zero_only
    def _save_student_output(self) -> None:
        assert self.student_output is not None
        self.save_student(self.student_output)


def _student_grid(student: VisionEncoder, masked: bool) -> tuple[int, int]:
    """The student's output patch grid ``(h, w)`` (from a forward pass on a blank image); with masking,
    also that it is a plain ViT: a ``patch_embed`` whose grid is the grid of the output tokens."""
    with torch.no_grad():
        was_training = student.training
        student.eval()
        parameter = next(student.parameters())
        blank = torch.zeros(1, 3, student.image_size, student.image_size, dtype=parameter.dtype, device=parameter.device)
        count = student(blank).shape[1]
        student.train(was_training)
    side = math.isqrt(count)
    if side * side != count:
        raise ConfigError(f"the student {type(student.backbone).__name__} gives {count} patch tokens, not a square grid.")
    if masked:
        backbone = student.backbone
        grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
        plain = grid is not None and hasattr(backbone, "blocks") and hasattr(backbone, "num_prefix_tokens")
        if not plain or int(grid[0]) * int(grid[1]) != count:
            raise ConfigError(
                f"mask_ratio > 0 needs a plain ViT student (timm VisionTransformer or Eva: patch_embed, blocks, one "
                f"patch grid); {type(backbone).__name__} is not one. Use e.g. student: vit_tiny_patch16_224, or mask_ratio: 0."
            )
    return side, side


def _no_weight_decay(backbone: nn.Module) -> set[str]:
    names = getattr(backbone, "no_weight_decay", None)
    return set(names()) if callable(names) else set()
