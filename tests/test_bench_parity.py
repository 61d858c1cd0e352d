"""bench/parity.py end to end on a tiny random Llama and tiny synthetic data: every row (PEFT's
too when installed), the conversation split, resume, and the report.

The numbers of a 2-step run on random weights mean nothing; what is checked is that every row
trains through its real code path, is scored before and after, and lands in the results file and
the tables, and that the split never puts one conversation on both sides.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_BNB, HAS_PEFT

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
parity = pytest.importorskip("parity")


def _data(tmp: Path) -> dict:
    """OASST-like rows (several follow-ups share a first human turn) and Alpaca-like rows."""
    oasst = []
    for c in range(20):
        first = f"### Human: question {c} about topic {c % 3}?"
        oasst.append({"input": f"{first} ### Assistant:", "output": f"answer {c}, short."})
        for k in range(c % 3):  # follow-up turns of the same conversation
            oasst.append({"input": f"{first} ### Assistant: answer {c}. ### Human: more {k}? ### Assistant:",
                          "output": f"more {k} of {c}."})
    alpaca = [{"instruction": f"Repeat {i}.", "input": "" if i % 2 else f"x{i}", "output": f"{i} {i}"}
              for i in range(30)]
    (tmp / "oasst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in oasst))
    (tmp / "alpaca.json").write_text(json.dumps(alpaca))
    (tmp / "wiki.txt").write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 20)
    return {"oasst": tmp / "oasst.jsonl", "alpaca": tmp / "alpaca.json", "wikitext": tmp / "wiki.txt"}


def test_split_keeps_conversations_whole(tmp_path):
    rows = [json.loads(x) for x in _data(tmp_path)["oasst"].read_text().splitlines()]
    train, held = parity.split_oasst(rows, 0.15)
    assert len(train) + len(held) == len(rows) and held and train
    first = parity._first_turn
    assert not {first(r["input"]) for r in train} & {first(r["input"]) for r in held}
    assert parity.split_oasst(rows, 0.15) == (train, held)  # deterministic
    assert len({first(r["input"]) for r in held}) == 3  # 15% of 20 conversations


def test_verdicts():
    assert "within seed noise" in parity.verdict([1.0, 1.1, 0.9], [1.05, 0.95, 1.0], "x")
    assert "WORSE beyond seed noise" in parity.verdict([2.0, 2.01, 1.99], [1.0, 1.01, 0.99], "x")
    assert "one seed" in parity.verdict([1.0], [2.0], "x")


@pytest.mark.slow
def test_whole_pipeline_on_a_tiny_model(tiny_chat_dir, tmp_path):
    src = _data(tmp_path)
    rows = [r for r in parity.ROWS if r != "peft" or (HAS_PEFT and HAS_BNB)]
    args = ["--quick", "--model", str(tiny_chat_dir), "--r", "4", "--alpha", "8", "--oasst", str(src["oasst"]),
            "--alpaca", str(src["alpaca"]), "--wikitext", str(src["wikitext"]), "--results",
            str(tmp_path / "r.jsonl"), "--rows", ",".join(rows), "--datasets", "oasst", "--in-process"]
    assert parity.main(args) == 0  # every row on one data set (the Alpaca path: the next test)
    results = parity.read_results(tmp_path / "r.jsonl")
    assert {(r["dataset"], r["row"]) for r in results} == {("oasst", r) for r in rows}
    for r in results:
        assert r["steps"] == 2 and r["before"]["loss"] > 0 and r["after"]["loss"] > 0, r
        assert r["after"]["wikitext_ppl"] > 1 and r["heldout_examples"] > 0
        assert r["after"]["loss"] != r["before"]["loss"], r  # it trained (and was scored after)
    by = {(r["dataset"], r["row"]): r for r in results}
    # the same base and a fresh B = 0 adapter score the same before training
    assert by["oasst", "nf4dq"]["before"]["loss"] == pytest.approx(by["oasst", "nf4"]["before"]["loss"], rel=0.05)
    assert by["oasst", "lora16"]["before"]["loss"] == pytest.approx(by["oasst", "full16"]["before"]["loss"], rel=1e-5)
    # LoftQ at r=4 on 32-wide layers starts nearer the 16-bit model than the plain NF4 + DQ base
    lo, nf, fp = (by["oasst", k]["before"]["loss"] for k in ("loftq", "nf4dq", "lora16"))
    assert abs(lo - fp) < abs(nf - fp)
    table = parity.report(results)
    assert "### oasst" in table and "QLoRA NF4 + DQ + LoftQ init" in table
    assert "(one seed: no noise estimate)" in table
    # resume: nothing left to run, same file; --report prints the same tables
    n = len((tmp_path / "r.jsonl").read_text().splitlines())
    assert parity.main(args) == 0 and len((tmp_path / "r.jsonl").read_text().splitlines()) == n


@pytest.mark.slow
def test_rows_run_in_their_own_process(tiny_chat_dir, tmp_path):
    src = _data(tmp_path)
    out = subprocess.run([sys.executable, str(BENCH / "parity.py"), "--quick", "--model", str(tiny_chat_dir),
                          "--r", "4", "--oasst", str(src["oasst"]), "--alpaca", str(src["alpaca"]),
                          "--wikitext", str(src["wikitext"]), "--results", str(tmp_path / "r.jsonl"),
                          "--rows", "nf4dq", "--datasets", "alpaca"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| QLoRA NF4 + DQ |" in out.stdout
    rep = subprocess.run([sys.executable, str(BENCH / "parity.py"), "--report", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True)
    assert rep.returncode == 0 and "| QLoRA NF4 + DQ |" in rep.stdout


def test_interrupted_line_is_ignored(tmp_path, capsys):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"key": "k", "dataset": "d", "row": "nf4dq", "seed": 0}) + "\n" + '{"key": "k", "da')
    assert len(parity.read_results(f)) == 1
    assert "interrupted write" in capsys.readouterr().err

