"""One-Token Rollout: the spec's values, a float64 reference, the sampled estimator's mean, DFT at tau = 1."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_tokens import NUPADataModule, OneTokenRollout, TokenLM
from lightning_tokens.callbacks.otr import otr_loss
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules import OptimizerSettings

LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0]])


@pytest.mark.parametrize(("temperature", "expected"), [(1.0, 0.179585), (1.5, 0.094858)])
def test_exact_loss_matches_the_spec(temperature, expected):
    assert otr_loss(LOGITS, torch.tensor([0]), beta=-0.1, temperature=temperature).item() == pytest.approx(expected, abs=1e-6)


def _naive(hidden, weight, targets, beta, temperature):
    logits = hidden.double() @ weight.double().T
    logp = F.log_softmax(logits, -1)
    q = F.softmax(logits.detach() / temperature, -1)
    reward = torch.full_like(q, beta).scatter(-1, targets.unsqueeze(-1), 1.0)
    return -(q * reward * logp).sum(-1)


def test_fused_chunks_equal_a_float64_full_logits_reference_with_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    ours = otr_loss(hidden, targets, weight, beta=-0.2, temperature=1.3, chunk_size=5)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = _naive(h64, w64, targets, -0.2, 1.3)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_sampled_estimator_is_unbiased():
    exact = otr_loss(LOGITS, torch.tensor([0]), beta=-0.1).item()
    values = []
    for seed in range(200):
        torch.manual_seed(seed)
        values.append(otr_loss(LOGITS, torch.tensor([0]), beta=-0.1, estimator="sample", num_samples=256).item())
    values = torch.tensor(values, dtype=torch.float64)
    assert abs(values.mean().item() - exact) < 3 * values.std().item() / len(values) ** 0.5
    assert values.std() > 0


def test_sampled_gradient_uses_the_same_draws_in_the_checkpointed_backward():
    """The backward recomputes each chunk: it must reuse the forward's draws (the RNG state is replayed)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, generator=g)
    targets = torch.randint(0, 9, (6,), generator=g)
    torch.manual_seed(5)
    loss = otr_loss(hidden, targets, weight, estimator="sample", num_samples=8, chunk_size=2)
    loss.sum().backward()
    # the same draws without checkpointing: per-row weights w (counts / K * reward), loss = -(w * logp).sum()
    torch.manual_seed(5)
    with torch.no_grad():
        plain = otr_loss(hidden, targets, weight, estimator="sample", num_samples=8, chunk_size=2)
    torch.testing.assert_close(loss.detach(), plain)
    h = hidden.detach().requires_grad_()
    torch.manual_seed(5)
    rebuilt = []
    for start in range(0, 6, 2):
        logits = F.linear(h[start : start + 2], weight)
        with torch.no_grad():
            q = F.softmax(logits, -1)
            draws = torch.multinomial(q, 8, replacement=True)
            w = torch.zeros_like(q).scatter_add_(-1, draws, torch.ones_like(draws, dtype=q.dtype)) / 8
            w = w * torch.full_like(q, -0.1).scatter(-1, targets[start : start + 2].unsqueeze(-1), 1.0)
        rebuilt.append(-(w * F.log_softmax(logits, -1)).sum(-1))
    torch.cat(rebuilt).sum().backward()
    torch.testing.assert_close(hidden.grad, h.grad)


def test_at_temperature_one_the_gradient_is_dft_scaled_by_one_minus_beta():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=g)
    otr_loss(logits, targets, beta=-0.3).sum().backward()
    otr_grad = logits.grad.clone()
    logits.grad = None
    logp = F.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (-(logp.detach().exp() * logp)).sum().backward()  # DFT: -sg(p) log p
    torch.testing.assert_close(otr_grad, 1.3 * logits.grad, rtol=1e-5, atol=1e-6)


def test_bad_settings():
    with pytest.raises(ConfigError, match="beta=1.0 must be < 1"):
        OneTokenRollout(beta=1.0)
    with pytest.raises(ConfigError, match="estimator='mc'"):
        OneTokenRollout(estimator="mc")
    with pytest.raises(ConfigError, match="temperature=0"):
        OneTokenRollout(temperature=0)


def test_token_lm_trains_with_otr(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", optimizer=OptimizerSettings(lr=3e-3, warmup=0),
                    model_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2})
    dm = NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=64, num_val=4, num_test=4, batch_size=8)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=str(tmp_path),
                         callbacks=[OneTokenRollout(beta=-0.1, temperature=1.5, estimator="sample", num_samples=16)])
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "train/OneTokenRollout/loss" in metrics
    # train/loss is OTR's token mean, train/nll the plain NLL of the same tokens
    assert metrics["train/loss"].item() != pytest.approx(metrics["train/nll"].item())
