"""GRPO: the objective against a float64 reference, rollouts, token methods on advantages, resume, bad input."""

import copy
import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import GRPO, BatchTokenMethod, NUPADataModule, RewardSpec, TokenMethod, TokenMethodOutput
from lightning_tokens.callbacks import DFT
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.modules import OptimizerSettings
from lightning_tokens.modules.grpo import Rollout
from lightning_tokens.rl import group_advantages

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
EXACT = RewardSpec("lightning_tokens.rewards.nupa_digit_match")
DIGITS = RewardSpec("tests.modules.test_grpo.digit_share")


def digit_share(completions, **_):
    """A dense reward a random tiny model already earns sometimes: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def _model(**kwargs):
    defaults = dict(
        model="tiny-llama", tokenizer="char", model_config=TINY, rewards=[EXACT], num_generations=3,
        max_completion_length=5, loss_backend="torch", optimizer=OptimizerSettings(lr=3e-3, warmup=0),
    )
    return GRPO(**{**defaults, **kwargs})


def _data(**kwargs):
    defaults = dict(tasks="Integer/max", tokenizer="char", num_train=24, num_val=4, num_test=4, batch_size=2,
                    eval_batch_size=4, max_length=48, train_format="prompts")
    return NUPADataModule(**{**defaults, **kwargs})


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), enable_checkpointing=False, limit_val_batches=0, deterministic=True,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _rollout(model, rows=4, length=12, prompt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(model.tokenizer), (rows, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0  # a shorter completion, right-padded
    labels = torch.where(attention.bool(), ids, torch.full_like(ids, -100))
    labels[:, :prompt] = -100
    advantages = torch.randn(rows, generator=g)
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    return Rollout(batch=batch, advantages=advantages, rewards=advantages, per_function={}, completions=[""] * rows,
                   prompts=[""] * rows, completion_lengths=attention.sum(-1), truncated=torch.zeros(rows, dtype=torch.bool))


def _naive_per_token(model, causal_lm, ref_lm, rollout, old_logp, temperature, beta, entropy_coef, clip=0.2):
    """float64, full logits: the clipped surrogate + beta * k3 - entropy_coef * H on the labelled positions."""
    batch = rollout.batch
    logits = causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / temperature
    logp_all = F.log_softmax(logits, -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old_logp[:, 1:].double())
    adv = rollout.advantages.double().unsqueeze(-1)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    if beta:
        with torch.no_grad():
            ref_logits = ref_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / temperature
            ref = F.log_softmax(ref_logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    if entropy_coef:
        per_token = per_token - entropy_coef * -(logp_all.exp() * logp_all).sum(-1)
    return per_token, mask


@pytest.mark.parametrize("reused", [False, True])
def test_objective_equals_a_float64_reference_with_kl_entropy_and_temperature(reused):
    model = _model(beta=0.05, entropy_coef=0.01, temperature=0.7,
                   reference=ReferenceSettings(mode="model", model="tiny-llama", model_config=TINY))
    torch.manual_seed(0)
    model.configure_model()
    rollout = _rollout(model)
    causal64 = copy.deepcopy(model.causal_lm).double()
    ref64 = copy.deepcopy(model.reference_model).double()
    if reused:  # a second use of the rollout: the sampling policy's log-probabilities differ, clipping acts
        with torch.no_grad():
            rollout.old_logp = -model._stats(rollout.batch, with_entropy=False).nll + 0.3 * torch.randn(4, 12)
        old = rollout.old_logp
    else:
        old = None
    per_token, keep, logs = model.objective(rollout)
    loss = per_token.sum() / keep.sum()
    loss.backward()

    if old is None:
        with torch.no_grad():
            logits = causal64(input_ids=rollout.batch["input_ids"]).logits[:, :-1] / 0.7
            labels = rollout.batch["labels"][:, 1:]
            logp0 = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        old = torch.cat([torch.zeros(4, 1, dtype=torch.float64), logp0], dim=1)
    expected, mask = _naive_per_token(model, causal64, ref64, rollout, old, 0.7, 0.05, 0.01)
    torch.testing.assert_close(per_token[:, 1:][mask].double(), expected[mask], rtol=1e-5, atol=1e-5)
    assert keep[:, 1:].equal(mask) and not keep[:, 0].any()
    (expected[mask].sum() / mask.sum()).backward()
    for (name, ours), theirs in zip(model.causal_lm.named_parameters(), causal64.parameters()):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(logs) == {"train/clip_fraction", "train/ppo_kl", "train/kl", "train/entropy"}
    if reused:
        assert 0 < float(logs["train/clip_fraction"]) < 1
    else:
        assert float(logs["train/clip_fraction"]) == 0 and float(logs["train/ppo_kl"]) == 0


class HalfWeights(TokenMethod):
    def compute(self, stats, pl_module):
        return TokenMethodOutput(weights=torch.full_like(stats.nll, 0.5), logs={"seen": 1.0})


class ReplacesLoss(TokenMethod):
    def compute(self, stats, pl_module):
        return TokenMethodOutput(loss=stats.nll)


def test_token_method_weights_scale_the_advantages_and_a_replaced_loss_is_refused():
    model = _model()
    model.configure_model()
    rollout = _rollout(model)
    plain, keep, _ = model.objective(rollout)
    halved, keep2, _ = model.objective(rollout, [HalfWeights()])
    torch.testing.assert_close(halved, 0.5 * plain)
    assert keep.equal(keep2)
    # DFT weighs each token by its detached probability: the advantage of token t becomes A * p_t
    weighted, _, _ = model.objective(rollout, [DFT()])
    with torch.no_grad():
        p = torch.exp(-model._stats(rollout.batch, with_entropy=False).nll)
    torch.testing.assert_close(weighted, plain * p)
    with pytest.raises(ConfigError, match="ReplacesLoss replaces the per-token loss"):
        model.objective(rollout, [ReplacesLoss()])


def test_rollout_samples_groups_scores_them_and_is_seeded():
    model, dm = _model(num_generations=4), _data()
    model.configure_model()
    dm.tokenizer = model.tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model.rollout_seed = 5
    state = torch.get_rng_state()
    first = model.rollout(batch)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    model.rollouts_done = 0
    again = model.rollout(batch)
    assert first.completions == again.completions and torch.equal(first.batch["input_ids"], again.batch["input_ids"])
    second = model.rollout(batch)  # the next rollout has its own seed
    assert second.completions != first.completions
    assert first.prompts == [p for p in batch["prompts"] for _ in range(4)]
    assert first.batch["input_ids"].shape[0] == 8
    groups = torch.arange(2).repeat_interleave(4)
    torch.testing.assert_close(first.advantages, group_advantages(first.rewards, groups))
    expected = [r for r in model.rewards(first.completions, first.prompts, {
        "answers": [a for a in batch["answers"] for _ in range(4)], "domains": [d for d in batch["domains"] for _ in range(4)],
    }).total.tolist()]
    assert first.rewards.tolist() == expected
    # labels are exactly the completion tokens, and decode to the scored completions
    for row in range(8):
        ids = first.batch["labels"][row]
        text = model.tokenizer.decode(ids[ids != -100], skip_special_tokens=True)
        assert text == first.completions[row]


def _fit(tmp_path, max_steps, ckpt=None, every=None, **model_kwargs):
    pl.seed_everything(3, verbose=False)
    # a constant learning rate: the cosine schedule would depend on max_steps, which the split runs change
    optimizer = OptimizerSettings(lr=3e-3, warmup=0, min_lr_ratio=1.0)
    model, dm = _model(**{"rewards": [DIGITS], "optimizer": optimizer, **model_kwargs}), _data(num_train=40)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(trainer.callback_metrics["train/loss"]), float(trainer.callback_metrics["train/reward"])))

    callbacks = [Record()]
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=every, save_top_k=-1))
    trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every))
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model, trainer, losses


def test_fit_logs_and_writes_completions(tmp_path):
    model, trainer, losses = _fit(tmp_path, 2, entropy_coef=0.001, log_completions=2)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/reward", "train/reward_std", "train/advantage_std", "train/clip_fraction",
                "train/entropy", "train/completion_length", "train/truncated_fraction", "train/rewards/digit_share/mean"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    lines = [json.loads(line) for line in open(os.path.join(str(tmp_path), "completions.jsonl"))]
    assert len(lines) == 4 and {"step", "prompt", "completion", "reward", "advantage", "digit_share"} <= set(lines[0])
    assert model.rollouts_done == 2


def test_resume_mid_rollout_equals_the_uninterrupted_run(tmp_path):
    """num_iterations=2 and a checkpoint after step 3: the saved rollout is half used, and the resumed run
    must reuse it, then sample what the uninterrupted run sampled."""
    full, _, full_losses = _fit(tmp_path / "a", 5, num_iterations=2)
    _fit(tmp_path / "b", 3, every=3, num_iterations=2)
    resumed, _, resumed_losses = _fit(tmp_path / "c", 5, ckpt=str(tmp_path / "b" / "ckpt" / "epoch=0-step=3.ckpt"), num_iterations=2)
    assert resumed_losses == full_losses[3:]
    assert len({loss for loss, _ in full_losses}) == 5 and any(reward > 0 for _, reward in full_losses)  # not vacuous
    assert resumed.rollouts_done == full.rollouts_done == 3
    for a, b in zip(full.causal_lm.parameters(), resumed.causal_lm.parameters()):
        assert torch.equal(a, b)


def test_bad_settings_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="no `reference` is configured"):
        _model(beta=0.1)
    scores = tmp_path / "scores.safetensors"
    scores.write_bytes(b"")
    with pytest.raises(ConfigError, match="reference.mode=offline"):
        _model(beta=0.1, reference=ReferenceSettings(mode="offline", scores_file=str(scores)))
    with pytest.raises(ConfigError, match="num_generations=1 must be an integer >= 2"):
        _model(num_generations=1)
    with pytest.raises(ConfigError, match="loss_agg='mean'"):
        _model(loss_agg="mean")
    with pytest.raises(ConfigError, match="top_p=1.5"):
        _model(top_p=1.5)


def test_bad_runs_fail_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="GRPO needs `rewards`"):
        _trainer(tmp_path, max_steps=1).fit(_model(rewards=None), _data())
    with pytest.raises(ConfigError, match=r"no \['prompt_input_ids', 'prompt_attention_mask', 'prompts'\].*train_format='prompts'"):
        _trainer(tmp_path, max_steps=1).fit(_model(), _data(train_format="sft"))

    class Ones(BatchTokenMethod):
        def token_weights(self, batch, pl_module):
            return None

    with pytest.raises(ConfigError, match=r"\['Ones'\] weigh the data batch.*GRPO trains on rollouts"):
        _trainer(tmp_path, max_steps=1, callbacks=[Ones()]).fit(_model(), _data())


def test_divergence_weighted_advantage_reweights_by_the_k3_kl_to_the_sampling_policy():
    from lightning_tokens import DivergenceWeightedAdvantage
    from lightning_tokens.rl import divergence_weighted_advantages, policy_loss_per_token

    model = _model()
    model.configure_model()
    rollout = _rollout(model)
    on_policy, _, _ = model.objective(rollout, [DivergenceWeightedAdvantage()])
    plain, _, _ = model.objective(rollout)
    torch.testing.assert_close(on_policy, plain)  # KL = 0 on the first update: every weight is 1
    with torch.no_grad():
        logp = -model._stats(rollout.batch, with_entropy=False).nll
    rollout.old_logp = logp + 0.2 * torch.randn(logp.shape)
    got, keep, _ = model.objective(rollout, [DivergenceWeightedAdvantage(scale=1.0, alpha=-10.0)])
    advantages = divergence_weighted_advantages(rollout.advantages, logp, rollout.old_logp, keep, scale=1.0, alpha=-10.0)
    expected, _ = policy_loss_per_token(logp, rollout.old_logp, advantages, keep)
    torch.testing.assert_close(got, torch.where(keep, expected, torch.zeros_like(expected)))
    assert not torch.allclose(got, model.objective(rollout)[0])


def test_divergence_weighting_needs_grpo(tmp_path):
    from lightning_tokens import DivergenceWeightedAdvantage, TokenLM

    lm = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    with pytest.raises(ConfigError, match="use it with lightning_tokens.GRPO"):
        _trainer(tmp_path, max_steps=1, callbacks=[DivergenceWeightedAdvantage()]).fit(lm, _data(train_format="sft"))


def test_grpo_raises_a_reward_the_random_model_can_reach(tmp_path):
    """The optimiser end to end: sampled completions' share of digits climbs from about 0.2 (random weights
    over 50 characters) to above 0.6 in 60 steps."""
    pl.seed_everything(0, verbose=False)
    model = _model(rewards=[DIGITS], num_generations=8, max_completion_length=6,
                   optimizer=OptimizerSettings(lr=1e-3, warmup=0, min_lr_ratio=1.0),
                   model_config={**TINY, "hidden_size": 64, "intermediate_size": 128})
    rewards = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["train/reward"]))

    _trainer(tmp_path, max_steps=60, callbacks=[Record()]).fit(model, _data(num_train=480, batch_size=8))
    assert sum(rewards[:10]) / 10 < 0.35 and sum(rewards[-10:]) / 10 > 0.6, rewards
