"""Number Cookbook (NUPA) task generation in pure Python: number sampling and formatting, the task makers,
the reference prompt wording, and seeded (held-out) example streams.

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
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lightning_tokens.core.errors import ConfigError

__all__ = [
    "NUPA_TASKS",
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
        raise ConfigError(f"Unknown NUPA task {task!r}; valid tasks are {', '.join(NUPA_TASKS)} (or 'all').")
    return NUPA_TASKS[task]


def _check_digits(min_digits: int, max_digits: int) -> None:
    if not (1 <= min_digits <= max_digits):
        raise ConfigError(f"Need 1 <= min_digits <= max_digits, got min_digits={min_digits}, max_digits={max_digits}.")


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
        raise ConfigError(f"num_examples must be >= 0, got {num_examples}.")
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

