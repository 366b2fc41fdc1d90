r"""
Who's Harry Potter: generic labels for approximate unlearning
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Eldan & Russinovich, "Who's Harry Potter? Approximate Unlearning in LLMs" (arXiv 2310.02238) make a
model behave as if it had never seen a corpus by fine-tuning it on that corpus with *generic* next-token
targets instead of the text's own tokens. The targets combine two signals:

1. a **reinforced model**, the baseline trained further on the corpus: tokens whose logits it raises
   are corpus-specific,

   .. math::

       v_\mathrm{generic} = v_\mathrm{baseline} - \alpha\,\mathrm{ReLU}(v_\mathrm{reinforced} - v_\mathrm{baseline});

2. **anchored-term translation**: idiosyncratic terms (names, places, spells) are replaced by generic
   ones from a dictionary (Hogwarts → Mystic Academy, Harry → Jon), and :math:`v_\mathrm{baseline}` is
   read on the *translated* text, at the position whose context is the translation of the original
   context; :math:`v_\mathrm{reinforced}` is read on the original text:

   .. math::

       v_\mathrm{generic} = v_\mathrm{baseline}(\text{translated text}) - \alpha\,
       \mathrm{ReLU}\big(v_\mathrm{reinforced}(\text{original text}) - v_\mathrm{baseline}(\text{translated text})\big).

The last step fine-tunes the baseline on the original text with these targets. Hard targets replace
each label by :math:`\arg\max v_\mathrm{generic}` (cross-entropy to it); soft targets replace the
per-token loss by the cross-entropy to :math:`\operatorname{softmax}(v_\mathrm{generic})`, kept as its
top-k ids and probabilities.

The workflow, one CLI step each:

1. ``lightning-tokens fit --config configs/whp_reinforce.yaml``: LoRA fine-tune of the baseline on the
   corpus; :class:`~lightning_tokens.callbacks.unlearning.SavePretrained` writes the adapter.
2. ``lightning-tokens generic_labels --config configs/whp_generic_labels.yaml --output targets.safetensors
   --reinforced_adapter ... --anchors_file ...`` (:func:`build_generic_labels`): per-example generic
   targets, keyed by example id.
3. ``lightning-tokens fit --config configs/whp_unlearn.yaml``: the baseline fine-tuned on the original
   text with :class:`~lightning_tokens.callbacks.unlearning.GenericLabels`.

The package holds the arithmetic (``functional``: :func:`generic_logits`, :func:`generic_targets_from_logits`,
:func:`soft_target_loss`), the translation with its position map (``anchors``: :func:`translate`,
:func:`align_translation`), the targets file (``targets_file``: :func:`save_generic_targets`,
:func:`load_generic_targets`, :func:`lookup_generic_targets`), the label-building step (``build``:
:func:`build_generic_labels`) and the callbacks (``callback``: :class:`GenericLabels`, :class:`SavePretrained`).

Position map. Statistics are indexed like labels: position ``t`` is the prediction of token ``t`` from
the tokens ``< t``. Original token ``t`` starting at character ``c`` has a translated counterpart ``s``
when ``c`` is not strictly inside an anchored term and a translated token starts at the character ``c``
maps to; the translated tokens ``< s`` are then exactly the translation of the original tokens ``< t``,
so the baseline's prediction at ``s`` is the generic prediction for ``t``. Tokens starting inside an
anchored term (the second and later tokens of a multi-token name) have no counterpart and take no loss.

Inconsistencies (the paper's Sec. 3): within a block (here, an example) every occurrence of an anchored
term after its first takes no loss (its tokens get label -100), and the generic logits of the
translations of anchored terms already seen in the context are lowered by ``seen_penalty`` (only the
first token of each translation, and only token ids the original example never uses: a translation
such as "the town" must not suppress "the").
"""

from lightning_tokens.callbacks.unlearning.anchors import (
    AlignedTokens,
    AnchorOccurrence,
    Translation,
    align_translation,
    load_anchors,
    translate,
)
from lightning_tokens.callbacks.unlearning.build import build_generic_labels
from lightning_tokens.callbacks.unlearning.callback import GenericLabels, SavePretrained
from lightning_tokens.callbacks.unlearning.functional import (
    generic_logits,
    generic_targets_from_logits,
    soft_target_loss,
)
from lightning_tokens.callbacks.unlearning.targets_file import (
    FILE_FORMAT,
    GenericTargets,
    load_generic_targets,
    lookup_generic_targets,
    save_generic_targets,
)

__all__ = [
    "FILE_FORMAT",
    "AlignedTokens",
    "AnchorOccurrence",
    "GenericLabels",
    "GenericTargets",
    "SavePretrained",
    "Translation",
    "align_translation",
    "build_generic_labels",
    "generic_logits",
    "generic_targets_from_logits",
    "load_anchors",
    "load_generic_targets",
    "lookup_generic_targets",
    "save_generic_targets",
    "soft_target_loss",
    "translate",
]
