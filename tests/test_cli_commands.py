"""The commands as users run them (`python -m fourbit ...` in a subprocess) on a tiny chat model."""

import json
import os
import subprocess
import sys

import pytest

from conftest import SHARED_DATA, requires_shared_data, requires_smollm2

pytestmark = requires_smollm2


def fourbit(*args, stdin=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fourbit", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_writes_jsonl_and_resumes(tiny_chat_dir, tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": "x", "turns": [f"Question {i}?"]}) + "\n"
                               for i in range(3)))
    out = tmp_path / "a.jsonl"
    r = fourbit("generate", "--model", tiny_chat_dir, "--prompts", prompts, "--output", out, "--max-new-tokens", 4,
                "--limit", 2)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["question_id"] for x in rows] == ["0", "1"] and all("text" in x for x in rows)
    r = fourbit("generate", "--model", tiny_chat_dir, "--prompts", prompts, "--output", out, "--max-new-tokens", 4)
    assert r.returncode == 0 and "2 already answered" in r.stdout
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == ["0", "1", "2"]


def test_chat_reads_stdin_and_streams(tiny_chat_dir):
    r = fourbit("chat", "--model", tiny_chat_dir, "--max-new-tokens", 3, stdin="hello\n/reset\nagain\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3


def test_eval_ppl_json(tiny_chat_dir, tmp_path):
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = fourbit("eval", "ppl", "--model", tiny_chat_dir, "--data", tmp_path / "t.txt", "--max-length", 64,
                "--stride", 32, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["perplexity"] > 1 and res["tokens"] > 100


@requires_shared_data
def test_eval_mmlu_json(tiny_chat_dir):
    r = fourbit("eval", "mmlu", "--model", tiny_chat_dir, "--data-dir", SHARED_DATA / "mmlu", "--split", "val",
                "--subjects", "anatomy", "astronomy", "--limit", 3, "--shots", 1, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(res) == {"macro", "micro", "subjects", "n"} and res["n"] == 6


def test_judge_human_from_stdin_then_elo(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"question_id": i, "model_id": name, "prompt": f"q{i}", "text": f"{name}{i}"}) + "\n"
            for i in range(2)))
    r = fourbit("judge", tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--judge", "human", "--output",
                tmp_path / "j.jsonl", stdin="1\n1\n2\n3\n")
    assert r.returncode == 0, r.stderr
    assert "4 judgments written" in r.stdout
    r = fourbit("elo", tmp_path / "j.jsonl", "--orderings", 100, "--json")
    res = json.loads(r.stdout)
    assert res["matches"] == 4 and res["ratings"]["a"] > res["ratings"]["b"]


def test_quantize_cli(tiny_chat_dir, tmp_path):
    r = fourbit("quantize", tiny_chat_dir, "--output", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert "quantized 14 linear weights" in r.stdout and "peak RSS" in r.stdout
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    r = fourbit("quantize", tiny_chat_dir, "--output", tmp_path / "q")
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_memory_cli():
    r = fourbit("memory", "--model", "llama-7b", "--gpu", "24GB")
    assert r.returncode == 0 and "fits in 24.0 GiB" in r.stdout
    r = fourbit("memory", "--model", "llama-7b", "--gpu", "lots")
    assert r.returncode == 2 and "cannot read 'lots'" in r.stderr
