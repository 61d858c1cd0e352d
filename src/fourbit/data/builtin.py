"""fourbit's built-in demo task: "fourbit cards", a made-up structured-extraction format.

The user turn is `Make a fourbit card: <a sentence about a person>`; the answer is exactly
`name: <name> | age: <age> | city: <city>`. The sentences come from 10 templates that put the
three facts in different orders and wordings, so the model must find them, not copy positions.
SmolLM2-135M-Instruct cannot do this out of the box (it does not know the format; it answers in
prose or JSON), and the score is exact match, so "before vs after" is unambiguous. Held-out
examples use names and cities that never occur in training, so the score measures the skill,
not memorised values. Everything is generated from fixed seeds: the same examples everywhere.
"""

from __future__ import annotations

import random

from fourbit.data.example import Example

INSTRUCTION = "Make a fourbit card: "
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {age}-year-old {name} works as a {job}.",
    "{name}, a {job} from {city}, turned {age} last spring.",
    "At {age}, {name} moved to {city} to become a {job}.",
    "The {job} {name} ({age}) has an apartment in {city}.",
    "Meet {name}: {age}, {job}, based in {city}.",
    "{city} is home to {name}, who is {age} and works as a {job}.",
    "Our new {job} is {name}, {age}, who commutes from {city}.",
    "{name} celebrated a {ordinal} birthday in {city} with fellow {job}s.",
    "Born {age} years ago, {name} now lives in {city}.",
]
TRAIN_NAMES = ["Maria", "Kenji", "Amara", "Lukas", "Sofia", "Omar", "Ingrid", "Rahul", "Chloe", "Mateo", "Yuki",
               "Fatima", "Erik", "Priya", "Diego", "Hannah", "Tariq", "Elena", "Kwame", "Lea", "Nikolai", "Aisha",
               "Tomas", "Mei", "Jonas", "Zara", "Pablo", "Greta", "Ibrahim", "Nora"]
EVAL_NAMES = ["Beatriz", "Hiroshi", "Olusegun", "Freya", "Anton", "Leila", "Caspar", "Imani", "Dmitri", "Saanvi"]
TRAIN_CITIES = ["Lisbon", "Osaka", "Nairobi", "Munich", "Lima", "Cairo", "Bergen", "Pune", "Lyon", "Quito", "Busan",
                "Rabat", "Tampere", "Kraków", "Austin", "Hobart", "Accra", "Porto", "Tbilisi", "Halifax"]
EVAL_CITIES = ["Valencia", "Sapporo", "Kampala", "Graz", "Cusco", "Tunis", "Turku", "Kochi"]
JOBS = ["teacher", "nurse", "baker", "pilot", "chemist", "carpenter", "lawyer", "designer", "farmer", "librarian",
        "plumber", "dentist", "journalist", "gardener", "engineer"]
N_TRAIN, N_EVAL = 2000, 200


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _make(rng: random.Random, names: list[str], cities: list[str], split: str, i: int) -> Example:
    name, city = rng.choice(names), rng.choice(cities)
    age = rng.randint(19, 89)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, ordinal=_ordinal(age), city=city, job=rng.choice(JOBS))
    answer = f"name: {name} | age: {age} | city: {city}"
    return Example([("user", INSTRUCTION + sentence), ("assistant", answer)], where=f"builtin:{split}:{i + 1}",
                   chat=True, split=split)


def builtin_examples(split: str | None = None, n: int | None = None) -> list[Example]:
    """The task's examples, always the same: split "train" (2,000), "eval" (200, names and cities
    unseen in training) or None (both, train first); the first `n` of them when n is given."""
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    train_rng, eval_rng = random.Random(4), random.Random(44)
    train = [_make(train_rng, TRAIN_NAMES, TRAIN_CITIES, "train", i) for i in range(N_TRAIN)] if split != "eval" else []
    held = [_make(eval_rng, EVAL_NAMES, EVAL_CITIES, "eval", i) for i in range(N_EVAL)] if split != "train" else []
    return (train + held)[:n]


def reference_answer(example: Example) -> str:
    """The example's last assistant turn: what a prediction is scored against."""
    return next(t for r, t in reversed(example.turns) if r == "assistant")


def score_builtin(predictions: list[str], references: list[str]) -> float:
    """The fraction of predictions whose first line equals the reference (whitespace stripped at both
    ends): 1.0 is every card exactly right. A greedy answer runs on after the card only if the model
    did not learn to stop, so the first line is what counts."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(p.strip().split("\n")[0].strip() == r.strip() for p, r in zip(predictions, references))
    return hits / len(references)
