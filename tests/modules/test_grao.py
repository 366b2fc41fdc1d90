"""GRAO as a module: reference rows, the objective against a float64 hand computation of Eq. 3, bad input."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import GRAO, DFT, NUPADataModule, RewardSpec
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules import OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def _model(**kwargs):
    defaults = dict(model="tiny-llama", tokenizer="char", model_config=TINY, num_generations=3, max_completion_length=4,
                    loss_backend="torch", rewards=[RewardSpec("tests.modules.test_grpo.digit_share")],
                    optimizer=OptimizerSettings(lr=1e-3, warmup=0, min_lr_ratio=1.0), temperature=0.7)
    return GRAO(**{**defaults, **kwargs})


def _batch(model):
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=8, num_val=2, num_test=2, batch_size=2, train_format="prompts")
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_reference_rows_follow_the_samples():
    model = _model()
    model.configure_model()
    batch = _batch(model)
    rollout = model.rollout(batch)
    tok = model.tokenizer
    rows = rollout.batch
    assert rows["input_ids"].shape[0] == 2 * 3 + 2 and rollout.reference_rewards.shape == (2,)
    for i, (prompt, answer) in enumerate(zip(batch["prompts"], batch["answers"])):
        row = 6 + i
        labels = rows["labels"][row]
        assert tok.decode(labels[labels != -100]) == tok.decode(tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        length = int(rows["attention_mask"][row].sum())
        assert tok.decode(rows["input_ids"][row, :length], skip_special_tokens=True) == prompt + answer
    # the reference answers are digits only: digit_share = 1
    assert rollout.reference_rewards.tolist() == [1.0, 1.0]


def test_loss_equals_eq3_by_hand_in_float64():
    model = _model(imitation_weight=0.5, alignment_weight=0.6)
    model.configure_model()
    rollout = model.rollout(_batch(model))
    rollout.rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.2, 0.9])  # two queries, distinct advantages
    rollout.reference_rewards = torch.tensor([1.0, 0.4])
    loss, logs = model.grao_loss(rollout)
    loss.backward()
    model64 = model.causal_lm
    rows = rollout.batch
    with torch.no_grad():
        logits = model64.double()(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1]
    model64.float()
    labels = rows["labels"][:, 1:]
    mask = labels != -100
    logp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # untempered
    seq = (logp * mask).sum(-1) / mask.sum(-1)
    expected = 0.0
    for q in range(2):
        r = rollout.rewards[3 * q : 3 * q + 3].double()
        ry = rollout.reference_rewards[q].double()
        joint = torch.cat([r, ry.view(1)])
        mu, sigma = joint.mean(), joint.std(unbiased=False) + 1e-6
        a, ay = (r - mu) / sigma, (ry - mu) / sigma
        j_exp, j_imit = seq[3 * q : 3 * q + 3], seq[6 + q]
        expected += (a * j_exp + 0.5 * ay * j_imit + 0.6 * a * (j_exp - j_imit)).mean()
    expected = -expected / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert set(logs) >= {"train/grao/exploration", "train/grao/imitation", "train/grao/alignment"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.causal_lm.parameters())


def test_fit_runs_and_logs(tmp_path):
    pl.seed_everything(0, verbose=False)
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=16, num_val=2, num_test=2, batch_size=2, train_format="prompts")
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(_model(), dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "train/grao/imitation" in metrics and "train/reward" in metrics


def test_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="no KL term"):
        _model(beta=0.1)
    with pytest.raises(ConfigError, match="no KL term"):
        _model(num_iterations=2)
    model = _model(reference_column="solution")
    model.configure_model()
    with pytest.raises(ConfigError, match="no 'solution' column"):
        model.rollout(_batch(model))
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=8, num_val=2, num_test=2, batch_size=2, train_format="prompts")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[DFT()], default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="sequence-level"):
        trainer.fit(_model(), dm)


def test_lightning_cli_builds_grao_from_yaml(tmp_path):
    from lightning_tokens.cli import cli

    config = tmp_path / "grao.yaml"
    config.write_text(
        "model:\n  class_path: lightning_tokens.GRAO\n  init_args:\n    model: tiny-llama\n    tokenizer: char\n"
        "    imitation_weight: 0.25\n    num_generations: 4\n    rewards:\n      - function: lightning_tokens.rewards.nupa_exact_match\n"
        "data:\n  class_path: lightning_tokens.NUPADataModule\n  init_args:\n    train_format: prompts\n"
    )
    built = cli(["--config", str(config)], run=False)
    assert isinstance(built.model, GRAO) and built.model.imitation_weight == 0.25 and built.model.num_generations == 4
