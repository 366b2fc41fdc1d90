"""`group_advantages` against verl's check value and a float64 plain-Python loop; `token_advantages`;
the divergence weights of "Sparse but Critical" (spec §10)."""

import math
import random

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl import (
    divergence_weighted_advantages,
    divergence_weights,
    group_advantages,
    token_advantages,
)


def naive_group_advantages(rewards, ids, eps=1e-6, norm_by_std=True):
    """Plain Python floats, the reference's rules spelled out: unbiased std, a group of one → mean 0, std 1."""
    groups = {}
    for r, g in zip(rewards, ids):
        groups.setdefault(g, []).append(r)
    stats = {}
    for g, members in groups.items():
        n = len(members)
        if n == 1:
            stats[g] = (0.0, 1.0)
        else:
            mean = sum(members) / n
            stats[g] = (mean, math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1)))
    out = []
    for r, g in zip(rewards, ids):
        mean, std = stats[g]
        out.append((r - mean) / (std + eps) if norm_by_std else r - mean)
    return out


def test_spec_check_value():
    adv = group_advantages(torch.tensor([1.0, 0.1, 0.0, 1.0, 1.0]), torch.zeros(5, dtype=torch.long))
    expected = torch.tensor([0.7286, -0.9971, -1.1888, 0.7286, 0.7286])
    assert torch.allclose(adv, expected, atol=5e-5, rtol=0), adv


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("id_kind", ["tensor", "str"])
@pytest.mark.parametrize("seed", range(5))
def test_matches_a_float64_loop_over_random_groups(seed, id_kind, norm_by_std):
    rng = random.Random(seed)
    sizes = [1, 1, rng.randint(2, 6), rng.randint(2, 6), rng.randint(1, 6), 2]  # groups of one included
    ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(ids)  # groups need not be contiguous
    rewards = [rng.choice([0.0, 1.0, rng.uniform(-2, 2)]) for _ in ids]
    group_ids = torch.tensor(ids) * 7 + 3 if id_kind == "tensor" else [f"uid-{g}" for g in ids]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_ids, norm_by_std=norm_by_std)
    want = naive_group_advantages(rewards, ids, norm_by_std=norm_by_std)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_a_group_of_one_keeps_its_reward_and_equal_rewards_give_zero():
    adv = group_advantages(torch.tensor([0.7, 1.0, 1.0, 1.0]), [0, 1, 1, 1], eps=1e-6)
    assert adv[0].item() == pytest.approx(0.7 / (1 + 1e-6), abs=1e-7)  # mean 0, std 1, as the reference
    assert torch.equal(adv[1:], torch.zeros(3))


def test_token_level_rewards_are_summed_and_results_detached():
    token_rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]], requires_grad=True)
    adv = group_advantages(token_rewards, [0, 0, 0])
    assert not adv.requires_grad
    assert torch.allclose(adv, group_advantages(torch.tensor([1.0, 0.0, 0.5]), [0, 0, 0]))
    assert group_advantages(torch.tensor([1, 0]), [0, 0]).dtype == torch.float32  # int rewards → float


def test_dr_grpo_does_not_divide_by_std():
    adv = group_advantages(torch.tensor([2.0, 0.0, 1.0, 3.0]), [0, 0, 1, 1], norm_by_std=False)
    assert torch.equal(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]))


@pytest.mark.parametrize(
    "rewards, ids, match",
    [
        (torch.tensor([]), [], "empty"),
        (torch.tensor([1.0, 0.0]), [0], "group_ids"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]), "group_ids"),
        (torch.zeros(2, 2, 2), [0, 0], "rewards"),
        (torch.tensor([1.0]), [[0]], "hashable"),
    ],
)
def test_bad_inputs_are_config_errors(rewards, ids, match):
    with pytest.raises(ConfigError, match=match):
        group_advantages(rewards, ids)
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        group_advantages(rewards, ids)


def test_negative_eps_is_rejected():
    with pytest.raises(ConfigError, match="eps"):
        group_advantages(torch.tensor([1.0, 0.0]), [0, 0], eps=-1.0)


def test_token_advantages_broadcast_under_the_mask():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = token_advantages(torch.tensor([0.5, -2.0]), mask)
    assert torch.equal(out, torch.tensor([[0.5, 0.5, 0.0], [-2.0, 0.0, 0.0]]))
    per_token = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(token_advantages(per_token, mask), per_token * mask)
    with pytest.raises(ConfigError, match="advantages"):
        token_advantages(torch.ones(3), mask)
    with pytest.raises(ConfigError, match="mask"):
        token_advantages(torch.ones(2), torch.ones(2))


def test_divergence_weights_spec_check():
    kl = torch.tensor([0.0, 0.01, 0.1, 1.0], dtype=torch.float64)
    high = divergence_weights(kl, scale=1.0, alpha=10.0)
    low = divergence_weights(kl, scale=1.0, alpha=-10.0)
    assert torch.allclose(high, torch.tensor([1, 1.024979, 1.231059, 1.499955], dtype=torch.float64), atol=5e-7, rtol=0)
    assert torch.allclose(low, torch.tensor([1, 0.975021, 0.768941, 0.500045], dtype=torch.float64), atol=5e-7, rtol=0)


def test_divergence_weights_range_and_detached():
    kl = torch.linspace(-5, 50, 101, requires_grad=True)
    for scale in (0.0, 0.5, 2.0):
        w = divergence_weights(kl, scale=scale, alpha=3.0)
        assert not w.requires_grad
        assert float(w.min()) >= 1 - scale / 2 - 1e-6 and float(w.max()) <= 1 + scale / 2 + 1e-6
    with pytest.raises(ConfigError, match="scale"):
        divergence_weights(kl, scale=2.5)
    with pytest.raises(ConfigError, match="alpha"):
        divergence_weights(kl, alpha=float("nan"))


def test_divergence_weighted_advantages_use_k3_of_old_vs_current():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.5, -3.0]], dtype=torch.float64)
    logp = torch.tensor([[-1.2, -2.0, -0.1], [-1.0, -4.0, -3.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    got = divergence_weighted_advantages(adv, logp, old, mask, scale=0.8, alpha=5.0)
    assert not got.requires_grad
    for i in range(2):
        for t in range(3):
            log_r = logp[i, t].item() - old[i, t].item()  # π_θ / π_old on a token sampled from π_old
            kl = math.exp(log_r) - 1 - log_r
            w = 1 + 0.8 * (1 / (1 + math.exp(-5.0 * kl)) - 0.5)
            assert got[i, t].item() == pytest.approx(adv[i].item() * w * mask[i, t].item(), abs=1e-12)
    on_policy = divergence_weighted_advantages(adv, old, old, mask)
    assert torch.equal(on_policy, token_advantages(adv, mask))
    with pytest.raises(ConfigError, match="old_logp"):
        divergence_weighted_advantages(adv, logp, old[:, :2], mask)
