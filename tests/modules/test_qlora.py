"""Quantized LoRA fine-tuning (QLoRA) with TokenLM, both routes of :mod:`lightning_tokens.modules.quantization`.

- transformers' ``BitsAndBytesConfig`` (``TokenLM(quantization=...)``): nf4, nf4-dq, fp4 and int8 train on
  the CPU here, and the ``adapter_disabled`` reference scores exactly like the quantized base model.
- Lightning's ``BitsandbytesPrecision`` plugin: Lightning refuses it on the CPU when the Trainer is built,
  so the CPU tests swap it into an already built CPU Trainer (and bypass TokenLM's own CUDA check) to run
  the very same hooks on bitsandbytes' CPU kernels; the tests marked ``cuda`` run it properly on a GPU
  (``bash benchmarks/gpu_check.sh``).

The quantized model is a tiny Llama (random weights) saved once to a folder, because quantization applies
to weights loaded with ``from_pretrained``.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import NUPADataModule
from lightning_tokens.callbacks import ExcessLossSelection
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.modules import (
    LoRASettings,
    OptimizerSettings,
    TokenLM,
    quantization,
)

bnb = pytest.importorskip("bitsandbytes")
from lightning.pytorch.plugins import BitsandbytesPrecision

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
QUANTIZED_TYPES = {"nf4": bnb.nn.Linear4bit, "nf4-dq": bnb.nn.Linear4bit, "fp4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny Llama with random weights and the char tokenizer, saved as a Hugging Face checkpoint."""
    torch.manual_seed(0)
    source = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    source.configure_model()
    path = tmp_path_factory.mktemp("tiny_llama")
    source.causal_lm.save_pretrained(path)
    source.tokenizer.save_pretrained(path)
    return str(path)


def _data(batch_size: int = 8) -> NUPADataModule:
    return NUPADataModule(
        tasks="Integer/max", tokenizer="char", num_train=64, num_val=8, num_test=8, batch_size=batch_size,
        eval_batch_size=8, max_length=48,
    )


def _batch() -> dict[str, torch.Tensor]:
    dm = _data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _trainer(**kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": False, "limit_val_batches": 0,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def _hf_loss(lm: TokenLM, batch: dict[str, torch.Tensor]) -> float:
    """The model's own mean cross-entropy (full logits), LoRA adapters active.

    In train mode (every dropout here is 0): in eval mode without gradients, bitsandbytes repacks 4-bit
    CPU weights for its inference kernel, rounding their absmax to bfloat16, which changes the model.
    """
    device = next(lm.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        loss = lm.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    return loss.item()


def _nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` NLL indexed like ``labels`` (column t scores labels[t] from logits[t - 1]), 0 where ignored."""
    nll = torch.zeros(labels.shape, dtype=torch.float32)
    nll[:, 1:] = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return nll


# ---- route 1: transformers' BitsAndBytesConfig, on the CPU -----------------------------------------------
@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4", "int8"])
def test_qlora_trains_the_adapters_of_a_quantized_model_and_lowers_the_loss(saved_tiny, mode):
    lm = TokenLM(model=saved_tiny, quantization=mode, lora=LoRASettings(r=8, alpha=16),
                 optimizer=OptimizerSettings(lr=1e-2, warmup=0), generate_in_validation=False)
    lm.configure_model()
    layers = [m for m in lm.causal_lm.modules() if isinstance(m, QUANTIZED_TYPES[mode])]
    assert len(layers) == 7 * TINY["num_hidden_layers"]  # q, k, v, o, gate, up, down
    stored = {"int8": torch.int8}.get(mode, torch.uint8)
    assert all(layer.weight.dtype == stored for layer in layers)
    if mode != "int8":
        quant_type = "fp4" if mode == "fp4" else "nf4"
        assert {layer.weight.quant_type for layer in layers} == {quant_type}
        assert {layer.weight.compress_statistics for layer in layers} == {mode == "nf4-dq"}
    head = lm.causal_lm.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # through state_dict: bitsandbytes repacks 4-bit CPU weights for its kernels and unpacks them there
    frozen = {n: t.clone() for n, t in lm.state_dict().items() if "lora_" not in n}

    batch = _batch()
    before = _hf_loss(lm, batch)
    _trainer(max_steps=12).fit(lm, datamodule=_data())
    after = _hf_loss(lm, batch)
    print(f"\n{mode}: loss on a training batch {before:.3f} -> {after:.3f}")
    assert after < before - 0.1, (before, after)
    state = lm.state_dict()
    assert len(frozen) > 7 * TINY["num_hidden_layers"]
    for name, t in frozen.items():
        assert torch.equal(state[name], t), name


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4", "int8"])
def test_adapter_disabled_reference_scores_like_the_quantized_base_model(saved_tiny, mode):
    from transformers import AutoModelForCausalLM

    lm = TokenLM(model=saved_tiny, quantization=mode, lora=LoRASettings(r=8, alpha=16),
                 optimizer=OptimizerSettings(lr=1e-2, warmup=0), generate_in_validation=False,
                 reference=ReferenceSettings(mode="adapter_disabled"))
    # Rho-1 against the adapter-disabled base, so that the adapters below are trained (non-zero)
    _trainer(max_steps=8, callbacks=[ExcessLossSelection(ratio=0.6)]).fit(lm, datamodule=_data())

    batch = _batch()
    labels = batch["labels"]
    # both models in train mode, as during training (see _hf_loss; every dropout here is 0)
    reference = lm.reference.stats(batch, lm)
    with torch.no_grad():
        adapted = _nll_from_logits(lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)
    # the quantized base, loaded again independently: no LoRA, no peft, no TokenLM
    base = AutoModelForCausalLM.from_pretrained(saved_tiny, quantization_config=quantization.bnb_config(mode, None)).train()
    assert any(isinstance(m, QUANTIZED_TYPES[mode]) for m in base.modules())
    with torch.no_grad():
        expected = _nll_from_logits(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)

    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, 1:] = labels[:, 1:] != -100
    torch.testing.assert_close(reference.nll.float()[scored], expected[scored], rtol=1e-4, atol=1e-5)
    assert (reference.nll[~scored] == 0).all()
    # the adapters did move the model: the comparison above would catch a reference with adapters on
    gap = (adapted - expected)[scored].abs().mean().item()
    print(f"\n{mode}: mean |adapted - base| NLL {gap:.3f}")
    assert gap > 0.05, gap


# ---- route 2: Lightning's BitsandbytesPrecision ---------------------------------------------------------
def _plugin_model(**kwargs) -> TokenLM:
    defaults = {"model": "tiny-llama", "tokenizer": "char", "model_config": TINY, "lora": LoRASettings(r=8, alpha=16),
                    "optimizer": OptimizerSettings(lr=1e-2, warmup=0), "generate_in_validation": False}
    return TokenLM(**{**defaults, **kwargs})


def _cpu_trainer_with(plugin: BitsandbytesPrecision, **kwargs) -> pl.Trainer:
    """A CPU Trainer running ``plugin``: Lightning refuses the pair at construction, so it is swapped in after."""
    trainer = _trainer(**kwargs)
    trainer.strategy.precision_plugin = plugin
    return trainer


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _check_plugin_layers(lm: TokenLM, mode: str, dtype: torch.dtype, device: str) -> None:
    causal_lm = lm.causal_lm
    head = causal_lm.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == dtype and head.weight.device.type == device
    assert head.weight is causal_lm.get_input_embeddings().weight  # still tied: the head was not converted
    q_proj = causal_lm.model.layers[0].self_attn.q_proj
    base = q_proj.base_layer
    if mode.startswith("int8"):
        assert isinstance(base, bnb.nn.Linear8bitLt) and type(q_proj).__module__ == "peft.tuners.lora.bnb"
    else:
        assert isinstance(base, bnb.nn.Linear4bit) and type(q_proj).__name__ == "Linear4bit"
        assert base.weight.dtype == torch.uint8 and base.weight.bnb_quantized  # quantized when moved to the device
        assert base.weight.compress_statistics == (mode == "nf4-dq") and base.compute_dtype == dtype
    for adapter in (q_proj.lora_A["default"], q_proj.lora_B["default"]):
        assert type(adapter) is torch.nn.Linear and adapter.weight.dtype == torch.float32 and adapter.weight.requires_grad
    converted = [m for m in causal_lm.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(converted) == 7 * TINY["num_hidden_layers"]
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


class LayerCheck(pl.Callback):
    """Checks the converted layers at the end of training, before the strategy moves the model to the CPU."""

    def __init__(self, mode: str, dtype: torch.dtype, device: str) -> None:
        self.mode, self.dtype, self.device, self.checked = mode, dtype, device, False

    def on_train_end(self, trainer, pl_module) -> None:
        _check_plugin_layers(pl_module, self.mode, self.dtype, self.device)
        self.checked = True


@pytest.mark.parametrize("mode", ["nf4", "int8-training"])
def test_bnb_precision_hooks_train_token_lm_with_lora_on_cpu_kernels(monkeypatch, mode):
    monkeypatch.setattr(quantization, "_require_cuda", lambda trainer: None)
    dtype = torch.float16 if mode.startswith("int8") else torch.bfloat16
    plugin = BitsandbytesPrecision(mode, dtype=dtype, ignore_modules={"lm_head"})
    lm, recorder, check = _plugin_model(), LossRecorder(), LayerCheck(mode, dtype, "cpu")
    _cpu_trainer_with(plugin, max_steps=10, callbacks=[recorder, check]).fit(lm, datamodule=_data())
    assert check.checked
    losses = recorder.losses
    print(f"\n{mode}: losses {[round(x, 3) for x in losses]}")
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    # the class method is untouched for other modules; this plugin instance only sets the dtype now
    assert "module_init_context" in vars(plugin) and "module_init_context" not in vars(BitsandbytesPrecision)


def test_bnb_precision_conversion_keeps_the_head_and_names_relative_to_token_lm():
    plugin = BitsandbytesPrecision("nf4", dtype=torch.bfloat16, ignore_modules={"model.lm_head", "model.layers.1"})
    lm = _plugin_model(lora=None)
    lm.configure_model()
    model = quantization.quantize_for_precision(lm.model, plugin)
    assert plugin.ignore_modules == {"model.lm_head", "model.layers.1"}  # restored after the conversion
    names = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert names == {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert type(model.lm_head) is torch.nn.Linear and model.is_loaded_in_4bit and not model.is_loaded_in_8bit
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_bnb_precision_misconfigurations_fail_early_naming_the_fix(saved_tiny, monkeypatch):
    # Lightning itself refuses the plugin on the CPU when the Trainer is built
    with pytest.raises(RuntimeError, match="only supported on CUDA"):
        _trainer(plugins=[BitsandbytesPrecision("nf4", dtype=torch.bfloat16, ignore_modules={"lm_head"})])

    # ... and TokenLM checks the device of the Trainer it runs in, before building anything
    plugin = BitsandbytesPrecision("nf4", dtype=torch.bfloat16, ignore_modules={"lm_head"})
    lm = _plugin_model()
    with pytest.raises(RuntimeError, match="trainer.accelerator: gpu.*model.quantization: nf4"):
        _cpu_trainer_with(plugin, max_steps=1).fit(lm, datamodule=_data())
    assert lm.model is None

    monkeypatch.setattr(quantization, "_require_cuda", lambda trainer: None)
    # the output head must stay out of quantization
    with pytest.raises(ValueError, match=r"output head 'lm_head'.*ignore_modules: \[lm_head\]"):
        _cpu_trainer_with(BitsandbytesPrecision("nf4", dtype=torch.bfloat16), max_steps=1).fit(
            _plugin_model(), datamodule=_data()
        )
    # quantizing twice
    with pytest.raises(ValueError, match="model.quantization='nf4' and trainer.plugins BitsandbytesPrecision"):
        _cpu_trainer_with(plugin, max_steps=1).fit(_plugin_model(model=saved_tiny, quantization="nf4"),
                                                   datamodule=_data())
    # a model built by hand before the Trainer
    built = _plugin_model()
    built.configure_model()
    with pytest.raises(RuntimeError, match="built before the Trainer ran"):
        _cpu_trainer_with(plugin, max_steps=1).fit(built, datamodule=_data())
    # FSDP (Lightning issue #20855)
    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=plugin, strategy=FSDPStrategy()), quantization=None, model=None)
    with pytest.raises(ValueError, match="FSDPStrategy.*20855"):
        quantization.prepare_precision_plugin(fake)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_qlora_precision_says_what_to_use_on_a_machine_without_cuda():
    with pytest.raises(RuntimeError, match="model.quantization: nf4"):
        quantization.QLoRAPrecision("nf4")


# ---- route 2 on a GPU -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8-training"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bnb_precision_fits_token_lm_with_lora_on_the_gpu(mode):
    dtype = torch.float16 if mode.startswith("int8") else torch.bfloat16
    plugin = BitsandbytesPrecision(mode, dtype=dtype, ignore_modules={"lm_head"})
    lm, recorder, check = _plugin_model(), LossRecorder(), LayerCheck(mode, dtype, "cuda")
    trainer = _trainer(accelerator="gpu", plugins=[plugin], max_steps=15, callbacks=[recorder, check])
    trainer.fit(lm, datamodule=_data())
    assert check.checked
    losses = recorder.losses
    print(f"\n{mode}: losses {[round(x, 3) for x in losses]}")
    assert len(losses) == 15 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_precision_with_rho1_against_the_adapter_disabled_base_on_the_gpu():
    plugin = quantization.QLoRAPrecision("nf4-dq")  # ignore_modules defaults to the output head
    assert plugin.ignore_modules == {"lm_head"} and plugin.dtype == torch.bfloat16
    lm = _plugin_model(reference=ReferenceSettings(mode="adapter_disabled"))
    recorder, check = LossRecorder(), LayerCheck("nf4-dq", torch.bfloat16, "cuda")
    trainer = _trainer(accelerator="gpu", plugins=[plugin], max_steps=15, callbacks=[ExcessLossSelection(ratio=0.6), recorder, check])
    trainer.fit(lm, datamodule=_data())
    assert check.checked
    assert 0.5 < float(trainer.callback_metrics["train/ExcessLossSelection/kept_fraction"]) <= 0.7
    assert sum(recorder.losses[-3:]) / 3 < recorder.losses[0] - 0.1, recorder.losses

    # the reference is the quantized base: the same forward with every LoRA layer's scaling set to zero
    lm.cuda()  # the strategy's teardown moved it to the CPU; train mode kept (every dropout here is 0)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _batch().items()}
    labels = batch["labels"].cpu()
    head = lm.causal_lm.get_output_embeddings()
    with torch.no_grad():
        reference = lm.reference.stats(batch, lm).nll.float().cpu()
        adapted = _nll_from_logits(F.linear(lm.hidden_states(batch).float(), head.weight.float()).cpu(), labels)
        for module in lm.model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                module.scaling = {k: 0.0 for k in module.scaling}
        expected = _nll_from_logits(F.linear(lm.hidden_states(batch).float(), head.weight.float()).cpu(), labels)
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, 1:] = labels[:, 1:] != -100
    torch.testing.assert_close(reference[scored], expected[scored], rtol=2e-2, atol=2e-2)
    gap = (adapted - expected)[scored].abs().mean().item()
    assert gap > 0.05, gap  # the adapters moved the model, so the comparison above can fail
