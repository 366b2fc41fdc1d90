r"""
FAIT: Fault-Aware Fine-Tuning
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

FAIT (later renamed FGIT, "Fault-Aware/Guided Fine-Tuning" for code, arXiv 2503.16913) pairs every
correct solution with a *functionally incorrect but similar* variant, marks the "error-sensitive"
segments of the **correct** code where the two differ, and up-weights the SFT loss there:

.. math::

    \mathcal{L}_\mathrm{FAIT} = -\frac{1}{N} \sum_j w_j \log P(c_j \mid p, c_{<j}), \qquad
    w_j = 1 + \alpha \, m^\mathrm{line}_j + \beta \, m^\mathrm{tok}_j

- ``m_line`` marks the tokens of the lines of the correct code that a line diff (``difflib``) flags:
  lines replaced or deleted in the incorrect version, and the lines next to an insertion;
- ``m_tok`` marks the tokens overlapping the characters a character-level edit alignment flags
  (Levenshtein by default, as the paper's description says; ``difflib`` on characters as an option).

A token is marked when its characters (the tokenizer's ``offset_mapping``) overlap a marked character.
:class:`~lightning_tokens.datamodules.SFTDataModule` computes the masks from records
``{prompt, response, incorrect}`` (``response`` is the correct code) and ships them in every batch as
``fait_line_mask`` and ``fait_token_mask``.

The paper's *dynamic* weighting formula could not be retrieved (neither the PDF's Sec. 3.2 nor code
was accessible; see ``shared/specs/text_methods.md`` §5). :class:`FAIT` offers the spec's suggestion as
an option, off by default: every edited token's weight is multiplied by
``s = clip(mean NLL of edited tokens / mean NLL of all tokens, 1, max_weight)``, computed on the
micro-batch from the current model (detached).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import (
    BatchTokenMethod,
    TokenMethod,
    TokenMethodOutput,
)
from lightning_tokens.core.stats import TokenStats

__all__ = [
    "FAIT",
    "FAIT_LINE_KEY",
    "FAIT_TOKEN_KEY",
    "char_mask_to_tokens",
    "edit_masks",
    "fait_dynamic_scale",
    "fait_weights",
    "levenshtein_opcodes",
]

#: Batch keys of the per-token masks (``(B, T)`` float, indexed like ``labels``).
FAIT_LINE_KEY = "fait_line_mask"
FAIT_TOKEN_KEY = "fait_token_mask"

CharDiff = Literal["levenshtein", "difflib"]
Insertions = Literal["adjacent", "ignore"]
Opcode = tuple[str, int, int, int, int]

#: Above this many DP cells (after removing the common prefix and suffix) the Levenshtein alignment
#: falls back to ``difflib`` on characters (with a warning) instead of allocating a huge table.
MAX_LEVENSHTEIN_CELLS = 16_000_000


# ----------------------------------------------------------------------------------------------------
# Edit alignment and masks (pure functions)
# ----------------------------------------------------------------------------------------------------
def levenshtein_opcodes(a: str, b: str) -> list[Opcode]:
    """A minimal (unit-cost Levenshtein) alignment of ``a`` to ``b`` as ``difflib``-style opcodes.

    Every character of ``a`` and ``b`` is covered by exactly one opcode ``(tag, i1, i2, j1, j2)`` with
    ``tag`` in ``equal`` / ``replace`` / ``delete`` / ``insert``; consecutive steps of one tag are
    merged. Among minimal alignments the backtrace (from the end) prefers a diagonal step (match or
    substitution), then a deletion, then an insertion, so the result is deterministic.

    The DP runs row by row in numpy (the in-row insertion recurrence is a running minimum), after
    stripping the common prefix and suffix.

    Example:
        >>> levenshtein_opcodes("return a+b", "return a-b")
        [('equal', 0, 8, 0, 8), ('replace', 8, 9, 8, 9), ('equal', 9, 10, 9, 10)]
    """
    n_a, n_b = len(a), len(b)
    prefix = 0
    while prefix < min(n_a, n_b) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(n_a, n_b) - prefix and a[n_a - 1 - suffix] == b[n_b - 1 - suffix]:
        suffix += 1
    core_a, core_b = a[prefix : n_a - suffix], b[prefix : n_b - suffix]
    n, m = len(core_a), len(core_b)
    steps: list[str] = []  # one tag per step, from the end
    if n and m:
        codes_a = np.frombuffer(core_a.encode("utf-32-le"), dtype=np.uint32)
        codes_b = np.frombuffer(core_b.encode("utf-32-le"), dtype=np.uint32)
        dtype = np.int32
        table = np.empty((n + 1, m + 1), dtype=dtype)
        cols = np.arange(m + 1, dtype=dtype)
        table[0] = cols
        for i in range(1, n + 1):
            prev = table[i - 1]
            row = np.empty(m + 1, dtype=dtype)
            row[0] = i
            cost = (codes_b != codes_a[i - 1]).astype(dtype)
            np.minimum(prev[1:] + 1, prev[:-1] + cost, out=row[1:])
            # insertion within the row: d[i, j] = min_k (row[k] + j - k)
            table[i] = np.minimum.accumulate(row - cols) + cols
        i, j = n, m
        while i > 0 or j > 0:
            if i > 0 and j > 0:
                same = codes_a[i - 1] == codes_b[j - 1]
                if table[i, j] == table[i - 1, j - 1] + (0 if same else 1):
                    steps.append("equal" if same else "replace")
                    i, j = i - 1, j - 1
                    continue
            if i > 0 and table[i, j] == table[i - 1, j] + 1:
                steps.append("delete")
                i -= 1
            else:
                steps.append("insert")
                j -= 1
        steps.reverse()
    else:
        steps = ["delete"] * n + ["insert"] * m
    opcodes: list[Opcode] = []
    if prefix:
        opcodes.append(("equal", 0, prefix, 0, prefix))
    i, j = prefix, prefix
    for tag in steps:
        di, dj = (0, 1) if tag == "insert" else (1, 0) if tag == "delete" else (1, 1)
        if opcodes and opcodes[-1][0] == tag and opcodes[-1][2] == i and opcodes[-1][4] == j:
            _, i1, _, j1, _ = opcodes[-1]
            opcodes[-1] = (tag, i1, i + di, j1, j + dj)
        else:
            opcodes.append((tag, i, i + di, j, j + dj))
        i, j = i + di, j + dj
    if suffix:
        opcodes.append(("equal", n_a - suffix, n_a, n_b - suffix, n_b))
    return opcodes


def _char_opcodes(correct: str, incorrect: str, char_diff: CharDiff) -> list[Opcode]:
    if char_diff == "difflib":
        return difflib.SequenceMatcher(None, correct, incorrect, autojunk=False).get_opcodes()
    if char_diff != "levenshtein":
        raise ConfigError(f"char_diff={char_diff!r} must be 'levenshtein' or 'difflib'.")
    prefix = len(_common_prefix(correct, incorrect))
    rest_a, rest_b = correct[prefix:], incorrect[prefix:]
    suffix = len(_common_prefix(rest_a[::-1], rest_b[::-1]))
    cells = (len(rest_a) - suffix + 1) * (len(rest_b) - suffix + 1)
    if cells > MAX_LEVENSHTEIN_CELLS:
        warnings.warn(
            f"FAIT: the Levenshtein alignment of a {len(correct)}-character pair needs {cells} cells; "
            "using difflib on characters for it instead.",
            stacklevel=3,
        )
        return difflib.SequenceMatcher(None, correct, incorrect, autojunk=False).get_opcodes()
    return levenshtein_opcodes(correct, incorrect)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _mark_from_opcodes(mask: np.ndarray, opcodes: Sequence[Opcode], spans: Sequence[tuple[int, int]], insertions: Insertions) -> None:
    """Mark ``spans[i1:i2]`` of every replace/delete opcode and, for inserts, the units next to them."""
    units = len(spans)
    for tag, i1, i2, _, _ in opcodes:
        if tag in ("replace", "delete"):
            marked = range(i1, i2)
        elif tag == "insert" and insertions == "adjacent":
            marked = [k for k in (i1 - 1, i1) if 0 <= k < units]
        else:
            continue
        for k in marked:
            start, end = spans[k]
            mask[start:end] = True


def _line_spans(text: str) -> list[tuple[int, int]]:
    """Character span of each line's content (its terminator excluded; an empty line: its terminator)."""
    spans = []
    cursor = 0
    for line, content in zip(text.splitlines(keepends=True), text.splitlines()):
        end = cursor + (len(content) if content else len(line))
        spans.append((cursor, end))
        cursor += len(line)
    return spans


def edit_masks(
    correct: str,
    incorrect: str,
    *,
    char_diff: CharDiff = "levenshtein",
    insertions: Insertions = "adjacent",
) -> tuple[np.ndarray, np.ndarray]:
    """FAIT's error-sensitive characters of the correct code, at line and at character level.

    - **Line level**: ``difflib.SequenceMatcher`` (``autojunk=False``) on the lines of both versions
      (compared without their line terminators). The characters of every line of ``correct`` in a
      ``replace`` or ``delete`` opcode are marked (a line's content; its terminator is not, except for
      an empty line, which is marked through its terminator so that it is not lost).
    - **Character level**: an edit alignment of the characters, :func:`levenshtein_opcodes` (a minimal
      edit script, the paper's "Levenshtein alignment") or ``difflib`` on characters. The characters of
      ``correct`` in ``replace`` / ``delete`` opcodes are marked.

    Insertions (text of ``incorrect`` with no counterpart in ``correct``) have no character of their
    own in ``correct``: with ``insertions="adjacent"`` (default) the unit on each side of the insertion
    point is marked (the line before and the line after; the character before and the character after),
    so a fault made by adding code still marks where it happens; ``"ignore"`` marks nothing for them.

    Args:
        correct: the correct code (the SFT response).
        incorrect: the functionally incorrect variant.
        char_diff: ``"levenshtein"`` (default, the paper's description) or ``"difflib"`` (faster on long,
            very different pairs; not a minimal edit script). Pairs whose alignment table would exceed
            :data:`MAX_LEVENSHTEIN_CELLS` fall back to ``difflib`` with a warning.
        insertions: ``"adjacent"`` or ``"ignore"`` (see above).

    Returns:
        ``(line_char_mask, char_mask)``: two bool arrays of length ``len(correct)``.

    Example:
        >>> line, char = edit_masks("return a+b", "return a-b")
        >>> line.all(), char.nonzero()[0].tolist()
        (np.True_, [8])
    """
    if insertions not in ("adjacent", "ignore"):
        raise ConfigError(f"insertions={insertions!r} must be 'adjacent' or 'ignore'.")
    line_mask = np.zeros(len(correct), dtype=bool)
    spans = _line_spans(correct)
    # splitlines() drops exactly each line's terminator, matching _line_spans
    line_ops = difflib.SequenceMatcher(None, correct.splitlines(), incorrect.splitlines(), autojunk=False).get_opcodes()
    _mark_from_opcodes(line_mask, line_ops, spans, insertions)
    char_mask = np.zeros(len(correct), dtype=bool)
    char_spans = [(k, k + 1) for k in range(len(correct))]
    _mark_from_opcodes(char_mask, _char_opcodes(correct, incorrect, char_diff), char_spans, insertions)
    return line_mask, char_mask


def char_mask_to_tokens(char_mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Tokens whose characters overlap a marked character.

    Args:
        char_mask: ``(C,)`` bool, one entry per character of the encoded text.
        offsets: ``(N, 2)`` the tokenizer's ``offset_mapping`` (``[start, end)`` per token); a token with
            an empty span counts as covering the character at its start (as for ``weight_spans``).

    Returns:
        ``(N,)`` bool.

    Example:
        >>> char_mask_to_tokens(np.array([0, 0, 1, 0], dtype=bool), np.array([[0, 2], [2, 3], [3, 4]]))
        array([False,  True, False])
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    chars = len(char_mask)
    prefix = np.concatenate([[0], np.cumsum(np.asarray(char_mask, dtype=np.int64))])
    start = np.clip(offsets[:, 0], 0, chars)
    end = np.clip(np.maximum(offsets[:, 1], offsets[:, 0] + 1), 0, chars)
    return prefix[end] - prefix[start] > 0


# ----------------------------------------------------------------------------------------------------
# Weights (pure functions)
# ----------------------------------------------------------------------------------------------------
def fait_weights(line_mask: Tensor, token_mask: Tensor, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """FAIT's static per-token weights ``1 + α·m_line + β·m_tok``.

    Args:
        line_mask: ``(B, T)`` 0/1 (float or bool): the token lies on a line the line diff flags.
        token_mask: ``(B, T)`` 0/1: the token overlaps a character the character alignment flags.
        alpha: up-weight of flagged lines.
        beta: extra up-weight of flagged characters' tokens.

    Returns:
        ``(B, T)`` weights in the masks' floating dtype (float32 for bool masks).

    Example:
        >>> fait_weights(torch.tensor([[1., 1., 0.]]), torch.tensor([[0., 1., 0.]]))
        tensor([[2., 3., 1.]])
    """
    dtype = torch.promote_types(
        line_mask.dtype if line_mask.is_floating_point() else torch.float32,
        token_mask.dtype if token_mask.is_floating_point() else torch.float32,
    )
    return 1.0 + alpha * line_mask.to(dtype) + beta * token_mask.to(dtype)


def fait_dynamic_scale(nll: Tensor, mask: Tensor, edited: Tensor, max_weight: float) -> Tensor:
    """The optional dynamic factor ``s = clip(L̄_edited / L̄_all, 1, max_weight)`` (detached).

    ``L̄_edited`` is the mean NLL of the scored tokens (``mask``) that are ``edited`` (on a flagged line
    or character), ``L̄_all`` the mean NLL of all scored tokens. ``s = 1`` when no scored token is
    edited or ``L̄_all`` is 0. This is the spec's suggestion, not the paper's (unretrieved) formula.

    Example:
        >>> nll = torch.tensor([[3.0, 1.0, 1.0, 1.0]])
        >>> fait_dynamic_scale(nll, torch.ones(1, 4, dtype=torch.bool), torch.tensor([[1, 0, 0, 0]]), 5.0)
        tensor(2.)
    """
    mask = mask.bool()
    edited = edited.bool() & mask
    values = nll.detach().to(torch.float64 if nll.dtype == torch.float64 else torch.float32)
    count_all, count_edited = mask.sum(), edited.sum()
    mean_all = (values * mask).sum() / count_all.clamp(min=1)
    mean_edited = (values * edited).sum() / count_edited.clamp(min=1)
    usable = (count_edited > 0) & (mean_all > 0)
    ratio = torch.where(usable, mean_edited / torch.where(usable, mean_all, torch.ones_like(mean_all)), torch.ones_like(mean_all))
    return ratio.clamp(min=1.0, max=max_weight)


# ----------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------
class FAIT(BatchTokenMethod, TokenMethod):
    """Fault-aware fine-tuning: up-weight the tokens where a correct solution differs from a faulty one.

    Paper: FAIT, fault-aware fine-tuning for code generation (arXiv 2503.16913; later renamed FGIT,
    fault-guided fine-tuning).
    Each token of the correct code gets ``w = 1 + α·m_line + β·m_tok`` (see :mod:`.fait`): ``m_line``
    marks the lines a line diff against the incorrect variant flags, ``m_tok`` the tokens overlapping
    the characters a Levenshtein alignment flags. So with ``α = β = 1`` the token(s) covering an
    edited character weigh 3, the other tokens of a changed line 2, and the tokens outside changed
    lines 1.

    The masks travel with the data: :class:`~lightning_tokens.datamodules.SFTDataModule` reads records
    ``{"prompt", "response", "incorrect"}`` and puts ``fait_line_mask`` / ``fait_token_mask`` ``(B, T)``
    in the batches (also packed ones). Records without ``incorrect`` weigh 1 everywhere.

    Hook points (one class, both):
        - **pre-forward** (:class:`~lightning_tokens.core.BatchTokenMethod`): the static weights multiply
          ``batch["token_weights"]`` in ``on_train_batch_start``, so any module that honours
          ``token_weights`` trains with FAIT;
        - **post-forward** (:class:`~lightning_tokens.core.TokenMethod`, through ``TokenLossMixin``): logs
          ``line_fraction`` / ``token_fraction`` (share of scored tokens marked) and ``mean_weight``; with
          ``dynamic=True`` it also multiplies the weight of every edited token by
          ``s = clip(L̄_edited / L̄_all, 1, max_weight)`` from the current model's NLL (logged as
          ``dynamic_scale``). The dynamic option needs a module with the mixin.

    Ambiguities (``shared/specs/text_methods.md`` §5):
        - *The dynamic weighting formula* was not retrievable (paper Sec. 3.2 and code inaccessible).
          ``dynamic`` (default ``False``) turns on the spec's suggested rescaling above, an explicit
          stand-in; off by default because the static form is the only one the sources state.
        - *α and β* were not retrieved: default 1 and 1, the spec's numeric check (weights 3 / 2 / 1).
        - *Which characters count for insertions* and *Levenshtein vs difflib on characters* are data
          options of the datamodule (``fait_insertions``, ``fait_char_diff``; defaults ``adjacent`` and
          ``levenshtein``, the paper's description), see :func:`edit_masks`.

    Args:
        alpha: up-weight of the tokens on changed lines (``>= 0``).
        beta: extra up-weight of the tokens overlapping edited characters (``>= 0``).
        dynamic: multiply edited tokens' weights by the dynamic factor (needs ``TokenLossMixin``).
        max_weight: upper clip of the dynamic factor (``>= 1``); not from the paper. 2 keeps the largest
            weight at ``2·(1 + α + β)``.

    Example::

        dm = SFTDataModule(train_file="data/examples/fait_code.jsonl")   # {prompt, response, incorrect}
        trainer = L.Trainer(max_steps=100, callbacks=[FAIT(alpha=1.0, beta=1.0)])
        trainer.fit(TokenLM(model="tiny-llama", tokenizer="char"), datamodule=dm)
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, dynamic: bool = False, max_weight: float = 2.0) -> None:
        if alpha < 0 or beta < 0:
            raise ConfigError(f"FAIT(alpha={alpha}, beta={beta}): alpha and beta must be >= 0 (they up-weight edited tokens).")
        if max_weight < 1:
            raise ConfigError(f"FAIT(max_weight={max_weight}): max_weight must be >= 1 (the dynamic factor is clipped to [1, max_weight]).")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.dynamic = bool(dynamic)
        self.max_weight = float(max_weight)

    @staticmethod
    def _masks(batch: dict[str, Any] | None) -> tuple[Tensor, Tensor] | None:
        if not batch or FAIT_LINE_KEY not in batch or FAIT_TOKEN_KEY not in batch:
            return None
        return batch[FAIT_LINE_KEY], batch[FAIT_TOKEN_KEY]

    @staticmethod
    def _missing() -> ValueError:
        return ValueError(
            f"FAIT needs the batch keys '{FAIT_LINE_KEY}' and '{FAIT_TOKEN_KEY}': train on an SFTDataModule whose "
            "records are {prompt, response, incorrect} (the response is the correct code, incorrect a faulty variant)."
        )

    @override
    def token_weights(self, batch: dict[str, Any], pl_module: pl.LightningModule) -> Tensor | None:
        masks = self._masks(batch)
        if masks is None:
            raise self._missing()
        return fait_weights(masks[0], masks[1], self.alpha, self.beta)

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        masks = self._masks(stats.batch)
        if masks is None:
            if self.dynamic:
                raise self._missing()
            return TokenMethodOutput()
        line, token = (m.to(stats.labels.device) for m in masks)
        mask = stats.mask
        scored = mask.sum().clamp(min=1)  # no host sync: logs are 0 for a batch without scored tokens
        static = fait_weights(line, token, self.alpha, self.beta).float()
        logs: dict[str, float | Tensor] = {
            "line_fraction": ((line > 0) & mask).sum() / scored,
            "token_fraction": ((token > 0) & mask).sum() / scored,
            "mean_weight": (static * mask).sum() / scored,
        }
        if not self.dynamic:
            return TokenMethodOutput(logs=logs)
        edited = (line > 0) | (token > 0)
        scale = fait_dynamic_scale(stats.nll, mask, edited, self.max_weight)
        weights = torch.where(edited & mask, scale.to(torch.float32), torch.ones((), dtype=torch.float32, device=scale.device))
        logs["dynamic_scale"] = scale.float()
        return TokenMethodOutput(weights=weights, logs=logs)
