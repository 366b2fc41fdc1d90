"""GRAO's objective (Eq. 3, spec §11) against the spec's numeric check and a float64 plain-Python loop."""

import math
import random

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl import grao_objective, sequence_log_likelihood

SPEC = {"rewards": [1.0, 0.0, 0.5], "reference_reward": 1.0, "exploration": [-0.8, -1.5, -1.0], "imitation": -1.2}


def naive_grao(rewards, ref_reward, j_exp, j_imit, beta, lam, reference_in_group, unbiased, eps):
    """One query, plain floats: J and its three parts, Eq. 3 term by term."""

    def stats(values):
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1 if unbiased else n)
        return mean, math.sqrt(var)

    def adv(value, members):
        mean, std = stats(members)
        return 0.0 if std + eps == 0 else (value - mean) / (std + eps)

    joint = rewards + [ref_reward]
    a_o = [adv(r, joint if reference_in_group else rewards) for r in rewards]
    a_y = adv(ref_reward, joint)
    g = len(rewards)
    explore = sum(a * j for a, j in zip(a_o, j_exp)) / g
    imitate = sum(beta * a_y * j_imit for _ in range(g)) / g
    align = sum(lam * a * (j - j_imit) for a, j in zip(a_o, j_exp)) / g
    return explore + imitate + align, (explore, imitate, align), a_o, a_y


def test_spec_check_value():
    out = grao_objective(
        torch.tensor(SPEC["rewards"], dtype=torch.float64),
        SPEC["reference_reward"],
        torch.tensor(SPEC["exploration"], dtype=torch.float64),
        SPEC["imitation"],
    )
    assert out.objective.item() == pytest.approx(0.221108, abs=5e-7)
    assert out.loss.item() == -out.objective.item()
    parts = out.exploration + out.imitation + out.alignment
    assert parts.item() == pytest.approx(out.objective.item(), abs=1e-15)


def test_spec_advantages_without_eps():
    out = grao_objective(
        torch.tensor(SPEC["rewards"], dtype=torch.float64),
        SPEC["reference_reward"],
        torch.tensor(SPEC["exploration"], dtype=torch.float64),
        SPEC["imitation"],
        eps=0.0,
    )  # μ = 0.625, population σ = 0.414578 over (o_1, o_2, o_3, y)
    expected = torch.tensor([0.904534, -1.507557, -0.301511], dtype=torch.float64)
    assert torch.allclose(out.sample_advantages, expected, atol=5e-7, rtol=0)
    assert out.reference_advantage.item() == pytest.approx(0.904534, abs=5e-7)
    assert out.objective.item() == pytest.approx(0.221108, abs=5e-7)


@pytest.mark.parametrize("reference_in_group", [True, False])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_a_float64_loop(seed, reference_in_group, unbiased):
    rng = random.Random(seed)
    queries, group = 3, rng.randint(2, 6)
    rewards = [[rng.choice([0.0, 1.0, rng.uniform(-1, 2)]) for _ in range(group)] for _ in range(queries)]
    ref_rewards = [rng.uniform(0, 2) for _ in range(queries)]
    j_exp = [[-rng.uniform(0.1, 3) for _ in range(group)] for _ in range(queries)]
    j_imit = [-rng.uniform(0.1, 3) for _ in range(queries)]
    beta, lam, eps = rng.uniform(0, 1), rng.uniform(0, 1), 1e-6
    out = grao_objective(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(ref_rewards, dtype=torch.float64),
        torch.tensor(j_exp, dtype=torch.float64),
        torch.tensor(j_imit, dtype=torch.float64),
        beta=beta,
        lam=lam,
        reference_in_group=reference_in_group,
        unbiased=unbiased,
        eps=eps,
    )
    per_query = [
        naive_grao(rewards[q], ref_rewards[q], j_exp[q], j_imit[q], beta, lam, reference_in_group, unbiased, eps)
        for q in range(queries)
    ]
    assert out.objective.item() == pytest.approx(sum(p[0] for p in per_query) / queries, abs=1e-12)
    for k, part in enumerate((out.exploration, out.imitation, out.alignment)):
        assert part.item() == pytest.approx(sum(p[1][k] for p in per_query) / queries, abs=1e-12)
    assert out.sample_advantages.shape == (queries, group) and out.reference_advantage.shape == (queries,)
    for q in range(queries):
        assert out.sample_advantages[q].tolist() == pytest.approx(per_query[q][2], abs=1e-12)
        assert out.reference_advantage[q].item() == pytest.approx(per_query[q][3], abs=1e-12)


def test_the_flag_changes_the_sample_advantages_only():
    args = (torch.tensor([1.0, 0.0, 0.5]), 1.0, torch.tensor([-0.8, -1.5, -1.0]), -1.2)
    joint, alone = grao_objective(*args), grao_objective(*args, reference_in_group=False)
    root = math.sqrt(1.5)  # 0.5 / population σ of (1, 0, 0.5)
    assert alone.sample_advantages.tolist() == pytest.approx([root, -root, 0.0], abs=1e-5)
    assert alone.reference_advantage.item() == joint.reference_advantage.item()
    assert alone.objective.item() != pytest.approx(joint.objective.item())


def test_gradients_flow_through_the_log_likelihoods_only():
    rewards = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    j_exp = torch.tensor([-0.8, -1.5, -1.0], dtype=torch.float64, requires_grad=True)
    j_imit = torch.tensor(-1.2, dtype=torch.float64, requires_grad=True)
    beta, lam = 0.5, 0.6
    out = grao_objective(rewards, 1.0, j_exp, j_imit, beta=beta, lam=lam)
    out.objective.backward()
    a_o, a_y = out.sample_advantages, out.reference_advantage
    assert rewards.grad is None
    assert torch.allclose(j_exp.grad, (1 + lam) * a_o / 3)  # ∂J/∂J_exp(o_i) = (1 + λ)·Â_i / G
    assert j_imit.grad.item() == pytest.approx((beta * a_y - lam * a_o.mean()).item())


def test_sequence_log_likelihood_feeds_the_objective():
    logp = torch.tensor([[-1.0, -3.0, -7.0], [-2.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_log_likelihood(logp, mask).tolist() == [-2.0, -2.0]
    assert sequence_log_likelihood(logp, torch.zeros(2, 3)).tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="mask"):
        sequence_log_likelihood(logp, torch.ones(2, 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rewards": torch.zeros(2, 0)}, "rewards"),
        ({"rewards": torch.zeros(2, 2, 2)}, "rewards"),
        ({"exploration": torch.zeros(4)}, "exploration"),
        ({"reference_reward": torch.zeros(2)}, "reference_reward"),
        ({"imitation": torch.zeros(3)}, "imitation"),
        ({"beta": float("nan")}, "beta"),
        ({"eps": -1.0}, "eps"),
        (
            {"rewards": torch.ones(1), "exploration": torch.ones(1), "unbiased": True, "reference_in_group": False},
            "unbiased",
        ),
    ],
)
def test_errors(kwargs, match):
    args = {"rewards": torch.ones(3), "reference_reward": 1.0, "exploration": torch.ones(3), "imitation": -1.0} | kwargs
    with pytest.raises(ConfigError, match=match):
        grao_objective(**args)
