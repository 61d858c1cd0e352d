"""bench/gpu_headline.py is run once, on a lent GPU, with no second chance: its CPU dry run
(TRITON_INTERPRET=1, tiny shapes) must finish every section without a failure, and on the CPU
allocator the memory model must predict the measured step growth of the 65B/33B/7B-shaped runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_finishes_every_section_and_the_memory_model_predicts_the_cpu_peak(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_headline.py"), "--dry-run",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "run.json").read_text())["rows"]
    sections = {r["section"] for r in rows}
    assert sections == {"65b", "65b-seq", "33b", "7b-memory", "train", "paged", "decode", "gemv"}
    failed = [r for r in rows if r["name"].startswith("SECTION")]
    assert not failed, failed
    growth = [r for r in rows if r["name"].startswith("step growth")]
    assert len(growth) == 4
    for r in growth:  # measured / predicted, on the CPU allocator's exact counter
        assert 0.9 <= r["fourbit"] / r["other"] <= 1.1, r
    assert (tmp_path / "run.txt").read_text().count("| gemv |") >= 6
