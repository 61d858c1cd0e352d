"""fourbit.data.tokenize: labels masked exactly where they should be (checked by decoding the
label spans with the SmolLM2 tokenizer), multi-turn, chat templates, EOS/BOS, truncation counts."""

import json

import pytest

from conftest import SHARED_DATA, requires_shared_data
from fourbit.data import IGNORE, DataReport, Example, load_examples, prompt_text, tokenize_examples
from fourbit.errors import UserError


def _tokenizer(path, template="keep"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if template != "keep":
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return _tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def bos_tok(smollm2_dir):
    """SmolLM2's tokenizer made to add a BOS (<|endoftext|>, id 0) like Llama's does."""
    from tokenizers.processors import TemplateProcessing

    t = _tokenizer(smollm2_dir)
    t._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                     special_tokens=[("<|endoftext|>", 0)])
    t.bos_token = "<|endoftext|>"
    assert t("x")["input_ids"] == [0, 104]
    return t


def _trained(tok, t):
    """The decoded text of the labelled tokens (position 0 is never predicted, so it must be -100)."""
    assert t["labels"][0] == IGNORE or t["labels"] == t["input_ids"]
    return tok.decode([x for x in t["labels"] if x != IGNORE])


def _spans(t):
    """Runs of labelled positions as (start, end) pairs."""
    out, start = [], None
    for i, lab in enumerate(t["labels"] + [IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_alpaca_labels_are_the_response_plus_eos(tmp_path, tok):
    ex, _ = load_examples(_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add the numbers.", "input": "2 and 3",
                                                         "output": "5"},
                                                        {"instruction": "Say hi.", "input": "", "output": "Hi!"}]))
    t, stats = tokenize_examples(ex, tok)
    assert [_trained(tok, x) for x in t] == ["5<|im_end|>", "Hi!<|im_end|>"]
    assert tok.decode(t[0]["input_ids"]) == ex[0].turns[0][1] + "5<|im_end|>"
    assert all(x["labels"][i] == x["input_ids"][i] for x in t for i, lab in enumerate(x["labels"]) if lab != IGNORE)
    assert stats["trained_tokens"] == sum(len(tok(r)["input_ids"]) + 1 for r in ("5", "Hi!"))


@requires_shared_data
def test_real_guanaco_labels_are_every_reply_plus_eos(tok):
    ex, _ = load_examples(str(SHARED_DATA / "guanaco/openassistant_best_replies_eval.jsonl"))
    ex = [e for e in ex if len(e.turns) >= 4][:20]  # multi-turn conversations
    t, stats = tokenize_examples(ex, tok, source_max_len=4096, target_max_len=4096)
    assert len(t) == 20 and stats["truncated"] == 0
    for e, x in zip(ex, t):
        replies = [text for r, text in e.turns if r == "assistant"]
        assert len(_spans(x)) == len(replies)
        for (a, b), reply in zip(_spans(x), replies):
            assert tok.decode(x["input_ids"][a:b]) == reply + "<|im_end|>"
        assert tok.decode(x["input_ids"]) == "".join(text + ("<|im_end|>" if r == "assistant" else "")
                                                     for r, text in e.turns)


def test_oasst_multi_turn_trains_every_assistant_turn(tmp_path, tok):
    ex, _ = load_examples(_jsonl(tmp_path / "o.jsonl", [{"text": "### Human: Hi there### Assistant: Hello!"
                                                                 "### Human: How are you?### Assistant: Fine."}]))
    t, _ = tokenize_examples(ex, tok)
    assert [tok.decode(t[0]["input_ids"][a:b]) for a, b in _spans(t[0])] == [" Hello!<|im_end|>", " Fine.<|im_end|>"]


def test_chat_template_masks_system_and_user_turns(tmp_path, tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid."}]
    ex, _ = load_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]))
    t, _ = tokenize_examples(ex, tok)
    assert tok.decode(t[0]["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    assert [tok.decode(t[0]["input_ids"][a:b]) for a, b in _spans(t[0])] == ["Paris.<|im_end|>\n",
                                                                              "Madrid.<|im_end|>\n"]
    # the tokens before each reply are exactly the generation prompt the template gives
    a, _ = _spans(t[0])[1]
    assert tok.decode(t[0]["input_ids"][:a]) == tok.apply_chat_template(msgs[:4], tokenize=False,
                                                                        add_generation_prompt=True)


def test_chat_default_system_prompt_is_masked(tok):
    ex = [Example([("user", "Hi"), ("assistant", "Hello")], chat=True)]
    t, _ = tokenize_examples(ex, tok)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(t[0]["input_ids"])
    assert _trained(tok, t[0]) == "Hello<|im_end|>\n"


def test_prompt_text_is_what_precedes_the_last_response(tmp_path, bos_tok, tok):
    rows = [{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                          {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    chat, _ = load_examples(_jsonl(tmp_path / "c.jsonl", rows))
    oasst, _ = load_examples(_jsonl(tmp_path / "o.jsonl", [{"text": "### Human: Q1### Assistant: A1"
                                                                    "### Human: Q2### Assistant: A2"}]))
    alpaca, _ = load_examples(_jsonl(tmp_path / "a.jsonl", [{"instruction": "Do", "input": "x", "output": "y"}]))
    for t in (tok, bos_tok):
        for ex in (chat, oasst, alpaca):
            x = tokenize_examples(ex, t)[0][0]
            start = _spans(x)[-1][0]
            assert t(prompt_text(ex[0], t), add_special_tokens=not ex[0].chat)["input_ids"] == x["input_ids"][:start]


def test_a_tokenizer_without_chat_template_gets_the_oasst_layout(smollm2_dir):
    t = _tokenizer(smollm2_dir, template=None)
    ex = [Example([("system", "Be nice."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"),
                   ("assistant", "See you")], chat=True)]
    rep = DataReport()
    x = tokenize_examples(ex, t, report=rep)[0][0]
    assert t.decode(x["input_ids"]) == ("Be nice.\n\n### Human: Hi### Assistant: Hello<|im_end|>"
                                        "### Human: Bye### Assistant: See you<|im_end|>")
    assert [t.decode(x["input_ids"][a:b]) for a, b in _spans(x)] == [" Hello<|im_end|>", " See you<|im_end|>"]
    assert "no chat template" in rep.notes[0] and "no chat template" in rep.summary()
    assert prompt_text(ex[0], t) == ("Be nice.\n\n### Human: Hi### Assistant: Hello<|im_end|>"
                                     "### Human: Bye### Assistant:")


def test_a_template_without_end_of_turn_gets_eos(smollm2_dir):
    t = _tokenizer(smollm2_dir, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                                "{% if add_generation_prompt %}assistant:{% endif %}")
    x = tokenize_examples([Example([("user", "q"), ("assistant", "a")], chat=True)], t)[0][0]
    assert t.decode(x["input_ids"]) == "user: q\nassistant: a\n<|im_end|>" and _trained(t, x) == " a\n<|im_end|>"


def test_a_template_that_rewrites_history_is_refused_with_the_reason(smollm2_dir):
    t = _tokenizer(smollm2_dir, "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m.role }}: "
                                "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    ex = [Example([("user", "q"), ("assistant", "a")], chat=True, where="f.jsonl:7")]
    with pytest.raises(UserError, match=r"all 1 examples were skipped, e.g. f.jsonl:7: the chat template does "
                                        r"not render this conversation incrementally.*--format oasst or io"):
        tokenize_examples(ex, t)
    rep = DataReport(used=2)
    t.chat_template = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}" \
                      "{% endif %}{% if m.role == 'assistant' %}A:{% endif %}{{ m.content }}<|im_end|>{% endfor %}" \
                      "{% if add_generation_prompt %}A:{% endif %}"
    out, _ = tokenize_examples([Example([("system", "s"), ("user", "q"), ("assistant", "a")], chat=True, where="w:1"),
                                Example([("user", "q"), ("assistant", "a")], chat=True, where="w:2")], t, report=rep)
    assert len(out) == 1 and rep.used == 1 and "no system" in rep.skipped[0]
    assert rep.skipped[0].startswith("w:1: the tokenizer's chat template refused this conversation")


def test_bos_is_added_once_and_never_labelled(tmp_path, bos_tok):
    ex, _ = load_examples(_jsonl(tmp_path / "io.jsonl", [{"input": "question", "output": "answer"}]))
    x = tokenize_examples(ex, bos_tok)[0][0]
    assert x["input_ids"][:1] == [0] and x["input_ids"].count(0) == 1 and _trained(bos_tok, x) == "answer<|im_end|>"


def test_train_on_inputs_keeps_every_label(tmp_path, tok):
    ex, _ = load_examples(_jsonl(tmp_path / "io.jsonl", [{"input": "question", "output": "answer"}]))
    t, _ = tokenize_examples(ex, tok, train_on_inputs=True)
    assert t[0]["labels"] == t[0]["input_ids"] and tok.decode(t[0]["input_ids"]) == "questionanswer<|im_end|>"


def test_plain_text_is_chunked_with_eos_and_fully_trained(tmp_path, bos_tok):
    text = " ".join(f"w{i}" for i in range(300))
    ex, rep = load_examples(_jsonl(tmp_path / "t.jsonl", [{"text": text}, {"text": "short"}]))
    t, stats = tokenize_examples(ex, bos_tok, source_max_len=64, target_max_len=64, report=rep)
    whole = bos_tok(text)["input_ids"] + [bos_tok.eos_token_id]
    n_chunks = -(-len(whole) // 128)
    assert len(t) == n_chunks + 1 and [x["input_ids"] for x in t[:n_chunks]] == \
        [whole[i:i + 128] for i in range(0, len(whole), 128)]
    assert all(x["labels"] == x["input_ids"] for x in t) and stats["truncated"] == 0
    assert "1 text rows longer than 128 tokens were split" in rep.summary()


# -- truncation ---------------------------------------------------------------------------------------------
def test_single_turn_truncation_keeps_the_prompt_end_and_the_response_start(tmp_path, tok, bos_tok):
    rows = [{"input": "start " + "long prompt " * 50 + "END:", "output": "first " + "long answer " * 50},
            {"input": "q", "output": "a"}]
    ex, rep = load_examples(_jsonl(tmp_path / "io.jsonl", rows))
    t, stats = tokenize_examples(ex, tok, source_max_len=16, target_max_len=8, report=rep)
    assert stats["truncated"] == 1 and rep.truncated == 1 and len(t) == 2 and rep.used == 2
    prompt = [i for i, lab in zip(t[0]["input_ids"], t[0]["labels"]) if lab == IGNORE]
    assert len(prompt) == 16 and tok.decode(prompt).endswith("long prompt END:")
    assert _trained(tok, t[0]).startswith("first long") and len(t[0]["input_ids"]) == 24
    n_prompt, n_resp = len(tok(rows[0]["input"])["input_ids"]), len(tok(rows[0]["output"])["input_ids"]) + 1
    assert rep.truncated_examples == [f"{ex[0].where}: prompt cut from {n_prompt} to 16 tokens (kept the end), "
                                      f"response cut from {n_resp} to 8 tokens"]
    assert "1 truncated (e.g." in rep.summary()
    x = tokenize_examples(ex, bos_tok, source_max_len=16, target_max_len=8)[0][0]
    assert x["input_ids"][0] == 0 and x["input_ids"][1:].count(0) == 0 and len(x["input_ids"]) == 24


def test_multi_turn_truncation_counts_cut_replies(tmp_path, tok):
    text = "### Human: Hi### Assistant: Hello there, friend.### Human: More?### Assistant: " + "yes " * 40
    ex, rep = load_examples(_jsonl(tmp_path / "o.jsonl", [{"text": text}]))
    t, stats = tokenize_examples(ex, tok, source_max_len=20, target_max_len=10, report=rep)
    assert len(t[0]["input_ids"]) == 30 and stats["truncated"] == 1
    assert tok.decode(t[0]["input_ids"][slice(*_spans(t[0])[0])]) == " Hello there, friend.<|im_end|>"
    assert "(1 of 2 replies cut or dropped)" in rep.truncated_examples[0]


def test_an_example_truncated_away_is_dropped_and_reported(tmp_path, tok):
    msgs = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}] * 2
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ex, rep = load_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, {"messages": ok}]), max_bad_fraction=1)
    t, stats = tokenize_examples(ex, tok, source_max_len=20, target_max_len=10, report=rep)
    assert len(t) == 1 and stats["dropped"] == 1 and rep.used == 1 and rep.dropped_truncated == 1
    assert rep.dropped_examples[0].startswith(f"{ex[0].where}: no response token left (conversation cut from")
    assert "--source-max-len or --target-max-len (now 20/10)" in rep.summary()
    with pytest.raises(UserError, match=r"no training examples left: all 1 examples were dropped because "
                                        r"truncation left no response, e.g. .*c.jsonl:1: no response token left "
                                        r".*--source-max-len"):
        tokenize_examples(ex[:1], tok, source_max_len=20, target_max_len=10)


def test_no_eos_token_is_an_error(smollm2_dir):
    t = _tokenizer(smollm2_dir)
    t.eos_token = None
    with pytest.raises(UserError, match="no EOS token"):
        tokenize_examples([Example([("user", "q"), ("assistant", "a")])], t)


# -- the model's context (issue 12 item 7) -------------------------------------------------------------------
def test_sequences_are_cut_to_the_models_context_and_counted(tmp_path, tok):
    long_in, long_out = "start " + "long prompt " * 60 + "END:", "first " + "long answer " * 60
    rows = [{"input": long_in, "output": long_out}, {"input": "q", "output": "a"},
            {"input": "short question:", "output": long_out}]
    ex, rep = load_examples(_jsonl(tmp_path / "io.jsonl", rows))
    t, stats = tokenize_examples(ex, tok, source_max_len=512, target_max_len=512, context_len=32, report=rep)
    assert len(t) == 3 and all(len(x["input_ids"]) <= 32 for x in t) and rep.used == 3
    p_ids, r_ids = tok(long_in)["input_ids"], tok(long_out)["input_ids"] + [tok.eos_token_id]
    # both long: the response keeps half the context (its start), the prompt the rest (its end)
    assert t[0]["input_ids"] == p_ids[-16:] + r_ids[:16] and t[0]["labels"] == [IGNORE] * 16 + r_ids[:16]
    assert t[1]["input_ids"] == tok("q")["input_ids"] + tok("a")["input_ids"] + [tok.eos_token_id]
    short = tok("short question:")["input_ids"]  # a short prompt is kept whole, the response fills the rest
    assert t[2]["input_ids"] == short + r_ids[:32 - len(short)]
    assert stats["truncated"] == rep.truncated == 2 and rep.context_truncated == 2 and rep.context_len == 32
    assert f"{ex[0].where}: cut from {len(p_ids) + len(r_ids)} to the model's context of 32 tokens" in \
        rep.truncated_examples[0]
    assert "2 truncated (2 to the model's context of 32 tokens)" in rep.summary()
    assert rep.as_dict()["context_truncated"] == 2


def test_context_bounds_multi_turn_and_text_chunks(tmp_path, tok):
    text = "### Human: Hi### Assistant: Hello there, friend.### Human: More?### Assistant: " + "yes " * 40
    ex, rep = load_examples(_jsonl(tmp_path / "o.jsonl", [{"text": text}]))
    t, _ = tokenize_examples(ex, tok, source_max_len=512, target_max_len=512, context_len=24, report=rep)
    assert len(t[0]["input_ids"]) == 24 and rep.context_truncated == 1
    doc = " ".join(f"w{i}" for i in range(100))
    ex, rep = load_examples(_jsonl(tmp_path / "t.jsonl", [{"text": doc}]))
    t, _ = tokenize_examples(ex, tok, source_max_len=512, target_max_len=512, context_len=40, report=rep)
    whole = tok(doc)["input_ids"] + [tok.eos_token_id]
    assert [x["input_ids"] for x in t] == [whole[i:i + 40] for i in range(0, len(whole), 40)]
    assert "longer than 40 tokens were split" in rep.summary()
    with pytest.raises(UserError, match="context_len must be >= 2, got 0"):
        tokenize_examples(ex, tok, context_len=0)


def test_dropping_too_many_examples_in_tokenization_is_an_error(tmp_path, tok):
    msgs = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}] * 2
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ex, rep = load_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}] + [{"messages": ok}] * 9))
    with pytest.raises(UserError, match=r"1 of 10 rows \(10%\) would be left out \(1 emptied by truncation\), more "
                                        r"than max_bad_fraction 5%; first: .*c.jsonl:1: no response token left"):
        tokenize_examples(ex, tok, source_max_len=20, target_max_len=10, report=rep)
