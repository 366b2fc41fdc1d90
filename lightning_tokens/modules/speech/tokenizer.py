"""`SpeechTokenizer`: DualSpeechLM's USTokenizer (arXiv 2508.08961) as a LightningModule.

Speech → frozen Whisper encoder (50 Hz) → strided convolution (25 Hz) → small convolutional encoder → EMA
vector quantizer (one codebook) → two branches trained together:

- reconstruction of the Whisper features (MSE over the valid frames only);
- understanding: the quantized features, projected to the width of a *frozen* text LM, are spliced into an
  ASR prompt and the LM's cross-entropy on the transcript trains the speech side (through
  :meth:`~lightning_tokens.core.loss.TokenLossMixin.token_loss`, so the library's token methods apply).

``L = commitment_weight·commit + reconstruction_weight·recon + understanding_weight·CE`` (reference 1 / 45 / 5).

Behaviour against the reference (``USTokenizer/models/USTokenizer.py``, ``models/modules3/vq_module.py``):

- The EMA codebook is ``vector_quantize_pytorch.VectorQuantize`` with ``decay=0.8, eps=1e-5``, no dead-code
  replacement, no rotation trick (plain straight-through): ``cluster_size ← 0.8·cluster_size + 0.2·counts``,
  ``embed_avg ← 0.8·embed_avg + 0.2·Σ x`` (per code), ``embed = embed_avg / laplace(cluster_size)``, the update
  the reference's ``ema_inplace`` / ``laplace_smoothing`` make. Differences: the codebook starts Kaiming-uniform
  with ``cluster_size`` 1 (reference: normal, 0), padded frames neither update the codebook nor count in the
  commitment loss, and under DDP the EMA statistics are all-reduced (``sync_codebook``).
- Items are cropped to their own ``ceil(len/320)`` frames (the reference crops the whole batch to the longest
  item) and every convolution zeroes the padded frames, so an utterance gets the same tokens alone or in a
  batch. The codec encoder/decoder is a small residual ``Conv1d`` stack (``hidden_dim``, ``num_layers``), not
  RepCodec's 1024-channel one.
- The understanding sequence is ``[bos] "USER: " <speech> prompt "\\nASSISTANT: " text eos``.

The CE term is a per-token mean: with one micro-batch per optimizer step it is exactly the token mean of the
transcript tokens. Under gradient accumulation ``token_loss`` returns ``Σ nll / c`` (``c``: the first
micro-batch's token count) and the gradients are rescaled by ``c·accumulate_grad_batches·replicas / N`` before
the optimizer step (:mod:`lightning_tokens.core.reduction`): the CE becomes the exact token mean of the window,
and the commitment / reconstruction terms of each micro-batch are weighted ``c / N`` (``1 / accumulate_grad_batches``
when the micro-batches hold equal token counts, as Lightning's plain mean).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.loss import TokenLossMixin
from lightning_tokens.core.reduction import global_sum
from lightning_tokens.modules.frozen_cache import WaveformCache
from lightning_tokens.core.stats import IGNORE_INDEX
from lightning_tokens.metrics.speech import CodebookUsage, tokens_per_second
from lightning_tokens.modules.causal_lm import OptimizerSettings, adamw_with_schedule

SAMPLE_RATE = 16_000
#: audio samples per Whisper encoder frame (50 Hz) and per token (25 Hz)
SAMPLES_PER_FRAME = 320
SAMPLES_PER_TOKEN = 640
#: state-dict prefixes of the frozen networks, left out of checkpoints (rebuilt by ``configure_model``)
FROZEN_PREFIXES = ("whisper_encoder.", "language_model.")
#: the reference's optimiser: lr 3e-5, wd 0.05, β2 0.999, 3000 warm-up steps, cosine to 1e-5
USTOKENIZER_OPTIMIZER = OptimizerSettings(lr=3e-5, weight_decay=0.05, betas=(0.9, 0.999), warmup=3000, min_lr_ratio=1 / 3)
_FROZEN_SEED = 0


def tokenizer_loss(
    commit: Tensor | float,
    recon: Tensor | float,
    ce: Tensor | float,
    commitment_weight: float = 1.0,
    reconstruction_weight: float = 45.0,
    understanding_weight: float = 5.0,
) -> Tensor | float:
    """The USTokenizer objective ``commitment_weight·commit + reconstruction_weight·recon + understanding_weight·ce``.

    Example:
        >>> round(tokenizer_loss(0.1, 0.02, 2.0), 6)
        11.0
    """
    return commitment_weight * commit + reconstruction_weight * recon + understanding_weight * ce


def load_whisper(name: str, max_source_positions: int | None) -> tuple[nn.Module, Any]:
    """``(WhisperEncoder, WhisperFeatureExtractor)`` from :func:`lightning_tokens.models.whisper.load_whisper_encoder`."""
    from lightning_tokens.models.whisper import load_whisper_encoder

    return load_whisper_encoder(name, max_source_positions)


class _ResidualUnit(nn.Module):
    """``x + Conv1d_k1(ELU(Conv1d_k3,dilated(ELU(x))))`` (RepCodec's residual unit, non-causal)."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.elu(self.conv(F.elu(x))))


class _MaskedStack(nn.Module):
    """Convolutions over ``(B, C, T)`` that zero the padded frames after every layer, so that padding never
    leaks into the valid frames (an item gives the same output alone or in a batch)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        keep = mask[:, None, :].to(x.dtype)
        x = x * keep
        for layer in self.layers:
            x = layer(x) * keep
        return x


def _conv_stack(in_dim: int, hidden: int, out_dim: int, num_layers: int, out_bias: bool = True) -> _MaskedStack:
    layers: list[nn.Module] = [nn.Conv1d(in_dim, hidden, 3, padding=1)]
    layers += [_ResidualUnit(hidden, dilation=2**i if i < 3 else 1) for i in range(num_layers)]
    layers += [nn.ELU(), nn.Conv1d(hidden, out_dim, 3, padding=1, bias=out_bias)]
    return _MaskedStack(layers)


def _frames_mask(lengths: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


class SpeechTokenizer(TokenLossMixin, pl.LightningModule):
    """USTokenizer: 25 Hz speech tokens trained to reconstruct Whisper features and to let a frozen LM transcribe.

    Features:
        - Frozen Whisper encoder and frozen text LM, built in :meth:`configure_model` (so strategies can wrap
          them) and left out of checkpoints; random presets are built from a fixed seed, so a checkpoint
          reloads the same frozen networks. The trainable layers are built there too (their widths follow the
          encoder's and the LM's).
        - ``understanding_weight: 0``: the reconstruction-only baseline, no LM loaded.
        - CE only on records whose ``task`` is in ``understanding_tasks``; all records train reconstruction.
        - Logs ``train/{commit,reconstruction,understanding_ce,loss}``, ``val/{reconstruction,understanding_ce,
          codebook_usage,perplexity,tokens_per_second_of_audio}``; prints a table after each validation.

    Batch (``SpeechDataModule``): ``{"audio": (B, S) float at 16 kHz zero-padded, "audio_lengths": (B,),
    "text": list[str], "task": list[str], ...}``.

    Args:
        whisper: Whisper encoder for :func:`lightning_tokens.models.whisper.load_whisper_encoder`.
        max_source_positions: encoder frames (50 Hz) per window (``None``: the model's); longer audio is
            encoded window by window.
        language_model: the frozen LM (a preset such as ``tiny-llama``, a packaged model, a folder).
        language_model_tokenizer: its tokenizer (``"char"``, a packaged name, a folder; ``None``: the LM's own).
        prompt: instruction after the speech.
        understanding_tasks: tasks trained with CE (``None``: ``["asr"]``).
        codebook_size: codes in the codebook (reference 1024).
        code_dim: code width (reference 1024).
        hidden_dim: channels of the codec encoder and decoder.
        num_layers: residual units in each of them.
        commitment_weight, reconstruction_weight, understanding_weight: the loss weights (reference 1, 45, 5).
        codebook_decay: EMA decay (reference 0.8).
        codebook_eps: Laplace smoothing (reference 1e-5).
        max_text_tokens: transcript tokens kept (reference 300).
        optimizer: AdamW settings (default :data:`USTOKENIZER_OPTIMIZER`, the reference's).
        feature_cache_size: keep the frozen Whisper features of up to this many utterances in memory (keyed by
            the waveform's bytes), so later epochs skip the encoder: the same values, at ``frames × d_model``
            floats each (about 190 kB for 2.5 s of audio with Whisper tiny). ``0``: no cache.

    Example::

        model = SpeechTokenizer(whisper="tiny-whisper", max_source_positions=100, codebook_size=64)
        pl.Trainer(max_steps=100).fit(model, datamodule=SpeechDataModule(...))
        codes = model.encode(wav, sample_rate=16000)   # [LongTensor (ceil(S / 640),)]
    """

    def __init__(
        self,
        whisper: str = "tiny-whisper",
        max_source_positions: int | None = None,
        language_model: str = "tiny-llama",
        language_model_tokenizer: str | None = "char",
        prompt: str = "Transcribe the audio.",
        understanding_tasks: list[str] | None = None,
        codebook_size: int = 1024,
        code_dim: int = 256,
        hidden_dim: int = 256,
        num_layers: int = 2,
        commitment_weight: float = 1.0,
        reconstruction_weight: float = 45.0,
        understanding_weight: float = 5.0,
        codebook_decay: float = 0.8,
        codebook_eps: float = 1e-5,
        max_text_tokens: int = 300,
        optimizer: OptimizerSettings | None = None,
        feature_cache_size: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("codebook_size", codebook_size), ("code_dim", code_dim), ("hidden_dim", hidden_dim),
                            ("max_text_tokens", max_text_tokens)):
            if int(value) < 1:
                raise ConfigError(f"SpeechTokenizer({name}={value}): must be a positive integer.")
        if num_layers < 0:
            raise ConfigError(f"SpeechTokenizer(num_layers={num_layers}): must be >= 0.")
        if not 0.0 <= codebook_decay < 1.0:
            raise ConfigError(f"SpeechTokenizer(codebook_decay={codebook_decay}): must be in [0, 1) (reference 0.8).")
        for name, value in (("commitment_weight", commitment_weight), ("reconstruction_weight", reconstruction_weight),
                            ("understanding_weight", understanding_weight)):
            if value < 0:
                raise ConfigError(f"SpeechTokenizer({name}={value}): loss weights must be >= 0.")
        if max_source_positions is not None and max_source_positions < 2:
            raise ConfigError(f"SpeechTokenizer(max_source_positions={max_source_positions}): must be >= 2 (50 per second).")
        self.save_hyperparameters()
        self.whisper_name, self.max_source_positions = whisper, max_source_positions
        self.language_model_name, self.language_model_tokenizer = language_model, language_model_tokenizer
        self.prompt = prompt
        self.understanding_tasks = ["asr"] if understanding_tasks is None else list(understanding_tasks)
        self.codebook_size, self.code_dim = int(codebook_size), int(code_dim)
        self.hidden_dim, self.num_layers = int(hidden_dim), int(num_layers)
        self.commitment_weight = float(commitment_weight)
        self.reconstruction_weight = float(reconstruction_weight)
        self.understanding_weight = float(understanding_weight)
        self.codebook_decay, self.codebook_eps = float(codebook_decay), float(codebook_eps)
        self.max_text_tokens = int(max_text_tokens)
        self.optimizer_settings = optimizer or dataclasses.replace(USTOKENIZER_OPTIMIZER)
        self.whisper_encoder: nn.Module | None = None
        self.feature_extractor: Any = None
        self.language_model: nn.Module | None = None
        self.text_tokenizer: Any = None
        self.feature_cache = WaveformCache(feature_cache_size, "SpeechTokenizer(feature_cache_size)")
        self.val_codebook = CodebookUsage(self.codebook_size)
        self._val: dict[str, Any] = {}

    # ---- building ----------------------------------------------------------------------------------
    @property
    def uses_language_model(self) -> bool:
        return self.understanding_weight > 0

    @override
    def configure_model(self) -> None:
        if self.whisper_encoder is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_FROZEN_SEED)  # random presets: the same frozen networks in every run
            encoder, self.feature_extractor = load_whisper(self.whisper_name, self.max_source_positions)
            self.whisper_encoder = encoder.eval().requires_grad_(False)
            if self.uses_language_model:
                self.language_model = self._load_language_model()
        width = int(self.whisper_encoder.config.d_model)
        self.downsample = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.encoder = _conv_stack(width, self.hidden_dim, self.code_dim, self.num_layers, out_bias=False)
        self.vq = _vector_quantizer(self.code_dim, self.codebook_size, self.codebook_decay, self.codebook_eps)
        self.decoder = _conv_stack(self.code_dim, self.hidden_dim, width, self.num_layers)
        self.upsample = nn.ConvTranspose1d(width, width, 3, stride=2, padding=1, output_padding=1)
        if self.language_model is not None:
            d_llm = _hidden_size(self.language_model, self.language_model_name)
            self.to_llm = nn.Linear(self.code_dim, d_llm)
            self.llm_conv = nn.Conv1d(d_llm, d_llm, 3, padding=1)
        self.to(self.device)

    def _load_language_model(self) -> nn.Module:
        from lightning_tokens.models.presets import load_causal_lm
        from lightning_tokens.models.tokenizers import resolve_tokenizer

        self.text_tokenizer = resolve_tokenizer(self.language_model_tokenizer or self.language_model_name)
        lm = load_causal_lm(self.language_model_name, vocab_size=len(self.text_tokenizer))
        if lm.get_input_embeddings().weight.shape[0] < len(self.text_tokenizer):
            raise ConfigError(
                f"SpeechTokenizer(language_model={self.language_model_name!r}) has fewer embeddings than "
                f"language_model_tokenizer={self.language_model_tokenizer!r} has tokens: use the LM's own tokenizer."
            )
        if self.text_tokenizer.eos_token_id is None:
            raise ConfigError(
                f"SpeechTokenizer(language_model_tokenizer={self.language_model_tokenizer!r}) has no eos token, "
                "which ends the transcript target."
            )
        return lm.eval().requires_grad_(False)

    def _ensure_built(self) -> None:
        if self.whisper_encoder is None:
            self.configure_model()

    @override
    def train(self, mode: bool = True) -> SpeechTokenizer:
        """As ``nn.Module.train``, except that the frozen Whisper encoder and LM stay in eval mode."""
        super().train(mode)
        for frozen in (self.whisper_encoder, self.language_model):
            if frozen is not None:
                frozen.eval()
        return self

    # ---- features ----------------------------------------------------------------------------------
    @property
    def encoder_frames(self) -> int:
        """Encoder frames (50 Hz) per call: the Whisper ``max_source_positions``."""
        self._ensure_built()
        return int(self.whisper_encoder.config.max_source_positions)

    def whisper_features(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen Whisper encoder features of 16 kHz audio, cropped to ``ceil(len / 320)`` frames per item.

        Utterances longer than the encoder's window (``max_source_positions / 50`` s) are cut into
        consecutive windows, each encoded on its own (all windows of the batch in one encoder call), and
        their frames concatenated; an utterance gets the same features alone or in a batch.

        Args:
            audio: ``(B, S)`` zero-padded waveforms.
            lengths: ``(B,)`` valid samples.

        Returns:
            ``(features (B, T50, D) with zeros past each item's frames, frames (B,))``.
        """
        audio, lengths = _check_audio(audio, lengths)
        self._ensure_built()
        waves = [audio[i, :n].detach().float().cpu().numpy() for i, n in enumerate(lengths.tolist())]
        per_item = self.feature_cache.map(waves, self._encode_windows)
        device = self.device
        frames = (lengths.to(device) + SAMPLES_PER_FRAME - 1) // SAMPLES_PER_FRAME
        width = per_item[0].shape[-1]
        features = torch.zeros(len(waves), int(frames.max()), width, device=device)
        for i, item in enumerate(per_item):
            features[i, : int(frames[i])] = item.to(device)
        return features, frames

    def _encode_windows(self, waves: list[Any]) -> list[Tensor]:
        """Whisper features ``(ceil(len / 320), D)`` of each waveform (numpy, 16 kHz), windows of all of them in
        one encoder call."""
        window = self.encoder_frames * SAMPLES_PER_FRAME
        pieces, owners = [], []
        for i, wave in enumerate(waves):
            for start in range(0, len(wave), window):
                pieces.append(wave[start : start + window])
                owners.append(i)
        device = self.device
        mel = self.feature_extractor(
            pieces, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=window, truncation=True,
            return_tensors="pt", return_attention_mask=False, device=str(device),
        ).input_features
        dtype = next(self.whisper_encoder.parameters()).dtype
        with torch.no_grad():
            hidden = self.whisper_encoder(mel.to(device=device, dtype=dtype)).last_hidden_state.float()
        # windows hold whole frames (window = 320·positions), so their frames concatenate to ceil(len/320)
        parts: list[list[Tensor]] = [[] for _ in waves]
        for index, owner in enumerate(owners):
            parts[owner].append(hidden[index])
        return [torch.cat(p)[: (len(w) + SAMPLES_PER_FRAME - 1) // SAMPLES_PER_FRAME] for p, w in zip(parts, waves)]

    def encode_features(self, features: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Continuous pre-quantization codes ``(B, T25, code_dim)`` and token counts ``ceil(frames / 2)``."""
        mask50 = _frames_mask(frames, features.shape[1])
        x = self.downsample(features.transpose(1, 2) * mask50[:, None].to(features.dtype))
        tokens = (frames + 1) // 2
        mask25 = _frames_mask(tokens, x.shape[-1])
        return self.encoder(x, mask25).transpose(1, 2), tokens

    def quantize(self, latents: Tensor, tokens: Tensor, update: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(quantized (B, T, code_dim), codes (B, T) with -1 past each item, commitment loss)``; the EMA
        codebook updates in training mode unless ``update`` is ``False``."""
        mask = _frames_mask(tokens, latents.shape[1])
        quantized, codes, commit = self.vq(latents, mask=mask, freeze_codebook=not update)
        return quantized, codes, commit.reshape(-1).sum() if commit.numel() else commit

    def decode_quantized(self, quantized: Tensor, tokens: Tensor) -> Tensor:
        """Reconstructed Whisper features ``(B, 2·T25, D)`` (50 Hz), zero past each item's frames."""
        mask25 = _frames_mask(tokens, quantized.shape[1])
        x = self.upsample(self.decoder(quantized.transpose(1, 2), mask25))
        return x.transpose(1, 2) * _frames_mask(2 * tokens, x.shape[-1])[..., None].to(x.dtype)

    # ---- public API --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, wav: Tensor, sample_rate: int, lengths: Tensor | None = None) -> list[Tensor]:
        """Token ids at 25 Hz, ``ceil(samples_16k / 640)`` per utterance.

        Args:
            wav: ``(S,)`` or ``(B, S)`` waveform(s), zero-padded.
            sample_rate: their rate; other rates than 16 kHz are resampled per utterance with
                ``scipy.signal.resample_poly`` (polyphase, Kaiser window).
            lengths: ``(B,)`` valid samples (``None``: all of ``S``).

        Example:
            >>> codes = model.encode(torch.randn(32000), sample_rate=16000)   # doctest: +SKIP
            >>> codes[0].shape                                                 # doctest: +SKIP
            torch.Size([50])
        """
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate <= 0:
            raise DataError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}.")
        if isinstance(wav, Tensor) and wav.dim() == 1:
            wav = wav[None]
            lengths = None if lengths is None else torch.as_tensor(lengths).reshape(1)
        if not isinstance(wav, Tensor) or wav.dim() != 2:
            raise DataError(f"wav must be a (S,) or (B, S) tensor, got {getattr(wav, 'shape', type(wav).__name__)}.")
        if lengths is None:
            lengths = torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long)
        if sample_rate != SAMPLE_RATE:
            wav, lengths = _resample(wav, _check_audio(wav, lengths)[1], sample_rate)
        self._ensure_built()
        features, frames = self.whisper_features(wav, lengths)
        latents, tokens = self.encode_features(features, frames)
        _, codes, _ = self.quantize(latents, tokens, update=False)
        return [codes[i, : int(n)].long().cpu() for i, n in enumerate(tokens.tolist())]

    @torch.no_grad()
    def decode_features(self, codes: list[Tensor] | Tensor) -> list[Tensor]:
        """Reconstructed Whisper encoder features ``(2·T, D)`` (50 Hz) per utterance from its ``(T,)`` codes."""
        self._ensure_built()
        rows = list(codes) if isinstance(codes, (list, tuple)) or codes.dim() == 2 else [codes]
        tokens = torch.tensor([len(r) for r in rows], device=self.device)
        ids = torch.zeros(len(rows), int(tokens.max()), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            row = torch.as_tensor(row, device=self.device).long()
            if row.numel() and (int(row.min()) < 0 or int(row.max()) >= self.codebook_size):
                raise DataError(f"codes[{i}] holds ids outside [0, {self.codebook_size}).")
            ids[i, : len(row)] = row
        quantized = self.vq.get_output_from_indices(ids)
        features = self.decode_quantized(quantized, tokens)
        return [features[i, : 2 * int(n)] for i, n in enumerate(tokens.tolist())]

    # ---- losses ------------------------------------------------------------------------------------
    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Commitment, reconstruction and (if the LM is on and the batch has understanding records) CE."""
        audio, lengths = _check_audio(batch.get("audio"), batch.get("audio_lengths"))
        features, frames = self.whisper_features(audio, lengths)
        latents, tokens = self.encode_features(features, frames)
        quantized, codes, commit = self.quantize(latents, tokens, update=self.training)
        recon = self.decode_quantized(quantized, tokens)[:, : features.shape[1]]
        mask50 = _frames_mask(frames, features.shape[1])
        # mean over valid frames × channels (padding masked out)
        recon_loss = ((recon - features) ** 2).sum() / (mask50.sum() * features.shape[-1]).clamp(min=1)
        ce = self.understanding_loss(quantized, tokens, batch) if self.uses_language_model else None
        return {"commit": commit, "recon": recon_loss, "ce": ce, "codes": codes, "tokens": tokens, "lengths": lengths}

    def understanding_loss(self, quantized: Tensor, tokens: Tensor, batch: dict[str, Any]) -> Tensor | None:
        """The frozen LM's transcript CE (token mean) with the speech spliced into the prompt; ``None`` when
        no record of the batch has a task in ``understanding_tasks``."""
        rows = self._understanding_rows(batch, quantized.shape[0])
        if not rows:
            return None
        lm = self.language_model
        embeds, attention, labels, input_ids = self._splice(quantized[rows], tokens[rows], [batch["text"][i] for i in rows])
        hidden = lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention, use_cache=False).last_hidden_state
        return self.token_loss(
            labels, hidden=hidden, head=lm.get_output_embeddings(),
            batch={"input_ids": input_ids, "attention_mask": attention, "labels": labels},
        )

    def _understanding_rows(self, batch: dict[str, Any], size: int) -> list[int]:
        tasks = batch.get("task") or ["asr"] * size
        if len(tasks) != size:
            raise DataError(f"batch['task'] has {len(tasks)} entries for {size} utterances.")
        rows = [i for i, task in enumerate(tasks) if task in self.understanding_tasks]
        if not rows:
            return rows
        texts = batch.get("text")
        if texts is None or len(texts) != size or any(not isinstance(texts[i], str) or not texts[i].strip() for i in rows):
            raise DataError(
                f"understanding_weight={self.understanding_weight} needs a transcript in batch['text'] for every "
                f"record of tasks {self.understanding_tasks}; got {texts!r}. Give the texts, or set "
                "understanding_weight: 0 (reconstruction only)."
            )
        return rows

    def _splice(self, quantized: Tensor, tokens: Tensor, texts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[bos] "USER: " <speech> prompt "\\nASSISTANT: " text eos``, right-padded: embeddings, attention mask,
        labels (the text and eos only; HF convention, shifted by ``token_loss``) and input ids (pad at speech)."""
        tok, lm = self.text_tokenizer, self.language_model
        embedding = lm.get_input_embeddings()
        mask25 = _frames_mask(tokens, quantized.shape[1])
        speech = self.llm_conv((self.to_llm(quantized) * mask25[..., None]).transpose(1, 2)).transpose(1, 2)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        before = bos + tok("USER: ", add_special_tokens=False).input_ids
        after = tok(self.prompt + "\nASSISTANT: ", add_special_tokens=False).input_ids
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = []
        for i, text in enumerate(texts):
            target = tok(text, add_special_tokens=False).input_ids[: self.max_text_tokens] + [tok.eos_token_id]
            n = int(tokens[i])
            ids = before + [pad] * n + after + target
            labels = [IGNORE_INDEX] * (len(ids) - len(target)) + target
            rows.append((ids, labels, n))
        width = max(len(ids) for ids, _, _ in rows)
        device = quantized.device
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention = torch.zeros_like(input_ids)
        for i, (ids, lab, _) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, device=device)
            labels[i, : len(lab)] = torch.tensor(lab, device=device)
            attention[i, : len(ids)] = 1
        embeds = embedding(input_ids)
        speech = speech.to(embeds.dtype)
        # place each utterance's speech frames after its prefix (out of place: gradients reach ``speech``)
        start = len(before)
        pieces = []
        for i, (_, _, n) in enumerate(rows):
            pieces.append(torch.cat([embeds[i, :start], speech[i, :n], embeds[i, start + n :]]))
        return torch.stack(pieces), attention, labels, input_ids

    # ---- Lightning hooks ---------------------------------------------------------------------------
    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.compute_losses(batch)
        ce = out["ce"] if out["ce"] is not None else self._unused_understanding_term(out["recon"])
        loss = tokenizer_loss(out["commit"], out["recon"], ce, self.commitment_weight, self.reconstruction_weight,
                              self.understanding_weight)
        size = int(out["lengths"].shape[0])
        self.log("train/commit", out["commit"].detach(), batch_size=size)
        self.log("train/reconstruction", out["recon"].detach(), batch_size=size)
        if out["ce"] is not None:
            self.log("train/understanding_ce", ce.detach(), batch_size=size)
        # token_loss logged its CE as train/loss: the same key and options, logged later, wins
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def _unused_understanding_term(self, like: Tensor) -> Tensor:
        """0, tied to the speech→LM projection when the LM is on: a batch without understanding records
        still gives those parameters a (zero) gradient, so DDP does not stop on unused parameters."""
        if not self.uses_language_model:
            return like.new_zeros(())
        return sum(p.sum() for p in (*self.to_llm.parameters(), *self.llm_conv.parameters())) * 0.0

    @override
    def on_validation_epoch_start(self) -> None:
        self.val_codebook.reset()
        self._val = {"tokens": 0.0, "samples": 0.0, "recon": [], "ce": []}

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.compute_losses(batch)
        size = int(out["lengths"].shape[0])
        self.log("val/reconstruction", out["recon"], sync_dist=True, batch_size=size)
        self._val["recon"].append(float(out["recon"]))
        if out["ce"] is not None:
            self.log("val/understanding_ce", out["ce"], sync_dist=True, batch_size=size)
            self._val["ce"].append(float(out["ce"]))
        self.val_codebook.update(out["codes"])
        self._val["tokens"] += float(out["tokens"].sum())
        self._val["samples"] += float(out["lengths"].sum())

    @override
    def on_validation_epoch_end(self) -> None:
        if not self._val.get("samples"):
            return
        codebook = self.val_codebook.compute()
        usage, perplexity = codebook["usage"], codebook["perplexity"]
        totals = torch.tensor([self._val["tokens"], self._val["samples"]], device=self.device, dtype=torch.float64)
        totals = global_sum(totals, self._trainer)
        rate = tokens_per_second(float(totals[0]), float(totals[1]), SAMPLE_RATE)
        self.log("val/codebook_usage", usage)
        self.log("val/perplexity", perplexity)
        self.log("val/tokens_per_second_of_audio", rate)
        recon = sum(self._val["recon"]) / max(len(self._val["recon"]), 1)
        # no LM (understanding_weight 0) or no understanding record: no CE to show
        ce = f"{sum(self._val['ce']) / len(self._val['ce']):6.3f}" if self._val["ce"] else "     -"
        rank_zero_info(
            f"step {self.global_step}: speech tokenizer validation\n"
            f"  usage  perplexity   recon      CE   tok/s\n"
            f"  {float(usage):5.3f}  {float(perplexity):10.2f}  {recon:6.4f}  {ce}  {rate:5.1f}"
        )

    @override
    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(self.named_parameters(), self.optimizer_settings, self.trainer)

    # ---- checkpoints -------------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen networks are not in checkpoints: keep the ones configure_model built
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.state_dict().items():
            if key.startswith(FROZEN_PREFIXES):
                state.setdefault(key, value)


def _vector_quantizer(dim: int, size: int, decay: float, eps: float) -> nn.Module:
    from vector_quantize_pytorch import VectorQuantize

    # commitment weighted by tokenizer_loss; plain straight-through; no dead-code replacement (reference)
    return VectorQuantize(
        dim=dim, codebook_size=size, decay=decay, eps=eps, commitment_weight=1.0, rotation_trick=False,
        threshold_ema_dead_code=0, kmeans_init=False,
    )


def _hidden_size(lm: nn.Module, name: str) -> int:
    config = getattr(lm, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None and config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "hidden_size", None)
    if not isinstance(size, int) or size < 1:
        raise ConfigError(
            f"SpeechTokenizer(language_model={name!r}): its config has no hidden_size, so the speech projection "
            "cannot be sized; use a causal LM whose config defines hidden_size."
        )
    return size


def _check_audio(audio: Any, lengths: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(audio, Tensor) or audio.dim() != 2 or not audio.is_floating_point():
        raise DataError(
            f"batch['audio'] must be a float (B, S) tensor of 16 kHz waveforms, got "
            f"{getattr(audio, 'shape', type(audio).__name__)} {getattr(audio, 'dtype', '')}."
        )
    if lengths is None:
        raise DataError("batch['audio_lengths'] is missing: give the (B,) valid sample counts.")
    lengths = torch.as_tensor(lengths)
    if lengths.shape != audio.shape[:1]:
        raise DataError(
            f"batch['audio_lengths'] has shape {tuple(lengths.shape)} but batch['audio'] has {audio.shape[0]} rows: "
            "give one length per utterance."
        )
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > audio.shape[1]):
        raise DataError(
            f"batch['audio_lengths'] must be in [1, {audio.shape[1]}] (the padded width of batch['audio']), got "
            f"{lengths.tolist()}."
        )
    return audio, lengths.long()


def _resample(wav: Tensor, lengths: Tensor, rate: int) -> tuple[Tensor, Tensor]:
    """Each utterance's valid samples resampled to 16 kHz (``scipy.signal.resample_poly``), zero-padded."""
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, rate)
    rows = [
        torch.from_numpy(resample_poly(wav[i, : int(n)].double().cpu().numpy(), SAMPLE_RATE // g, rate // g)).float()
        for i, n in enumerate(lengths.tolist())
    ]
    out = torch.zeros(len(rows), max(len(r) for r in rows))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out, torch.tensor([len(r) for r in rows])
