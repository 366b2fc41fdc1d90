"""Hugging Face vision-language models (image-text-to-text: Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM,
LLaVA) and their processors: tiny models built from config (offline, random weights, character tokenizers
with the model's image tokens; for tests and ``configs/vlm_hf_tiny.yaml``), or a local folder / hub id
loaded with its own processor.

Tiny presets (:data:`VISION_LANGUAGE_PRESETS`):

- ``tiny-qwen2-vl``: Qwen2-VL, 56×56 px images → 4 ``<|image_pad|>`` tokens (patches of 14, merged 2×2).
- ``tiny-llava``: LLaVA (CLIP vision tower + Llama), 32×32 px → 16 ``<image>`` tokens (patches of 8, the
  CLS feature dropped: ``vision_feature_select_strategy="default"``); ``multi_modal_projector`` trains.
- ``tiny-idefics3``: Idefics3 / SmolVLM (SigLIP-style tower + Llama), one 32×32 px image (no splitting) →
  ``<fake_token_around_image><global-img>`` + 4 ``<image>`` (16 patches, pixel-shuffled 2×2) +
  ``<fake_token_around_image>``; the ``connector`` trains.

Example:
    >>> processor = build_processor("tiny-qwen2-vl")
    >>> model = load_vision_language_model("tiny-qwen2-vl", processor)
    >>> type(model).__name__, model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ('Qwen2VLForConditionalGeneration', True)
    >>> type(load_vision_language_model("tiny-llava", build_processor("tiny-llava"))).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from lightning_tokens.core.errors import ConfigError

#: Qwen2-VL's own special tokens, added to the character tokenizer of the tiny preset.
_QWEN2_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: Idefics3's image tokens: the placeholder, the delimiter around an image and the whole-image tag.
_IDEFICS3_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>")


def chat_template(image: str) -> str:
    """A minimal chat template (``<|role|>`` lines) writing ``image`` where a message part is an image.
    Hugging Face renders templates with ``trim_blocks``, which drops the newline after a user turn's text.

    Example:
        >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Red?"}]}]
        >>> build_processor("tiny-llava").apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        '<|user|>\\n<image>Red?<|assistant|>\\n'
    """
    return (
        "{% for message in messages %}<|{{ message['role'] }}|>\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image +
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )


#: The Qwen2-VL-style chat template of the tiny Qwen2-VL preset (its character tokenizer has none).
TINY_CHAT_TEMPLATE = chat_template("<|vision_start|><|image_pad|><|vision_end|>")

#: The size of every tiny preset's language model.
_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
#: The Llama language model of the tiny LLaVA and Idefics3 presets.
_TINY_LLAMA = dict(_TINY_TEXT, model_type="llama")
#: A one-layer vision transformer on 32×32 px images in 8 px patches (16 patches).
_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)

#: name -> config keyword arguments of the tiny presets (vocabulary and token ids come from the tokenizer).
VISION_LANGUAGE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen2-vl": dict(
        text_config=dict(_TINY_TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2
        ),
        tie_word_embeddings=True,
    ),
    "tiny-llava": dict(
        text_config=_TINY_LLAMA,
        vision_config=dict(_TINY_VIT, model_type="clip_vision_model"),
        # the last (only) layer's features, CLS dropped: 16 image tokens
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    ),
    "tiny-idefics3": dict(text_config=_TINY_LLAMA, vision_config=dict(_TINY_VIT), scale_factor=2, tie_word_embeddings=True),
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
        return _TINY_PROCESSORS[name]()
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


def _char_tokenizer(tokens: tuple[str, ...]) -> Any:
    """The character tokenizer with the model's image tokens added as special tokens."""
    from lightning_tokens.models.tokenizers import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tokenizer


def _tiny_qwen2_vl_processor() -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = _char_tokenizer(_QWEN2_VL_TOKENS)
    tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
    images = Qwen2VLImageProcessor(min_pixels=_TINY_IMAGE_PIXELS, max_pixels=_TINY_IMAGE_PIXELS)
    return Qwen2VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_CHAT_TEMPLATE
    )


def _tiny_llava_processor() -> Any:
    """CLIP preprocessing (resize the short side, centre-crop to the tower's square) and one ``<image>`` per
    patch feature: ``(side / patch)²`` + the CLS feature, which ``"default"`` selection drops again."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    preset = VISION_LANGUAGE_PRESETS["tiny-llava"]
    side, patch = preset["vision_config"]["image_size"], preset["vision_config"]["patch_size"]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    tokenizer = _char_tokenizer(("<image>",))
    tokenizer.image_token = "<image>"
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=preset["vision_feature_select_strategy"],
        num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )


def _tiny_idefics3_processor() -> Any:
    """Each image resized to the tower's square, unsplit: ``(side / patch)² / scale_factor²`` ``<image>`` tokens
    between ``<fake_token_around_image><global-img>`` and ``<fake_token_around_image>``."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    preset = VISION_LANGUAGE_PRESETS["tiny-idefics3"]
    side, patch = preset["vision_config"]["image_size"], preset["vision_config"]["patch_size"]
    images = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
    )
    return Idefics3Processor(
        image_processor=images,
        tokenizer=_char_tokenizer(_IDEFICS3_TOKENS),
        image_seq_len=(side // patch) ** 2 // preset["scale_factor"] ** 2,
        chat_template=chat_template("<image>"),
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
    """The preset's config with ``overrides`` (``text_config`` / ``vision_config`` entries update the preset's),
    sized to ``processor``'s vocabulary and image tokens."""
    tokenizer = processor.tokenizer
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
    return _TINY_CONFIGS[name](kwargs, tokenizer, overrides or {})


def _token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> dict[str, int]:
    return dict(zip(tokens, tokenizer.convert_tokens_to_ids(list(tokens))))


def _qwen2_vl_config(kwargs: dict[str, Any], tokenizer: Any, overrides: dict[str, Any]) -> Any:
    from transformers import Qwen2VLConfig

    ids = _token_ids(tokenizer, _QWEN2_VL_TOKENS)
    text = kwargs["text_config"]
    if "rope_scaling" not in overrides.get("text_config", {}):  # M-RoPE sections must fill head_dim / 2
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        temporal = half // 4
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]}
    if "hidden_size" not in overrides.get("vision_config", {}):  # the merger's output is the LM's width
        kwargs["vision_config"]["hidden_size"] = kwargs["text_config"]["hidden_size"]
    return Qwen2VLConfig(
        **kwargs,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _check_image_geometry(name: str, kwargs: dict[str, Any]) -> None:
    """The processor is built from the preset's image size and patch size: overrides must keep them."""
    preset = VISION_LANGUAGE_PRESETS[name]
    for key in ("image_size", "patch_size"):
        if kwargs["vision_config"][key] != preset["vision_config"][key]:
            raise ConfigError(
                f"model_config.vision_config.{key}={kwargs['vision_config'][key]} for model={name!r}: its processor "
                f"writes the image tokens of {preset['vision_config'][key]}; remove the override."
            )
    for key in ("scale_factor", "vision_feature_select_strategy"):
        if key in preset and kwargs[key] != preset[key]:
            raise ConfigError(
                f"model_config.{key}={kwargs[key]!r} for model={name!r}: its processor writes the image tokens of "
                f"{preset[key]!r}; remove the override."
            )


def _llava_config(kwargs: dict[str, Any], tokenizer: Any, overrides: dict[str, Any]) -> Any:
    from transformers import LlavaConfig

    _check_image_geometry("tiny-llava", kwargs)
    vision = kwargs["vision_config"]
    return LlavaConfig(
        **kwargs,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
    )


def _idefics3_config(kwargs: dict[str, Any], tokenizer: Any, overrides: dict[str, Any]) -> Any:
    from transformers import Idefics3Config

    _check_image_geometry("tiny-idefics3", kwargs)
    ids = _token_ids(tokenizer, _IDEFICS3_TOKENS)
    config = Idefics3Config(**kwargs, image_token_id=ids["<image>"])
    # not read by the model; VisionLanguageLM keeps generation from emitting them
    config.fake_image_token_id = ids["<fake_token_around_image>"]
    config.global_image_token_id = ids["<global-img>"]
    return config


#: preset name -> its processor and its config builder.
_TINY_PROCESSORS: dict[str, Callable[[], Any]] = {
    "tiny-qwen2-vl": _tiny_qwen2_vl_processor,
    "tiny-llava": _tiny_llava_processor,
    "tiny-idefics3": _tiny_idefics3_processor,
}
_TINY_CONFIGS: dict[str, Callable[[dict[str, Any], Any, dict[str, Any]], Any]] = {
    "tiny-qwen2-vl": _qwen2_vl_config,
    "tiny-llava": _llava_config,
    "tiny-idefics3": _idefics3_config,
}
