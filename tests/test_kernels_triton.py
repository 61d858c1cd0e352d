"""Triton kernels without a GPU (CI is CPU-only), two ways:

1. Under TRITON_INTERPRET=1 on CPU tensors (tests/triton_interpret_check.py, run once in a
   subprocess because the variable must be set before triton is imported): dequantization and
   quantization bit-identical to the torch reference across sizes (odd, partial last block),
   blocksizes 32..4096, NF4/FP4, with/without double quantization, fp32/bf16/fp16 in and out,
   both rounding rules; gemv within a normwise tolerance of a float64 product.
2. Compiled for an H100 (sm_90) with Triton's bundled ptxas, no device needed: what the GPU will
   run compiles, keeps its vectorized loads/stores and does not spill to local memory.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda

HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[gpu]')")
CHECK = Path(__file__).with_name("triton_interpret_check.py")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """{part: result line} from one interpreter run of every kernel check."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True, timeout=600)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        pytest.fail(f"the interpreter check printed no results (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return {ln["part"]: ln for ln in lines}


@requires_triton
@pytest.mark.slow
@pytest.mark.parametrize("part", ["dequant", "quant", "gemv", "gemv_split", "cache"])
def test_kernel_under_the_interpreter(interpreted, part):
    res = interpreted.get(part)
    assert res is not None, f"part {part} did not run; got {sorted(interpreted)}"
    assert res["cases"] > 0 and res["n_failures"] == 0, json.dumps(res, indent=1)


# -- compiled for sm_90 -------------------------------------------------------------------------
def _compile(fn, types: dict, constexprs: dict, num_warps: int, **options):
    """triton.compile for an H100 with the specialisation a launch with 16-byte-aligned pointers
    and sizes divisible by 16 would get."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: types.get(a, "constexpr") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in types.items()
             if t.startswith("*") or t == "i32"}
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **options})


def _specs():
    from fourbit.quant.kernels import triton_4bit as T

    scale = dict(absmax_ptr="*fp32", q8_ptr="*u8", code2_ptr="*fp32", offset="fp32")
    deq = dict(packed_ptr="*u8", pairs_ptr="*i64", n="i32", nbytes="i32", nblocks="i32", **scale)
    for out, ot in ((0, "*fp32"), (1, "*bf16"), (2, "*fp16")):
        yield (f"dequant->{ot[1:]}", T._dequant_kernel, dict(deq, out_ptr=ot),
               dict(BLOCKSIZE=64, NESTED_BS=256, DQ=True, OUT=out, ROWS=64, EVEN=True, INTERP=False), 4,
               dict(enable_fp_fusion=False), ["ld.global.v4.b32", "ld.global.b64", "st.global.v4"])
    yield ("dequant odd size", T._dequant_kernel, dict(deq, out_ptr="*bf16"),
           dict(BLOCKSIZE=128, NESTED_BS=256, DQ=False, OUT=1, ROWS=16, EVEN=False, INTERP=False), 4,
           dict(enable_fp_fusion=False), [])
    q = dict(packed_ptr="*u8", absmax_ptr="*fp32", mids_ptr="*fp32", order_ptr="*u8", n="i32", nbytes="i32",
             nblocks="i32")
    for rule in (False, True):
        yield (f"quantize cpu_rule={rule}", T._quant_kernel, dict(q, x_ptr="*bf16"),
               dict(ZERO_CODE=7, BLOCKSIZE=64, NB=16, EVEN=not rule, CPU_RULE=rule), 4, dict(enable_fp_fusion=False),
               ["div.rn.f32"])
    yield ("gemv", T._gemv_kernel, dict(x_ptr="*bf16", packed_ptr="*u8", pairs_ptr="*i64", y_ptr="*bf16", N="i32",
                                        K="i32", **scale),
           dict(BLOCKSIZE=64, NESTED_BS=256, DQ=True, OUT=1, BLOCK_N=8, GROUPS=8, INTERP=False), 4,
           dict(enable_fp_fusion=True), ["ld.global.b64"])
    split = dict(x_ptr="*bf16", packed_ptr="*u8", pairs_ptr="*i64", y_ptr="*bf16", part_ptr="*fp32", count_ptr="*i32",
                 N="i32", K="i32", **scale)
    for block_n, groups, split_k in ((4, 8, 4), (8, 16, 1), (2, 16, 8)):  # the default and the sweep's corners
        yield (f"gemv split {block_n}/{groups}/{split_k}", T._gemv_split_kernel, split,
               dict(BLOCKSIZE=64, NESTED_BS=256, DQ=True, OUT=1, BLOCK_N=block_n, GROUPS=groups, SPLIT_K=split_k,
                    INTERP=False), 4, dict(enable_fp_fusion=True),
               ["ld.global.b64"] + (["atom.global.gpu.acq_rel.add", "ld.global.cg"] if split_k > 1 else []))


@requires_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreter objects here")
def test_kernels_compile_for_h100_without_spills():
    problems = []
    for name, fn, types, consts, warps, opts, must in _specs():
        try:
            k = _compile(fn, types, consts, warps, **opts)
        except Exception as e:  # noqa: BLE001  (report every kernel, not just the first)
            problems.append(f"{name}: does not compile for sm_90: {type(e).__name__}: {str(e)[:300]}")
            continue
        ptx = k.asm["ptx"]
        if ".local" in ptx:
            problems.append(f"{name}: uses local memory (register spills)")
        problems += [f"{name}: expected {m!r} in the PTX" for m in must if m not in ptx]
        if "dequant->" in name:  # the exact kernels must not fuse the double-quant multiply-add
            if re.search(r"\bfma\.rn\.f32", ptx):
                problems.append(f"{name}: contains fma.rn.f32 (double quantization must round twice)")
    assert not problems, "\n".join(problems)


# -- dispatch -----------------------------------------------------------------------------------
@requires_triton
def test_dispatch_uses_triton_only_on_cuda():
    from fourbit.quant.kernels import triton_4bit

    assert triton_4bit.available() == (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_match_cpu(dtype):
    from fourbit.quant import dequantize_4bit, quantize_4bit

    w = torch.randn(1024, 777, dtype=dtype)
    q, s = quantize_4bit(w)
    assert torch.equal(dequantize_4bit(q.cuda(), s.to("cuda")).cpu(), dequantize_4bit(q, s))
    qc, sc = quantize_4bit(w.cuda(), double_quant=False)
    qr, sr = quantize_4bit(w, double_quant=False)
    assert torch.equal(qc.cpu(), qr) and torch.equal(sc.absmax.cpu(), sr.absmax)


# -- the GPU benchmark script, checked on CPU before GPU time is spent on it ----------------------
@requires_triton
@pytest.mark.slow
def test_gpu_bench_dry_run():
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(script), "--dry-run"], env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "failed" not in out.lower(), out[-4000:]
    summary = out[out.index("# summary"):]
    exact = [ln for ln in summary.splitlines() if "bit-exact" in ln or "== torch reference" in ln]
    assert len(exact) == 8 and all("False" not in ln for ln in exact), "\n".join(exact)
    loss = next(ln for ln in summary.splitlines() if "first-step loss" in ln).split("|")
    assert abs(float(loss[3]) - float(loss[4])) < 1e-3, loss  # same tiny fp32 model, fourbit vs PEFT+bnb
