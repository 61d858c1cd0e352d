"""The demo (`fourbit train` with no arguments) on a tiny model: the cards are trained beside replay
rows (the base model's own answers to general prompts), and the general check is reported before
and after. The real demo's numbers (SmolLM2, minutes) are in bench/RESULTS.md."""

import json

from conftest import requires_smollm2
from fourbit.data import REPLAY_PROMPTS
from fourbit.eval.general import GENERAL_QUESTIONS
from fourbit.train import DEMO_PRESET, TrainConfig, apply_demo_preset, train

pytestmark = requires_smollm2


def _demo(model_dir, out, *extra):
    given = dict(model=str(model_dir), output=str(out), max_steps=2, score_examples=2, threads=1)
    for flag in extra:
        given[flag] = False
    return apply_demo_preset(TrainConfig(**given), set(given))


def test_the_demo_replays_the_base_answers_and_checks_general_ability(tiny_chat_dir, tmp_path):
    res = train(_demo(tiny_chat_dir, tmp_path / "demo"))
    base = json.loads((tmp_path / "demo" / "base_answers.json").read_text())
    assert base["prompts"] == list(REPLAY_PROMPTS)
    replayed = sum(1 for a in base["answers"] if a)
    s = res.summary
    assert s["train_examples"] == DEMO_PRESET["max_examples"] + replayed
    assert s["general_before"] == base["check"] and list(s["general_after"]["answers"]) == list(GENERAL_QUESTIONS)
    assert s["general_after"]["perplexity"] > 1 and s["score_after"] is not None

    cards_only = train(_demo(tiny_chat_dir, tmp_path / "no-replay", "replay")).summary
    assert cards_only["train_examples"] == DEMO_PRESET["max_examples"]
    assert cards_only["general_before"] == s["general_before"]  # measured all the same
