"""Triton kernels for CUDA: 4-bit dequantization (double quantization resolved in the same pass),
quantization, and a fused 4-bit matrix-vector product for batch-1 generation.

    dequantize_4bit(packed, state, dtype, out)      -> W of state.shape     bit-identical to the reference
    quantize_4bit(x, quant_type, blocksize, rounding) -> (packed, absmax)   bit-identical to the reference
    gemv_4bit(x, packed, state)                     -> x @ W^T              float32 accumulation
    gemv_4bit_split(x, packed, state, split_k=4)    -> x @ W^T              the same, K split over programs

`fourbit.quant.blockwise` dispatches CUDA tensors here when `available()`; the pure-torch
reference there (`_quant4_reference`, `_dequant4_reference`) is what every kernel must match.
tests/test_kernels_triton.py runs all of them on CPU under TRITON_INTERPRET=1; `bench/gpu.py`
checks them at real sizes against the reference and bitsandbytes on a GPU, and times them.

# Note: Pair table
Dequantization is memory-bound only if the arithmetic per element stays small: at ~3 TB/s an
H100 must turn out ~1.2e12 bf16 elements per second, and with two gathers of `code[nibble]`
(each a 64-bit address computation plus a load) and the nibble shifts, issue slots ran out
first (17 SASS instructions per element, ~70% of copy bandwidth measured). Instead each packed
byte indexes a 256-entry table of int64 pairs (code[hi] in the low half, code[lo] in the high
half, built once per code book on the device), so one 8-byte gather yields both values of a
byte: ~8 instructions per element (counted in the sm_90 SASS of the compiled kernel).

# Note: Exact float arithmetic
The reference rounds twice when resolving double quantization (dyn[q8] * absmax2, then + offset)
and computes 1 / absmax correctly rounded. Triton would fuse the first into an FMA and use an
approximate reciprocal, so the exact kernels are compiled with `enable_fp_fusion=False` and
divide with `div_rn`. float32 -> fp16/bf16 rounds to nearest even, like torch. The interpreter's
own bf16 cast truncates, so under TRITON_INTERPRET=1 the kernels round to bf16 with integer ops
(the same result as the GPU's cvt.rn.bf16.f32, which the GPU path uses).
"""

from __future__ import annotations

import os
import weakref
from functools import lru_cache

import torch

from fourbit.quant.codebook import quantize_bounds, zero_code

try:
    import triton
    import triton.language as tl
except ImportError:  # fourbit works without Triton; CUDA tensors then use the torch reference
    triton = None

_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_INTERP = interpreting()  # fixed when triton is imported (the interpreter replaces triton.jit then)


@lru_cache(maxsize=1)
def available() -> bool:
    """Triton importable and a CUDA device present (the interpreter is for tests, not dispatch)."""
    return triton is not None and torch.cuda.is_available() and not interpreting()


if triton is not None:

    @triton.jit
    def _round(y, OUT: tl.constexpr, INTERP: tl.constexpr):
        """float32 -> the output dtype (0 fp32, 1 bf16, 2 fp16), round to nearest even."""
        if OUT == 1:
            if INTERP:  # the interpreter's cast truncates: spell RNE out in integer ops
                bits = y.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                y = y.to(tl.bfloat16)
        elif OUT == 2:
            y = y.to(tl.float16)
        return y

    @triton.jit
    def _block_scale(absmax_ptr, blk, q8_ptr, code2_ptr, offset, NESTED_BS: tl.constexpr, DQ: tl.constexpr, mask):
        """float32 scale of block(s) `blk`: absmax, or dyn[q8] * absmax2 + offset (two roundings)."""
        if DQ:
            q8 = tl.load(q8_ptr + blk, mask=mask, other=0)
            s = tl.load(code2_ptr + q8, mask=mask, other=0.0) * tl.load(absmax_ptr + blk // NESTED_BS, mask=mask,
                                                                        other=0.0)
            return s + offset
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)

    @triton.jit
    def _unpair(v):
        """int64 pair-table entries -> (code of the high nibble, code of the low nibble), float32."""
        hi = v.to(tl.int32).to(tl.float32, bitcast=True)  # truncation keeps the low 32 bits
        lo = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return hi, lo

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, pairs_ptr, out_ptr, n, nbytes, nblocks, q8_ptr, code2_ptr, offset,
                        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, OUT: tl.constexpr,
                        ROWS: tl.constexpr, EVEN: tl.constexpr, INTERP: tl.constexpr):
        """ROWS quantization blocks per program as a (ROWS, BLOCKSIZE / 2) tile of bytes: each byte
        read once (16-byte loads), one pair gather per byte, each block's scale once. EVEN: n is a
        multiple of the blocksize, so whole rows are in or out (masks constant along a row keep
        the loads and stores vectorized)."""
        BB: tl.constexpr = BLOCKSIZE // 2
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,)
        bm = blk < nblocks
        boffs = blk[:, None] * BB + tl.arange(0, BB)[None, :]  # (R, BB) byte index
        offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (R, BS) element index
        if EVEN:
            lmask = bm[:, None]
            smask = bm[:, None]
        else:
            lmask = boffs < nbytes
            smask = offs < n
        byte = tl.load(packed_ptr + boffs, mask=lmask, other=0)  # (R, BB) uint8
        s = _block_scale(absmax_ptr, blk, q8_ptr, code2_ptr, offset, NESTED_BS, DQ, bm)  # (R,)
        hi, lo = _unpair(tl.load(pairs_ptr + byte.to(tl.int32)))  # (R, BB) each
        y = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE)) * s[:, None]  # element 2i = high nibble of byte i
        tl.store(out_ptr + offs, _round(y, OUT, INTERP), mask=smask)

    @triton.jit
    def _quant_kernel(x_ptr, packed_ptr, absmax_ptr, mids_ptr, order_ptr, n, nbytes, nblocks,
                      ZERO_CODE: tl.constexpr, BLOCKSIZE: tl.constexpr, NB: tl.constexpr, EVEN: tl.constexpr,
                      CPU_RULE: tl.constexpr):
        """NB quantization blocks per program; nearest level by counting midpoints below x (ties low).
        CPU_RULE: bitsandbytes' CPU choices (absmax clamped to 1e-38, the partial last block
        divided by absmax instead of multiplied by its reciprocal, no special code for zero blocks)."""
        blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # (NB,)
        offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (NB, BS)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # (NB,); a NaN must poison its block like torch's amax does (blockwise.quantize_4bit then
        # refuses the weight), but the GPU's max drops NaNs: add the block's sum of NaNs (else 0)
        amax = tl.max(tl.abs(x), axis=1) + tl.sum(tl.where(x != x, x, 0.0), axis=1)
        one = tl.full(amax.shape, 1.0, tl.float32)
        if CPU_RULE:
            denom = tl.where(amax == 0, 1e-38, amax)
            y = x * tl.math.div_rn(one, denom)[:, None]
            if not EVEN:  # the partial last block: x / absmax
                last = (blk == nblocks - 1)[:, None]
                y = tl.where(last, tl.math.div_rn(x, tl.broadcast_to(denom[:, None], x.shape)), y)
                amax = tl.where(blk == nblocks - 1, denom, amax)
        else:
            y = x * tl.math.div_rn(one, amax)[:, None]  # all-zero block: 0 * inf = NaN, coded 0 below
        tl.store(absmax_ptr + blk, amax, mask=blk < nblocks)
        cnt = tl.zeros((NB, BLOCKSIZE), dtype=tl.int32)
        for k in tl.static_range(15):
            cnt += (y > tl.load(mids_ptr + k)).to(tl.int32)
        q = tl.load(order_ptr + cnt).to(tl.int32)
        if not CPU_RULE:
            q = tl.where((amax == 0)[:, None], 0, q)  # CUDA rule: an all-zero block codes 0
        q = tl.where(mask, q, ZERO_CODE)  # pad an odd tail with the code of 0.0
        hi, lo = tl.split(tl.reshape(q, (NB, BLOCKSIZE // 2, 2)))
        byte = (hi << 4) | lo
        boffs = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        if EVEN:
            bmask = (blk < nblocks)[:, None]
        else:
            bmask = boffs < nbytes
        tl.store(packed_ptr + boffs, byte.to(tl.uint8), mask=bmask)

    @triton.jit
    def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, pairs_ptr, y_ptr, N, K, q8_ptr, code2_ptr, offset,
                     BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, OUT: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, INTERP: tl.constexpr):
        """y[o] = sum_k x[k] W[o, k], W (N, K) packed row-major, K a multiple of the blocksize (rows
        start on block boundaries); float32 accumulation. Each program owns BLOCK_N rows and walks
        K in tiles of GROUPS quantization blocks: (BLOCK_N, GROUPS, BLOCKSIZE / 2) bytes, one pair
        gather per byte, each block summed unscaled and then multiplied by its scale."""
        BB: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        g = tl.arange(0, GROUPS)
        j = tl.arange(0, BB)
        half = K // 2  # bytes per row
        nblk_row = K // BLOCKSIZE
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for b0 in range(0, nblk_row, GROUPS):
            gb = b0 + g  # (G,) block index within the row
            gm = (rows[:, None] < N) & (gb[None, :] < nblk_row)  # (BN, G)
            blk = rows[:, None] * nblk_row + gb[None, :]  # (BN, G) global block index
            s = _block_scale(absmax_ptr, blk, q8_ptr, code2_ptr, offset, NESTED_BS, DQ, gm)  # (BN, G)
            col = gb[:, None] * BB + j[None, :]  # (G, BB) byte column within the row
            byte = tl.load(packed_ptr + rows[:, None, None] * half + col[None, :, :], mask=gm[:, :, None],
                           other=0)  # (BN, G, BB)
            hi, lo = _unpair(tl.load(pairs_ptr + byte.to(tl.int32)))
            xm = (gb < nblk_row)[:, None, None]
            x2 = tl.load(x_ptr + 2 * col[:, :, None] + tl.arange(0, 2)[None, None, :], mask=xm, other=0.0)
            xe, xo = tl.split(x2.to(tl.float32))  # (G, BB): x at the high / low nibble of each byte
            part = hi * xe[None] + lo * xo[None]
            acc += tl.sum(tl.sum(part, axis=2) * s, axis=1)
        tl.store(y_ptr + rows, _round(acc, OUT, INTERP), mask=rows < N)

    @triton.jit
    def _gemv_split_kernel(x_ptr, packed_ptr, absmax_ptr, pairs_ptr, y_ptr, part_ptr, count_ptr, N, K, q8_ptr,
                           code2_ptr, offset, BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr,
                           OUT: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
                           INTERP: tl.constexpr):
        """_gemv_kernel with each row's K split over SPLIT_K programs (grid: row tiles x SPLIT_K), so
        that a 4096-row weight keeps every SM busy with several loads in flight. Each program writes
        its float32 partial sums to `part` (SPLIT_K, N); the last program of a row tile to finish
        (counted with an atomic in `count`, which it resets to 0 for the next call) adds the
        partials in split order, so the result does not depend on which program ran when."""
        BB: tl.constexpr = BLOCKSIZE // 2
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        g = tl.arange(0, GROUPS)
        j = tl.arange(0, BB)
        half = K // 2  # bytes per row
        nblk_row = K // BLOCKSIZE
        per = tl.cdiv(tl.cdiv(nblk_row, SPLIT_K), GROUPS) * GROUPS  # blocks of a row per program
        start = pid_k * per
        stop = tl.minimum(start + per, nblk_row)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for b0 in range(start, stop, GROUPS):
            gb = b0 + g  # (G,) block index within the row
            gm = (rows[:, None] < N) & (gb[None, :] < stop)  # (BN, G)
            blk = rows[:, None] * nblk_row + gb[None, :]  # (BN, G) global block index
            s = _block_scale(absmax_ptr, blk, q8_ptr, code2_ptr, offset, NESTED_BS, DQ, gm)  # (BN, G)
            col = gb[:, None] * BB + j[None, :]  # (G, BB) byte column within the row
            byte = tl.load(packed_ptr + rows[:, None, None] * half + col[None, :, :], mask=gm[:, :, None],
                           other=0)  # (BN, G, BB)
            hi, lo = _unpair(tl.load(pairs_ptr + byte.to(tl.int32)))
            xm = (gb < stop)[:, None, None]
            x2 = tl.load(x_ptr + 2 * col[:, :, None] + tl.arange(0, 2)[None, None, :], mask=xm, other=0.0)
            xe, xo = tl.split(x2.to(tl.float32))  # (G, BB): x at the high / low nibble of each byte
            part = hi * xe[None] + lo * xo[None]
            acc += tl.sum(tl.sum(part, axis=2) * s, axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + rows, _round(acc, OUT, INTERP), mask=rows < N)
        else:
            tl.store(part_ptr + pid_k * N + rows, acc, mask=rows < N)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:  # the last one here: the other partials are visible (acquire)
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for k in tl.static_range(SPLIT_K):  # L2 loads (.cg): no stale L1 lines
                    total += tl.load(part_ptr + k * N + rows, mask=rows < N, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + rows, _round(total, OUT, INTERP), mask=rows < N)
                tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# -- pair tables (see Note: Pair table) ------------------------------------------------------------
_PAIRS_BY_CODE: dict[int, tuple] = {}  # id(code) -> (weakref(code), code._version, table)
_PAIRS_BY_VALUE: dict[tuple, torch.Tensor] = {}  # (device, 16 code values) -> table


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256] on code's device: entry b holds code[b >> 4] (low 32 bits) and code[b & 15]
    (high 32 bits) as float32 bit patterns. Cached per code tensor (an in-place change to it is
    noticed through its version counter) and shared between equal code books."""
    hit = _PAIRS_BY_CODE.get(id(code))
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    values = tuple(code.detach().float().cpu().tolist())  # one host sync per new code tensor
    key = (str(code.device), values)
    table = _PAIRS_BY_VALUE.get(key)
    if table is None:
        c = torch.tensor(values, dtype=torch.float32)
        b = torch.arange(256)
        pairs = torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous()  # (256, 2) float32
        table = _PAIRS_BY_VALUE[key] = pairs.view(torch.int64).view(256).to(code.device)
    key_id = id(code)
    _PAIRS_BY_CODE[key_id] = (weakref.ref(code, lambda _, k=key_id: _PAIRS_BY_CODE.pop(k, None)), code._version,
                              table)
    return table


def _dq_args(state):
    """(absmax-or-absmax2, q8, dynamic map, offset, nested blocksize, DQ) for the kernels."""
    if state.nested is None:
        return state.absmax, state.absmax, state.absmax, 0.0, 1, False  # unused DQ pointers: any tensor
    n = state.nested
    return n.absmax, state.absmax, n.code, float(n.offset), n.blocksize, True


# -- public functions -----------------------------------------------------------------------------
def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype, out: torch.Tensor | None = None,
                    block_bytes: int = 2048, num_warps: int | None = None) -> torch.Tensor:
    """Dequantize flat uint8 `packed` into `out` (allocated when None), a tensor of state.shape.

    Each program covers `block_bytes` packed bytes (whole quantization blocks); the default
    `num_warps` gives every thread one 16-byte load."""
    n, bs = state.numel, state.blocksize
    out = torch.empty(state.shape, dtype=dtype, device=packed.device) if out is None else out
    absmax, q8, code2, offset, nbs, dq = _dq_args(state)
    rows = max(1, block_bytes // (bs // 2))
    nblocks = -(-n // bs)
    warps = num_warps or max(1, min(8, rows * (bs // 2) // 512))
    _dequant_kernel[(-(-nblocks // rows),)](
        packed, absmax, pair_table(state.code), out, n, (n + 1) // 2, nblocks, q8, code2, offset, BLOCKSIZE=bs,
        NESTED_BS=nbs, DQ=dq, OUT=_OUT[dtype], ROWS=rows, EVEN=n % bs == 0, INTERP=_INTERP,
        enable_fp_fusion=False, num_warps=warps)
    return out


def quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int, rounding: str):
    """(packed uint8 [(n+1)//2], absmax float32 [nblocks]) like `_quant4_reference`, both rules."""
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    mids, order = quantize_bounds(quant_type, x.device)
    nb = max(1, min(16, 2048 // blocksize))
    _quant_kernel[(-(-nblocks // nb),)](
        x.reshape(-1), packed, absmax, mids, order, n, (n + 1) // 2, nblocks, ZERO_CODE=zero_code(quant_type),
        BLOCKSIZE=blocksize, NB=nb, EVEN=n % blocksize == 0, CPU_RULE=rounding == "bnb-cpu", enable_fp_fusion=False)
    return packed, absmax


def _gemv_check(x: torch.Tensor, packed: torch.Tensor, state):
    """(x contiguous, packed as uint8), or None when K is not a multiple of the blocksize."""
    n_out, k = state.shape
    if k % state.blocksize:
        return None
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"gemv_4bit: x has shape {list(x.shape)}, expected one row of {k} (W is {n_out}x{k})")
    return (x if x.is_contiguous() else x.contiguous()), (packed if packed.dtype == torch.uint8
                                                           else packed.view(torch.uint8))


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state, block_n: int = 8, groups: int = 8,
              num_warps: int = 4) -> torch.Tensor | None:
    """x (K,) or (1, K) or (1, 1, K) @ W^T for W = dequant(packed, state) of shape (N, K); returns
    x's shape with K replaced by N, in x's dtype. None when K is not a multiple of the blocksize
    (rows would not start on a block): the caller dequantizes instead. Sums per block first, then
    scales: equal to the dequantized product up to float32 summation order."""
    checked = _gemv_check(x, packed, state)
    if checked is None:
        return None
    x, packed = checked
    n_out, k = state.shape
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    absmax, q8, code2, offset, nbs, dq = _dq_args(state)
    _gemv_kernel[(-(-n_out // block_n),)](
        x, packed, absmax, pair_table(state.code), y, n_out, k, q8, code2, offset, BLOCKSIZE=state.blocksize,
        NESTED_BS=nbs, DQ=dq, OUT=_OUT[x.dtype], BLOCK_N=block_n, GROUPS=groups, INTERP=_INTERP,
        enable_fp_fusion=True, num_warps=num_warps)
    return y


_COUNTS: dict[torch.device, torch.Tensor] = {}  # per device: int32 arrival counts of gemv_4bit_split, kept at 0


def _counts(n: int, device: torch.device) -> torch.Tensor:
    """At least n zeroed int32 counters on `device` (each call leaves them at 0 again). One set per
    device: concurrent calls on two streams of one device would share it, so keep to one stream."""
    c = _COUNTS.get(device)
    if c is None or c.numel() < n:
        c = _COUNTS[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return c


def gemv_4bit_split(x: torch.Tensor, packed: torch.Tensor, state, block_n: int = 4, groups: int = 8,
                    split_k: int = 4, num_warps: int = 4) -> torch.Tensor | None:
    """gemv_4bit with each row's K split over `split_k` programs (one launch; see _gemv_split_kernel):
    N / block_n x split_k programs instead of N / block_n, each with block_n x groups x blocksize / 2
    bytes per loop step. split_k=1 is the plain tiled kernel with these tile sizes. Same result as
    gemv_4bit up to float32 summation order, and the same for every run (fixed order)."""
    checked = _gemv_check(x, packed, state)
    if checked is None:
        return None
    x, packed = checked
    n_out, k = state.shape
    split_k = max(1, min(split_k, k // state.blocksize))
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    tiles = -(-n_out // block_n)
    part = torch.empty((split_k, n_out) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    count = _counts(tiles, x.device) if split_k > 1 else part
    absmax, q8, code2, offset, nbs, dq = _dq_args(state)
    _gemv_split_kernel[(tiles, split_k)](
        x, packed, absmax, pair_table(state.code), y, part, count, n_out, k, q8, code2, offset,
        BLOCKSIZE=state.blocksize, NESTED_BS=nbs, DQ=dq, OUT=_OUT[x.dtype], BLOCK_N=block_n, GROUPS=groups,
        SPLIT_K=split_k, INTERP=_INTERP, enable_fp_fusion=True, num_warps=num_warps)
    return y
