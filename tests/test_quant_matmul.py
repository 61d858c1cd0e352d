"""matmul_4bit (y = x @ dequant(W)^T + b straight from the packed codes) against float64 and
against dequantize-then-matmul, on the CPU kernel's AVX2 and scalar paths.

Oracle: W dequantized to float64 holds exactly the float32 weights the kernel multiplies by
(code * block scale, rounded once to float32), so the float64 product differs from the kernel
only by float32 summation error. The bound used per output element is the textbook one for a
sum of n rounded additions, n * u * sum_k |x_k w_k| (u = 2^-24), with n the longest chain of
additions either path makes (K / 4 + 8); on top, the norm-relative error must stay below 1e-6.
Rows must be bit-identical however many rows x has and however many threads run (a batched
decoding engine relies on it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fourbit.quant import dequantize_4bit, matmul_4bit, matmul_4bit_reference, quantize_4bit
from fourbit.quant.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU kernel is not built")

U32 = 2.0**-24


@pytest.fixture(params=["avx2", "scalar"])
def path(request, monkeypatch):
    """Run the test on the AVX2 path (skipped where the CPU lacks it) and on the scalar one."""
    omp, avx2 = cpu._features()
    if request.param == "avx2" and not avx2:
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setattr(cpu, "_features", lambda: (omp, request.param == "avx2"))
    return request.param


def _weight(out_f, in_f, qt="nf4", bs=64, dq=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return quantize_4bit(w, qt, bs, dq)


def _check(y, x, packed, state, bias=None):
    """y against float64 (element bound + norm) and against dequantize + F.linear in float32."""
    k = state.shape[1]
    w64 = dequantize_4bit(packed, state, torch.float64)  # exactly the float32 weights
    x64 = x.double().reshape(-1, k)
    ref = x64 @ w64.T + (0 if bias is None else bias.double())
    bound = (k / 4 + 8) * U32 * (x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs()))
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound = {float((err / bound).max()):.3g}"
    assert float(err.norm() / ref.norm()) < 1e-6
    y32 = F.linear(x.reshape(-1, k), dequantize_4bit(packed, state, torch.float32), bias)
    assert float((y.reshape(y32.shape) - y32).norm() / y32.norm()) < 2e-6


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("bs", [64, 128, 256])
def test_matches_float64_and_dequantize_then_matmul(path, qt, dq, bs):
    packed, state = _weight(200, 384, qt, bs, dq, seed=bs)  # 384 % 256 != 0: blocks cross rows at bs 256
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(200, generator=torch.Generator().manual_seed(2))
    _check(matmul_4bit(x, packed, state, bias), x, packed, state, bias)
    _check(matmul_4bit(x, packed, state), x, packed, state)


@pytest.mark.parametrize("out_f, in_f, bs", [
    (37, 53, 64),    # odd K: rows start on a low nibble, n odd (padded last byte)
    (45, 96, 64),    # O * K not a multiple of the blocksize; K % 16 == 0 (AVX2 path) with rows crossing blocks
    (9, 40, 32),     # K % 16 != 0: the scalar path even on AVX2
    (3, 4096, 4096),  # one block per row, the largest blocksize
    (1, 16, 32),     # blocks span two rows
])
def test_odd_shapes(path, out_f, in_f, bs):
    packed, state = _weight(out_f, in_f, "nf4", bs, True)
    for rows in (1, 3, 16):
        x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
        bias = torch.randn(out_f)
        _check(matmul_4bit(x, packed, state, bias), x, packed, state, bias)


def test_rows_are_bit_identical_for_any_row_count(path):
    """y[i] of a batch equals y of row i alone, for 1..16 rows (and 33: several tiles)."""
    packed, state = _weight(300, 576, "nf4", 64, True)
    bias = torch.randn(300)
    x = torch.randn(33, 576)
    alone = torch.cat([matmul_4bit(x[i:i + 1], packed, state, bias) for i in range(33)])
    for rows in list(range(1, 17)) + [33]:
        assert torch.equal(matmul_4bit(x[:rows], packed, state, bias), alone[:rows]), rows
    assert torch.equal(matmul_4bit(x[5:13], packed, state, bias), alone[5:13])  # rows in other tile positions


def test_thread_count_does_not_change_the_result(path, monkeypatch):
    packed, state = _weight(301, 192, "fp4", 64, True)  # 301 rows: uneven split, a partial 4-row group
    x = torch.randn(7, 192)
    y1 = matmul_4bit(x, packed, state)
    n = torch.get_num_threads()
    monkeypatch.setattr(cpu, "_MIN_PY_SPLIT", 0)  # split even this small product over Python threads
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(matmul_4bit(x, packed, state), y1)
            omp, avx2 = cpu._features()
            monkeypatch.setattr(cpu, "_features", lambda: (False, avx2))  # Python threads split the rows
            assert torch.equal(matmul_4bit(x, packed, state), y1)
            monkeypatch.setattr(cpu, "_features", lambda: (omp, avx2))
    finally:
        torch.set_num_threads(n)


def test_build_without_openmp_gives_the_same_result(tmp_path):
    """FOURBIT_NO_OPENMP builds the library without -fopenmp (what a compiler without OpenMP
    gets): same bits, the rows split over Python threads."""
    packed, state = _weight(64, 128, "nf4", 64, True)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    save_file({"x": x, "y": matmul_4bit(x, packed, state)}, tmp_path / "ref.safetensors")
    code = textwrap.dedent(f"""
        import torch
        from fourbit.quant import quantize_4bit, matmul_4bit
        from fourbit.quant.kernels import cpu
        torch.manual_seed(0)
        w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
        packed, state = quantize_4bit(w, "nf4", 64, True)
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        assert not cpu._features()[0], "built with OpenMP despite FOURBIT_NO_OPENMP"
        torch.set_num_threads(2)
        cpu._MIN_PY_SPLIT = 0
        assert torch.equal(matmul_4bit(ref["x"], packed, state), ref["y"])
    """)
    env = {**os.environ, "FOURBIT_NO_OPENMP": "1", "FOURBIT_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_leading_dims_half_inputs_and_padded_storage():
    packed, state = _weight(64, 128, "nf4", 64, True)
    x = torch.randn(2, 3, 128)
    y = matmul_4bit(x, packed, state)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y.reshape(6, 64), matmul_4bit(x.reshape(6, 128), packed, state))
    for dtype in (torch.bfloat16, torch.float16):
        yh = matmul_4bit(x.to(dtype), packed, state)
        assert yh.dtype == dtype
        assert torch.equal(yh, matmul_4bit(x.to(dtype).float(), packed, state).to(dtype))  # float32 inside
    raw = packed.view(-1)
    padded = torch.cat([raw, torch.zeros(-raw.numel() % 4 + 4, dtype=torch.uint8)])  # FSDP-style float storage
    p32 = padded.view(torch.float32).view(-1, 1)
    assert torch.equal(matmul_4bit(x, p32, state), y)
    assert torch.equal(matmul_4bit(x[0], p32.view(-1)[:], state), y[0])  # a fresh view of the bytes
    assert torch.equal(matmul_4bit_reference(x, p32, state), matmul_4bit_reference(x, packed, state))


def test_reference_fallback_and_errors():
    packed, state = _weight(64, 128, "fp4", 128, False)
    x = torch.randn(4, 128)
    _check(matmul_4bit_reference(x, packed, state), x, packed, state)
    with pytest.raises(ValueError, match="last dim must be 128"):
        matmul_4bit(torch.randn(2, 127), packed, state)
    with pytest.raises(ValueError, match="needs 4096"):
        matmul_4bit(x, packed[:100], state)


def test_descriptor_cache_does_not_grow():
    packed, state = _weight(32, 64, "nf4", 64, True)
    x = torch.randn(1, 64)
    matmul_4bit(x, packed, state)
    size = len(cpu._W4S)
    for _ in range(5):
        matmul_4bit(x, packed.view(-1), state)  # new view objects of the same bytes
    assert len(cpu._W4S) == size
    del state
    import gc

    gc.collect()
    assert len(cpu._W4S) == size - 1


# -- Linear4bit and LoraLinear take this path when no gradient is needed ---------------------------
def _layers(out_f=40, in_f=96, r=8):
    from torch import nn

    from fourbit.nn import Linear4bit, LoraLinear

    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(in_f, out_f))
    lora = LoraLinear(Linear4bit.from_linear(nn.Linear(in_f, out_f)), r=r, alpha=16)
    torch.nn.init.normal_(lora.lora_B.weight)  # a trained-looking adapter, not the zero init
    return q, lora


def test_linear4bit_uses_the_kernel_for_few_rows_without_grad():
    from fourbit.nn.linear4bit import _Linear4bitFn
    from fourbit.quant import SKINNY_MAX_ROWS

    q, _ = _layers()
    for rows in (1, 7, SKINNY_MAX_ROWS):
        x = torch.randn(rows, 96)
        with torch.no_grad():
            y = q(x)
        assert torch.equal(y, matmul_4bit(x, q.packed, q.quant_state, q.bias))
        _check(y, x, q.packed, q.quant_state, q.bias)
        y_train = q(x.clone().requires_grad_()).detach()  # the autograd path: dequantize + F.linear
        assert float((y - y_train).norm() / y_train.norm()) < 2e-6
    x = torch.randn(SKINNY_MAX_ROWS + 1, 96)
    with torch.no_grad():  # more rows: dequantize + sgemm, exactly the autograd function's forward
        assert torch.equal(q(x), _Linear4bitFn.apply(x, q.packed, q.quant_state, q.bias))


def test_lora_generation_path_matches_the_fused_training_path():
    _, lora = _layers()
    lora.eval()
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        y = lora(x)  # base product from the codes + unmerged adapter
    y_fused = lora(x)  # grad enabled and adapters trainable: the fused autograd path
    assert y_fused.requires_grad and not y.requires_grad
    assert float((y - y_fused.detach()).norm() / y_fused.norm()) < 2e-6
    with torch.no_grad():
        base = lora.base_layer
        ref = (x.double() @ base.dequantize(torch.float64).T + base.bias.double()
               + lora.scaling * (x.double() @ lora.lora_A.weight.double().T) @ lora.lora_B.weight.double().T)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6


# -- batch_invariant_linear: the float32 products beside a 4-bit one -------------------------------
@pytest.mark.parametrize("out_f, in_f", [(64, 576), (576, 64), (37, 13)])  # LoRA A, LoRA B, the scalar path
def test_batch_invariant_linear(path, out_f, in_f):
    from fourbit.quant import batch_invariant_linear

    g = torch.Generator().manual_seed(out_f)
    w, b, x = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g), torch.randn(16, in_f, generator=g)
    y = batch_invariant_linear(x, w, b)
    ref = x.double() @ w.double().T + b.double()
    bound = (in_f / 4 + 8) * U32 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    assert bool(((y.double() - ref).abs() <= bound).all())
    alone = torch.cat([batch_invariant_linear(x[i:i + 1], w, b) for i in range(16)])
    for rows in (1, 2, 3, 5, 8, 16):
        assert torch.equal(batch_invariant_linear(x[:rows], w, b), alone[:rows])


def test_lora_generation_rows_are_bit_identical_for_any_row_count():
    _, lora = _layers(out_f=64, in_f=128, r=16)
    lora.eval()
    x = torch.randn(9, 128)
    with torch.no_grad():
        alone = torch.cat([lora(x[i:i + 1]) for i in range(9)])
        for rows in (2, 4, 9):
            assert torch.equal(lora(x[:rows]), alone[:rows])
