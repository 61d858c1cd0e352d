"""Evaluation: perplexity vs a float64 reference, MMLU prompt/scoring, Elo vs a float64 loop,
Bradley-Terry vs its likelihood optimum, judges (stub endpoint, scripted human), bad input."""

import http.server
import json
import math
import threading

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, requires_shared_data, tiny_model
from fourbit.errors import UserError
from fourbit.eval import (EndpointJudge, HumanJudge, bradley_terry, elo_orderings, elo_ratings, evaluate_mmlu,
                          parse_verdict, perplexity, read_judgments, run_judging)
from fourbit.eval.mmlu import build_prompt, choice_token_ids
from fourbit.commands.elo import table as format_table
from fourbit.eval.elo import random_orderings


class CharTokenizer:
    """A byte-level tokenizer with the interface the evaluators use (no files needed)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, None

    def __call__(self, text, return_tensors=None, add_special_tokens=True, **_):
        ids = [2 + (b % 250) for b in text.encode()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


# -- perplexity ----------------------------------------------------------------------------------
def _reference_nll(model, ids, max_length, stride):
    """float64 sliding-window NLL computed token by token from full logits."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + max_length, len(ids))
        logits = model(input_ids=ids[begin:end][None]).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in range(max(prev_end, begin + 1), end):
            total -= logp[t - begin - 1, ids[t]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return total / count, count


@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 8), (64, 64)])
def test_perplexity_matches_float64_reference(max_length, stride):
    model = tiny_model()
    tok = CharTokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 4
    r = perplexity(model, tok, text, max_length=max_length, stride=stride, progress=False)
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    nll, count = _reference_nll(model, ids, max_length, stride)
    assert r.tokens == count and (stride < max_length) == (count == len(ids) - 1)
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_bad_stride():
    with pytest.raises(ValueError, match="stride must be in"):
        perplexity(tiny_model(), CharTokenizer(), "abc" * 20, max_length=16, stride=32)


# -- MMLU ----------------------------------------------------------------------------------------
def _mmlu_dir(tmp_path, n=6):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        rows = [f"Question {i} of {split}?,one,two,three,four,{'ABCD'[i % 4]}" for i in range(n)]
        (tmp_path / split / f"toy_subject_{split}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_mmlu_prompt_format():
    row = ["What is 2+2?", "3", "4", "5", "6", "B"]
    p = build_prompt("high_school_math", [["1+1?", "2", "3", "4", "5", "A"]], row)
    assert p.startswith("The following are multiple choice questions (with answers) about high school math.\n\n")
    assert "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n" in p
    assert p.endswith("What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_mmlu_scores_equal_a_direct_argmax(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_model(vocab_size=len(tok))
    d = _mmlu_dir(tmp_path)
    r = evaluate_mmlu(model, tok, d, shots=2, batch_size=3, progress=False)
    ids = choice_token_ids(tok)
    from fourbit.eval.mmlu import read_subject

    dev, test = read_subject(d, "toy_subject", "dev")[:2], read_subject(d, "toy_subject", "test")
    hits = 0
    for row in test:  # one prompt at a time, no padding: the reference
        x = torch.tensor([tok(build_prompt("toy_subject", dev, row))["input_ids"]])
        hits += int(model(input_ids=x).logits[0, -1, ids].argmax()) == "ABCD".index(row[5])
    assert r.n == 6 and r.micro == hits / 6 and r.macro == r.subjects["toy_subject"]
    assert json.dumps(r.as_dict())


def test_mmlu_bad_input(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(UserError, match="does not exist"):
        evaluate_mmlu(tiny_model(vocab_size=len(tok)), tok, tmp_path / "nope")
    d = _mmlu_dir(tmp_path)
    with pytest.raises(UserError, match=r"unknown MMLU subject\(s\) \['astrology'\]"):
        evaluate_mmlu(tiny_model(vocab_size=len(tok)), tok, d, subjects=["astrology"])


@requires_shared_data
def test_mmlu_real_data_two_subjects(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    r = evaluate_mmlu(tiny_model(vocab_size=len(tok)), tok, SHARED_DATA / "mmlu",
                      subjects=["abstract_algebra", "anatomy"], limit=4, progress=False)
    assert r.n == 8 and set(r.subjects) == {"abstract_algebra", "anatomy"}


# -- Elo and Bradley-Terry ----------------------------------------------------------------------
def _write_judgments(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_elo_equals_a_plain_float64_loop(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"first": f"s{a}", "second": f"s{b}", "score": int(rng.integers(1, 4))}
            for a, b in rng.integers(0, 4, (60, 2)) if a != b]
    m = read_judgments([_write_judgments(tmp_path / "j.jsonl", rows)])
    batch = elo_orderings(m, orderings=5, seed=3)
    perm = random_orderings(np.random.default_rng(3), 5, len(m.s))  # elo_orderings draws the same block
    assert all(sorted(row) == list(range(len(m.s))) for row in perm.tolist())
    for o in range(5):  # replay ordering o one match at a time
        r = [1000.0] * len(m.players)
        for t in perm[o]:
            a, b, s = m.a[t], m.b[t], m.s[t]
            e = 1 / (1 + 10 ** ((r[b] - r[a]) / 400))
            r[a], r[b] = r[a] + 32 * (s - e), r[b] - 32 * (s - e)
        np.testing.assert_allclose(batch[o], r, rtol=0, atol=1e-9)


def test_bradley_terry_is_the_likelihood_maximum(tmp_path):
    rows = ([{"first": "a", "second": "b", "score": 1}] * 7 + [{"first": "a", "second": "b", "score": 2}] * 3 +
            [{"first": "b", "second": "c", "score": 1}] * 6 + [{"first": "c", "second": "b", "score": 3}] * 2 +
            [{"first": "a", "second": "c", "score": 1}] * 5 + [{"first": "c", "second": "a", "score": 1}] * 1)
    m = read_judgments([_write_judgments(tmp_path / "j.jsonl", rows)])
    bt = bradley_terry(m)

    def loglik(elo):
        q = 10 ** (np.asarray(elo) / 400)
        pa = q[m.a] / (q[m.a] + q[m.b])
        return float(np.sum(m.s * np.log(pa) + (1 - m.s) * np.log(1 - pa)))

    best = loglik(bt)
    for i in range(3):
        for d in (-1.0, 1.0):
            moved = bt.copy()
            moved[i] += d
            assert loglik(moved) < best
    assert bt.mean() == pytest.approx(1000)


@requires_shared_data
def test_elo_on_the_papers_judgments_reproduces_its_ranking():
    files = sorted(str(p) for p in (SHARED_DATA / "qlora_paper/ratings-gpt4/vicuna/pairwise").glob("*.jsonl"))
    res = elo_ratings(files, orderings=200, seed=0)
    top = list(res.ratings)
    assert top[0] == "answer-gpt4" and top[1].startswith("65b-guanaco") and top[-1].startswith("7b-guanaco")
    assert res.unreadable > 0 and res.matches + res.unreadable == 56 * 80
    lo, hi = res.ci95["answer-gpt4"]
    assert lo < res.ratings["answer-gpt4"] < hi


def test_unreadable_and_bad_lines_are_counted_not_fatal(tmp_path, capsys):
    from fourbit.commands.elo import run as elo_main

    p = tmp_path / "j.jsonl"
    p.write_text('{"first": "a", "second": "b", "score": 1}\n{"first": "a", "second": "b", "score": -1}\nnot json\n'
                 '{"first": "b", "second": "a", "score": 3}\n')
    assert elo_main([str(p), "--orderings", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["matches"] == 2 and out["unreadable"] == 1 and set(out["ratings"]) == {"a", "b"}
    assert set(out["ci95"]) == {"a", "b"}


# -- judges ----------------------------------------------------------------------------------------
def _answers(path, name, qids, text="answer"):
    path.write_text("".join(json.dumps({"question_id": q, "model_id": name, "prompt": f"q{q}?", "text": f"{text} {q}"})
                            + "\n" for q in qids))
    return str(path)


@pytest.mark.parametrize("text,verdict", [("long review...\n1", 1), ("x\n2", 2), ("3", 3), ("Assistant 1 is better", -1),
                                          ("", -1), ("score: 2.", 2)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


class _Stub(http.server.BaseHTTPRequestHandler):
    replies = []
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, self.headers["Authorization"], body))
        reply = _Stub.replies[len(_Stub.seen) - 1]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_endpoint_judge_against_a_local_stub_both_orders_and_resume(tmp_path, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    _Stub.replies, _Stub.seen = ["Review.\n1", "Review.\n2", "garbled", "Review.\n3"], []
    a, b = _answers(tmp_path / "a.jsonl", "alpha", [1, 2]), _answers(tmp_path / "b.jsonl", "beta", [1, 2])
    out = tmp_path / "j.jsonl"
    stats = run_judging(a, b, EndpointJudge("judge-x"), str(out))
    server.shutdown()
    assert stats.judged == 4 and stats.unreadable == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["first"], r["second"]) for r in rows] == [("alpha", "beta")] * 2 + [("beta", "alpha")] * 2
    assert [r["score"] for r in rows] == [1, 2, -1, 3]
    path, auth, body = _Stub.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer test-key" and body["model"] == "judge-x"
    assert "[The Start of Assistant 1's Answer]\nanswer 1" in body["messages"][1]["content"]
    again = run_judging(a, b, EndpointJudge("judge-x"), str(out))  # everything already judged
    assert again.judged == 0 and again.skipped_existing == 4
    m = read_judgments([str(out)])
    assert len(m.s) == 3 and m.unreadable == 1


def test_human_judge_is_resumable_and_loses_nothing_on_quit(tmp_path):
    a, b = _answers(tmp_path / "a.jsonl", "alpha", [1, 2]), _answers(tmp_path / "b.jsonl", "beta", [1, 2])
    out = tmp_path / "j.jsonl"
    keys = iter(["1", "x", "2", "q"])
    shown = []
    with pytest.raises(KeyboardInterrupt):
        run_judging(a, b, HumanJudge(read=lambda _: next(keys), write=shown.append), str(out))
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [1, 2]
    assert any("answer 1" in s for s in shown)
    keys = iter(["3", "3"])
    s = run_judging(a, b, HumanJudge(read=lambda _: next(keys), write=lambda *_: None), str(out))
    assert s.judged == 2 and s.skipped_existing == 2 and len(out.read_text().splitlines()) == 4


def test_answer_files_with_different_questions_are_refused(tmp_path):
    a, b = _answers(tmp_path / "a.jsonl", "alpha", [1, 2, 3]), _answers(tmp_path / "b.jsonl", "beta", [1, 2, 4])
    with pytest.raises(UserError, match=r"only in .*a.jsonl: \['3'\]; only in .*b.jsonl: \['4'\]"):
        run_judging(a, b, HumanJudge(), str(tmp_path / "j.jsonl"))


# -- files left by a killed writer, and lines that are not objects (issue 12 items 12, 13) -----------------
class _FixedJudge:
    name = "fixed"

    def __init__(self):
        self.calls = 0

    def __call__(self, system, user):
        self.calls += 1
        return "Review.\n1"


def test_judging_resumes_after_a_writer_killed_mid_line(tmp_path):
    a, b = _answers(tmp_path / "a.jsonl", "alpha", [1, 2]), _answers(tmp_path / "b.jsonl", "beta", [1, 2])
    out = tmp_path / "j.jsonl"
    run_judging(a, b, _FixedJudge(), str(out))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # killed while writing the third judgment
    judge = _FixedJudge()
    stats = run_judging(a, b, judge, str(out))
    assert (stats.judged, stats.skipped_existing, judge.calls) == (2, 2, 2)
    assert stats.partial_line is not None and stats.partial_line.line == 3 and "partial last line" in \
        str(stats.partial_line)
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole again
    assert len(rows) == 4 and {(r["question_id"], r["first"]) for r in rows} == \
        {("1", "alpha"), ("2", "alpha"), ("1", "beta"), ("2", "beta")}


def test_answer_question_and_prompt_files_with_non_object_lines(tmp_path):
    from fourbit.generate import read_prompts

    a = _answers(tmp_path / "a.jsonl", "alpha", [1, 2])
    with open(a, "a") as f:
        f.write("5\n")
    b = _answers(tmp_path / "b.jsonl", "beta", [1, 2])
    with pytest.raises(UserError, match=r"a.jsonl:3: expected a JSON object, got int"):
        run_judging(a, b, _FixedJudge(), str(tmp_path / "j.jsonl"))
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "turns": ["Hi?"]}\n["not", "an", "object"]\n')
    with pytest.raises(UserError, match=r"q.jsonl:2: expected a JSON object, got list"):
        run_judging(_answers(tmp_path / "a2.jsonl", "alpha", [1]), _answers(tmp_path / "b2.jsonl", "beta", [1]),
                    _FixedJudge(), str(tmp_path / "j2.jsonl"), questions=str(tmp_path / "q.jsonl"))
    with pytest.raises(UserError, match=r"question file .*nope.jsonl does not exist"):
        run_judging(_answers(tmp_path / "a2.jsonl", "alpha", [1]), _answers(tmp_path / "b2.jsonl", "beta", [1]),
                    _FixedJudge(), str(tmp_path / "j2.jsonl"), questions=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=r"q.jsonl:2: expected a JSON object, got list"):
        read_prompts(str(tmp_path / "q.jsonl"))


# -- Elo input that is not what it should be (issue 12 item 9) -----------------------------------------------
def _j(first, second, score):
    return {"first": first, "second": second, "score": score}


def test_a_system_playing_itself_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    rows = [_j(f"s{a}", f"s{b}", int(rng.integers(1, 4))) for a, b in rng.integers(0, 3, (40, 2)) if a != b]
    clean = elo_ratings([_write_judgments(tmp_path / "clean.jsonl", rows)], orderings=50, seed=0)
    mixed = rows[:5] + [_j("s0", "s0", 1), _j("s1", "s1", 2)] + rows[5:] + [_j("s2", "s2", 3)]
    res = elo_ratings([_write_judgments(tmp_path / "mixed.jsonl", mixed)], orderings=50, seed=0)
    assert res.self_play == 3 and res.matches == clean.matches and "3 self-play rows skipped" in format_table(res)
    assert res.ratings == clean.ratings and res.bradley_terry == clean.bradley_terry  # as if never there


def test_malformed_lines_are_counted_with_where_they_are(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text('{"first": "a", "second": "b", "score": 1}\n'
                 'not json\n'
                 '[1, 2]\n'
                 '{"first": "a", "second": "b"}\n'
                 '{"first": "a", "second": "b", "score": 7}\n'
                 '{"first": "b", "second": "a", "score": 3}\n'
                 '{"first": "a", "second": "b", "score": -1}\n'
                 '{"first": "b", "second": "a", "sco')  # a judge killed mid-line
    res = elo_ratings([str(p)], orderings=20)
    assert (res.matches, res.unreadable, res.bad_lines) == (2, 1, 5)
    assert res.bad_examples == [f"{p}:2: not valid JSON (Expecting value, column 1)",
                                f"{p}:3: expected a JSON object, got list", f"{p}:4: no score",
                                f"{p}:5: score 7 is not 1, 2, 3 or -1",
                                f"{p}:8: a partial last line (a writer killed mid-line?)"]
    assert res.as_dict()["bad_lines"] == 5 and f"5 malformed lines skipped (first: {p}:2: not valid JSON" in \
        format_table(res)


def test_one_system_winning_every_match_has_elo_but_no_bradley_terry(tmp_path):
    rows = [_j("champ", "b", 1), _j("c", "champ", 2), _j("b", "c", 3), _j("c", "b", 1), _j("champ", "c", 1)]
    res = elo_ratings([_write_judgments(tmp_path / "j.jsonl", rows)], orderings=50)
    assert list(res.ratings)[0] == "champ" and res.bradley_terry is None
    assert res.bradley_terry_note == "no finite Bradley-Terry solution: champ won every match"
    table = format_table(res)
    assert "no finite Bradley-Terry solution: champ won every match" in table
    assert json.loads(json.dumps(res.as_dict()))["bradley_terry"] is None
    rows = [_j("a", "b", 1), _j("b", "a", 1), _j("c", "d", 1), _j("d", "c", 3)]  # two groups that never met
    res = elo_ratings([_write_judgments(tmp_path / "k.jsonl", rows)], orderings=20)
    assert res.bradley_terry is None and "never scored against" in res.bradley_terry_note


@requires_shared_data
def test_the_papers_ratings_are_unchanged_by_noise_around_them(tmp_path):
    """Self-play rows, malformed lines and a partial last line added to the paper's files change nothing."""
    files = sorted((SHARED_DATA / "qlora_paper/ratings-gpt4/vicuna/pairwise").glob("*.jsonl"))
    clean = elo_ratings([str(f) for f in files], orderings=100, seed=0)
    noisy = tmp_path / "noise.jsonl"
    noisy.write_text('{"first": "answer-gpt4", "second": "answer-gpt4", "score": 1}\n[1]\n{"first": "x", "sec')
    res = elo_ratings([str(f) for f in files] + [str(noisy)], orderings=100, seed=0)
    assert res.ratings == clean.ratings and res.bradley_terry == clean.bradley_terry and res.ci95 == clean.ci95
    assert (res.self_play, res.bad_lines, res.matches) == (1, 2, clean.matches)


def test_elo_with_no_orderings_is_an_error_not_nan(tmp_path):
    with pytest.raises(UserError, match="orderings must be >= 1, got 0"):
        elo_ratings([_write_judgments(tmp_path / "j.jsonl", [_j("a", "b", 1)])], orderings=0)
