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
    args = ["--model", str(tiny_chat_dir), "--data", data_file, "--max-steps", "40", "--batch-size", "2",
            "--grad-accum", "2", "--lr", "3e-3", "--r", "4", "--alpha", "8", "--dropout", "0.1", "--save-steps", "2",
            "--eval-size", "8", "--no-gradient-checkpointing", "--seed", "5", "--threads", "1"]
    full = _cli([*args, "--output", str(tmp_path / "full")])
    assert full.wait(timeout=600) == 0, full.stdout.read()
    run = tmp_path / "killed"
    p = _cli([*args, "--output", str(run)])
    deadline = time.time() + 300
    while not (run / "checkpoint-6").exists():  # somewhere mid-run: after step 6 was checkpointed
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.02)  # into a later step (34 remain: a loaded machine must not let it finish first)
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


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_chat_dir, data_file, tmp_path, monkeypatch):
    """A NaN loss at step 4 (injected): the weights after step 3 produced it, so checkpoint-2 is the last good one."""
    import fourbit.loss

    real, calls = fourbit.loss.causal_lm_loss, []

    def nan_at_4(*a, **k):
        calls.append(1)
        loss, n = real(*a, **k)
        return (loss * float("nan") if len(calls) == 4 else loss), n

    monkeypatch.setattr(fourbit.loss, "causal_lm_loss", nan_at_4)
    with pytest.raises(UserError, match=r"the loss became nan at step 4; .*Last good checkpoint: .*checkpoint-2\b"):
        train(_cfg(tiny_chat_dir, data_file, tmp_path / "nan", max_steps=6, save_steps=1, save_total_limit=-1))
    assert sorted(p.name for p in (tmp_path / "nan").glob("checkpoint-*")) == [f"checkpoint-{i}" for i in (1, 2, 3)]


def test_huge_lr_stops_at_the_non_finite_gradient_before_applying_it(tiny_chat_dir, data_file, tmp_path):
    """--lr 1e6 on a tiny model: the loss is finite at step 2 but its gradient is not; on main the NaN
    update was applied and the run failed a step later trying to save a NaN adapter (or said 'the loss
    became nan at step 3')."""
    with pytest.raises(UserError, match=r"the gradient norm became nan at step 2 \(loss 10\.\d+\); stopped without "
                                        r"applying this step\. Last good checkpoint: none\. Try a lower --lr"):
        train(_cfg(tiny_chat_dir, data_file, tmp_path / "run", max_steps=6, save_steps=1, lr=1e6))
    a = _adapter(tmp_path / "run" / "checkpoint-1")  # kept (a new run with a checkpoint), and finite
    assert all(torch.isfinite(t).all() for t in a.values())


def test_divergence_rule_on_the_measured_demo_run():
    """The --lr 1e6 demo run as measured (SmolLM2, vocabulary 49152): loss 1.734 then pinned at
    ln(49152) with a zero gradient; main ran it to "done". A normal run never trips the rule."""
    from fourbit.train import DivergenceWatch

    w = DivergenceWatch(vocab=49152)
    measured = [(1.734055, 2.351595), (10.802673, 0.0), (10.802673, 0.0), (10.802673, 0.0), (10.802671, 0.0)]
    verdicts = [w.check(i + 1, loss, g, warm=True) for i, (loss, g) in enumerate(measured)]
    assert verdicts[:3] == [None, None, None] and "gradient norm is 0 at loss 10.8027" in verdicts[3]
    assert w.since == 2
    w = DivergenceWatch(vocab=49152)  # the same losses with gradients: collapsed to guessing
    assert [w.check(i + 1, loss, 1.0, warm=True) is not None for i, (loss, _) in enumerate(measured)] == \
        [False, False, False, True, True]
    w = DivergenceWatch(vocab=256)  # worse than uniform guessing, but only after warmup
    assert [w.check(i + 1, 20.0, 5.0, warm=i >= 2) is not None for i in range(6)] == [False] * 4 + [True] * 2
    w = DivergenceWatch(vocab=49152)  # a tiny random model training normally (test_trains_and_writes_everything)
    normal = [10.806, 10.81, 10.70, 10.72, 10.68, 10.62, 10.66, 10.58, 10.63, 10.59] + [0.0] * 4
    assert all(w.check(i + 1, loss, 0.0 if loss == 0 else 0.3, warm=True) is None for i, loss in enumerate(normal))


def test_save_total_limit_0_keeps_no_checkpoint_after_the_run(tiny_chat_dir, data_file, tmp_path):
    """Main kept every checkpoint with --save-total-limit 0 (its help said "checkpoints to keep")."""
    train(_cfg(tiny_chat_dir, data_file, tmp_path / "r0", max_steps=4, save_steps=1, save_total_limit=0))
    assert not list((tmp_path / "r0").glob("checkpoint-*"))
    assert (tmp_path / "r0" / "adapter_model.safetensors").is_file()
    train(_cfg(tiny_chat_dir, data_file, tmp_path / "all", max_steps=3, save_steps=1, save_total_limit=-1))
    assert len(list((tmp_path / "all").glob("checkpoint-*"))) == 3


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


# -- what --output may hold, and what --overwrite may delete (issue 12 items 1, 2, 15) ----------------
def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_a_fourbit_run(tiny_chat_dir, data_file, tmp_path):
    """Main's --overwrite deleted any directory (rmtree) before the model or data were checked."""
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"holds files that are not a fourbit train run \(chapter1\.tex\)"):
        train(_cfg(tiny_chat_dir, data_file, thesis, overwrite=True))
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    data_dir = tmp_path / "data"  # the training data inside the output: main deleted it, then said "not found"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_bytes(open(data_file, "rb").read())
    with pytest.raises(UserError, match=r"--data .*train\.jsonl lies inside --output"):
        train(_cfg(tiny_chat_dir, str(data_dir / "train.jsonl"), data_dir, overwrite=True))
    with pytest.raises(UserError, match=r"--output .*train\.jsonl is a file"):
        train(_cfg(tiny_chat_dir, data_file, data_file, overwrite=True))
    with pytest.raises(UserError, match=r"lies inside --model"):
        train(_cfg(tiny_chat_dir, data_file, tiny_chat_dir / "run", overwrite=True))
    assert (data_dir / "train.jsonl").is_file() and not (tiny_chat_dir / "run").exists()


def test_overwrite_writes_beside_and_the_old_run_survives_a_failed_new_one(tiny_chat_dir, data_file, tmp_path,
                                                                             monkeypatch):
    run = tmp_path / "run"
    train(_cfg(tiny_chat_dir, data_file, run, max_steps=2))
    assert json.loads((run / "fourbit-output.json").read_text())["written_by"] == "fourbit train"
    old = _files(run)
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')  # main: rmtree'd the run, then failed on the data
    with pytest.raises(UserError, match="match no known format"):
        train(_cfg(tiny_chat_dir, str(tmp_path / "bad.jsonl"), run, overwrite=True))
    import fourbit.loss

    real = fourbit.loss.causal_lm_loss
    monkeypatch.setattr(fourbit.loss, "causal_lm_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), 1))
    with pytest.raises(UserError, match=r"loss became nan at step 1.*--overwrite: the new run was discarded; .*run "
                                        r"still holds the previous run"):
        train(_cfg(tiny_chat_dir, data_file, run, overwrite=True, max_steps=3, save_steps=1))
    monkeypatch.undo()
    assert _files(run) == old and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "run"]
    (run / "fourbit-output.json").unlink()  # a run from before the marker: still recognised by its files
    train(_cfg(tiny_chat_dir, data_file, run, overwrite=True, max_steps=3))
    assert json.loads((run / "summary.json").read_text())["steps"] == 3 and (run / "fourbit-output.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "run"]  # no staging or backup left
    (run / "notes.txt").write_text("mine")  # a run with a user's file in it is not fourbit's alone
    with pytest.raises(UserError, match=r"not a fourbit train run \(notes\.txt\)"):
        train(_cfg(tiny_chat_dir, data_file, run, overwrite=True))


def test_a_kill_between_the_swap_renames_is_repaired(tiny_chat_dir, data_file, tmp_path):
    from fourbit.outputs import StagedDir

    run = tmp_path / "run"
    train(_cfg(tiny_chat_dir, data_file, run, max_steps=1))
    old = _files(run)
    staged = StagedDir(run)
    staged.begin()
    run.rename(staged.backup)  # killed after the first rename of commit()
    with pytest.raises(UserError, match="already holds files"):  # the old run is back in place, and refused as usual
        train(_cfg(tiny_chat_dir, data_file, run))
    assert _files(run) == old and not staged.backup.exists()


def test_data_is_checked_before_the_model_loads_and_failures_leave_nothing(tiny_chat_dir, tmp_path, monkeypatch):
    """Main loaded the model first, then found the bad row, and left an empty output directory."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("fourbit.models.load_model", refuse)
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    rows += [{"instruction": "q", "output": ["x"]}] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"3 of 33 rows .* more than max_bad_fraction 5%"):
        train(_cfg(tiny_chat_dir, str(tmp_path / "d.jsonl"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="the model was loaded"):  # allowed: the data passes, the model loads
        train(_cfg(tiny_chat_dir, str(tmp_path / "d.jsonl"), tmp_path / "out", max_bad_fraction=0.1))
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    with pytest.raises(UserError, match="lacks"):  # a checkpoint the loader refuses: still no directory
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.safetensors").write_bytes((tiny_chat_dir / "model.safetensors").read_bytes())
        for f in tiny_chat_dir.iterdir():
            if f.name != "model.safetensors":
                (tmp_path / "m" / f.name).write_bytes(f.read_bytes())
        cfgj = json.loads((tmp_path / "m" / "config.json").read_text())
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfgj, "num_hidden_layers": 3}))
        train(_cfg(tmp_path / "m", str(tmp_path / "d.jsonl"), tmp_path / "out", max_bad_fraction=0.1))
    assert not (tmp_path / "out").exists()


def test_sequences_are_cut_to_the_model_context(tiny_chat_dir, tmp_path):
    """Main fed 6,000-token rows to a 256-position model without a word (the library cuts to
    context_len only when told it)."""
    rows = [{"instruction": "w " * 400, "output": f"a{i}"} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train(_cfg(tiny_chat_dir, str(tmp_path / "d.jsonl"), tmp_path / "out", max_steps=1, eval_size=2,
                     source_max_len=1024, target_max_len=16))
    ex = res.summary["examples"]
    assert ex["context_len"] == 256 and ex["context_truncated"] == 12 and ex["truncated"] == 12


# -- resume (issue 12 items 3 and 12) ------------------------------------------------------------------
def test_resume_refuses_changed_settings_naming_each(tiny_chat_dir, data_file, tmp_path):
    """Main resumed with a new --lr/--alpha/--seed silently (and saved the new alpha with the old scaling)."""
    run = tmp_path / "run"
    train(_cfg(tiny_chat_dir, data_file, run, max_steps=2, save_steps=1))
    with pytest.raises(UserError, match=r"3 setting\(s\) differ .*--lr 0\.003 -> 0\.01; --alpha 8(\.0)? -> 64; "
                                        r"--seed 3 -> 4\..*May change on resume: --max-steps"):
        train(_cfg(tiny_chat_dir, data_file, run, max_steps=4, resume=True, lr=0.01, alpha=64, seed=4))
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"w {i}"} for i in range(48)]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"--data .*train\.jsonl' -> '.*other\.jsonl'"):
        train(_cfg(tiny_chat_dir, str(tmp_path / "other.jsonl"), run, max_steps=4, resume=True))
    d2 = tmp_path / "d2"  # the same path, other contents
    d2.mkdir()
    (d2 / "train.jsonl").write_bytes(open(data_file, "rb").read())
    train(_cfg(tiny_chat_dir, str(d2 / "train.jsonl"), tmp_path / "run2", max_steps=2, save_steps=1))
    (d2 / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="the training data differs"):
        train(_cfg(tiny_chat_dir, str(d2 / "train.jsonl"), tmp_path / "run2", max_steps=4, resume=True))


def test_resume_takes_the_runs_settings_for_flags_not_given(tiny_chat_dir, data_file, tmp_path, capsys):
    from fourbit.cli import main

    run = tmp_path / "run"
    train(_cfg(tiny_chat_dir, data_file, run, max_steps=2, save_steps=1, lr=0.01, r=8, alpha=4, threads=1))
    assert main(["train", "--output", str(run), "--resume", "--max-steps", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2" in out
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["lr"], cfg["r"], cfg["alpha"], cfg["model"], cfg["max_steps"]) == (0.01, 8, 4, str(tiny_chat_dir), 3)
    assert main(["train", "--output", str(run), "--resume", "--lr", "0.02"]) == 2
    assert "--lr 0.01 -> 0.02" in capsys.readouterr().err


def test_resume_survives_a_corrupt_newest_checkpoint_and_a_partial_metrics_line(tiny_chat_dir, data_file, tmp_path,
                                                                                  capsys):
    """Main crashed on a truncated newest checkpoint and on a half-written metrics line."""
    run = tmp_path / "run"
    train(_cfg(tiny_chat_dir, data_file, run, max_steps=3, save_steps=1, save_total_limit=-1))
    opt = run / "checkpoint-3" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-10])  # a copy cut short
    (run / "checkpoint-final").mkdir()  # a user's folder: ignored, never deleted
    (run / "checkpoint-final" / "notes.txt").write_text("mine")
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(rows + '{"step": 4, "lo')  # a writer killed mid-line
    res = train(_cfg(tiny_chat_dir, data_file, run, max_steps=4, save_steps=1, save_total_limit=-1, resume=True))
    out = capsys.readouterr().out
    assert "checkpoint-3/optimizer.safetensors: truncated" in out and "not resumed from" in out
    assert "resuming from" in out and "checkpoint-2 (step 2 of 4)" in out
    assert "checkpoint-final: not named checkpoint-<step>: ignored" in out
    assert "a partial last line of" in out and (run / "checkpoint-final" / "notes.txt").read_text() == "mine"
    assert res.steps == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
