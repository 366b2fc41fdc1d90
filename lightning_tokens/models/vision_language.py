"""Hugging Face vision-language models (image-text-to-text: Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM,
LLaVA) and their processors: a tiny Qwen2-VL built from config (offline, random weights, for tests and
``configs/vlm_hf_tiny.yaml``), or a local folder / hub id loaded with its own processor.

Example:
    >>> processor = build_processor("tiny-qwen2-vl")
    >>> model = load_vision_language_model("tiny-qwen2-vl", processor)
    >>> type(model).__name__, model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ('Qwen2VLForConditionalGeneration', True)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_tokens.core.errors import ConfigError

#: Qwen2-VL's own special tokens, added to the character tokenizer of the tiny preset.
_QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

#: A Qwen2-VL-style chat template for the tiny preset (its character tokenizer has none).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: name -> config keyword arguments of the tiny Qwen2-VL presets (vocabulary and token ids come from the tokenizer).
VISION_LANGUAGE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen2-vl": dict(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2
        ),
        tie_word_embeddings=True,
    ),
}
_TINY_IMAGE_PIXELS = 56 * 56  # 4×4 patches of 14 px, merged 2×2: 4 visual tokens per image


def is_vision_language_model(name: str) -> bool:
    """A tiny preset, or a local folder / hub id whose config has a ``vision_config`` (image-text-to-text)."""
    if name in VISION_LANGUAGE_PRESETS:
        return True
    from lightning_tokens.models.packaged import is_packaged
    from lightning_tokens.models.presets import is_preset

    if is_preset(name) or is_packaged(name):
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError):
        return False
    return getattr(config, "vision_config", None) is not None


def build_processor(name: str) -> Any:
    """The model's processor (image processor + tokenizer + chat template), with a pad token."""
    from lightning_tokens.models.tokenizers import ensure_pad_token

    if name in VISION_LANGUAGE_PRESETS:
        return _tiny_qwen2_vl_processor()
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(os.path.expanduser(name))
    except OSError as error:
        raise ConfigError(
            f"model={name!r}: its processor could not be loaded ({error}); give a local folder holding the "
            f"processor files, a hub id (with the network), or a preset: {', '.join(VISION_LANGUAGE_PRESETS)}."
        ) from error
    ensure_pad_token(processor.tokenizer)
    return processor


def _tiny_qwen2_vl_processor() -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from lightning_tokens.models.tokenizers import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN2_VL_TOKENS)})
    tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
    images = Qwen2VLImageProcessor(min_pixels=_TINY_IMAGE_PIXELS, max_pixels=_TINY_IMAGE_PIXELS)
    return Qwen2VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE
    )


def load_vision_language_model(
    name: str,
    processor: Any,
    overrides: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    quantization_config: Any = None,
) -> torch.nn.Module:
    """A tiny preset built from config for ``processor``'s vocabulary, or a pretrained model loaded with
    ``AutoModelForImageTextToText``."""
    from transformers import AutoModelForImageTextToText

    if name in VISION_LANGUAGE_PRESETS:
        if quantization_config is not None:
            raise ConfigError(f"model={name!r} has random weights: quantization applies to pretrained models.")
        return AutoModelForImageTextToText.from_config(_tiny_config(name, processor, overrides), **_dtype(dtype))
    kwargs: dict[str, Any] = {**_dtype(dtype), **(overrides or {})}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return AutoModelForImageTextToText.from_pretrained(os.path.expanduser(name), **kwargs)
    except OSError as error:
        raise ConfigError(f"model={name!r} could not be loaded ({error}).") from error


def _dtype(dtype: torch.dtype | None) -> dict[str, Any]:
    return {"dtype": dtype} if dtype is not None else {}


def _tiny_config(name: str, processor: Any, overrides: dict[str, Any] | None) -> Any:
    from transformers import Qwen2VLConfig

    tokenizer = processor.tokenizer
    ids = dict(zip(_QWEN2_VL_TOKENS, tokenizer.convert_tokens_to_ids(list(_QWEN2_VL_TOKENS))))
    kwargs = {key: dict(value) if isinstance(value, dict) else value for key, value in VISION_LANGUAGE_PRESETS[name].items()}
    kwargs["text_config"].update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    for key, value in (overrides or {}).items():
        if key in ("text_config", "vision_config"):
            kwargs[key].update(value)
        else:
            kwargs[key] = value
    text = kwargs["text_config"]
    if "rope_scaling" not in (overrides or {}).get("text_config", {}):  # M-RoPE sections must fill head_dim / 2
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        temporal = half // 4
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]}
    if "hidden_size" not in (overrides or {}).get("vision_config", {}):  # the merger's output is the LM's width
        kwargs["vision_config"]["hidden_size"] = kwargs["text_config"]["hidden_size"]
    return Qwen2VLConfig(
        **kwargs,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
