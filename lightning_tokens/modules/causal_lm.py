"""`TokenLM`: any Hugging Face causal LM as a LightningModule on the token-loss pipeline."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.loss import TokenLossMixin
from lightning_tokens.core.method import token_methods
from lightning_tokens.core.reference import ReferenceSettings, build_reference
from lightning_tokens.core.stats import OutputHead
from lightning_tokens.models.presets import check_model_source, is_preset, load_causal_lm
from lightning_tokens.modules.checkpoints import load_provider_state, provider_state_for_checkpoint
from lightning_tokens.modules.corda import (
    CordaInitialAdapter,
    CordaSettings,
    add_corda_lora,
    check_corda_initialised,
    check_lora_init,
    save_corda_adapter,
)
from lightning_tokens.modules.lazy_backends import hide_unused_bitsandbytes, import_peft
from lightning_tokens.modules.quantization import (
    QuantizationMode,
    bnb_config,
    bnb_precision_plugin,
    check_quantization,
    prepare_precision_plugin,
    quantize_for_precision,
)
from lightning_tokens.modules.sharding import gathered_root, shard_decoder_layers, shard_root, sharding_mesh


@dataclass
class LoRASettings:
    """LoRA adapters through peft (every field maps to ``peft.LoraConfig``).

    Attributes:
        r: rank of the update matrices.
        alpha: scaling numerator (``lora_alpha``); the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"``.
        bias: which biases train: ``"none"``, ``"all"`` or ``"lora_only"``.
        init: initial adapter values: ``default`` (A Kaiming-uniform, B zero), ``gaussian`` (A normal with
            std 1/r), ``corda`` (CorDA: A, B from a decomposition of each weight in the context of calibration
            data, the base weight replaced by the residual; see :mod:`lightning_tokens.modules.corda`).
        corda: CorDA's options (mode ipm / kpm, calibration, cache) when ``init`` is ``corda``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    init: Literal["default", "gaussian", "corda"] = "default"
    corda: CordaSettings | None = None


@dataclass
class OptimizerSettings:
    """AdamW with linear warm-up and cosine decay to ``min_lr_ratio · lr``.

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (not applied to biases and norms).
        betas: Adam betas.
        warmup: warm-up steps, or a fraction of the total steps when below 1.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: float = 0.05
    min_lr_ratio: float = 0.1


def adamw_with_schedule(
    named_parameters: Iterable[tuple[str, Tensor]],
    settings: OptimizerSettings,
    trainer: pl.Trainer,
    no_decay: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """``configure_optimizers``' return value for ``settings``: AdamW over the trainable parameters (no weight
    decay on biases, norms and the names ``no_decay`` picks; the fused kernel on CUDA) and linear warm-up, then
    cosine decay to ``min_lr_ratio · lr`` over the trainer's optimizer steps, stepped every step.

    Example::

        def configure_optimizers(self):
            return adamw_with_schedule(self.named_parameters(), self.optimizer_settings, self.trainer)
    """
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    decay, plain = [], []
    for name, param in named_parameters:
        if param.requires_grad:
            exempt = param.dim() < 2 or "norm" in name.lower() or (no_decay is not None and no_decay(name))
            (plain if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    # the fused CUDA kernel updates in place: no parameter-sized temporaries at the step's peak
    fused = all(p.is_cuda for group in groups for p in group["params"]) and bool(decay or plain)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), fused=fused or None)
    total = max(int(trainer.estimated_stepping_batches), 1)
    warmup = int(settings.warmup * total) if settings.warmup < 1 else int(settings.warmup)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(  # a warm-up longer than the run stays a warm-up
        optimizer, num_warmup_steps=warmup, num_training_steps=max(total, warmup + 1), min_lr_rate=settings.min_lr_ratio
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


#: Batch key of the input-embedding mix a pre-forward method asks for: ``{"tokens": LongTensor (B, T),
#: "weight": FloatTensor (B, T)}``; modules built on :class:`TokenLM` run the decoder on
#: ``(1 - weight)·E(input_ids) + weight·E(tokens)`` (see :func:`mix_input_embeddings`).
EMBEDDING_MIX = "embedding_mix"


def mix_input_embeddings(embedding: torch.nn.Module, input_ids: Tensor, mix: dict[str, Tensor]) -> Tensor:
    """``(1 - w)·E(input_ids) + w·E(tokens)`` per position, the ``embedding_mix`` contract.

    Computed in float32 and cast back to the embedding's dtype, so that ``w = 0`` returns ``E(input_ids)``
    bit for bit (the decoder then sees exactly what ``input_ids`` would give it). Gradients reach the
    embedding rows of both ids (scaled by ``1 - w`` and ``w``).

    Args:
        embedding: the input embedding module (``model.get_input_embeddings()``).
        input_ids: ``(B, T)`` ids.
        mix: ``{"tokens": (B, T) ids, "weight": (B, T) floats}``.

    Example:
        >>> emb = torch.nn.Embedding(3, 1, _weight=torch.tensor([[0.0], [1.0], [2.0]]))
        >>> mix_input_embeddings(emb, torch.tensor([[0, 1]]), {"tokens": torch.tensor([[2, 2]]), "weight": torch.tensor([[0.0, 0.25]])}).squeeze(-1).tolist()
        [[0.0, 1.25]]
    """
    tokens, weight = mix.get("tokens"), mix.get("weight")
    if tokens is None or weight is None:
        raise ConfigError(f"batch['{EMBEDDING_MIX}'] must hold 'tokens' and 'weight', got keys {sorted(mix)}.")
    if tokens.shape != input_ids.shape or weight.shape != input_ids.shape:
        raise ConfigError(
            f"batch['{EMBEDDING_MIX}'] has tokens {tuple(tokens.shape)} and weight {tuple(weight.shape)} but input_ids "
            f"have {tuple(input_ids.shape)}: both must be indexed like input_ids, (batch, sequence)."
        )
    base = embedding(input_ids)
    other = embedding(tokens.to(input_ids.device))
    w = weight.to(device=base.device, dtype=torch.float32).unsqueeze(-1)
    return ((1.0 - w) * base.float() + w * other.float()).to(base.dtype)


# checkpoints store these in hparams; allow them under torch.load(weights_only=True)
torch.serialization.add_safe_globals([LoRASettings, OptimizerSettings, ReferenceSettings, CordaSettings])


class TokenLM(TokenLossMixin, pl.LightningModule):
    """A causal language model trained through the token-loss pipeline.

    Features:
        - ``model``: a preset built from config with random weights (offline default, e.g. ``tiny-llama``),
          a local checkpoint folder, or a Hugging Face hub id (used when the weights are available).
        - The model is created in ``configure_model``, so FSDP / ModelParallel strategies can wrap it.
        - Loss from final hidden states and the output head with the fused token ops (no
          ``(tokens × vocab)`` logits), token methods from ``trainer.callbacks``, exact token-mean
          reduction under gradient accumulation and data parallelism.
        - Optional LoRA (peft) and 4/8-bit loading (transformers' ``BitsAndBytesConfig``).
        - AdamW, warm-up + cosine schedule.
        - Logs ``train/loss``, ``train/tokens_per_sec``, ``train/lr``, what each method kept,
          ``val/loss``; with a datamodule that provides ``build_metrics``, validation generates answers
          and logs its metrics (e.g. NUPA exact match).
        - ``predict`` generates answers for prompt batches (``prompt_input_ids``, ``prompts``).

    Args:
        model: preset name, local folder, or hub id.
        tokenizer: ``"char"`` (built in code), a local folder or a hub id; defaults to ``model`` for
            pretrained models and must be given for presets.
        model_config: overrides of the preset's config (e.g. ``{"num_hidden_layers": 4}``) or extra
            ``from_pretrained`` keyword arguments.
        lora: LoRA settings, ``None`` for full fine-tuning.
        quantization: load the pretrained weights in 4-bit (``nf4``, ``nf4-dq``, ``fp4``) or ``int8``.
        optimizer: AdamW and schedule settings.
        dtype: dtype to load weights in (e.g. ``"bfloat16"``); ``None`` keeps float32.
        gradient_checkpointing: recompute activations in backward.
        max_new_tokens: generation length in validation/predict (default: the datamodule's).
        generate_in_validation: score generated answers with the datamodule's metrics.
        loss_backend: fused token-loss backend: ``auto`` (Liger on CUDA when installed, else chunked
            torch), ``torch`` or ``liger``.
        reference: reference / history model for methods that need one (Rho-1, ssToken...): modes
            ``adapter_disabled``, ``model``, ``ema``, ``offline`` (see :mod:`lightning_tokens.core.reference`).

    Example::

        model = TokenLM(model="tiny-llama", tokenizer="char")
        trainer = L.Trainer(max_steps=100, callbacks=[DFT()])
        trainer.fit(model, datamodule=NUPADataModule(tasks="Integer/add"))
    """

    def __init__(
        self,
        model: str = "tiny-llama",
        tokenizer: str | None = None,
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
        super().__init__()
        check_model_source(model)
        if tokenizer is None and is_preset(model):
            raise ConfigError(f"model={model!r} is built from config: set `tokenizer` (e.g. tokenizer: char).")
        if quantization is not None:
            check_quantization(quantization)
        if reference is not None:
            reference.validate(has_lora=lora is not None)
        if lora is not None:
            check_lora_init(lora, quantization, reference)
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32.")
        self.save_hyperparameters()
        self.model_name = model
        self.tokenizer_name = tokenizer or model
        self.model_config = model_config
        self.lora = lora
        self.quantization = quantization
        self.optimizer_settings = optimizer or OptimizerSettings()
        self.dtype_name = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.max_new_tokens = max_new_tokens
        self.generate_in_validation = generate_in_validation
        self.token_loss_backend = loss_backend
        self.reference = build_reference(reference) if reference is not None else None
        self.reference_model: torch.nn.Module | None = None
        self.model: torch.nn.Module | None = None
        self.corda_initial: CordaInitialAdapter | None = None  # lora.init=corda: A0, B0 (buffers, checkpointed)
        self._tokenizer = None
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_metrics = None
        self.test_metrics = None
        self._throughput_clock: float | None = None

    # ---- construction ----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lightning_tokens.models.tokenizers import resolve_tokenizer

            self._tokenizer = resolve_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _load_causal_lm(self, name: str, overrides: dict[str, Any] | None, quantization: str | None) -> torch.nn.Module:
        dtype = getattr(torch, self.dtype_name) if self.dtype_name else None
        return load_causal_lm(
            name,
            vocab_size=len(self.tokenizer),
            overrides=overrides,
            dtype=dtype,
            quantization_config=bnb_config(quantization, dtype) if quantization else None,
        )

    def load_frozen_causal_lm(
        self, name: str, overrides: dict[str, Any] | None = None, quantization: str | None = None
    ) -> torch.nn.Module:
        """A frozen causal LM (eval mode, no gradients) for this module's vocabulary and dtype: the
        ``model`` reference mode's (:class:`~lightning_tokens.core.reference.ReferenceHost`)."""
        if quantization:
            check_quantization(quantization)
        return self._load_causal_lm(name, overrides, quantization).eval().requires_grad_(False)

    @property
    def strategy(self) -> Strategy | None:
        """The attached trainer's strategy, ``None`` outside a trainer (e.g. offline scoring)."""
        return self._trainer.strategy if self._trainer is not None else None

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self._load_causal_lm(self.model_name, self.model_config, self.quantization)
        _check_output_head(model)
        model = self.prepare_language_model(model)
        if model.get_input_embeddings().weight.shape[0] < len(self.tokenizer):
            raise ConfigError(
                f"the tokenizer has {len(self.tokenizer)} tokens but model {self.model_name!r} has only "
                f"{model.get_input_embeddings().weight.shape[0]} embeddings: use the model's own tokenizer."
            )
        model.train()  # from_pretrained returns eval mode; Lightning keeps submodules' modes as found
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        plugin = bnb_precision_plugin(self)
        if plugin is not None:  # Lightning's BitsandbytesPrecision: quantize before LoRA
            model = quantize_for_precision(model, plugin)
        if self.lora is not None:
            model = _add_lora(model, self.lora, quantized=self.quantization is not None, host=self,
                              modules_to_save=self.lora_modules_to_save())
        self.model = model
        if self.reference is not None:
            self.reference.setup(self)
        self.build_extra_modules()
        self.apply_sharding()

    def build_extra_modules(self) -> None:
        """Hook at the end of :meth:`configure_model`, after the language model and the reference are built
        and before FSDP2 sharding: subclasses create the modules they add beside the language model here (a
        vision connector), so that the sharded root unit owns their parameters. The default adds none.

        Example::

            class WithHead(TokenLM):
                def build_extra_modules(self) -> None:
                    self.extra_head = torch.nn.Linear(self.causal_lm.config.hidden_size, 1)
        """

    def apply_sharding(self) -> None:
        """Under ``ModelParallelStrategy``, ``fully_shard`` the units of :meth:`shard_units`, then this module
        as the root (every parameter not in a unit); without a device mesh, nothing. Call it once, after every
        submodule exists."""
        mesh = sharding_mesh(self)
        if mesh is not None:  # ModelParallelStrategy: FSDP2, decoder layers as units, this module as root
            self.shard_units(mesh)
            shard_root(self, mesh)

    def shard_units(self, mesh: Any) -> None:
        """``fully_shard`` the wrapping units below the root over ``mesh``: the decoder layers of the model and
        of a reference model. Subclasses add theirs (a vision tower's blocks) and call this.

        Example::

            def shard_units(self, mesh):
                super().shard_units(mesh)
                for block in self.extra_tower.blocks:
                    fully_shard(block, mesh=mesh)
        """
        shard_decoder_layers(self.model, mesh)
        if self.reference_model is not None:
            shard_decoder_layers(self.reference_model, mesh)

    def prepare_language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Hook between loading the language model and adding LoRA / quantized layers (subclasses grow the
        vocabulary or freeze parts here); the default keeps the model as loaded."""
        return model

    def lora_modules_to_save(self) -> list[str] | None:
        """Modules of the language model that train in full beside the LoRA adapters (peft's
        ``modules_to_save``): none by default; a module that grows the vocabulary returns its embeddings and
        head here."""
        return None

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The underlying transformers model (with LoRA layers injected, if any)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @override
    def setup(self, stage: str) -> None:
        prepare_precision_plugin(self)  # checks and set-up for Lightning's BitsandbytesPrecision, if used
        datamodule = getattr(self.trainer, "datamodule", None)
        build = getattr(datamodule, "build_metrics", None)
        if build is not None and self.val_metrics is None:
            self.val_metrics = build("val/")
            self.test_metrics = build("test/")

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        causal_lm: torch.nn.Module | None = None,
        embedding_mix: dict[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Final hidden states ``(B, T, D)`` of this model, or of ``causal_lm`` (a reference model); the
        output head is applied by the token loss.

        Every forward, the reference's included, goes through here: under FSDP2 this module is the root
        unit, whose forward gathers the embeddings, norms and output heads of both models.

        ``embedding_mix`` (``{"tokens": (B, T) ids, "weight": (B, T)}``): the decoder runs on
        ``inputs_embeds = (1 - w)·E(input_ids) + w·E(tokens)`` (:func:`mix_input_embeddings`), ``E`` being
        the input embeddings of the model that runs.
        """
        decoder = (self.causal_lm if causal_lm is None else causal_lm).get_decoder()
        if embedding_mix is not None:
            inputs_embeds = mix_input_embeddings(decoder.get_input_embeddings(), input_ids, embedding_mix)
            return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state

    def hidden_states(self, batch: dict[str, Any], causal_lm: torch.nn.Module | None = None) -> Tensor:
        """Final hidden states of a batch, from this model or another causal LM (a reference).

        Honours ``batch["embedding_mix"]`` (:data:`EMBEDDING_MIX`, written by Intuitive Fine-Tuning before
        the forward) for every model that runs, references included: a reference provider scores the same
        mixed inputs the policy trains on, so per-token comparisons (excess loss, KL) share their context.
        Offline reference scores were computed on the clean inputs. Drop the key for a clean forward.
        """
        extra = {k: batch[k] for k in ("position_ids",) if k in batch}
        if batch.get(EMBEDDING_MIX) is not None:
            extra["embedding_mix"] = batch[EMBEDDING_MIX]
        return self(batch["input_ids"], batch.get("attention_mask"), causal_lm=causal_lm, **extra)

    def output_head(self) -> OutputHead:
        return OutputHead.from_module(self.causal_lm.get_output_embeddings())

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        return self.language_model_loss(batch)[0]

    def language_model_loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The language model's token loss of a batch (with the reference's statistics when a training method
        needs them) and the final hidden states it was computed from, for subclasses that add terms on them."""
        reference = None
        training = self._trainer is not None and self.trainer.training
        if self.reference is not None and training and any(m.requires_reference for m in token_methods(self.trainer)):
            # before the training forward: the EMA provider swaps weights in and out
            reference = self.reference.stats(batch, self)
        hidden = self.hidden_states(batch)
        head = self.causal_lm.get_output_embeddings()
        return self.token_loss(batch["labels"], hidden=hidden, head=head, batch=batch, reference=reference), hidden

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self._log_throughput(batch)
        return loss

    def _log_throughput(self, batch: dict[str, Any]) -> None:
        now = time.perf_counter()
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())
        if self._throughput_clock is not None:
            elapsed = max(now - self._throughput_clock, 1e-9)
            self.log("train/tokens_per_sec", tokens.float() * self.trainer.world_size / elapsed, prog_bar=True)
        self._throughput_clock = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0)

    @override
    def on_fit_end(self) -> None:
        final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if final:
            rank_zero_info("final validation: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))

    @override
    def on_train_epoch_start(self) -> None:
        self._throughput_clock = None

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_metrics, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_metrics, "test")

    def _evaluate(self, batch: dict[str, Any], loss_metric: MeanMetric, metrics: Any, prefix: str) -> None:
        labels = batch["labels"]
        count = (labels[:, 1:] != -100).sum()
        loss_metric.update(self._loss(batch), weight=count.clamp(min=1))
        self.log(f"{prefix}/loss", loss_metric, prog_bar=True, batch_size=labels.shape[0])
        if metrics is not None and self.generate_in_validation and "prompt_input_ids" in batch:
            answers = [self.trainer.datamodule.extract_answer(text) for text in self.generate(batch)]
            metrics.update(answers, batch["answers"], batch["domains"])
            self.log_dict(metrics, prog_bar=True, batch_size=labels.shape[0])

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, str]]:
        outputs = self.generate(batch)
        datamodule = getattr(self.trainer, "datamodule", None)
        extract = getattr(datamodule, "extract_answer", None)
        return [
            {"prompt": prompt, "output": text, **({"answer": extract(text)} if extract else {})}
            for prompt, text in zip(batch["prompts"], outputs)
        ]

    def generation_budget(self, max_new_tokens: int | None = None) -> int:
        """New tokens to generate: the argument, else ``max_new_tokens`` of this module, else the attached
        datamodule's ``generation_max_new_tokens``, else 32 (also outside a trainer)."""
        if max_new_tokens is not None:
            return max_new_tokens
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return self.max_new_tokens or getattr(datamodule, "generation_max_new_tokens", 32)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of the left-padded ``prompt_input_ids`` of a batch, decoded."""
        new = self.generate_ids(batch, max_new_tokens=self.generation_budget(max_new_tokens), do_sample=False)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, batch: dict[str, Any], **options: Any) -> Tensor:
        """The new token ids ``(N, C)`` generated after the left-padded ``prompt_input_ids`` of ``batch``.

        ``options`` go to Hugging Face ``generate`` (``max_new_tokens``, ``do_sample``, ``temperature``...);
        padding and end-of-sequence ids are the tokenizer's. Subclasses that feed more than token ids (images)
        override this, so greedy evaluation and GRPO's sampling share it.
        """
        prompt = batch["prompt_input_ids"]
        tok = self.tokenizer
        with gathered_root(self):
            generated = self.causal_lm.generate(
                input_ids=prompt, attention_mask=batch.get("prompt_attention_mask"),
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **options,
            )
        return generated[:, prompt.shape[1] :]

    def repeat_prompts(self, batch: dict[str, Any], repeats: int) -> dict[str, Any]:
        """The generation inputs of ``batch`` with each prompt repeated ``repeats`` times in a row (GRPO's
        groups): ``prompt_input_ids`` and ``prompt_attention_mask`` here; subclasses add their inputs."""
        return {key: batch[key].repeat_interleave(repeats, 0) for key in ("prompt_input_ids", "prompt_attention_mask")}

    def rollout_inputs(self, batch: dict[str, Any], repeats: int, input_ids: Tensor, prompt_mask: Tensor) -> dict[str, Tensor]:
        """Model inputs besides token ids for training rows built from the prompts of ``batch`` (each repeated
        ``repeats`` times) followed by their completions: none for a text LM; images for a vision-language one.

        Args:
            batch: the prompt batch.
            repeats: rows per prompt.
            input_ids: ``(N, L)`` the rows (prompt without its left padding, then the completion).
            prompt_mask: ``(N, P)`` the repeated prompts' attention mask.
        """
        return {}

    # ---- optimisation ----------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(self.named_parameters(), self.optimizer_settings, self.trainer)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.reference is not None:
            self.reference.on_optimizer_step(self)

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None:
            checkpoint["reference_provider"] = provider_state_for_checkpoint(self.reference, checkpoint, self.trainer)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference is not None and "reference_provider" in checkpoint:
            load_provider_state(self.reference, self, checkpoint["reference_provider"], self.trainer)
        _drop_training_only_heads(self, checkpoint)

    def save_pretrained(self, path: str) -> None:
        """Save in Hugging Face format with the tokenizer: the LoRA adapter alone (peft's format) when
        LoRA is on, the full model otherwise."""
        if self.model is None:
            raise RuntimeError("save_pretrained: the model is not built yet; call configure_model() or fit first.")
        if self.corda_initial is not None:  # CorDA changed the base weights: peft's conversion to plain LoRA
            save_corda_adapter(self, path)
        else:
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @override
    def on_fit_start(self) -> None:
        self._save_tokenizer()

    @override
    def on_train_start(self) -> None:
        check_corda_initialised(self)  # after any checkpoint restore, whatever the strategy

    @rank_zero_only
    def _save_tokenizer(self) -> None:
        callback = self.trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            self.tokenizer.save_pretrained(os.path.join(dirpath, "tokenizer"))


def _add_lora(
    model: torch.nn.Module, settings: LoRASettings, quantized: bool, host: TokenLM | None = None,
    modules_to_save: list[str] | None = None,
) -> torch.nn.Module:
    peft = import_peft()
    if quantized:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        task_type="CAUSAL_LM",
        init_lora_weights="gaussian" if settings.init == "gaussian" else True,
        modules_to_save=modules_to_save,  # trained in full beside the adapters (a VLM's projector)
        # a tied embedding and head trained in full stay one matrix (DualSpeechLM's grown vocabulary)
        ensure_weight_tying=bool(modules_to_save) and bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)),
    )
    with hide_unused_bitsandbytes(), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning we cannot fix here)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if settings.init == "corda":
            if host is None:  # CorDA needs the module: its trainer's data, tokenizer and checkpoints
                raise ConfigError("lora.init=corda is supported on TokenLM's own language model only: use lora.init: default.")
            model, host.corda_initial = add_corda_lora(host, model, config)
            return model
        return peft.get_peft_model(model, config)


#: Submodules that training callbacks attach (CAFT's auxiliary heads): inference does not use them.
_TRAINING_ONLY_HEADS = ("caft_heads",)


def _drop_training_only_heads(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Evaluating or predicting from a checkpoint without the callback that attached auxiliary heads: their
    weights are not needed (inference uses the trunk), so they are left out instead of failing strict loading."""
    state = checkpoint.get("state_dict", {})
    for name in _TRAINING_ONLY_HEADS:
        if getattr(module, name, None) is None and any(key.startswith(name + ".") for key in state):
            for key in [k for k in state if k.startswith(name + ".")]:
                del state[key]
            rank_zero_info(f"checkpoint: {name} (auxiliary training heads) left out; add their callback to train them.")


def _check_output_head(model: torch.nn.Module) -> None:
    """The fused loss applies ``hidden @ W.T + b``: refuse models whose logits are post-processed."""
    config = model.config
    for attribute in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, attribute, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(
                f"{type(model).__name__} post-processes its logits ({attribute}={value}); the fused token loss "
                "would score different probabilities. Such models are not supported yet."
            )
