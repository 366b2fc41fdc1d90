"""`VisionLanguageLM`: images as continuous tokens in a language model, trained through the token-loss
pipeline (GVT, "What Makes for Good Visual Tokenizers for Large Language Models?", arXiv 2305.12223).

Two ways to build it, both ending in the language model's final hidden states and output head, so the
loss is the library's fused token loss on the answer tokens and every text token method applies as is:

- **GVT composition** (``model:`` a causal LM: a preset, the packaged SmolLM2, a local folder or hub id): a
  frozen visual tokenizer (:func:`~lightning_tokens.models.vision.build_vision_encoder`: the offline
  ImageNet MobileNetV2 by default, any timm model, or a distilled GVT student) → LayerNorm → Perceiver
  resampler (``num_latents`` tokens) → ``Linear`` to the LM's width; the visual tokens replace the
  embeddings of the placeholders of ``<Img>`` + ``num_latents × <image>`` + ``</Img>`` in the prompt. The
  resampler and projections train; the LM is frozen, LoRA-adapted, or trained (``train_language_model``).
- **Hugging Face vision-language models** (``model:`` an image-text-to-text model: ``tiny-qwen2-vl`` built
  from config, or a local folder / hub id of Qwen2-VL, Qwen2.5-VL, Idefics3 / SmolVLM, LLaVA), with the
  model's own processor and chat template; its vision tower stays frozen, its projector trains.

Example::

    model = VisionLanguageLM(model="tiny-llama", tokenizer="char",
                             vision=VisionSettings(name="mobilenet_v2"), resampler=ResamplerSettings(num_latents=8))
    trainer = L.Trainer(max_steps=100, callbacks=[DFT()])
    trainer.fit(model, datamodule=VisualQADataModule(benchmark=True))
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.layers.resampler import PerceiverResampler
from lightning_tokens.modules.causal_lm import (
    EMBEDDING_MIX,
    LoRASettings,
    OptimizerSettings,
    TokenLM,
    _add_lora,
    mix_input_embeddings,
)
from lightning_tokens.modules.quantization import QuantizationMode, bnb_config
from lightning_tokens.modules.sharding import gathered_root, resampler_blocks, shard_modules, vision_blocks
from lightning_tokens.modules.visual_inputs import (
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    GVTProcessor,
    HFVisionTextProcessor,
    repeat_image_inputs,
    splice_visual_tokens,
)


@dataclass
class VisionSettings:
    """The frozen visual tokenizer of the GVT composition (see :func:`~lightning_tokens.models.vision.build_vision_encoder`).

    Attributes:
        name: ``mobilenet_v2`` (offline ImageNet weights, standing in for a CLIP tower) or a timm model name.
        pretrained: load pretrained weights (offline only for ``mobilenet_v2``).
        image_size: input side in pixels; ``None`` keeps the backbone's default.
        checkpoint: a local timm checkpoint, e.g. a student saved by ``VisualTokenizerDistillation``.
        overrides: extra ``timm.create_model`` arguments (``patch_size``, ``depth``...).
    """

    name: str = "mobilenet_v2"
    pretrained: bool = True
    image_size: int | None = None
    checkpoint: str | None = None
    overrides: dict[str, Any] | None = None


@dataclass
class ResamplerSettings:
    """The Perceiver resampler (GVT: 32 latents, depth 6, 16 heads of 96, feed-forward ×4).

    Attributes:
        num_latents: visual tokens per image (placeholders in the prompt).
        depth: resampler layers.
        heads: attention heads.
        dim_head: width per head.
        ff_mult: feed-forward expansion.
        dim: resampler width; ``None`` = the vision features' width (GVT), else a ``Linear`` maps to it first.
    """

    num_latents: int = 32
    depth: int = 6
    heads: int = 16
    dim_head: int = 96
    ff_mult: int = 4
    dim: int | None = None


torch.serialization.add_safe_globals([VisionSettings, ResamplerSettings])

#: Batch keys that carry images (and their layout) to the model, besides ``input_ids``.
_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids")
#: The GVT connector's weights in an exported folder (beside the language model's).
CONNECTOR_FILE = "connector.safetensors"
#: Vision towers of Hugging Face VLMs (Qwen2-VL, LLaVA, Idefics3).
_VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")
#: Modules of Hugging Face VLMs that map vision features to the LM (they train when the LM is frozen).
_PROJECTOR_NAMES = ("merger", "multi_modal_projector", "connector")


class VisualConnector(nn.Module):
    """Vision features ``(B, N, C)`` → ``(B, num_latents, lm_width)``: LayerNorm (GVT's ``ln_vision``) →
    optional width change → Perceiver resampler → ``Linear`` to the language model (GVT's ``llm_proj``)."""

    def __init__(self, features: int, lm_width: int, settings: ResamplerSettings) -> None:
        super().__init__()
        dim = settings.dim or features
        self.norm = nn.LayerNorm(features)
        self.input_proj = nn.Linear(features, dim) if dim != features else nn.Identity()
        self.resampler = PerceiverResampler(
            dim, settings.depth, settings.heads, settings.dim_head, settings.num_latents, settings.ff_mult
        )
        self.proj = nn.Linear(dim, lm_width)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(self.resampler(self.input_proj(self.norm(features))))


class VisionLanguageLM(TokenLM):
    """A vision-language model on the token-loss pipeline (GVT composition or a Hugging Face VLM).

    Batches come from its :attr:`processor` (``VisualQADataModule`` uses it): ``input_ids`` with image
    placeholders, ``labels`` on the answer only, ``pixel_values`` (+ model-specific image keys), and the
    left-padded ``prompt_*`` keys for generation. Everything else (LoRA, 4-bit loading, references for
    Rho-1 and friends, validation by generation with the datamodule's metrics, predictions, DDP / FSDP2,
    checkpoints) is :class:`~lightning_tokens.modules.causal_lm.TokenLM`'s.

    Args:
        model: a causal LM for the GVT composition (preset, packaged, local, hub) or an image-text-to-text
            model (``tiny-qwen2-vl``, a local folder or hub id).
        tokenizer: the LM's tokenizer (GVT composition; required for presets); HF VLMs use their processor's.
        vision: the frozen visual tokenizer (GVT composition only).
        resampler: the resampler's size (GVT composition only).
        train_language_model: train the language model's weights too (without LoRA); by default it is
            frozen and only the connector (resampler + projections, or an HF VLM's projector) and LoRA train.
        model_config, lora, quantization, optimizer, dtype, gradient_checkpointing, max_new_tokens,
            generate_in_validation, loss_backend, reference: as in :class:`TokenLM`.
    """

    def __init__(
        self,
        model: str = "tiny-llama",
        tokenizer: str | None = None,
        vision: VisionSettings | None = None,
        resampler: ResamplerSettings | None = None,
        train_language_model: bool = False,
        model_config: dict[str, Any] | None = None,
        lora: LoRASettings | None = None,
        quantization: QuantizationMode | None = None,
        optimizer: OptimizerSettings | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        max_new_tokens: int | None = None,
        generate_in_validation: bool = True,
        loss_backend: Literal["auto", "torch", "liger"] = "auto",
        reference: ReferenceSettings | None = None,
    ) -> None:
        from lightning_tokens.models.vision_language import is_vision_language_model

        self._hf_vlm = is_vision_language_model(model)
        if self._hf_vlm and tokenizer is None:
            tokenizer = model  # its processor's tokenizer; keeps TokenLM's "presets need a tokenizer" check quiet
        super().__init__(
            model=model,
            tokenizer=tokenizer,
            model_config=model_config,
            lora=lora,
            quantization=quantization,
            optimizer=optimizer,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            max_new_tokens=max_new_tokens,
            generate_in_validation=generate_in_validation,
            loss_backend=loss_backend,
            reference=reference,
        )
        if self._hf_vlm and (vision is not None or resampler is not None):
            raise ConfigError(
                f"model={model!r} is a Hugging Face vision-language model with its own vision tower: `vision` and "
                "`resampler` configure the GVT composition only; remove them."
            )
        self.vision_settings = vision or VisionSettings()
        self.resampler_settings = resampler or ResamplerSettings()
        self.train_language_model = train_language_model
        self.vision_encoder: nn.Module | None = None
        self.connector: VisualConnector | None = None
        self.reference_connector: VisualConnector | None = None  # the frozen ``model`` reference's connector
        self._processor: GVTProcessor | HFVisionTextProcessor | None = None

    # ---- construction ----------------------------------------------------------------------------
    @property
    def is_hf_vision_language_model(self) -> bool:
        return self._hf_vlm

    @property
    def processor(self) -> GVTProcessor | HFVisionTextProcessor:
        """What turns (images, questions, answers) into this model's batches (see :mod:`~lightning_tokens.modules.visual_inputs`)."""
        if self._processor is None:
            if self._hf_vlm:
                from lightning_tokens.models.vision_language import build_processor

                self._processor = HFVisionTextProcessor(build_processor(self.model_name))
            else:
                from lightning_tokens.models.tokenizers import resolve_tokenizer

                encoder = self._build_vision_encoder()
                self._processor = GVTProcessor(
                    resolve_tokenizer(self.tokenizer_name), encoder.transform, self.resampler_settings.num_latents
                )
        return self._processor

    @property
    @override
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _build_vision_encoder(self) -> nn.Module:
        if self.vision_encoder is None:
            from lightning_tokens.models.vision import build_vision_encoder

            s = self.vision_settings
            encoder = build_vision_encoder(s.name, s.pretrained, s.image_size, s.checkpoint, s.overrides)
            self.vision_encoder = encoder.eval().requires_grad_(False)
        return self.vision_encoder

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self._hf_vlm:
            self._configure_hf_model()
            return
        self._build_vision_encoder()
        super().configure_model()  # builds the connector (build_extra_modules), then shards under FSDP2

    @override
    def build_extra_modules(self) -> None:
        """The GVT connector (and a frozen reference model's), built before FSDP2 sharding so the root unit
        owns its parameters."""
        if self._hf_vlm:
            return
        width = self.causal_lm.get_input_embeddings().weight.shape[1]
        self.connector = VisualConnector(self.vision_encoder.num_features, width, self.resampler_settings)
        self._load_exported_connector()
        if self.reference is not None:  # again: the EMA average takes in the connector
            self.reference.setup(self)
        if self.reference_model is not None:
            # a frozen reference model scores with the connector it was exported with (else the starting one)
            self.reference_connector = copy.deepcopy(self.connector).requires_grad_(False)
            settings = getattr(self.reference, "settings", None)
            reference_path = getattr(settings, "model", None)
            if reference_path and reference_path != self.model_name:
                self._load_exported_connector(reference_path, self.reference_connector)

    def _load_exported_connector(self, folder: str | None = None, connector: nn.Module | None = None) -> None:
        """A folder written by :meth:`save_pretrained` holds the trained connector beside the LM: start from it
        (the next stage of a recipe, e.g. GRPO after SFT, names the exported folder as its ``model``)."""
        import os

        path = os.path.join(os.path.expanduser(folder or self.model_name), CONNECTOR_FILE)
        if not os.path.isfile(path):
            return
        from safetensors.torch import load_file

        connector = self.connector if connector is None else connector
        state = load_file(path)
        expected = connector.state_dict()
        mismatched = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
        if mismatched or set(state) - set(expected):
            raise ConfigError(
                f"{path} was saved with another vision/resampler shape (first mismatch: {(mismatched or sorted(set(state) - set(expected)))[0]}): "
                "use the vision and resampler settings of the run that exported it."
            )
        connector.load_state_dict(state)

    def reference_parameters(self) -> dict[str, nn.Parameter]:
        """What an EMA reference averages: the language model's parameters and the connector's (``connector.``)."""
        params = dict(self.model.named_parameters()) if self.model is not None else {}
        if self.connector is not None:
            params.update({f"connector.{name}": p for name, p in self.connector.named_parameters()})
        return params

    @override
    def prepare_language_model(self, model: nn.Module) -> nn.Module:
        """Room for the image tokens in the vocabulary (new rows: the mean embedding); frozen unless trained."""
        if model.get_input_embeddings().weight.shape[0] < len(self.tokenizer):
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=True)
        if self.lora is None and not self.train_language_model:
            model.requires_grad_(False)
        return model

    def _configure_hf_model(self) -> None:
        from lightning_tokens.models.vision_language import load_vision_language_model

        dtype = getattr(torch, self.dtype_name) if self.dtype_name else None
        # QLoRA quantizes the language model: the frozen vision tower and the trained projector keep their dtype
        # (plain names: older transformers match substrings; "(?:.*\.)?name": newer ones match from the start)
        names = (*_VISION_TOWER_NAMES, *_PROJECTOR_NAMES)
        skip = ["lm_head", *names, *(rf"(?:.*\.)?{name}" for name in names)]
        quantization = bnb_config(self.quantization, dtype, skip) if self.quantization else None
        model = load_vision_language_model(self.model_name, self.processor.processor, self.model_config, dtype, quantization)
        model.train()
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.lora is None and not self.train_language_model:
            model.requires_grad_(False)
            for name, module in model.named_modules():
                if name.split(".")[-1] in _PROJECTOR_NAMES:
                    module.requires_grad_(True)
        else:
            vision = _hf_vision_tower(model)
            if vision is not None:
                vision.requires_grad_(False)
            for name, module in model.named_modules():  # Qwen2-VL's projector (merger) sits inside the tower
                if name.split(".")[-1] in _PROJECTOR_NAMES:
                    module.requires_grad_(True)
        if self.lora is not None:
            projectors = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n.split(".")[-1] in _PROJECTOR_NAMES})
            model = _add_lora(model, _language_model_lora(self.lora), quantized=self.quantization is not None,
                              modules_to_save=projectors or None)
        self.model = model
        if self.reference is not None:
            self.reference.setup(self)
        self.apply_sharding()

    @override
    def shard_units(self, mesh: Any) -> None:
        """FSDP2 units below the root: the decoder layers of the model (and reference), the vision tower's blocks
        (frozen, gathered under ``no_grad`` like the reference's), and the GVT connectors' resampler layers."""
        super().shard_units(mesh)
        for lm in (self.model, self.reference_model):
            tower = _hf_vision_tower(lm) if self._hf_vlm and lm is not None else None
            if tower is not None:
                shard_modules(vision_blocks(tower), mesh)
        if self.vision_encoder is not None:
            shard_modules(vision_blocks(self.vision_encoder), mesh)
        for connector in (self.connector, self.reference_connector):
            if connector is not None:
                shard_modules(resampler_blocks(connector.resampler), mesh)

    @override
    def train(self, mode: bool = True) -> VisionLanguageLM:
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()  # frozen, batch-norm statistics included
        return self

    # ---- forward ---------------------------------------------------------------------------------
    def visual_tokens(self, pixel_values: Tensor, connector: nn.Module | None = None) -> Tensor:
        """``(M, num_latents, lm_width)`` visual tokens of ``M`` images (GVT composition)."""
        connector = self.connector if connector is None else connector
        with torch.no_grad():
            features = self.vision_encoder(pixel_values)
        return connector(features.to(connector.proj.weight.dtype))

    @override
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        causal_lm: nn.Module | None = None,
        embedding_mix: dict[str, Tensor] | None = None,
        pixel_values: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Final hidden states ``(B, T, D)``, images spliced in (see :class:`TokenLM.forward`)."""
        lm = self.causal_lm if causal_lm is None else causal_lm
        if self._hf_vlm:
            if embedding_mix is not None:
                raise ConfigError(
                    "input-embedding mixing (Intuitive Fine-Tuning) is not available for Hugging Face "
                    "vision-language models, which embed their own inputs: use the GVT composition."
                )
            inner = getattr(lm, "model", lm)
            out = inner(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False, **kwargs)
            return out.last_hidden_state
        embeds = self.input_embeddings(input_ids, pixel_values, lm, embedding_mix)
        decoder = lm.get_decoder()
        return decoder(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state

    def input_embeddings(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        causal_lm: nn.Module | None = None,
        embedding_mix: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """The LM's input embeddings with each image's visual tokens at its placeholders (GVT composition)."""
        lm = self.causal_lm if causal_lm is None else causal_lm
        embedding = lm.get_input_embeddings()
        embeds = embedding(input_ids) if embedding_mix is None else mix_input_embeddings(embedding, input_ids, embedding_mix)
        placeholder = self.processor.placeholder_id
        if pixel_values is None:
            if bool((input_ids == placeholder).any()):
                raise ConfigError("the prompts hold image placeholders but the batch has no pixel_values.")
            return embeds
        connector = self.reference_connector if lm is self.reference_model and self.reference_connector is not None else None
        return splice_visual_tokens(embeds, input_ids, placeholder, self.visual_tokens(pixel_values, connector))

    @override
    def hidden_states(self, batch: dict[str, Any], causal_lm: nn.Module | None = None) -> Tensor:
        extra = {k: batch[k] for k in ("position_ids", *_IMAGE_KEYS) if k in batch}
        return self(
            batch["input_ids"], batch.get("attention_mask"), causal_lm=causal_lm, embedding_mix=batch.get(EMBEDDING_MIX), **extra
        )

    # ---- generation ------------------------------------------------------------------------------
    @override
    @torch.no_grad()
    def generate_ids(self, batch: dict[str, Any], **options: Any) -> Tensor:
        """New token ids after the left-padded prompts of a batch, with their images (see :meth:`TokenLM.generate_ids`)."""
        tok = self.tokenizer
        prompt, mask = batch["prompt_input_ids"], batch.get("prompt_attention_mask")
        options = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **options)
        # a sampled image token in a completion would break the image/placeholder count of its training row
        options.setdefault("suppress_tokens", self.image_token_ids())
        with gathered_root(self):
            if self._hf_vlm:
                images = {k: batch[k] for k in _IMAGE_KEYS if k in batch and k != "mm_token_type_ids"}
                if "prompt_mm_token_type_ids" in batch:
                    images["mm_token_type_ids"] = batch["prompt_mm_token_type_ids"]
                generated = self.causal_lm.generate(input_ids=prompt, attention_mask=mask, **images, **options)
                return generated[:, prompt.shape[1] :]
            embeds = self.input_embeddings(prompt, batch.get("pixel_values"))
            # from inputs_embeds alone, generate returns the new tokens only
            return self.causal_lm.generate(inputs_embeds=embeds, attention_mask=mask, **options)

    def image_token_ids(self) -> list[int]:
        """Ids of the tokens that mark or hold images (placeholders, delimiters), which generation never emits."""
        if not self._hf_vlm:
            tok = self.tokenizer
            return [tok.convert_tokens_to_ids(t) for t in (IMAGE_START, IMAGE_PLACEHOLDER, IMAGE_END)]
        config = self.causal_lm.config
        names = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "fake_image_token_id", "global_image_token_id")
        found = (getattr(config, name, None) for name in names)
        return sorted({int(i) for i in found if isinstance(i, int) and i >= 0})

    @override
    def repeat_prompts(self, batch: dict[str, Any], repeats: int) -> dict[str, Any]:
        """The prompts, their images and image layout keys, each repeated ``repeats`` times in a row."""
        out = super().repeat_prompts(batch, repeats)
        out.update(repeat_image_inputs(batch, repeats))
        if "prompt_mm_token_type_ids" in batch:
            out["prompt_mm_token_type_ids"] = batch["prompt_mm_token_type_ids"].repeat_interleave(repeats, 0)
        return out

    @override
    def rollout_inputs(self, batch: dict[str, Any], repeats: int, input_ids: Tensor, prompt_mask: Tensor) -> dict[str, Tensor]:
        """The images of the rows (repeated), and for Qwen2-VL the rows' ``mm_token_type_ids``: the prompt's,
        without its left padding, then 0 on the completion."""
        out = repeat_image_inputs(batch, repeats)
        if "prompt_mm_token_type_ids" in batch:
            types = batch["prompt_mm_token_type_ids"].repeat_interleave(repeats, 0)
            rows = torch.zeros_like(input_ids)
            for i, (row_types, keep) in enumerate(zip(types, prompt_mask.bool())):
                kept = row_types[keep.to(row_types.device)]
                rows[i, : kept.shape[0]] = kept
            out["mm_token_type_ids"] = rows
        return out

    @override
    def save_pretrained(self, path: str) -> None:
        """The language model (or its LoRA adapter) and tokenizer in Hugging Face format, plus, for the GVT
        composition, ``connector.safetensors`` (resampler and projections)."""
        super().save_pretrained(path)
        if self.connector is not None:
            import os

            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.connector.state_dict().items()}, os.path.join(path, CONNECTOR_FILE))


def _hf_vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision tower of a Hugging Face VLM (Qwen2-VL ``visual``, LLaVA ``vision_tower``, Idefics3
    ``vision_model``), also under peft; ``None`` if none is found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    for name in _VISION_TOWER_NAMES:
        tower = getattr(inner, name, None)
        if tower is not None:
            return tower
    return None


def _language_model_lora(settings: LoRASettings) -> LoRASettings:
    """``all-linear`` on a VLM would adapt the vision tower too: keep LoRA on the language model's layers."""
    if settings.target_modules != "all-linear":
        return settings
    pattern = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    return dataclasses.replace(settings, target_modules=pattern)
