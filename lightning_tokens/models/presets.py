"""Models built from a config with random weights (the offline default), packaged pretrained models
(:mod:`lightning_tokens.models.packaged`, offline too) and hub/local loading."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.models.packaged import PACKAGED_MODELS, check_packaged, is_packaged, packaged_model_path

# name -> (transformers model_type, config kwargs). vocab_size comes from the tokenizer.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
    ),
    "tiny-qwen2": (
        "qwen2",
        dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    ),
    # Llama-3.2-1B shape, for benchmarks on a GPU.
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    # ~1.5B Llama shape with an untied 128k vocabulary (the GPU benchmark shape).
    "llama-1.5b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def looks_like_local_path(name: str) -> bool:
    """A string meant as a filesystem path rather than a hub id (``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_source(name: str, field: str = "model") -> None:
    """Fail early for a path that does not exist or a packaged model whose pip package is missing;
    presets and hub ids pass."""
    if is_preset(name):
        return
    if is_packaged(name):
        check_packaged(name)  # raises with the install command
        return
    if os.path.exists(os.path.expanduser(name)):
        return
    if looks_like_local_path(name):
        raise ConfigError(
            f"{field}={name!r}: no such file or directory. Give an existing local checkpoint folder, a Hugging "
            f"Face hub id (org/name), a packaged pretrained model ({', '.join(sorted(PACKAGED_MODELS))}) or a "
            f"preset built from config: {', '.join(sorted(PRESETS))}."
        )


def build_config(name: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """Config of a preset with the tokenizer's vocabulary size and user overrides."""
    model_type, kwargs = PRESETS[name]
    kwargs = {**kwargs, "vocab_size": vocab_size, **(overrides or {})}
    return AutoConfig.for_model(model_type, **kwargs)


def load_causal_lm(
    name: str,
    vocab_size: int,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    quantization_config: Any = None,
) -> PreTrainedModel:
    """A preset built from config (random weights), or a packaged model / hub id / local folder loaded
    with its weights (a packaged model from its converted cache folder, see
    :func:`~lightning_tokens.models.packaged.packaged_model_path`)."""
    if is_preset(name):
        if quantization_config is not None:
            raise ConfigError(
                f"model={name!r} is built from config with random weights; 4/8-bit quantization applies to "
                "pretrained weights: give a packaged pretrained model "
                f"({', '.join(sorted(PACKAGED_MODELS))}), a hub id or a local checkpoint folder, or set "
                "quantization: null."
            )
        config = build_config(name, vocab_size, overrides)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(config)
        return model
    check_model_source(name)
    source = packaged_model_path(name) if is_packaged(name) else os.path.expanduser(name)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if overrides:
        kwargs.update(overrides)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ConfigError(
            f"model={name!r} could not be loaded ({err}). Offline, use a local folder, a packaged pretrained "
            f"model ({', '.join(sorted(PACKAGED_MODELS))}) or a preset: {', '.join(sorted(PRESETS))}."
        ) from err
