"""Analysis tools: what training changed, token by token.

- :mod:`~lightning_tokens.analysis.functional`: Jensen–Shannon divergence between next-token
  distributions (safe under top-k / top-p truncation), top-k overlap, sampler truncation.
- :mod:`~lightning_tokens.analysis.divergence`: base vs tuned model along sampled trajectories, and
  cross-sampling ("Sparse but Critical", arXiv 2603.22446); ``lightning-tokens divergence`` runs it.
- :mod:`~lightning_tokens.analysis.saliency`: per-token log-probability differences between two contexts or
  two models; ``lightning-tokens saliency`` renders them.
- :mod:`~lightning_tokens.analysis.token_maps`: the one token heat-map renderer (PNG and HTML), shared by
  the saliency maps and :class:`~lightning_tokens.callbacks.TokenMapLogger`.
- :mod:`~lightning_tokens.analysis.steering`: GrAInS (arXiv 2507.18043): contrastive integrated gradients,
  steering vectors from ablated top tokens, the renormalised steering hook; ``lightning-tokens steer``
  builds the vectors and :class:`~lightning_tokens.callbacks.Steering` applies them at generation.
"""

from lightning_tokens.analysis.divergence import DivergenceReport, cross_sample, divergence_report, trajectory_divergence
from lightning_tokens.analysis.functional import js_divergence, top_k_overlap, truncate_logprobs
from lightning_tokens.analysis.saliency import SaliencyReport, response_logprobs, saliency_map, saliency_scores
from lightning_tokens.analysis.token_maps import ColorScale, TokenMap, render_html, render_png, write_token_maps

__all__ = [
    "ColorScale",
    "DivergenceReport",
    "SaliencyReport",
    "TokenMap",
    "cross_sample",
    "divergence_report",
    "js_divergence",
    "render_html",
    "render_png",
    "response_logprobs",
    "saliency_map",
    "saliency_scores",
    "top_k_overlap",
    "trajectory_divergence",
    "truncate_logprobs",
    "write_token_maps",
]
