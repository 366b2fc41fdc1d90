"""ReTok: a flexible-length 1D image tokenizer with Redundant Token Padding and Hierarchical Semantic
Regularization.

"Improving Flexible Image Tokenizers for Autoregressive Image Generation" (ReTok, arXiv 2601.01535;
reference code ``zfu006/ReTok``, a GigaTok fork, whose release lacks the training loop) encodes an image
into an ordered sequence of N discrete tokens so that any prefix of k ≤ N tokens decodes to the image at
a coarser quality. It is trained with *nested dropout*: a kept length k is sampled and the decoder only
sees the first k tokens.

- **Redundant Token Padding (RTP).** M = N − ``pad_from`` extra encoder queries, copies of the queries
  ``pad_from .. N−1`` with their own positional table (:func:`pad_query_indices`), make the encoder emit
  N + M tokens; k is drawn over N + M, so the tail of the real sequence is kept far more often
  (:func:`keep_probability`: N=256, M=224, token 128 kept with probability 0.7354 instead of 0.5039).
  At inference k ≤ N.
- **Hierarchical Semantic Regularization (HSR).** Decoder features at ``semantic_layer``, through an MLP,
  are aligned by negative cosine to a frozen teacher's patch features, weighted per sample by
  ``w_sem(k) = w0·g(k)`` (:func:`semantic_weight`), strong for short prefixes and weak toward the tail.

Architecture (faithful in structure, simplified in parts; see :class:`FlexibleImageTokenizer`): patchify
conv → 2D patch features → 1D encoder (multi-level average-pooled latent queries cross-attending to the
patch features) → ``vector_quantize_pytorch.VectorQuantize`` (cosine codebook, rotation trick, β=0.25) →
1D→2D decoder (grid queries cross-attending to the *kept* tokens under a key-padding mask) → pixel
decoder (linear, pixel shuffle, two convolutions).

Losses: L2 reconstruction, a perceptual loss (frozen MobileNetV2 feature distance standing in for LPIPS,
whose weights do not ship offline), the VQ commitment loss of the library, HSR, and optionally the PatchGAN
hinge loss with VQGAN's adaptive weight (:mod:`lightning_tokens.layers.adversarial`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.reduction import global_mean
from lightning_tokens.layers.adversarial import (
    AdversarialSettings,
    PatchDiscriminator,
    adaptive_adversarial_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from lightning_tokens.metrics.speech import CodebookUsage
from lightning_tokens.models.vision import build_vision_encoder
from lightning_tokens.modules.causal_lm import OptimizerSettings, adamw_with_schedule
from lightning_tokens.modules.visual_tokenizer import resample_grid

__all__ = [
    "RETOK_OPTIMIZER",
    "RETOK_PRESETS",
    "FeaturePerceptualLoss",
    "FlexibleImageTokenizer",
    "TokenizerSize",
    "keep_probability",
    "multi_level_queries",
    "pad_query_indices",
    "sample_keep_lengths",
    "semantic_weight",
]

Sampling = Literal["uniform", "pow2", "uniform_pow2"]
Granularity = Literal["per_sample", "per_batch"]
Schedule = Literal["linear", "cosine", "step"]

#: The reference's optimiser: AdamW, lr 1e-4, betas (0.9, 0.95), weight decay 1e-4, cosine to 1e-5.
RETOK_OPTIMIZER = OptimizerSettings(lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.95), warmup=0, min_lr_ratio=0.1)


# ---- pure functions ------------------------------------------------------------------------------
def pad_query_indices(num_tokens: int, pad_from: int) -> Tensor:
    """Indices of the latent queries that RTP replicates as pad queries: ``arange(pad_from, num_tokens)``.

    The encoder then emits ``num_tokens + len(indices)`` tokens (reference: 256 + 224 = 480).

    Example:
        >>> idx = pad_query_indices(256, 32)
        >>> len(idx), int(idx[0]), int(idx[-1]), 256 + len(idx)
        (224, 32, 255, 480)
    """
    if not 0 <= pad_from < num_tokens:
        raise ConfigError(f"pad_from={pad_from} must lie in [0, num_tokens={num_tokens}) (reference: 32 of 256).")
    return torch.arange(pad_from, num_tokens, dtype=torch.long)


def keep_probability(position: int, num_tokens: int, num_pad: int) -> float:
    """P(the token at 1-based ``position`` is kept) when k ~ U{1..N+M}: ``(N + M − i + 1) / (N + M)``.

    ``num_pad = 0`` is plain nested dropout over N.

    Example:
        >>> round(keep_probability(128, 256, 224), 4), round(keep_probability(128, 256, 0), 4)
        (0.7354, 0.5039)
    """
    total = num_tokens + num_pad
    if num_pad < 0 or not 1 <= position <= total:
        raise ConfigError(f"position={position} must lie in [1, num_tokens + num_pad = {total}] and num_pad >= 0.")
    return (total - position + 1) / total


def _sample_one_mode(count: int, total: int, pow2: bool, generator: torch.Generator | None) -> Tensor:
    if not pow2:
        return torch.randint(1, total + 1, (count,), generator=generator)
    choices = _pow2_choices(total)
    picks = torch.randint(0, len(choices), (count,), generator=generator)
    return choices[picks]


def _pow2_choices(total: int) -> Tensor:
    """Powers of two ≤ ``total``, and ``total`` itself when it is not one (so every token gets trained)."""
    values = [2**e for e in range(int(math.log2(total)) + 1)]
    if values[-1] != total:
        values.append(total)
    return torch.tensor(values, dtype=torch.long)


def sample_keep_lengths(
    batch_size: int,
    total: int,
    sampling: Sampling = "uniform",
    granularity: Granularity = "per_sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Kept lengths k ∈ [1, total] for a batch, FlexTok's modes (``MaskedNestedDropout.sample_keep_k``).

    - ``uniform``: k ~ U{1..total}.
    - ``pow2``: k uniform over the powers of two ≤ total, plus ``total`` itself when it is not a power of
      two (RTP's 480 = 256 + 224), so the full sequence is trained too.
    - ``uniform_pow2``: per sample a fair coin picks ``uniform`` or ``pow2`` (``per_batch``: one coin).

    ``per_sample`` draws one k per image (the decoder masks each image's tail); ``per_batch`` one k shared
    by the batch (One-D-Piece's ``apply_tail_token_drop``).

    Example:
        >>> k = sample_keep_lengths(4, 480, generator=torch.Generator().manual_seed(0))
        >>> k.shape, bool(((k >= 1) & (k <= 480)).all())
        (torch.Size([4]), True)
    """
    check_choice("sample_keep_lengths", "sampling", sampling, ("uniform", "pow2", "uniform_pow2"))
    check_choice("sample_keep_lengths", "granularity", granularity, ("per_sample", "per_batch"))
    if batch_size < 1 or total < 1:
        raise ConfigError(f"sample_keep_lengths(batch_size={batch_size}, total={total}): both must be >= 1.")
    count = batch_size if granularity == "per_sample" else 1
    if sampling == "uniform_pow2":
        coin = torch.rand(count, generator=generator) < 0.5
        keep = torch.where(
            coin, _sample_one_mode(count, total, True, generator), _sample_one_mode(count, total, False, generator)
        )
    else:
        keep = _sample_one_mode(count, total, sampling == "pow2", generator)
    return keep if granularity == "per_sample" else keep.expand(batch_size).clone()


def semantic_weight(
    k: int | Tensor, num_tokens: int, w0: float = 0.5, schedule: Schedule = "linear", step_at: int | None = None,
) -> float | Tensor:
    """HSR weight ``w_sem(k) = w0·g(s)`` of a sample decoded from its first k tokens.

    ``s = (min(k, N) − 1) / (N − 1)`` runs from 0 at k = 1 to 1 at k ≥ N (RTP lengths beyond N count as N),
    so ``w_sem(1) = w0`` exactly and ``w_sem`` is non-increasing in k:

    - ``linear``: ``g = 1 − s`` (0 for the full sequence);
    - ``cosine``: ``g = (1 + cos(π s)) / 2``;
    - ``step``: ``g = 1`` while ``k ≤ step_at`` (default N / 2), else 0.

    Example:
        >>> semantic_weight(1, 256), semantic_weight(256, 256), round(semantic_weight(128, 256, schedule="cosine"), 4)
        (0.5, 0.0, 0.2515)
    """
    check_choice("semantic_weight", "schedule", schedule, ("linear", "cosine", "step"))
    if num_tokens < 1:
        raise ConfigError(f"semantic_weight(num_tokens={num_tokens}): must be >= 1.")
    scalar = not isinstance(k, Tensor)
    kt = torch.as_tensor(k, dtype=torch.float64)
    kept = kt.clamp(1, num_tokens)
    if schedule == "step":
        threshold = num_tokens // 2 if step_at is None else step_at
        g = (kept <= threshold).to(torch.float64)
    else:
        s = (kept - 1) / max(num_tokens - 1, 1)
        g = 1 - s if schedule == "linear" else 0.5 * (1 + torch.cos(math.pi * s))
    weight = w0 * g
    return float(weight) if scalar else weight.to(k.dtype if k.is_floating_point() else torch.float32)


def multi_level_queries(features: Tensor, num_tokens: int) -> Tensor:
    """Multi-level average-pooled query init (the reference's ``sample_multi_level_1d_tokens``, row first).

    From a patch map ``(B, C, H, W)``: group 0 and group 1 are the global mean (1 token each), group i ≥ 2
    splits the map into ``2^(i−1)`` blocks, doubling the column splits first then the row splits, one
    mean per block, row-major. The groups concatenated give ``num_tokens = 2^n`` queries ``(B, N, C)``.

    Example:
        >>> multi_level_queries(torch.arange(16.0).view(1, 1, 4, 4), 4).flatten().tolist()
        [7.5, 7.5, 6.5, 8.5]
    """
    levels = _query_levels(num_tokens)
    height, width = features.shape[-2:]
    groups = []
    for group in range(levels + 1):
        level = max(group - 1, 0)
        cols, rows = 2 ** ((level + 1) // 2), 2 ** (level // 2)
        pooled = F.avg_pool2d(features, kernel_size=(height // rows, width // cols))
        groups.append(pooled.flatten(2).transpose(1, 2))
    return torch.cat(groups, dim=1)


def _query_levels(num_tokens: int) -> int:
    levels = int(round(math.log2(num_tokens))) if num_tokens > 0 else -1
    if levels < 0 or 2**levels != num_tokens:
        raise ConfigError(f"num_tokens={num_tokens}: the multi-level query init needs a power of two (32, 256, ...).")
    return levels


def _check_query_grid(num_tokens: int, grid: int) -> None:
    level = _query_levels(num_tokens) - 1
    if level < 0:
        return
    cols, rows = 2 ** ((level + 1) // 2), 2 ** (level // 2)
    if grid % cols or grid % rows:
        raise ConfigError(
            f"num_tokens={num_tokens} on a {grid}x{grid} patch grid: the finest query level splits it into "
            f"{rows}x{cols} blocks, which must divide the grid; use fewer tokens or a smaller patch_size."
        )


# ---- sizes ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenizerSize:
    """Sizes of a :class:`FlexibleImageTokenizer` (a preset, then the overrides)."""

    image_size: int
    patch_size: int
    num_tokens: int
    pad_from: int
    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    codebook_size: int
    codebook_dim: int
    pixel_channels: int
    semantic_layer: int


#: ``tiny``: 32 px, 4 px patches (8×8 grid), 32 tokens + 24 pads, width 64, 2 layers, codebook 256×8.
#: ``sb256``: the paper's 256 px, 16×16 grid, 256 tokens + 224 pads, small encoder (6×512, 8 heads),
#: base decoder (12×768, 12 heads), codebook 16384×8, HSR at decoder layer 3.
RETOK_PRESETS: dict[str, TokenizerSize] = {
    "tiny": TokenizerSize(32, 4, 32, 8, 64, 2, 4, 64, 2, 4, 256, 8, 16, 1),
    "sb256": TokenizerSize(256, 16, 256, 32, 512, 6, 8, 768, 12, 12, 16384, 8, 64, 3),
}


# ---- building blocks -----------------------------------------------------------------------------
def _layers(width: int, depth: int, heads: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        for _ in range(depth)
    )


class PixelDecoder(nn.Module):
    """2D decoder tokens ``(B, G·G, C)`` → pixels ``(B, 3, G·p, G·p)`` in the ``[−1, 1]`` scale: layer norm,
    a linear map to ``p²·channels``, pixel shuffle, then two 3×3 convolutions (a light stand-in for the
    reference's CNN decoder)."""

    def __init__(self, width: int, patch_size: int, channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, patch_size * patch_size * channels)
        self.refine = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, 3, 3, padding=1)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        batch, count, _ = tokens.shape
        grid = math.isqrt(count)
        maps = self.proj(self.norm(tokens)).transpose(1, 2).reshape(batch, -1, grid, grid)
        return self.refine(F.pixel_shuffle(maps, self.patch_size))


class FeaturePerceptualLoss(nn.Module):
    """A perceptual distance from a frozen ImageNet MobileNetV2 (offline weights), standing in for LPIPS.

    LPIPS's recipe without its learned linear heads: features of both images at a few depths (strides 4,
    8, 16), each unit-normalised over channels per position, squared differences summed over channels,
    averaged over positions and depths. 0 for equal images.

    Args:
        image_size: side the images are resized to before the network (``None``: as they are).
        layers: indices into ``mobilenet_v2().features`` whose outputs are compared.
        pretrained: the offline ImageNet weights (``False``: random, for tests only).
    """

    def __init__(self, image_size: int | None = None, layers: Sequence[int] = (3, 6, 13), pretrained: bool = True) -> None:
        super().__init__()
        encoder = build_vision_encoder("mobilenet_v2", pretrained=pretrained, image_size=image_size or 224)
        self.layers = tuple(int(i) for i in layers)
        self.network = encoder.backbone[: max(self.layers) + 1]
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.network.to(memory_format=torch.channels_last)  # oneDNN's fast depthwise convolutions on the CPU

    def features(self, images: Tensor) -> list[Tensor]:
        x = images
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        outputs = []
        for index, block in enumerate(self.network):
            x = block(x)
            if index in self.layers:
                outputs.append(F.normalize(x, dim=1, eps=1e-8))
        return outputs

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Per-sample distances ``(B,)`` between images in ``[0, 1]``."""
        with torch.no_grad():
            wanted = self.features(target)
        got = self.features(reconstruction)
        return torch.stack([(a - b).pow(2).sum(1).mean((1, 2)) for a, b in zip(got, wanted)]).mean(0)

    @override
    def train(self, mode: bool = True) -> FeaturePerceptualLoss:
        return super().train(False)  # frozen BatchNorm statistics


# ---- the module ----------------------------------------------------------------------------------
class FlexibleImageTokenizer(pl.LightningModule):
    """ReTok (arXiv 2601.01535): a 1D VQ image tokenizer decodable from any prefix of its N tokens,
    trained with nested dropout over N + M positions (RTP) and length-weighted semantic alignment (HSR).

    Features:
        - Presets ``tiny`` (32 px, 32 tokens, CPU) and ``sb256`` (the paper's small-encoder / base-decoder
          at 256 px, 256 tokens, codebook 16384×8), every size overridable.
        - Quantizer: ``vector_quantize_pytorch.VectorQuantize`` (cosine codebook = l2-normalised codes,
          rotation trick, commitment β = 0.25, EMA codebook updates: its buffers are in the state dict).
        - ``rtp: false`` is plain nested dropout over N (the baseline); ``sampling`` / ``granularity`` as
          :func:`sample_keep_lengths`. With ``per_sample`` one batch mixes kept lengths through the
          decoder's key-padding mask.
        - HSR against ``semantic_teacher`` (offline MobileNetV2 by default, any timm name; ``None``: off),
          its feature grid area-resampled onto the decoder grid.
        - ``decoder_finetune_step``: from that step on only the pixel decoder (and the discriminator) train,
          the codebook is frozen too and the semantic loss is off (GigaTok's ``freeze_but_decoder_iter``).
        - ``adversarial``: a PatchGAN discriminator trained with the hinge loss alongside the tokenizer, in the
          same optimizer step: the generator's term reaches the tokenizer through a copy of the discriminator's
          weights cut from the graph, the discriminator's term sees the reconstructions detached, so one
          backward gives each side exactly its own gradient, and gradient accumulation, clipping, precision
          and DDP work as for any module. The generator's term is scaled by VQGAN's adaptive weight, computed
          at the pixel decoder's last convolution from the global (all-process) gradients.
        - Logs ``train/{loss,rec,perceptual,vq,semantic,keep_mean}`` (with ``adversarial``, also
          ``train/{adversarial,discriminator,adversarial_weight,logits_real,logits_fake}``); in validation ``val/psnr@k``,
          ``val/ssim@k`` for k ∈ {N/8, N/4, N/2, N}, ``val/codebook_usage``, ``val/perplexity``, and writes
          ``recon_grid.png`` (rows = images, columns = original then each k) to the log folder (and to the
          logger when it has ``log_image``).

    Simplifications against the reference, by design: a patchify convolution instead of the CNN encoder;
    positional tables added once to the inputs (not to every layer's queries and keys); a light pixel
    decoder; no "direct" auxiliary branch; the discriminator shares the tokenizer's AdamW settings, schedule
    and gradient clipping (the reference gives it its own optimizer with the same settings); MobileNetV2
    features instead of LPIPS and DINOv2 offline.

    Args:
        preset: ``tiny`` or ``sb256``.
        image_size, patch_size, num_tokens, pad_from, encoder_width, encoder_depth, encoder_heads,
            decoder_width, decoder_depth, decoder_heads, codebook_size, codebook_dim, pixel_channels,
            semantic_layer: overrides of the preset (``None``: the preset's). ``num_tokens`` must be a power of
            two (multi-level query init); ``semantic_layer`` is 1-based over the decoder layers.
        rtp: Redundant Token Padding (M = num_tokens − pad_from pad queries); ``False``: plain nested dropout.
        sampling: ``uniform`` | ``pow2`` | ``uniform_pow2``.
        granularity: ``per_sample`` | ``per_batch``.
        keep_seed: the kept lengths of step ``s`` are drawn for the global batch from a generator seeded by
            ``(keep_seed, s)``, rank ``r`` of ``w`` taking positions ``r, r + w, ...`` (the order in which
            ``DistributedSampler`` deals samples): a resumed run draws the lengths of an uninterrupted one, and
            a DDP run those of one process with the same global batch.
        reconstruction_weight: weight of the L2 loss (on images scaled to ``[−1, 1]``).
        perceptual_weight: weight of the perceptual loss (0: off, no network built).
        perceptual_image_size: input side of the perceptual network (``None``: the image size).
        perceptual_layers: MobileNetV2 ``features`` indices compared (``None``: 3, 6, 13 = strides 4, 8, 16).
        commitment_weight: β of the VQ commitment loss.
        codebook_decay: EMA decay of the codebook.
        dead_code_threshold: codes used fewer times than this in a batch are re-seeded from the batch (0:
            never); under a Trainer its draws are keyed by the step (exact resume holds).
        semantic_teacher: ``mobilenet_v2`` (offline), a timm name, or ``None`` (HSR off).
        semantic_pretrained: load the pretrained weights of the teacher and of the perceptual network (``False``:
            random frozen networks, for tests only). Both frozen networks are part of the state dict.
        teacher_image_size: the teacher's input side (``None``: its default, 224 for MobileNetV2).
        semantic_schedule: ``linear`` | ``cosine`` | ``step`` (:func:`semantic_weight`).
        semantic_weight: w0.
        semantic_step_at: k0 of the ``step`` schedule (``None``: N / 2).
        decoder_finetune_step: the step from which only the pixel decoder trains (``None``: never).
        adversarial: the PatchGAN option (:class:`~lightning_tokens.layers.adversarial.AdversarialSettings`;
            ``None``: off, as in the quickstart; the reference trains with ``weight 0.5, start 0``).
        optimizer: AdamW settings (default :data:`RETOK_OPTIMIZER`).
        lr_schedule: ``cosine`` (warm-up then cosine to ``min_lr_ratio · lr``) or ``constant`` (``lr`` throughout).
        grid_images: images in the validation grid.

    Example::

        tokenizer = FlexibleImageTokenizer(preset="tiny")
        pl.Trainer(max_steps=500).fit(tokenizer, datamodule=ImageDataModule(sources=["digits"], image_size=32))
        codes = tokenizer.encode(images, num_tokens=8)      # (B, 8) LongTensor
        preview = tokenizer.decode(codes)                    # (B, 3, 32, 32) in [0, 1]
    """

    def __init__(
        self,
        preset: Literal["tiny", "sb256"] = "tiny",
        image_size: int | None = None,
        patch_size: int | None = None,
        num_tokens: int | None = None,
        pad_from: int | None = None,
        encoder_width: int | None = None,
        encoder_depth: int | None = None,
        encoder_heads: int | None = None,
        decoder_width: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        codebook_size: int | None = None,
        codebook_dim: int | None = None,
        pixel_channels: int | None = None,
        semantic_layer: int | None = None,
        rtp: bool = True,
        sampling: Sampling = "uniform",
        granularity: Granularity = "per_sample",
        keep_seed: int = 0,
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_image_size: int | None = None,
        perceptual_layers: list[int] | None = None,
        commitment_weight: float = 0.25,
        codebook_decay: float = 0.99,
        dead_code_threshold: int = 0,
        semantic_teacher: str | None = "mobilenet_v2",
        semantic_pretrained: bool = True,
        teacher_image_size: int | None = None,
        semantic_schedule: Schedule = "linear",
        semantic_weight: float = 0.5,
        semantic_step_at: int | None = None,
        decoder_finetune_step: int | None = None,
        adversarial: AdversarialSettings | None = None,
        optimizer: OptimizerSettings | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        grid_images: int = 8,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_choice(owner, "preset", preset, tuple(RETOK_PRESETS))
        check_choice(owner, "sampling", sampling, ("uniform", "pow2", "uniform_pow2"))
        check_choice(owner, "granularity", granularity, ("per_sample", "per_batch"))
        check_choice(owner, "semantic_schedule", semantic_schedule, ("linear", "cosine", "step"))
        check_choice(owner, "lr_schedule", lr_schedule, ("cosine", "constant"))
        overrides = {
            "image_size": image_size, "patch_size": patch_size, "num_tokens": num_tokens, "pad_from": pad_from,
            "encoder_width": encoder_width, "encoder_depth": encoder_depth, "encoder_heads": encoder_heads,
            "decoder_width": decoder_width, "decoder_depth": decoder_depth, "decoder_heads": decoder_heads,
            "codebook_size": codebook_size, "codebook_dim": codebook_dim, "pixel_channels": pixel_channels,
            "semantic_layer": semantic_layer,
        }
        size = dataclasses.replace(RETOK_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
        _check_size(owner, size)
        self.save_hyperparameters()
        # the resolved sizes, so that a checkpoint rebuilds what was trained and loggers see the real sizes
        self.hparams.update(dataclasses.asdict(size))
        self._hparams_initial.update(dataclasses.asdict(size))
        self.size = size
        self.rtp = rtp
        self.sampling, self.granularity, self.keep_seed = sampling, granularity, int(keep_seed)
        self.reconstruction_weight, self.perceptual_weight = float(reconstruction_weight), float(perceptual_weight)
        self.semantic_schedule, self.semantic_w0, self.semantic_step_at = semantic_schedule, float(semantic_weight), semantic_step_at
        self.decoder_finetune_step = decoder_finetune_step
        self.optimizer_settings = optimizer or dataclasses.replace(RETOK_OPTIMIZER)
        self.lr_schedule = lr_schedule
        self.grid_images = grid_images
        self.num_tokens = size.num_tokens
        self.num_pad = size.num_tokens - size.pad_from if rtp else 0
        self.grid = size.image_size // size.patch_size
        self.register_buffer("pad_index", pad_query_indices(size.num_tokens, size.pad_from), persistent=False)
        self._build_networks(size, commitment_weight, codebook_decay, dead_code_threshold)
        self._build_frozen(semantic_teacher, semantic_pretrained, teacher_image_size, perceptual_image_size, perceptual_layers)
        self.adversarial = adversarial
        self.discriminator = (
            PatchDiscriminator(3, adversarial.width, adversarial.depth, adversarial.norm) if adversarial is not None else None
        )
        self.val_codebook = CodebookUsage(size.codebook_size)
        self._val_state: dict[str, Any] = {}

    # ---- construction ----------------------------------------------------------------------------
    def _build_networks(self, size: TokenizerSize, beta: float, decay: float, dead_code: int) -> None:
        enc, dec, total = size.encoder_width, size.decoder_width, self.num_tokens + self.num_pad
        self.patch_embed = nn.Conv2d(3, enc, size.patch_size, stride=size.patch_size)
        self.patch_norm = nn.LayerNorm(enc)
        self.patch_position = nn.Parameter(0.02 * torch.randn(1, self.grid**2, enc))
        self.query_proj = nn.Linear(enc, enc)  # the reference's global_proj
        self.query_position = nn.Parameter(0.02 * torch.randn(1, self.num_tokens, enc))
        self.pad_position = nn.Parameter(0.02 * torch.randn(1, max(self.num_pad, 0), enc))  # its own table
        self.encoder = _layers(enc, size.encoder_depth, size.encoder_heads)
        self.encoder_norm = nn.LayerNorm(enc)
        self.to_code = nn.Linear(enc, size.codebook_dim)
        self._quantizer_options = {"commitment_weight": beta, "decay": decay, "threshold_ema_dead_code": dead_code}
        self.quantizer = self._make_quantizer(synchronized=False)
        self._quantizer_synchronized = False
        self.token_embed = nn.Linear(size.codebook_dim, dec)
        self.token_position = nn.Parameter(0.02 * torch.randn(1, total, dec))
        self.grid_position = nn.Parameter(0.02 * torch.randn(1, self.grid**2, dec))
        self.decoder = _layers(dec, size.decoder_depth, size.decoder_heads)
        self.pixel_decoder = PixelDecoder(dec, size.patch_size, size.pixel_channels)

    def _make_quantizer(self, synchronized: bool) -> nn.Module:
        """The library's VQ; ``synchronized`` all-reduces its EMA statistics (codebook usage and sums) over the
        processes, so every process keeps the codebook one process would learn from the global batch."""
        from vector_quantize_pytorch import VectorQuantize

        return VectorQuantize(
            dim=self.size.codebook_dim, codebook_size=self.size.codebook_size, use_cosine_sim=True, rotation_trick=True,
            sync_codebook=synchronized, **self._quantizer_options,
        )

    @override
    def setup(self, stage: str) -> None:
        # VectorQuantize decides at construction whether to synchronise its EMA codebook, and a module is built
        # before the process group exists: unsynchronised, each process would update the codebook from its own
        # shard and DDP's buffer broadcast would keep only rank 0's. Rebuild it synchronised, state kept.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1 and not self._quantizer_synchronized:
            state = self.quantizer.state_dict()
            self.quantizer = self._make_quantizer(synchronized=True).to(self.device)
            self.quantizer.load_state_dict(state)
            self._quantizer_synchronized = True

    def _build_frozen(
        self, teacher: str | None, pretrained: bool, teacher_size: int | None, perceptual_size: int | None,
        perceptual_layers: list[int] | None,
    ) -> None:
        self.teacher = None
        self.semantic_head: nn.Module | None = None
        if teacher is not None and self.semantic_w0 > 0:
            self.teacher = build_vision_encoder(teacher, pretrained=pretrained, image_size=teacher_size)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.teacher.to(memory_format=torch.channels_last)  # oneDNN's fast depthwise convolutions on the CPU
            width, out = self.size.decoder_width, self.teacher.num_features
            self.semantic_head = nn.Sequential(  # the reference's distill_mlp
                nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width), nn.SiLU(), nn.Linear(4 * width, out)
            )
        self.perceptual = None
        if self.perceptual_weight > 0:
            layers = tuple(perceptual_layers) if perceptual_layers else (3, 6, 13)
            self.perceptual = FeaturePerceptualLoss(perceptual_size, layers, pretrained=pretrained)

    @override
    def train(self, mode: bool = True) -> FlexibleImageTokenizer:
        """As ``nn.Module.train``, except that the frozen teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---- networks --------------------------------------------------------------------------------
    def encode_latents(self, images: Tensor) -> Tensor:
        """Continuous encoder outputs ``(B, N + M, codebook_dim)`` for images in ``[0, 1]``."""
        patches = self.patch_embed(images * 2 - 1)
        queries = multi_level_queries(patches, self.num_tokens)
        memory = self.patch_norm(patches.flatten(2).transpose(1, 2)) + self.patch_position
        positions = self.query_position
        if self.num_pad:
            queries = torch.cat([queries, queries[:, self.pad_index]], dim=1)
            positions = torch.cat([positions, self.pad_position], dim=1)
        tokens = self.query_proj(queries) + positions
        for layer in self.encoder:
            tokens = layer(tokens, memory)
        return self.to_code(self.encoder_norm(tokens))

    def decode_tokens(self, tokens: Tensor, keep: Tensor, semantic: bool = False) -> tuple[Tensor, Tensor | None]:
        """Pixels in the ``[−1, 1]`` scale ``(B, 3, S, S)`` from quantized tokens ``(B, L, codebook_dim)``,
        each image from its first ``keep[b]`` tokens only; with ``semantic``, also the decoder features at
        ``semantic_layer`` ``(B, G·G, decoder_width)``."""
        length = int(keep.max())
        memory = self.token_embed(tokens[:, :length]) + self.token_position[:, :length]
        padding = torch.arange(length, device=tokens.device)[None, :] >= keep.to(tokens.device)[:, None]
        queries = memory[:, :1].expand(-1, self.grid**2, -1) + self.grid_position  # copies of the first token
        features = None
        for index, layer in enumerate(self.decoder, start=1):
            queries = layer(queries, memory, memory_key_padding_mask=padding)
            if semantic and index == self.size.semantic_layer:
                features = queries
        return self.pixel_decoder(queries), features

    def quantize(self, latents: Tensor, update: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(quantized, codes, vq_loss)``; ``update=False`` freezes the EMA codebook.

        Under a Trainer the quantizer's random draws (dead-code re-seeding) come from an RNG seeded by
        ``(keep_seed, step, rank)`` and the global RNG is left as it was, so resumed runs are exact.
        """
        frozen = not update or self._codebook_frozen()
        generator = self._step_generator(offset=1) if not frozen else None
        if generator is None:
            quantized, codes, loss = self.quantizer(latents, freeze_codebook=frozen)
            return quantized, codes, loss.sum()
        devices = [latents.device.index or 0] if latents.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            quantized, codes, loss = self.quantizer(latents, freeze_codebook=frozen)
        return quantized, codes, loss.sum()

    def _codebook_frozen(self) -> bool:
        return not self.training or self._finetuning_decoder()

    def _finetuning_decoder(self) -> bool:
        step = self.decoder_finetune_step
        return step is not None and self._trainer is not None and self.trainer.global_step >= step

    # ---- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor, num_tokens: int | None = None) -> Tensor:
        """Codes ``(B, k)`` (LongTensor) of images ``(B, 3, S, S)`` in ``[0, 1]``, k = ``num_tokens`` ≤ N."""
        count = self.num_tokens if num_tokens is None else int(num_tokens)
        if not 1 <= count <= self.num_tokens:
            raise ConfigError(f"encode(num_tokens={num_tokens}): must lie in [1, {self.num_tokens}] at inference.")
        self._check_images(images)
        _, codes, _ = self.quantize(self.encode_latents(images.to(self.device, self.dtype)), update=False)
        return codes[:, :count]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Images ``(B, 3, S, S)`` in ``[0, 1]`` from codes ``(B, k)``, any prefix length 1 ≤ k ≤ N."""
        if codes.dim() != 2 or not 1 <= codes.shape[1] <= self.num_tokens:
            raise ConfigError(f"decode(codes): shape {tuple(codes.shape)}; codes must be (batch, k), 1 <= k <= {self.num_tokens}.")
        if codes.is_floating_point() or codes.min() < 0 or codes.max() >= self.size.codebook_size:
            raise ConfigError(f"decode(codes): codes must be integers in [0, codebook_size={self.size.codebook_size}).")
        codes = codes.to(self.device)
        tokens = self.quantizer.get_output_from_indices(codes)
        keep = torch.full((codes.shape[0],), codes.shape[1], device=codes.device)
        pixels, _ = self.decode_tokens(tokens, keep)
        return ((pixels + 1) / 2).clamp(0, 1)

    def reconstruct(self, images: Tensor, keep: Tensor) -> Tensor:
        """``decode(encode(images, k_b))`` per image, with images decoded from ``keep[b]`` tokens (≤ N)."""
        with torch.no_grad():
            quantized, _, _ = self.quantize(self.encode_latents(images), update=False)
            pixels, _ = self.decode_tokens(quantized, keep)
        return ((pixels + 1) / 2).clamp(0, 1)

    def _check_images(self, images: Tensor) -> None:
        side = self.size.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ConfigError(f"images must be (batch, 3, {side}, {side}) in [0, 1]; got {tuple(images.shape)} (set image_size).")

    # ---- losses ----------------------------------------------------------------------------------
    def training_loss(self, images: Tensor, keep: Tensor | None = None) -> dict[str, Tensor]:
        """Every loss term for a batch of images in ``[0, 1]``; ``keep`` (B,) defaults to a fresh draw."""
        self._check_images(images)
        if keep is None:
            keep = self._draw_keep_lengths(images.shape[0])
        keep = keep.to(images.device)
        quantized, _, vq_loss = self.quantize(self.encode_latents(images))
        use_semantic = self.teacher is not None and not self._finetuning_decoder()
        pixels, features = self.decode_tokens(quantized, keep, semantic=use_semantic)
        target = images * 2 - 1
        terms = {"rec": F.mse_loss(pixels, target), "vq": vq_loss, "keep_mean": keep.float().mean()}
        zero = pixels.new_zeros(())
        terms["perceptual"] = self.perceptual(((pixels + 1) / 2), images).mean() if self.perceptual is not None else zero
        terms["semantic"] = self.semantic_loss(features, images, keep) if features is not None else zero
        reconstruction = self.reconstruction_weight * terms["rec"] + self.perceptual_weight * terms["perceptual"]
        terms["loss"] = reconstruction + vq_loss + terms["semantic"]
        if self.discriminator is not None:
            adversarial = self.adversarial_losses(pixels, target, reconstruction)
            terms["loss"] = terms["loss"] + adversarial.pop("total")
            terms.update(adversarial)
        return terms

    def adversarial_losses(self, pixels: Tensor, target: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
        """The PatchGAN terms for reconstructions and targets in ``[−1, 1]``: ``total`` = generator term (through
        the discriminator's weights cut from the graph) + discriminator term (on detached reconstructions), both
        times ``weight`` from ``start`` on and 0 before (the discriminator still runs, so its parameters always
        get a gradient, as DDP requires)."""
        assert self.discriminator is not None and self.adversarial is not None
        settings = self.adversarial
        step = self.trainer.global_step if self._trainer is not None else 0
        factor = settings.weight if step >= settings.start else 0.0
        real_logits = self.discriminator(target)
        fake_logits = self.discriminator(pixels.detach())
        discriminator = factor * hinge_discriminator_loss(real_logits, fake_logits)
        terms = {
            "discriminator": discriminator, "logits_real": real_logits.detach().mean(), "logits_fake": fake_logits.detach().mean(),
        }
        weight = pixels.new_zeros(())
        generator = pixels.new_zeros(())
        if factor > 0:
            frozen = {name: param.detach() for name, param in self.discriminator.named_parameters()}
            generator = hinge_generator_loss(torch.func.functional_call(self.discriminator, frozen, (pixels,)))
            weight = pixels.new_tensor(factor)
            if settings.adaptive and torch.is_grad_enabled() and reconstruction.requires_grad:
                last_layer = self.pixel_decoder.refine[-1].weight
                weight = factor * adaptive_adversarial_weight(
                    reconstruction, generator, last_layer, functools.partial(global_mean, trainer=self._trainer)
                )
        terms.update(adversarial=generator.detach(), adversarial_weight=weight, total=weight * generator + discriminator)
        return terms

    def _draw_keep_lengths(self, batch_size: int) -> Tensor:
        """This process's kept lengths: drawn for the global batch, positions ``rank, rank + world, ...``."""
        total = self.num_tokens + self.num_pad
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        generator = self._step_generator(per_rank=False)
        keep = sample_keep_lengths(batch_size * world, total, self.sampling, self.granularity, generator)
        return keep[rank::world].clone()

    def _step_generator(self, offset: int = 0, per_rank: bool = True) -> torch.Generator | None:
        """A CPU generator keyed by (keep_seed, step, rank if ``per_rank``, offset) under a Trainer (exact
        resume); else ``None`` (the global RNG)."""
        if self._trainer is None:
            return None
        rank = self.trainer.global_rank if per_rank else 0
        seed = ((self.keep_seed * 1_000_003 + self.trainer.global_step) * 65_537 + rank) * 4 + offset
        return torch.Generator().manual_seed(seed)

    def semantic_loss(self, features: Tensor, images: Tensor, keep: Tensor) -> Tensor:
        """HSR: ``mean_b w_sem(k_b) · (−mean_p cos(MLP(h_bp), t_bp))``, teacher grid resampled to the decoder's."""
        assert self.teacher is not None and self.semantic_head is not None
        with torch.no_grad():
            pixels = self.teacher.transform.preprocess_tensor(images).contiguous(memory_format=torch.channels_last)
            target = self.teacher(pixels)
            target = resample_grid(target, (self.grid, self.grid), "area")
        cosine = F.cosine_similarity(self.semantic_head(features), target.to(features.dtype), dim=-1).mean(1)
        weight = semantic_weight(keep, self.num_tokens, self.semantic_w0, self.semantic_schedule, self.semantic_step_at)
        return -(weight.to(cosine) * cosine).mean()

    # ---- Lightning hooks -------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._finetuning_decoder():
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith(("pixel_decoder.", "discriminator.")))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = _images(batch)
        terms = self.training_loss(images)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=images.shape[0])
        return terms["loss"]

    def eval_lengths(self) -> list[int]:
        """The kept lengths validated: N/8, N/4, N/2, N (at least 1, deduplicated)."""
        return sorted({max(1, self.num_tokens // d) for d in (8, 4, 2, 1)})

    @override
    def on_validation_epoch_start(self) -> None:
        self.val_codebook.reset()
        self._val_state = {
            "grid": None, "sums": torch.zeros(len(self.eval_lengths()), 2, dtype=torch.float64, device=self.device), "seen": 0,
        }

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        images = _images(batch).to(self.device)
        size = images.shape[0]
        quantized, codes, _ = self.quantize(self.encode_latents(images), update=False)
        self.val_codebook.update(codes[:, : self.num_tokens])
        columns = [images]
        self._val_state["seen"] += size
        for index, k in enumerate(self.eval_lengths()):
            pixels, _ = self.decode_tokens(quantized, torch.full((size,), k, device=self.device))
            recon = ((pixels + 1) / 2).clamp(0, 1)
            psnr = peak_signal_noise_ratio(recon, images, data_range=1.0)
            ssim = structural_similarity_index_measure(recon, images, data_range=1.0)
            self.log(f"val/psnr@{k}", psnr, sync_dist=True, batch_size=size)
            self.log(f"val/ssim@{k}", ssim, sync_dist=True, batch_size=size)
            self._val_state["sums"][index] += torch.stack([psnr, ssim]).double() * size
            columns.append(recon)
        if self._val_state["grid"] is None:
            self._val_state["grid"] = [c[: self.grid_images].detach().cpu() for c in columns]

    @override
    def on_validation_epoch_end(self) -> None:
        if not self._val_state:
            return
        codebook = self.val_codebook.compute()  # the code histogram summed over processes
        self.log("val/codebook_usage", codebook["usage"])
        self.log("val/perplexity", codebook["perplexity"])
        if self._trainer is None or self.trainer.sanity_checking:
            return
        if self._val_state.get("grid") is not None:
            folder = self.trainer.log_dir or self.trainer.default_root_dir
            self._write_grid(self._val_state["grid"], folder)
        self._print_table(self._val_state["sums"] / max(self._val_state["seen"], 1))

    @rank_zero_only
    def _print_table(self, means: Tensor) -> None:
        """The reconstruction quality per kept length of this rank's validation images, as a text table."""
        lines = [f"step {self.global_step}: reconstruction per kept length", "    k    PSNR    SSIM"]
        lines += [f"{k:5d}  {p:6.2f}  {s:6.4f}" for k, (p, s) in zip(self.eval_lengths(), means.tolist())]
        rank_zero_info("\n".join(lines))

    @rank_zero_only
    def _write_grid(self, columns: list[Tensor], folder: str) -> None:
        from torchvision.utils import make_grid, save_image

        rows = torch.stack(columns, dim=1).flatten(0, 1)  # image-major: each row one image, columns = k
        grid = make_grid(rows, nrow=len(columns), padding=1, pad_value=1.0)
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_image(grid, Path(folder) / "recon_grid.png")
        logger = self.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="val/recon_grid", images=[grid], step=self.global_step)

    @override
    def configure_optimizers(self) -> Any:
        settings = self.optimizer_settings
        if self.lr_schedule == "constant":
            settings = dataclasses.replace(settings, warmup=0, min_lr_ratio=1.0)
        return adamw_with_schedule(self.named_parameters(), settings, self.trainer, no_decay=lambda name: "position" in name)


def _images(batch: Any) -> Tensor:
    if isinstance(batch, dict):
        if "images" not in batch:
            raise ConfigError(f"an image-tokenizer batch holds images under 'images'; got keys {sorted(batch)}.")
        batch = batch["images"]
    if not isinstance(batch, Tensor):
        raise ConfigError(f"images must be a (B, 3, S, S) tensor in [0, 1], got {type(batch).__name__}.")
    return batch if batch.is_floating_point() else batch.float().div(255.0)


def _check_size(owner: str, size: TokenizerSize) -> None:
    for field in dataclasses.fields(size):
        if getattr(size, field.name) < (0 if field.name == "pad_from" else 1):
            raise ConfigError(f"{owner}({field.name}={getattr(size, field.name)}): must be a positive integer.")
    if size.image_size % size.patch_size:
        raise ConfigError(
            f"{owner}(image_size={size.image_size}, patch_size={size.patch_size}): image_size must be a multiple of patch_size."
        )
    if size.pad_from >= size.num_tokens:
        raise ConfigError(f"{owner}(pad_from={size.pad_from}): must be below num_tokens={size.num_tokens} (reference 32 of 256).")
    for kind in ("encoder", "decoder"):
        width, heads = getattr(size, f"{kind}_width"), getattr(size, f"{kind}_heads")
        if width % heads:
            raise ConfigError(f"{owner}({kind}_width={width}, {kind}_heads={heads}): the width must be divisible by the heads.")
    if size.semantic_layer > size.decoder_depth:
        raise ConfigError(f"{owner}(semantic_layer={size.semantic_layer}): the decoder has {size.decoder_depth} layers.")
    _check_query_grid(size.num_tokens, size.image_size // size.patch_size)
