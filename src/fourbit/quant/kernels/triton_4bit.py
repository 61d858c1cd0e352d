"""Triton kernels for CUDA: 4-bit dequantization (double quantization resolved in the same pass),
quantization, and a fused 4-bit matrix-vector product for batch-1 generation.

Each must match the pure-torch reference in fourbit.quant.blockwise: dequantization and
quantization bit for bit, gemv within float32 summation-order tolerance. The tests run them on
CPU under TRITON_INTERPRET=1 (tests/test_kernels_triton.py); on a GPU `bench/gpu.py` checks them
at real sizes against the reference and bitsandbytes and times them.

# Note: Exact float arithmetic
The reference rounds twice when resolving double quantization (dyn[q8] * absmax2, then + offset)
and computes 1 / absmax correctly rounded. Triton would fuse the first into an FMA and use an
approximate reciprocal, so the kernels are compiled with `enable_fp_fusion=False` and divide with
`div_rn`. The float32 -> bf16/fp16 casts round to nearest even, like torch's.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # fourbit works without Triton; CUDA tensors then use the torch reference
    triton = None

_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=1)
def available() -> bool:
    """Triton importable and a CUDA device present (the interpreter is for tests, not dispatch)."""
    return triton is not None and torch.cuda.is_available() and not interpreting()


if triton is not None:

    @triton.jit
    def _to_bf16(y):
        """float32 -> bfloat16, round to nearest even, spelled out in integer ops (the interpreter's
        own cast truncates; on GPUs this compiles to the same result as cvt.rn)."""
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _block_scale(absmax_ptr, blk, q8_ptr, code2_ptr, offset, NESTED_BS: tl.constexpr, DQ: tl.constexpr, mask):
        if DQ:
            q8 = tl.load(q8_ptr + blk, mask=mask, other=0).to(tl.int32)
            s = tl.load(code2_ptr + q8, mask=mask, other=0.0) * tl.load(absmax_ptr + blk // NESTED_BS, mask=mask,
                                                                        other=0.0)
            return s + offset
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, q8_ptr, code2_ptr, offset,
                        BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, OUT: tl.constexpr,
                        ROWS: tl.constexpr):
        """ROWS quantization blocks per program, as a (ROWS, BLOCKSIZE / 2) tile of bytes: each byte
        is read once, each block's scale once, and the two nibbles are interleaved on store."""
        BB: tl.constexpr = BLOCKSIZE // 2
        blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,)
        boffs = blk[:, None] * BB + tl.arange(0, BB)[None, :]  # (R, BB) byte indices
        bmask = boffs < (n + 1) // 2
        byte = tl.load(packed_ptr + boffs, mask=bmask, other=0).to(tl.int32)
        s = _block_scale(absmax_ptr, blk, q8_ptr, code2_ptr, offset, NESTED_BS, DQ, blk * BLOCKSIZE < n)  # (R,)
        hi = tl.load(code_ptr + (byte >> 4)) * s[:, None]  # float32 products, rounded once below
        lo = tl.load(code_ptr + (byte & 15)) * s[:, None]
        y = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE))  # element 2i = high nibble of byte i
        if OUT == 1:
            y = _to_bf16(y)
        elif OUT == 2:
            y = y.to(tl.float16)
        offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + offs, y, mask=offs < n)

    @triton.jit
    def _quant_kernel(x_ptr, packed_ptr, absmax_ptr, mids_ptr, order_ptr, n, ZERO_CODE: tl.constexpr,
                      BLOCKSIZE: tl.constexpr, NB: tl.constexpr):
        """NB quantization blocks per program; nearest level by counting midpoints below x (ties low)."""
        blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # (NB,)
        col = tl.arange(0, BLOCKSIZE)  # (BS,)
        offs = blk[:, None] * BLOCKSIZE + col[None, :]  # (NB, BS)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # (NB,)
        tl.store(absmax_ptr + blk, amax, mask=blk * BLOCKSIZE < n)
        r = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), amax)
        y = x * r[:, None]
        cnt = tl.zeros((NB, BLOCKSIZE), dtype=tl.int32)
        for k in tl.static_range(15):
            cnt += (y > tl.load(mids_ptr + k)).to(tl.int32)
        q = tl.load(order_ptr + cnt).to(tl.int32)
        q = tl.where((amax == 0)[:, None], 0, q)  # CUDA rule: an all-zero block codes 0
        q = tl.where(mask, q, ZERO_CODE)  # pad an odd tail with the code of 0.0
        hi, lo = tl.split(tl.reshape(q, (NB, BLOCKSIZE // 2, 2)))
        byte = (hi << 4) | lo
        boffs = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + boffs, byte.to(tl.uint8), mask=boffs < (n + 1) // 2)

    @triton.jit
    def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, N, K, q8_ptr, code2_ptr, offset,
                     BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, OUT: tl.constexpr,
                     BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """y[o] = sum_k x[k] W[o, k], W (N, K) packed row-major, K a multiple of the blocksize (rows
        start on block boundaries); float32 accumulation. Each program owns BLOCK_N rows and walks
        K in tiles of GROUPS quantization blocks: (BLOCK_N, GROUPS, BLOCKSIZE / 2) bytes, one scale
        per (row, group)."""
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
                           other=0).to(tl.int32)  # (BN, G, BB)
            xm = (gb < nblk_row)[:, None]
            xe = tl.load(x_ptr + 2 * col, mask=xm, other=0.0).to(tl.float32)  # (G, BB) even elements
            xo = tl.load(x_ptr + 2 * col + 1, mask=xm, other=0.0).to(tl.float32)
            part = tl.load(code_ptr + (byte >> 4)) * xe[None] + tl.load(code_ptr + (byte & 15)) * xo[None]
            acc += tl.sum(tl.sum(part, axis=2) * s, axis=1)
        if OUT == 1:
            out = _to_bf16(acc)
        elif OUT == 2:
            out = acc.to(tl.float16)
        else:
            out = acc
        tl.store(y_ptr + rows, out, mask=rows < N)


def _dq_args(state):
    if state.nested is None:
        return state.absmax, state.absmax, state.absmax, 0.0, 1, False  # unused DQ pointers: any tensor
    n = state.nested
    return n.absmax, state.absmax, n.code, float(n.offset), n.blocksize, True


def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype, out: torch.Tensor | None = None,
                    block_bytes: int = 4096, num_warps: int = 8) -> torch.Tensor:
    """Triton dequantization of flat uint8 `packed` into `out` (allocated when None)."""
    n = state.numel
    out = torch.empty(state.shape, dtype=dtype, device=packed.device) if out is None else out
    absmax, q8, code2, offset, nbs, dq = _dq_args(state)
    rows = max(1, block_bytes // (state.blocksize // 2))
    _dequant_kernel[(triton.cdiv(triton.cdiv(n, state.blocksize), rows),)](
        packed, absmax, state.code, out, n, q8, code2, offset, BLOCKSIZE=state.blocksize, NESTED_BS=nbs, DQ=dq,
        OUT=_OUT[dtype], ROWS=rows, enable_fp_fusion=False, num_warps=num_warps)
    return out


def quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int, rounding: str):
    """(packed uint8 [(n+1)//2], absmax float32 [nblocks]) with the 'nearest' (CUDA) rule."""
    from fourbit.quant.blockwise import _quant4_reference, _zero_code
    from fourbit.quant.codebook import quantize_bounds

    if rounding != "nearest":  # bitsandbytes' CPU rule is for reproducing CPU files: use the reference
        return _quant4_reference(x, quant_type, blocksize, rounding)
    n = x.numel()
    nblocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    mids, order = quantize_bounds(quant_type, x.device)
    nb = max(1, min(16, 2048 // blocksize))
    _quant_kernel[(triton.cdiv(nblocks, nb),)](x.reshape(-1), packed, absmax, mids, order, n,
                                               ZERO_CODE=_zero_code(quant_type, "cpu"), BLOCKSIZE=blocksize, NB=nb,
                                               enable_fp_fusion=False)
    return packed, absmax


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state, block_n: int = 8, groups: int = 8,
              num_warps: int = 4) -> torch.Tensor | None:
    """x (K,) or (1, K) @ W^T for W = dequant(packed, state) of shape (N, K); returns (N,) or (1, N).
    None when K is not a multiple of the blocksize (rows would not start on a block): the caller
    dequantizes instead. Sums per block first, then scales: equal to the dequantized product up to
    float32 summation order."""
    n_out, k = state.shape
    if k % state.blocksize:
        return None
    xv = x.reshape(-1)
    if xv.numel() != k:
        raise ValueError(f"gemv_4bit: x has {xv.numel()} elements, W has {k} columns")
    y = torch.empty(n_out, dtype=x.dtype, device=x.device)
    absmax, q8, code2, offset, nbs, dq = _dq_args(state)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        xv, packed.reshape(-1), absmax, state.code, y, n_out, k, q8, code2, offset, BLOCKSIZE=state.blocksize,
        NESTED_BS=nbs, DQ=dq, OUT=_OUT[x.dtype], BLOCK_N=block_n, GROUPS=groups, enable_fp_fusion=False,
        num_warps=num_warps)
    return y.view(*x.shape[:-1], n_out)
