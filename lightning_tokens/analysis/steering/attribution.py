r"""Which input tokens make a preferred answer more likely than a dispreferred one: the contrastive
integrated gradients of GrAInS (arXiv 2507.18043), token selection and ablation.

Integrated gradients (Sundararajan et al., 2017) attribute :math:`f(x) - f(x')` to the inputs along the
straight path from a baseline :math:`x'`:

.. math::

    \mathrm{IG}(x) = (x - x') \odot \int_0^1 \nabla f\big(x' + a\,(x - x')\big)\,da
                   \approx (x - x') \odot \sum_i w_i \nabla f\big(x' + a_i (x - x')\big)

with the quadrature nodes :math:`a_i` and weights :math:`w_i` of captum's ``IntegratedGradients`` (its
default, and the reference's call, is ``gausslegendre``). GrAInS takes the token embeddings of
``prompt + r⁺`` and ``prompt + r⁻`` as one input, a zero baseline, 20 steps, and the contrastive target

.. math::

    f = \log p(\text{last token of } r^+ \mid \text{prefix}^+) - \log p(\text{last token of } r^- \mid \text{prefix}^-)

and scores each token by its attribution summed over the hidden dimension. The ``k`` most positive
(``pos``) or most negative (``neg``) tokens are then replaced by the pad token (ablation).

Reference: ``duykhuongnguyen/GrAInS@8ad78db`` ``src/attribution/gradient/utils.py``
(``apply_integrated_gradients_contrastive``), ``llm_grad.py`` (``get_token_attributions_contrastive``,
``ablate``), ``src/utils/model.py`` (``get_top_token_indices``). Written anew in torch (captum is not a
dependency); :func:`quadrature` reproduces captum's nodes and weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice

__all__ = [
    "Attribution",
    "EmbedsForward",
    "QuadratureMethod",
    "Selection",
    "Target",
    "ablate",
    "contrastive_token_attributions",
    "integrated_gradients",
    "quadrature",
    "top_token_indices",
]

QuadratureMethod = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
Attribution = Literal["integrated_gradients", "gradient_x_input"]
Target = Literal["last", "repeat"]
Selection = Literal["pos", "neg", "abs"]

#: ``forward_fn(inputs_embeds=(n, T, D), input_ids=(n, T), output_hidden_states=bool, logits_to_keep=int,
#: **extra)`` → an object with ``.logits`` (``(n, T', V)``, the last ``T'`` positions) and, when asked,
#: ``.hidden_states`` (embeddings, then one entry per decoder block). ``input_ids`` only tells a module
#: where its placeholders are (a vision-language module splices image features there); the text enters
#: through ``inputs_embeds``. See :func:`lightning_tokens.analysis.steering.causal_lm_forward`.
EmbedsForward = Callable[..., Any]

_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def quadrature(steps: int, method: QuadratureMethod = "gausslegendre") -> tuple[Tensor, Tensor]:
    """Nodes ``a_i`` in ``[0, 1]`` and weights ``w_i`` of captum's IG approximation methods, float64.

    ``gausslegendre``: numpy's Legendre–Gauss rule mapped from ``[-1, 1]`` (weights sum to 1, exact for
    polynomials of degree ``2·steps − 1``). ``riemann_left/right/middle``: ``steps`` equal weights
    ``1/steps``. ``riemann_trapezoid``: nodes ``linspace(0, 1, steps)`` with captum's weights ``1/steps``,
    halved at both ends, which sum to ``1 − 1/steps`` (captum's quirk, kept for parity).

    Example:
        >>> nodes, weights = quadrature(20)
        >>> round(float(weights.sum()), 12), bool((nodes > 0).all() and (nodes < 1).all())
        (1.0, True)
    """
    check_choice("quadrature", "method", method, _METHODS)
    if steps < 1 or (method != "gausslegendre" and steps < 2):
        raise ConfigError(f"steps={steps} must be >= 1 (>= 2 for the Riemann rules): set e.g. steps: 20.")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (1 + x)), torch.from_numpy(0.5 * w)
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return torch.linspace(0, 1, steps, dtype=torch.float64), weights
    start = {"riemann_left": 0.0, "riemann_middle": 1 / (2 * steps), "riemann_right": 1 / steps}[method]
    return torch.linspace(start, start + 1 - 1 / steps, steps, dtype=torch.float64), weights


def integrated_gradients(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    baseline: Tensor | None = None,
    steps: int = 20,
    method: QuadratureMethod = "gausslegendre",
    batch_size: int | None = None,
) -> Tensor:
    r"""Integrated gradients :math:`(x - x') \odot \sum_i w_i \nabla f(x' + a_i (x - x'))`.

    As captum's ``IntegratedGradients.attribute``: the interpolated points of all steps are stacked
    along dimension 0, so ``f`` sees ``(m·B, ...)`` for ``m`` steps at once and returns one value per
    row; ``B`` is ``x``'s leading (batch) size.

    Args:
        f: batched scalar function, ``(n, *x.shape[1:]) → (n,)``.
        x: ``(B, ...)`` input.
        baseline: ``x'``, same shape; ``None`` is zeros (GrAInS). Where the baseline equals ``x`` the
            input stays fixed along the path and its attribution is 0 (used to keep image placeholder
            embeddings intact).
        steps: number of quadrature points (GrAInS: 20).
        method: the rule (:func:`quadrature`); captum's default and the reference's is ``gausslegendre``.
        batch_size: steps per call of ``f`` (``None``: all at once).

    Returns:
        attributions shaped like ``x``; for a linear ``f`` they are exactly ``(x − x') ⊙ w`` and sum to
        ``f(x) − f(x')`` (completeness), up to the rule's weight sum.

    Example:
        >>> w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        >>> integrated_gradients(lambda z: z @ w, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
        tensor([[ 0.5000, -2.0000,  6.0000]], dtype=torch.float64)
    """
    baseline = torch.zeros_like(x) if baseline is None else baseline.to(x)
    if baseline.shape != x.shape:
        raise ConfigError(f"baseline shape {tuple(baseline.shape)} must equal the input's {tuple(x.shape)}.")
    nodes, weights = quadrature(steps, method)
    chunk = steps if batch_size is None else int(batch_size)
    if chunk < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1 (or None for all steps at once).")
    delta = (x - baseline).detach()
    total = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    rows = x.shape[0]
    for start in range(0, steps, chunk):
        a = nodes[start : start + chunk].to(x.device, x.dtype)
        w = weights[start : start + chunk].to(x.device, total.dtype)
        shape = (-1,) + (1,) * x.dim()
        points = (baseline.detach().unsqueeze(0) + a.view(shape) * delta.unsqueeze(0)).reshape(-1, *x.shape[1:])
        points.requires_grad_(True)
        with torch.enable_grad():
            values = f(points)
            if values.shape != (points.shape[0],):
                raise ValueError(f"f must return one value per row, shape ({points.shape[0]},); got {tuple(values.shape)}.")
            (grad,) = torch.autograd.grad(values.sum(), points)
        grad = grad.reshape(len(a), rows, *x.shape[1:]).to(total.dtype)
        total = total + (w.view(shape) * grad).sum(0)
    return (delta.to(total.dtype) * total).to(x.dtype)


def _expand(extra: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Extra model inputs of one example repeated for ``n`` stacked rows (tensors with a batch of 1)."""
    return {k: (v.expand(n, *v.shape[1:]) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == 1 else v) for k, v in extra.items()}


def _batchable(extra: Mapping[str, Any]) -> bool:
    """Whether every extra tensor has a leading batch of 1 (else, e.g. Qwen2-VL's packed image patches or
    its ``(3, 1, T)`` M-RoPE positions, the rows run one forward each)."""
    return all(not isinstance(v, Tensor) or (v.dim() > 0 and v.shape[0] == 1) for v in extra.values())


def target_log_prob(
    forward_fn: EmbedsForward,
    embeds: Tensor,
    ids: Tensor,
    extra: Mapping[str, Any] | None = None,
    target: Target = "last",
) -> Tensor:
    """``(n,)`` log-probability of each row's last token ``ids[0, -1]``.

    ``last``: from the logits at position ``T − 2``, i.e. ``log p(x_T | x_<T)`` (the paper's target).
    ``repeat``: from the logits at ``T − 1``, i.e. ``log p(next token = x_T | x_≤T)``: what the
    reference computes (``logits[:, -1]`` indexed by the last input token; also in its ``get_log_prob``
    and multiple-choice scoring).
    """
    rows, extra = embeds.shape[0], extra or {}
    if rows > 1 and not _batchable(extra):
        return torch.cat([target_log_prob(forward_fn, embeds[i : i + 1], ids, extra, target) for i in range(rows)])
    out = forward_fn(inputs_embeds=embeds, input_ids=ids.expand(rows, -1), logits_to_keep=2, **_expand(extra, rows))
    logits = out.logits[:, -2 if target == "last" else -1].float()
    return F.log_softmax(logits, dim=-1)[:, int(ids[0, -1])]


def contrastive_token_attributions(
    forward_fn: EmbedsForward,
    pos_embeds: Tensor,
    neg_embeds: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor,
    pos_extra: Mapping[str, Any] | None = None,
    neg_extra: Mapping[str, Any] | None = None,
    pos_fixed: Tensor | None = None,
    neg_fixed: Tensor | None = None,
    attribution: Attribution = "integrated_gradients",
    target: Target = "last",
    steps: int = 20,
    method: QuadratureMethod = "gausslegendre",
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-token contrastive attributions of GrAInS for one (prompt, r⁺, r⁻) example.

    The input is the two sequences' embeddings joined along the sequence axis, the function
    :math:`f = \log p^+(\text{last}^+) - \log p^-(\text{last}^-)` (:func:`target_log_prob`, each sequence in
    its own forward), the baseline zero, and a token's score is its attribution summed over the hidden
    dimension. A positive score on an ``r⁻`` token means it pushes toward ``r⁺`` (it lowers ``log p⁻``).

    Args:
        forward_fn: the model on embeddings (:data:`EmbedsForward`).
        pos_embeds, neg_embeds: ``(1, T±, D)`` token embeddings of ``prompt + r⁺`` / ``prompt + r⁻``.
        pos_ids, neg_ids: ``(1, T±)`` their token ids (targets, and placeholders for ``forward_fn``).
        pos_extra, neg_extra: further model inputs (``pixel_values``, ``attention_mask``...), batch of 1.
        pos_fixed, neg_fixed: ``(T±,)`` bool, positions kept at their embedding along the path (their
            baseline is the input itself, so their score is 0): image placeholders.
        attribution: ``integrated_gradients`` (GrAInS) or ``gradient_x_input`` (the reference's
            "vanilla": the gradient at the input times the input).
        target: ``last`` (the paper) or ``repeat`` (the reference code, see :func:`target_log_prob`).
        steps: IG steps (20).
        method: IG rule (captum's default ``gausslegendre``, as the reference calls it).
        batch_size: IG steps per forward (``None``: all).

    Returns:
        ``(scores⁺ (T⁺,), scores⁻ (T⁻,))``, float32.

    Example:
        >>> lm = causal_lm_forward(model)        # doctest: +SKIP
        >>> embed = model.get_input_embeddings()  # doctest: +SKIP
        >>> s_pos, s_neg = contrastive_token_attributions(lm, embed(p), embed(n), p, n)  # doctest: +SKIP
    """
    check_choice("contrastive_token_attributions", "attribution", attribution, ("integrated_gradients", "gradient_x_input"))
    check_choice("contrastive_token_attributions", "target", target, ("last", "repeat"))
    if target == "last" and min(pos_ids.shape[1], neg_ids.shape[1]) < 2:
        raise ConfigError("target='last' needs at least 2 tokens per sequence (a prefix and the answer's last token).")
    split = pos_embeds.shape[1]
    joint = torch.cat([pos_embeds, neg_embeds], dim=1).detach()

    def f(points: Tensor) -> Tensor:
        pos = target_log_prob(forward_fn, points[:, :split], pos_ids, pos_extra, target)
        neg = target_log_prob(forward_fn, points[:, split:], neg_ids, neg_extra, target)
        return pos - neg

    fixed = torch.cat(
        [
            pos_fixed if pos_fixed is not None else torch.zeros(split, dtype=torch.bool),
            neg_fixed if neg_fixed is not None else torch.zeros(neg_embeds.shape[1], dtype=torch.bool),
        ]
    ).to(joint.device)
    if attribution == "integrated_gradients":
        baseline = torch.where(fixed.view(1, -1, 1), joint, torch.zeros_like(joint))
        scores = integrated_gradients(f, joint, baseline, steps, method, batch_size)
    else:
        point = joint.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(f(point).sum(), point)
        scores = torch.where(fixed.view(1, -1, 1), torch.zeros_like(grad), grad * joint)
    scores = scores[0].float().sum(-1).detach()
    return scores[:split], scores[split:]


def top_token_indices(scores: Tensor, k: int, selection: Selection = "pos", eligible: Tensor | None = None) -> Tensor:
    """The ``k`` positions to ablate, as the reference's ``get_top_token_indices``.

    Args:
        scores: ``(T,)`` per-token attributions.
        k: how many (all eligible positions when fewer).
        selection: ``pos`` (largest first), ``neg`` (smallest first) or ``abs`` (largest magnitude).
        eligible: ``(T,)`` bool, positions that may be chosen (``None``: all, as the reference).

    Example:
        >>> top_token_indices(torch.tensor([0.1, -2.0, 3.0, 0.5]), 2, "pos").tolist()
        [2, 3]
        >>> top_token_indices(torch.tensor([0.1, -2.0, 3.0, 0.5]), 2, "neg").tolist()
        [1, 0]
    """
    check_choice("top_token_indices", "selection", selection, ("pos", "neg", "abs"))
    if k < 1:
        raise ConfigError(f"top_k={k} must be >= 1.")
    key = {"pos": scores, "neg": -scores, "abs": scores.abs()}[selection].double()
    order = torch.argsort(key, descending=True, stable=True)
    if eligible is not None:
        order = order[eligible.to(order.device)[order]]
    return order[:k]


def ablate(ids: Tensor, positions: Tensor, token_id: int) -> Tensor:
    """A copy of ``(1, T)`` ``ids`` with ``positions`` replaced by ``token_id`` (the pad token in GrAInS).

    Example:
        >>> ablate(torch.tensor([[5, 6, 7]]), torch.tensor([2, 0]), 0).tolist()
        [[0, 6, 0]]
    """
    out = ids.clone()
    out[0, positions.to(out.device)] = int(token_id)
    return out
