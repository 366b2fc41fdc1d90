"""Supervised fine-tuning data from your own files, as a LightningDataModule.

Files are JSON Lines (``.jsonl``), JSON arrays (``.json``) or CSV (``.csv``, one column per field; list
fields such as ``messages``, ``token_weights`` and ``weight_spans`` hold JSON text, an ``id`` of digits is
an integer, and an empty cell is an absent field). Each record is one example in one of three schemas,
detected per record (or fixed with ``schema=``):

``{"prompt": ..., "response": ...}``
    Completion-only: the response and the eos carry labels, the prompt does not. Prompt and response
    are tokenized separately and concatenated (a leading bos is added when the tokenizer adds one).
``{"messages": [{"role": ..., "content": ...}, ...]}``
    A conversation rendered with the tokenizer's chat template (``apply_chat_template``; or the
    ``chat_template`` argument). Only assistant turns carry labels. The labelled characters of turn
    ``i`` are what the template adds between ``render(messages[:i], add_generation_prompt=True)`` and
    ``render(messages[:i + 1])`` (the content and the template's end-of-turn text, not the assistant
    header). A template that does not render conversations prefix-consistently (one that rewrites
    earlier turns, or adds a footer) falls back to labelling the first verbatim occurrence of each
    assistant content after the previous turn; a content the template does not reproduce verbatim is an
    error. Character spans become token labels through the fast tokenizer's ``offset_mapping``: a token
    is labelled when its characters overlap a labelled span. ``{% generation %}`` blocks are not needed.
    Without a chat template the fallback :data:`FALLBACK_CHAT_TEMPLATE` renders every message as
    ``<|role|>\\ncontent\\n`` (generation prompt ``<|assistant|>\\n``); an assistant turn's labels then
    cover ``content\\n``, and with ``add_eos`` an eos ends the conversation (labelled when the last
    message is an assistant's). Real chat templates close turns with their own tokens, so no eos is
    added to them.
``{"text": ...}``
    Plain language modelling: every token carries a label (and the eos, with ``add_eos``), except the
    first, as in every schema (see ``labels`` below).

Optional fields of every record:

- ``id``: a string or number naming the example (default: the record's 0-based position in its file).
  It becomes the integer ``example_id`` of the batches through :func:`stable_example_id` (a pure
  function, so offline per-example data can be keyed by it): a non-negative integer stays itself, any
  other value is hashed (SHA-256, 63 bits). Ids must be unique within a file;
  ``SFTDataModule.example_ids`` maps each loaded raw id to its integer.
- ``weight``: a sample weight ``>= 0`` multiplied into every token weight of the example.
- ``token_weights``: per-token weights, aligned to the labelled tokens of the example in order: the
  response tokens (``prompt_response``), the text tokens (``text``) or all assistant-turn labelled
  tokens (``messages``). When an eos is appended the list may have one more value, for the eos
  (otherwise the eos weighs 1).
- ``weight_spans``: ``[{"start": s, "end": e, "weight": w}, ...]``, character spans ``[s, e)`` into the
  response (``prompt_response``), the text (``text``) or, as a field of an assistant message, that
  message's content (``messages``). A token that overlaps a span gets its weight (the last listed span
  wins where spans overlap); other tokens weigh 1. ``token_weights`` and ``weight_spans`` multiply.
- ``incorrect`` (``prompt_response`` records only): a functionally incorrect variant of the response
  (the correct code), for FAIT (:class:`~lightning_tokens.callbacks.fait.FAIT`). The response's
  characters that a line diff and a character alignment against it flag
  (:func:`~lightning_tokens.callbacks.fait.edit_masks`) become per-token masks through the offsets (a
  token is marked when it overlaps a marked character).

Problems in the data raise :class:`SFTDataError` (a ``ValueError``) in ``setup``, before training,
naming the file, the line (JSON Lines, CSV; 1-based) or array index (JSON), and the field.

Batches (labels are **not** shifted: the library shifts once, in ``ops``):

==========================  ===============================================================================
``input_ids``               ``(B, T)`` long
``labels``                  ``(B, T)`` long, the token id where loss is taken, -100 elsewhere. The first token
                            of every example is -100 (it has no preceding token of its own example).
``token_weights``           ``(B, T)`` float32: per-token weight × sample ``weight`` (1.0 by default; 0 on
                            padding), indexed like ``labels``.
``token_example_ids``       ``(B, T)`` long: the ``example_id`` of each token, -1 on padding.
``position_ids``            ``(B, T)`` long: position within the token's own example.
``attention_mask``          ``(B, T)`` long, unpacked batches only (right padding).
``example_id``              ``(B,)`` long, unpacked batches only.
``fait_line_mask``          ``(B, T)`` float32 0/1, only when some record has ``incorrect``: the token lies on
                            a line of the correct response that the line diff flags; 0 on unlabelled tokens,
                            the eos, padding and records without ``incorrect``.
``fait_token_mask``         ``(B, T)`` float32 0/1, likewise: the token overlaps a flagged character.
==========================  ===============================================================================

Packing (``packing=True``) puts whole examples into rows of at most ``max_length`` tokens (best-fit in a
seeded random order, once at setup; the sampler shuffles rows every epoch); an example is never split.
Packed batches carry **no** ``attention_mask``: ``position_ids`` restart at 0 at every example, and the
row's padding is a pseudo-example of its own (positions ``0, 1, ...``). With ``attention_mask=None``
transformers (``masking_utils._preprocess_mask_arguments`` → ``find_packed_sequence_indices``) detects
packed sequences from ``position_ids`` (a new sequence wherever the position does not increase by one)
and ``create_causal_mask`` builds a block-diagonal causal mask (sdpa, eager and flex attention), but
only when there is no KV cache: Llama-style models create a ``DynamicCache`` whenever ``use_cache`` is on
(``config.use_cache`` defaults to true, in training too), and with a cache the detection is skipped. So
``decoder(input_ids, attention_mask=batch.get("attention_mask"), position_ids=batch["position_ids"],
use_cache=False)``, which is what ``TokenLM.forward`` calls, never attends across examples (``tests/datamodules/test_sft.py`` checks the hidden states against each
example run alone). Two cases need care: ``flash_attention_2`` recognises packed ``position_ids`` only
for a batch of one row (``modeling_flash_attention_utils._is_packed_sequence``), so use ``batch_size: 1``
with it; and a model that ignores ``position_ids`` needs an explicit 4-D mask, which
:func:`packed_attention_mask` builds from them.

Layout, one job per module (the public names are re-exported here):
:mod:`~lightning_tokens.datamodules.sft.records` reads files into raw records (and holds :class:`SFTDataError`
and :func:`stable_example_id`); :mod:`~lightning_tokens.datamodules.sft.fields` checks field values;
:mod:`~lightning_tokens.datamodules.sft.chat` renders conversations and places the labels of assistant turns;
:mod:`~lightning_tokens.datamodules.sft.parsing` turns records into examples of text segments with labelled spans;
:mod:`~lightning_tokens.datamodules.sft.tokenization` tokenizes them into labels and weights (and applies
``truncation``); :mod:`~lightning_tokens.datamodules.sft.dataset` holds the tokenized examples,
:mod:`~lightning_tokens.datamodules.sft.packing` packs them into rows, :mod:`~lightning_tokens.datamodules.sft.collate`
makes batches, :mod:`~lightning_tokens.datamodules.sft.prompts` reads prediction prompts, and
:mod:`~lightning_tokens.datamodules.sft.datamodule` wires it all into :class:`SFTDataModule`.
"""

from lightning_tokens.datamodules.sft.chat import FALLBACK_CHAT_TEMPLATE
from lightning_tokens.datamodules.sft.collate import SFTCollator
from lightning_tokens.datamodules.sft.datamodule import SFTDataModule
from lightning_tokens.datamodules.sft.dataset import SFTDataset
from lightning_tokens.datamodules.sft.packing import PackedSFTDataset, pack_examples, packed_attention_mask
from lightning_tokens.datamodules.sft.records import SFTDataError, stable_example_id

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "PackedSFTDataset",
    "SFTCollator",
    "SFTDataError",
    "SFTDataModule",
    "SFTDataset",
    "pack_examples",
    "packed_attention_mask",
    "stable_example_id",
]
