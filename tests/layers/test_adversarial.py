"""PatchGAN pieces: hinge losses and VQGAN's adaptive weight against float64 hand computations, the
discriminator's shape and initialisation, settings validation."""

from __future__ import annotations

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.layers.adversarial import (
    AdversarialSettings,
    PatchDiscriminator,
    adaptive_adversarial_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
)


def test_hinge_losses_by_hand():
    real = torch.tensor([[1.5, 0.2], [-0.5, 3.0]], dtype=torch.float64)
    fake = torch.tensor([[-2.0, 0.1], [0.4, -0.9]], dtype=torch.float64)
    # real: relu(1 - x) = 0, 0.8, 1.5, 0 -> mean 0.575; fake: relu(1 + x) = 0, 1.1, 1.4, 0.1 -> mean 0.65
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.575 + 0.65), abs=1e-12)
    assert hinge_generator_loss(fake).item() == pytest.approx(-(-2.0 + 0.1 + 0.4 - 0.9) / 4, abs=1e-12)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    layer = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    out = x @ layer.T
    rec = (out - 1).pow(2).mean()
    adv = -out.sin().mean()
    g_rec, = torch.autograd.grad(rec, layer, retain_graph=True)
    g_adv, = torch.autograd.grad(adv, layer, retain_graph=True)
    expected = g_rec.norm() / (g_adv.norm() + 1e-4)
    weight = adaptive_adversarial_weight(rec, adv, layer)
    assert not weight.requires_grad
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=0)
    # reduce maps the local gradients to the global ones before the norms (DDP: the mean over processes)
    first_row = adaptive_adversarial_weight(rec, adv, layer, reduce=lambda g: g * torch.tensor([[1.0], [0.0], [0.0]], dtype=g.dtype))
    torch.testing.assert_close(first_row, g_rec[0].norm() / (g_adv[0].norm() + 1e-4), rtol=1e-12, atol=0)
    # the graph is kept for the real backward
    (rec + weight * adv).backward()
    torch.testing.assert_close(layer.grad, g_rec + expected * g_adv)


def test_adaptive_weight_is_clamped():
    w = torch.tensor([1.0], requires_grad=True)
    assert adaptive_adversarial_weight(1e6 * w.sum(), 0 * w.sum(), w).item() == 1e4


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_discriminator_scores_patches(norm):
    torch.manual_seed(0)
    disc = PatchDiscriminator(width=8, depth=3, norm=norm)
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 (the pix2pix 70x70 PatchGAN)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert abs(float(convs[1].weight.std()) - 0.02) < 0.003  # weights_init: N(0, 0.02)


def test_group_norm_scores_each_image_alone():
    torch.manual_seed(0)
    disc = PatchDiscriminator(width=8, depth=2, norm="group")
    images = torch.randn(3, 3, 32, 32)
    together = disc(images)
    alone = torch.cat([disc(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)


def test_settings_validate():
    with pytest.raises(ConfigError, match="norm"):
        AdversarialSettings(norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weight"):
        AdversarialSettings(weight=-1)
