"""One CLI convention for every command: `--help` exits 0 without loading a model; every user
mistake exits 2 with one line on stderr (no traceback) before any model loads; abbreviations are
refused; `fourbit memory` plans the run `fourbit train` does by default.

In-process (`fourbit.cli.main`), with fourbit's model loader replaced by one that fails the test:
a command that loaded a model before refusing its flags would show it.
"""

import dataclasses
import json

import pytest

from fourbit.cli import COMMANDS, main


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr("fourbit.models.load.load_model", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model directory with a config.json only (256 positions), a text, a judgment file."""
    from conftest import tiny_config

    d = tmp_path_factory.mktemp("cli")
    tiny_config("llama").to_json_file(d / "config.json")
    (d / "t.txt").write_text("some text " * 50)
    (d / "j.jsonl").write_text(json.dumps({"first": "a", "second": "b", "score": 1}) + "\n")
    (d / "mmlu" / "test").mkdir(parents=True)
    return d


HELP = [[name, "--help"] for name in COMMANDS if name != "eval"] + [["eval", "--help"], ["eval"], ["eval", "ppl", "-h"],
                                                                   ["eval", "mmlu", "--help"]]


@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_every_help_exits_0(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: fourbit" in out and "Traceback" not in out


# (argv, what the one line must say); {d} is the `files` directory
BAD = [
    (["train", "--max-st", "2"], "unknown flag(s) ['--max-st', '2']"),
    (["train", "--lr", "-1", "--r", "0"], "--lr must be > 0"),
    (["train", "--optim", "sgd"], "--optim must be one of adamw, paged_adamw, adamw8bit, paged_adamw8bit"),
    (["train", "--quant", "int3"], "--quant must be one of nf4, fp4, none"),
    (["train", "--compute-dtype", "fp8"], "--compute-dtype must be one of"),
    (["train", "--r", "abc"], "argument --r: invalid int value: 'abc'"),
    (["train", "--config", "{d}/missing.yaml"], "no such file"),
    (["quantize", "{d}"], "--output DIR is required"),
    (["quantize", "{d}", "--output", "{d}/q", "--blocksize", "48"], "--blocksize must be a power of two"),
    (["quantize", "{d}", "--output", "{d}/q", "--quant", "none"], "--quant must be one of nf4, fp4"),
    (["quantize", "{d}", "{d}", "--output", "{d}/q"], "unexpected argument(s)"),
    (["merge", "--model", "{d}", "--adapter", "{d}", "--output", "{d}/m", "--gguf", "q4_k"], "--gguf must be one of"),
    (["merge", "--model", "{d}"], "--adapter DIR is required"),
    (["chat", "--model", "{d}", "--quant", "int3"], "--quant must be one of"),
    (["chat", "--model", "{d}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["chat", "--model", "{d}", "--adapter", "{d}/no-adapter"], "adapter directory"),
    (["generate", "--model", "{d}"], "--prompts FILE is required"),
    (["generate", "--model", "{d}", "--prompts", "{d}/none.jsonl", "--output", "{d}/a.jsonl"], "does not exist"),
    (["eval", "bleu"], "unknown evaluation 'bleu'"),
    (["eval", "ppl", "--model", "{d}"], "--data FILE is required"),
    (["eval", "ppl", "--model", "{d}", "--data", "{d}/t.txt", "--stride", "99999"], "stride must be in [1, "),
    (["eval", "ppl", "--model", "{d}", "--data", "{d}/t.txt", "--max-length", "8", "--stride", "9"],
     "--stride must be at most --max-length"),
    (["eval", "mmlu", "--model", "{d}", "--data-dir", "{d}/none"], "does not exist"),
    (["eval", "mmlu", "--model", "{d}", "--data-dir", "{d}/mmlu", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["eval", "mmlu", "--model", "{d}", "--data-dir", "{d}/mmlu", "--subjects", "alchemy"], "unknown MMLU subject"),
    (["judge"], "two answer files are required"),
    (["judge", "{d}/a.jsonl", "{d}/b.jsonl"], "does not exist"),
    (["judge", "{d}/j.jsonl", "{d}/j.jsonl", "--judge", "robot"], "--judge must be one of model, endpoint, human"),
    (["elo"], "at least one judgment file is required"),
    (["elo", "{d}/j.jsonl", "--orderings", "0"], "--orderings must be >= 1"),
    (["elo", "{d}/missing.jsonl"], "does not exist"),
    (["elo", "{d}/j.jsonl", "--json", "{d}/out.json"], "--json"),
    (["memory", "--gpu", "lots"], "cannot read 'lots' as a memory size"),
    (["memory", "--optim", "sgd"], "--optim must be one of"),
    (["memory", "--blocksize", "48"], "--blocksize must be a power of two"),
    (["memory", "--checkpoint"], "unknown flag(s) ['--checkpoint']"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_every_mistake_is_one_line_and_exit_2(argv, message, files, capsys):
    rc = main([a.format(d=files) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith(f"fourbit {argv[0]}: error: ") and message in err and "Traceback" not in err


def test_memory_plans_the_run_train_does_by_default():
    from fourbit.memory import Plan
    from fourbit.train import TrainConfig

    plan, train = Plan(), TrainConfig()
    same = dict(batch="batch_size", r="r", alpha="alpha", target="target", dropout="dropout", optim="optim",
                checkpointing="gradient_checkpointing", max_grad_norm="max_grad_norm", quant="quant",
                double_quant="double_quant", loss_chunk="loss_chunk")
    assert {k: getattr(plan, k) for k in same} == {k: getattr(train, v) for k, v in same.items()}
    assert plan.checkpointing is True
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(Plan)}
    assert helps["r"] == {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}["r"]
