"""`fourbit train` end to end on a tiny model: it learns, it resumes bit-identically after kill -9,
accumulation equals a big batch, NaN stops it, bad input is refused clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import requires_smollm2
from fourbit.errors import UserError
from fourbit.commands.flags import parse_cli
from fourbit.train import DEMO_PRESET, TrainConfig, apply_demo_preset, train

pytestmark = requires_smollm2


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i} " * 3} for i in range(48)]
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=data, output=str(out), max_steps=6, batch_size=4, grad_accum=1, lr=3e-3,
                r=4, alpha=8, dropout=0.0, eval_size=8, gradient_checkpointing=False, group_by_length=False,
                quant="nf4", seed=3, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _adapter(d):
    return load_file(str(d / "adapter_model.safetensors"))


def test_trains_and_writes_everything(tiny_chat_dir, data_file, tmp_path):
    res = train(_cfg(tiny_chat_dir, data_file, tmp_path / "run", max_steps=10, eval_steps=5, save_steps=5, lr=0.1,
                     r=16, alpha=32))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1  # it learns (a tiny random model, from ln(49152) = 10.8)
    assert {"loss", "lr", "tokens_per_s", "memory_mb", "grad_norm"} <= set(rows[0]) and "eval_loss" in rows[4]
    out = tmp_path / "run"
    assert (out / "adapter_config.json").is_file() and (out / "loss.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["examples"]["used"] == 48 and summary["train_examples"] == 40
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert res.eval_loss is not None and res.final_loss == pytest.approx(rows[-1]["loss"], abs=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tiny_chat_dir, data_file, tmp_path):
    train(_cfg(tiny_chat_dir, data_file, tmp_path / "a", max_steps=3, batch_size=4, grad_accum=1))
    train(_cfg(tiny_chat_dir, data_file, tmp_path / "b", max_steps=3, batch_size=2, grad_accum=2))
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for k in a:  # same examples per step; only padding and summation order differ (fp32)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fourbit", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_kill_9_and_resume_gives_a_bit_identical_adapter(tiny_chat_dir, data_file, tmp_path):
    args = ["--model", str(tiny_chat_dir), "--data", data_file, "--max-steps", "12", "--batch-size", "2",
            "--grad-accum", "2", "--lr", "3e-3", "--r", "4", "--alpha", "8", "--dropout", "0.1", "--save-steps", "2",
            "--eval-size", "8", "--no-gradient-checkpointing", "--seed", "5", "--threads", "1"]
    full = _cli([*args, "--output", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stdout.read()
    run = tmp_path / "killed"
    p = _cli([*args, "--output", str(run)])
    deadline = time.time() + 300
    while not (run / "checkpoint-6").exists():  # somewhere mid-run: after step 6 was checkpointed
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)  # let it get into the next step
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "adapter_model.safetensors").exists()  # killed before the end
    again = _cli([*args, "--output", str(run), "--resume"])
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert "resuming from" in out
    a, b = _adapter(tmp_path / "full"), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_rows = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (run / "metrics.jsonl").read_text() == full_rows or \
        [json.loads(r)["loss"] for r in full_rows.splitlines()] == \
        [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_chat_dir, data_file, tmp_path):
    cfg = _cfg(tiny_chat_dir, data_file, tmp_path / "nan", max_steps=6, save_steps=1, lr=1e30, max_grad_norm=0.0)
    with pytest.raises(UserError, match=r"the loss became (nan|inf) at step \d+.*Last good checkpoint: .*checkpoint-\d+"):
        train(cfg)
    assert any((tmp_path / "nan").glob("checkpoint-*"))


def test_refuses_to_overwrite_another_run(tiny_chat_dir, data_file, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="already holds files.*--resume.*--overwrite"):
        train(_cfg(tiny_chat_dir, data_file, tmp_path / "old"))
    with pytest.raises(UserError, match="holds no run to resume"):
        train(_cfg(tiny_chat_dir, data_file, tmp_path / "new", resume=True))


@pytest.mark.parametrize("content,msg", [
    ("", "is empty"),
    ('{"foo": 1}\n', "match no known format"),
])
def test_bad_datasets(tiny_chat_dir, tmp_path, content, msg):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(UserError, match=msg):
        train(_cfg(tiny_chat_dir, str(tmp_path / "d.jsonl"), tmp_path / "out"))


def test_every_example_truncated_away(tiny_chat_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "y"},
                          {"role": "user", "content": "z"}, {"role": "assistant", "content": "w"}]}] * 12
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="no training examples left.*dropped because truncation left no response"):
        train(_cfg(tiny_chat_dir, str(tmp_path / "d.jsonl"), tmp_path / "out", source_max_len=8, target_max_len=4,
                   eval_size=0))


def test_cli_errors_are_messages_not_tracebacks(tiny_chat_dir, tmp_path):
    p = _cli(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "fourbit train: error: model" in out and "Traceback" not in out
    p = _cli(["--bogus-flag", "1"])
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "--bogus-flag" in out and "Known flags" in out and "Traceback" not in out
    p = _cli(["--lr", "-1", "--r", "0"])
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "--lr must be > 0" in out and "--r must be >= 1" in out


def test_demo_preset_applies_only_to_flags_not_given(tmp_path):
    cfg, given = parse_cli(TrainConfig, ["--max-steps", "5", "--no-gradient-checkpointing", "--lr=0.01"], prog="t")
    assert given == {"max_steps", "gradient_checkpointing", "lr"}
    cfg = apply_demo_preset(cfg, given)
    assert cfg.max_steps == 5 and cfg.lr == 0.01 and cfg.batch_size == DEMO_PRESET["batch_size"]
    assert cfg.gradient_checkpointing is False and cfg.r == DEMO_PRESET["r"]
    (tmp_path / "run.yaml").write_text("r: 8\n")  # keys of the YAML count as given too
    cfg, given = parse_cli(TrainConfig, ["--config", str(tmp_path / "run.yaml"), "--max-steps", "5"], prog="t")
    assert given == {"r", "max_steps"} and apply_demo_preset(cfg, given).r == 8
    other = apply_demo_preset(TrainConfig(data="x.jsonl"), set())
    assert other.max_steps == -1 and other.grad_accum == 16  # the paper's recipe for real data


def test_flag_abbreviations_are_refused():
    """argparse would take --max-st for --max-steps, and the demo preset would then override it."""
    with pytest.raises(UserError, match=r"unknown flag\(s\) \['--max-st', '2'\]"):
        parse_cli(TrainConfig, ["--max-st", "2"], prog="t")


def test_yaml_config(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.0005\nmax-steps: 7\nr: 8\n")
    cfg, _ = parse_cli(TrainConfig, ["--config", str(tmp_path / "run.yaml"), "--r", "16"], prog="t")
    assert cfg.lr == 0.0005 and cfg.max_steps == 7 and cfg.r == 16
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(UserError, match=r"unknown option\(s\) \['learning_rate'\]"):
        parse_cli(TrainConfig, ["--config", str(tmp_path / "bad.yaml")], prog="t")


def test_distributed_epochs_never_leave_a_rank_without_data(monkeypatch):
    """7 examples, batch 2 x 3 ranks: global batches of 6 and a short one of 1, which would give
    two ranks nothing (a crash, or a hang under --fsdp): it is dropped; one process keeps it."""
    from fourbit import distributed as dd
    from fourbit.train import Data, TrainConfig, epoch_batches

    data = Data(train=[{"input_ids": [1] * (i + 1)} for i in range(7)], eval=[], eval_raw=[], report=None, pad_id=0)
    cfg = TrainConfig(batch_size=2, group_by_length=False)
    assert sorted(len(b) for b in epoch_batches(data, cfg, 0)) == [1, 2, 2, 2]
    monkeypatch.setattr(dd, "world", lambda: 3)
    assert [len(b) for b in epoch_batches(data, cfg, 0)] == [6]
