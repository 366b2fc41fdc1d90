"""Frozen neural audio codecs as single-stream tokenizers: waveform ↔ one codebook of ids per frame.

DualSpeechLM's acoustic decoder predicts the ids of one codebook (WavTokenizer, 4096 codes, 40 Hz,
24 kHz). WavTokenizer is not packaged (neither in ``transformers`` nor on PyPI), so :func:`load_codec`
wraps the codecs ``transformers`` ships: Encodec, Mimi and DAC, keeping only their **first** codebook
(Mimi's first is its semantic one). A one-codebook decode is coarse: it is for shapes, plumbing and
tests, not for listening quality.

Names:

* ``"tiny-encodec"``, ``"tiny-mimi"``, ``"tiny-dac"``: tiny configurations with random (seeded, so
  reproducible) weights, fast on the CPU, for tests;
* a local folder or hub id: ``AutoModel.from_pretrained``; the kind comes from ``config.model_type``
  (``encodec``, ``mimi`` or ``dac``), e.g. ``facebook/encodec_24khz``, ``kyutai/mimi``,
  ``descript/dac_16khz``.

Each item is encoded on its own length, right-padded with zeros to a whole number of frames, and its codes
are trimmed to ``ceil(length · frame_rate / sample_rate)``: items of a batch are grouped by padded length,
so an item's codes never depend on what it is batched with.

Example:
    >>> codec = load_codec("tiny-mimi")
    >>> codec.sample_rate, codec.frame_rate, codec.codebook_size
    (24000, 12.5, 2048)
    >>> codes = codec.encode(torch.randn(2, 24000), torch.tensor([24000, 12000]))
    >>> [len(c) for c in codes]
    [13, 7]
    >>> [w.shape[0] for w in codec.decode(codes)]
    [24960, 13440]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_tokens.core.errors import ConfigError, DataError

__all__ = ["TINY_CODECS", "AudioCodec", "load_codec"]

_KINDS = ("encodec", "mimi", "dac")


def _tiny_encodec() -> nn.Module:
    from transformers import EncodecConfig, EncodecModel

    model = EncodecModel(EncodecConfig(hidden_size=32, num_filters=8)).eval()
    # Random Encodec codebooks are all zeros (every frame → id 0), and the random encoder's latents vary
    # ~50× less over time than across channels: draw the codes from the latents' own per-channel spread.
    t = torch.arange(model.config.sampling_rate // 4) / model.config.sampling_rate
    probe = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (110.0, 440.0, 1760.0)]) + 0.1 * torch.randn(
        3, t.numel()
    )
    with torch.no_grad():
        latents = model.encoder(probe[:, None]).transpose(1, 2).reshape(-1, model.config.hidden_size)
        mean, std = latents.mean(dim=0), latents.std(dim=0)
        for layer in model.quantizer.layers:
            layer.codebook.embed.copy_(mean + std * torch.randn_like(layer.codebook.embed))
            layer.codebook.inited.fill_(1.0)
    return model


def _tiny_mimi() -> nn.Module:
    from transformers import MimiConfig, MimiModel

    config = MimiConfig(
        num_hidden_layers=1, hidden_size=64, num_filters=8, intermediate_size=128, codebook_dim=32,
        vector_quantization_hidden_dimension=32, num_quantizers=2, upsample_groups=64, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    model = MimiModel(config)
    with torch.no_grad():  # random Mimi codebooks are all zeros: every frame would get id 0
        for name, buffer in model.quantizer.named_buffers():
            if name.endswith("embed_sum"):
                buffer.copy_(torch.randn_like(buffer))
            elif name.endswith(("cluster_usage", "initialized")):
                buffer.fill_(1.0)
    return model


def _tiny_dac() -> nn.Module:
    from transformers import DacConfig, DacModel

    return DacModel(DacConfig(encoder_hidden_size=8, decoder_hidden_size=32, n_codebooks=2, sampling_rate=16000))


TINY_CODECS: dict[str, Callable[[], nn.Module]] = {
    "tiny-encodec": _tiny_encodec,
    "tiny-mimi": _tiny_mimi,
    "tiny-dac": _tiny_dac,
}


def load_codec(name: str) -> AudioCodec:
    """A frozen codec by name (``tiny-encodec``/``tiny-mimi``/``tiny-dac``), local folder or hub id.

    Args:
        name: a key of :data:`TINY_CODECS`, or anything ``AutoModel.from_pretrained`` accepts whose
            ``config.model_type`` is ``encodec``, ``mimi`` or ``dac``.

    Returns:
        The :class:`AudioCodec`, in eval mode with gradients off.

    Raises:
        ConfigError: a model of another type.

    Example:
        >>> load_codec("tiny-dac").frame_rate
        31.25
    """
    if name in TINY_CODECS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TINY_CODECS[name]()
    else:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(name)
    return AudioCodec(model)


class AudioCodec(nn.Module):
    """A frozen Encodec / Mimi / DAC model seen as a single-codebook tokenizer.

    Attributes:
        kind: ``"encodec"``, ``"mimi"`` or ``"dac"``.
        sample_rate: waveform samples per second.
        hop_length: samples per frame.
        frame_rate: frames (tokens) per second, ``sample_rate / hop_length``.
        codebook_size: ids per frame lie in ``[0, codebook_size)``.
        num_codebooks: codebooks used (always 1: the first).

    Args:
        model: a ``transformers`` ``EncodecModel``, ``MimiModel`` or ``DacModel``.

    Example:
        >>> from transformers import DacConfig, DacModel
        >>> codec = AudioCodec(DacModel(DacConfig(encoder_hidden_size=8, decoder_hidden_size=16)))
        >>> codec.kind, codec.hop_length, codec.codebook_size
        ('dac', 512, 1024)
    """

    num_codebooks = 1

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = model.config
        self.kind = config.model_type
        if self.kind not in _KINDS:
            raise ConfigError(
                f"codec model_type={self.kind!r} is not supported: use an Encodec, Mimi or DAC checkpoint "
                f"(or one of {sorted(TINY_CODECS)})."
            )
        if self.kind == "encodec" and (config.chunk_length_s is not None or config.normalize):
            raise ConfigError(
                "Encodec checkpoints with chunking or normalisation (the 48 kHz ones) are not supported: use a "
                "24 kHz Encodec such as facebook/encodec_24khz."
            )
        self.model = model.eval().requires_grad_(False)
        self.sample_rate = int(config.sampling_rate)
        self.hop_length = _hop_length(config)
        self.frame_rate = self.sample_rate / self.hop_length
        self.codebook_size = int(config.codebook_size)

    def train(self, mode: bool = True) -> AudioCodec:
        """Stays in eval mode: the codec is frozen whatever the surrounding module does."""
        return super().train(False)

    def num_frames(self, num_samples: int) -> int:
        """Codes for ``num_samples`` samples: ``ceil(num_samples · frame_rate / sample_rate)``."""
        return math.ceil(num_samples / self.hop_length)

    @torch.no_grad()
    def encode(self, wav: Tensor, lengths: Tensor | None = None) -> list[Tensor]:
        """First-codebook ids of each item, trimmed to its true length.

        Args:
            wav: ``(B, S)`` float waveform at :attr:`sample_rate`, right-padded.
            lengths: ``(B,)`` true lengths in samples (``None``: all ``S``).

        Returns:
            One ``(num_frames(length),)`` long tensor per item, on the codec's device.

        Raises:
            DataError: a waveform that is not ``(B, S)`` or a length outside ``[1, S]``.
        """
        lengths = self._check_wav(wav, lengths)
        device = self._device()
        padded: dict[int, list[int]] = defaultdict(list)
        for index, length in enumerate(lengths):
            padded[self.num_frames(length) * self.hop_length].append(index)
        codes: list[Tensor | None] = [None] * len(lengths)
        for size, indices in padded.items():
            batch = torch.zeros(len(indices), 1, size, device=device, dtype=self._dtype())
            for row, index in enumerate(indices):
                batch[row, 0, : lengths[index]] = wav[index, : lengths[index]].to(device=device, dtype=batch.dtype)
            first = self._encode_first_codebook(batch)
            for row, index in enumerate(indices):
                codes[index] = first[row, : self.num_frames(lengths[index])].long()
        return codes  # type: ignore[return-value]

    @torch.no_grad()
    def decode(self, codes: Sequence[Tensor]) -> list[Tensor]:
        """Waveforms from first-codebook ids (``hop_length`` samples per code).

        Args:
            codes: one 1-D tensor of ids in ``[0, codebook_size)`` per item.

        Returns:
            One 1-D float waveform per item, ``len(codes[i]) · hop_length`` samples.

        Raises:
            DataError: an item that is empty, not 1-D, or holds ids outside the codebook.
        """
        self._check_codes(codes)
        device = self._device()
        groups: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(codes):
            groups[len(item)].append(index)
        out: list[Tensor | None] = [None] * len(codes)
        for indices in groups.values():
            stacked = torch.stack([codes[index].to(device).long() for index in indices])
            audio = self._decode_first_codebook(stacked)
            for row, index in enumerate(indices):
                out[index] = audio[row]
        return out  # type: ignore[return-value]

    # ---- model specifics ----
    def _encode_first_codebook(self, batch: Tensor) -> Tensor:
        """``(b, 1, samples)`` → ``(b, frames)`` ids of the first codebook."""
        if self.kind == "encodec":
            bandwidth = min(self.model.config.target_bandwidths)
            return self.model.encode(batch, bandwidth=bandwidth, return_dict=True).audio_codes[0, :, 0]
        if self.kind == "mimi":
            return self.model.encode(batch, num_quantizers=1).audio_codes[:, 0]
        return self.model.encode(batch, n_quantizers=1, return_dict=True).audio_codes[:, 0]

    def _decode_first_codebook(self, codes: Tensor) -> Tensor:
        """``(b, frames)`` ids → ``(b, samples)`` waveform."""
        if self.kind == "encodec":
            audio = self.model.decode(codes[None, :, None], [None], return_dict=True).audio_values
        elif self.kind == "mimi":
            audio = self.model.decode(codes[:, None]).audio_values
        else:
            audio = self.model.decode(audio_codes=codes[:, None], return_dict=True).audio_values
        return audio.reshape(codes.shape[0], -1)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _check_wav(self, wav: Tensor, lengths: Tensor | None) -> list[int]:
        if wav.dim() != 2 or not wav.is_floating_point():
            raise DataError(
                f"wav must be a (batch, samples) float tensor at {self.sample_rate} Hz, got dtype {wav.dtype} and "
                f"shape {tuple(wav.shape)}: mix to mono and stack the items, right-padded."
            )
        if lengths is None:
            return [wav.shape[1]] * wav.shape[0]
        values = [int(v) for v in lengths.reshape(-1).tolist()]
        if len(values) != wav.shape[0]:
            raise DataError(f"lengths has {len(values)} entries for a batch of {wav.shape[0]} waveforms.")
        for index, length in enumerate(values):
            if not 1 <= length <= wav.shape[1]:
                raise DataError(f"lengths[{index}]={length} must lie in [1, {wav.shape[1]}] (the padded length).")
        return values

    def _check_codes(self, codes: Sequence[Tensor]) -> None:
        for index, item in enumerate(codes):
            if item.dim() != 1 or item.numel() == 0:
                raise DataError(f"codes[{index}] has shape {tuple(item.shape)}: pass a non-empty 1-D tensor of ids.")
            low, high = int(item.min()), int(item.max())
            if low < 0 or high >= self.codebook_size:
                raise DataError(
                    f"codes[{index}] holds ids in [{low}, {high}], outside the codebook [0, {self.codebook_size}): "
                    "strip special ids (pad, start, end) before decoding."
                )


def _hop_length(config) -> int:
    if config.model_type == "encodec":
        return math.prod(config.upsampling_ratios)
    if config.model_type == "mimi":
        return round(config.sampling_rate / config.frame_rate)
    return int(config.hop_length)
