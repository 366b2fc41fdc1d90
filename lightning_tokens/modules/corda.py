r"""
CorDA adapters for ``TokenLM``
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

CorDA (Yang et al., "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for
Task-Aware Parameter-Efficient Fine-tuning", NeurIPS 2024, arXiv 2406.05223; spec
``multimodal_methods.md`` §10) initialises each LoRA adapter from a decomposition of the weight *in the
context of the data*. For every adapted linear layer ``W`` (out × in), the inputs ``X`` of a few calibration
examples give a covariance ``C = mean_i X_iᵀX_i`` (each example's ``X_i`` scaled by ``|max X_i|``), damped to
``C_f = C + δ·mean(diag C)·I`` (``δ`` doubled from 0.01 until ``‖C_f C_f⁻¹ − I‖_F < 0.05``), and

.. math::

    W C_f = U S \hat V^\top, \qquad V = C_f^{-1} \hat V, \qquad W = U S V^\top,

    A_0 = \sqrt{S_r / s}\, V_r^\top, \qquad B_0 = U_r \sqrt{S_r / s}, \qquad W_{res} = W - s\, B_0 A_0,

with ``s = alpha / r``. **IPM** (instruction-previewed mode) keeps the top ``r`` components, those the
calibration context excites most: the adapter starts where the task lives, so fine-tuning converges
faster. **KPM** (knowledge-preserved mode) keeps the bottom ``r``: the components the calibration context
uses stay frozen in ``W_res``, so calibrate KPM on the knowledge to keep (the paper uses TriviaQA / NQ
questions; ``calibration_file``). Either way ``W_res + s·B₀A₀ = W``: the model computes what the base model
computes until the first update.

This module runs peft's own implementation (``peft.tuners.lora.corda.preprocess_corda`` and
``LoraLayer.corda_init``, peft 0.21.2): calibration batches come from the datamodule's training loader,
split into single examples with their padding dropped (peft's hook squeezes a batch dimension of one), or
from a JSON-lines file. The covariance and the decomposition can be cached on disk, keyed by a hash of what
they depend on (the model's weights, the adapted layers, the calibration tokens, and for the decomposition
the rank and mode), so a changed model, data or rank never reuses a stale file. peft's quirks are kept:
each example is scaled by ``|max X_i|`` (the absolute value of the largest entry, not the largest absolute
value), and a target's covariance is the mean over examples, whatever their lengths.

When. The decomposition needs data, so it runs in ``configure_model`` under ``trainer.fit`` (after
``setup``: the datamodule is attached), before any sharding. A resumed fit recomputes it (or reads it from
the cache) and then the checkpoint replaces its result with the saved residual and adapters.

Learning rate. ``A₀`` and ``B₀`` start large (``√(S/s)``), unlike LoRA's ``B = 0``, so one Adam step moves
``W`` by about ``lr·√(s·S)``: use a smaller learning rate than for LoRA (peft's CorDA example trains at
2e-5 with ``alpha = r``; ``configs/corda_smollm2_lora.yaml`` at 1e-4).

Checkpoints and export. CorDA changes the frozen base weights, which Lightning checkpoints in full, so a
resumed run, ``TokenLM.load_from_checkpoint`` and the ``export`` subcommand restore the trained model as it
was, whatever a new calibration would give. The initial adapter ``(A₀, B₀)`` is kept as buffers of the
module (``corda_initial``), so :func:`save_corda_adapter` can write what peft calls the converted adapter
(``save_pretrained(path_initial_model_for_weight_conversion=...)``): a plain rank-``2r`` LoRA adapter
``[A | A₀]``, ``[B | −B₀]`` that applies to the *original* base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.core.options import check_choice
from lightning_tokens.modules.lazy_backends import hide_unused_bitsandbytes, import_peft

if TYPE_CHECKING:
    from lightning_tokens.modules.causal_lm import LoRASettings, TokenLM

__all__ = [
    "CordaInitialAdapter",
    "CordaSettings",
    "add_corda_lora",
    "calibration_examples",
    "check_corda_initialised",
    "check_lora_init",
    "save_corda_adapter",
]

LORA_INITS = ("default", "gaussian", "corda")
CORDA_MODES = ("ipm", "kpm")


@dataclass
class CordaSettings:
    """CorDA's options (``lora.corda``; used with ``lora.init: corda``).

    Attributes:
        mode: ``ipm`` keeps the top-``r`` context components in the adapter (faster fine-tuning), ``kpm`` the
            bottom-``r`` (the components the calibration data use stay frozen: calibrate on the knowledge to
            keep).
        calibration_batches: training batches whose examples (one forward each, padding dropped) give the
            covariances. peft's guide: about ``hidden_size / tokens_per_example · 128`` examples.
        calibration_file: a JSON-lines file whose ``text`` fields are the calibration examples instead of the
            training batches (KPM's knowledge data); every line is used.
        max_tokens: cut each calibration example to its first ``max_tokens`` tokens (``None``: as given).
        cache_dir: folder for the covariance and decomposition files, named by a hash of everything they
            depend on, reused when it matches; ``None`` keeps nothing on disk.
        save_covariance: also cache the covariances (one ``in × in`` float32 matrix per adapted layer, about
            the size of the model; reused by other ranks and modes); the decomposition file (about the
            adapter's size) is cached whenever ``cache_dir`` is set.
        float16_covariance: accumulate the covariances in float16 (peft's ``use_float16_for_covariance``).

    Example::

        corda = CordaSettings(mode="ipm", calibration_batches=8, cache_dir="runs/corda_cache")
        model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(r=16, alpha=16, init="corda", corda=corda))
        L.Trainer(max_steps=100).fit(model, datamodule=NUPADataModule(tasks="Integer/add"))
    """

    mode: Literal["ipm", "kpm"] = "ipm"
    calibration_batches: int = 16
    calibration_file: str | None = None
    max_tokens: int | None = None
    cache_dir: str | None = None
    save_covariance: bool = True
    float16_covariance: bool = False

    def __post_init__(self) -> None:
        # jsonargparse turns `--model.init_args.lora.corda.cache_dir=null` into the string "None" (an optional
        # dataclass inside an optional dataclass): read it, and an empty value, as no path
        for name in ("cache_dir", "calibration_file"):
            if getattr(self, name) in ("", "None", "null"):
                setattr(self, name, None)


def check_lora_init(lora: LoRASettings, quantization: str | None = None, reference: Any = None) -> None:
    """Fail early (in ``TokenLM.__init__``) on a LoRA initialisation that cannot work, naming the field and the fix.

    Args:
        lora: the LoRA settings (``init``, ``corda``).
        quantization: ``TokenLM``'s ``quantization`` (CorDA needs float base weights).
        reference: ``TokenLM``'s ``ReferenceSettings`` (``adapter_disabled`` would be the residual model).
    """
    check_choice("LoRASettings", "init", lora.init, LORA_INITS)
    if lora.corda is not None and lora.init != "corda":  # as peft does; lets `--model.init_args.lora.init=default` switch it off
        rank_zero_warn(f"lora.corda is ignored: lora.init={lora.init!r} (set lora.init: corda to use it).")
    if lora.init != "corda":
        return
    settings = lora.corda or CordaSettings()
    check_choice("CordaSettings", "mode", settings.mode, CORDA_MODES, " (lora.corda.mode)")
    if int(settings.calibration_batches) < 1:
        raise ConfigError(f"lora.corda.calibration_batches={settings.calibration_batches} must be >= 1.")
    if settings.max_tokens is not None and int(settings.max_tokens) < 1:
        raise ConfigError(f"lora.corda.max_tokens={settings.max_tokens} must be >= 1 or null (examples as given).")
    if settings.calibration_file is not None and not os.path.isfile(settings.calibration_file):
        raise MissingFileError(f"lora.corda.calibration_file={settings.calibration_file!r} does not exist.")
    if lora.dropout > 0:
        rank_zero_warn(
            f"lora.dropout={lora.dropout} with lora.init=corda: dropout on the adapter's input now drops the weight "
            "components moved into the adapter (the largest ones under ipm), so training starts from a noisier model "
            "than the base (SmolLM2 on NUPA addition: first-step loss 4.38 instead of 3.51). peft's CorDA example uses 0."
        )
    if quantization is not None:
        raise ConfigError(
            f"lora.init=corda with quantization={quantization!r}: CorDA rewrites the base weights in float "
            "(W - s*B0*A0), which peft cannot do on quantized weights. Drop `quantization` (bfloat16 through "
            "`dtype` halves the memory) or use lora.init: default."
        )
    if getattr(reference, "mode", None) == "adapter_disabled":
        raise ConfigError(
            "reference.mode=adapter_disabled with lora.init=corda: with the adapters off, a CorDA model is the "
            "residual W - s*B0*A0, not the base model. Use reference.mode: model (the base as a separate frozen model)."
        )


class CordaInitialAdapter(torch.nn.Module):
    """The adapter as CorDA initialised it, ``A₀`` and ``B₀`` of every adapted layer, as buffers (so they
    travel in checkpoints), plus ``initialised``: false for a model built without calibration (to be filled
    from a checkpoint).

    Args:
        tensors: peft state-dict names (``...q_proj.lora_A.default.weight``) to tensors.
        initialised: whether the tensors come from a decomposition.
    """

    def __init__(self, tensors: dict[str, Tensor], initialised: bool) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", ":"), tensor)
        self.register_buffer("initialised", torch.tensor(initialised))
        self.info: dict[str, Any] = {}

    def adapter_state(self) -> dict[str, Tensor]:
        """peft state-dict name → initial tensor."""
        return {name.replace(":", "."): buffer for name, buffer in self.named_buffers() if name != "initialised"}


def _lora_tensors(peft_model: torch.nn.Module) -> dict[str, Tensor]:
    state = peft_model.state_dict()
    return {name: tensor.detach().clone() for name, tensor in state.items() if ".lora_A." in name or ".lora_B." in name}


# ---- calibration data ------------------------------------------------------------------------------
def _batch_examples(batch: dict[str, Any], max_tokens: int | None) -> list[dict[str, Tensor]]:
    """Single examples of a collated batch, padding (``attention_mask == 0``) dropped."""
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    if ids is None:  # prompt-only batches (GRPO's train_format=prompts)
        ids, mask = batch.get("prompt_input_ids"), batch.get("prompt_attention_mask")
    if not isinstance(ids, Tensor):
        raise DataError(f"lora.init=corda: a training batch has no `input_ids` tensor (keys {sorted(batch)}).")
    positions = batch.get("position_ids")
    examples = []
    for row in range(ids.shape[0]):
        keep = mask[row].bool() if isinstance(mask, Tensor) else torch.ones_like(ids[row], dtype=torch.bool)
        example = {"input_ids": ids[row][keep]}
        if isinstance(positions, Tensor):  # packed rows: the documents' own positions
            example["position_ids"] = positions[row][keep]
        if max_tokens is not None:
            example = {key: value[:max_tokens] for key, value in example.items()}
        if example["input_ids"].numel():
            examples.append(example)
    return examples


def _file_examples(host: TokenLM, path: str, max_tokens: int | None) -> list[dict[str, Tensor]]:
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(
                    f"{path}:{number}: a calibration line must be a JSON object with a `text` field ({error})."
                ) from None
            ids = host.tokenizer(text)["input_ids"][: max_tokens or None]
            if ids:
                examples.append({"input_ids": torch.tensor(ids, dtype=torch.long)})
    if not examples:
        raise DataError(f"lora.corda.calibration_file={path!r} has no non-empty `text` line.")
    return examples


def calibration_examples(host: TokenLM, settings: CordaSettings) -> list[dict[str, Tensor]]:
    """The calibration examples, one dict of 1-D tensors (``input_ids``, maybe ``position_ids``) each: the
    ``calibration_file``'s texts, or the first ``calibration_batches`` batches of the datamodule's training
    loader split into rows without their padding."""
    with torch.device("cpu"):  # configure_model runs under the root device's context; the data stay on the CPU
        return _calibration_examples(host, settings)


def _calibration_examples(host: TokenLM, settings: CordaSettings) -> list[dict[str, Tensor]]:
    if settings.calibration_file is not None:
        return _file_examples(host, settings.calibration_file, settings.max_tokens)
    trainer = host._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None or not callable(getattr(datamodule, "train_dataloader", None)):
        raise ConfigError(
            "lora.init=corda calibrates on training batches, and this run has no datamodule: fit with one "
            "(trainer.fit(model, datamodule=...), the CLI's `data:`) or set lora.corda.calibration_file."
        )
    examples: list[dict[str, Tensor]] = []
    for index, batch in enumerate(datamodule.train_dataloader()):
        if index >= settings.calibration_batches:
            break
        examples.extend(_batch_examples(batch, settings.max_tokens))
    if not examples:
        raise DataError("lora.init=corda: the training loader gave no calibration example.")
    return examples


# ---- cache keys ------------------------------------------------------------------------------------
def _weights_fingerprint(model: torch.nn.Module) -> str:
    """Cheap but specific: per tensor its name, shape, dtype, float64 sum and up to 64 strided entries."""
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(flat.numel() // 64, 1)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if flat.is_floating_point():
                digest.update(float(torch.sum(flat, dtype=torch.float64)).hex().encode())
            digest.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _examples_fingerprint(examples: list[dict[str, Tensor]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        for key in sorted(example):
            values = example[key].to(torch.int64).cpu()
            digest.update(f"{key}:{values.numel()}|".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _key(payload: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def _cache_paths(
    host: TokenLM,
    model: torch.nn.Module,
    config: Any,
    settings: CordaSettings,
    examples: list[dict[str, Tensor]],
    targets: list[tuple[str, Any]],
) -> tuple[str, str, dict[str, Any]]:
    """The covariance file (model, layers, calibration tokens), the decomposition file (that, rank and mode),
    and what their names hash."""
    peft = import_peft()
    covariance = {
        "peft": peft.__version__,
        "model": host.model_name,
        "weights": _weights_fingerprint(model),
        "targets": [(name, tuple(module.weight.shape)) for name, module in targets],
        "float16_covariance": bool(settings.float16_covariance),
        "calibration": _examples_fingerprint(examples),
        "examples": len(examples),
    }
    covariance_key = _key(covariance)
    decomposition = {
        "covariance": covariance_key, "r": config.r, "rank_pattern": dict(config.rank_pattern or {}), "mode": settings.mode
    }
    folder = os.path.abspath(settings.cache_dir)
    return (
        os.path.join(folder, f"corda-covariance-{covariance_key}.pt"),
        os.path.join(folder, f"corda-{settings.mode}-r{config.r}-{_key(decomposition)}.pt"),
        {**covariance, **decomposition},
    )


def _ready(path: str | None) -> bool:
    return path is not None and os.path.isfile(path) and os.path.getsize(path) > 0


# ---- building --------------------------------------------------------------------------------------
def add_corda_lora(host: TokenLM, model: torch.nn.Module, config: Any) -> tuple[torch.nn.Module, CordaInitialAdapter]:
    """``get_peft_model`` with CorDA's initialisation, and the initial adapter.

    Inside ``trainer.fit`` the decomposition runs (or is read from the cache); anywhere else (evaluation
    from a checkpoint, ``load_from_checkpoint``, export) the same structure is built with plain LoRA
    initial values and an uninitialised :class:`CordaInitialAdapter`, for the checkpoint to fill.

    Args:
        host: the ``TokenLM`` (its trainer's datamodule, tokenizer and ``lora.corda`` settings).
        model: the Hugging Face causal LM, in float32, float16 or bfloat16.
        config: the ``peft.LoraConfig`` built from ``host.lora``.
    """
    peft = import_peft()
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda, target_modules
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    settings = host.lora.corda or CordaSettings()
    config = _maybe_include_all_linear_layers(config, model)  # peft's corda hooks match names, not "all-linear"
    targets = list(target_modules(model, config))
    if not targets:
        raise ConfigError(
            f"lora.target_modules={host.lora.target_modules!r} selects no linear layer of {type(model).__name__}: "
            "name its projections (e.g. [q_proj, v_proj]) or use all-linear."
        )
    for name, module in targets:
        if module.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ConfigError(
                f"lora.init=corda needs float weights, but {name} holds {module.weight.dtype} (quantized by a "
                "precision plugin?): CorDA rewrites the base weights in float. Train unquantized or use lora.init: default."
            )
    corda_config = CordaConfig(corda_method=settings.mode, use_float16_for_covariance=settings.float16_covariance)
    trainer = host._trainer
    if trainer is None or trainer.state.fn != "fit":
        config.init_lora_weights = True
        peft_model = peft.get_peft_model(model, config)
        peft_model.peft_config["default"].init_lora_weights = "corda"
        peft_model.peft_config["default"].corda_config = corda_config
        initial = CordaInitialAdapter({name: torch.zeros_like(t) for name, t in _lora_tensors(peft_model).items()}, False)
        return peft_model, initial

    examples = calibration_examples(host, settings)
    covariance_path = decomposition_path = None
    description: dict[str, Any] = {}
    if settings.cache_dir is not None:
        covariance_path, decomposition_path, description = _cache_paths(host, model, config, settings, examples, targets)
    writes = trainer.is_global_zero
    temporary = f".{os.getpid()}.tmp"

    def peft_path(final: str | None, wanted: bool = True) -> str | None:
        """What peft reads (a finished file) or writes (a private file, renamed when complete), or nothing."""
        if final is None or _ready(final):
            return final
        return final + temporary if writes and wanted else None

    corda_config.cache_file = peft_path(decomposition_path)
    corda_config.covariance_file = peft_path(covariance_path, settings.save_covariance)
    source = "decomposition cache" if _ready(decomposition_path) else "covariance cache" if _ready(covariance_path) else "computed"

    config.init_lora_weights = "corda"
    config.corda_config = corda_config
    head = model.get_output_embeddings()
    heads_targeted = any(module is head for _, module in targets)
    forward = model if heads_targeted else model.get_decoder()  # the output head's logits only when adapted
    device = next(model.parameters()).device
    forwards = 0

    def run_model() -> None:
        nonlocal forwards
        for example in examples:
            inputs = {key: value[None].to(device) for key, value in example.items()}
            forward(**inputs, use_cache=False)
            forwards += 1

    was_training = model.training
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # peft's damping and identity matrices, even under bf16-true's init context
    try:
        preprocess_corda(model, config, run_model=run_model)
    finally:
        torch.set_default_dtype(default_dtype)
    model.train(was_training)
    for path in (corda_config.cache_file, corda_config.covariance_file):
        if path is not None and path.endswith(temporary) and os.path.isfile(path):
            final = path[: -len(temporary)]
            os.replace(path, final)
            with open(final + ".json", "w", encoding="utf-8") as handle:
                json.dump(description, handle, indent=1, sort_keys=True, default=str)
    peft_model = peft.get_peft_model(model, config)
    # the files' paths are this run's, not the adapter's
    peft_model.peft_config["default"].corda_config = CordaConfig(
        corda_method=settings.mode, use_float16_for_covariance=settings.float16_covariance
    )
    initial = CordaInitialAdapter(_lora_tensors(peft_model), True)
    tokens = sum(int(example["input_ids"].numel()) for example in examples)
    initial.info = {"source": source, "forwards": forwards, "examples": len(examples), "tokens": tokens,
                    "layers": len(targets), "decomposition_file": decomposition_path, "covariance_file": covariance_path}
    rank_zero_info(
        f"CorDA {settings.mode.upper()}: {len(targets)} layers, rank {config.r}, {len(examples)} calibration examples "
        f"({tokens} tokens); source: {source}" + (f" ({decomposition_path})" if decomposition_path else "")
    )
    return peft_model, initial


def check_corda_initialised(host: TokenLM) -> None:
    """Refuse to train a CorDA model that was neither decomposed nor loaded from a checkpoint."""
    initial = getattr(host, "corda_initial", None)
    if isinstance(initial, CordaInitialAdapter) and not bool(initial.initialised):
        raise ConfigError(
            "lora.init=corda: this model was built outside `fit` (configure_model() by hand, or validate first) "
            "and never calibrated. Let trainer.fit build it (a fresh TokenLM), or resume from a CorDA checkpoint."
        )


def save_corda_adapter(host: TokenLM, path: str) -> None:
    """Write the trained adapter in peft's format as a plain LoRA adapter for the *original* base model:
    peft's CorDA-to-LoRA conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``), rank
    ``2r`` with ``[A | A₀]``, ``[B | −B₀]`` and ``alpha`` doubled, so ``s'·B'A' = s·(BA − B₀A₀)``.

    Example::

        model.save_pretrained("export/")   # TokenLM with lora.init=corda calls this
        peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "export/")
    """
    peft_model = host.model
    initial = host.corda_initial
    if not bool(initial.initialised):
        raise ConfigError("lora.init=corda: the adapter was never initialised (no decomposition, no checkpoint): nothing to save.")
    state = dict(peft_model.state_dict())
    state.update({name: tensor.to(state[name].dtype) for name, tensor in initial.adapter_state().items()})
    modes = {name: module.training for name, module in peft_model.named_modules()}
    trainable = {name: p.requires_grad for name, p in peft_model.named_parameters()}
    config = peft_model.peft_config["default"]
    corda_config, config.corda_config = config.corda_config, None  # the converted adapter is plain LoRA
    try:
        with tempfile.TemporaryDirectory() as folder, hide_unused_bitsandbytes(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*changes the base weights.*")  # the initial adapter, briefly loaded
            initial_path = os.path.join(folder, "corda_initial")
            peft_model.save_pretrained(initial_path, state_dict=state)
            peft_model.save_pretrained(path, path_initial_model_for_weight_conversion=initial_path)
    finally:
        config.corda_config = corda_config
    for name, module in peft_model.named_modules():  # as they were, whatever loading the initial adapter did
        module.training = modes.get(name, module.training)
    for name, p in peft_model.named_parameters():
        if name in trainable:
            p.requires_grad_(trainable[name])
