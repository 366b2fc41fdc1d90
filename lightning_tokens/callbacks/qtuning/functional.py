"""Q-Tuning's arithmetic, no Lightning: sample coordinates on the Error-Uncertainty plane, quadrant
thresholds by bisection, neighbour-smoothed token pruning, and the whole selection :func:`qtuning_mask`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice

__all__ = [
    "EMPTY",
    "MID",
    "Q1",
    "Q2",
    "Q3",
    "Q4",
    "QTuningSelection",
    "QuadrantThresholds",
    "classify_quadrants",
    "find_quadrant_thresholds",
    "neighbor_token_scores",
    "prune_tokens",
    "qtuning_mask",
    "sample_index",
    "sample_ppl_entropy",
]

NeighborScaling = Literal["sum", "mean"]
Retention = Literal["lowest", "highest"]
EdgeRule = Literal["zero", "self"]
MidRange = Literal["fill", "drop", "assign"]
Bisection = Literal["joint", "separate"]
TokenBudget = Literal["sample", "batch"]

#: Quadrant codes returned by :func:`classify_quadrants`.
Q1, Q2, Q3, Q4 = 1, 2, 3, 4
#: Between the thresholds on at least one axis and not assigned to a quadrant (dropped).
MID = 0
#: A sample without any scored token (not part of the batch statistics).
EMPTY = -1

_MAX_QUANTILE = 0.49  # the bisection bracket of both the authors' code and slime: α, β ∈ [0, 0.49]
_RATIO_SLACK = 1e-9  # ceil(r·n) with this slack, so that e.g. 0.35 × 20 keeps 7, not 8


# ---- sample statistics ----------------------------------------------------------------------------
def sample_index(mask: Tensor, sample_ids: Tensor | None = None) -> tuple[Tensor, int]:
    """The sample each scored token belongs to.

    Args:
        mask: ``(B, T)`` bool, the scored (response) tokens.
        sample_ids: optional ``(B, T)`` integer ids of the example each token belongs to (packed rows:
            ``batch["token_example_ids"]``). ``None``: each row is one sample.

    Returns:
        ``(index, S)``: a ``(B, T)`` long tensor with the sample number ``0..S-1`` of every scored token
        and ``-1`` elsewhere, and the number of samples ``S``. Without ``sample_ids`` sample ``b`` is row
        ``b`` (``S = B``, rows without scored tokens included); with them, samples are the distinct
        ``(row, id)`` pairs that hold a scored token, ordered by row, then id.
    """
    mask = mask.bool()
    rows, length = mask.shape
    if sample_ids is None:
        index = torch.arange(rows, device=mask.device).unsqueeze(1).expand(rows, length)
        return torch.where(mask, index, torch.full_like(index, -1)), rows
    if sample_ids.shape != mask.shape:
        raise ConfigError(f"sample_ids have shape {tuple(sample_ids.shape)}, the mask {tuple(mask.shape)}.")
    row_of = torch.arange(rows, device=mask.device).unsqueeze(1).expand(rows, length)
    pairs = torch.stack([row_of[mask], sample_ids.to(mask.device).long()[mask]], dim=-1)
    index = torch.full((rows, length), -1, dtype=torch.long, device=mask.device)
    if pairs.numel() == 0:
        return index, 0
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    index[mask] = inverse
    return index, int(unique.shape[0])


def sample_ppl_entropy(
    nll: Tensor, entropy: Tensor, mask: Tensor, sample_ids: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's coordinates on the Error-Uncertainty plane, in float64.

    ``PPL = exp(mean NLL)`` and ``Ent = mean entropy`` over the sample's scored tokens.

    Args:
        nll: ``(B, T)`` per-token negative log-likelihood of the label.
        entropy: ``(B, T)`` entropy of the predictive distribution at each position.
        mask: ``(B, T)`` bool, the scored (response) tokens.
        sample_ids: see :func:`sample_index` (``None``: one sample per row).

    Returns:
        ``(ppl, ent, count)``, each ``(S,)``; ``ppl`` and ``ent`` are NaN for samples with no scored token.

    Example:
        >>> nll = torch.tensor([[0.0, 1.84235, 1.720653, 1.386294]])
        >>> ent = torch.tensor([[0.0, 0.87828, 1.10132, 1.386294]])
        >>> ppl, ent, n = sample_ppl_entropy(nll, ent, torch.tensor([[False, True, True, True]]))
        >>> round(ppl.item(), 4), round(ent.item(), 4), n.item()
        (5.2058, 1.122, 3)
    """
    index, count = sample_index(mask, sample_ids)
    scored = index >= 0
    groups = index[scored]
    zeros = torch.zeros(count, dtype=torch.float64, device=nll.device)
    total_nll = zeros.index_add(0, groups, nll.detach()[scored].double())
    total_ent = zeros.index_add(0, groups, entropy.detach()[scored].double())
    counts = torch.zeros(count, dtype=torch.long, device=nll.device).index_add(
        0, groups, torch.ones_like(groups)
    )
    denominator = counts.double()
    nan = torch.full_like(zeros, math.nan)
    ppl = torch.where(counts > 0, torch.exp(total_nll / denominator.clamp(min=1)), nan)
    ent = torch.where(counts > 0, total_ent / denominator.clamp(min=1), nan)
    return ppl, ent, counts


# ---- quadrants --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuadrantThresholds:
    """Quantile thresholds of one batch: ``ppl_low = Q_α(PPL)``, ``ppl_high = Q_{1-α}(PPL)``,
    ``ent_low = Q_β(Ent)``, ``ent_high = Q_{1-β}(Ent)``; ``kept_fraction`` is ``|Q2 ∪ Q4| / S`` they give
    (strict quadrants, before any mid-range assignment)."""

    alpha: float
    beta: float
    ppl_low: float
    ppl_high: float
    ent_low: float
    ent_high: float
    kept_fraction: float


def _strict_quadrants(ppl: Tensor, ent: Tensor, th: QuadrantThresholds) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample: (ppl high, ppl low, ent high, ent low), the authors' inequalities.

    High means strictly above the upper threshold, low means at or below the lower one (authors' code:
    ``ppl > Q_{1-α}``, ``ppl <= Q_α``, ``ent > Q_{1-β}``, ``ent <= Q_β``)."""
    return ppl > th.ppl_high, ppl <= th.ppl_low, ent > th.ent_high, ent <= th.ent_low


def _codes(ppl: Tensor, ent: Tensor, th: QuadrantThresholds) -> Tensor:
    ppl_high, ppl_low, ent_high, ent_low = _strict_quadrants(ppl, ent, th)
    codes = torch.full(ppl.shape, MID, dtype=torch.long, device=ppl.device)
    codes[ppl_high & ent_high] = Q1
    codes[ppl_high & ent_low] = Q2
    codes[ppl_low & ent_low] = Q3
    codes[ppl_low & ent_high] = Q4
    codes[torch.isnan(ppl) | torch.isnan(ent)] = EMPTY
    return codes


def _thresholds(ppl: Tensor, ent: Tensor, alpha: float, beta: float) -> QuadrantThresholds:
    """Thresholds at (α, β) over the valid samples, with the strict kept fraction they give."""
    valid = ~(torch.isnan(ppl) | torch.isnan(ent))
    p, e = ppl[valid].double(), ent[valid].double()
    qs = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64, device=p.device)
    qe = torch.tensor([beta, 1.0 - beta], dtype=torch.float64, device=p.device)
    ppl_low, ppl_high = (float(v) for v in torch.quantile(p, qs))  # linear interpolation, as np.quantile
    ent_low, ent_high = (float(v) for v in torch.quantile(e, qe))
    th = QuadrantThresholds(alpha, beta, ppl_low, ppl_high, ent_low, ent_high, 0.0)
    codes = _codes(p, e, th)
    kept = ((codes == Q2) | (codes == Q4)).double().mean().item()
    return QuadrantThresholds(alpha, beta, ppl_low, ppl_high, ent_low, ent_high, kept)


def find_quadrant_thresholds(
    ppl: Tensor,
    ent: Tensor,
    sample_ratio: float,
    iters: int = 10,
    tol: float = 0.01,
    bisection: Bisection = "joint",
) -> QuadrantThresholds:
    """Bisection on the quantile levels so that ``|Q2 ∪ Q4| / S`` approaches ``sample_ratio``.

    The kept fraction grows with α and with β (looser thresholds), so each step moves the bracket
    ``[0, 0.49]`` up when too few samples are kept and down otherwise. The loop stops after ``iters``
    steps or as soon as ``|kept − sample_ratio| < tol`` and returns the **last evaluated** thresholds
    (the authors' code; slime does the same without ``tol``). Samples with NaN coordinates are ignored.

    Args:
        ppl: ``(S,)`` sample perplexities.
        ent: ``(S,)`` sample mean entropies.
        sample_ratio: target fraction of samples in Q2 ∪ Q4.
        iters: bisection steps (10 in the authors' code and in slime).
        tol: early-stop tolerance on the kept fraction (0.01 in the authors' code).
        bisection: ``"joint"``: one bisection with α = β (the authors' code and slime keep two brackets
            but always move them together, so α = β); ``"separate"``: the joint search fixes α, then β is
            bisected alone on ``[0, 0.49]`` if the joint search stopped outside ``tol`` (an inferred
            refinement, not in any source).

    Returns:
        :class:`QuadrantThresholds` (all NaN when no sample is valid).

    Example:
        >>> ppl = torch.tensor([1.0, 2.0, 3.0, 4.0]); ent = torch.tensor([4.0, 3.0, 2.0, 1.0])
        >>> find_quadrant_thresholds(ppl, ent, 0.5).kept_fraction
        0.5
    """
    if not 0.0 < sample_ratio <= 1.0:
        raise ConfigError(f"sample_ratio={sample_ratio} must lie in (0, 1].")
    if iters < 1:
        raise ConfigError(f"iters={iters} must be at least 1.")
    check_choice("find_quadrant_thresholds", "bisection", bisection, ("joint", "separate"))
    ppl, ent = ppl.detach().double().cpu(), ent.detach().double().cpu()
    if not bool((~(torch.isnan(ppl) | torch.isnan(ent))).any()):
        return QuadrantThresholds(*([math.nan] * 6), 0.0)

    def search(evaluate) -> QuadrantThresholds:
        low, high = 0.0, _MAX_QUANTILE
        th = None
        for _ in range(iters):
            level = (low + high) / 2.0
            th = evaluate(level)
            if abs(th.kept_fraction - sample_ratio) < tol:
                break
            if th.kept_fraction < sample_ratio:
                low = level
            else:
                high = level
        return th

    th = search(lambda level: _thresholds(ppl, ent, level, level))
    if bisection == "separate" and abs(th.kept_fraction - sample_ratio) >= tol:
        alpha = th.alpha
        th = search(lambda level: _thresholds(ppl, ent, alpha, level))
    return th


def classify_quadrants(
    ppl: Tensor,
    ent: Tensor,
    thresholds: QuadrantThresholds,
    mid_range: MidRange = "fill",
    sample_ratio: float | None = None,
) -> Tensor:
    """Quadrant code of every sample: :data:`Q1` … :data:`Q4`, :data:`MID` (unassigned, dropped) or
    :data:`EMPTY` (no scored token).

    Strict quadrants use the authors' inequalities: PPL high ``> ppl_high``, low ``<= ppl_low``; Ent
    high ``> ent_high``, low ``<= ent_low``. A sample between the thresholds on an axis is *mid* there.

    Args:
        ppl, ent: ``(S,)`` sample coordinates (NaN for empty samples).
        thresholds: from :func:`find_quadrant_thresholds`.
        mid_range: what happens to samples outside the four strict quadrants:

            - ``"fill"`` (authors' code): they are dropped, then if fewer than
              ``K = max(1, round(S · sample_ratio))`` samples are in Q2 ∪ Q4, the remaining samples with
              the largest ``|PPL_n − Ent_n|`` (both min-max normalised over the batch) are added, as Q2
              when ``PPL_n ≥ Ent_n`` and as Q4 otherwise (``round`` is Python's, ties to even; ties in
              the score go to the earlier sample). Never removes samples.
            - ``"drop"``: strict quadrants only; everything else is dropped.
            - ``"assign"`` (slime): (high PPL, mid Ent) → Q2, (low, mid) → Q3, (mid, high) → Q4,
              (mid, low) → Q3, (mid, mid) → Q4.
        sample_ratio: the target ``K`` of ``"fill"`` (required there).

    Returns:
        ``(S,)`` long codes.
    """
    check_choice("classify_quadrants", "mid_range", mid_range, ("fill", "drop", "assign"))
    ppl, ent = ppl.detach().double(), ent.detach().double()
    codes = _codes(ppl, ent, thresholds)
    valid = codes != EMPTY
    if mid_range == "assign":
        ppl_high, ppl_low, ent_high, ent_low = _strict_quadrants(ppl, ent, thresholds)
        ppl_mid, ent_mid = ~(ppl_high | ppl_low), ~(ent_high | ent_low)
        mid = valid & (codes == MID)
        codes[mid & ppl_high & ent_mid] = Q2
        codes[mid & ppl_low & ent_mid] = Q3
        codes[mid & ppl_mid & ent_high] = Q4
        codes[mid & ppl_mid & ent_low] = Q3
        codes[mid & ppl_mid & ent_mid] = Q4
    elif mid_range == "fill":
        if sample_ratio is None:
            raise ConfigError("mid_range='fill' needs sample_ratio (the number of samples to keep).")
        total = int(valid.sum())
        target = min(max(1, round(total * sample_ratio)), total)
        kept = (codes == Q2) | (codes == Q4)
        need = target - int(kept.sum())
        if need > 0:
            ppl_n, ent_n = _min_max(ppl, valid), _min_max(ent, valid)
            lean = ppl_n - ent_n  # > 0: misconception-like, < 0: calibration-like
            candidates = torch.nonzero(valid & ~kept).squeeze(1)
            order = torch.sort(-lean[candidates].abs(), stable=True).indices
            added = candidates[order[:need]]
            codes[added] = torch.where(lean[added] >= 0, Q2, Q4)
    return codes


def _min_max(x: Tensor, valid: Tensor) -> Tensor:
    """(x - min) / (max - min) over the valid entries; zeros when the range is below 1e-12 (authors')."""
    values = x[valid]
    low, high = values.min(), values.max()
    if float(high - low) < 1e-12:
        return torch.zeros_like(x)
    return (x - low) / (high - low)


# ---- tokens -----------------------------------------------------------------------------------------
def neighbor_token_scores(
    token_ppl: Tensor,
    mask: Tensor,
    lam: float = 0.5,
    scaling: NeighborScaling = "sum",
    edge: EdgeRule = "zero",
    index: Tensor | None = None,
) -> Tensor:
    """Neighbour-smoothed token scores ``s_i = (1-λ)·PPL_i + λ·[PPL_{i-1} + PPL_{i+1}]`` (``/2`` on the
    bracket with ``scaling="mean"``).

    Neighbours are the adjacent positions ``t ± 1`` when they are scored and belong to the same sample;
    otherwise (sequence or response ends, prompt tokens in between, another example of a packed row)
    the neighbour is *missing* and ``edge`` decides: ``"zero"`` counts it as 0 (the authors' code, which
    zero-pads), ``"self"`` replaces it with the token's own ``PPL_i`` (slime; this also reproduces the
    spec's hand-computed page scores).

    Args:
        token_ppl: ``(B, T)`` per-token perplexity ``exp(nll_t)``.
        mask: ``(B, T)`` bool, the scored tokens.
        lam: λ, the weight of the neighbours.
        scaling: ``"sum"`` (project page and authors' code) or ``"mean"`` (slime: ``/2``).
        edge: ``"zero"`` or ``"self"``, see above.
        index: ``(B, T)`` sample numbers from :func:`sample_index`; ``None``: one sample per row.

    Returns:
        ``(B, T)`` scores in the dtype of ``token_ppl``, 0 where ``mask`` is false.

    Example:
        >>> ppl = torch.tensor([[1.2, 8, 1.5, 1.1, 20, 2]], dtype=torch.float64)
        >>> s = neighbor_token_scores(ppl, torch.ones(1, 6, dtype=torch.bool), 0.5, "sum", "self")
        >>> [round(v, 4) for v in s[0].tolist()]
        [5.2, 5.35, 5.3, 11.3, 11.55, 12.0]
    """
    check_choice("neighbor_token_scores", "scaling", scaling, ("sum", "mean"))
    check_choice("neighbor_token_scores", "edge", edge, ("zero", "self"))
    mask = mask.bool()
    if index is None:
        index = sample_index(mask)[0]
    same = mask[:, 1:] & mask[:, :-1] & (index[:, 1:] == index[:, :-1])  # t and t+1 are neighbours
    prev_ok = torch.nn.functional.pad(same, (1, 0))
    next_ok = torch.nn.functional.pad(same, (0, 1))
    prev = torch.nn.functional.pad(token_ppl[:, :-1], (1, 0))
    nxt = torch.nn.functional.pad(token_ppl[:, 1:], (0, 1))
    missing = token_ppl if edge == "self" else torch.zeros_like(token_ppl)
    neighbours = torch.where(prev_ok, prev, missing) + torch.where(next_ok, nxt, missing)
    if scaling == "mean":
        neighbours = neighbours / 2
    scores = (1 - lam) * token_ppl + lam * neighbours
    return torch.where(mask, scores, torch.zeros_like(scores))


def _keep_first(keys: Tensor, candidates: Tensor, groups: Tensor, keep_counts: Tensor) -> Tensor:
    """Among ``candidates`` (B, T), keep the ``keep_counts[g]`` smallest ``keys`` of each group ``g``;
    ties go to the earlier position (row-major)."""
    keep = torch.zeros_like(candidates)
    positions = torch.nonzero(candidates.reshape(-1)).squeeze(1)
    if positions.numel() == 0:
        return keep
    key, group = keys.reshape(-1)[positions], groups.reshape(-1)[positions]
    order = torch.sort(key, stable=True).indices  # by key, then position
    order = order[torch.sort(group[order], stable=True).indices]  # by group, then key, then position
    sorted_groups = group[order]
    sizes = torch.bincount(sorted_groups, minlength=int(keep_counts.numel()))
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel(), device=keys.device) - starts[sorted_groups]
    chosen = positions[order[rank < keep_counts[sorted_groups]]]
    keep.view(-1)[chosen] = True
    return keep


def prune_tokens(
    scores: Tensor,
    candidates: Tensor,
    token_ratio: float,
    keep: Retention = "lowest",
    index: Tensor | None = None,
) -> Tensor:
    """Keep ``ceil(token_ratio · n)`` of each sample's ``n`` candidate tokens, ranked by score.

    Args:
        scores: ``(B, T)`` token scores (:func:`neighbor_token_scores`).
        candidates: ``(B, T)`` bool, the tokens that can be pruned (the scored tokens of Q2 samples).
        token_ratio: fraction kept per sample, in ``(0, 1]``; a sample with candidates keeps at least one.
        keep: ``"lowest"`` keeps the lowest scores (drops the high-PPL tokens; authors' code and slime)
            or ``"highest"``. Ties go to the earlier position.
        index: ``(B, T)`` sample numbers from :func:`sample_index`; ``None``: one sample per row.

    Returns:
        ``(B, T)`` bool, true on the kept candidates only.

    Example:
        >>> s = torch.tensor([[5.2, 5.35, 5.3, 11.3, 11.55, 12.0]])
        >>> prune_tokens(s, torch.ones(1, 6, dtype=torch.bool), 0.7).int()
        tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.int32)
    """
    if not 0.0 < token_ratio <= 1.0:
        raise ConfigError(f"token_ratio={token_ratio} must lie in (0, 1].")
    check_choice("prune_tokens", "keep", keep, ("lowest", "highest"))
    candidates = candidates.bool()
    if index is None:
        index = sample_index(candidates)[0]
    groups = torch.where(candidates, index, torch.zeros_like(index))
    count = int(groups.max()) + 1 if candidates.any() else 0
    sizes = torch.bincount(groups[candidates], minlength=count).double()
    keep_counts = torch.ceil(sizes * token_ratio - _RATIO_SLACK).long()
    keys = scores.double() if keep == "lowest" else -scores.double()
    return _keep_first(keys, candidates, groups, keep_counts)


def _prune_to_batch_budget(scores: Tensor, candidates: Tensor, drop: int, keep: Retention) -> Tensor:
    """Drop the ``drop`` worst candidates of the whole batch (authors' global budget)."""
    candidates = candidates.bool()
    total = int(candidates.sum())
    keys = scores.double() if keep == "lowest" else -scores.double()
    counts = torch.tensor([max(total - drop, 0)], device=scores.device)
    return _keep_first(keys, candidates, torch.zeros_like(candidates, dtype=torch.long), counts)


# ---- the whole selection ----------------------------------------------------------------------------
@dataclass
class QTuningSelection:
    """What :func:`qtuning_mask` selected.

    Attributes:
        keep: ``(B, T)`` bool keep mask over the scored tokens.
        quadrants: ``(S,)`` long codes (:data:`Q1` … :data:`Q4`, :data:`MID`, :data:`EMPTY`) after the
            mid-range rule; samples coded Q2 or Q4 are kept.
        index: ``(B, T)`` sample number of each scored token (-1 elsewhere), see :func:`sample_index`.
        ppl: ``(S,)`` sample perplexities (float64).
        entropy: ``(S,)`` sample mean entropies (float64).
        thresholds: the bisection's :class:`QuadrantThresholds`.
    """

    keep: Tensor
    quadrants: Tensor
    index: Tensor
    ppl: Tensor
    entropy: Tensor
    thresholds: QuadrantThresholds

    @property
    def counts(self) -> dict[str, int]:
        """Number of samples per quadrant, ``mid`` (unassigned, dropped) and ``empty``."""
        names = {Q1: "q1", Q2: "q2", Q3: "q3", Q4: "q4", MID: "mid", EMPTY: "empty"}
        return {name: int((self.quadrants == code).sum()) for code, name in names.items()}


def qtuning_mask(
    nll: Tensor,
    entropy: Tensor,
    mask: Tensor,
    sample_ratio: float = 0.5,
    token_ratio: float = 0.7,
    lam: float = 0.5,
    *,
    bisect_iters: int = 10,
    bisect_tol: float = 0.01,
    bisection: Bisection = "joint",
    mid_range: MidRange = "fill",
    neighbor_scaling: NeighborScaling = "sum",
    edge: EdgeRule = "zero",
    keep: Retention = "lowest",
    token_budget: TokenBudget = "sample",
    sample_ids: Tensor | None = None,
) -> QTuningSelection:
    """Q-Tuning's keep mask for one batch: sample triage on the Error-Uncertainty plane, then token
    pruning inside the Q2 samples.

    Steps: :func:`sample_ppl_entropy` → :func:`find_quadrant_thresholds` → :func:`classify_quadrants`;
    Q4 samples keep all their scored tokens; Q2 samples keep the tokens :func:`prune_tokens` chooses on
    :func:`neighbor_token_scores` of ``PPL_t = exp(nll_t)`` (all in float64); everything else is
    dropped.

    Args:
        nll: ``(B, T)`` per-token NLL (detached here).
        entropy: ``(B, T)`` per-token predictive entropy.
        mask: ``(B, T)`` bool, the scored (response) tokens.
        sample_ratio: target fraction of samples kept (Q2 ∪ Q4).
        token_ratio: fraction of each Q2 sample's tokens kept.
        lam: λ of the neighbour smoothing.
        bisect_iters, bisect_tol, bisection: see :func:`find_quadrant_thresholds`.
        mid_range: see :func:`classify_quadrants`.
        neighbor_scaling, edge: see :func:`neighbor_token_scores`.
        keep: see :func:`prune_tokens`.
        token_budget: ``"sample"``: each Q2 sample keeps ``ceil(token_ratio · n)`` of its ``n`` tokens (the
            page's wording, slime); ``"batch"`` (authors' code): the batch keeps
            ``round(N · sample_ratio · token_ratio)`` of its ``N`` scored tokens, the tokens of dropped
            samples count towards the cut and the rest is cut from the pooled Q2 tokens by score.
        sample_ids: ``(B, T)`` example id per token for packed rows (``None``: one sample per row).

    Returns:
        :class:`QTuningSelection`.

    Example:
        >>> nll = torch.tensor([[0.0, 2.0, 2.1], [0.0, 0.1, 0.2], [0.0, 1.9, 2.3], [0.0, 0.2, 0.1]])
        >>> ent = torch.tensor([[0.0, 0.1, 0.2], [0.0, 2.0, 2.1], [0.0, 2.0, 1.9], [0.0, 0.1, 0.1]])
        >>> mask = torch.tensor([[False, True, True]] * 4)
        >>> sel = qtuning_mask(nll, ent, mask, sample_ratio=0.5, token_ratio=0.5)
        >>> sel.quadrants.tolist(), sel.keep.int().tolist()
        ([2, 4, 1, 3], [[0, 1, 0], [0, 1, 1], [0, 0, 0], [0, 0, 0]])
    """
    if not 0.0 < token_ratio <= 1.0:
        raise ConfigError(f"token_ratio={token_ratio} must lie in (0, 1].")
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"lam={lam} must lie in [0, 1].")
    check_choice("qtuning_mask", "token_budget", token_budget, ("sample", "batch"))
    mask = mask.bool()
    nll = nll.detach()
    index, _ = sample_index(mask, sample_ids)
    ppl, ent, _ = sample_ppl_entropy(nll, entropy, mask, sample_ids)
    thresholds = find_quadrant_thresholds(ppl, ent, sample_ratio, bisect_iters, bisect_tol, bisection)
    quadrants = classify_quadrants(ppl.cpu(), ent.cpu(), thresholds, mid_range, sample_ratio).to(mask.device)

    def tokens_of(code: int) -> Tensor:
        per_sample = quadrants == code
        return mask & per_sample[index.clamp(min=0)] if per_sample.numel() else torch.zeros_like(mask)

    whole, pruned = tokens_of(Q4), tokens_of(Q2)
    token_ppl = torch.exp(nll.double())
    scores = neighbor_token_scores(token_ppl, mask, lam, neighbor_scaling, edge, index)
    if token_budget == "sample":
        kept_q2 = prune_tokens(scores, pruned, token_ratio, keep, index)
    else:
        total = int(mask.sum())
        target = round(total * sample_ratio * token_ratio)
        dropped_by_samples = total - int((whole | pruned).sum())
        drop = max(0, total - target - dropped_by_samples) if token_ratio < 1.0 else 0
        kept_q2 = _prune_to_batch_budget(scores, pruned, drop, keep)
    return QTuningSelection(whole | kept_q2, quadrants, index, ppl, ent, thresholds)

