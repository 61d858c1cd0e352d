"""Data-parallel and sharded (--fsdp) training under torchrun with the gloo backend, 2 processes on CPU.

Equivalence: 2 processes x batch 2 == 1 process x batch 4 (same global batch, same examples per
step): losses and adapter equal within float32 summation-order noise (adapter atol 5e-6, rtol 1e-4
after 6 steps at lr 1e-2; losses 1e-5). Failure: a
killed rank makes the run exit non-zero, promptly, naming the failed rank. Resume after kill -9 of
the whole run gives the same adapter as an uninterrupted 2-process run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import requires_smollm2

pytestmark = [requires_smollm2, pytest.mark.slow]

ARGS = ["--max-steps", "6", "--grad-accum", "2", "--lr", "1e-2", "--r", "4", "--dropout", "0", "--eval-size", "8",
        "--no-gradient-checkpointing", "--group-by-length", "false", "--threads", "1", "--dist-timeout", "60"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"Spell number {i}.", "input": "", "output": f"number {i} " * 2} for i in range(40)]
    p = tmp_path_factory.mktemp("ddp") / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _single(model, data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "fourbit", "train", "--model", str(model), "--data", data,
                             "--output", str(out), "--batch-size", "4", *ARGS, *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _torchrun(model, data, out, *extra):
    # `--` ends torchrun's own options (its parser would otherwise take --r for --rdzv-*)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "fourbit", "--", "train", "--model", str(model), "--data", data, "--output", str(out),
                             "--batch-size", "2", *ARGS, *extra], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_with_the_same_global_batch(tiny_chat_dir, data_file, tmp_path):
    one, two = _single(tiny_chat_dir, data_file, tmp_path / "one"), _torchrun(tiny_chat_dir, data_file, tmp_path / "two")
    out1, out2 = one.communicate(timeout=600)[0], two.communicate(timeout=600)[0]
    assert one.returncode == 0, out1[-3000:]
    assert two.returncode == 0, out2[-3000:]
    assert "2 processes" in out2
    a, b = load_file(str(tmp_path / "one/adapter_model.safetensors")), load_file(str(tmp_path / "two/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-6)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    assert not list((tmp_path / "two").glob("rank*"))  # rank 1 wrote nothing of its own


def _workers(torchrun_pid):
    import psutil

    return sorted((p for p in psutil.Process(torchrun_pid).children(recursive=True)
                   if "fourbit" in " ".join(p.cmdline())), key=lambda p: int(p.environ().get("RANK", "-1")))


def test_a_killed_rank_ends_the_run_with_an_error(tiny_chat_dir, data_file, tmp_path):
    run = _torchrun(tiny_chat_dir, data_file, tmp_path / "k", "--save-steps", "1", "--max-steps", "400")
    deadline = time.time() + 300
    while not (tmp_path / "k" / "checkpoint-1").exists():
        assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
        time.sleep(0.1)
    victim = _workers(run.pid)[-1]
    assert victim.environ()["RANK"] == "1"
    victim.send_signal(signal.SIGKILL)
    t = time.time()
    out = run.communicate(timeout=120)[0]
    assert run.returncode != 0 and time.time() - t < 120
    assert "Signal 9" in out or "SIGKILL" in out or "exitcode" in out.lower(), out[-3000:]


def test_resume_after_kill_9_of_the_whole_run(tiny_chat_dir, data_file, tmp_path):
    full = _torchrun(tiny_chat_dir, data_file, tmp_path / "full", "--save-steps", "2")
    assert full.wait(timeout=600) == 0
    run = _torchrun(tiny_chat_dir, data_file, tmp_path / "cut", "--save-steps", "2")
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoint-2").exists():
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    again = _torchrun(tiny_chat_dir, data_file, tmp_path / "cut", "--save-steps", "2", "--resume")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    a = load_file(str(tmp_path / "full/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut/adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_sharded_base_equals_one_process_and_resumes_exactly(tiny_chat_dir, data_file, tmp_path):
    """--fsdp: decoder layers (4-bit codes as float storage, LoRA, optimizer states) sharded over 2
    ranks. Same tolerances as the data-parallel test against 1 process x batch 4; each rank writes
    its optimizer shard; resuming from checkpoint-4 (a copy, as a crash after step 4 leaves it)
    reproduces the uninterrupted adapter bit for bit."""
    import shutil

    one = _single(tiny_chat_dir, data_file, tmp_path / "one")
    two = _torchrun(tiny_chat_dir, data_file, tmp_path / "two", "--fsdp", "--save-steps", "2")
    out1, out2 = one.communicate(timeout=600)[0], two.communicate(timeout=600)[0]
    assert one.returncode == 0, out1[-3000:]
    assert two.returncode == 0, out2[-3000:]
    a, b = load_file(str(tmp_path / "one/adapter_model.safetensors")), load_file(str(tmp_path / "two/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-6)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
    ckpt = tmp_path / "two" / "checkpoint-4"
    assert {p.name for p in ckpt.glob("optimizer*")} == {"optimizer-0.safetensors", "optimizer-1.safetensors"}
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(ckpt, cut / "checkpoint-4")
    again = _torchrun(tiny_chat_dir, data_file, cut, "--fsdp", "--save-steps", "2", "--resume")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "resuming from" in out, out[-3000:]
    c = load_file(str(cut / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_fsdp_needs_several_processes(tiny_chat_dir, data_file, tmp_path):
    r = _single(tiny_chat_dir, data_file, tmp_path / "x", "--fsdp")
    out = r.communicate(timeout=300)[0]
    assert r.returncode != 0 and "--fsdp shards the model across processes" in out, out[-2000:]
