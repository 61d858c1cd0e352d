"""bench/cpu.py --quick --dry-run: the harness runs every decode and batch side on a tiny random Llama
and prints one table with a row per side (skipped sides say why), then the lm_head table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import requires_bnb, requires_smollm2

BENCH = Path(__file__).resolve().parents[1] / "bench" / "cpu.py"


@requires_smollm2  # the dry run borrows SmolLM2's tokenizer and chat template
@requires_bnb
@pytest.mark.slow
def test_dry_run_prints_the_table(capsys):
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--dry-run", "--threads", "1"])
    main_table, head_table = out.split("\n\n")
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(bench.DECODE_SIDES) + len(bench.BATCH_SIDES) + 4
    measured = {r.split(" | ")[1]: r for r in rows if "tok/s" in r}
    assert {"fourbit engine", "transformers+bnb", "transformers fp32", "fourbit + transformers generate"} <= set(measured)
    assert "skipped: dry run" in next(r for r in rows if "llama.cpp" in r)
    for r in measured.values():
        assert float(r.split(" | ")[2].split()[0]) > 0
    head_rows = head_table.splitlines()[-4:]
    assert [r.split(" | ")[0] for r in head_rows] == ["| float32 (blocks of 2 rows)",
                                                     "| float16 screen + float32 check (engine default, greedy)",
                                                     "| bfloat16 copy", "| int8 copy (fbgemm dynamic, per-row scales)"]
    assert head_rows[1].endswith("| 4/4 |")  # the screen's greedy tokens are the float32 head's
