"""Write the small example dataset of Contrastive Unlikelihood Training, deterministically (no downloads).

    python data/examples/make_cut_examples.py     # rewrites cut_feedback.jsonl next to this script

``cut_feedback.jsonl`` (JSON Lines, ASCII only): 96 records for
:class:`~lightning_tokens.datamodules.contrastive.ContrastiveDataModule`, each a short question
(``positive_context``), a response (``response``) and, for the 80 flawed responses, a judgment of that
response written into ``negative_context`` (the question followed by the judgment, as CUT's "judge" prompt
does). The 16 others have a correct response and no ``negative_context`` (CUT's Align-P examples: plain NLL).
Every record also keeps the correct answer in ``correct`` (not read by the datamodule; the evaluation of
``configs/cut_smollm2.yaml`` compares the two responses' likelihoods).

Tasks: capitals, opposites, irregular plurals, colours of things (every table entry once), and sums and
differences of small numbers for the rest; a flawed response changes exactly one fact, and its judgment names it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
JUDGE = "{question}\n\nWrite the answer that this judgment describes. Judgment: {judgment}"

CAPITALS = [
    ("France", "Paris", "Lyon"), ("Italy", "Rome", "Milan"), ("Spain", "Madrid", "Barcelona"),
    ("Germany", "Berlin", "Munich"), ("Japan", "Tokyo", "Osaka"), ("Canada", "Ottawa", "Toronto"),
    ("Australia", "Canberra", "Sydney"), ("Egypt", "Cairo", "Alexandria"), ("Brazil", "Brasilia", "Rio de Janeiro"),
    ("Turkey", "Ankara", "Istanbul"), ("India", "New Delhi", "Mumbai"), ("Russia", "Moscow", "Saint Petersburg"),
    ("Kenya", "Nairobi", "Mombasa"), ("Peru", "Lima", "Cusco"), ("Norway", "Oslo", "Bergen"), ("Greece", "Athens", "Sparta"),
]
OPPOSITES = [
    ("hot", "cold", "warm"), ("up", "down", "high"), ("big", "small", "large"), ("fast", "slow", "quick"),
    ("light", "dark", "bright"), ("open", "closed", "wide"), ("happy", "sad", "glad"), ("early", "late", "soon"),
    ("empty", "full", "hollow"), ("strong", "weak", "tough"), ("old", "young", "aged"), ("wet", "dry", "damp"),
]
PLURALS = [
    ("mouse", "mice", "mouses"), ("child", "children", "childs"), ("foot", "feet", "foots"), ("tooth", "teeth", "tooths"),
    ("man", "men", "mans"), ("woman", "women", "womans"), ("goose", "geese", "gooses"), ("person", "people", "persons"),
]
COLOURS = [
    ("the sky on a clear day", "blue", "green"), ("fresh grass", "green", "purple"), ("snow", "white", "black"),
    ("a ripe banana", "yellow", "blue"), ("coal", "black", "white"), ("a ripe tomato", "red", "blue"),
    ("an orange", "orange", "purple"), ("milk", "white", "red"),
]


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        question, right = f"What is {a} + {b}?", a + b
        wrong = right + rng.choice([-2, -1, 1, 2, 10])
        text = lambda v: f"{a} + {b} = {v}."  # noqa: E731
    else:
        a, b = max(a, b), min(a, b)
        question, right = f"What is {a} - {b}?", a - b
        wrong = right + rng.choice([-1, 1, 2])
        text = lambda v: f"{a} - {b} = {v}."  # noqa: E731
    judgment = f"The answer is wrong: it says {wrong}, but the correct result is {right}."
    return {"question": question, "response": text(wrong), "correct": text(right), "judgment": judgment}


def _fact(entry: tuple[str, str, str], kind: str) -> dict:
    subject, right, wrong = entry
    if kind == "capital":
        question = f"What is the capital of {subject}?"
        text = lambda v: f"The capital of {subject} is {v}."  # noqa: E731
        judgment = f"Incorrect: {wrong} is not the capital of {subject}; the capital is {right}."
    elif kind == "opposite":
        question = f"What is the opposite of the word '{subject}'?"
        text = lambda v: f"The opposite of '{subject}' is '{v}'."  # noqa: E731
        judgment = f"Wrong: '{wrong}' is not the opposite of '{subject}'; the opposite is '{right}'."
    elif kind == "plural":
        question = f"What is the plural of '{subject}'?"
        text = lambda v: f"The plural of '{subject}' is '{v}'."  # noqa: E731
        judgment = f"This is a mistake: the plural of '{subject}' is '{right}', not '{wrong}'."
    else:
        question = f"What colour is {subject}?"
        text = lambda v: f"{subject[0].upper() + subject[1:]} is {v}."  # noqa: E731
        judgment = f"The colour is wrong: {subject} is {right}, not {wrong}."
    return {"task": kind, "question": question, "response": text(wrong), "correct": text(right), "judgment": judgment}


def make_records(count: int = 96, positives: int = 16, seed: int = 0) -> list[dict]:
    """Every fact of the tables once, sums and differences for the rest, in a seeded order; every
    ``count // positives``-th record keeps its correct response and has no judgment."""
    rng = random.Random(seed)
    items = [_fact(entry, kind) for kind, table in (("capital", CAPITALS), ("opposite", OPPOSITES),
                                                  ("plural", PLURALS), ("colour", COLOURS)) for entry in table]
    seen = {item["question"] for item in items}
    while len(items) < count:
        item = _arithmetic(rng)
        if item["question"] not in seen:
            seen.add(item["question"])
            items.append({"task": "arithmetic", **item})
    rng.shuffle(items)
    records = []
    for index, item in enumerate(items[:count]):
        record = {"id": f"cut-{index:04d}", "task": item["task"], "positive_context": item["question"]}
        if index % (count // positives) == count // positives - 1:
            record.update(response=item["correct"], correct=item["correct"])
        else:
            record.update(
                negative_context=JUDGE.format(question=item["question"], judgment=item["judgment"]),
                response=item["response"], correct=item["correct"],
            )
        records.append(record)
    return records


def main() -> None:
    path = HERE / "cut_feedback.jsonl"
    with open(path, "w", encoding="ascii") as handle:
        for record in make_records():
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
