"""Write the small example SFT datasets of this folder, deterministically (no downloads).

    python data/examples/make_examples.py        # rewrites the three .jsonl files next to this script

Files (JSON Lines, one record per line, every record with an ``id``; ASCII only, so the built-in
character tokenizer ``tokenizer: char`` covers every character):

- ``sft_chat.jsonl``: 300 Number Cookbook problems (``lightning_tokens.datamodules.nupa``) as chats
  (``messages`` with a short system prompt; one in ten has two user/assistant turns). Every fifth has a
  sample ``weight``; every seventh has ``weight_spans`` on an assistant message (its last character
  weighs 2).
- ``sft_prompt_response.jsonl``: 200 short instructions (reverse / capitalise / sort / count / repeat /
  first letters) as ``prompt``/``response``; some with ``weight`` or ``weight_spans`` into the response.
- ``sft_text.jsonl``: 100 short texts for plain language modelling (``text``); some with ``weight``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lightning_tokens.datamodules.nupa import generate_nupa_examples

HERE = Path(__file__).resolve().parent
SYSTEM = "You are a careful calculator. Reply with the answer only."
CHAT_TASKS = (
    "Integer/add",
    "Integer/sub",
    "Integer/max",
    "Integer/multiply",
    "Integer/digit_max",
    "Integer/length",
    "Float/add",
    "Fraction/add",
)
WORDS = (
    "apple", "river", "stone", "cloud", "forest", "candle", "garden", "pencil", "window", "silver",
    "orange", "planet", "rocket", "meadow", "bridge", "castle", "dragon", "feather", "harbor", "island",
    "jacket", "kitten", "lantern", "marble", "needle", "pepper", "quartz", "rabbit", "saddle", "tunnel",
    "violin", "wizard", "yellow", "zipper", "anchor", "basket", "carpet", "desert", "engine", "falcon",
    "ginger", "helmet", "igloo", "jungle", "kettle", "lemon", "mirror", "nutmeg", "oyster", "puzzle",
)
ADJECTIVES = ("quiet", "bright", "small", "heavy", "gentle", "rapid", "old", "curious", "warm", "patient")
VERBS = ("watches", "follows", "carries", "paints", "finds", "builds", "reads", "counts", "visits", "repairs")


def _problem(task: str, seed: int) -> tuple[str, str]:
    example = generate_nupa_examples(task, 1, 1, 3, seed=seed)[0]
    return example.prompt.rstrip(), example.answer


def chat_records(count: int = 300) -> list[dict]:
    records = []
    for i in range(count):
        messages = [{"role": "system", "content": SYSTEM}]
        turns = 2 if i % 10 == 9 else 1
        for turn in range(turns):
            question, answer = _problem(CHAT_TASKS[(i + 3 * turn) % len(CHAT_TASKS)], seed=1000 + 7 * i + turn)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        record: dict = {"id": f"chat-{i:04d}", "messages": messages}
        if i % 5 == 4:
            record["weight"] = 0.5 if i % 10 == 4 else 2.0
        if i % 7 == 6:
            last = messages[-1]
            last["weight_spans"] = [{"start": len(last["content"]) - 1, "end": len(last["content"]), "weight": 2.0}]
        records.append(record)
    return records


def prompt_response_records(count: int = 200) -> list[dict]:
    rng = random.Random(7)
    records = []
    for i in range(count):
        kind = i % 6
        word = rng.choice(WORDS)
        if kind == 0:
            prompt, response = f"Reverse the word {word}.\n", word[::-1]
        elif kind == 1:
            prompt, response = f"Spell {word} in capitals.\n", word.upper()
        elif kind == 2:
            numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
            prompt = "Sort these numbers: " + ", ".join(map(str, numbers)) + "\n"
            response = ", ".join(map(str, sorted(numbers)))
        elif kind == 3:
            letter = rng.choice(word)
            prompt, response = f"How many times does '{letter}' occur in {word}?\n", str(word.count(letter))
        elif kind == 4:
            times = rng.randint(2, 4)
            prompt, response = f"Repeat {word} {times} times.\n", " ".join([word] * times)
        else:
            words = rng.sample(WORDS, 3)
            prompt = "Give the first letters of: " + " ".join(words) + "\n"
            response = "".join(w[0] for w in words)
        record: dict = {"id": f"pr-{i:04d}", "prompt": prompt, "response": response}
        if i % 9 == 8:
            record["weight"] = 1.5
        if i % 11 == 10 and len(response) > 1:
            record["weight_spans"] = [{"start": 0, "end": 1, "weight": 0.25}]
        records.append(record)
    return records


def text_records(count: int = 100) -> list[dict]:
    rng = random.Random(11)
    records = []
    for i in range(count):
        if i % 2 == 0:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            text = f"{a} plus {b} is {a + b}. {max(a, b)} is the larger of {a} and {b}."
        else:
            adj, noun, verb, other = rng.choice(ADJECTIVES), rng.choice(WORDS), rng.choice(VERBS), rng.choice(WORDS)
            text = f"The {adj} {noun} {verb} the {other}. It is a {adj} day."
        record: dict = {"id": f"text-{i:04d}", "text": text}
        if i % 10 == 9:
            record["weight"] = 0.5
        records.append(record)
    return records


def write(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=True) + "\n")


def main() -> None:
    write(HERE / "sft_chat.jsonl", chat_records())
    write(HERE / "sft_prompt_response.jsonl", prompt_response_records())
    write(HERE / "sft_text.jsonl", text_records())


if __name__ == "__main__":
    main()
