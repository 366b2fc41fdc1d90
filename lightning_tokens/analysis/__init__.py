"""Analysis tools: what training changed, token by token.

- :mod:`~lightning_tokens.analysis.functional`: Jensen–Shannon divergence between next-token
  distributions (safe under top-k / top-p truncation), top-k overlap, sampler truncation.
- :mod:`~lightning_tokens.analysis.divergence`: base vs tuned model along sampled trajectories, and
  cross-sampling ("Sparse but Critical", arXiv 2603.22446); ``lightning-tokens divergence`` runs it.
"""

from lightning_tokens.analysis.divergence import DivergenceReport, cross_sample, divergence_report, trajectory_divergence
from lightning_tokens.analysis.functional import js_divergence, top_k_overlap, truncate_logprobs

__all__ = [
    "DivergenceReport",
    "cross_sample",
    "divergence_report",
    "js_divergence",
    "top_k_overlap",
    "trajectory_divergence",
    "truncate_logprobs",
]
