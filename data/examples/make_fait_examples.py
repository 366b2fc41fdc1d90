"""Write the small example datasets of FAIT and the data-level filters, deterministically (no downloads).

    python data/examples/make_fait_examples.py    # rewrites the three .jsonl files below, next to this script

Files (JSON Lines, ASCII only, so the built-in character tokenizer ``tokenizer: char`` covers every
character; spaces, never tabs):

- ``fait_code.jsonl``: 50 ``{id, prompt, response, incorrect, mutation}`` records for FAIT: a short
  Python function (``response``, correct) and a functionally incorrect variant of it (``incorrect``)
  made by one small mutation written here by hand (an operator or constant changed, an off-by-one, a
  line deleted, a line inserted); ``mutation`` names it.
- ``long_cot.jsonl``: 24 ``{id, prompt, response, style}`` long chain-of-thought answers to small
  arithmetic problems, ``<think>...</think>`` then the answer: ``style: linear`` traces go (almost)
  straight to the answer (at most one of 5 steps proposes an alternative: branching density <= 0.2),
  ``style: branching`` ones keep proposing alternatives (``wait``, ``alternatively``, ...; density 1/3
  to 0.6), for :class:`~lightning_tokens.datamodules.filters.BranchingDensityFilter` (default
  ``max_density: 0.3`` keeps exactly the linear ones).
- ``instruct_mining.jsonl``: 40 ``{id, prompt, response, reward}`` short instructions, half answered
  correctly and half wrongly. ``reward`` is a **stand-in** for a reward model's score (the paper's
  ``Rew``; no reward model is available offline): 2.0 for a correct answer, -2.0 for a wrong one, known
  because the data is generated. Replace it with real scores for real use.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, prompt, code, mutations); a mutation is ("replace", old, new) on the first occurrence,
# ("delete_line", line) or ("insert_after", line, new_line).
TASKS: tuple[tuple[str, str, str, tuple[tuple[str, ...], ...]], ...] = (
    (
        "sum_list",
        "Write a Python function sum_list(xs) that returns the sum of the numbers in xs.",
        "def sum_list(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n",
        (
            ("replace", "total = 0", "total = 1"),
            ("replace", "total += x", "total -= x"),
            ("replace", "return total", "return x"),
            ("insert_after", "        total += x", "        total += 1"),
        ),
    ),
    (
        "count_positive",
        "Write a Python function count_positive(xs) that counts the numbers in xs greater than zero.",
        "def count_positive(xs):\n    count = 0\n    for x in xs:\n        if x > 0:\n            count += 1\n    return count\n",
        (
            ("replace", "x > 0", "x >= 0"),
            ("replace", "count += 1", "count += x"),
            ("replace", "count = 0", "count = 1"),
            ("replace", "x > 0", "x < 0"),
        ),
    ),
    (
        "factorial",
        "Write a Python function factorial(n) that returns n! for n >= 0.",
        "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
        (
            ("replace", "range(2, n + 1)", "range(2, n)"),
            ("replace", "result = 1", "result = 0"),
            ("replace", "result *= i", "result += i"),
            ("replace", "return result", "return i"),
        ),
    ),
    (
        "is_even",
        "Write a Python function is_even(n) that tells whether the integer n is even.",
        "def is_even(n):\n    return n % 2 == 0\n",
        (
            ("replace", "==", "!="),
            ("replace", "% 2", "% 3"),
            ("replace", "n % 2 == 0", "n // 2 == 0"),
            ("replace", "== 0", "== 1"),
        ),
    ),
    (
        "max_of",
        "Write a Python function max_of(xs) that returns the largest number of the non-empty list xs.",
        "def max_of(xs):\n    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n    return best\n",
        (
            ("replace", "x > best", "x < best"),
            ("replace", "best = xs[0]", "best = 0"),
            ("delete_line", "            best = x"),
            ("replace", "return best", "return x"),
        ),
    ),
    (
        "reverse_string",
        "Write a Python function reverse_string(s) that returns the characters of s in reverse order.",
        "def reverse_string(s):\n    return s[::-1]\n",
        (
            ("replace", "s[::-1]", "s[::1]"),
            ("replace", "s[::-1]", "s[:-1]"),
            ("replace", "s[::-1]", "s[-1]"),
        ),
    ),
    (
        "fib",
        "Write a Python function fib(n) that returns the n-th Fibonacci number, with fib(0) = 0.",
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        (
            ("replace", "a, b = 0, 1", "a, b = 1, 1"),
            ("replace", "range(n)", "range(n - 1)"),
            ("replace", "return a", "return b"),
            ("replace", "a, b = b, a + b", "a, b = b, a * b"),
        ),
    ),
    (
        "mean",
        "Write a Python function mean(xs) that returns the average of xs, or 0.0 for an empty list.",
        "def mean(xs):\n    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)\n",
        (
            ("replace", "sum(xs) / len(xs)", "sum(xs) // len(xs)"),
            ("delete_line", "    if not xs:"),
            ("replace", "return 0.0", "return None"),
            ("replace", "len(xs)", "(len(xs) + 1)"),
        ),
    ),
    (
        "count_vowels",
        "Write a Python function count_vowels(s) that counts the vowels a, e, i, o, u in s, in either case.",
        "def count_vowels(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")\n",
        (
            ("replace", "\"aeiou\"", "\"aeio\""),
            ("replace", "s.lower()", "s"),
            ("replace", "c in \"aeiou\"", "c not in \"aeiou\""),
        ),
    ),
    (
        "clamp",
        "Write a Python function clamp(x, lo, hi) that limits x to the interval [lo, hi].",
        "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n",
        (
            ("replace", "return lo", "return hi"),
            ("replace", "x > hi", "x < hi"),
            ("insert_after", "def clamp(x, lo, hi):", "    lo, hi = hi, lo"),
            ("replace", "    return x\n", "    return lo\n"),
        ),
    ),
    (
        "gcd",
        "Write a Python function gcd(a, b) that returns the greatest common divisor of two positive integers.",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        (
            ("replace", "a % b", "b % a"),
            ("replace", "return a", "return b"),
            ("replace", "while b:", "while a:"),
        ),
    ),
    (
        "index_of",
        "Write a Python function index_of(xs, target) that returns the first index of target in xs, or -1.",
        "def index_of(xs, target):\n    for i, x in enumerate(xs):\n        if x == target:\n            return i\n    return -1\n",
        (
            ("replace", "return -1", "return 0"),
            ("replace", "x == target", "x != target"),
            ("replace", "return i", "return x"),
            ("insert_after", "        if x == target:", "            i += 1"),
        ),
    ),
    (
        "square_all",
        "Write a Python function square_all(xs) that returns the list of the squares of the numbers in xs.",
        "def square_all(xs):\n    return [x * x for x in xs]\n",
        (
            ("replace", "x * x", "x * 2"),
            ("replace", "x * x", "x + x"),
            ("replace", "[x * x for x in xs]", "[x * x for x in xs[1:]]"),
        ),
    ),
)


def mutate(code: str, mutation: tuple[str, ...]) -> str:
    kind = mutation[0]
    if kind == "replace":
        _, old, new = mutation
        assert old in code, (old, code)
        return code.replace(old, new, 1)
    lines = code.split("\n")
    if kind == "delete_line":
        index = lines.index(mutation[1])
        return "\n".join(lines[:index] + lines[index + 1 :])
    if kind == "insert_after":
        index = lines.index(mutation[1])
        return "\n".join(lines[: index + 1] + [mutation[2]] + lines[index + 1 :])
    raise ValueError(kind)


def fait_records(count: int = 50) -> list[dict]:
    pairs = [(task, m) for task in TASKS for m in task[3]]
    records = []
    for i in range(count):
        (name, prompt, code, _), mutation = pairs[i % len(pairs)]
        incorrect = mutate(code, mutation)
        assert incorrect != code
        records.append({
            "id": f"fait-{i:04d}",
            "prompt": prompt + "\n",
            "response": code,
            "incorrect": incorrect,
            "mutation": f"{name}: {mutation[0]} {' -> '.join(repr(x) for x in mutation[1:])}",
        })
    return records


BRANCHING_STEPS = (
    "Perhaps I should count up from {a} one by one.",
    "Wait, that would take too long.",
    "Alternatively I could split {b} into tens and units.",
    "Hmm, maybe I should first round {a} to a multiple of ten.",
    "Let me reconsider and just compute directly.",
    "What if I check it with {b} {op} {a} instead?",
)


def _trace(a: int, b: int, op: str, branching: int) -> str:
    """Four straight steps and ``branching`` steps that propose alternatives, inserted after the first."""
    result = a + b if op == "+" else a * b
    if op == "+":
        tens, units = (a // 10 + b // 10) * 10, a % 10 + b % 10
        steps = [f"I need to add {a} and {b}.", f"The tens give {tens}.", f"The units give {units}.", f"So the result is {tens} + {units} = {result}."]
    else:
        high, low = b // 10 * 10, b % 10
        steps = [f"I need to multiply {a} and {b}.", f"{a} times {high} is {a * high}.", f"{a} times {low} is {a * low}.", f"Adding them gives {result}."]
    extra = [step.format(a=a, b=b, op=op) for step in BRANCHING_STEPS[:branching]]
    steps = steps[:1] + extra + steps[1:]
    return "<think>\n" + "\n".join(steps) + "\n</think>\n" + str(result)


def long_cot_records(count: int = 24) -> list[dict]:
    """Even records are ``linear`` (0 or 1 branching step of 4-5: density <= 0.2), odd ones ``branching``
    (2 to 6 branching steps: density 1/3 to 0.6)."""
    rng = random.Random(2604)
    records = []
    for i in range(count):
        op = "+" if i % 4 < 2 else "*"
        a, b = rng.randint(12, 89), rng.randint(12, 89)
        style = "linear" if i % 2 == 0 else "branching"
        branching = (i // 2) % 2 if style == "linear" else 2 + (i // 2) % 5
        records.append({
            "id": f"cot-{i:04d}",
            "prompt": f"What is {a} {op} {b}?\n",
            "response": _trace(a, b, op, branching),
            "style": style,
        })
    return records


WORDS = ("apple", "river", "stone", "cloud", "forest", "candle", "garden", "pencil", "window", "silver",
         "orange", "planet", "rocket", "meadow", "bridge", "castle", "dragon", "harbor", "island", "jacket")


def instruct_mining_records(count: int = 40) -> list[dict]:
    rng = random.Random(2307)
    records = []
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        kind = i % 4
        if kind == 0:
            prompt, answer, wrong = f"Reverse the word {word}.", word[::-1], word[::-1][1:] + word[-1]
        elif kind == 1:
            prompt, answer, wrong = f"Spell {word} in capitals.", word.upper(), word.capitalize()
        elif kind == 2:
            numbers = rng.sample(range(1, 100), 4)
            prompt = "Sort these numbers: " + ", ".join(map(str, numbers)) + "."
            answer, wrong = ", ".join(map(str, sorted(numbers))), ", ".join(map(str, numbers))
        else:
            prompt, answer, wrong = f"How many letters does {word} have?", str(len(word)), str(len(word) + 1)
        correct = (i // 4) % 2 == 0
        records.append({
            "id": f"im-{i:04d}",
            "prompt": prompt + "\n",
            "response": answer if correct else wrong,
            "reward": 2.0 if correct else -2.0,
        })
    return records


def main() -> None:
    for name, records in (
        ("fait_code.jsonl", fait_records()),
        ("long_cot.jsonl", long_cot_records()),
        ("instruct_mining.jsonl", instruct_mining_records()),
    ):
        with open(HERE / name, "w", encoding="ascii") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)


if __name__ == "__main__":
    main()
