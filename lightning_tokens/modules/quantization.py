"""Quantized fine-tuning (QLoRA) for :class:`~lightning_tokens.modules.causal_lm.TokenLM`, two routes.

1. **transformers' ``BitsAndBytesConfig``** (``TokenLM(quantization="nf4" | "nf4-dq" | "fp4" | "int8")``):
   the pretrained weights are quantized while loading; runs on CPU and GPU. :func:`check_quantization`
   and :func:`bnb_config` implement it.
2. **Lightning's ``BitsandbytesPrecision`` plugin** (``Trainer(plugins=[BitsandbytesPrecision("nf4",
   ignore_modules={"lm_head"})])``, CUDA only): the plugin's layer classes replace the model's Linear
   layers and quantize them when the model moves to the GPU.

What Lightning 2.6 does with the plugin, and why TokenLM takes over the conversion:

- ``Trainer._run`` builds the model in ``configure_model`` under ``plugin.module_init_context()``, which
  replaces ``torch.nn.Linear`` by the quantized class *for every Linear created there*: the output head
  and peft's ``lora_A`` / ``lora_B`` included, which would then be quantized and frozen. With
  ``ignore_modules`` set, that context raises instead.
- ``strategy.setup`` calls ``plugin.convert_module(lightning_module)``, which replaces the Linear
  children whose names (relative to the LightningModule) do not start with an ``ignore_modules`` entry,
  but only when the model holds no bitsandbytes layer yet; ``model_to_device`` then quantizes them.

So :func:`prepare_precision_plugin` (``TokenLM.setup``) narrows the plugin's ``module_init_context`` to its
dtype, and :func:`quantize_for_precision` (``TokenLM.configure_model``, after loading and before LoRA)
converts the causal LM with ``plugin.convert_module``, honouring ``ignore_modules``: the output head must
be listed there (the fused token loss reads ``head.weight`` in floating point), LoRA adapters are created
afterwards as plain Linear layers (peft's bitsandbytes LoRA classes wrap the quantized base layers), and
the strategy's own ``convert_module`` finds the layers converted and only sets their compute dtype.

Example::

    from lightning.pytorch.plugins import BitsandbytesPrecision
from lightning.pytorch.strategies import FSDPStrategy

    model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(r=16))
    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16, ignore_modules={"lm_head"})
    L.Trainer(accelerator="gpu", devices=1, plugins=[plugin]).fit(model, datamodule=...)
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.plugins import BitsandbytesPrecision
from lightning.pytorch.strategies import FSDPStrategy

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules.lazy_backends import import_bitsandbytes

if TYPE_CHECKING:
    from lightning_tokens.modules.causal_lm import TokenLM

__all__ = [
    "QUANTIZATION_MODES",
    "QLoRAPrecision",
    "QuantizationMode",
    "bnb_config",
    "bnb_precision_plugin",
    "check_quantization",
    "is_quantized",
    "prepare_precision_plugin",
    "quantize_for_precision",
]

QuantizationMode = Literal["nf4", "nf4-dq", "fp4", "int8"]
QUANTIZATION_MODES: tuple[str, ...] = ("nf4", "nf4-dq", "fp4", "int8")
_PLUGIN = "trainer.plugins BitsandbytesPrecision"


# ---- route 1: transformers' BitsAndBytesConfig ----------------------------------------------------------
def check_quantization(mode: str, field: str = "quantization") -> None:
    """Fail early for an unknown mode or a bitsandbytes that cannot be imported.

    Example:
        >>> check_quantization("nf4")  # bitsandbytes installed: passes
    """
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"{field}={mode!r} is not a mode: choose one of {QUANTIZATION_MODES} or null.")
    try:
        import_bitsandbytes()
    except Exception as err:  # bitsandbytes raises various errors on machines it cannot run on
        raise ConfigError(
            f"{field}={mode!r} needs bitsandbytes, which cannot be imported here ({err}). Install it "
            f"(`pip install bitsandbytes`) or set {field}: null."
        ) from err


def bnb_config(mode: str, dtype: torch.dtype | None, skip_modules: list[str] | None = None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a mode; 4-bit layers compute in ``dtype`` (default float32).
    ``skip_modules`` (module names) stay unquantized; ``None`` keeps transformers' default (the output head).

    Example:
        >>> bnb_config("nf4-dq", torch.bfloat16).bnb_4bit_use_double_quant
        True
    """
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": list(skip_modules)} if skip_modules is not None else {}
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if mode == "fp4" else "nf4",
        bnb_4bit_use_double_quant=mode == "nf4-dq",
        bnb_4bit_compute_dtype=dtype or torch.float32,
        **skip,
    )


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds bitsandbytes 4-bit or 8-bit layers (either route)."""
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - bitsandbytes raises various errors where it cannot run
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


# ---- route 2: Lightning's BitsandbytesPrecision plugin --------------------------------------------------
def bnb_precision_plugin(module: Any) -> BitsandbytesPrecision | None:
    """The ``BitsandbytesPrecision`` plugin of the Trainer ``module`` is attached to, else ``None``."""
    trainer = getattr(module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return plugin if isinstance(plugin, BitsandbytesPrecision) else None


def _require_cuda(trainer: Any) -> None:
    device = trainer.strategy.root_device
    if device.type != "cuda":
        raise RuntimeError(
            f"{_PLUGIN} quantizes on a CUDA GPU, but the Trainer runs on {device}. Use trainer.accelerator: gpu "
            "on a machine with one, or quantize with transformers instead, which also runs on the CPU: drop the "
            "plugin and set model.quantization: nf4 (see configs/qlora_nf4.yaml)."
        )


def prepare_precision_plugin(module: TokenLM) -> None:
    """Checks and set-up for Lightning's ``BitsandbytesPrecision``; a no-op without it.

    Called from ``TokenLM.setup``, before the Trainer enters ``configure_model``: fails early, naming the
    field and the fix, for the plugin on a non-CUDA device, combined with ``quantization`` (which would
    quantize twice), under FSDP (Lightning rejects the pair), or for a model built before the Trainer
    ran (its layers could no longer be converted ahead of LoRA). Then narrows the plugin's
    ``module_init_context`` to its dtype, so no layer is created quantized (TokenLM converts them in
    :func:`quantize_for_precision`) and ``ignore_modules`` can be used with ``configure_model``.
    """
    plugin = bnb_precision_plugin(module)
    if plugin is None:
        return
    trainer = module._trainer
    if module.quantization is not None:
        raise ConfigError(
            f"model.quantization={module.quantization!r} and {_PLUGIN} would both quantize the model: choose "
            "one. Set model.quantization: null to let the plugin quantize on the GPU, or drop the plugin."
        )
    if isinstance(trainer.strategy, FSDPStrategy):
        raise ConfigError(
            f"{_PLUGIN} does not work with {type(trainer.strategy).__name__} (Lightning issue #20855): use "
            "trainer.strategy: auto on one GPU, or model.quantization with transformers' BitsAndBytesConfig."
        )
    _require_cuda(trainer)
    if module.model is not None and not is_quantized(module.model):
        raise RuntimeError(
            f"{_PLUGIN}: this TokenLM was built before the Trainer ran (configure_model called by hand), so its "
            "Linear layers can no longer be quantized ahead of LoRA. Pass a fresh TokenLM to the Trainer."
        )
    # an instance attribute: the class method stays as Lightning wrote it for other modules
    plugin.module_init_context = plugin.tensor_init_context  # type: ignore[method-assign]


def _ignore_set(ignore_modules: set[str] | list[str] | None) -> set[str]:
    """``ignore_modules`` as prefixes of names inside the causal LM: an entry may also be written relative
    to the TokenLM (``model.lm_head``), as Lightning's own ``convert_module`` would see it."""
    entries = set(ignore_modules or ())
    return entries | {e[len("model.") :] for e in entries if e.startswith("model.")}


def _head_name(model: torch.nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, m in model.named_modules() if m is head)


def quantize_for_precision(model: torch.nn.Module, plugin: BitsandbytesPrecision) -> torch.nn.Module:
    """Convert a freshly loaded causal LM's Linear layers to the plugin's bitsandbytes classes.

    The model is cast to the plugin's dtype (what the plugin's ``module_init_context`` would have created),
    then every Linear layer not named by ``ignore_modules`` is replaced; the weights are quantized when the
    strategy moves the model to the GPU. Call it before adding LoRA: peft then wraps the quantized layers
    with its bitsandbytes LoRA classes and creates the adapters as ordinary trainable Linear layers.

    Raises:
        ValueError: the output head is not in ``ignore_modules``.

    Example::

        plugin = BitsandbytesPrecision("nf4", dtype=torch.bfloat16, ignore_modules={"lm_head"})
        model = quantize_for_precision(AutoModelForCausalLM.from_pretrained(path), plugin)
        model.to("cuda")  # quantizes
    """
    bnb = import_bitsandbytes()

    ignore = _ignore_set(plugin.ignore_modules)
    head = _head_name(model)
    if not any(head.startswith(prefix) for prefix in ignore):
        raise ConfigError(
            f"{_PLUGIN} would quantize the output head {head!r} (ignore_modules={sorted(plugin.ignore_modules)}); "
            f"the fused token loss reads its weight in floating point. Add it to ignore_modules: in YAML "
            f"`ignore_modules: [{head}]`, in Python BitsandbytesPrecision(..., ignore_modules={{{head!r}}})."
        )
    model.to(plugin.dtype)
    saved = plugin.ignore_modules
    plugin.ignore_modules = ignore
    try:
        plugin.convert_module(model)
    finally:
        plugin.ignore_modules = saved
    # peft picks its bitsandbytes LoRA layers from these flags (transformers sets them when it quantizes)
    model.is_loaded_in_4bit = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model.is_loaded_in_8bit = any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    return model


class QLoRAPrecision(BitsandbytesPrecision):
    """Lightning's ``BitsandbytesPrecision`` set up for TokenLM, with arguments a YAML config can give.

    Differences from the parent: ``ignore_modules`` defaults to the output head (``["lm_head"]``),
    ``dtype`` is a name (``"bfloat16"``), it fails at construction on a machine without CUDA with the
    fix in the message, and its ``module_init_context`` only sets the dtype (TokenLM converts the layers).

    Args:
        mode: ``nf4``, ``nf4-dq``, ``fp4``, ``fp4-dq``, ``int8-training`` or ``int8`` (inference).
        dtype: compute dtype name; default bfloat16 for 4-bit modes, float16 for int8 (required there).
        ignore_modules: name prefixes (inside the causal LM) of Linear layers kept unquantized.

    Example::

        trainer:
          accelerator: gpu
          plugins:
            - class_path: lightning_tokens.modules.quantization.QLoRAPrecision
              init_args: {mode: nf4-dq}
    """

    def __init__(
        self,
        mode: Literal["nf4", "nf4-dq", "fp4", "fp4-dq", "int8-training", "int8"] = "nf4",
        dtype: str | None = None,
        ignore_modules: list[str] | None = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"{_PLUGIN} (QLoRAPrecision, mode={mode!r}) needs a CUDA GPU and none is available here. On the "
                "CPU, quantize with transformers instead: drop trainer.plugins and set model.quantization: "
                "nf4 (configs/qlora_nf4.yaml)."
            )
        if dtype is None:
            dtype = "float16" if mode.startswith("int8") else "bfloat16"
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use bfloat16 or float16.")  # noqa: TRY004
        super().__init__(mode=mode, dtype=getattr(torch, dtype), ignore_modules=set(ignore_modules or ["lm_head"]))

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()
