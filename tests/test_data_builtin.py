"""fourbit.data.builtin: the demo task is deterministic, its held-out split measures the skill (unseen
names and cities), its examples are short, the embedded model cannot do it before training, and its
replay rows teach whole answers only."""

import re

import pytest

from conftest import requires_smollm2
from fourbit.data import (REPLAY_PROMPTS, DataReport, builtin_examples, load_examples, prompt_text,
                          reference_answer, replay_examples, score_builtin, tokenize_examples)
from fourbit.data.builtin import INSTRUCTION

CARD = re.compile(r"^name: (\w+) \| age: (\d+) \| city: (.+)$")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_builtin_is_deterministic_with_fixed_splits():
    a, b = builtin_examples(), builtin_examples()
    assert [e.turns for e in a] == [e.turns for e in b] and len(a) == 2200
    assert [e.split for e in a] == ["train"] * 2000 + ["eval"] * 200
    assert [e.turns for e in builtin_examples("eval")] == [e.turns for e in a[2000:]]
    assert [e.turns for e in builtin_examples("train", n=5)] == [e.turns for e in a[:5]]
    assert len({e.turns[0][1] for e in a}) > 2100  # hardly any repeats
    ex, rep = load_examples("builtin")
    assert [e.turns for e in ex] == [e.turns for e in a] and (rep.format, rep.used) == ("chat", 2200)
    with pytest.raises(ValueError, match="split must be"):
        builtin_examples("test")


def test_answers_are_cards_of_facts_from_the_sentence():
    for e in builtin_examples():
        name, age, city = CARD.match(reference_answer(e)).groups()
        sentence = e.turns[0][1]
        assert sentence.startswith("Make a fourbit card: ")
        assert re.search(rf"\b{name}\b", sentence) and re.search(rf"\b{city}\b", sentence)
        assert re.search(rf"\b{age}(st|nd|rd|th)?\b", sentence)
        for num, suffix in re.findall(r"\b(\d+)(st|nd|rd|th)\b", sentence):  # "a 21st birthday", not "21th"
            assert suffix == ("th" if num[-2:] in ("11", "12", "13") else
                              {"1": "st", "2": "nd", "3": "rd"}.get(num[-1], "th"))


def test_held_out_names_and_cities_never_occur_in_training():
    cards = {s: [CARD.match(reference_answer(e)).groups() for e in builtin_examples(s)] for s in ("train", "eval")}
    train_text = " ".join(e.turns[0][1] for e in builtin_examples("train"))
    for name, _, city in cards["eval"]:
        assert name not in train_text and city not in train_text
    assert len({c[0] for c in cards["eval"]}) >= 8 and len({c[2] for c in cards["eval"]}) >= 6


def test_examples_are_short_and_mask_all_but_the_card(tok):
    ex = builtin_examples(n=300) + builtin_examples("eval", n=50)
    t, stats = tokenize_examples(ex, tok, source_max_len=96, target_max_len=48, report=DataReport())
    assert stats["truncated"] == 0 and max(len(x["input_ids"]) for x in t) < 80
    for e, x in zip(ex[:20], t):
        trained = tok.decode([i for i in x["labels"] if i != -100])
        assert trained == reference_answer(e) + "<|im_end|>\n"
    p = prompt_text(ex[0], tok)
    assert p.endswith("<|im_start|>assistant\n") and "Make a fourbit card:" in p


def test_score_builtin():
    refs = ["name: A | age: 3 | city: B", "name: C | age: 4 | city: D", "name: E | age: 5 | city: F"]
    assert score_builtin([refs[0] + "\nmore text", "  " + refs[1] + " ", "name: E | age: 5 | city: G"], refs) == \
        pytest.approx(2 / 3)
    assert score_builtin([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        score_builtin(refs[:2], refs)


@requires_smollm2
@pytest.mark.slow
def test_the_embedded_model_cannot_do_the_task_before_training(smollm2_dir, tok):
    """The premise of the demo: greedy SmolLM2-135M-Instruct gets no held-out card right (8 tried)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ex = builtin_examples("eval", n=8)
    tok.padding_side = "left"
    batch = tok([prompt_text(e, tok) for e in ex], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert score_builtin(answers, [reference_answer(e) for e in ex]) == 0.0


def test_replay_prompts_are_general_and_apart_from_the_general_check():
    from fourbit.eval.general import GENERAL_QUESTIONS

    assert len(set(REPLAY_PROMPTS)) == len(REPLAY_PROMPTS) >= 32
    assert not any(p.startswith(INSTRUCTION) or "card" in p for p in REPLAY_PROMPTS)  # never the task itself
    topics = {"capital", "france", "paris", "spider", "legs", "tom", "leeds"}  # the check's; it stays held out
    assert all(t in " ".join(GENERAL_QUESTIONS).lower() for t in topics - {"paris"})
    assert not topics & {w.strip("?.,:'!").lower() for p in REPLAY_PROMPTS for w in p.split()}
    rows = replay_examples(REPLAY_PROMPTS[:2], ["a", "b"])
    assert [r.turns for r in rows] == [[("user", REPLAY_PROMPTS[0]), ("assistant", "a")],
                                       [("user", REPLAY_PROMPTS[1]), ("assistant", "b")]]
    assert all(r.chat and r.split == "train" for r in rows)
    with pytest.raises(ValueError, match="1 answers for 2 prompts"):
        replay_examples(REPLAY_PROMPTS[:2], ["a"])


def test_replay_rows_never_teach_a_cut_answer_to_stop(tok):
    """The base model's answers are generated up to ANSWER_TOKENS; one cut there had not ended, so with
    the demo's target length its end marker must be cut off in training too (else the adapter learns
    to stop mid-sentence), while an answer that ended keeps it. Every replay prompt fits whole."""
    from fourbit.eval.general import ANSWER_TOKENS
    from fourbit.train import DEMO_PRESET

    src, tgt = DEMO_PRESET["source_max_len"], DEMO_PRESET["target_max_len"]
    cut = tok.decode(tok("The sea is wide and deep and blue. " * 20)["input_ids"][:ANSWER_TOKENS]).strip()
    rows, stats = tokenize_examples(replay_examples(REPLAY_PROMPTS[:2], ["Paris.", cut]), tok, src, tgt,
                                    report=DataReport())
    trained = [tok.decode([i for i in x["labels"] if i != -100]) for x in rows]
    assert trained[0] == "Paris.<|im_end|>\n"
    assert "<|im_end|>" not in trained[1] and cut.startswith(trained[1].strip()) and stats["truncated"] == 1
    _, stats = tokenize_examples(replay_examples(REPLAY_PROMPTS, ["ok"] * len(REPLAY_PROMPTS)), tok, src, tgt,
                                 report=DataReport())
    assert stats["truncated"] == 0
