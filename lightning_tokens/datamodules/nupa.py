"""Number Cookbook (NUPA) tasks generated in code, as a LightningDataModule.

The Number Cookbook (Yang et al., ICLR 2025, arXiv 2411.03766; reference code ``GraphPKU/number_cookbook``
@46aefaa) tests numerical understanding with small question/answer tasks over four number
representations. This module regenerates a subset of its tasks with a seeded Python ``random.Random``
(no files, no downloads) in the reference's text Q&A format::

    Add two numbers: 744 + 543 = 1287

The prompt is everything up to and including ``" = "``; the answer is what follows. The instruction and
operator wording is the reference's (``src/task.py``: ``Task.instruction``/``Task.operator``/``Task.answer``,
assembled by ``NumberTokenizer.export``). The reference also starts every prompt with a fixed answer-type
hint (``"Directly return the answer as an integer without any comma separator, like 123 . "``); it is
off by default here to keep prompts short and is switched on with ``type_hint=True``.

Tasks (key → prompt, answer; the answer's scoring domain in brackets):

========================  ============================================================================
``Integer/add``           ``Add two numbers: a + b = `` → a+b [Integer]
``Integer/sub``           ``Subtract two numbers: a - b = `` → a-b, with a ≥ b (swapped as in the reference) [Integer]
``Integer/multiply``      ``Multiply two numbers: a * b = `` → a·b (the reference's ``multiply_hard``) [Integer]
``Integer/max``           ``Get the maximal number: a and b = `` → max [Integer]
``Integer/digit_max``     ``Compare two numbers digit by digit and return the larger digit at each position,
                          treating any missing digits as 0. a and b = `` → per-digit max, right-aligned,
                          leading zeros dropped [Integer]
``Integer/digit_add``     ``The task is to add two given numbers digit by digit and return the result modulo
                          10 (ignoring carry), treating any missing digits as 0. a digit add b = `` →
                          per-digit (x+y) mod 10, leading zeros dropped [Integer]
``Integer/get_digit``     ``Get the digit at the given position (from left to right, starting from 0). a at
                          position i = `` → the i-th digit [Integer]
``Integer/length``        ``The total number of digits of a = `` → number of digits [Integer]
``Integer/count``         ``Count the number of the given digit in the given number: a count the occurrence
                          time of digit d = `` → occurrences of d [Integer]
``Integer/to_scient``     ``Convert the number to scientific notation: a = `` → ``1.2e3`` style [ScientificNotation]
``Float/add``             ``Add two numbers: x + y = `` [Float]
``Float/sub``             ``Subtract two numbers: x - y = ``, x ≥ y [Float]
``Float/max``             ``Get the maximal number: x and y = `` [Float]
``Fraction/add``          ``Add two numbers: p/q + r/s = `` → reduced ``n/d`` [Fraction]
========================  ============================================================================

Number formats follow the reference's ``numbers_class.py``: Floats always have a fractional part with no
trailing zeros except a single ``0`` (``4.0``, ``12.25``); Fractions are reduced and keep a denominator of
1 (``3/1``, ``0/1``); scientific notation is ``<d>.<digits>e<exp>`` with the mantissa in [1, 10), trailing
zeros dropped except a single ``0`` (``1.2e3``, ``1.0e3``, ``7.0e0``).

Digit lengths (``min_digits``/``max_digits``): each example draws a length ``L`` uniformly in
``[min_digits, max_digits]``. Integers have exactly ``L`` digits (``L = 1`` includes 0). Floats have
``L`` fractional digits (the last one non-zero) and an integer part of 1..L digits (the reference's
``Float.random_generate``). Fractions have an ``L``-digit reduced denominator and a numerator of at most
``L`` digits. In two-number tasks the second number's length is drawn uniformly in ``[min_digits, L]``
and the pair is swapped with probability 1/2 when the lengths differ (as the reference's data generator
does with its shorter-number lower bound set to ``min_digits``). One-number tasks use an ``L``-digit
number; ``to_scient`` then zeroes its last ``k`` digits, ``k`` uniform in ``[0, L // 2]``, so that there
are more trailing zeros, as the reference does.

Example:
    >>> ex = generate_nupa_examples("Integer/add", num_examples=2, min_digits=3, max_digits=3, seed=0)
    >>> ex[0].prompt, ex[0].answer, ex[0].domain
    ('Add two numbers: 141 + 365 = ', '506', 'Integer')
"""

from __future__ import annotations

import hashlib
from array import array
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_tokens.datamodules.sampling import ResumableDataMixin
from lightning_tokens.metrics.nupa import extract_answer as _extract_answer
from lightning_tokens.metrics.nupa import nupa_metric_collection
from lightning_tokens.models.tokenizers import bos_prefix, datamodule_tokenizer

__all__ = [
    "NUPA_TASKS",
    "NUPACollator",
    "NUPADataModule",
    "NUPADataset",
    "NUPAExample",
    "generate_nupa_examples",
    "iter_nupa_examples",
]


@dataclass(frozen=True)
class NUPAExample:
    """One question/answer pair.

    Attributes:
        prompt: the question, ending with ``" = "`` (e.g. ``"Add two numbers: 744 + 543 = "``).
        answer: the ground-truth answer string (e.g. ``"1287"``).
        domain: the answer's scoring domain: ``Integer``, ``Float``, ``Fraction`` or ``ScientificNotation``.
        task: the task key, e.g. ``"Integer/add"``.
    """

    prompt: str
    answer: str
    domain: str
    task: str


# ----------------------------------------------------------------------------------------------------
# Reference wording (src/task.py, Task.instruction / Task.operator / Task.answer)
# ----------------------------------------------------------------------------------------------------
_ANSWER_MARK = " = "
_TYPE_HINT: dict[str, str] = {
    "Integer": "Directly return the answer as an integer without any comma separator, like 123 . ",
    "Float": "Directly return the answer as a float without any comma separator, like 10.4 . ",
    "Fraction": "Directly return the answer as an **irreducible** fraction without any comma separator, like 7/13 . ",
    "ScientificNotation": (
        "Directly return the answer as a scientific notation without any comma separator, like 1.23e4 . "
        "The float part should be in the range [1, 10). "
    ),
}
_INSTRUCTION: dict[str, str] = {
    "add": "Add two numbers: ",
    "sub": "Subtract two numbers: ",
    "multiply": "Multiply two numbers: ",
    "max": "Get the maximal number: ",
    "digit_max": (
        "Compare two numbers digit by digit and return the larger digit at each position, "
        "treating any missing digits as 0. "
    ),
    "digit_add": (
        "The task is to add two given numbers digit by digit and return the result modulo 10 "
        "(ignoring carry), treating any missing digits as 0. "
    ),
    "get_digit": "Get the digit at the given position (from left to right, starting from 0). ",
    "length": "The total number of digits of ",
    "count": "Count the number of the given digit in the given number: ",
    "to_scient": "Convert the number to scientific notation: ",
}
_OPERATOR: dict[str, str] = {
    "add": " + ",
    "sub": " - ",
    "multiply": " * ",
    "max": " and ",
    "digit_max": " and ",
    "digit_add": " digit add ",
    "get_digit": " at position ",
    "count": " count the occurrence time of digit ",
}


# ----------------------------------------------------------------------------------------------------
# Random numbers (numbers_class.py: *.random_generate) and formatting
# ----------------------------------------------------------------------------------------------------
def _rand_int(rng: random.Random, length: int) -> int:
    low = 0 if length == 1 else 10 ** (length - 1)
    return rng.randint(low, 10**length - 1)


def _rand_float(rng: random.Random, length: int) -> tuple[int, str]:
    """(integer part, fractional digits): ``length`` fractional digits, the last non-zero; 1..length int digits."""
    int_digits = rng.randint(1, length)
    int_part = rng.randint(10 ** (int_digits - 1), 10**int_digits - 1)
    frac = "".join(str(rng.randint(0, 9)) for _ in range(length - 1)) + str(rng.randint(1, 9))
    return int_part, frac


def _rand_fraction(rng: random.Random, length: int) -> tuple[int, int]:
    """A reduced fraction whose denominator has ``length`` digits (numerator < 10**length)."""
    while True:
        num = rng.randint(0, 10**length - 1)
        den = rng.randint(10 ** (length - 1), 10**length - 1)
        common = math.gcd(num, den)
        num, den = num // common, den // common
        if len(str(den)) == length:
            return num, den


def _float_str(value: tuple[int, str]) -> str:
    return f"{value[0]}.{value[1]}"


def _float_scaled(value: tuple[int, str], scale: int) -> int:
    return value[0] * 10**scale + int(value[1].ljust(scale, "0"))


def _format_scaled(value: int, scale: int) -> str:
    """Format ``value / 10**scale`` as the reference's Float: no trailing zeros, at least one decimal."""
    int_part, rest = divmod(value, 10**scale)
    frac = str(rest).zfill(scale).rstrip("0") or "0"
    return f"{int_part}.{frac}"


def _fraction_str(num: int, den: int) -> str:
    common = math.gcd(num, den)
    return f"{num // common}/{den // common}"


def _int_to_scient(value: int) -> str:
    """The reference's ``Integer.to_scient()`` string, e.g. 1200 → ``1.2e3``, 1000 → ``1.0e3``, 0 → ``0.0e0``."""
    digits = str(value)
    mantissa_frac = digits[1:].rstrip("0") or "0"
    return f"{digits[0]}.{mantissa_frac}e{len(digits) - 1}"


def _digitwise(a: int, b: int, op: Callable[[int, int], int]) -> str:
    """Right-aligned per-digit operation with missing digits as 0; leading zeros dropped (``int()``)."""
    sa, sb = str(a)[::-1], str(b)[::-1]
    width = max(len(sa), len(sb))
    sa, sb = sa.ljust(width, "0"), sb.ljust(width, "0")
    out = "".join(str(op(int(x), int(y))) for x, y in zip(sa, sb))[::-1]
    return str(int(out))


def _digit_max(x: int, y: int) -> int:
    return max(x, y)


def _digit_add(x: int, y: int) -> int:
    return (x + y) % 10


def _pair_lengths(rng: random.Random, min_digits: int, max_digits: int) -> tuple[int, int]:
    length = rng.randint(min_digits, max_digits)
    other = rng.randint(min_digits, length)
    if other != length and rng.random() < 0.5:
        return other, length
    return length, other


# ----------------------------------------------------------------------------------------------------
# Task makers: rng, min_digits, max_digits -> (operands shown in the prompt, answer)
# ----------------------------------------------------------------------------------------------------
_Maker = Callable[[random.Random, int, int], tuple[tuple[str, ...], str]]


def _int_pair(rng: random.Random, lo: int, hi: int) -> tuple[int, int]:
    la, lb = _pair_lengths(rng, lo, hi)
    return _rand_int(rng, la), _rand_int(rng, lb)


def _make_int_add(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b = _int_pair(rng, lo, hi)
    return (str(a), str(b)), str(a + b)


def _make_int_sub(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b = _int_pair(rng, lo, hi)
    if b > a:  # the reference keeps a >= b (no negative numbers)
        a, b = b, a
    return (str(a), str(b)), str(a - b)


def _make_int_multiply(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b = _int_pair(rng, lo, hi)
    return (str(a), str(b)), str(a * b)


def _make_int_max(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b = _int_pair(rng, lo, hi)
    return (str(a), str(b)), str(max(a, b))


def _make_int_digit_max(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b = _int_pair(rng, lo, hi)
    return (str(a), str(b)), _digitwise(a, b, _digit_max)


def _make_int_digit_add(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b = _int_pair(rng, lo, hi)
    return (str(a), str(b)), _digitwise(a, b, _digit_add)


def _make_int_get_digit(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a = str(_rand_int(rng, rng.randint(lo, hi)))
    pos = rng.randint(0, len(a) - 1)
    return (a, str(pos)), a[pos]


def _make_int_length(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a = str(_rand_int(rng, rng.randint(lo, hi)))
    return (a,), str(len(a))


def _make_int_count(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a = str(_rand_int(rng, rng.randint(lo, hi)))
    digit = str(rng.randint(0, 9))
    return (a, digit), str(a.count(digit))


def _make_int_to_scient(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    length = rng.randint(lo, hi)
    a = _rand_int(rng, length)
    zeros = rng.randint(0, length // 2)  # the reference zeroes up to int(0.5 * digits) trailing digits
    a -= a % 10**zeros
    return (str(a),), _int_to_scient(a)


def _float_pair(rng: random.Random, lo: int, hi: int) -> tuple[tuple[int, str], tuple[int, str], int]:
    la, lb = _pair_lengths(rng, lo, hi)
    a, b = _rand_float(rng, la), _rand_float(rng, lb)
    return a, b, max(len(a[1]), len(b[1]))


def _make_float_add(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b, scale = _float_pair(rng, lo, hi)
    total = _float_scaled(a, scale) + _float_scaled(b, scale)
    return (_float_str(a), _float_str(b)), _format_scaled(total, scale)


def _make_float_sub(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b, scale = _float_pair(rng, lo, hi)
    if _float_scaled(b, scale) > _float_scaled(a, scale):
        a, b = b, a
    diff = _float_scaled(a, scale) - _float_scaled(b, scale)
    return (_float_str(a), _float_str(b)), _format_scaled(diff, scale)


def _make_float_max(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    a, b, scale = _float_pair(rng, lo, hi)
    bigger = a if _float_scaled(a, scale) > _float_scaled(b, scale) else b
    return (_float_str(a), _float_str(b)), _format_scaled(_float_scaled(bigger, scale), scale)


def _make_fraction_add(rng: random.Random, lo: int, hi: int) -> tuple[tuple[str, ...], str]:
    la, lb = _pair_lengths(rng, lo, hi)
    (an, ad), (bn, bd) = _rand_fraction(rng, la), _rand_fraction(rng, lb)
    return (f"{an}/{ad}", f"{bn}/{bd}"), _fraction_str(an * bd + bn * ad, ad * bd)


@dataclass(frozen=True)
class _TaskSpec:
    name: str  # the reference's task name (instruction / operator key)
    input_domain: str
    answer_domain: str
    make: _Maker


#: Supported tasks: key ``"<Domain>/<task>"`` → (reference task name, input domain, answer domain, maker).
NUPA_TASKS: dict[str, _TaskSpec] = {
    "Integer/add": _TaskSpec("add", "Integer", "Integer", _make_int_add),
    "Integer/sub": _TaskSpec("sub", "Integer", "Integer", _make_int_sub),
    "Integer/multiply": _TaskSpec("multiply", "Integer", "Integer", _make_int_multiply),
    "Integer/max": _TaskSpec("max", "Integer", "Integer", _make_int_max),
    "Integer/digit_max": _TaskSpec("digit_max", "Integer", "Integer", _make_int_digit_max),
    "Integer/digit_add": _TaskSpec("digit_add", "Integer", "Integer", _make_int_digit_add),
    "Integer/get_digit": _TaskSpec("get_digit", "Integer", "Integer", _make_int_get_digit),
    "Integer/length": _TaskSpec("length", "Integer", "Integer", _make_int_length),
    "Integer/count": _TaskSpec("count", "Integer", "Integer", _make_int_count),
    "Integer/to_scient": _TaskSpec("to_scient", "Integer", "ScientificNotation", _make_int_to_scient),
    "Float/add": _TaskSpec("add", "Float", "Float", _make_float_add),
    "Float/sub": _TaskSpec("sub", "Float", "Float", _make_float_sub),
    "Float/max": _TaskSpec("max", "Float", "Float", _make_float_max),
    "Fraction/add": _TaskSpec("add", "Fraction", "Fraction", _make_fraction_add),
}


def _task_spec(task: str) -> _TaskSpec:
    if task not in NUPA_TASKS:
        raise ValueError(f"Unknown NUPA task {task!r}; valid tasks are {', '.join(NUPA_TASKS)} (or 'all').")
    return NUPA_TASKS[task]


def _check_digits(min_digits: int, max_digits: int) -> None:
    if not (1 <= min_digits <= max_digits):
        raise ValueError(f"Need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}.")


def _format_prompt(spec: _TaskSpec, operands: tuple[str, ...], type_hint: bool) -> str:
    hint = _TYPE_HINT[spec.answer_domain] if type_hint else ""
    body = operands[0] if len(operands) == 1 else _OPERATOR[spec.name].join(operands)
    return f"{hint}{_INSTRUCTION[spec.name]}{body}{_ANSWER_MARK}"


def iter_nupa_examples(
    task: str, min_digits: int, max_digits: int, rng: random.Random, *, type_hint: bool = False
) -> Iterator[NUPAExample]:
    """An endless stream of examples of ``task`` drawn with ``rng`` (see :func:`generate_nupa_examples`)."""
    spec = _task_spec(task)
    _check_digits(min_digits, max_digits)
    while True:
        operands, answer = spec.make(rng, min_digits, max_digits)
        yield NUPAExample(_format_prompt(spec, operands, type_hint), answer, spec.answer_domain, task)


def generate_nupa_examples(
    task: str, num_examples: int, min_digits: int, max_digits: int, seed: int, *, type_hint: bool = False
) -> list[NUPAExample]:
    """Generate ``num_examples`` examples of one task, deterministically from ``seed``.

    Examples are drawn independently (repeats are possible when the digit range is small).

    Args:
        task: a key of :data:`NUPA_TASKS`, e.g. ``"Integer/add"``.
        num_examples: how many examples.
        min_digits: smallest length ``L`` (see the module docstring for what ``L`` means per domain).
        max_digits: largest length ``L``; ``L`` is uniform in ``[min_digits, max_digits]``.
        seed: seed of the ``random.Random`` that draws everything.
        type_hint: prefix each prompt with the reference's answer-type hint.

    Returns:
        A list of :class:`NUPAExample`.

    Raises:
        ValueError: unknown task or an invalid digit range.

    Example:
        >>> [e.answer for e in generate_nupa_examples("Integer/to_scient", 3, 4, 4, seed=1)]
        ['2.03e3', '9.11e3', '7.219e3']
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
    stream = iter_nupa_examples(task, min_digits, max_digits, random.Random(seed), type_hint=type_hint)
    return [next(stream) for _ in range(num_examples)]


def _derive_seed(seed: int, split: str, task: str) -> int:
    """A stable per-(split, task) seed; independent of PYTHONHASHSEED."""
    digest = hashlib.sha256(f"nupa/{seed}/{split}/{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _generate_heldout(
    task: str,
    num_examples: int,
    min_digits: int,
    max_digits: int,
    seed: int,
    exclude: set[str],
    *,
    type_hint: bool,
    decontaminate: bool,
) -> tuple[list[NUPAExample], int]:
    """Held-out examples whose prompts are unique and outside ``exclude`` where the space allows.

    Draws up to ``50 * num_examples + 1000`` candidates. If too few are new, the shortfall is filled
    first with distinct prompts that are in ``exclude``, then with further draws regardless. Returns the
    examples (in draw order for the clean ones) and the size of the shortfall.
    """
    stream = iter_nupa_examples(task, min_digits, max_digits, random.Random(seed), type_hint=type_hint)
    if not decontaminate:
        return [next(stream) for _ in range(num_examples)], 0
    kept: list[NUPAExample] = []
    fallback: list[NUPAExample] = []  # distinct, but seen in `exclude`
    seen: set[str] = set()
    for _ in range(50 * num_examples + 1000):
        if len(kept) == num_examples:
            break
        example = next(stream)
        if example.prompt in seen:
            continue
        seen.add(example.prompt)
        (fallback if example.prompt in exclude else kept).append(example)
    shortfall = num_examples - len(kept)
    kept.extend(fallback[:shortfall])
    kept.extend(next(stream) for _ in range(num_examples - len(kept)))
    return kept, shortfall


# ----------------------------------------------------------------------------------------------------
# Tokenized dataset and collation
# ----------------------------------------------------------------------------------------------------
def _as_int_array(ids: Sequence[int]) -> array:
    return ids if isinstance(ids, array) and ids.typecode == "i" else array("i", ids)


class NUPADataset(Dataset):
    """Tokenized examples: prompt ids (with bos if the tokenizer adds one) and answer ids + eos.

    Items are dicts with ``example_id``, ``prompt_ids``, ``answer_ids`` (``None`` when there is no
    answer, as for prediction prompts), ``prompt``, ``answer``, ``domain`` and ``task``.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        prompt_ids: Sequence[Sequence[int]],
        answers: Sequence[str] | None = None,
        answer_ids: Sequence[Sequence[int]] | None = None,
        domains: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
    ) -> None:
        self.prompts = list(prompts)
        # Compact int32 storage: a few hundred thousand examples stay small in memory and in worker pickles.
        self.prompt_ids = [_as_int_array(ids) for ids in prompt_ids]
        n = len(self.prompts)
        self.answers = list(answers) if answers is not None else None
        self.answer_ids = [_as_int_array(ids) for ids in answer_ids] if answer_ids is not None else None
        self.domains = list(domains) if domains is not None else None
        self.tasks = list(tasks) if tasks is not None else None
        for name in ("prompt_ids", "answers", "answer_ids", "domains", "tasks"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} prompts.")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "example_id": index,
            "prompt_ids": self.prompt_ids[index].tolist(),
            "answer_ids": self.answer_ids[index].tolist() if self.answer_ids is not None else None,
            "prompt": self.prompts[index],
            "answer": self.answers[index] if self.answers is not None else None,
            "domain": self.domains[index] if self.domains is not None else None,
            "task": self.tasks[index] if self.tasks is not None else None,
        }


def _pad(rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        if side == "right":
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        else:
            out[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass
class NUPACollator:
    """Collate :class:`NUPADataset` items into a batch (a picklable object, so worker processes work).

    Args:
        pad_token_id: id used for padding ``input_ids`` and ``prompt_input_ids``.
        mode: ``"train"`` gives ``input_ids``, ``attention_mask``, ``labels``, ``example_id``;
            ``"eval"`` adds the generation inputs ``prompt_input_ids`` (left-padded),
            ``prompt_attention_mask`` and the lists ``answers``, ``domains``, ``prompts``, ``tasks``;
            ``"predict"`` gives only ``prompt_input_ids``, ``prompt_attention_mask`` and ``prompts``.

    ``input_ids`` = prompt + answer + eos, right-padded. ``labels`` equal ``input_ids`` on the answer and
    eos and are -100 on the prompt and padding; they are **not** shifted (the library shifts once, in
    ``ops``).
    """

    pad_token_id: int
    mode: Literal["train", "eval", "predict"] = "train"

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if self.mode in ("train", "eval"):
            sequences, labels = [], []
            for item in items:
                prompt, answer = item["prompt_ids"], item["answer_ids"]
                if answer is None:
                    raise ValueError("Training/evaluation batches need answers.")
                sequences.append(list(prompt) + list(answer))
                labels.append([-100] * len(prompt) + list(answer))
            batch["input_ids"] = _pad(sequences, self.pad_token_id, "right")
            batch["attention_mask"] = _pad([[1] * len(s) for s in sequences], 0, "right")
            batch["labels"] = _pad(labels, -100, "right")
            batch["example_id"] = torch.tensor([int(item["example_id"]) for item in items], dtype=torch.long)
        if self.mode in ("eval", "predict"):
            prompts = [item["prompt_ids"] for item in items]
            batch["prompt_input_ids"] = _pad(prompts, self.pad_token_id, "left")
            batch["prompt_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, "left")
            batch["prompts"] = [item["prompt"] for item in items]
        if self.mode == "eval":
            batch["answers"] = [item["answer"] for item in items]
            batch["domains"] = [item["domain"] for item in items]
            batch["tasks"] = [item["task"] for item in items]
        return batch


def _read_prompts(path: str) -> list[str]:
    """Prompts from a ``.jsonl``/``.json`` file (one object per line with a ``"prompt"`` field, or a JSON
    string per line) or from a plain text file (one prompt per non-empty line, kept verbatim without its
    line ending, so a trailing space after ``=`` survives)."""
    prompts: list[str] = []
    is_json = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not is_json:
                prompts.append(line)
                continue
            record = json.loads(line)
            if isinstance(record, str):
                prompts.append(record)
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            else:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'prompt' field.")
    if not prompts:
        raise ValueError(f"predict_file {path!r} holds no prompts.")
    return prompts


# ----------------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------------
class NUPADataModule(ResumableDataMixin, L.LightningDataModule):
    """Number Cookbook tasks for supervised fine-tuning and generation-based evaluation.

    Features:
        - Tasks generated in code from a seed (see the module docstring for tasks, wording and formats);
          several tasks mix into one training set.
        - Completion-only labels: only the answer and eos carry loss; labels are not shifted.
        - Validation/test batches also carry left-padded prompts for ``generate`` and the answers,
          domains, prompts and tasks as lists, for :meth:`build_metrics`.
        - Held-out sets use seeds different from training and are decontaminated: their prompts are
          unique and absent from the training set (and test prompts from validation) when the digit
          range leaves enough distinct problems; otherwise the shortfall is filled and a warning given.

    Args:
        tasks: task keys (``"Integer/add"``, ...; ``"all"`` for every task), one string or a list.
        tokenizer: ``None`` takes ``trainer.lightning_module.tokenizer`` at ``setup``; a string goes
            through :func:`~lightning_tokens.models.tokenizers.resolve_tokenizer` (``"char"``, a local
            directory, or a Hub id). A tokenizer object is accepted too (from Python).
        train_digits: ``(min, max)`` digit lengths of training examples.
        test_digits: ``(min, max)`` digit lengths of test examples.
        val_digits: ``(min, max)`` for validation; ``None`` uses ``test_digits`` (the reference validates
            on the test lengths).
        num_train: training examples **per task**.
        num_val: validation examples per task.
        num_test: test examples per task.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size.
        max_length: longest tokenized prompt + answer + eos. Longer examples lose prompt tokens from the
            left (the answer is kept whole; a leading bos is kept) with a warning; prediction prompts are
            cut to ``max_length - generation_max_new_tokens``.
        seed: base seed; each (split, task) pair gets its own derived seed.
        num_workers: DataLoader worker processes.
        max_new_tokens: generation budget; ``None`` = longest held-out answer in tokens + 2.
        predict_file: prompts for ``predict`` (``.jsonl``/``.json``: objects with a ``"prompt"``
            field; other files: one prompt per line); ``None`` predicts the test prompts.
        type_hint: prefix prompts with the reference's answer-type hint (off by default: the hint is
            80–130 characters and the same for every example of a domain).
        decontaminate: filter held-out prompts against training (and test against validation).

    Example:
        >>> dm = NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=8, num_val=4, num_test=4)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch)
        ['attention_mask', 'example_id', 'input_ids', 'labels']
    """

    def __init__(
        self,
        tasks: list[str] | str = "Integer/add",
        tokenizer: str | None = None,
        train_digits: tuple[int, int] = (1, 3),
        test_digits: tuple[int, int] = (1, 3),
        val_digits: tuple[int, int] | None = None,
        num_train: int = 20000,
        num_val: int = 200,
        num_test: int = 500,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        max_length: int = 256,
        seed: int = 1234,
        num_workers: int = 0,
        max_new_tokens: int | None = None,
        predict_file: str | None = None,
        type_hint: bool = False,
        decontaminate: bool = True,
    ) -> None:
        super().__init__()
        task_list = [tasks] if isinstance(tasks, str) else list(tasks)
        if task_list == ["all"]:
            task_list = list(NUPA_TASKS)
        if not task_list:
            raise ValueError("tasks must name at least one NUPA task.")
        for task in task_list:
            _task_spec(task)
        for name, digits in (("train_digits", train_digits), ("test_digits", test_digits), ("val_digits", val_digits)):
            if digits is None:
                continue
            if len(digits) != 2:
                raise ValueError(f"{name} must be (min, max), got {digits!r}.")
            _check_digits(int(digits[0]), int(digits[1]))
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}.")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}.")
        tokenizer_name = tokenizer if (tokenizer is None or isinstance(tokenizer, str)) else None
        self.save_hyperparameters({
            "tasks": task_list,
            "data_tokenizer": tokenizer_name,  # distinct key: merged with the module's hparams in logs
            "train_digits": tuple(train_digits),
            "test_digits": tuple(test_digits),
            "val_digits": tuple(val_digits) if val_digits is not None else None,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "max_length": max_length,
            "seed": seed,
            "num_workers": num_workers,
            "max_new_tokens": max_new_tokens,
            "predict_file": predict_file,
            "type_hint": type_hint,
            "decontaminate": decontaminate,
        })
        self.tasks = task_list
        self.train_digits = (int(train_digits[0]), int(train_digits[1]))
        self.test_digits = (int(test_digits[0]), int(test_digits[1]))
        self.val_digits = (int(val_digits[0]), int(val_digits[1])) if val_digits is not None else self.test_digits
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_length = max_length
        self.seed = seed
        self.num_workers = num_workers
        self.max_new_tokens = max_new_tokens
        self.predict_file = predict_file
        self.type_hint = type_hint
        self.decontaminate = decontaminate

        self._tokenizer_arg: str | PreTrainedTokenizerBase | None = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._examples: dict[str, list[NUPAExample]] | None = None
        self._datasets: dict[str, NUPADataset] = {}
        self._bos_prefix: list[int] = []

    # -- examples ------------------------------------------------------------------------------------
    @property
    def examples(self) -> dict[str, list[NUPAExample]]:
        """Generated examples per split (``"train"``, ``"val"``, ``"test"``), built on first access."""
        if self._examples is None:
            self._examples = self._generate_all()
        return self._examples

    def _generate_all(self) -> dict[str, list[NUPAExample]]:
        splits: dict[str, list[NUPAExample]] = {"train": [], "val": [], "test": []}
        for task in self.tasks:
            train = generate_nupa_examples(
                task, self.num_train, *self.train_digits, seed=_derive_seed(self.seed, "train", task), type_hint=self.type_hint
            )
            train_prompts = {e.prompt for e in train}
            val, val_overlap = _generate_heldout(
                task, self.num_val, *self.val_digits, seed=_derive_seed(self.seed, "val", task), exclude=train_prompts,
                type_hint=self.type_hint, decontaminate=self.decontaminate,
            )
            test, test_overlap = _generate_heldout(
                task, self.num_test, *self.test_digits, seed=_derive_seed(self.seed, "test", task),
                exclude=train_prompts | {e.prompt for e in val}, type_hint=self.type_hint, decontaminate=self.decontaminate,
            )
            if val_overlap or test_overlap:
                rank_zero_warn(
                    f"NUPA task {task}: the digit ranges leave too few distinct problems to decontaminate fully; "
                    f"{val_overlap}/{self.num_val} validation and {test_overlap}/{self.num_test} test examples may "
                    "repeat or appear in training. Widen the digit ranges or lower num_val/num_test."
                )
            splits["train"] += train
            splits["val"] += val
            splits["test"] += test
        return splits

    # -- tokenizer -----------------------------------------------------------------------------------
    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        tokenizer = datamodule_tokenizer(self._tokenizer_arg, self.trainer, type(self).__name__)
        if tokenizer.eos_token_id is None:
            raise ValueError("The NUPA datamodule needs a tokenizer with an eos token (it ends every answer).")
        self.tokenizer = tokenizer
        self._bos_prefix = bos_prefix(tokenizer)
        return tokenizer

    def _encode(self, texts: Sequence[str], chunk_size: int = 4096) -> list[array]:
        """Token ids (``array('i')``) of each text without special tokens; repeated texts are encoded once."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        unique = list(dict.fromkeys(texts))
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        use_backend = backend is not None and backend.truncation is None and backend.padding is None
        lookup: dict[str, array] = {}
        for start in range(0, len(unique), chunk_size):
            chunk = unique[start : start + chunk_size]
            if use_backend:
                # Same ids as tokenizer(chunk, add_special_tokens=False), without the per-text Python overhead.
                encoded = [enc.ids for enc in backend.encode_batch(chunk, add_special_tokens=False)]
            else:
                encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            lookup.update((text, array("i", ids)) for text, ids in zip(chunk, encoded))
        return [lookup[t] for t in texts]

    def _truncate_prompt(self, prompt_ids: array, budget: int) -> array:
        if len(prompt_ids) <= budget:
            return prompt_ids
        bos = array("i", self._bos_prefix)
        if bos and prompt_ids[: len(bos)] == bos and budget > len(bos):
            return bos + prompt_ids[len(prompt_ids) - (budget - len(bos)) :]
        return prompt_ids[len(prompt_ids) - budget :]

    def _build_dataset(self, examples: Sequence[NUPAExample], split: str) -> NUPADataset:
        tokenizer = self._resolve_tokenizer()
        bos, eos = array("i", self._bos_prefix), array("i", [int(tokenizer.eos_token_id)])
        prompt_ids = [bos + ids for ids in self._encode([e.prompt for e in examples])]
        answer_ids = [ids + eos for ids in self._encode([e.answer for e in examples])]
        truncated = 0
        for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            if len(p) + len(a) > self.max_length:
                budget = self.max_length - len(a)
                if budget < 1:
                    raise ValueError(
                        f"max_length={self.max_length} cannot hold the {split} answer {examples[i].answer!r} "
                        f"({len(a)} tokens with eos) plus a prompt; raise max_length."
                    )
                prompt_ids[i] = self._truncate_prompt(p, budget)
                truncated += 1
        if truncated:
            rank_zero_warn(
                f"NUPA {split}: {truncated}/{len(examples)} examples exceed max_length={self.max_length}; their prompts "
                "were cut from the left. Raise max_length to keep whole prompts."
            )
        return NUPADataset(
            prompts=[e.prompt for e in examples],
            prompt_ids=prompt_ids,
            answers=[e.answer for e in examples],
            answer_ids=answer_ids,
            domains=[e.domain for e in examples],
            tasks=[e.task for e in examples],
        )

    def _build_predict_dataset(self) -> NUPADataset:
        self._resolve_tokenizer()
        prompts = _read_prompts(self.predict_file) if self.predict_file is not None else [e.prompt for e in self.examples["test"]]
        budget = max(1, self.max_length - self.generation_max_new_tokens)
        bos = array("i", self._bos_prefix)
        prompt_ids = [self._truncate_prompt(bos + ids, budget) for ids in self._encode(prompts)]
        return NUPADataset(prompts=prompts, prompt_ids=prompt_ids)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the tokenizer, generate the examples (once) and tokenize the splits ``stage`` needs."""
        self._resolve_tokenizer()
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test"),
        }.get(stage, ("train", "val", "test"))
        for split in needed:
            if split in self._datasets:
                continue
            if split == "predict":
                self._datasets[split] = self._build_predict_dataset()
            else:
                self._datasets[split] = self._build_dataset(self.examples[split], split)

    def _dataset(self, split: str) -> NUPADataset:
        if split not in self._datasets:
            stage = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split]
            self.setup(stage)
        return self._datasets[split]

    def _pad_id(self) -> int:
        assert self.tokenizer is not None
        return int(self.tokenizer.pad_token_id)

    def _loader(self, split: str, mode: Literal["train", "eval", "predict"], shuffle: bool, batch_size: int) -> DataLoader:
        dataset = self._dataset(split)
        seed = _derive_seed(self.seed, "shuffle", split) % (2**31)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._resumable_sampler(len(dataset), seed, batch_size) if shuffle else None,
            collate_fn=NUPACollator(self._pad_id(), mode),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: ``input_ids``, ``attention_mask``, ``labels``, ``example_id``."""
        return self._loader("train", "train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation batches: training keys plus generation inputs and ``answers``/``domains``/``prompts``/``tasks``."""
        return self._loader("val", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches, with the same keys as validation batches."""
        return self._loader("test", "eval", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: ``prompt_input_ids``, ``prompt_attention_mask`` and ``prompts`` only."""
        return self._loader("predict", "predict", shuffle=False, batch_size=self.eval_batch_size)

    # -- used by the LightningModule -----------------------------------------------------------------
    def build_metrics(self, prefix: str) -> Any:
        """A fresh ``MetricCollection`` with ``exact_match``, ``digit_match`` and ``dlength`` under ``prefix``."""
        return nupa_metric_collection(prefix)

    def extract_answer(self, text: str, domain: str | None = None, continuation: bool | None = None) -> str:
        """The answer in generated text (the continuation alone, or prompt + continuation); see
        :func:`lightning_tokens.metrics.nupa.extract_answer`. Pass the example's ``domain`` (from
        ``batch["domains"]``) for the reference's exact per-domain pattern."""
        return _extract_answer(text, domain, continuation=continuation)

    @property
    def generation_max_new_tokens(self) -> int:
        """``max_new_tokens`` if given, else the longest validation/test answer in tokens (characters
        before a tokenizer is known) + 2."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        answers = [e.answer for split in ("val", "test") for e in self.examples[split]]
        if not answers:
            answers = [e.answer for e in self.examples["train"]]
        if not answers:
            return 2
        if self.tokenizer is not None:
            longest = max(len(ids) for ids in self._encode(sorted(set(answers))))
        else:
            longest = max(len(a) for a in answers)
        return longest + 2

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={self.tasks}, train_digits={self.train_digits}, test_digits={self.test_digits})"

