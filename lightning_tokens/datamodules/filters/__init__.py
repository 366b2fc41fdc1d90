r"""Data-level filters: choose which SFT records to train on, before tokenization.

A :class:`RecordFilter` looks at the raw records of a data file (the JSON objects, ``{prompt,
response}``, ``{messages}`` or ``{text}``) and keeps some of them. :class:`~lightning_tokens.datamodules.
SFTDataModule` applies its ``filters`` in order to the **training** records (after the ``val_fraction``
hold-out, so validation stays the same with and without filters); each filter sees the survivors of
the previous one. From YAML::

    data:
      class_path: lightning_tokens.SFTDataModule
      init_args:
        train_file: data/examples/long_cot.jsonl
        filters:
          - class_path: lightning_tokens.datamodules.filters.BranchingDensityFilter
            init_args: {max_density: 0.3}

Two filters from ``shared/specs/text_methods.md``:

- :class:`InstructMiningFilter` (Cao et al., "InstructMining", arXiv 2307.06290, §13): a linear rule
  predicts the log evaluation loss a model fine-tuned on the data would reach from data-quality
  indicators; records with the lowest predicted loss are kept. Both published rules are built in
  (:data:`INSTRUCT_MINING_RULES`); indicators are pluggable :class:`Indicator` objects.
- :class:`BranchingDensityFilter` (arXiv 2604.01702, §12): drop long chain-of-thought traces whose
  share of "branching" steps (``wait``, ``alternatively``, ...) is high.

Pure functions hold the arithmetic: :func:`instruct_mining_score`, :func:`branching_density`,
:func:`split_steps`, :func:`knn_distances`, :func:`select_lowest`.

Layout: :mod:`.base` (the :class:`RecordFilter` interface and selection), :mod:`.indicators`,
:mod:`.instruct_mining` and :mod:`.branching` (long-CoT branching density); every public name is
importable from this package.
"""

from lightning_tokens.core.imports import import_object
from lightning_tokens.datamodules.filters.base import Record, RecordFilter, record_texts, select_lowest
from lightning_tokens.datamodules.filters.branching import (
    BRANCHING_KEYWORDS,
    STEP_PATTERN,
    BranchingDensityFilter,
    branching_density,
    split_steps,
)
from lightning_tokens.datamodules.filters.indicators import (
    CallableIndicator,
    Indicator,
    KNNDistance,
    Length,
    Perplexity,
    RecordField,
    hashed_ngram_embedder,
    knn_distances,
)
from lightning_tokens.datamodules.filters.instruct_mining import (
    INSTRUCT_MINING_RULES,
    InstructMiningFilter,
    instruct_mining_score,
)

__all__ = [
    "BRANCHING_KEYWORDS",
    "INSTRUCT_MINING_RULES",
    "STEP_PATTERN",
    "BranchingDensityFilter",
    "CallableIndicator",
    "Indicator",
    "InstructMiningFilter",
    "KNNDistance",
    "Length",
    "Perplexity",
    "RecordField",
    "RecordFilter",
    "branching_density",
    "hashed_ngram_embedder",
    "import_object",
    "instruct_mining_score",
    "knn_distances",
    "record_texts",
    "select_lowest",
    "split_steps",
]
