"""Data: format detection on the real samples, label masking checked by decoding, truncation
counts, batching determinism, packing equal to unpacked (tiny transformers model), bad input."""

import json

import pytest
import torch

from conftest import SHARED_DATA, requires_shared_data, tiny_model
from fourbit.data import (IGNORE, batch_order, builtin_examples, collate, load_examples, pack_examples,
                          prompt_text, reference_answer, score_builtin, split_eval, tokenize_examples)
from fourbit.errors import UserError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _trained_text(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != IGNORE])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@requires_shared_data
@pytest.mark.parametrize("rel,fmt", [("alpaca/litgpt_fixture_alpaca.json", "alpaca"),
                                     ("alpaca/torchtune_alpaca_tiny.json", "alpaca"),
                                     ("guanaco/openassistant_best_replies_eval.jsonl", "oasst"),
                                     ("oasst/oa_questions.jsonl", "io")])
def test_real_samples_are_detected(rel, fmt):
    ex, report = load_examples(str(SHARED_DATA / rel))
    assert report.format == fmt and report.used == len(ex) > 0


def test_alpaca_labels_are_the_response_plus_eos(tmp_path, tok):
    path = _write(tmp_path / "a.jsonl", [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                         {"instruction": "Say hi.", "input": "", "output": "Hi!"}])
    ex, _ = load_examples(path)
    t, _ = tokenize_examples(ex, tok)
    assert _trained_text(tok, t[0]) == "5" + tok.eos_token and _trained_text(tok, t[1]) == "Hi!" + tok.eos_token
    full = tok.decode(t[0]["input_ids"])
    assert "paired with an input" in full and "### Input:\n2 and 3\n\n### Response: 5" in full
    assert "paired with an input" not in tok.decode(t[1]["input_ids"])


def test_oasst_multi_turn_trains_every_assistant_turn(tmp_path, tok):
    path = _write(tmp_path / "o.jsonl", [{"text": "### Human: Hi there### Assistant: Hello!### Human: How are you?"
                                                  "### Assistant: Fine, thanks."}])
    ex, rep = load_examples(path)
    assert rep.format == "oasst"
    t, _ = tokenize_examples(ex, tok)
    assert _trained_text(tok, t[0]) == f" Hello!{tok.eos_token} Fine, thanks.{tok.eos_token}"
    assert tok.decode(t[0]["input_ids"]).startswith("### Human: Hi there### Assistant: Hello!")


def test_chat_messages_mask_system_and_user_turns(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid."}]
    ex, rep = load_examples(_write(tmp_path / "c.jsonl", [{"messages": msgs}]))
    assert rep.format == "chat"
    t, _ = tokenize_examples(ex, tok)
    assert tok.decode(t[0]["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert _trained_text(tok, t[0]) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"


def test_train_on_inputs_keeps_every_label(tmp_path, tok):
    ex, _ = load_examples(_write(tmp_path / "io.jsonl", [{"input": "question", "output": "answer"}]))
    t, _ = tokenize_examples(ex, tok, train_on_inputs=True)
    assert t[0]["labels"] == t[0]["input_ids"]


def test_plain_text_is_chunked_not_cut(tmp_path, tok):
    ex, rep = load_examples(_write(tmp_path / "t.jsonl", [{"text": "word " * 300}]))
    assert rep.format == "text"
    t, stats = tokenize_examples(ex, tok, source_max_len=64, target_max_len=64)
    assert len(t) == -(-300 // 128) or len(t) >= 2
    assert sum(len(e["input_ids"]) for e in t) == len(tok("word " * 300, add_special_tokens=False)["input_ids"])


def test_truncation_is_counted_and_never_silently_drops_a_target(tmp_path, tok):
    rows = [{"input": "long prompt " * 50, "output": "long answer " * 50}, {"input": "q", "output": "a"}]
    ex, rep = load_examples(_write(tmp_path / "io.jsonl", rows))
    t, stats = tokenize_examples(ex, tok, source_max_len=16, target_max_len=8, report=rep)
    assert stats["truncated"] == 1 and rep.truncated == 1 and len(t) == 2
    lens = [(sum(lab == IGNORE for lab in e["labels"]), sum(lab != IGNORE for lab in e["labels"])) for e in t]
    assert lens[0] == (16, 8)
    msgs = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}] * 2
    ex, rep = load_examples(_write(tmp_path / "c.jsonl", [{"messages": msgs}]))
    t, stats = tokenize_examples(ex, tok, source_max_len=20, target_max_len=10, report=rep)
    assert t == [] and stats["dropped"] == 1 and "dropped because truncation left no response" in rep.summary()


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"instruction": "ok", "output": "fine"}, {"instruction": "no output"},
                                         {"instruction": "", "output": "x"}])
    ex, rep = load_examples(path)
    assert len(ex) == 1 and len(rep.skipped) == 2
    assert rep.skipped[0].startswith(f"{path}:2: missing or empty field 'output'")
    with pytest.raises(UserError, match=r"a.jsonl:2: missing or empty field 'output'.*--on-bad-row skip"):
        load_examples(path, on_bad_row="error")


@pytest.mark.parametrize("content,msg", [
    ("", "is empty: no rows"),
    ('{"question": "x", "answer": "y"}\n', r"keys \['answer', 'question'\] match no known format.*alpaca"),
    ('{"instruction": 1\n', "a.jsonl:1: not valid JSON"),
])
def test_bad_files(tmp_path, content, msg):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(UserError, match=msg):
        load_examples(str(tmp_path / "a.jsonl"))


def test_missing_path_and_all_rows_bad(tmp_path):
    with pytest.raises(UserError, match="not found: no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="all 1 were skipped"):
        load_examples(_write(tmp_path / "b.jsonl", [{"instruction": "x", "output": " "}]))


def test_csv_and_directory_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("instruction,input,output\nDo it,,Done\n")
    _write(tmp_path / "d" / "y.jsonl", [{"instruction": "Again", "output": "Yes"}])
    ex, rep = load_examples(str(tmp_path / "d"))
    assert len(ex) == 2 and rep.format == "alpaca" and ex[0].where.endswith("x.csv:2")


# -- batching --------------------------------------------------------------------------------------
def test_batch_order_is_deterministic_and_groups_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    a = batch_order(lengths, 4, seed=1, epoch=0)
    assert a == batch_order(lengths, 4, seed=1, epoch=0) and a != batch_order(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                        for b in batch_order(lengths, 4, seed=1, epoch=0, group_by_length=False)) / len(a)
    assert spread < random_spread / 5


def test_collate_pads_right_and_masks_labels():
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packing_gives_the_same_per_example_losses():
    """Packed sequences (position_ids restart, no attention mask) == each example alone. fp32, atol 1e-5."""
    from fourbit.loss import causal_lm_loss

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        exs.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})
    alone = sum(float(causal_lm_loss(model, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]),
                                     num_tokens=1)[0]) for e in exs)
    packs = pack_examples(exs, max_len=24)
    assert len(packs) == 2
    b = collate(packs, pad_id=0)
    packed, _ = causal_lm_loss(model, b["input_ids"], b["labels"], position_ids=b["position_ids"], num_tokens=1)
    assert float(packed) == pytest.approx(alone, abs=1e-4)


def test_split_eval():
    ex, _ = load_examples("builtin")
    train, held = split_eval(ex, 50)
    assert len(held) == 50 and all(e.split == "eval" for e in held) and all(e.split == "train" for e in train)


# -- the built-in task ----------------------------------------------------------------------------
def test_builtin_task_is_deterministic_and_held_out_values_are_unseen(tok):
    a, b = builtin_examples(), builtin_examples()
    assert [e.turns for e in a] == [e.turns for e in b] and len(a) == 2200
    train_answers = " ".join(reference_answer(e) for e in a if e.split == "train")
    for e in (e for e in a if e.split == "eval"):
        name = reference_answer(e).split(" | ")[0][len("name: "):]
        assert name not in train_answers
    p = prompt_text(a[0], tok)
    assert p.endswith("<|im_start|>assistant\n") and "Make a fourbit card:" in p


def test_score_builtin():
    assert score_builtin(["name: A | age: 3 | city: B\nextra", "wrong"], ["name: A | age: 3 | city: B", "x"]) == 0.5
