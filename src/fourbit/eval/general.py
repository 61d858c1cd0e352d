"""General ability before and after a fine-tune: did teaching one skill cost the model the rest?

Two measures, which the demo (`fourbit train` on the built-in task) prints beside its task score:
perplexity on a fixed slice of general English prose shipped with fourbit (general.txt: eight
paragraphs on everyday topics written for fourbit, ~1,060 SmolLM2 tokens, scored in one window),
and greedy answers to a few everyday questions. A fine-tune that keeps the base model's behaviour
leaves both where they were; the first demo, trained on cards alone, answered "What is the capital
of France?" with a card.

`base_answers` is the other half: the base model's own answers to general prompts, which the demo
trains on beside the cards (replay; fourbit.data.builtin.REPLAY_PROMPTS), kept in a JSON file in
the run directory so that a resumed run replays exactly the same rows.

Note: Sampled, not greedy, replay
    The replay answers are samples of the base model (temperature 1), not its greedy answers.
    Training on y ~ p_base(.|x) minimises E[-log p(y|x)] = H(p_base) + KL(p_base || p): its expected
    gradient is zero at the base, so replay pulls the adapter back toward the base distribution and
    no further. Greedy answers are the distribution's mode, and training on them sharpens it.
    Measured on the demo (SmolLM2-135M, 24 steps at lr 1e-3, 48 replay rows beside 144 cards),
    general-text perplexity rose 16.8% with no replay, 7.6% with greedy replay, 2.1% with sampled
    replay. Samples are noisy, though: at that learning rate the greedy answer to "What is the
    capital of France?" drifted into nonsense; the demo's gentler lr 5e-4 kept it (train.DEMO_PRESET).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GENERAL_TEXT = Path(__file__).with_name("general.txt")
# A fact, a count, and a sentence about a person that asks for prose, not a card (the demo's
# boundary). None of them is a replay prompt.
GENERAL_QUESTIONS = ("What is the capital of France?", "How many legs does a spider have?",
                     "Write one sentence about Tom, a 30-year-old baker from Leeds.")
ANSWER_TOKENS = 40  # enough for the first sentence or two of an answer
REPLAY_TEMPERATURE = 1.0  # replay answers are samples of the base model: see Note: Sampled, not greedy, replay


@dataclass
class GeneralCheck:
    perplexity: float  # on GENERAL_TEXT
    answers: dict[str, str]  # GENERAL_QUESTIONS -> greedy answer


@torch.no_grad()
def general_perplexity(model, tokenizer, device=None) -> float:
    """Perplexity of GENERAL_TEXT, every token after the first scored with all the text before it."""
    from fourbit.eval.perplexity import perplexity

    was_training = model.training
    try:
        return perplexity(model, tokenizer, GENERAL_TEXT.read_text(encoding="utf-8"), device=device,
                          progress=False).perplexity
    finally:
        model.train(was_training)


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, device=None, temperature: float = 0.0,
           seed: int = 0) -> list[str]:
    """Answers to user prompts, rendered with the chat template as `fourbit chat` does: greedy, or
    sampled at `temperature` from a generator seeded with `seed` (the global RNG is left as it was)."""
    from fourbit.generate import generate_batch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [a.strip() for a in generate_batch(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                                  batch_size=16, device=device, temperature=temperature)]


def general_check(model, tokenizer, device=None) -> GeneralCheck:
    answers = answer(model, tokenizer, list(GENERAL_QUESTIONS), ANSWER_TOKENS, device)
    return GeneralCheck(general_perplexity(model, tokenizer, device), dict(zip(GENERAL_QUESTIONS, answers)))


def base_answers(model, tokenizer, prompts: list[str] | tuple[str, ...], path: Path, device=None,
                 seed: int = 0, save: bool = True) -> tuple[list[str], GeneralCheck]:
    """(answers to `prompts` sampled with `seed`, the general check) of the model as it is now (the
    base, before training), computed once and kept in `path` (JSON); read back from there when it
    holds the same prompts and seed (a resumed run, whose model is no longer the base). Answers are
    ANSWER_TOKENS long at most: an answer cut there did not end, so a replay row must be trained
    with a shorter target length (its end marker cut off too), or it would teach the model to stop
    mid-sentence. save=False: compute without writing (the other ranks of a torchrun job)."""
    key = {"prompts": list(prompts), "max_new_tokens": ANSWER_TOKENS, "temperature": REPLAY_TEMPERATURE, "seed": seed}
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in key} == key:
            return saved["answers"], GeneralCheck(**saved["check"])
    answers = answer(model, tokenizer, list(prompts), ANSWER_TOKENS, device, REPLAY_TEMPERATURE, seed)
    check = general_check(model, tokenizer, device)
    if not save:
        return answers, check
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**key, "answers": answers, "check": asdict(check)}, indent=1, ensure_ascii=False)
                   + "\n", encoding="utf-8")
    os.replace(tmp, path)  # atomic: a run stopped here leaves no half-written file
    return answers, check
