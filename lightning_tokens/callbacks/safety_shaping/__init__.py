r"""
STAR-DSS: dynamic safety shaping
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

STAR-DSS (Peng, Chen, Chi, Lee, Chau, "Shape it Up! Restoring LLM Safety during Finetuning", arXiv
2505.17196, NeurIPS 2025) lets a guardrail score *prefixes* of every training response, chunk by chunk
(the Safety Trajectory Assessment of Response, STAR), and interpolates each token's loss between the
cross-entropy on the data, where the response is still safe, and a KL pull toward the frozen initial
(aligned) model, where it has turned unsafe:

.. math::

    V_k = V_\mathrm{safe}\big(x, y_{1:\min(kM, T)}\big), \qquad
    \mathcal{L} = \frac{1}{N} \sum_k \sum_{t \in \text{chunk } k}
        \Big[ V_k \, \mathrm{CE}(y_t) + (1 - V_k)\, \lambda_\mathrm{KL}\,
        \mathrm{KL}\big(\pi_\theta(\cdot \mid x, y_{<t}) \,\big\|\, \pi_\mathrm{ref}(\cdot \mid x, y_{<t})\big) \Big]

with chunks of ``M`` response tokens, ``V_safe = σ(logit_safe − logit_unsafe)`` of a generative guard
(or a classifier's ``P(safe)``, :mod:`lightning_tokens.models.guardrails`) and ``N`` the number of scored tokens.

In the pipeline the method returns ``weights = V`` and ``extra_loss = (1 − V)·λ·KL``, which the
reduction ``Σ (w·nll + extra) / N`` turns into exactly the formula above (weights that travel with the
data multiply both terms; weights of other methods, e.g. DFT, multiply the cross-entropy term only).

Scores come from a file computed once (:func:`precompute_star_scores`, the ``star_score`` command) or
from a guardrail on the fly (the callback scores the batch's decoded prefixes in
``on_train_batch_start``). Either way the per-token values are indexed like ``labels``: the value at a
label position ``t`` is ``V_k`` of the chunk holding the response token ``labels[:, t]``, where the
response tokens of an example are its labelled positions in order (for a chat with several assistant
turns, all of their labelled tokens, counted across turns).

What the guardrail reads is decoded from the training tokens with the policy's tokenizer (so the guard
may use its own): the prompt is the text before the first labelled token and a response prefix the text
from there through the prefix's last response token. With chat data the prompt is therefore the rendered
conversation up to the assistant header, which, special tokens dropped (``skip_special_tokens``), leaves
the role names as plain words ("system ... user ... assistant").

Files: ``functional.py`` (the arithmetic: chunk prefixes, per-token values, the loss terms), ``scores.py``
(guardrail scores of a batch or a whole dataset, and their files), ``callback.py`` (``SafetyShaping``).
"""

from lightning_tokens.callbacks.safety_shaping.callback import STAR_VALUES_KEY, SafetyShaping
from lightning_tokens.callbacks.safety_shaping.functional import (
    ChunkPrefix,
    chunk_prefix_lengths,
    chunk_weights,
    star_dss_loss,
    star_dss_terms,
)
from lightning_tokens.callbacks.safety_shaping.scores import (
    STAR_FORMAT,
    load_star_scores,
    precompute_star_scores,
    save_star_scores,
    star_values_for_batch,
)

__all__ = [
    "STAR_FORMAT",
    "STAR_VALUES_KEY",
    "ChunkPrefix",
    "SafetyShaping",
    "chunk_prefix_lengths",
    "chunk_weights",
    "load_star_scores",
    "precompute_star_scores",
    "save_star_scores",
    "star_dss_loss",
    "star_dss_terms",
    "star_values_for_batch",
]
