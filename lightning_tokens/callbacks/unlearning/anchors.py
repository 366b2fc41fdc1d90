"""Anchored-term translation: the terms dictionary, the translated text with where each replacement went, and
the map from the original example's token positions to the translated example's."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_tokens.core.errors import ConfigError

__all__ = ["AlignedTokens", "AnchorOccurrence", "Translation", "align_translation", "load_anchors", "translate"]


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
            raise ConfigError(f"anchors_file {path!r}: invalid JSON ({err.msg}, line {err.lineno}).") from None
    if not isinstance(anchors, dict) or not anchors:
        raise ConfigError(f"anchors_file {path!r} must hold a non-empty JSON object {{term: generic term}}.")
    for term, generic in anchors.items():
        if not isinstance(generic, str) or not term.strip() or not generic.strip():
            raise ConfigError(f"anchors_file {path!r}: term {term!r} must map to a non-empty string, got {generic!r}.")
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
        raise ConfigError("anchored-term translation maps characters to tokens through offsets: use a fast tokenizer.")
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
