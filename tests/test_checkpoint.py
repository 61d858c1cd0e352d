"""fourbit.checkpoint: a corrupt, half-deleted or stray checkpoint directory is found by a cheap check,
skipped with its reason, and never crashes a resume; only fourbit's own broken directories are pruned."""

import json
import re
import shutil

import pytest
import torch

from conftest import tiny_model
from fourbit.checkpoint import (latest_good_checkpoint, list_checkpoints, load_checkpoint, prune_broken_checkpoints,
                                save_checkpoint, validate_checkpoint)
from fourbit.errors import UserError
from fourbit.nn import add_lora


def _train_state():
    model = add_lora(tiny_model("llama", num_hidden_layers=1), r=2, alpha=4, dropout=0.0, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(3, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with good checkpoint-5 and checkpoint-10."""
    out = tmp_path_factory.mktemp("run")
    model, opt, sched = _train_state()
    for step in (5, 10):
        save_checkpoint(out, step, model, opt, sched, {"epoch": 0}, keep=3)
    return out


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def test_good_checkpoints_validate_and_load(run):
    assert validate_checkpoint(run / "checkpoint-10") == [] and validate_checkpoint(run / "checkpoint-5") == []
    assert latest_good_checkpoint(run) == (run / "checkpoint-10", [])
    model, opt, sched = _train_state()
    assert load_checkpoint(run / "checkpoint-10", model, opt, sched)["step"] == 10


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_state(key, value):
    def edit(p):
        state = json.loads(p.read_text())
        state[key] = value
        p.write_text(json.dumps(state))
    return edit


@pytest.mark.parametrize("name,damage,reason", [
    ("adapter_model.safetensors", _truncate, r"adapter_model.safetensors: truncated"),
    ("adapter_model.safetensors", lambda p: p.write_bytes(b""), r"adapter_model.safetensors: not a safetensors file: "
                                                                 r"an empty file \(0 bytes\)"),
    ("optimizer.safetensors", _truncate, r"optimizer.safetensors: truncated"),
    ("optimizer.safetensors", lambda p: p.write_bytes(b""), r"optimizer.safetensors: not a safetensors file"),
    ("rng-0.safetensors", lambda p: p.unlink(), r"missing rng-0.safetensors"),
    ("rng-0.json", lambda p: p.unlink(), r"missing rng-0.json"),
    ("rng-0.json", lambda p: p.write_text("[3, [1, 2"), r"rng-0.json is not valid JSON"),
    ("trainer_state.json", _truncate, r"trainer_state.json is not valid JSON"),
    ("trainer_state.json", _edit_state("step", 7), r"trainer_state.json says step 7, the directory's name step 10"),
    ("trainer_state.json", _edit_state("world_size", 2), r"missing rng-1.safetensors"),
    ("trainer_state.json", _edit_state("sharded", True), r"missing optimizer-0.safetensors"),
    ("adapter_config.json", lambda p: p.write_text("{"), r"adapter_config.json is not valid JSON"),
])
def test_a_corrupt_newest_checkpoint_is_skipped_with_its_reason(run, name, damage, reason):
    newest = run / "checkpoint-10"
    damage(newest / name)
    problems = validate_checkpoint(newest)
    assert len(problems) >= 1 and any(re.search(reason, p) for p in problems), problems
    path, skipped = latest_good_checkpoint(run)
    assert path == run / "checkpoint-5" and [s for s, _ in skipped] == [newest]
    assert skipped[0][1] == "; ".join(problems)
    model, opt, sched = _train_state()
    with pytest.raises(UserError, match=rf"cannot resume from .*checkpoint-10: .*{reason}"):
        load_checkpoint(newest, model, opt, sched)  # one line, never a traceback from deep inside
    assert load_checkpoint(path, model, opt, sched)["step"] == 5


def test_stray_directories_do_not_crash_and_are_never_pruned(run):
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-final")  # complete, but not a step
    (run / "checkpoint-abc").mkdir()
    shutil.copytree(run / "checkpoint-5", run / "checkpoint-20-old")
    (run / "checkpoint-30").mkdir()
    (run / "checkpoint-30" / "my-notes.txt").write_text("not fourbit's")
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5", "checkpoint-10"]
    path, skipped = latest_good_checkpoint(run)
    assert path == run / "checkpoint-10"
    assert dict((p.name, r) for p, r in skipped) == {
        "checkpoint-30": "missing every checkpoint file",
        "checkpoint-final": "not named checkpoint-<step>: ignored",
        "checkpoint-abc": "not named checkpoint-<step>: ignored",
        "checkpoint-20-old": "not named checkpoint-<step>: ignored"}
    assert prune_broken_checkpoints(run) == []  # none of them is provably fourbit's own
    assert all((run / n).is_dir() for n in ("checkpoint-final", "checkpoint-abc", "checkpoint-20-old", "checkpoint-30"))


def test_half_deleted_checkpoints_and_unfinished_saves_are_pruned(run):
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-15")
    for name in ("trainer_state.json", "adapter_model.safetensors", "rng-0.json"):  # rmtree killed midway
        (run / "checkpoint-15" / name).unlink()
    (run / "checkpoint-20").mkdir()  # everything but the directory itself deleted
    shutil.copytree(run / "checkpoint-10", run / ".tmp-checkpoint-25")  # a save killed before its rename
    (run / ".tmp-checkpoint-25" / ".adapter_model.safetensors.x1y2").write_bytes(b"partial")
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-12")  # complete but corrupt: kept for a look
    _truncate(run / "checkpoint-12" / "optimizer.safetensors")
    path, skipped = latest_good_checkpoint(run)
    assert path == run / "checkpoint-10"
    assert [p.name for p, _ in skipped] == ["checkpoint-20", "checkpoint-15", "checkpoint-12"]
    assert "missing trainer_state.json, adapter_model.safetensors, rng-0.json" in skipped[1][1]
    pruned = prune_broken_checkpoints(run)
    assert [(p.name, r.split(":")[0]) for p, r in pruned] == [
        (".tmp-checkpoint-25", "an unfinished save (killed before it was published)"),
        ("checkpoint-15", "half deleted (missing trainer_state.json, adapter_model.safetensors, rng-0.json)"),
        ("checkpoint-20", "half deleted (missing every checkpoint file)")]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10", "checkpoint-12", "checkpoint-5"]
    assert latest_good_checkpoint(run)[0] == run / "checkpoint-10"


def test_no_good_checkpoint(run):
    for d in ("checkpoint-5", "checkpoint-10"):
        (run / d / "trainer_state.json").write_text("")
    path, skipped = latest_good_checkpoint(run)
    assert path is None and [p.name for p, _ in skipped] == ["checkpoint-10", "checkpoint-5"]
    assert latest_good_checkpoint(run / "nothing-here") == (None, [])


def test_rotation_keeps_directories_fourbit_did_not_write(run):
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (run / "checkpoint-1" / "thesis.tex").write_text("years of work")
    model, opt, sched = _train_state()
    save_checkpoint(run, 15, model, opt, sched, {}, keep=2)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1", "checkpoint-10", "checkpoint-15"]


def test_a_complete_save_killed_before_its_rename_is_published_not_pruned(run):
    """save_checkpoint replaces an existing checkpoint-<step> (the final save after a periodic one at the
    same step) by deleting it and renaming the new one into place: a kill in between leaves only the
    complete .tmp-checkpoint-<step>."""
    (run / "checkpoint-10").rename(run / ".tmp-checkpoint-10")
    assert latest_good_checkpoint(run)[0] == run / "checkpoint-5"
    assert prune_broken_checkpoints(run) == [(run / "checkpoint-10", "published: a complete save killed before its "
                                                                     "rename")]
    assert latest_good_checkpoint(run) == (run / "checkpoint-10", [])


def test_saving_over_a_users_directory_named_like_a_checkpoint_is_refused(run):
    (run / "checkpoint-15").mkdir()
    (run / "checkpoint-15" / "thesis.tex").write_text("years of work")
    model, opt, sched = _train_state()
    with pytest.raises(UserError, match=r"checkpoint-15 holds files fourbit did not write \(thesis.tex\).*move it"):
        save_checkpoint(run, 15, model, opt, sched, {}, keep=2)
    assert (run / "checkpoint-15" / "thesis.tex").read_text() == "years of work"
    assert not (run / ".tmp-checkpoint-15").exists() and latest_good_checkpoint(run)[0] == run / "checkpoint-10"
