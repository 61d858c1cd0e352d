"""Every Triton kernel of fourbit.quant.kernels.triton_4bit on CPU tensors under TRITON_INTERPRET=1,
against the pure-torch reference in fourbit.quant.blockwise. Run by tests/test_kernels_triton.py in
a subprocess (the variable must be set before triton is imported):

    TRITON_INTERPRET=1 python tests/triton_interpret_check.py [part ...]

Parts: dequant, quant, gemv, gemv_split, cache. Prints one JSON line per part:
{"part": ..., "cases": N, "failures": [first few failing cases]} and exits 1 if any failed.

Tolerances: dequantization and quantization must be bit-identical (torch.equal, which also
compares the sign of zero and NaN positions). gemv: ||y - ref|| / ||ref|| against a float64
product of the dequantized weight, below 1e-5 for float32 output (float32 accumulation in
another order) and below half an ulp of the output dtype plus that (bf16 4e-3, fp16 5e-4); the
split-K gemv to the same tolerance, and bit-identical from one call to the next.
"""

import itertools
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import torch  # noqa: E402

from fourbit.quant import quantize_4bit  # noqa: E402
from fourbit.quant.blockwise import _dequant4_reference, _quant4_reference, dequantize_absmax  # noqa: E402
from fourbit.quant.kernels import triton_4bit as T  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GEMV_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def weight(n: int, dtype: torch.dtype, bs: int, gen: torch.Generator) -> torch.Tensor:
    """Random normal weights with an all-zero block (where there is room) and a huge outlier."""
    w = torch.randn(n, generator=gen) * 0.05
    if n >= 3 * bs:
        w[bs: 2 * bs] = 0  # an all-zero block: code 0 (CUDA rule) or the zero code (CPU rule)
    if n > 5:
        w[n // 2] = 40.0  # a block whose other values all round to the codes near 0
    return w.to(dtype)


def check_dequant(gen):
    """Every size/blocksize/type/DQ case, cycling through output dtypes and tile sizes."""
    fails, cases = [], 0
    out_cycle = itertools.cycle(DTYPES)
    kind_cycle = itertools.cycle(itertools.product(("nf4", "fp4"), (True, False)))
    for n, bs, wdt in itertools.product((1, 2, 63, 65, 1000, 64 * 37 + 1, 8192), (64, 128, 256), DTYPES):
        qt, dq = next(kind_cycle)
        q, s = quantize_4bit(weight(n, wdt, bs, gen), qt, bs, dq)
        odt = next(out_cycle)
        # the default tile (many blocks per program, one partial program) and, where the
        # interpreter can afford it, tiny tiles (one or two blocks per program, many programs)
        tiles = [(2048, None)] + ([(bs // 2, 1), (bs, 2)] if n <= 1000 else [])
        for block_bytes, warps in tiles:
            got = T.dequantize_4bit(q.view(-1), s, odt, block_bytes=block_bytes, num_warps=warps)
            ref = _dequant4_reference(q, dequantize_absmax(s), s.code, n, bs, odt).view(s.shape)
            cases += 1
            if got.shape != ref.shape or not torch.equal(got, ref):
                fails.append(dict(n=n, bs=bs, qt=qt, dq=dq, w=str(wdt), out=str(odt), tile=block_bytes))
    for bs in (32, 512, 4096):  # the blocksize extremes, one program per block (rows = 1) at 4096
        n = 3 * bs + 7
        q, s = quantize_4bit(weight(n, torch.float32, bs, gen), "nf4", bs, True)
        for odt in DTYPES:
            got = T.dequantize_4bit(q.view(-1), s, odt)
            cases += 1
            if not torch.equal(got, _dequant4_reference(q, dequantize_absmax(s), s.code, n, bs, odt).view(s.shape)):
                fails.append(dict(n=n, bs=bs, out=str(odt)))
    # `out` is filled in place and returned; a 2-D weight keeps its shape
    q, s = quantize_4bit(weight(48 * 96, torch.bfloat16, 64, gen).view(48, 96))
    out = torch.full((48, 96), float("nan"), dtype=torch.bfloat16)
    got = T.dequantize_4bit(q.view(-1), s, torch.bfloat16, out)
    cases += 1
    if got is not out or not torch.equal(out, _dequant4_reference(q, dequantize_absmax(s), s.code, 48 * 96, 64,
                                                                   torch.bfloat16).view(48, 96)):
        fails.append(dict(case="out= in place"))
    return cases, fails


def check_quant(gen):
    """Packed bytes and absmax equal to the reference, both rounding rules."""
    fails, cases = [], 0
    w_cycle = itertools.cycle(DTYPES)
    qt_cycle = itertools.cycle(("nf4", "fp4"))
    for n, bs, rule in itertools.product((1, 2, 63, 65, 1000, 64 * 37 + 1), (64, 128, 256), ("nearest", "bnb-cpu")):
        for wdt in (next(w_cycle), next(w_cycle)):
            qt = next(qt_cycle)
            w = weight(n, wdt, bs, gen)
            if n % bs and n > bs and rule == "bnb-cpu" and wdt == torch.float32:
                w[-(n % bs):] = 0  # an all-zero partial last block: CPU rule clamps and stores 1e-38
            pk, am = T.quantize_4bit(w, qt, bs, rule)
            rp, ra = _quant4_reference(w, qt, bs, rule)
            cases += 1
            if not (torch.equal(pk, rp) and torch.equal(am, ra)):
                fails.append(dict(n=n, bs=bs, qt=qt, w=str(wdt), rule=rule, bytes_differ=int((pk != rp).sum()),
                                  absmax_differ=int((am != ra).sum())))
    for bs in (32, 4096):
        w = weight(2 * bs + 3, torch.bfloat16, bs, gen)
        pk, am = T.quantize_4bit(w, "nf4", bs, "nearest")
        rp, ra = _quant4_reference(w, "nf4", bs, "nearest")
        cases += 1
        if not (torch.equal(pk, rp) and torch.equal(am, ra)):
            fails.append(dict(n=w.numel(), bs=bs))
    w = torch.randn(300, generator=gen)
    w[130] = float("nan")  # a NaN poisons its block's absmax (so quantize_4bit refuses it), not others
    _, am = T.quantize_4bit(w, "nf4", 64, "nearest")
    cases += 1
    if not (torch.isnan(am[2]) and torch.isfinite(am[[0, 1, 3, 4]]).all()):
        fails.append(dict(case="NaN absmax", absmax=am.tolist()))
    return cases, fails


def check_gemv(gen):
    """Normwise error of x @ W^T against float64; None when rows do not start on a block."""
    fails, cases, worst = [], 0, {}
    kind_cycle = itertools.cycle(itertools.product(("nf4", "fp4"), (True, False)))
    tile_cycle = itertools.cycle([(8, 8), (16, 2), (4, 1)])
    for (rows, cols, bs), dt in itertools.product([(33, 320, 64), (8, 256, 128), (20, 192, 64), (5, 512, 128)], DTYPES):
        qt, dq = next(kind_cycle)
        w = torch.randn(rows, cols, generator=gen)
        q, s = quantize_4bit(w, qt, bs, dq)
        x = torch.randn(cols, generator=gen).to(dt)
        ref = _dequant4_reference(q, dequantize_absmax(s), s.code, rows * cols, bs, torch.float64).view(rows, cols) \
            @ x.double()
        block_n, groups = next(tile_cycle)
        y = T.gemv_4bit(x.view(1, 1, cols), q, s, block_n=block_n, groups=groups)
        cases += 1
        err = ((y.double().view(-1) - ref).norm() / ref.norm()).item()
        worst[str(dt)] = max(worst.get(str(dt), 0.0), err)
        if y.shape != (1, 1, rows) or y.dtype != dt or not err < GEMV_TOL[dt]:
            fails.append(dict(shape=[rows, cols], bs=bs, qt=qt, dq=dq, dtype=str(dt), tile=[block_n, groups],
                              err=err, out_shape=list(y.shape)))
    q, s = quantize_4bit(torch.randn(8, 100, generator=gen))
    cases += 1
    if T.gemv_4bit(torch.randn(100), q, s) is not None:  # 100 % 64: the caller must dequantize instead
        fails.append(dict(case="K not a multiple of the blocksize returns None"))
    return cases, fails, worst


def check_gemv_split(gen):
    """gemv_4bit_split against float64 (the gemv tolerance) over tile sizes and splits, K split
    unevenly and into more programs than it has tiles; a second call gives the same bits (fixed
    summation order) and leaves every arrival counter at 0 for the next call."""
    fails, cases, worst = [], 0, {}
    kind_cycle = itertools.cycle(itertools.product(("nf4", "fp4"), (True, False)))
    dt_cycle = itertools.cycle(DTYPES)
    tiles = [(4, 8, 4), (8, 2, 3), (2, 1, 5), (16, 4, 1), (4, 4, 2), (1, 2, 8)]  # block_n, groups, split_k
    shapes = [(33, 320, 64), (8, 256, 128), (20, 192, 64), (5, 512, 128), (3, 64, 64)]
    for (rows, cols, bs), (block_n, groups, split_k) in itertools.product(shapes, tiles):
        qt, dq = next(kind_cycle)
        dt = next(dt_cycle)
        w = torch.randn(rows, cols, generator=gen)
        q, s = quantize_4bit(w, qt, bs, dq)
        x = torch.randn(cols, generator=gen).to(dt)
        ref = _dequant4_reference(q, dequantize_absmax(s), s.code, rows * cols, bs, torch.float64).view(rows, cols) \
            @ x.double()
        y = T.gemv_4bit_split(x.view(1, 1, cols), q, s, block_n=block_n, groups=groups, split_k=split_k)
        again = T.gemv_4bit_split(x.view(1, 1, cols), q, s, block_n=block_n, groups=groups, split_k=split_k)
        cases += 1
        err = ((y.double().view(-1) - ref).norm() / ref.norm()).item()
        worst[str(dt)] = max(worst.get(str(dt), 0.0), err)
        counts = T._COUNTS.get(torch.device("cpu"))
        if y.shape != (1, 1, rows) or y.dtype != dt or not err < GEMV_TOL[dt] or not torch.equal(y, again) \
                or (counts is not None and counts.any()):
            fails.append(dict(shape=[rows, cols], bs=bs, qt=qt, dq=dq, dtype=str(dt), tile=[block_n, groups, split_k],
                              err=err, same_twice=bool(torch.equal(y, again)),
                              counts_left=None if counts is None else int(counts.count_nonzero())))
    q, s = quantize_4bit(torch.randn(8, 100, generator=gen))
    cases += 1
    if T.gemv_4bit_split(torch.randn(100), q, s) is not None:
        fails.append(dict(case="K not a multiple of the blocksize returns None"))
    return cases, fails, worst


def check_cache(gen):
    """The pair table follows its code book: shared between equal books, rebuilt after an in-place edit."""
    from fourbit.quant.codebook import get_code

    fails = []
    a, b = get_code("nf4", "cpu").clone(), get_code("nf4", "cpu").clone()
    ta, tb = T.pair_table(a), T.pair_table(b)
    if ta is not tb:
        fails.append("equal code books should share one table")
    pairs = ta.view(torch.float32).view(256, 2)
    idx = torch.arange(256)
    if not (torch.equal(pairs[:, 0], a[idx >> 4]) and torch.equal(pairs[:, 1], a[idx & 15])):
        fails.append("table entry b must hold (code[b >> 4], code[b & 15])")
    a.mul_(2)
    if not torch.equal(T.pair_table(a).view(torch.float32).view(256, 2)[:, 0], a[idx >> 4]):
        fails.append("an in-place change of the code book must rebuild its table")
    q, s = quantize_4bit(torch.randn(640, generator=gen))
    s.code = s.code.flip(0).clone()  # any 16 values are a valid book: the kernel must use this one
    if not torch.equal(T.dequantize_4bit(q.view(-1), s, torch.float32),
                       _dequant4_reference(q, dequantize_absmax(s), s.code, 640, 64, torch.float32)):
        fails.append("dequantization with a custom code book")
    return 4, fails


PARTS = {"dequant": check_dequant, "quant": check_quant, "gemv": check_gemv, "gemv_split": check_gemv_split,
         "cache": check_cache}


def main(argv):
    ok = True
    for part in argv or list(PARTS):
        gen = torch.Generator().manual_seed(0)
        res = PARTS[part](gen)
        line = dict(part=part, cases=res[0], failures=res[1][:5], n_failures=len(res[1]))
        if len(res) > 2:
            line["worst_error"] = res[2]
        ok &= not res[1]
        print(json.dumps(line), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
