"""The PatchGAN adversarial loss of VQGAN-style image tokenizers: discriminator, hinge losses, adaptive weight.

The recipe of taming-transformers' VQGAN as LlamaGen and GigaTok (hence ReTok) use it: a PatchGAN
discriminator scores overlapping patches of an image; the discriminator minimises the hinge loss
``(mean relu(1 − D(x)) + mean relu(1 + D(x̂))) / 2``, the generator ``−mean D(x̂)``, the latter scaled by the
adaptive weight ``λ = ‖∇_L L_rec‖ / (‖∇_L L_adv‖ + 1e-4)`` (clamped to [0, 10⁴], no gradient) computed at
the generator's last layer ``L``, so that the adversarial gradient never dwarfs the reconstruction's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice

__all__ = [
    "AdversarialSettings",
    "PatchDiscriminator",
    "adaptive_adversarial_weight",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
]

Norm = Literal["batch", "group", "none"]


@dataclasses.dataclass
class AdversarialSettings:
    """The PatchGAN option of an image tokenizer (GigaTok's defaults).

    Args:
        weight: ``disc_weight``, the factor on both adversarial losses (reference 0.5).
        start: the optimizer step from which both are on (``disc_start``; before it they are multiplied by 0).
        adaptive: scale the generator's loss by :func:`adaptive_adversarial_weight` (VQGAN); ``False``: by 1.
        width: channels of the discriminator's first convolution (``ndf``, 64).
        depth: strided convolution layers after the first (``n_layers``, 3: a 70×70 receptive field).
        norm: ``batch`` (the reference's BatchNorm), ``group`` (per-sample GroupNorm, so a DDP run equals one
            process without SyncBatchNorm), or ``none``.
    """

    weight: float = 0.5
    start: int = 0
    adaptive: bool = True
    width: int = 64
    depth: int = 3
    norm: Norm = "batch"

    def __post_init__(self) -> None:
        check_choice("AdversarialSettings", "norm", self.norm, ("batch", "group", "none"))
        if self.weight < 0 or self.start < 0 or self.width < 1 or self.depth < 1:
            raise ConfigError(
                f"AdversarialSettings(weight={self.weight}, start={self.start}, width={self.width}, depth={self.depth}): "
                "weight and start must be >= 0, width and depth >= 1."
            )


# checkpoints hold it among a tokenizer's hyper-parameters; Lightning loads them with weights_only
torch.serialization.add_safe_globals([AdversarialSettings])


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, VQGAN's ``NLayerDiscriminator``): 4×4 convolutions, stride 2 for the first
    ``depth`` layers then stride 1, channels doubling up to 8× ``width``, LeakyReLU(0.2); one logit per patch.

    Weights start as the reference's ``weights_init``: convolutions N(0, 0.02), norm scales N(1, 0.02).

    Example:
        >>> d = PatchDiscriminator(width=8, depth=2)
        >>> d(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 1, 6, 6])
    """

    def __init__(self, channels: int = 3, width: int = 64, depth: int = 3, norm: Norm = "batch") -> None:
        super().__init__()
        check_choice(type(self).__name__, "norm", norm, ("batch", "group", "none"))
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        out = width
        for index in range(1, depth + 1):
            previous, out = out, width * min(2**index, 8)
            stride = 2 if index < depth else 1
            layers += [nn.Conv2d(previous, out, 4, stride=stride, padding=1, bias=norm == "none"), _norm(norm, out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(out, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Patch logits ``(B, 1, h, w)`` of images ``(B, C, H, W)`` (the reference feeds ``[−1, 1]``)."""
        return self.layers(images)


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``(mean relu(1 − D(x)) + mean relu(1 + D(x̂))) / 2``.

    Example:
        >>> float(hinge_discriminator_loss(torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])))
        0.625
    """
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """``−mean D(x̂)``."""
    return -fake_logits.mean()


def adaptive_adversarial_weight(
    reconstruction_loss: Tensor,
    adversarial_loss: Tensor,
    last_layer: Tensor,
    reduce: Callable[[Tensor], Tensor] | None = None,
    max_weight: float = 1e4,
) -> Tensor:
    """VQGAN's ``λ = ‖∇_L rec‖ / (‖∇_L adv‖ + 1e-4)``, clamped to ``[0, max_weight]``, detached.

    ``reduce`` maps each local gradient to the global one before the norms (under DDP the mean over
    processes, so every process computes the λ of the global batch, as one process would).

    Example:
        >>> w = torch.tensor([1.0], requires_grad=True)
        >>> float(adaptive_adversarial_weight(3 * w.sum(), -w.sum() / 2, w))  # 3 / (0.5 + 1e-4)
        5.998800277709961
    """
    rec_grad = torch.autograd.grad([reconstruction_loss], [last_layer], retain_graph=True)[0]
    adv_grad = torch.autograd.grad([adversarial_loss], [last_layer], retain_graph=True)[0]
    if reduce is not None:
        rec_grad, adv_grad = reduce(rec_grad), reduce(adv_grad)
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
