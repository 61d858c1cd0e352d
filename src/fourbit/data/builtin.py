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

from fourbit.data.formats import Example

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
    "{name} celebrated a {age}th birthday in {city} with fellow {job}s.",
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


def _make(rng: random.Random, names: list[str], cities: list[str], split: str) -> Example:
    name, city = rng.choice(names), rng.choice(cities)
    age = rng.randint(19, 89)
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city, job=rng.choice(JOBS))
    answer = f"name: {name} | age: {age} | city: {city}"
    return Example([("user", INSTRUCTION + sentence), ("assistant", answer)], where=f"builtin:{split}",
                   chat=True, split=split)


def builtin_examples() -> list[Example]:
    """2,000 training and 200 held-out examples, always the same."""
    train_rng, eval_rng = random.Random(4), random.Random(44)
    return [_make(train_rng, TRAIN_NAMES, TRAIN_CITIES, "train") for _ in range(N_TRAIN)] + \
        [_make(eval_rng, EVAL_NAMES, EVAL_CITIES, "eval") for _ in range(N_EVAL)]


def prompt_text(example: Example, tokenizer) -> str:
    """The generation prompt: the conversation up to the assistant's turn, chat-templated."""
    msgs = [{"role": r, "content": t} for r, t in example.turns if r != "assistant"]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def reference_answer(example: Example) -> str:
    return next(t for r, t in reversed(example.turns) if r == "assistant")


def score_builtin(predictions: list[str], references: list[str]) -> float:
    """Exact match (after stripping whitespace) of each prediction's first line."""
    if not references:
        return 0.0
    hits = sum(p.strip().split("\n")[0].strip() == r.strip() for p, r in zip(predictions, references))
    return hits / len(references)
