r"""
Q-Tuning: joint sample and token pruning on the Error-Uncertainty plane
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Q-Tuning (Wang et al., "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token
Pruning for Efficient Supervised Fine-Tuning", arXiv 2509.23873) places every sample of a batch on the
Error-Uncertainty plane of the current model,

.. math::

    \mathrm{PPL} = \exp\Big(\frac{1}{|T|}\sum_{i \in T} -\log p(y_i \mid x, y_{<i})\Big), \qquad
    \mathrm{Ent} = \frac{1}{|T|}\sum_{i \in T} H\big(p(\cdot \mid x, y_{<i})\big),

with :math:`T` the sample's response (label) tokens, and splits the batch with quantile thresholds
:math:`\mathrm{PPL}_\mathrm{low} = Q_\alpha, \mathrm{PPL}_\mathrm{high} = Q_{1-\alpha}` (and
:math:`\mathrm{Ent}` with :math:`\beta`), found by bisection so that :math:`|Q_2 \cup Q_4| / |B|`
approaches ``sample_ratio``:

===========  =========  =========  =========================  ==========================
quadrant     PPL        Ent        role                       action
===========  =========  =========  =========================  ==========================
Q1           high       high       harmful noise              dropped
Q2           high       low        valuable misconception     kept, token-pruned
Q3           low        low        redundant knowledge        dropped
Q4           low        high       calibration data           kept whole
===========  =========  =========  =========================  ==========================

Inside Q2 samples every response token gets the neighbour-smoothed score

.. math::

    s_i = (1 - \lambda)\,\mathrm{PPL}_i + \lambda\,\big[\mathrm{PPL}_{i-1} + \mathrm{PPL}_{i+1}\big],
    \qquad \mathrm{PPL}_i = \exp(\mathrm{nll}_i),

and ``token_ratio`` of them are kept. The paper leaves four details open (``specs/text_methods.md``
§3(b)); each is an option of :func:`qtuning_mask` and :class:`QTuning`, see the class docstring.

Sources read: the authors' project page (``gszfwsb/Q-tuning`` ``docs/index.html``, formulas above); the
authors' research code (``Q-tuning/Q-tuning``, ``LLaMA-Factory/src/llamafactory/train/sft/trainer.py``,
``plug == "wisely"`` with ``token_method == "wise"``: the paths in its scripts are the first author's);
and a third-party re-implementation (``fy1214/slime`` ``slime/utils/q_tuning_pruner.py``). Where they
disagree the defaults follow the authors' code, the closest thing to what produced the paper's numbers.

Layout: :mod:`~lightning_tokens.callbacks.qtuning.functional` holds the tensor arithmetic (no Lightning),
:mod:`~lightning_tokens.callbacks.qtuning.callback` the :class:`QTuning` callback; both are re-exported here.
"""

from lightning_tokens.callbacks.qtuning.callback import QTuning, SampleUnit
from lightning_tokens.callbacks.qtuning.functional import (
    EMPTY,
    MID,
    Q1,
    Q2,
    Q3,
    Q4,
    Bisection,
    EdgeRule,
    MidRange,
    NeighborScaling,
    QTuningSelection,
    QuadrantThresholds,
    Retention,
    TokenBudget,
    classify_quadrants,
    find_quadrant_thresholds,
    neighbor_token_scores,
    prune_tokens,
    qtuning_mask,
    sample_index,
    sample_ppl_entropy,
)

__all__ = [
    "EMPTY",
    "MID",
    "Q1",
    "Q2",
    "Q3",
    "Q4",
    "QTuning",
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
