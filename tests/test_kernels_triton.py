"""Triton kernels on CPU under TRITON_INTERPRET=1 (CI has no GPU): dequantization and quantization
bit-identical to the torch reference for every size/blocksize/type/dtype case; gemv within float32
accumulation tolerance of a float64 product (16-bit outputs: their rounding)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[gpu]' or '.[test]')")
@pytest.mark.slow
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interpret_check.py"))], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ALL-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_dispatch_uses_triton_only_on_cuda():
    from fourbit.quant.kernels import triton_4bit

    assert triton_4bit.available() == (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1")


@requires_cuda
def test_cuda_dequant_matches_cpu_reference():
    from fourbit.quant import dequantize_4bit, quantize_4bit

    w = torch.randn(1024, 777, dtype=torch.bfloat16)
    q, s = quantize_4bit(w)
    assert torch.equal(dequantize_4bit(q.cuda(), s.to("cuda")).cpu(), dequantize_4bit(q, s))
