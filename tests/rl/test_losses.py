"""`policy_loss`, `aggregate` and `kl_penalty` against float64 plain-Python loops, hand values and gradcheck;
TRL's loss types (their formulas written out here) against the verl modes they alias."""

import math
import random

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl import AGG_MODES, KL_KINDS, TRL_LOSS_TYPES, aggregate, kl_penalty, masked_mean, policy_loss

ALL_MODES = AGG_MODES + tuple(TRL_LOSS_TYPES)


# --- plain-Python references ------------------------------------------------------------------------------


def naive_aggregate(loss, mask, mode, max_len=None, num_tokens=None, num_seqs=None):
    """Lists of lists of floats; the formulas of `aggregate`'s docstring, one loop each."""
    rows = len(loss)
    width = len(loss[0]) if rows else 0
    seq_sum = [sum(l for l, m in zip(lr, mr) if m) for lr, mr in zip(loss, mask)]
    counts = [sum(1 for m in mr if m) for mr in mask]
    kept_rows = [i for i in range(rows) if counts[i] > 0]
    if mode in ("token-mean", "bnpo", "dapo"):
        n = sum(counts) if num_tokens is None or mode == "bnpo" else num_tokens
        return sum(seq_sum) / (n if n > 0 else 1)
    if mode == "seq-mean-token-sum":
        s = len(kept_rows) if num_seqs is None else num_seqs
        return sum(seq_sum[i] for i in kept_rows) / (s if s > 0 else 1)
    if mode == "seq-mean-token-mean":
        s = len(kept_rows) if num_seqs is None else num_seqs
        return sum(seq_sum[i] / counts[i] for i in kept_rows) / (s if s > 0 else 1)
    length = width if max_len is None else max_len
    if mode == "seq-mean-token-sum-norm":
        return sum(seq_sum) / length
    if mode == "dr_grpo":
        return sum(seq_sum) / (rows * length)
    if mode == "grpo":
        return sum(seq_sum[i] / max(counts[i], 1) for i in range(rows)) / rows
    raise AssertionError(mode)


def naive_token_losses(logp, old, adv, clip_low, clip_high, dual_clip):
    """Per-token clipped surrogate and the three statistics' indicator values, as verl defines them."""
    losses, clipped_flags, kls, lower_flags = [], [], [], []
    for lp_row, old_row, a_row in zip(logp, old, adv):
        l_row, c_row, k_row, d_row = [], [], [], []
        for lp, o, a in zip(lp_row, old_row, a_row):
            log_ratio = min(max(lp - o, -20.0), 20.0)
            ratio = math.exp(log_ratio)
            plain = -a * ratio
            clipped = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            loss = max(plain, clipped)
            lower = False
            if dual_clip is not None and a < 0:
                lower = loss > -a * dual_clip
                loss = min(loss, -a * dual_clip)
            l_row.append(loss)
            c_row.append(1.0 if clipped > plain else 0.0)
            k_row.append(-log_ratio)
            d_row.append(1.0 if lower else 0.0)
        losses.append(l_row)
        clipped_flags.append(c_row)
        kls.append(k_row)
        lower_flags.append(d_row)
    return losses, clipped_flags, kls, lower_flags


def naive_masked_mean(values, mask):
    kept = [v for vr, mr in zip(values, mask) for v, m in zip(vr, mr) if m]
    return sum(kept) / len(kept) if kept else 0.0


def random_batch(seed, rows=5, width=7, spread=1.7, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + (torch.rand(rows, width, generator=g, dtype=torch.float64) * 2 - 1) * spread
    mask = (torch.rand(rows, width, generator=g) < 0.7).to(torch.float64)
    mask[:, 0] = 1
    if empty_row:
        mask[rows - 1] = 0  # a fully masked row: the modes disagree on it
    adv = torch.randn(rows, generator=g, dtype=torch.float64)
    adv[0] = -abs(adv[0]) - 0.5
    return logp, old, adv, mask


# --- kl_penalty ---------------------------------------------------------------------------------------------


def test_k3_spec_check():
    value = kl_penalty(
        torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.2], dtype=torch.float64), "low_var_kl"
    )
    assert value.item() == pytest.approx(0.018731, abs=5e-7)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("kl", [0.2, -0.5]),
        ("k1", [0.2, -0.5]),
        ("abs", [0.2, 0.5]),
        ("mse", [0.02, 0.125]),
        ("k2", [0.02, 0.125]),
        ("low_var_kl", [math.exp(-0.2) + 0.2 - 1, math.exp(0.5) - 0.5 - 1]),
        ("k3", [0.0187307531, 0.1487212707]),
    ],
)
def test_kl_estimators_on_hand_values(kind, expected):
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.2, -1.5], dtype=torch.float64)  # δ = logp − ref = 0.2, −0.5
    assert torch.allclose(kl_penalty(logp, ref, kind), torch.tensor(expected, dtype=torch.float64), atol=1e-10)


def test_k3_is_clamped_to_ten_and_stops_its_gradient_there():
    logp = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([15.0, -30.0, 2.0, -2.0], dtype=torch.float64)
    value = kl_penalty(logp, ref, "low_var_kl")
    unclamped = [math.exp(2.0) - 3.0, math.exp(-2.0) + 1.0]
    assert value.tolist()[:2] == [10.0, 10.0]
    assert value.tolist()[2:] == pytest.approx(unclamped, abs=1e-12)
    value.sum().backward()
    assert logp.grad[:2].tolist() == [0.0, 0.0]
    assert logp.grad[2:].tolist() == pytest.approx([1 - math.exp(2.0), 1 - math.exp(-2.0)], abs=1e-12)


def test_straight_through_variant_keeps_the_value_and_takes_the_k2_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.3], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.2, -1.5, -0.3], dtype=torch.float64)
    value = kl_penalty(logp, ref, "k3+")
    assert torch.allclose(value, kl_penalty(logp, ref, "k3"))
    value.sum().backward()
    assert torch.allclose(logp.grad, (logp - ref).detach())
    assert set(KL_KINDS) >= {"kl", "abs", "mse", "low_var_kl"}


def test_kl_penalty_errors():
    with pytest.raises(ConfigError, match="kind='full'"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "full")
    with pytest.raises(ConfigError, match="ref_logp"):
        kl_penalty(torch.zeros(2), torch.zeros(3), "k1")


# --- aggregate ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("seed", range(4))
def test_aggregate_matches_loops(mode, seed):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 6, generator=g) < 0.6).to(torch.float64)
    mask[seed % 4] = 0  # one fully masked row
    got = aggregate(loss, mask, mode)
    assert got.item() == pytest.approx(naive_aggregate(loss.tolist(), mask.tolist(), mode), abs=1e-12)
    got = aggregate(loss, mask, mode, max_len=10, num_tokens=11.0, num_seqs=torch.tensor(2.0))
    want = naive_aggregate(loss.tolist(), mask.tolist(), mode, max_len=10, num_tokens=11.0, num_seqs=2.0)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_aggregate_hand_values_and_padding_nans():
    loss = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, float("inf"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    values = {mode: aggregate(loss, mask, mode).item() for mode in ALL_MODES}
    assert values == pytest.approx(
        {
            "token-mean": 10 / 4,
            "seq-mean-token-sum": (6 + 4) / 2,
            "seq-mean-token-mean": (2 + 4) / 2,
            "seq-mean-token-sum-norm": 10 / 4,
            "grpo": (2 + 4) / 2,
            "bnpo": 10 / 4,
            "dapo": 10 / 4,
            "dr_grpo": 10 / (2 * 4),
        }
    )


def test_an_empty_mask_gives_zero_not_nan():
    for mode in ALL_MODES:
        assert aggregate(torch.ones(2, 3), torch.zeros(2, 3), mode).item() == 0.0


def test_aggregate_errors():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ConfigError, match="'seq-mean'"):
        aggregate(loss, mask, "seq-mean")
    with pytest.raises(ConfigError, match="mask"):
        aggregate(loss, torch.ones(2, 4), "token-mean")
    with pytest.raises(ConfigError, match=r"\(B, T\)"):
        aggregate(torch.ones(6), torch.ones(6), "token-mean")
    with pytest.raises(ConfigError, match="max_len"):
        aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=0)
    with pytest.raises(ConfigError, match="num_tokens"):
        aggregate(loss, mask, "token-mean", num_tokens=0)


# --- TRL's loss types ---------------------------------------------------------------------------------------


def test_trl_aliases_name_verl_modes_and_say_how_they_differ():
    assert set(TRL_LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo"}
    assert {name: alias.agg for name, alias in TRL_LOSS_TYPES.items()} == {
        "grpo": "seq-mean-token-mean",
        "bnpo": "token-mean",
        "dapo": "token-mean",
        "dr_grpo": "seq-mean-token-sum-norm",
    }
    assert all(len(alias.notes) > 80 for alias in TRL_LOSS_TYPES.values())


def test_trl_aliases_coincide_where_documented_and_differ_where_documented():
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(4, 5, generator=g, dtype=torch.float64)
    full = torch.ones(4, 5, dtype=torch.float64)
    full[1, 3:] = 0
    for name in ("grpo", "bnpo", "dapo"):  # no fully masked row, one process: the same value
        assert aggregate(loss, full, name).item() == pytest.approx(
            aggregate(loss, full, TRL_LOSS_TYPES[name].agg).item()
        )
    # dr_grpo is verl's seq-mean-token-sum-norm divided by B
    verl = aggregate(loss, full, "seq-mean-token-sum-norm", max_len=8)
    assert aggregate(loss, full, "dr_grpo", max_len=8).item() == pytest.approx(verl.item() / 4)
    # a fully masked row counts in TRL's grpo mean, not in verl's seq-mean-token-mean
    holed = full.clone()
    holed[2] = 0
    trl, ours = aggregate(loss, holed, "grpo").item(), aggregate(loss, holed, "seq-mean-token-mean").item()
    assert trl == pytest.approx(ours * 3 / 4)


def trl_clipped_loss(logp, old, adv, eps_low, eps_high, delta):
    """TRL GRPOTrainer._compute_loss, token level, loss_type in {grpo, bnpo, dr_grpo, dapo}, written out."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    a = adv.unsqueeze(1)
    return -torch.min(coef_1 * a, coef_2 * a)


@pytest.mark.parametrize("delta", [None, 2.0, 3.0])
def test_trl_delta_is_verl_dual_clip(delta):
    logp, old, adv, mask = random_batch(11, empty_row=False)
    logp = logp.clone().requires_grad_()
    ours, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=delta, agg="bnpo")
    (grad_ours,) = torch.autograd.grad(ours, logp)
    theirs = aggregate(trl_clipped_loss(logp, old, adv, 0.2, 0.28, delta), mask, "bnpo")
    (grad_theirs,) = torch.autograd.grad(theirs, logp)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-12)


# --- policy_loss --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_matches_a_float64_loop(seed, mode, dual_clip):
    logp, old, adv, mask = random_batch(seed)
    clip_low, clip_high = 0.2, 0.28
    per_token_adv = seed == 2
    adv_in = adv.unsqueeze(1).expand_as(logp) * torch.linspace(0.5, 1.5, logp.shape[1]) if per_token_adv else adv
    adv_rows = adv_in.tolist() if per_token_adv else [[a] * logp.shape[1] for a in adv.tolist()]
    loss, stats = policy_loss(logp, old, adv_in, mask, clip_low, clip_high, dual_clip, agg=mode, max_len=9)
    losses, clipped, kls, lower = naive_token_losses(
        logp.tolist(), old.tolist(), adv_rows, clip_low, clip_high, dual_clip
    )
    m = mask.tolist()
    assert loss.item() == pytest.approx(naive_aggregate(losses, m, mode, max_len=9), abs=1e-12)
    assert stats.pg_clipfrac.item() == pytest.approx(naive_masked_mean(clipped, m), abs=1e-12)
    assert stats.ppo_kl.item() == pytest.approx(naive_masked_mean(kls, m), abs=1e-12)
    assert 0 < stats.pg_clipfrac.item() < 1
    if dual_clip is None:
        assert stats.pg_clipfrac_lower is None
    else:
        assert stats.pg_clipfrac_lower.item() == pytest.approx(naive_masked_mean(lower, m), abs=1e-12)


def test_dual_clip_is_active_in_the_random_batches():
    logp, old, adv, mask = random_batch(0)
    _, stats = policy_loss(logp, old, adv, mask, dual_clip=2.0)
    assert stats.pg_clipfrac_lower.item() > 0


def test_clip_fraction_on_a_hand_case():
    logp = torch.log(torch.tensor([[0.5, 0.9], [0.3, 0.3]], dtype=torch.float64))
    old = torch.log(torch.tensor([[0.25, 0.9], [0.3, 0.6]], dtype=torch.float64))  # ratios 2, 1 | 1, 0.5
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, torch.ones(2, 2))
    assert stats.pg_clipfrac.item() == 0.5  # ratio 2 with A > 0 and ratio 0.5 with A < 0
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.0 + 0.8) / 4)
    _, stats = policy_loss(logp, old, adv, torch.tensor([[0, 1], [1, 1]]))
    assert stats.pg_clipfrac.item() == pytest.approx(1 / 3)
    _, stats = policy_loss(logp, old, adv, torch.ones(2, 2), clip_high=1.5)  # 2 < 2.5: no longer clipped
    assert stats.pg_clipfrac.item() == 0.25
    loss, stats = policy_loss(logp, old, -adv, torch.ones(2, 2), dual_clip=1.5)  # A = −1 on ratio 2: bound 1.5
    assert stats.pg_clipfrac_lower.item() == 0.25
    assert loss.item() == pytest.approx((1.5 + 1.0 - 1.0 - 0.5) / 4)
    assert stats.ppo_kl.item() == pytest.approx((-math.log(2) + math.log(2)) / 4, abs=1e-12)


def _away_from_kinks(seed, c):
    """Log-ratios at least 0.01 from every clip boundary, so finite differences see a smooth function."""
    rng = random.Random(seed)
    kinks = [math.log(0.8), math.log(1.28), math.log(c)]
    values = []
    while len(values) < 15:
        x = rng.uniform(-1.2, 1.5)
        if all(abs(x - k) > 0.01 for k in kinks):
            values.append(x)
    return torch.tensor(values, dtype=torch.float64).reshape(3, 5)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_policy_loss_gradcheck(mode, dual_clip):
    log_ratio = _away_from_kinks(ALL_MODES.index(mode), dual_clip or 50.0)
    old = -torch.rand(3, 5, dtype=torch.float64) - 0.1
    adv = torch.tensor([1.3, -0.7, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.float64)
    logp = (old + log_ratio).requires_grad_()

    def fn(lp):
        return policy_loss(lp, old, adv, mask, 0.2, 0.28, dual_clip, agg=mode, max_len=6)[0]

    assert torch.autograd.gradcheck(fn, (logp,), eps=1e-6, atol=1e-8)
    (grad,) = torch.autograd.grad(fn(logp), logp)
    assert torch.all(grad[mask == 0] == 0)
    assert torch.any(grad != 0)


def test_policy_loss_leaves_old_logp_and_advantages_out_of_the_graph():
    logp, old, adv, mask = random_batch(1)
    old, adv = old.clone().requires_grad_(), adv.clone().requires_grad_()
    logp = logp.clone().requires_grad_()
    loss, stats = policy_loss(logp, old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None
    assert not stats.pg_clipfrac.requires_grad and not stats.ppo_kl.requires_grad


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"dual_clip": float("inf")}, "dual_clip"),
        ({"agg": "seq-sum"}, "agg"),
    ],
)
def test_policy_loss_option_errors(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match=match):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), **kwargs)


def test_policy_loss_shape_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="old_logp"):
        policy_loss(x, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="mask"):
        policy_loss(x, x, torch.zeros(2), torch.ones(3, 2))
    with pytest.raises(ConfigError, match="logp"):
        policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6))


def test_masked_mean_ignores_padding():
    assert masked_mean(torch.tensor([[2.0, float("nan")]]), torch.tensor([[1, 0]])).item() == 2.0
    assert masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0
