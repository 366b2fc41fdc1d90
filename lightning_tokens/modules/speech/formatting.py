"""Speech tokens inside a text LM's vocabulary, and the prompts of DualSpeechLM's tasks.

The vocabulary gains ``K`` speech tokens ``<a_0> … <a_{K-1}>`` (consecutive ids) and ``<audio>`` /
``</audio>``. Speech is written inline between the two markers:

- understanding (``asr``, ``sqa``): ``USER: <audio> <a_..>… </audio> {instruction}\\nASSISTANT: `` → the
  text answer (labels on the answer and the end-of-sequence token);
- generation (``tts``): ``USER: {instruction with the text}\\nASSISTANT: `` → ``<audio> <a_..>… </audio>``
  (labels on the speech tokens: the semantic supervision of the reference).

Every row also carries the masks of Chain-of-Condition: ``question_mask`` (the prompt after the beginning
of sequence) and ``answer_mask`` (the labelled answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.stats import IGNORE_INDEX

__all__ = [
    "AUDIO_CLOSE",
    "AUDIO_OPEN",
    "DEFAULT_INSTRUCTIONS",
    "SpeechVocabulary",
    "collate_speech_examples",
    "extend_tokenizer",
    "format_speech_example",
    "speech_token",
]

AUDIO_OPEN, AUDIO_CLOSE = "<audio>", "</audio>"
UNDERSTANDING_TASKS = ("asr", "sqa")
GENERATION_TASKS = ("tts",)
#: The instruction of each task; ``{text}`` is the text to speak (``tts``).
DEFAULT_INSTRUCTIONS = {
    "asr": "Transcribe the audio.",
    "sqa": "Answer the spoken question.",
    "tts": "Read aloud: {text}",
}


def speech_token(index: int) -> str:
    """The vocabulary string of speech token ``index``.

    Example:
        >>> speech_token(12)
        '<a_12>'
    """
    return f"<a_{index}>"


def extend_tokenizer(tokenizer: Any, codebook_size: int) -> Any:
    """Add the ``codebook_size`` speech tokens and the ``<audio>`` / ``</audio>`` markers to ``tokenizer``
    (in place, as special tokens so that text never splits them; returned). Idempotent.

    Example:
        >>> from lightning_tokens.models.tokenizers import build_char_tokenizer
        >>> tok = extend_tokenizer(build_char_tokenizer(), 4)
        >>> len(tok), tok.convert_tokens_to_ids(["<a_0>", "<a_3>", "<audio>", "</audio>"])
        (106, [100, 103, 104, 105])
    """
    if codebook_size < 1:
        raise ConfigError(f"speech_codebook_size={codebook_size}: must be >= 1 (the speech tokenizer's codebook size).")
    if speech_token(0) in tokenizer.get_vocab():
        SpeechVocabulary.from_tokenizer(tokenizer, codebook_size)  # checks the layout
        return tokenizer
    tokens = [speech_token(i) for i in range(codebook_size)] + [AUDIO_OPEN, AUDIO_CLOSE]
    tokenizer.add_tokens(tokens, special_tokens=True)
    return tokenizer


@dataclass(frozen=True)
class SpeechVocabulary:
    """Where the speech tokens sit in an extended vocabulary.

    Attributes:
        offset: id of ``<a_0>``; speech token ``i`` is ``offset + i``.
        codebook_size: number of speech tokens ``K``.
        open_id: id of ``<audio>``.
        close_id: id of ``</audio>``.
    """

    offset: int
    codebook_size: int
    open_id: int
    close_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, codebook_size: int) -> SpeechVocabulary:
        """Read the layout off a tokenizer extended by :func:`extend_tokenizer` (ids must be consecutive)."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in (speech_token(0), speech_token(codebook_size - 1), AUDIO_OPEN, AUDIO_CLOSE) if t not in vocab]
        if missing:
            raise ConfigError(
                f"the tokenizer lacks the speech tokens {missing}: its speech codebook is not {codebook_size} "
                "(set speech_codebook_size to the speech tokenizer's codebook_size)."
            )
        offset = vocab[speech_token(0)]
        if vocab[speech_token(codebook_size - 1)] != offset + codebook_size - 1:
            raise ConfigError("the tokenizer's speech tokens <a_i> are not consecutive ids; extend a fresh tokenizer.")
        return cls(offset, codebook_size, vocab[AUDIO_OPEN], vocab[AUDIO_CLOSE])

    def speech_ids(self, tokens: Tensor | list[int]) -> list[int]:
        """Vocabulary ids of speech tokens ``tokens`` (values in ``[0, K)``)."""
        values = torch.as_tensor(tokens, dtype=torch.long)
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= self.codebook_size):
            raise DataError(
                f"speech token {int(values.max()) if int(values.max()) >= self.codebook_size else int(values.min())} "
                f"is outside the speech codebook [0, {self.codebook_size}): the tokens come from a speech tokenizer "
                "with another codebook_size than speech_codebook_size."
            )
        return (values + self.offset).tolist()

    def is_speech(self, ids: Tensor) -> Tensor:
        """Bool mask of the speech-token ids in ``ids``."""
        return (ids >= self.offset) & (ids < self.offset + self.codebook_size)

    def to_speech(self, ids: Tensor) -> Tensor:
        """The speech tokens (values in ``[0, K)``) among ``ids``, in order; other ids are dropped."""
        return ids[self.is_speech(ids)] - self.offset


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def format_speech_example(
    task: str,
    text: str,
    speech_tokens: Tensor | list[int],
    tokenizer: Any,
    vocab: SpeechVocabulary,
    instructions: dict[str, str] | None = None,
    bos: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` of one example; the answer ends with the end-of-sequence token.

    Args:
        task: ``asr`` / ``sqa`` (speech in, ``text`` out) or ``tts`` (``text`` in, ``speech_tokens`` out).
        text: the transcript (``asr``, ``tts``) or the answer (``sqa``).
        speech_tokens: the utterance's speech tokens (values in ``[0, K)``).
        tokenizer: the extended tokenizer.
        vocab: its speech-token layout.
        instructions: per-task instruction text (default :data:`DEFAULT_INSTRUCTIONS`).
        bos: ids put first (the tokenizer's beginning of sequence, if it uses one).

    Example:
        >>> from lightning_tokens.models.tokenizers import build_char_tokenizer
        >>> tok = extend_tokenizer(build_char_tokenizer(), 4)
        >>> vocab = SpeechVocabulary.from_tokenizer(tok, 4)
        >>> prompt, answer = format_speech_example("tts", "hi", [3, 1], tok, vocab)
        >>> tok.decode(prompt), answer
        ('USER: Read aloud: hi\\nASSISTANT: ', [104, 103, 101, 105, 2])
    """
    instructions = {**DEFAULT_INSTRUCTIONS, **(instructions or {})}
    if task not in instructions:
        raise DataError(f"task {task!r} has no instruction: use one of {sorted(instructions)} or add it to `instructions`.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token: DualSpeechLM needs one to end answers.")
    speech = [vocab.open_id, *vocab.speech_ids(speech_tokens), vocab.close_id]
    prefix = list(bos or [])
    if task in GENERATION_TASKS:
        prompt = prefix + _encode(tokenizer, "USER: " + instructions[task].format(text=text) + "\nASSISTANT: ")
        return prompt, speech + [eos]
    prompt = prefix + _encode(tokenizer, "USER: ") + speech + _encode(tokenizer, " " + instructions[task] + "\nASSISTANT: ")
    return prompt, _encode(tokenizer, text) + [eos]


def collate_speech_examples(examples: list[tuple[list[int], list[int]]], pad_id: int, bos_length: int = 0) -> dict[str, Tensor]:
    """Pad ``(prompt_ids, answer_ids)`` pairs into a training batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompts and padding), right-padded ``(B, T)``;
        ``question_mask`` / ``answer_mask`` (bool ``(B, T)``: the prompt after the first ``bos_length`` ids, and
        the answer); ``prompt_input_ids`` / ``prompt_attention_mask``: the prompts left-padded, for generation.

    Example:
        >>> out = collate_speech_examples([([5, 6], [7, 2]), ([5], [2])], pad_id=0)
        >>> out["input_ids"].tolist(), out["labels"].tolist()
        ([[5, 6, 7, 2], [5, 2, 0, 0]], [[-100, -100, 7, 2], [-100, 2, -100, -100]])
        >>> out["prompt_input_ids"].tolist()
        [[5, 6], [0, 5]]
    """
    length = max(len(p) + len(a) for p, a in examples)
    prompt_length = max(len(p) for p, _ in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    question = torch.zeros((batch, length), dtype=torch.bool)
    answer = torch.zeros((batch, length), dtype=torch.bool)
    prompts = torch.full((batch, prompt_length), pad_id, dtype=torch.long)
    prompt_attention = torch.zeros((batch, prompt_length), dtype=torch.long)
    for row, (prompt, reply) in enumerate(examples):
        ids = torch.tensor(prompt + reply, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
        question[row, bos_length : len(prompt)] = True
        answer[row, len(prompt) : len(ids)] = True
        prompts[row, prompt_length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        prompt_attention[row, prompt_length - len(prompt) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "question_mask": question,
        "answer_mask": answer,
        "prompt_input_ids": prompts,
        "prompt_attention_mask": prompt_attention,
    }
