"""ReTok flexible image tokenizer: the RTP / nested-dropout arithmetic, shapes, masking, resume, a fit."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.layers.adversarial import AdversarialSettings
from lightning_tokens.modules.image_tokenizer import (
    FlexibleImageTokenizer,
    keep_probability,
    multi_level_queries,
    pad_query_indices,
    sample_keep_lengths,
    semantic_weight,
)


def _tiny(**kwargs) -> FlexibleImageTokenizer:
    torch.manual_seed(0)
    kwargs.setdefault("semantic_pretrained", False)  # random frozen networks: enough for shapes and equalities
    kwargs.setdefault("teacher_image_size", 64)  # a 2x2 teacher grid: fast
    return FlexibleImageTokenizer(preset="tiny", **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> FlexibleImageTokenizer:
    module = _tiny()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    module.train()
    for _ in range(2):  # move the EMA codebook off its init
        module.training_loss(images)
    return module.eval()


def test_pad_query_indices_reference_numbers():
    idx = pad_query_indices(256, 32)
    assert idx.dtype == torch.long and torch.equal(idx, torch.arange(32, 256))
    assert len(idx) == 224 and 256 + len(idx) == 480
    with pytest.raises(ConfigError, match="pad_from"):
        pad_query_indices(32, 32)


def test_keep_probability_spec_table():
    assert keep_probability(128, 256, 224) == pytest.approx(0.7354, abs=5e-5)
    assert keep_probability(128, 256, 0) == pytest.approx(0.5039, abs=5e-5)
    assert keep_probability(32, 256, 224) == pytest.approx(0.9354, abs=5e-5)
    assert keep_probability(256, 256, 0) == pytest.approx(0.0039, abs=5e-5)
    assert keep_probability(256, 256, 224) == pytest.approx(0.4688, abs=5e-5)


@pytest.mark.parametrize("num_pad", [224, 0])
def test_uniform_sampler_matches_keep_probability(num_pad):
    total = 256 + num_pad
    keep = sample_keep_lengths(200_000, total, generator=torch.Generator().manual_seed(0))
    assert int(keep.min()) == 1 and int(keep.max()) == total
    for position in (1, 32, 128, 200, 256):
        empirical = (keep >= position).double().mean().item()
        assert abs(empirical - keep_probability(position, 256, num_pad)) < 0.005


def test_sampler_modes_and_granularity():
    gen = torch.Generator().manual_seed(0)
    pow2 = sample_keep_lengths(5000, 480, "pow2", generator=gen)
    assert set(pow2.unique().tolist()) == {1, 2, 4, 8, 16, 32, 64, 128, 256, 480}
    mixed = sample_keep_lengths(5000, 480, "uniform_pow2", generator=gen)
    non_pow2 = (mixed & (mixed - 1)) != 0
    # half uniform (471 of 480 values are no power of two), half pow2 (480 is the 1 of 10 choices that is not)
    assert abs(non_pow2.double().mean().item() - (0.5 * 471 / 480 + 0.5 * 0.1)) < 0.03
    batch = sample_keep_lengths(16, 480, "uniform", "per_batch", generator=gen)
    assert len(batch.unique()) == 1
    with pytest.raises(ConfigError, match="sampling"):
        sample_keep_lengths(4, 10, "gauss")


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_semantic_weight_monotone_and_w0_at_one(schedule):
    weights = semantic_weight(torch.arange(1, 481), 256, 0.5, schedule)
    assert weights[0].item() == 0.5 and semantic_weight(1, 256, 0.5, schedule) == 0.5
    assert bool((weights[1:] <= weights[:-1]).all())
    assert weights[-1].item() == 0.0  # the full sequence (and RTP lengths beyond N) gets no alignment
    assert semantic_weight(128, 256, 0.5, "linear") == pytest.approx(0.5 * 128 / 255)


def test_multi_level_queries_pools_row_first():
    grid = torch.arange(64.0).view(1, 1, 8, 8)
    queries = multi_level_queries(grid, 8).flatten()
    assert queries[:2].tolist() == [31.5, 31.5]  # two global means
    assert queries[2:4].tolist() == [29.5, 33.5]  # left half, right half (columns split first)
    assert queries[4:].tolist() == [13.5, 17.5, 45.5, 49.5]  # 2x2 quadrants, row-major


def test_vq_is_the_library_and_its_ema_buffers_are_saved(tokenizer):
    from vector_quantize_pytorch import VectorQuantize

    assert isinstance(tokenizer.quantizer, VectorQuantize)
    keys = tokenizer.state_dict().keys()
    assert "quantizer._codebook.embed_avg" in keys and "quantizer._codebook.cluster_size" in keys
    assert tokenizer.quantizer._codebook.cluster_size.sum() != tokenizer.size.codebook_size  # EMA moved


def test_encode_every_length_and_decode_back(tokenizer):
    images = torch.rand(2, 3, 32, 32)
    full = tokenizer.encode(images)
    assert full.shape == (2, 32) and full.dtype == torch.long
    for k in (1, 5, 32):
        codes = tokenizer.encode(images, num_tokens=k)
        assert codes.shape == (2, k) and torch.equal(codes, full[:, :k])
    for k in range(1, 33):
        out = tokenizer.decode(full[:, :k])
        assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_mixed_lengths_decode_like_each_alone(tokenizer):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([1, 7, 32, 19])
    with torch.no_grad():
        quantized, _, _ = tokenizer.quantize(tokenizer.encode_latents(images), update=False)
        batch, _ = tokenizer.decode_tokens(quantized, keep)
        for b, k in enumerate(keep.tolist()):
            alone, _ = tokenizer.decode_tokens(quantized[b : b + 1, :k], torch.tensor([k]))
            torch.testing.assert_close(batch[b : b + 1], alone, atol=1e-5, rtol=0)
    codes = tokenizer.encode(images)
    expected = ((batch[1:2] + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(tokenizer.decode(codes[1:2, :7]), expected, atol=1e-5, rtol=0)  # public API
    # the tail matters: a longer prefix changes the image
    assert not torch.allclose(tokenizer.decode(codes[:, :1]), tokenizer.decode(codes[:, :32]))


def test_bad_inputs_raise_config_errors(tokenizer):
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="num_tokens"):
        tokenizer.encode(images, num_tokens=33)  # an RTP pad position is not a code at inference
    with pytest.raises(ConfigError, match="num_tokens"):
        tokenizer.encode(images, num_tokens=0)
    with pytest.raises(ConfigError, match="codebook_size"):
        tokenizer.decode(torch.tensor([[0, 256]]))
    with pytest.raises(ConfigError, match="codebook_size"):
        tokenizer.decode(torch.tensor([[-1]]))
    with pytest.raises(ConfigError, match="images"):
        tokenizer.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="patch_size"):
        FlexibleImageTokenizer(preset="tiny", patch_size=5, semantic_teacher=None, perceptual_weight=0)
    with pytest.raises(ConfigError, match="power of two"):
        FlexibleImageTokenizer(preset="tiny", num_tokens=24, semantic_teacher=None, perceptual_weight=0)
    with pytest.raises(ConfigError, match="preset"):
        FlexibleImageTokenizer(preset="huge")


def test_perceptual_loss_is_zero_for_equal_images_only():
    from lightning_tokens.modules.image_tokenizer import FeaturePerceptualLoss

    torch.manual_seed(0)
    loss = FeaturePerceptualLoss(layers=(3, 6), pretrained=False)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loss(images, images), torch.zeros(2))
    other = loss(images, images.flip(-1))
    assert other.shape == (2,) and bool((other > 0).all())


def test_rtp_off_is_plain_nested_dropout():
    plain = _tiny(rtp=False, semantic_teacher=None, perceptual_weight=0)
    assert plain.num_pad == 0 and plain.encode_latents(torch.rand(1, 3, 32, 32)).shape[1] == 32
    rtp = _tiny(semantic_teacher=None, perceptual_weight=0)
    assert rtp.num_pad == 24 and rtp.encode_latents(torch.rand(1, 3, 32, 32)).shape[1] == 56


def test_exact_resume_from_state_dict(tokenizer, tmp_path):
    path = tmp_path / "tok.pt"
    torch.save(tokenizer.state_dict(), path)
    restored = _tiny()
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(restored.encode(images), tokenizer.encode(images))
    keep = torch.tensor([3, 40, 56, 9])
    losses = []
    for module in (tokenizer, restored):
        module.train()
        losses.append({k: v.detach() for k, v in module.training_loss(images, keep).items()})
        module.eval()
    for name in losses[0]:
        assert torch.equal(losses[0][name], losses[1][name]), name
    # the EMA step it took moved both codebooks the same way
    assert torch.equal(tokenizer.quantizer._codebook.embed, restored.quantizer._codebook.embed)


def test_semantic_loss_is_weighted_by_kept_length():
    module = _tiny(perceptual_weight=0)
    module.train()
    images = torch.rand(2, 3, 32, 32)
    full = module.training_loss(images, torch.tensor([32, 56]))["semantic"]
    assert full.item() == 0.0  # w_sem(k >= N) = 0 under the linear schedule
    short = module.training_loss(images, torch.tensor([1, 1]))["semantic"]
    assert short.item() != 0.0


def test_fit_three_steps_logs_psnr_per_length_and_writes_grid(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_tokens.datamodules.images import ImageDataModule

    module = _tiny(decoder_finetune_step=2, adversarial=AdversarialSettings(width=8, depth=2))
    data = ImageDataModule(sources=["digits"], image_size=32, num_val=4, batch_size=4, seed=0)
    trainer = pl.Trainer(
        max_steps=3, limit_val_batches=1, val_check_interval=3, accelerator="cpu", devices=1,
        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for k in (4, 8, 16, 32):
        assert f"val/psnr@{k}" in metrics and torch.isfinite(metrics[f"val/psnr@{k}"])
        assert f"val/ssim@{k}" in metrics
    assert 0 < metrics["val/codebook_usage"] <= 1 and metrics["val/perplexity"] >= 1
    assert (tmp_path / "lightning_logs" / "version_0" / "recon_grid.png").exists()
    # decoder fine-tuning from step 2: only the pixel decoder (and the discriminator) still train
    trainable = {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"pixel_decoder", "discriminator"}
    assert metrics["train/adversarial_weight"] > 0 and torch.isfinite(metrics["train/discriminator"])
    assert metrics["train/semantic"].item() == 0.0  # and the semantic loss is off (step 3)


def _fit(root, max_steps, ckpt_path=None, **trainer_kwargs):
    from lightning_tokens.datamodules.images import ImageDataModule

    pl.seed_everything(7)
    # dead-code re-seeding draws and the discriminator (BatchNorm buffers, switched on at step 1) resume exactly too
    module = _tiny(dead_code_threshold=1, adversarial=AdversarialSettings(width=8, depth=2, start=1))
    data = ImageDataModule(sources=["digits"], image_size=32, num_val=0, batch_size=4, seed=0)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, limit_val_batches=0, **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


class _StopAt(pl.Callback):
    """Stops a fit after ``step`` optimizer steps (an interruption that keeps max_steps and the lr schedule)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_trainer_resume_equals_an_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    straight = _fit(tmp_path / "a", 4, enable_checkpointing=False)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    _fit(tmp_path / "b", 4, callbacks=[saver, _StopAt(2)])  # interrupted: same schedule, stops after step 2
    resumed = _fit(tmp_path / "c", 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), enable_checkpointing=False)
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:  # weights, the EMA codebook and its cluster sizes: bit for bit
        assert torch.equal(expected[name], got[name]), name


def _adversarial_tiny(**settings) -> FlexibleImageTokenizer:
    return _tiny(semantic_teacher=None, perceptual_weight=0, adversarial=AdversarialSettings(width=8, depth=2, **settings))


def test_adversarial_terms_give_each_side_its_own_gradient():
    module = _adversarial_tiny(norm="group").train()
    reference = copy.deepcopy(module)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([5, 32, 56, 12])
    terms = module.training_loss(images, keep)
    terms["loss"].backward()

    # by hand: the discriminator minimises weight * hinge on detached reconstructions; the tokenizer minimises
    # rec + vq + weight * lambda * (-D(x_hat)), lambda = |grad rec| / (|grad adv| + 1e-4) at the last conv
    quantized, _, vq = reference.quantize(reference.encode_latents(images))
    pixels, _ = reference.decode_tokens(quantized, keep)
    target = images * 2 - 1
    rec = F.mse_loss(pixels, target)
    disc = reference.discriminator
    d_loss = 0.5 * 0.5 * (F.relu(1 - disc(target)).mean() + F.relu(1 + disc(pixels.detach())).mean())
    d_params = list(disc.parameters())
    d_grads = torch.autograd.grad(d_loss, d_params, retain_graph=True)
    for (name, param), expected in zip(module.discriminator.named_parameters(), d_grads):
        torch.testing.assert_close(param.grad, expected, msg=name)
    g_loss = -disc(pixels).mean()
    last = reference.pixel_decoder.refine[-1].weight
    g_rec, = torch.autograd.grad(rec, last, retain_graph=True)
    g_adv, = torch.autograd.grad(g_loss, last, retain_graph=True)
    lam = g_rec.norm() / (g_adv.norm() + 1e-4)
    torch.testing.assert_close(terms["adversarial_weight"], 0.5 * lam)
    others = [(n, p) for n, p in reference.named_parameters() if not n.startswith("discriminator.") and p.requires_grad]
    grads = torch.autograd.grad(rec + vq + 0.5 * lam.detach() * g_loss, [p for _, p in others], allow_unused=True)
    got = dict(module.named_parameters())
    for (name, _), expected in zip(others, grads):
        if expected is None:
            assert got[name].grad is None or not got[name].grad.any(), name
        else:
            torch.testing.assert_close(got[name].grad, expected, msg=name, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss"], rec + vq + 0.5 * lam * g_loss + d_loss)


def test_adversarial_is_off_before_its_start_but_the_discriminator_still_gets_a_gradient():
    module = _adversarial_tiny(start=10).train()
    terms = module.training_loss(torch.rand(2, 3, 32, 32), torch.tensor([4, 32]))
    assert terms["adversarial_weight"].item() == 0.0 and terms["discriminator"].item() == 0.0
    torch.testing.assert_close(terms["loss"], terms["rec"] + terms["vq"])
    terms["loss"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in module.discriminator.parameters())
