"""fourbit.data.formats: reading files, detecting formats on the real samples, file:line reports,
bad input. No tokenizer needed."""

import json
import sys
import types

import pytest

from conftest import SHARED_DATA, requires_shared_data
from fourbit.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, load_examples
from fourbit.errors import UserError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- the real samples ---------------------------------------------------------------------------------
@requires_shared_data
@pytest.mark.parametrize("rel,fmt,rows", [("alpaca/litgpt_fixture_alpaca.json", "alpaca", 23),
                                          ("alpaca/torchtune_alpaca_tiny.json", "alpaca", 100),
                                          ("alpaca/llamafactory_alpaca_en_demo.json", "alpaca", 999),
                                          ("guanaco/openassistant_best_replies_eval.jsonl", "oasst", 518),
                                          ("oasst/oa_questions.jsonl", "io", 953)])
def test_real_samples_are_detected(rel, fmt, rows):
    ex, report = load_examples(str(SHARED_DATA / rel))
    assert (report.format, report.rows, report.used, report.skipped) == (fmt, rows, rows, [])
    assert len(ex) == rows and all(e.turns[-1][0] == "assistant" for e in ex)


@requires_shared_data
def test_real_alpaca_rows_use_the_papers_templates():
    path = SHARED_DATA / "alpaca/torchtune_alpaca_tiny.json"
    raw = json.loads(path.read_text())
    ex, _ = load_examples(str(path))
    for r, e in zip(raw, ex):
        head = (ALPACA_WITH_INPUT if r["input"] else ALPACA_NO_INPUT).format(**r)
        assert e.turns == [("user", head), ("assistant", r["output"])]
    # torchtune's own "text" column is the no-input template without the space after "### Response:"
    no_input = [r for r in raw if not r["input"]][0]
    assert no_input["text"].startswith(ALPACA_NO_INPUT.format(**no_input).rstrip(" "))


def test_alpaca_templates_are_the_papers_exactly():
    """QLoRA's ALPACA_PROMPT_DICT, spelled out independently here."""
    assert ALPACA_WITH_INPUT.format(instruction="I", input="X") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nI\n\n### Input:\nX\n\n"
        "### Response: ")
    assert ALPACA_NO_INPUT.format(instruction="I") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nI\n\n### Response: ")


@requires_shared_data
def test_real_guanaco_turns_rebuild_the_text_and_every_reply_is_a_response():
    path = SHARED_DATA / "guanaco/openassistant_best_replies_eval.jsonl"
    raw = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    ex, _ = load_examples(str(path))
    for text, e in zip(raw, ex):
        rebuilt = "".join(t for _, t in e.turns)
        assert text.startswith(rebuilt) and "### Assistant:" not in text[len(rebuilt):]
        replies = [t for r, t in e.turns if r == "assistant"]
        assert len(replies) == text.count("### Assistant:")
        assert all("### Human:" not in r and "### Assistant:" not in r for r in replies)
        assert all(t.endswith("### Assistant:") for r, t in e.turns if r == "user")


# -- each format from small files -----------------------------------------------------------------------
def test_oasst_multi_turn_and_an_unanswered_last_question(tmp_path):
    text = "### Human: Hi### Assistant: Hello!### Human: Sum 2+2?### Assistant: 4.### Human: Thanks"
    ex, rep = load_examples(_jsonl(tmp_path / "o.jsonl", [{"text": text}]))
    assert rep.format == "oasst"
    assert ex[0].turns == [("user", "### Human: Hi### Assistant:"), ("assistant", " Hello!"),
                           ("user", "### Human: Sum 2+2?### Assistant:"), ("assistant", " 4.")]


def test_chat_messages_and_sharegpt_conversations(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    ex, rep = load_examples(_jsonl(tmp_path / "c.jsonl", rows))
    assert rep.format == "chat" and all(e.chat for e in ex)
    assert ex[0].turns == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]
    assert ex[1].turns == [("user", "Q"), ("assistant", "A")]


@pytest.mark.parametrize("row", [{"input": "q", "output": "a"}, {"prompt": "q", "completion": "a"},
                                 {"prompt": "q", "response": "a"}])
def test_io_pairs_and_their_aliases(tmp_path, row):
    ex, rep = load_examples(_jsonl(tmp_path / "io.jsonl", [row]))
    assert rep.format == "io" and ex[0].turns == [("user", "q"), ("assistant", "a")] and not ex[0].chat


def test_plain_text_and_format_override(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": "### Human: a### Assistant: b"}])
    ex, rep = load_examples(path, format="text")
    assert rep.format == "text" and [e.turns for e in ex] == [[("text", "Once upon a time.")],
                                                             [("text", "### Human: a### Assistant: b")]]
    ex, rep = load_examples(path, format="oasst", max_bad_fraction=1.0)
    assert rep.format == "oasst" and rep.used == 1 and "no '### Assistant:' reply" in rep.skipped[0]


def test_json_rows_are_reported_with_their_line(tmp_path):
    path = tmp_path / "a.json"
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "no output"}, {"instruction": "x", "output": ""}]
    path.write_text(json.dumps(rows, indent=2))  # rows start on lines 2, 6, 9
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    ex, rep = load_examples(str(path), max_bad_fraction=1.0)
    assert len(ex) == 1 and ex[0].where == f"{path}:{starts[0]}"
    assert rep.skipped == [f"{path}:{starts[1]}: missing or empty field 'output'",
                           f"{path}:{starts[2]}: missing or empty field 'output'"]


def test_json_object_holding_one_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"train": [{"input": "q", "output": "a"}], "version": 2}))
    ex, _ = load_examples(str(tmp_path / "d.json"))
    assert ex[0].where.endswith("d.json:train[0]")


def test_csv_lines_count_quoted_newlines(tmp_path):
    (tmp_path / "a.csv").write_text('instruction,input,output\n"two\nlines",,Done\nSecond,,\nThird,,Yes\n')
    ex, rep = load_examples(str(tmp_path / "a.csv"), max_bad_fraction=1.0)
    assert [e.where.rsplit(":", 1)[1] for e in ex] == ["2", "5"]
    assert rep.skipped == [f"{tmp_path / 'a.csv'}:4: missing or empty field 'output'"]
    assert ex[0].turns[0][1] == ALPACA_NO_INPUT.format(instruction="two\nlines")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet needs pyarrow (the 'data' extra)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": ["q1", "q2"], "output": ["a1", ""]}), tmp_path / "p.parquet")
    ex, rep = load_examples(str(tmp_path / "p.parquet"), max_bad_fraction=1.0)
    assert [e.turns for e in ex] == [[("user", "q1"), ("assistant", "a1")]]
    assert rep.skipped == [f"{tmp_path / 'p.parquet'}:row 2: missing or empty field 'output'"]


def test_directory_of_files_in_two_formats(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.csv").write_text("instruction,input,output\nDo it,,Done\n")
    _jsonl(tmp_path / "d" / "sub" / "y.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                              {"role": "assistant", "content": "Yo"}]}])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    ex, rep = load_examples(str(tmp_path / "d"))
    assert rep.format == "alpaca+chat" and rep.rows == 2 and [e.chat for e in ex] == [False, True]
    assert ex[0].where.endswith("a.csv:2") and ex[1].where.endswith("y.jsonl:1")


# -- hub names ---------------------------------------------------------------------------------------------
def test_hub_name_goes_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"instruction": "Hi", "output": "Hello"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ex, rep = load_examples("someone/some-set:validation")
    assert calls == [("someone/some-set", "validation")] and rep.format == "alpaca"
    assert ex[0].where == "someone/some-set:validation:row 1"


def test_hub_name_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(UserError, match=r"'someone/set' is not a local file or directory.*fourbit\[data\]"):
        load_examples("someone/set")

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(UserError, match="loading it from the hub failed.*ConnectionError: no network"):
        load_examples("someone/set")


def test_missing_local_paths_are_not_taken_for_hub_names(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    for p in (str(tmp_path / "nope.jsonl"), "data/train.jsonl", "a/b/c", "./x/y"):
        with pytest.raises(UserError, match="not found: no such file or directory"):
            load_examples(p)


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content,msg", [
    ("a.jsonl", "", "is empty: 1 file"),
    ("a.jsonl", "\n\n", "is empty"),
    ("a.json", "[]", "is empty"),
    ("a.jsonl", '{"question": "x", "answer": "y"}\n',
     r"keys \['answer', 'question'\] match no known format\. Known formats: alpaca .*chat .*--format"),
    ("a.jsonl", "[1, 2]\n", r"rows of type \['list'\] match no known format"),
    ("a.jsonl", '{"input": "q", "output": "a"}\n{"instruction": 1\n', r"a.jsonl:2: not valid JSON"),
    ("a.json", '[{"input": "q", "output": "a"},\n {"input": }]', r"a.json:2: not valid JSON"),
    ("a.json", '{"a": 1}', "expected a JSON list of objects"),
    ("a.txt", "hello", r"unsupported file type '.txt'; expected one of .json, .jsonl, .csv, .parquet"),
])
def test_bad_files(tmp_path, name, content, msg):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=msg):
        load_examples(str(tmp_path / name))


def test_not_utf8(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        load_examples(str(tmp_path / "a.jsonl"))


def test_empty_directory(tmp_path):
    with pytest.raises(UserError, match=r"holds no .json, .jsonl, .csv, .parquet files"):
        load_examples(str(tmp_path))


def test_bad_rows_skip_or_stop(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "ok", "output": "fine"}, {"instruction": "no output"},
                                         {"instruction": "  ", "output": "x"}, "a string"])
    ex, rep = load_examples(path, max_bad_fraction=1.0)
    assert len(ex) == 1 and rep.used == 1 and rep.rows == 4
    assert rep.skipped == [f"{path}:2: missing or empty field 'output'", f"{path}:3: missing or empty field "
                           f"'instruction'", f"{path}:4: expected an object with fields, got str"]
    assert "3 skipped (e.g. " in rep.summary() and rep.as_dict()["skipped"] == 3
    with pytest.raises(UserError, match=r"a.jsonl:2: missing or empty field 'output' \(as format alpaca\).*"
                                        r"--on-bad-row skip"):
        load_examples(path, on_bad_row="error")


def test_every_row_bad_and_wrong_override(tmp_path):
    with pytest.raises(UserError, match="all 1 rows were skipped, e.g. .*missing or empty field 'output'"):
        load_examples(_jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "output": " "}]))
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(UserError, match=r"\(format chat\): all 1 rows were skipped.*'messages'"):
        load_examples(alpaca, format="chat")


def test_bad_chat_messages_are_reported(tmp_path):
    rows = [{"messages": []}, {"messages": [{"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    ex, rep = load_examples(_jsonl(tmp_path / "c.jsonl", rows), max_bad_fraction=1.0)
    assert len(ex) == 1 and [s.split(": ", 1)[1] for s in rep.skipped] == [
        "missing or empty list 'messages'", "no assistant message in 'messages'",
        "messages[0] has role 'robot'; expected system, user or assistant",
        "messages[0] (user) has missing or empty content"]


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown format 'yaml'; expected auto or one of alpaca, oasst, chat, io"):
        load_examples("builtin", format="yaml")
    with pytest.raises(UserError, match="on_bad_row must be skip or error"):
        load_examples("builtin", on_bad_row="ignore")


# -- issue 12 item 7: nothing changed or dropped without a clear word ---------------------------------------
def test_format_detection_reads_every_row(tmp_path):
    """A row of another format after the first 20 is found, named by file:line."""
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(25)] + [{"input": "q", "output": "a"}]
    path = _jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(UserError, match=rf"a.jsonl: rows in 2 formats: alpaca \(25 rows, first .*a.jsonl:1\), "
                                        rf"io \(1 row, first .*a.jsonl:26\).*--format"):
        load_examples(path)


def test_a_file_mixing_formats_is_an_error_not_10_of_40_rows(tmp_path):
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(10)] + \
           [{"input": f"q{k}", "output": f"a{k}"} for k in range(30)]
    path = _jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(UserError, match=r"mixed.jsonl:11"):
        load_examples(path)
    # an explicit format parses every row as that format; the other rows are bad rows, counted
    with pytest.raises(UserError, match=r"30 of 40 rows .*skipped.*max_bad_fraction 5%; first: .*mixed.jsonl:11"):
        load_examples(path, format="alpaca")
    ex, rep = load_examples(path, format="alpaca", max_bad_fraction=1.0)
    assert (len(ex), rep.rows, rep.used, len(rep.skipped)) == (10, 40, 10, 30)
    assert "40 rows (alpaca) from" in rep.summary() and "10 used, 30 skipped" in rep.summary()


def test_plain_text_and_oasst_rows_are_two_formats(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": "### Human: a### Assistant: b"}])
    with pytest.raises(UserError, match=r"text \(1 row, first .*t.jsonl:1\), oasst \(1 row, first .*t.jsonl:2\)"):
        load_examples(path)


@pytest.mark.parametrize("row,field,got", [
    ({"instruction": "x", "input": ["w5", "w6"], "output": "y"}, "input", "list"),
    ({"instruction": "x", "input": {"a": 1}, "output": "y"}, "input", "dict"),
    ({"instruction": "x", "input": 3, "output": "y"}, "input", "int"),
    ({"instruction": "x", "output": float("nan")}, "output", "float"),
    ({"instruction": "x", "output": 42}, "output", "int"),
    ({"instruction": "x", "output": True}, "output", "bool"),
    ({"instruction": 7.5, "output": "y"}, "instruction", "float"),
])
def test_wrong_field_types_are_bad_rows_never_stringified(tmp_path, row, field, got):
    good = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(30)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:10] + [row] + good[10:]))  # json writes NaN
    with pytest.raises(UserError, match=rf"a.jsonl:11: field '{field}' must be text, got {got}"):
        load_examples(str(path), on_bad_row="error")
    ex, rep = load_examples(str(path), max_bad_fraction=0.1)
    assert len(ex) == 30 and rep.skipped == [f"{path}:11: field '{field}' must be text, got {got}"]
    assert not any("w5" in t or "nan" in t or "42" in t for e in ex for _, t in e.turns)


def test_chat_roles_and_contents_of_the_wrong_type_are_bad_rows(tmp_path):
    rows = [{"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    ex, rep = load_examples(_jsonl(tmp_path / "c.jsonl", rows), max_bad_fraction=1.0)
    assert len(ex) == 1 and [s.split(": ", 1)[1] for s in rep.skipped] == [
        "messages[0] has role ['user']; expected system, user or assistant",
        "messages[0] (user) content must be text, got int"]


def test_csv_rows_with_more_fields_than_the_header_are_bad_rows(tmp_path):
    """An unquoted comma would otherwise cut the output at the comma and drop the rest silently."""
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\n" + "".join(f"Do {k},,Done {k}\n" for k in range(20))
                    + "Greet,,Hello, world\n")
    ex, rep = load_examples(str(path), max_bad_fraction=0.1)
    assert len(ex) == 20 and rep.skipped == [f"{path}:22: 4 fields but the header names 3 (an unquoted comma "
                                             f"or quote?); quote fields that contain commas"]


@pytest.mark.parametrize("n_bad,ok", [(2, True), (3, False)])
def test_dropping_more_than_five_percent_of_rows_is_an_error(tmp_path, n_bad, ok):
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(40 - n_bad)] + \
           [{"instruction": "no output"}] * n_bad
    path = _jsonl(tmp_path / "a.jsonl", rows)
    if ok:  # 2 of 40 = 5%: allowed, and said
        ex, rep = load_examples(path)
        assert len(ex) == 38 and "38 used, 2 skipped" in rep.summary()
        return
    with pytest.raises(UserError, match=r"3 of 40 rows \(7.5%\) would be left out \(3 skipped as bad\), more than "
                                        r"max_bad_fraction 5%; first: .*a.jsonl:38: missing or empty field 'output'"):
        load_examples(path)
    ex, rep = load_examples(path, max_bad_fraction=0.1)
    assert len(ex) == 37 and rep.as_dict()["skipped"] == 3


def test_bad_fraction_argument_is_checked():
    with pytest.raises(UserError, match=r"max_bad_fraction must be between 0 and 1, got 1.5"):
        load_examples("builtin", max_bad_fraction=1.5)


# -- JSON lines written by a killed writer (issue 12 item 12) ------------------------------------------------
from fourbit.data.formats import iter_jsonl, partial_last_line, truncate_partial_line  # noqa: E402

_ROWS = [{"step": 1, "loss": 2.5}, {"question_id": "7", "text": "日本語 é"}, {"step": 3, "raw": "a\nb"}]


def _complete(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def test_every_cut_of_the_last_line_is_tolerated_reported_and_repaired(tmp_path):
    """A writer killed mid-line (at every byte of the record, inside UTF-8 characters too) leaves
    complete lines that read back, a partial tail that is reported, and a file that appends cleanly."""
    head, last = _complete(_ROWS[:2]), _complete(_ROWS[2:])
    path = tmp_path / "out.jsonl"
    for cut in range(1, len(last) - 1):  # the whole record but its "\n" is a complete line, see below
        path.write_bytes(head + last[:cut])
        with pytest.raises(UserError, match=rf"out.jsonl:3: not valid JSON.*partial last line"):
            list(iter_jsonl(path))
        assert [r for _, r in iter_jsonl(path, allow_partial_last=True)] == _ROWS[:2]
        tail = partial_last_line(path)
        assert (tail.line, tail.data) == (3, last[:cut])
        assert truncate_partial_line(path) == tail and path.read_bytes() == head
        with open(path, "a", encoding="utf-8") as f:  # the writer resumes
            f.write(json.dumps(_ROWS[2]) + "\n")
        assert [r for _, r in iter_jsonl(path)] == _ROWS
    assert partial_last_line(path) is None and truncate_partial_line(path) is None


def test_a_complete_last_line_without_its_newline_is_kept_and_ended(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(_complete(_ROWS)[:-1])
    assert [r for _, r in iter_jsonl(path)] == _ROWS and partial_last_line(path) is None
    assert truncate_partial_line(path) is None and path.read_bytes() == _complete(_ROWS)


@pytest.mark.parametrize("content,msg", [
    (b'{"a": 1}\n{"a": \n{"a": 3}\n{"a', r"out.jsonl:2: not valid JSON"),  # only the last line may be partial
    (b'{"a": 1}\n{"a": 2\n', r"out.jsonl:2: not valid JSON"),  # a line ended by "\n" was written whole
    (b'{"a": 1}\n{"a": "\xff"}\n', r"out.jsonl:2: not UTF-8 text"),
])
def test_only_the_last_line_may_be_partial(tmp_path, content, msg):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=msg):
        list(iter_jsonl(path, allow_partial_last=True))
    if content.endswith(b"\n"):
        assert partial_last_line(path) is None and truncate_partial_line(path) is None
        assert path.read_bytes() == content  # nothing is cut from a file whose lines are all complete


def test_objects_only(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n[1, 2]\n')
    assert [r for _, r in iter_jsonl(path)] == [{"a": 1}, [1, 2]]
    with pytest.raises(UserError, match=r"out.jsonl:2: expected a JSON object, got list"):
        list(iter_jsonl(path, objects=True))
