"""Run by test_kernels_triton.py in a subprocess with TRITON_INTERPRET=1: every Triton kernel on CPU
tensors against the pure-torch reference. Prints one JSON line per case."""

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import torch  # noqa: E402

from fourbit.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from fourbit.quant.blockwise import _quant4_reference  # noqa: E402
from fourbit.quant.kernels import triton_4bit as T  # noqa: E402


def main():
    torch.manual_seed(0)
    ok = True
    for n in (1, 63, 64, 65, 1000, 64 * 37 + 1):
        for bs in (64, 128, 256):
            for qt in ("nf4", "fp4"):
                for dq in (True, False):
                    for dt in (torch.float32, torch.bfloat16, torch.float16):
                        w = torch.randn(n, dtype=dt)
                        w[: min(bs, n // 2)] = 0  # an all-zero block where there is room
                        q, s = quantize_4bit(w, qt, bs, dq)
                        deq = torch.equal(T.dequantize_4bit(q.view(-1), s, dt), dequantize_4bit(q, s))
                        pk, am = T.quantize_4bit(w, qt, bs, "nearest")
                        rp, ra = _quant4_reference(w, qt, bs, "nearest")
                        quant = torch.equal(pk, rp) and torch.equal(am, ra)
                        case = dict(n=n, bs=bs, qt=qt, dq=dq, dtype=str(dt), dequant_exact=deq, quant_exact=quant)
                        ok &= deq and quant
                        if not (deq and quant):
                            print(json.dumps(case))
    for (rows, cols), dt in [((48, 256), torch.float32), ((33, 320), torch.bfloat16), ((64, 64), torch.float16)]:
        w = torch.randn(rows, cols)
        q, s = quantize_4bit(w)
        x = torch.randn(cols).to(dt)
        y = T.gemv_4bit(x, q, s, block_n=16, groups=2)
        ref = (dequantize_4bit(q, s, torch.float64) @ x.double())
        tol = 1e-4 if dt == torch.float32 else 2e-2  # float32 accumulation; 16-bit output rounding
        err = ((y.double() - ref).abs() / (ref.abs() + 1)).max().item()
        ok &= err < tol
        print(json.dumps(dict(gemv=[rows, cols], dtype=str(dt), rel_err=err, tol=tol)))
    w = torch.randn(8, 100)
    q, s = quantize_4bit(w)
    ok &= T.gemv_4bit(torch.randn(100), q, s) is None  # rows not on block boundaries: caller falls back
    print("ALL-OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
