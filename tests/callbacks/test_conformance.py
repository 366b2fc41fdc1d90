"""One table, every token method through the same checks (peft's test_custom_models pattern):
trains on the tiny model with and without LoRA, composes with DFT, has a serialisable state, and
is buildable from its typed __init__ defaults."""

import inspect

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import CAFT, DFT, OneTokenRollout, ExcessLossSelection, IntuitiveFineTuning, NUPADataModule, QTuning, SSToken, TokenLM
from lightning_tokens.callbacks.cut import ContrastiveUnlikelihood, DualCUT
from lightning_tokens.core import BatchTokenMethod, TokenMethod
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.modules import LoRASettings, OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}

# (id, factory) — methods that need data of their own (FAIT's code pairs, STAR-DSS scores, WHP targets)
# are covered by their own end-to-end tests.
METHODS = [
    ("dft", lambda: DFT()),
    ("rho1", lambda: ExcessLossSelection(ratio=0.5)),
    ("qtuning", lambda: QTuning()),
    ("sstoken", lambda: SSToken(ratio=0.5)),
    ("ift", lambda: IntuitiveFineTuning()),
    ("caft", lambda: CAFT(num_heads=2)),
    ("otr", lambda: OneTokenRollout(estimator="sample", num_samples=8)),
]


def _fit(method, lora: bool):
    reference = None
    if method.requires_reference:
        reference = ReferenceSettings(mode="adapter_disabled") if lora else ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY)
    model = TokenLM(
        model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=OptimizerSettings(lr=1e-2, warmup=0),
        lora=LoRASettings(r=4) if lora else None, reference=reference,
    )
    callbacks = [method] if isinstance(method, DFT) else [method, DFT()]
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks,
    )
    data = NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=24, num_val=4, num_test=4, batch_size=8, max_length=48)
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name,factory", METHODS, ids=[m[0] for m in METHODS])
def test_method_trains_and_composes(name, factory, lora):
    trainer = _fit(factory(), lora)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 < float(metrics["train/kept_fraction"]) <= 1
    assert trainer.global_step == 3


@pytest.mark.parametrize("name,factory", METHODS, ids=[m[0] for m in METHODS])
def test_method_contract(name, factory):
    method = factory()
    assert isinstance(method, (TokenMethod, BatchTokenMethod))
    # typed __init__ with defaults only: LightningCLI can build it from YAML
    for param in inspect.signature(type(method).__init__).parameters.values():
        if param.name != "self":
            assert param.annotation is not inspect.Parameter.empty, f"{name}.{param.name} has no type"
            assert param.default is not inspect.Parameter.empty, f"{name}.{param.name} has no default"
    assert type(method).__doc__ and "Example" in type(method).__doc__
    state = method.state_dict()
    type(method)().load_state_dict(state)


# ---- second axis: the modules that use the pipeline (DESIGN.md, "Conformance across modalities") -----------
def _fit_vision_language(method, lora: bool):
    from lightning_tokens import VisionLanguageLM, VisualQADataModule
    from lightning_tokens.modules import ResamplerSettings, VisionSettings

    reference = None
    if method.requires_reference:
        reference = ReferenceSettings(mode="adapter_disabled") if lora else ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY)
    model = VisionLanguageLM(
        model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=OptimizerSettings(lr=1e-2, warmup=0),
        vision=VisionSettings(name="vit_tiny_patch16_224", pretrained=False, image_size=32, overrides={"patch_size": 16, "depth": 1}),
        resampler=ResamplerSettings(num_latents=2, depth=1, heads=2, dim_head=8),
        lora=LoRASettings(r=4) if lora else None, train_language_model=not lora, reference=reference,
    )
    callbacks = [method] if isinstance(method, DFT) else [method, DFT()]
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks,
    )
    data = VisualQADataModule(tasks=["counting", "mci"], image_size=40, max_count=2, max_distractors=1, num_train=8, num_val=2, num_test=2, batch_size=4)
    trainer.fit(model, datamodule=data)
    return trainer


# (method, LoRA): DFT full, Rho-1 against the adapter-disabled base under LoRA, Q-Tuning full, ssToken and IFT
# (its mixed input embeddings around the spliced visual tokens) and CAFT's heads under LoRA
VISION_LANGUAGE = [("dft", False), ("rho1", True), ("qtuning", False), ("sstoken", True), ("ift", True), ("caft", True)]


@pytest.mark.parametrize("name,lora", VISION_LANGUAGE, ids=[f"{n}-{'lora' if lora else 'full'}" for n, lora in VISION_LANGUAGE])
def test_method_trains_on_the_vision_language_module(name, lora):
    factory = dict(METHODS)[name]
    trainer = _fit_vision_language(factory(), lora)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 < float(metrics["train/kept_fraction"]) <= 1
    assert trainer.global_step == 2


# ---- paired-context methods: the contract here; full/LoRA and +DFT fits in tests/callbacks/test_cut.py ----------
PAIRED = [("cut", lambda: ContrastiveUnlikelihood()), ("dualcut", lambda: DualCUT())]


@pytest.mark.parametrize("name,factory", PAIRED, ids=[m[0] for m in PAIRED])
def test_paired_method_contract_and_refusal_of_unpaired_batches(name, factory):
    test_method_contract(name, factory)
    with pytest.raises(ConfigError, match="negative_input_ids"):
        _fit(factory(), lora=False)


# ---- DualSpeechLM: two token streams (language model, acoustic decoder) in one step --------------------------
def _fit_dual_speech(method, lora: bool):
    from lightning_tokens.modules.speech import AcousticSettings, DualSpeechLM
    from tests.speech_fixtures import RecordsDataModule

    reference = ReferenceSettings(mode="adapter_disabled") if method.requires_reference else None
    model = DualSpeechLM(
        model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=OptimizerSettings(lr=1e-2, warmup=0),
        speech_codebook_size=16, acoustic=AcousticSettings(n_embd=16, n_layer=1, n_head=2, block_size=256),
        lora=LoRASettings(r=4) if lora else None, reference=reference,
    )
    callbacks = [method] if isinstance(method, DFT) else [method, DFT()]
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(model, datamodule=RecordsDataModule(count=8, codebook_size=16, batch_size=4))
    return trainer


# methods that need a reference run under LoRA (the adapter-disabled base) and weight the language model's
# stream only; the others weight the acoustic stream too
DUAL_SPEECH = [("dft", False), ("rho1", True), ("qtuning", False), ("sstoken", True), ("ift", False), ("caft", False), ("otr", False)]


@pytest.mark.parametrize("name,lora", DUAL_SPEECH, ids=[f"{n}-{'lora' if lora else 'full'}" for n, lora in DUAL_SPEECH])
def test_method_trains_on_dual_speech_lm(name, lora):
    factory = dict(METHODS)[name]
    method = factory()
    trainer = _fit_dual_speech(method, lora)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/acoustic/loss"])
    assert 0 < float(metrics["train/kept_fraction"]) <= 1
    assert trainer.global_step == 2
    assert any(key.startswith("train/acoustic/DFT/") for key in metrics)  # DFT weights the acoustic tokens too
    if method.requires_reference or method.language_model_only:  # the language model's stream only
        assert not any(key.startswith(f"train/acoustic/{method.name}/") for key in metrics)
