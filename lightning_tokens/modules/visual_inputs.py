"""Inputs of :class:`~lightning_tokens.modules.vision_language.VisionLanguageLM`: the processors that turn
(images, questions, answers) into batches, and the splicing of visual tokens into the prompt's embeddings.

Both processors follow one protocol (what ``VisualQADataModule`` calls)::

    processor(images, questions, answers=None, chat=False) -> dict[str, Tensor]

With answers: right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` everywhere but the
answer tokens and the closing eos), left-padded ``prompt_input_ids`` / ``prompt_attention_mask`` (the
prompt alone, for generation) and ``pixel_values`` (plus model-specific keys such as ``image_grid_thw``).
Without answers: the prompt keys and the image keys only.

Example:
    >>> from lightning_tokens.models.tokenizers import build_char_tokenizer
    >>> from lightning_tokens.models.vision import ImageTransform
    >>> from PIL import Image
    >>> processor = GVTProcessor(build_char_tokenizer(), ImageTransform(8, (0.5,) * 3, (0.5,) * 3), num_latents=2)
    >>> batch = processor([Image.new("RGB", (8, 8))], ["How many?"], ["3"])
    >>> processor.tokenizer.decode(batch["input_ids"][0])
    '<Img><image><image></Img>How many?3</s>'
    >>> processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] >= 0])
    '3</s>'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError, DataError

#: GVT's image delimiters and the placeholder whose embeddings the visual tokens replace.
IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER = "<Img>", "</Img>", "<image>"


def splice_visual_tokens(embeds: Tensor, input_ids: Tensor, placeholder_id: int, visual: Tensor) -> Tensor:
    """``embeds (B, T, D)`` with the placeholder positions replaced, in reading order, by ``visual (M, n, D)``
    (image ``m``'s ``n`` tokens fill the ``m``-th run of ``n`` placeholders of the batch).

    Raises:
        ConfigError: the prompts hold no placeholder, or their count is not ``M · n``.
    """
    mask = input_ids == placeholder_id
    found, wanted = int(mask.sum()), visual.shape[0] * visual.shape[1]
    if found == 0:
        raise ConfigError(
            f"the batch has {visual.shape[0]} image(s) but no image placeholder token in its prompts: build the "
            "prompts with the module's processor (it writes <Img> + one placeholder per visual token + </Img>)."
        )
    if found != wanted:
        raise ConfigError(
            f"the prompts hold {found} image placeholder tokens but the batch has {visual.shape[0]} image(s) × "
            f"{visual.shape[1]} visual tokens = {wanted}: each image needs exactly {visual.shape[1]} placeholders "
            "(more images than placeholders, or prompts cut by max_length?)."
        )
    return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1, embeds.shape[-1]))


#: Image keys whose first dimension is the image (one per prompt), besides Qwen2-VL's flattened ``pixel_values``.
_PER_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")


def repeat_image_inputs(batch: dict[str, Any], repeats: int) -> dict[str, Tensor]:
    """The image inputs of a batch with one image per prompt, each repeated ``repeats`` times in a row (the
    rows of GRPO's groups). Qwen2-VL's ``pixel_values`` are the patches of all images stacked, ``image_grid_thw``
    rows long each, so they repeat image by image; the other keys repeat along their first dimension.

    Example:
        >>> out = repeat_image_inputs({"pixel_values": torch.arange(5.0).unsqueeze(1),
        ...                            "image_grid_thw": torch.tensor([[1, 1, 2], [1, 1, 3]])}, 2)
        >>> out["pixel_values"].flatten().tolist(), out["image_grid_thw"][:, 2].tolist()
        ([0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 2.0, 3.0, 4.0], [2, 2, 3, 3])
    """
    out = {key: batch[key].repeat_interleave(repeats, 0) for key in _PER_IMAGE_KEYS if key in batch}
    grid = batch.get("image_grid_thw")
    if grid is not None and "pixel_values" in batch:
        patches = batch["pixel_values"].split(grid.prod(-1).tolist(), dim=0)
        out["pixel_values"] = torch.cat([chunk for chunk in patches for _ in range(repeats)], dim=0)
    return out


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            values = torch.tensor(row, dtype=torch.long)
            if left:
                out[i, width - len(row) :] = values
            else:
                out[i, : len(row)] = values
    return out


def answer_only_batch(prompts: list[list[int]], answers: list[list[int]] | None, pad_id: int) -> dict[str, Tensor]:
    """Token rows → left-padded ``prompt_input_ids``/``prompt_attention_mask`` and, with answers, right-padded
    ``input_ids``/``attention_mask`` (prompt + answer) and ``labels`` on the answer tokens only.

    Example:
        >>> answer_only_batch([[5, 6], [7]], [[8, 2], [9, 2]], pad_id=0)["labels"].tolist()
        [[-100, -100, 8, 2], [-100, 9, 2, -100]]
    """
    batch = {
        "prompt_input_ids": _pad(prompts, pad_id, left=True),
        "prompt_attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
    }
    if answers is not None:
        rows = [p + a for p, a in zip(prompts, answers)]
        batch["input_ids"] = _pad(rows, pad_id, left=False)
        batch["attention_mask"] = _pad([[1] * len(r) for r in rows], 0, left=False)
        batch["labels"] = _pad([[-100] * len(p) + a for p, a in zip(prompts, answers)], -100, left=False)
    return batch


def _check_lengths(images: Sequence[Any], questions: Sequence[str], answers: Sequence[str] | None) -> None:
    if len(images) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise DataError(
            f"processor: got {len(images)} images, {len(questions)} questions"
            + (f" and {len(answers)} answers" if answers is not None else "")
            + "; one image per question (and one answer each)."
        )
    for i, answer in enumerate(answers or ()):
        if not answer.strip():
            raise DataError(f"processor: answer {i} is empty; every training example needs a non-empty answer.")


class GVTProcessor:
    """GVT's prompt layout (``<Img>`` + ``num_latents`` placeholders + ``</Img>`` + question) over a causal
    LM's tokenizer, with the vision encoder's image transform.

    Args:
        tokenizer: the language model's tokenizer; the three image tokens are added to it if missing.
        transform: PIL images → ``pixel_values`` (:attr:`lightning_tokens.models.vision.VisionEncoder.transform`).
        num_latents: visual tokens per image (the resampler's latents).
    """

    def __init__(self, tokenizer: Any, transform: Any, num_latents: int) -> None:
        missing = [t for t in (IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_latents = num_latents
        self.placeholder_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    @property
    def image_prompt(self) -> str:
        return IMAGE_START + IMAGE_PLACEHOLDER * self.num_latents + IMAGE_END

    def prompt_text(self, question: str, chat: bool) -> str:
        if not chat:
            return self.image_prompt + question
        from lightning_tokens.datamodules.sft.chat import _ChatTemplate

        return _ChatTemplate(self.tokenizer, None).render(
            [{"role": "user", "content": self.image_prompt + question}], add_generation_prompt=True
        )

    def __call__(
        self, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str] | None = None, chat: bool = False
    ) -> dict[str, Tensor]:
        _check_lengths(images, questions, answers)
        tok = self.tokenizer
        prompts = [
            tok(self.prompt_text(q, chat), add_special_tokens=not chat)["input_ids"] for q in questions
        ]
        answer_ids = None
        if answers is not None:
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            answer_ids = [tok(a, add_special_tokens=False)["input_ids"] + eos for a in answers]
        batch = answer_only_batch(prompts, answer_ids, tok.pad_token_id)
        batch["pixel_values"] = self.transform(images)
        return batch


class HFVisionTextProcessor:
    """A Hugging Face processor (Qwen2-VL, Idefics3, LLaVA...) behind the same protocol: prompts rendered with
    the processor's chat template (a user turn holding the image and the question; these models expect it,
    so ``chat`` is always on), images expanded into the model's own image tokens by the processor.

    Args:
        processor: the model's ``AutoProcessor``.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def prompt_text(self, question: str, chat: bool = True) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(
        self, images: Sequence[Any], questions: Sequence[str], answers: Sequence[str] | None = None, chat: bool = True
    ) -> dict[str, Tensor]:
        _check_lengths(images, questions, answers)
        tok = self.tokenizer
        prompts = [self.prompt_text(q) for q in questions]
        images = [image.convert("RGB") for image in images]
        encoded = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_rows = [ids[mask.bool()].tolist() for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        batch = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        answer_rows = None
        if answers is not None:
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            answer_rows = [tok(a, add_special_tokens=False)["input_ids"] + eos for a in answers]
        batch.update(answer_only_batch(prompt_rows, answer_rows, tok.pad_token_id))
        if "mm_token_type_ids" in encoded:  # Qwen2-VL's M-RoPE reads which positions hold image tokens
            types = [t[m.bool()].tolist() for t, m in zip(encoded["mm_token_type_ids"], encoded["attention_mask"])]
            batch["prompt_mm_token_type_ids"] = _pad(types, 0, left=True)
            if answer_rows is not None:
                batch["mm_token_type_ids"] = _pad([t + [0] * len(a) for t, a in zip(types, answer_rows)], 0, left=False)
        return batch
