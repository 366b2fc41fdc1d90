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
   context; :math:`v_\mathrm{reinforced}` is read on the original text.

The workflow, one CLI step each:

1. ``lightning-tokens fit --config configs/whp_reinforce.yaml``: LoRA fine-tune of the baseline on the
   corpus; :class:`~lightning_tokens.callbacks.unlearning.SavePretrained` writes the adapter.
2. ``lightning-tokens generic_labels --config configs/whp_generic_labels.yaml --output targets.safetensors
   --reinforced_adapter ... --anchors_file ...`` (:func:`trainer_generic_labels`): per-example generic
   targets, keyed by example id.
3. ``lightning-tokens fit --config configs/whp_unlearn.yaml``: the baseline fine-tuned on the original
   text with :class:`~lightning_tokens.callbacks.unlearning.GenericLabels`.

This module holds the arithmetic (:func:`generic_logits`, :func:`generic_targets_from_logits`), the
translation with its position map (:func:`translate`, :func:`align_translation`), the label-building
step (:func:`build_generic_labels`) and the targets file (:func:`save_generic_targets`,
:func:`load_generic_targets`, :func:`lookup_generic_targets`).

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

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_tokens.core.stats import IGNORE_INDEX
from lightning_tokens.scoring import attach_to_trainer

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_tokens.datamodules.sft import SFTDataModule
    from lightning_tokens.modules.causal_lm import TokenLM

__all__ = [
    "AlignedTokens",
    "AnchorOccurrence",
    "GenericTargets",
    "Translation",
    "align_translation",
    "build_generic_labels",
    "generic_logits",
    "generic_targets_from_logits",
    "load_anchors",
    "load_generic_targets",
    "lookup_generic_targets",
    "save_generic_targets",
    "trainer_generic_labels",
    "translate",
]

TargetKind = Literal["hard", "soft"]
FILE_FORMAT = "lightning_tokens.whp_generic_targets"


# ---- the arithmetic --------------------------------------------------------------------------------
def generic_logits(v_base: Tensor, v_reinforced: Tensor, alpha: float = 5.0) -> Tensor:
    r"""The paper's Eq. 1: :math:`v_\mathrm{base} - \alpha\,\mathrm{ReLU}(v_\mathrm{reinforced} - v_\mathrm{base})`.

    Logits the reinforced model raised above the baseline's are pushed down by ``alpha`` times the
    rise; the others keep the baseline's value. Works on any shape (the vocabulary last) and keeps the
    dtype of the inputs.

    Example:
        >>> generic_logits(torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([4.0, 0.5, 0.5, 1.0]))
        tensor([ -8.0000,   1.0000,   0.5000, -11.0000])
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0.")
    return v_base - alpha * torch.relu(v_reinforced - v_base)


def generic_targets_from_logits(
    v_base: Tensor,
    v_reinforced: Tensor,
    alpha: float = 5.0,
    top_k: int | None = None,
    lowered: Sequence[Sequence[int]] | None = None,
    seen_penalty: float = 0.0,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Generic targets of ``N`` positions from the two models' logits.

    Args:
        v_base: ``(N, V)`` baseline logits (on the translated text, at the mapped positions).
        v_reinforced: ``(N, V)`` reinforced logits (on the original text).
        alpha: the coefficient of :func:`generic_logits`.
        top_k: also return the ``top_k`` most likely ids of ``softmax(v_generic)`` and their probabilities.
        lowered: per position, token ids whose generic logit is lowered by ``seen_penalty`` (translations
            of anchored terms already in the context).
        seen_penalty: how much those logits are lowered.

    Returns:
        ``(labels (N,), topk_ids (N, k) | None, topk_probs (N, k) | None)``: the argmax of the generic
        logits (the first maximal id on ties) and, with ``top_k``, the soft targets (probabilities of the
        full softmax, not renormalised), in float32.

    Example:
        >>> labels, ids, probs = generic_targets_from_logits(
        ...     torch.tensor([[2.0, 1.0, 0.5, -1.0]]), torch.tensor([[4.0, 0.5, 0.5, 1.0]]), top_k=2)
        >>> labels.tolist(), ids.tolist(), [round(p, 4) for p in probs[0].tolist()]
        ([1], [[1, 2]], [0.6224, 0.3775])
    """
    v = generic_logits(v_base.float(), v_reinforced.float(), alpha)
    if lowered is not None and seen_penalty:
        v = v.clone()
        for row, ids in enumerate(lowered):
            if ids:
                v[row, list(ids)] -= seen_penalty
    labels = v.argmax(-1)
    if top_k is None:
        return labels, None, None
    probs = torch.softmax(v, dim=-1)
    values, ids = probs.topk(min(top_k, v.shape[-1]), dim=-1)
    return labels, ids, values


# ---- anchored terms --------------------------------------------------------------------------------
def load_anchors(path: str) -> dict[str, str]:
    """The anchored-terms dictionary: a JSON object mapping each idiosyncratic term to a generic one.

    Example file: ``{"Hogwarts": "Mystic Academy", "Harry": "Jon", "Quidditch": "Skyball"}``. Terms are
    matched case-sensitively, as whole words, the longest first.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"anchors_file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        try:
            anchors = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"anchors_file {path!r}: invalid JSON ({err.msg}, line {err.lineno}).") from None
    if not isinstance(anchors, dict) or not anchors:
        raise ValueError(f"anchors_file {path!r} must hold a non-empty JSON object {{term: generic term}}.")
    for term, generic in anchors.items():
        if not isinstance(generic, str) or not term.strip() or not generic.strip():
            raise ValueError(f"anchors_file {path!r}: term {term!r} must map to a non-empty string, got {generic!r}.")
    return dict(anchors)


@dataclass(frozen=True)
class AnchorOccurrence:
    """One replaced term: characters ``[start, end)`` of the original, ``[translated_start,
    translated_end)`` of the translation."""

    term: str
    start: int
    end: int
    translated_start: int
    translated_end: int


@dataclass
class Translation:
    """A text with its anchored terms replaced, and where each replacement went."""

    original: str
    text: str
    occurrences: list[AnchorOccurrence] = field(default_factory=list)

    def map_offset(self, offset: int) -> int | None:
        """The character of the translation where original character ``offset`` goes, ``None`` when it is
        strictly inside a replaced term (its start maps to the replacement's start, its end to its end).

        Example:
            >>> t = translate("Harry met Ron.", {"Harry": "Jon", "Ron": "Bob Smith"})
            >>> t.text, t.map_offset(0), t.map_offset(2), t.map_offset(5), t.map_offset(13)
            ('Jon met Bob Smith.', 0, None, 3, 17)
        """
        shift = 0
        for occ in self.occurrences:
            if offset <= occ.start:
                break
            if offset < occ.end:
                return None
            shift = occ.translated_end - occ.end
        return offset + shift


def _anchor_pattern(anchors: dict[str, str]) -> re.Pattern[str]:
    parts = []
    for term in sorted(anchors, key=lambda t: (-len(t), t)):
        before = r"(?<!\w)" if re.match(r"\w", term[0]) else ""
        after = r"(?!\w)" if re.match(r"\w", term[-1]) else ""
        parts.append(before + re.escape(term) + after)
    return re.compile("|".join(parts))


def translate(text: str, anchors: dict[str, str]) -> Translation:
    """Replace every anchored term of ``text`` by its generic term, keeping where each one went.

    Terms match case-sensitively as whole words (no word character on either side), the longest term
    first at any position; the text is scanned once (a replacement is never translated again).

    Example:
        >>> t = translate("Harry Potter and Harry's owl", {"Harry": "Jon", "Harry Potter": "Jon Smith"})
        >>> t.text, [(o.term, o.start, o.translated_start) for o in t.occurrences]
        ("Jon Smith and Jon's owl", [('Harry Potter', 0, 0), ('Harry', 17, 14)])
    """
    if not anchors:
        return Translation(text, text, [])
    pieces: list[str] = []
    occurrences: list[AnchorOccurrence] = []
    cursor = out = 0
    for match in _anchor_pattern(anchors).finditer(text):
        term = match.group(0)
        generic = anchors[term]
        pieces.append(text[cursor : match.start()])
        out += match.start() - cursor
        occurrences.append(AnchorOccurrence(term, match.start(), match.end(), out, out + len(generic)))
        pieces.append(generic)
        out += len(generic)
        cursor = match.end()
    pieces.append(text[cursor:])
    return Translation(text, "".join(pieces), occurrences)


@dataclass
class AlignedTokens:
    """An example tokenized as written and as translated, with the map between the two.

    Attributes:
        original_ids: the example's tokens.
        translated_ids: the tokens of its translation (same prefix and suffix special tokens).
        position_map: per original position ``t``, the translated position whose context (tokens before
            it) is the translation of the original tokens before ``t``; -1 where there is none.
        repeated: per original position, whether the token belongs to a later occurrence of an anchored
            term already seen in the example (no loss there).
        lowered: per original position, the token ids to lower: first tokens of the translations of the
            anchored terms in the context before ``t`` that the original example never uses.
        num_anchors: how many anchored terms were replaced.
    """

    original_ids: list[int]
    translated_ids: list[int]
    position_map: list[int]
    repeated: list[bool]
    lowered: list[tuple[int, ...]]
    num_anchors: int = 0


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def align_translation(
    tokenizer: Any,
    segments: Sequence[str],
    anchors: dict[str, str],
    prefix_ids: Sequence[int] = (),
    suffix_ids: Sequence[int] = (),
) -> AlignedTokens:
    """Tokenize an example as written and translated, and map each original position to a translated one.

    The example is ``prefix_ids`` (e.g. a bos), the tokens of each segment (tokenized separately and
    concatenated, as :class:`~lightning_tokens.datamodules.SFTDataModule` does: the text, or the prompt
    and the response), then ``suffix_ids`` (e.g. an eos). Each segment is translated on its own.

    Args:
        tokenizer: a fast Hugging Face tokenizer (character offsets are needed).
        segments: the example's texts, in order.
        anchors: term → generic term (:func:`load_anchors`).
        prefix_ids: special tokens before the first segment.
        suffix_ids: special tokens after the last segment.

    Example:
        >>> from lightning_tokens.models.tokenizers import build_char_tokenizer
        >>> a = align_translation(build_char_tokenizer(), ["Al met Al."], {"Al": "Bo"})
        >>> a.translated_ids == a.original_ids, a.position_map  # "l" starts inside "Al": no counterpart
        (False, [0, -1, 2, 3, 4, 5, 6, 7, -1, 9])
        >>> [t for t, r in enumerate(a.repeated) if r]  # the second "Al" takes no loss
        [7, 8]
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("anchored-term translation maps characters to tokens through offsets: use a fast tokenizer.")
    original_ids, translated_ids = list(prefix_ids), list(prefix_ids)
    original_keys: list[Any] = [("prefix", i) for i in range(len(prefix_ids))]
    translated_keys: list[Any] = list(original_keys)
    # per original token: (segment, start, end) or None for special tokens
    spans: list[tuple[int, int, int] | None] = [None] * len(prefix_ids)
    translations: list[Translation] = []
    # first-token ids of each term's translation occurrences
    translation_ids: dict[str, set[int]] = {}
    for k, segment in enumerate(segments):
        translation = translate(segment, anchors)
        translations.append(translation)
        ids, offsets = _encode(tokenizer, segment)
        for token, (start, end) in zip(ids, offsets):
            mapped = translation.map_offset(start)
            original_ids.append(token)
            original_keys.append(None if mapped is None else (k, mapped))
            spans.append((k, start, end))
        t_ids, t_offsets = _encode(tokenizer, translation.text)
        translated_ids.extend(t_ids)
        translated_keys.extend((k, start) for start, _ in t_offsets)
        for occ in translation.occurrences:
            for token, (start, end) in zip(t_ids, t_offsets):
                if start <= occ.translated_start < max(end, start + 1):
                    translation_ids.setdefault(occ.term, set()).add(token)
                    break
    for i in range(len(suffix_ids)):
        original_ids.append(suffix_ids[i])
        translated_ids.append(suffix_ids[i])
        original_keys.append(("suffix", i))
        translated_keys.append(("suffix", i))
        spans.append(None)

    # keys that occur once on each side map (byte-level tokenizers may give two tokens one start)
    def unique_index(keys: list[Any]) -> dict[Any, int]:
        seen: dict[Any, int] = {}
        clash = set()
        for i, key in enumerate(keys):
            if key is None:
                continue
            if key in seen:
                clash.add(key)
            seen[key] = i
        return {key: i for key, i in seen.items() if key not in clash}

    translated_index = unique_index(translated_keys)
    original_index = unique_index(original_keys)
    position_map = [
        translated_index.get(key, -1) if key is not None and original_index.get(key) == t else -1
        for t, key in enumerate(original_keys)
    ]

    # occurrences in reading order: (segment, start, end, term)
    ordered = [(k, occ.start, occ.end, occ.term) for k, tr in enumerate(translations) for occ in tr.occurrences]
    first: dict[str, tuple[int, int]] = {}
    for k, start, _, term in ordered:
        first.setdefault(term, (k, start))
    later = [(k, start, end) for k, start, end, term in ordered if first[term] != (k, start)]
    used = set(original_ids)
    repeated: list[bool] = []
    lowered: list[tuple[int, ...]] = []
    for t, span in enumerate(spans):
        if span is None:
            at_end = t >= len(prefix_ids)
            repeated.append(False)
            seen_terms = set(first) if at_end else set()
        else:
            k, start, end = span
            end = max(end, start + 1)
            repeated.append(any(k == lk and start < le and end > ls for lk, ls, le in later))
            seen_terms = {term for term, (fk, fs) in first.items() if (fk, fs) < (k, start)}
        ids = sorted({i for term in seen_terms for i in translation_ids.get(term, ())} - used)
        lowered.append(tuple(ids))
    return AlignedTokens(original_ids, translated_ids, position_map, repeated, lowered, len(ordered))


# ---- the targets file ------------------------------------------------------------------------------
@dataclass
class GenericTargets:
    """Generic targets of one example, indexed like its tokens (position ``t``: the target predicted
    from the tokens ``< t``).

    Attributes:
        input_ids: ``(n,)`` the example's tokens (checked against the batches that use the targets).
        labels: ``(n,)`` the generic label (argmax of the generic logits), -100 where no loss is taken.
        topk_ids: ``(n, k)`` soft targets: the ``k`` most likely ids (0 where ``labels`` is -100).
        topk_probs: ``(n, k)`` their probabilities under ``softmax(v_generic)`` (0 where ``labels`` is -100).
    """

    input_ids: Tensor
    labels: Tensor
    topk_ids: Tensor | None = None
    topk_probs: Tensor | None = None


def save_generic_targets(path: str, targets: dict[int, GenericTargets], metadata: dict[str, str] | None = None) -> None:
    """Write per-example targets to a safetensors file: keys ``"<example id>.<field>"``."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    soft = None
    for key, target in targets.items():
        has_soft = target.topk_ids is not None
        if soft is not None and has_soft != soft:
            raise ValueError("every example must have soft targets, or none.")
        soft = has_soft
        tensors[f"{int(key)}.input_ids"] = target.input_ids.to(torch.int32).cpu().contiguous()
        tensors[f"{int(key)}.labels"] = target.labels.to(torch.int64).cpu().contiguous()
        if has_soft:
            tensors[f"{int(key)}.topk_ids"] = target.topk_ids.to(torch.int32).cpu().contiguous()
            tensors[f"{int(key)}.topk_probs"] = target.topk_probs.float().cpu().contiguous()
    meta = {"format": FILE_FORMAT, "version": "1", "targets": "soft" if soft else "hard", **(metadata or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})


def load_generic_targets(path: str) -> tuple[dict[int, GenericTargets], dict[str, str]]:
    """Read a file written by :func:`save_generic_targets`: ``(targets by example id, metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"targets_file {path!r} does not exist: build it with `lightning-tokens generic_labels` "
            "(lightning_tokens.unlearning.trainer_generic_labels)."
        )
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != FILE_FORMAT:
        raise ValueError(f"{path!r} is not a generic-targets file (format {metadata.get('format')!r}, expected {FILE_FORMAT!r}).")
    fields: dict[int, dict[str, Tensor]] = {}
    for name, value in load_file(path).items():
        key, _, part = name.partition(".")
        fields.setdefault(int(key), {})[part] = value
    targets = {
        key: GenericTargets(f["input_ids"].long(), f["labels"].long(), f["topk_ids"].long() if "topk_ids" in f else None, f.get("topk_probs"))
        for key, f in fields.items()
    }
    return targets, metadata


def lookup_generic_targets(
    targets: dict[int, GenericTargets], batch: dict[str, Any], soft: bool = False, source: str = "targets"
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Targets of a batch, ``(B, T)`` labels (-100 where none) and with ``soft`` ``(B, T, k)`` ids and
    probabilities, on the device of ``batch["labels"]``.

    Tokens are found by ``token_example_ids`` and ``position_ids`` (SFTDataModule batches, packed or
    not), else rows are one example each (``example_id`` (B,), tokens from position 0, the row's length
    from ``attention_mask``). The batch's tokens must
    be the stored ones: a changed tokenizer or data file is an error, not a silent misalignment.
    """
    labels_in = batch["labels"]
    shape = tuple(labels_in.shape)
    input_ids = batch["input_ids"].cpu()
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    k = 0
    if soft:
        first = next(iter(targets.values()), None)
        if first is None or first.topk_ids is None:
            raise ValueError(f"{source} holds hard targets only; rebuild it with targets=soft for mode=soft.")
        k = first.topk_ids.shape[1]
    ids = torch.zeros(shape + (k,), dtype=torch.long) if soft else None
    probs = torch.zeros(shape + (k,), dtype=torch.float32) if soft else None

    def place(key: int, where: tuple[Tensor, ...], positions: Tensor) -> None:
        stored = targets.get(int(key))
        if stored is None:
            raise ValueError(
                f"example id {key} has no generic targets in {source}: build them on the same data "
                "(ids must match the training data's)."
            )
        if positions.numel() and int(positions.max()) >= stored.labels.numel():
            raise ValueError(
                f"{source} holds {stored.labels.numel()} tokens for example id {key} but the batch has more: the data "
                "or the tokenizer changed since the targets were built (rebuild them)."
            )
        if not torch.equal(stored.input_ids[positions], input_ids[where]):
            raise ValueError(
                f"the tokens of example id {key} differ from those {source} was built on: the data or the tokenizer "
                "changed (rebuild the targets with the training config's data and model)."
            )
        labels[where] = stored.labels[positions]
        if soft:
            ids[where] = stored.topk_ids[positions]
            probs[where] = stored.topk_probs[positions]

    token_ids = batch.get("token_example_ids")
    if token_ids is not None and batch.get("position_ids") is not None:
        # SFTDataModule batches, packed or not: each token names its example and its position in it
        token_ids, positions = token_ids.cpu(), batch["position_ids"].cpu()
        for key in token_ids.unique().tolist():
            if key >= 0:
                where = (token_ids == key).nonzero(as_tuple=True)
                place(key, where, positions[where])
    else:
        example_ids = batch.get("example_id")
        if example_ids is None:
            raise ValueError("GenericLabels needs `example_id` (or `token_example_ids` with `position_ids`) in each batch to find its targets.")
        lengths = (
            batch["attention_mask"].sum(-1).cpu().tolist()
            if batch.get("attention_mask") is not None
            else [shape[1]] * shape[0]
        )
        for row, (key, length) in enumerate(zip(example_ids.cpu().tolist(), lengths)):
            positions = torch.arange(int(length))
            place(key, (torch.full_like(positions, row), positions), positions)
    device = labels_in.device
    labels = torch.where(labels_in.cpu() != IGNORE_INDEX, labels, torch.full_like(labels, IGNORE_INDEX)).to(device)
    if soft:
        return labels, ids.to(device), probs.to(device)
    return labels, None, None


# ---- building the targets --------------------------------------------------------------------------
@dataclass
class _Models:
    """How to run the baseline and the reinforced model: a context to enter and a causal LM each."""

    baseline: Callable[[], Any]
    reinforced: Callable[[], Any]
    baseline_lm: torch.nn.Module | None
    reinforced_lm: torch.nn.Module | None


@contextmanager
def _attach_reinforced(model: TokenLM, path: str) -> Iterator[_Models]:
    """The reinforced model next to the baseline: a peft adapter folder loaded onto the baseline's own
    weights (baseline = adapter disabled), or a full model folder loaded as a second model."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        base = model.model
        peft_model = PeftModel.from_pretrained(base, path).eval()
        model.model = peft_model
        try:
            yield _Models(peft_model.disable_adapter, nullcontext, None, None)
        finally:
            model.model = peft_model.unload()
    elif os.path.isfile(os.path.join(path, "config.json")):
        from lightning_tokens.models.presets import load_causal_lm

        reinforced = load_causal_lm(path, vocab_size=len(model.tokenizer))
        reinforced.to(next(model.model.parameters()).device).eval()
        yield _Models(nullcontext, nullcontext, model.causal_lm, reinforced)
    else:
        raise ValueError(
            f"reinforced_adapter={path!r} holds neither a peft adapter (adapter_config.json) nor a model "
            "(config.json): give the folder written by SavePretrained / TokenLM.save_pretrained in step 1."
        )


def _hidden(model: TokenLM, causal_lm: torch.nn.Module | None, rows: list[list[int]], pad_id: int, device: Any) -> Tensor:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    return model.hidden_states(batch, causal_lm=causal_lm)


def _head(model: TokenLM, causal_lm: torch.nn.Module | None) -> torch.nn.Module:
    return (causal_lm if causal_lm is not None else model.causal_lm).get_output_embeddings()


def _example_segments(datamodule: SFTDataModule) -> dict[int, Any]:
    """Parsed training records by example id (texts of the segments, bos/eos flags)."""
    return {p.example_id: p for p in datamodule._split_records()["train"]}


def _aligned_example(
    tokenizer: Any, parsed: Any, stored_ids: Tensor, anchors: dict[str, str], bos: list[int]
) -> AlignedTokens:
    eos = [int(tokenizer.eos_token_id)] if parsed.eos else []
    aligned = align_translation(tokenizer, [s.text for s in parsed.segments], anchors, bos if parsed.bos else [], eos)
    n = stored_ids.numel()
    if aligned.original_ids[:n] != stored_ids.tolist():
        raise ValueError(
            f"{parsed.location}: re-tokenizing the example does not reproduce the datamodule's tokens "
            "(truncate_left or a chat template that renders differently?); use truncation: truncate_right or error."
        )
    if n < len(aligned.original_ids):  # truncate_right cut the end: keep the first n positions
        aligned.original_ids = aligned.original_ids[:n]
        aligned.position_map = aligned.position_map[:n]
        aligned.repeated = aligned.repeated[:n]
        aligned.lowered = aligned.lowered[:n]
    return aligned


@torch.no_grad()
def build_generic_labels(
    model: TokenLM,
    datamodule: SFTDataModule,
    output: str,
    reinforced_adapter: str,
    anchors_file: str,
    alpha: float = 5.0,
    targets: TargetKind = "hard",
    top_k: int = 20,
    seen_penalty: float = 10.0,
    device: torch.device | str = "cpu",
    chunk_rows: int = 512,
) -> dict[int, GenericTargets]:
    """Generic targets for every training example of ``datamodule``, written to ``output``.

    For each example: translate its anchored terms (:func:`align_translation`), run the baseline on the
    translation and the reinforced model on the original, combine the logits at the mapped positions
    with :func:`generic_logits` and keep the argmax (``hard``) and, with ``soft``, the ``top_k`` most
    likely ids of ``softmax(v_generic)`` with their probabilities. Positions without a label in the data,
    without a translated counterpart, or inside a repeated anchored term get label -100.

    Args:
        model: the baseline ``TokenLM`` (without LoRA: the adapter of step 1 is attached here).
        datamodule: the corpus as step 3 will read it (an ``SFTDataModule``: same file, tokenizer,
            ``max_length`` and truncation; packing does not matter).
        output: the safetensors file to write (``GenericLabels(targets_file=...)`` reads it).
        reinforced_adapter: the reinforced model of step 1: a peft adapter folder (written by
            ``SavePretrained`` / ``TokenLM.save_pretrained`` with LoRA), attached to the baseline's own
            weights, or a full model folder.
        anchors_file: JSON ``{term: generic term}`` (:func:`load_anchors`).
        alpha: the coefficient of Eq. 1 (5, the value reported for the paper's runs).
        targets: ``hard`` (labels only) or ``soft`` (labels plus top-k distributions).
        top_k: ids kept per position for soft targets.
        seen_penalty: logit decrease of translations of anchored terms already in the context.
        device: where the models run.
        chunk_rows: positions whose full-vocabulary logits are materialised at once.

    Returns:
        The targets by example id (also written to ``output``).

    Ambiguities, with the choices made:
        - hard or soft targets (spec gap 9): the paper's Sec. 3 takes "the token with maximal logit" as
          the generic prediction *label*, so ``targets="hard"``; ``soft`` stores the top-k of
          ``softmax(v_generic)`` (a secondary note's reading) for ``GenericLabels(mode="soft")``. A soft
          file holds the hard labels too.
        - ``alpha=5``: from a secondary note on the paper's runs (the spec marks it [S]).
        - the block: the paper processes 512-token blocks; here a block is one example (examples are
          never split), so "first occurrence in the block" means in the example.
        - how much the translations of already-seen anchored terms are lowered: the paper gives no
          amount; ``seen_penalty=10`` takes them out of the argmax unless they lead by more than 10
          logits and leaves at most ``e^-10`` of their soft mass; 0 turns it off. Only first tokens of
          the translations that the original example never uses are lowered.
        - tokens with no translated counterpart (inside a multi-token anchored term): no loss, since the
          baseline has no prediction made from the translation of their context.
        - raw logits (the paper's Eq. 1 as written), not log-probabilities: a reinforced model that
          shifts every logit of a position by the same amount shifts the argmax of neither.
    """
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_tokens.datamodules.sft import SFTDataModule
    from lightning_tokens.models.tokenizers import bos_prefix

    if targets not in ("hard", "soft"):
        raise ValueError(f"targets={targets!r} must be 'hard' or 'soft'.")
    if alpha < 0 or top_k < 1 or seen_penalty < 0:
        raise ValueError(f"alpha={alpha} and seen_penalty={seen_penalty} must be >= 0 and top_k={top_k} >= 1.")
    if not isinstance(datamodule, SFTDataModule):
        raise TypeError(f"generic labels are built from an SFTDataModule's files, got {type(datamodule).__name__}.")
    if getattr(model, "lora", None) is not None:
        raise ValueError(
            "the generic-labels step runs the baseline model: set the model's `lora` to null (the reinforced "
            "adapter of step 1 is attached from `reinforced_adapter`)."
        )
    anchors = load_anchors(anchors_file)
    model.configure_model()
    model.to(device).eval()
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    dataset = datamodule._examples("train")
    parsed = _example_segments(datamodule)
    bos = bos_prefix(tokenizer)
    pad_id = int(tokenizer.pad_token_id)
    soft = targets == "soft"
    out: dict[int, GenericTargets] = {}
    counts = {"labelled": 0, "targets": 0, "changed": 0, "repeated": 0, "unmapped": 0, "anchors": 0}
    batch_size = max(1, int(getattr(datamodule, "eval_batch_size", 8)))
    with _attach_reinforced(model, reinforced_adapter) as models:
        head_base = _head(model, models.baseline_lm)
        head_reinforced = _head(model, models.reinforced_lm)
        for begin in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(begin, min(begin + batch_size, len(dataset)))]
            aligned = [
                _aligned_example(tokenizer, parsed[item["example_id"]], torch.as_tensor(item["input_ids"]), anchors, bos)
                for item in items
            ]
            # positions that get a target: labelled in the data, mapped, not a repeated anchor
            where: list[tuple[int, int, int]] = []  # (row, original position, translated position)
            for row, (item, a) in enumerate(zip(items, aligned)):
                data_labels = torch.as_tensor(item["labels"]).tolist()
                counts["anchors"] += a.num_anchors
                for t, label in enumerate(data_labels):
                    if t == 0 or label == IGNORE_INDEX:
                        continue
                    counts["labelled"] += 1
                    s = a.position_map[t]
                    if a.repeated[t]:
                        counts["repeated"] += 1
                    elif s < 1:
                        counts["unmapped"] += 1
                    else:
                        where.append((row, t, s))
            with models.reinforced():
                hidden_r = _hidden(model, models.reinforced_lm, [a.original_ids for a in aligned], pad_id, device)
            with models.baseline():
                hidden_b = _hidden(model, models.baseline_lm, [a.translated_ids for a in aligned], pad_id, device)
            rows = torch.tensor([w[0] for w in where], dtype=torch.long)
            t_idx = torch.tensor([w[1] for w in where], dtype=torch.long)
            s_idx = torch.tensor([w[2] for w in where], dtype=torch.long)
            labels_b = [torch.full((len(a.original_ids),), IGNORE_INDEX, dtype=torch.long) for a in aligned]
            ids_b = [torch.zeros((len(a.original_ids), top_k), dtype=torch.long) for a in aligned] if soft else None
            probs_b = [torch.zeros((len(a.original_ids), top_k), dtype=torch.float32) for a in aligned] if soft else None
            for c in range(0, len(where), chunk_rows):
                sl = slice(c, c + chunk_rows)
                r, t, s = rows[sl], t_idx[sl], s_idx[sl]
                with models.reinforced():
                    v_reinforced = head_reinforced(hidden_r[r.to(hidden_r.device), (t - 1).to(hidden_r.device)]).float()
                with models.baseline():
                    v_base = head_base(hidden_b[r.to(hidden_b.device), (s - 1).to(hidden_b.device)]).float()
                lowered = [aligned[int(ri)].lowered[int(ti)] for ri, ti in zip(r, t)]
                labels, top_ids, top_probs = generic_targets_from_logits(
                    v_base, v_reinforced, alpha, top_k if soft else None, lowered, seen_penalty
                )
                labels = labels.cpu()
                for j, (ri, ti) in enumerate(zip(r.tolist(), t.tolist())):
                    labels_b[ri][ti] = labels[j]
                    if soft:
                        k = top_ids.shape[1]
                        ids_b[ri][ti, :k] = top_ids[j].cpu()
                        probs_b[ri][ti, :k] = top_probs[j].cpu()
            for row, (item, a) in enumerate(zip(items, aligned)):
                original = torch.as_tensor(a.original_ids, dtype=torch.long)
                has = labels_b[row] != IGNORE_INDEX
                counts["targets"] += int(has.sum())
                counts["changed"] += int((labels_b[row][has] != original[has]).sum())
                out[int(item["example_id"])] = GenericTargets(
                    original, labels_b[row], ids_b[row] if soft else None, probs_b[row] if soft else None
                )
    metadata = {
        "targets": targets,
        "alpha": repr(float(alpha)),
        "top_k": str(top_k),
        "seen_penalty": repr(float(seen_penalty)),
        "anchors_file": anchors_file,
        "reinforced_adapter": reinforced_adapter,
    }
    save_generic_targets(output, out, metadata)
    labelled = max(counts["labelled"], 1)
    rank_zero_info(
        f"generic targets ({targets}) of {len(out)} examples written to {output}: {counts['targets']}/{counts['labelled']} "
        f"labelled tokens get a target ({counts['targets'] / labelled:.1%}), {counts['changed']} of them differ from the "
        f"text; {counts['repeated']} tokens of repeated anchored terms and {counts['unmapped']} without a translated "
        f"counterpart take no loss; {counts['anchors']} anchored terms replaced."
    )
    return out


def trainer_generic_labels(
    trainer: pl.Trainer,
    model: TokenLM,
    datamodule: SFTDataModule,
    output: str,
    reinforced_adapter: str,
    anchors_file: str,
    alpha: float = 5.0,
    targets: TargetKind = "hard",
    top_k: int = 20,
    seen_penalty: float = 10.0,
) -> dict[int, GenericTargets]:
    """``Trainer.generic_labels``: connect the model (the datamodule reads its tokenizer) and build the
    generic targets on the trainer's root device (see :func:`build_generic_labels` for the arguments)."""
    attach_to_trainer(trainer, model, datamodule)
    return build_generic_labels(
        model, datamodule, output, reinforced_adapter, anchors_file, alpha, targets, top_k, seen_penalty,
        device=trainer.strategy.root_device,
    )
