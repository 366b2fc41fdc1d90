"""GrAInS: gradient-based attribution for inference-time steering (arXiv 2507.18043, spec §8).

- :mod:`~lightning_tokens.analysis.steering.attribution`: integrated gradients in torch (captum's
  quadrature rules), contrastive token attributions, top-k selection, ablation by the pad token.
- :mod:`~lightning_tokens.analysis.steering.vectors`: last-token hidden-state differences per layer,
  directions by PCA or mean, :class:`SteeringVectors` (save / load), preference margins.
- :mod:`~lightning_tokens.analysis.steering.hook`: the steering hook ``h + 10·α·v`` renormalised.
- :mod:`~lightning_tokens.analysis.steering.command`: ``lightning-tokens steer``.

The :class:`~lightning_tokens.callbacks.steering.Steering` callback applies saved vectors during
validation, test and predict.

Example::

    forward_fn, embed, lm = module_forward(token_lm)
    vectors = build_steering_vectors(forward_fn, embed, examples, tokenizer.pad_token_id)
    with steering(lm, layer=-1, vector=vectors.vector(), alpha=4.0): ...
"""

from lightning_tokens.analysis.steering.attribution import (
    ablate,
    contrastive_token_attributions,
    integrated_gradients,
    quadrature,
    target_log_prob,
    top_token_indices,
)
from lightning_tokens.analysis.steering.hook import add_steering_hook, decoder_layers, steer_hidden, steering
from lightning_tokens.analysis.steering.vectors import (
    GrainsSettings,
    SteeringExample,
    SteeringVectors,
    build_steering_vectors,
    causal_lm_forward,
    example_diffs,
    last_token_hidden_states,
    module_forward,
    preference_margins,
    spliced_forward,
    steering_direction,
    vision_example,
)

__all__ = [
    "GrainsSettings",
    "SteeringExample",
    "SteeringVectors",
    "ablate",
    "add_steering_hook",
    "build_steering_vectors",
    "causal_lm_forward",
    "contrastive_token_attributions",
    "decoder_layers",
    "example_diffs",
    "integrated_gradients",
    "last_token_hidden_states",
    "module_forward",
    "preference_margins",
    "quadrature",
    "spliced_forward",
    "steer_hidden",
    "steering",
    "steering_direction",
    "target_log_prob",
    "top_token_indices",
    "vision_example",
]
