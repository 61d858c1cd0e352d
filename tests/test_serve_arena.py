"""The arena's bookkeeping: pairs, per-rater order and placement, idempotent appends, read-back, Elo.

Oracles: `fourbit elo`'s own reader and ratings (`read_judgments`, `elo_ratings`) on the file the
arena wrote, and counting rows. No model is needed: answers come from files."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_DATA, requires_shared_data

from fourbit.errors import UserError
from fourbit.eval.elo import elo_ratings, read_judgments
from fourbit.serve.arena import Arena
from fourbit.serve.protocol import ApiError


def answer_file(path: Path, model: str, qids) -> str:
    rows = [{"question_id": q, "model_id": model, "prompt": f"Question {q}?", "text": f"{model} answers {q}"}
            for q in qids]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    return [answer_file(tmp_path / f"{m}.jsonl", m, range(1, 5)) for m in ("red", "green", "blue")]


def test_pairs_cover_every_question_and_system_pair_and_each_rater_sees_each_once(files, tmp_path):
    arena = Arena(tmp_path / "j.jsonl", files)
    assert len(arena.pairs) == 4 * 3  # 4 questions x C(3, 2) system pairs
    seen = []
    for _ in range(len(arena.pairs)):
        nxt = asyncio.run(arena.next_pair("ann"))
        i = nxt["pair"]
        left, right = arena.placement("ann", i)
        assert nxt["a"] == f"{left} answers {arena.pairs[i].question_id}" and nxt["b"].startswith(right)
        arena.judge("ann", i, "A", f"key-ann-{i:04d}")
        seen.append(i)
    assert sorted(seen) == list(range(12)) and asyncio.run(arena.next_pair("ann"))["done"]
    assert arena.order("bob") != arena.order("ann")  # each rater has an order of their own
    flips = Counter(arena.placement("bob", i) == arena.pairs[i].systems for i in range(12))
    assert flips[True] and flips[False]  # both placements occur


def test_rows_are_what_fourbit_elo_reads(files, tmp_path):
    arena = Arena(tmp_path / "j.jsonl", files[:2])  # two systems: with a tie, Bradley-Terry's MLE exists
    for i, choice in zip(arena.order("ann")[:3], ["A", "B", "tie"]):
        left, right = arena.placement("ann", i)
        row, created = arena.judge("ann", i, choice, f"k-{i:06d}")
        assert created and (row["first"], row["second"]) == (left, right)
        assert row["score"] == {"A": 1, "B": 2, "tie": 3}[choice] and row["judge"] == "human"
    m = read_judgments([str(arena.path)])
    assert len(m.s) == 3 and sorted(m.s.tolist()) == [0.0, 0.5, 1.0]
    board = arena.leaderboard()
    res = elo_ratings([str(arena.path)])
    assert {r["system"]: r["elo"] for r in board["systems"]} == pytest.approx(res.ratings, abs=1e-9)
    assert sum(r["wins"] + r["ties"] + r["losses"] for r in board["systems"]) == 2 * 3
    assert {r["system"]: r["bradley_terry"] for r in board["systems"]} == pytest.approx(res.bradley_terry)


def test_leaderboard_without_a_bradley_terry_estimate(files, tmp_path):
    """One judgment: the winner never lost, so no MLE exists; Elo is still shown, BT blank."""
    arena = Arena(tmp_path / "j.jsonl", files)
    assert arena.leaderboard()["systems"] == []  # no file yet
    arena.judge("ann", 0, "A", "only-key-1")
    board = arena.leaderboard()
    assert [r["bradley_terry"] for r in board["systems"]] == [None, None]
    assert board["systems"][0]["elo"] == pytest.approx(1016.0) and board["systems"][0]["wins"] == 1


def test_a_retry_with_the_same_key_is_recorded_once_and_a_second_verdict_is_refused(files, tmp_path):
    arena = Arena(tmp_path / "j.jsonl", files)
    i = arena.order("ann")[0]
    first, created = arena.judge("ann", i, "B", "same-key-1")
    again, created_again = arena.judge("ann", i, "B", "same-key-1")
    assert created and not created_again and again == first
    with pytest.raises(ApiError) as e:
        arena.judge("ann", i, "A", "other-key-2")
    assert e.value.status == 409 and e.value.code == "already_judged"
    with pytest.raises(ApiError) as e:
        arena.judge("ann", arena.order("ann")[1], "A", "same-key-1")  # a key reused for another judgment
    assert e.value.status == 409 and e.value.code == "key_reused"
    assert len(arena.path.read_text().splitlines()) == 1


def test_concurrent_raters_lose_and_duplicate_nothing(files, tmp_path):
    """Four raters x twelve pairs, every judgment sent twice (a retry), from eight threads at once."""
    arena = Arena(tmp_path / "j.jsonl", files)
    raters = ["ann", "bob", "cy", "dee"]
    jobs = [(r, i, f"{r}-key-{i:03d}") for r in raters for i in range(12)] * 2
    barrier = threading.Barrier(8)

    def work(chunk):
        barrier.wait()
        for r, i, key in chunk:
            arena.judge(r, i, "tie" if i % 3 == 0 else "A", key)

    threads = [threading.Thread(target=work, args=(jobs[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [json.loads(line) for line in arena.path.read_text().splitlines()]
    assert len(rows) == 48 and len({r["key"] for r in rows}) == 48
    assert Counter(r["rater"] for r in rows) == {r: 12 for r in raters}


def test_a_restarted_server_continues_where_each_rater_stopped(files, tmp_path):
    path = tmp_path / "j.jsonl"
    arena = Arena(path, files)
    done = arena.order("ann")[:5]
    for i in done:
        arena.judge("ann", i, "A", f"ann-{i:05d}")
    with open(path, "a") as f:
        f.write('{"question_id": "1", "first": "red", "sec')  # a crash mid-line
    again = Arena(path, files)
    assert again.progress("ann") == (5, 12) and again.skipped_lines == 1
    assert asyncio.run(again.next_pair("ann"))["pair"] not in done
    with pytest.raises(ApiError):
        again.judge("ann", done[0], "B", "fresh-key-1")
    again.judge("ann", again.order("ann")[5], "B", "fresh-key-2")
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["key"] == "fresh-key-2"  # the cut line did not swallow it


def test_bad_input_is_refused_by_name(files, tmp_path):
    arena = Arena(tmp_path / "j.jsonl", files)
    for args, param in [(("bad rater!", 0, "A", "kkkkkkkk"), "rater"), (("ann", 99, "A", "kkkkkkkk"), "pair"),
                        (("ann", 0, "left", "kkkkkkkk"), "choice"), (("ann", 0, "A", "short"), "key")]:
        with pytest.raises(ApiError) as e:
            arena.judge(*args)
        assert e.value.status == 400 and e.value.param == param
    with pytest.raises(UserError, match="at least two systems"):
        Arena(tmp_path / "j.jsonl", files[:1])
    with pytest.raises(UserError, match="--questions"):
        Arena(tmp_path / "j.jsonl", [files[0], "live:base"])


@requires_shared_data
def test_vicuna_reference_answers_with_the_question_file(tmp_path):
    vicuna = SHARED_DATA / "vicuna"
    arena = Arena(tmp_path / "j.jsonl", [str(vicuna / "answers" / "answer_gpt35.jsonl"),
                                         str(vicuna / "answers" / "answer_bard.jsonl")],
                  questions=str(vicuna / "question.jsonl"))
    assert len(arena.pairs) == 80
    nxt = asyncio.run(arena.next_pair("ann"))
    qid = arena.pairs[nxt["pair"]].question_id
    assert nxt["question"] == next(json.loads(line)["turns"][0] for line in
                                   (vicuna / "question.jsonl").read_text().splitlines()
                                   if str(json.loads(line)["question_id"]) == qid)
