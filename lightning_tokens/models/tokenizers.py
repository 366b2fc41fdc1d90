"""Tokenizers built in code, and one resolver for every ``tokenizer:`` argument in the library.

Nothing in this module downloads anything unless it is given a Hugging Face Hub id; ``"char"``, packaged
models (e.g. ``"smollm2-135m-instruct"``, see :mod:`lightning_tokens.models.packaged`) and local
directories work offline.

Example:
    >>> from lightning_tokens.models.tokenizers import build_char_tokenizer
    >>> tok = build_char_tokenizer()
    >>> ids = tok.encode("12 + 3 = ", add_special_tokens=False)
    >>> tok.decode(ids)
    '12 + 3 = '
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.models.packaged import is_packaged, packaged_model_path

__all__ = [
    "CHAR_SPECIAL_TOKENS",
    "CHAR_VOCAB_CHARS",
    "build_char_tokenizer",
    "char_vocab",
    "ensure_pad_token",
    "resolve_tokenizer",
]

#: Special tokens of the character tokenizer, in id order: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3.
CHAR_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
#: Ordinary characters of the character tokenizer, in id order (ids 4..99): printable ASCII
#: (space ``" "`` through ``"~"``), then ``"\n"``.
CHAR_VOCAB_CHARS: tuple[str, ...] = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def char_vocab() -> dict[str, int]:
    """The deterministic vocabulary of :func:`build_char_tokenizer` (token → id).

    Example:
        >>> v = char_vocab()
        >>> v["<pad>"], v["<s>"], v["</s>"], v["<unk>"], v[" "], v["0"], v["\\n"], len(v)
        (0, 1, 2, 3, 4, 20, 99, 100)
    """
    vocab: dict[str, int] = {}
    for token in CHAR_SPECIAL_TOKENS + CHAR_VOCAB_CHARS:
        vocab[token] = len(vocab)
    return vocab


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer in code (no files, no downloads).

    One token per character: a ``WordLevel`` model over single characters behind a pre-tokenizer that
    isolates every character, and a ``Fuse`` decoder that concatenates tokens with no separator, so
    decoding round-trips text exactly (spaces included) for any text made of the vocabulary's
    characters. Characters outside it (tabs, non-ASCII) become ``<unk>``.

    Vocabulary (100 ids, always the same): ``<pad>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<unk>`` 3,
    then printable ASCII from ``" "`` (4) to ``"~"`` (98), then ``"\\n"`` (99).

    No special token is added automatically: ``add_special_tokens=True`` adds nothing (no bos, no eos);
    callers append ``eos_token_id`` themselves where an example ends. ``padding_side`` is ``"right"``
    and ``clean_up_tokenization_spaces`` is off (the Hugging Face clean-up would turn ``"1 ."`` into
    ``"1."``). ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` round-trip it.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set.

    Example:
        >>> tok = build_char_tokenizer()
        >>> tok("7 + 5 = ")["input_ids"]
        [27, 4, 15, 4, 25, 4, 33, 4]
        >>> tok.decode(tok.encode("a  b\\n", add_special_tokens=False))
        'a  b\\n'
        >>> tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id
        (0, 1, 2, 3)
    """
    pad, bos, eos, unk = CHAR_SPECIAL_TOKENS
    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token=unk))
    # `[\s\S]` matches any single character, newlines included (Oniguruma's `.` does not match "\n").
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure ``tokenizer`` has a pad token; falls back to its eos token (in place, returned).

    A tokenizer with neither pad nor eos gets a new ``<pad>`` special token, with a warning: the
    model's embedding matrix must then be resized to ``len(tokenizer)``.

    Example:
        >>> tok = build_char_tokenizer()
        >>> ensure_pad_token(tok).pad_token
        '<pad>'
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            warnings.warn(
                "The tokenizer has neither a pad nor an eos token; adding a new '<pad>' special token. "
                "Resize the model's token embeddings to len(tokenizer).",
                stacklevel=2,
            )
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def resolve_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Turn a ``tokenizer:`` config value into a tokenizer that has a pad token.

    Args:
        name_or_path: ``"char"`` for :func:`build_char_tokenizer` (offline); a packaged model's name
            (e.g. ``"smollm2-135m-instruct"``: its own tokenizer, with chat template, from the converted
            cache; the first use converts the package's GGUF file); an existing local directory, loaded
            with ``AutoTokenizer.from_pretrained``; anything else is treated as a Hugging Face Hub id
            (this may download).

    Returns:
        The tokenizer; if it had no pad token, its eos token is used as pad (see
        :func:`ensure_pad_token`).

    Raises:
        ValueError: the argument is empty, or the Hub id could not be loaded (offline, unknown id);
            the message names the ``tokenizer`` argument and suggests ``tokenizer: char``. For a packaged
            model whose pip package is not installed, the message gives the install command.

    Example:
        >>> tok = resolve_tokenizer("char")
        >>> tok.decode(tok.encode("3.14", add_special_tokens=False))
        '3.14'
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(f"tokenizer must be 'char', a local directory or a Hugging Face Hub id, got {name_or_path!r}.")
    name = name_or_path.strip()
    if name == "char":
        return build_char_tokenizer()
    expanded = os.path.expanduser(name)
    if is_packaged(name):
        tokenizer = AutoTokenizer.from_pretrained(packaged_model_path(name))
    elif os.path.isdir(expanded):
        tokenizer = AutoTokenizer.from_pretrained(expanded)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:  # offline, unknown repository, missing files
            raise ConfigError(
                f"Could not load tokenizer={name!r}: it is not an existing local directory and loading it "
                f"as a Hugging Face Hub id failed ({type(err).__name__}: {err}). Pass a local directory "
                "saved with `save_pretrained`, or use `tokenizer: char` for the built-in character "
                "tokenizer, which works offline."
            ) from err
    return ensure_pad_token(tokenizer)


def datamodule_tokenizer(arg: Any, trainer: Any, owner: str) -> PreTrainedTokenizerBase:
    """The tokenizer a datamodule uses: ``arg`` resolved (a name/path or a tokenizer object), or, when
    ``arg`` is ``None``, the ``tokenizer`` attribute of the trainer's LightningModule.

    Args:
        arg: the datamodule's ``tokenizer`` argument.
        trainer: the attached trainer, or ``None``.
        owner: the datamodule's class name, for the error message.
    """
    if isinstance(arg, str):
        return resolve_tokenizer(arg)
    if isinstance(arg, PreTrainedTokenizerBase):
        return ensure_pad_token(arg)
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(
            f"{owner}(tokenizer=None) uses the LightningModule's `tokenizer` attribute at setup, but "
            + ("no trainer is attached" if trainer is None else "the module has no `tokenizer`")
            + "; pass tokenizer='char', a local tokenizer directory or a Hub id."
        )
    return ensure_pad_token(tokenizer)


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos_token_id]`` if the tokenizer starts encoded text with its bos token, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    plain = tokenizer("1", add_special_tokens=False)["input_ids"]
    special = tokenizer("1", add_special_tokens=True)["input_ids"]
    return [bos] if len(special) > len(plain) and special[0] == bos else []
