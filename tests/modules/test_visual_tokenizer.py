"""GVT visual-tokenizer distillation: the identity check (-1), the mask token at exactly round(ratio·N)
masked patches, the loss against a float64 reference, the grid resampling, training, the timm round trip,
and bad configurations."""

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.images import ImageDataModule
from lightning_tokens.models.vision import build_vision_encoder, mobilenet_v2_weights
from lightning_tokens.modules.visual_tokenizer import (
    GVT_OPTIMIZER,
    VisualTokenizerDistillation,
    num_masked,
    replace_masked,
    resample_grid,
    sample_patch_mask,
)

VIT = "vit_tiny_patch16_224"
TINY = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}  # 32 px -> a 4x4 patch grid


def _module(**kwargs):
    settings = dict(student=VIT, student_image_size=32, student_overrides=TINY, teacher=VIT, teacher_pretrained=False,
                    teacher_image_size=32, teacher_overrides={"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2})
    settings.update(kwargs)
    module = VisualTokenizerDistillation(**settings)
    module.configure_model()
    return module


# ---- the spec's check -------------------------------------------------------------------------------
def test_student_equal_to_teacher_with_identity_projection_gives_minus_one(tmp_path):
    source = _module()
    path = str(tmp_path / "student.pth")
    source.save_student(path)
    same = dict(teacher=VIT, teacher_checkpoint=path, teacher_overrides=TINY, teacher_image_size=32, teacher_pretrained=False)
    module = _module(student_checkpoint=path, projection="identity", **same).eval()
    images = torch.rand(3, 3, 48, 48)
    assert module.distillation_loss(images)["loss"].item() == pytest.approx(-1.0, abs=1e-6)
    module.double()
    out = module.distillation_loss(images.double())
    assert out["loss"].item() == pytest.approx(-1.0, abs=1e-12)
    assert out["cosine"].shape == (3, 16)


# ---- grid alignment ---------------------------------------------------------------------------------
def test_area_resampling_is_the_mean_of_the_overlapped_teacher_cells():
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 map: 2x2 block means by hand
    assert resample_grid(grid, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    features = torch.randn(2, 49, 5, dtype=torch.float64)  # MobileNetV2's 7x7 -> a ViT's 8x8
    ours = resample_grid(features, (8, 8), "area")
    cells = features.view(2, 7, 7, 5)
    for i in range(8):
        for j in range(8):
            rows = range(math.floor(i * 7 / 8), math.ceil((i + 1) * 7 / 8))
            cols = range(math.floor(j * 7 / 8), math.ceil((j + 1) * 7 / 8))
            expected = torch.stack([cells[:, r, c] for r in rows for c in cols]).mean(0)
            torch.testing.assert_close(ours[:, i * 8 + j], expected, rtol=0, atol=1e-12)
    assert resample_grid(features, (7, 7), "bilinear") is features
    assert resample_grid(features, (4, 4), "bilinear").shape == (2, 16, 5)
    with pytest.raises(ConfigError, match="not a square grid"):
        resample_grid(torch.zeros(1, 12, 3), (2, 2))


# ---- masking ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ratio", "patches", "expected"), [(0.4, 64, 26), (0.4, 16, 6), (0.4, 256, 102), (0.25, 49, 12)])
def test_each_image_masks_exactly_round_ratio_times_n(ratio, patches, expected):
    assert num_masked(ratio, patches) == expected
    mask = sample_patch_mask(50, patches, ratio)
    assert mask.sum(1).tolist() == [expected] * 50
    assert len({tuple(row.tolist()) for row in mask}) > 40  # drawn per image
    frequency = sample_patch_mask(4000, patches, ratio).float().mean(0)  # uniform over positions
    assert torch.allclose(frequency, torch.full_like(frequency, expected / patches), atol=0.05)


def test_replace_masked_touches_masked_positions_only():
    tokens = torch.randn(2, 3, 2, 4)  # timm's NHWC patch embedding (dynamic_img_size)
    mask = torch.tensor([[True, False, False, True, False, False], [False] * 6])
    token = torch.randn(4)
    out = replace_masked(tokens, mask, token).view(2, 6, 4)
    flat = tokens.view(2, 6, 4)
    assert torch.equal(out[mask], token.expand(2, 4)) and torch.equal(out[~mask], flat[~mask])


def test_the_mask_token_enters_the_blocks_at_masked_patches_only():
    module = _module(mask_ratio=0.4).eval()
    vit = module.student.backbone
    pixels = torch.randn(2, 3, 32, 32)
    mask = sample_patch_mask(2, 16, 0.4)
    seen = {}
    handle = vit.blocks.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0].detach()))
    try:
        masked = module.student_features(pixels, mask)
    finally:
        handle.remove()
    patches = seen["x"][:, vit.num_prefix_tokens :] - vit.pos_embed[:, vit.num_prefix_tokens :].detach()
    embedded = vit.patch_embed(pixels).detach()
    torch.testing.assert_close(patches[mask], module.mask_token.detach().view(1, 32).expand(int(mask.sum()), 32))
    torch.testing.assert_close(patches[~mask], embedded[~mask])
    assert mask.sum(1).tolist() == [6, 6]
    # no mask: the plain timm forward; the hook is gone afterwards
    torch.testing.assert_close(module.student_features(pixels, torch.zeros(2, 16, dtype=torch.bool)), module.student(pixels))
    assert not vit.patch_embed._forward_hooks
    assert not torch.equal(masked, module.student(pixels))
    # the mask token learns from masked patches only
    module.student_features(pixels, mask).sum().backward()
    assert module.mask_token.grad.abs().sum() > 0
    module.mask_token.grad = None
    module.student_features(pixels, torch.zeros(2, 16, dtype=torch.bool)).sum().backward()
    assert module.mask_token.grad is None or module.mask_token.grad.abs().sum() == 0


@pytest.mark.parametrize("loss_on", ["all", "masked"])
def test_loss_equals_a_float64_reference(loss_on):
    module = _module(mask_ratio=0.4, loss_on=loss_on).double().eval()
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    torch.manual_seed(3)
    out = module.distillation_loss(images)
    mask = out["mask"]
    torch.manual_seed(3)
    assert torch.equal(mask, sample_patch_mask(2, 16, 0.4))
    # naive reference: each network's own resize + normalisation, a 8x8 teacher grid averaged to 4x4
    def prepared(encoder):
        pixels = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(encoder.mean, dtype=torch.float64).view(1, 3, 1, 1)
        return (pixels - mean) / torch.tensor(encoder.std, dtype=torch.float64).view(1, 3, 1, 1)

    teacher = module.teacher(prepared(module.teacher)).view(2, 8, 8, 24)
    target = teacher.view(2, 4, 2, 4, 2, 24).mean(dim=(2, 4)).reshape(2, 16, 24)
    vit = module.student.backbone
    x = vit.patch_embed(prepared(module.student))
    x = torch.where(mask[..., None], module.mask_token, x)
    x = vit.norm(vit.blocks(vit._pos_embed(x)))[:, 1:]
    prediction = x @ module.head.weight.T + module.head.bias
    cosine = (prediction * target).sum(-1) / (prediction.norm(dim=-1) * target.norm(dim=-1))
    expected = -(cosine[mask].mean() if loss_on == "masked" else cosine.mean())
    torch.testing.assert_close(out["cosine"], cosine, rtol=0, atol=1e-10)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-10)


# ---- training ---------------------------------------------------------------------------------------
def test_training_lowers_the_loss_keeps_the_teacher_frozen_and_writes_the_student(tmp_path):
    output = tmp_path / "student.safetensors"
    # a CNN teacher with BatchNorm (timm's test_resnet: a 2x2 grid at 64 px, upsampled to the student's 4x4)
    module = _module(teacher="test_resnet", teacher_image_size=64, teacher_overrides=None, mask_ratio=0.4,
                     student_output=str(output))
    module.optimizer_settings.lr = 5e-3
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}  # BatchNorm statistics too
    data = ImageDataModule(sources=["shapes"], image_size=48, num_train=6, num_val=2, batch_size=6, seed=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    before = module.distillation_loss(batch, mask_ratio=0.0)["loss"].item()
    trainer = pl.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    assert module.teacher.training is False and module.student.training is True
    after = module.distillation_loss(batch, mask_ratio=0.0)["loss"].item()
    assert after < before - 0.05, (before, after)
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
    assert {"train/loss", "train/loss_masked", "train/loss_visible", "train/lr"} <= set(trainer.callback_metrics)
    assert output.exists() and json.loads(output.with_suffix(".json").read_text())["checkpoint"] == str(output)


def test_optimizer_trains_the_student_head_and_mask_token_only():
    module = _module(mask_ratio=0.4)
    module.trainer = pl.Trainer(max_steps=10, logger=False, accelerator="cpu")
    optimizer = module.configure_optimizers()["optimizer"]
    decayed, plain = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    named = dict(module.named_parameters())
    assert not {id(p) for n, p in named.items() if n.startswith("teacher.")} & (decayed | plain)
    for name in ("mask_token", "student.backbone.pos_embed", "student.backbone.cls_token", "head.bias", "student.backbone.norm.weight"):
        assert id(named[name]) in plain, name
    assert id(named["head.weight"]) in decayed and id(named["student.backbone.blocks.0.attn.qkv.weight"]) in decayed
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    # GVT's settings (spec section 2: lr 1e-4, weight decay 0.05, warm-up 0.1, cosine), a copy per module
    assert (GVT_OPTIMIZER.lr, GVT_OPTIMIZER.weight_decay, GVT_OPTIMIZER.warmup) == (1e-4, 0.05, 0.1)
    assert module.optimizer_settings == GVT_OPTIMIZER and module.optimizer_settings is not GVT_OPTIMIZER


def test_pil_images_and_tensors_reach_each_network_alike():
    from PIL import Image

    module = _module()
    images = torch.rand(2, 3, 40, 40)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for img in images]
    quantised = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pil]).float() / 255
    for ours, theirs in zip(module._network_inputs(pil), module._network_inputs(quantised)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert module(images).shape == (2, 16, 32)


# ---- the student as a timm checkpoint ---------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_student_loads_in_timm_and_build_vision_encoder(tmp_path, suffix):
    import timm

    module = _module(mask_ratio=0.4).eval()
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # "trained" weights, not timm's init
    path = tmp_path / f"student{suffix}"
    module.save_student(str(path))
    pixels = torch.randn(2, 3, 32, 32)
    expected = module.student(pixels)
    model = timm.create_model(VIT, num_classes=0, img_size=32, checkpoint_path=str(path), **TINY).eval()
    torch.testing.assert_close(model.forward_features(pixels)[:, 1:], expected, rtol=0, atol=0)
    encoder = build_vision_encoder(**json.loads(path.with_suffix(".json").read_text())).eval()
    torch.testing.assert_close(encoder(pixels), expected, rtol=0, atol=0)
    assert "mask_token" not in str(list(model.state_dict()))


# ---- the real offline teacher -----------------------------------------------------------------------
def test_the_offline_mobilenet_v2_teacher():
    module = _module(teacher="mobilenet_v2", teacher_pretrained=True, teacher_image_size=None, teacher_overrides=None,
                     student_image_size=64, student_overrides={**TINY, "embed_dim": 64})  # 8x8 student grid
    assert module.teacher.image_size == 224 and module.teacher.num_features == 1280
    official = torch.load(mobilenet_v2_weights(), map_location="cpu", weights_only=True)
    assert torch.equal(module.teacher.backbone[0][0].weight, official["features.0.0.weight"])
    assert not any(p.requires_grad for p in module.teacher.parameters())
    images = torch.rand(2, 3, 96, 96)
    _, teacher_in = module._network_inputs(images)
    resized = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    imagenet = ((resized - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    torch.testing.assert_close(teacher_in, imagenet)
    raw = module.teacher(teacher_in)
    assert raw.shape == (2, 49, 1280)
    torch.testing.assert_close(module.teacher_features(teacher_in), resample_grid(raw, (8, 8)), rtol=1e-5, atol=1e-5)
    out = module.distillation_loss(images)
    assert out["cosine"].shape == (2, 64) and -1 <= out["loss"].item() <= 1
    module.train()
    assert module.teacher.training is False


# ---- bad configurations -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_ratio": 1.0}, r"mask_ratio must lie in \[0, 1\)"),
        ({"mask_ratio": -0.1}, r"mask_ratio must lie in \[0, 1\)"),
        ({"loss_on": "masked"}, "nothing is masked with mask_ratio=0"),
        ({"loss_on": "visible"}, "loss_on must be one of"),
        ({"resample": "nearest"}, "resample must be one of"),
        ({"student": "mobilenet_v2"}, "the student is a timm model"),
        ({"student_image_size": 0}, "positive number of pixels"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        VisualTokenizerDistillation(**kwargs)


def test_a_mask_ratio_that_masks_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"masks no patch of the student's 16; use mask_ratio >= 0.03125"):
        _module(mask_ratio=0.02)


def test_masking_needs_a_plain_vit_student():
    with pytest.raises(ConfigError, match="needs a plain ViT student.*ResNet"):
        _module(student="test_resnet", student_overrides=None, mask_ratio=0.4)
    unmasked = _module(student="test_resnet", student_overrides=None, student_image_size=64)  # a CNN is fine unmasked
    assert unmasked.distillation_loss(torch.rand(1, 3, 32, 32))["cosine"].shape[1] == math.prod(unmasked.student_grid)


def test_identity_projection_needs_equal_widths_and_models_must_be_built():
    with pytest.raises(ConfigError, match="width 32 differs from the teacher's 24.*projection: linear"):
        _module(projection="identity")
    with pytest.raises(RuntimeError, match="configure_model"):
        VisualTokenizerDistillation().save_student("x.pth")
