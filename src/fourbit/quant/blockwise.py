"""Blockwise quantization: 4-bit NF4/FP4 with absmax scaling, double quantization, 8-bit dynamic.

The functions here are the pure-torch reference (QLoRA §3; bitsandbytes' `quantize_4bit`,
`dequantize_4bit` and `quantize_blockwise`) and the one dispatch point to the fast kernels in
`fourbit.quant.kernels` (a C kernel on CPU, Triton on CUDA), which must match the reference bit
for bit.

Layout (bitsandbytes' format): flatten row-major, blocks of `blocksize` consecutive elements
(blocks cross row boundaries), absmax[b] = max |x| over block b, code = nearest level of
x * (1 / absmax[b]) with exact ties to the lower level, two codes per byte with the first
element in the high nibble, an odd tail padded with the code of 0.0. Dequantization is
code[q] * absmax[b] in float32, rounded once to the output dtype.

# Note: rounding modes
`rounding="nearest"` (default) is bitsandbytes' CUDA rule: the exact nearest 8-bit level for
double quantization, and code 0 for an all-zero block. `rounding="bnb-cpu"` reproduces
bitsandbytes' CPU output byte for byte: 8-bit rounding through its 65,536-entry lookup table
(differs from nearest on ~0.2% of block constants), a partial last block divided by absmax
instead of multiplied by the reciprocal, and an all-zero block coded as 0.0 (code 7 in NF4).
Both dequantize to the same values up to those rounding choices; both load in bitsandbytes.

# Note: bad input
Integer/bool tensors, empty tensors, non-finite values and bad block sizes raise ValueError
with what was expected. A NaN or Inf weight would poison its whole block (absmax = NaN/Inf), so
we refuse it instead of writing a silently wrong tensor; `check_finite=False` skips the check.
"""

from __future__ import annotations

import math

import torch

from fourbit.quant.codebook import DTYPES, QUANT_TYPES, get_code, get_dynamic_map, quantize_bounds, zero_code
from fourbit.quant.state import NestedState, QuantState

FLOAT_DTYPES = tuple(dict.fromkeys(DTYPES.values()))  # float32, bfloat16, float16
ROUNDING = ("nearest", "bnb-cpu")
NESTED_BLOCKSIZE = 256  # QLoRA §3: the block constants are quantized in blocks of 256


# -- validation ----------------------------------------------------------------------------------
def check_blocksize(blocksize: int, lo: int = 32, hi: int = 4096) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < lo or blocksize > hi \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [{lo}, {hi}], got {blocksize!r}")


def _check_tensor(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {x.dtype}; "
                         f"convert it first (e.g. x.float())")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor ({what} has shape {list(x.shape)})")


def _raise_non_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    first = tuple(int(i) for i in bad.nonzero()[0])
    raise ValueError(f"{what} has {count} non-finite value(s) (NaN/Inf), first at index {first}: "
                     f"a non-finite weight would corrupt its whole block. Fix the weights, or pass "
                     f"check_finite=False to quantize anyway")


# -- 4-bit ---------------------------------------------------------------------------------------
def _quant4_reference(x: torch.Tensor, quant_type: str, blocksize: int, rounding: str):
    """(packed uint8 [(n+1)//2], absmax float32 [nblocks]) in plain torch ops."""
    mids, order = quantize_bounds(quant_type, x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,) zero padding never raises a max of |x|
    zero = absmax == 0
    if rounding == "bnb-cpu":
        denom = torch.where(zero, torch.full_like(absmax, 1e-38), absmax)
        scaled = blocks * (1.0 / denom)[:, None]
        if n % blocksize:  # bitsandbytes' CPU path divides the partial last block, stores its clamped max
            scaled[-1] = blocks[-1] / denom[-1]
            absmax[-1] = denom[-1]
    else:
        scaled = blocks * (1.0 / absmax)[:, None]  # all-zero block: NaN -> code 0 below, like CUDA
    idx = torch.bucketize(scaled.reshape(-1)[:n], mids)  # number of midpoints < x: ties go low
    codes = order[idx]
    if rounding != "bnb-cpu":
        codes[zero.repeat_interleave(blocksize)[:n]] = 0
    if n % 2:
        codes = torch.cat([codes, order[torch.bucketize(torch.zeros(1, device=x.device), mids)]])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  rounding: str = "nearest", quant_storage: torch.dtype = torch.uint8,
                  check_finite: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize `w` (any shape, fp32/fp16/bf16, CPU or CUDA) to packed 4-bit codes.

    Returns (packed, state): packed is `quant_storage` of shape [(numel+1)//2 bytes, 1] (uint8 by
    default; a float storage dtype views the same bytes, for FSDP sharding); state is the
    QuantState that `dequantize_4bit` needs. `double_quant` 8-bit-quantizes the block constants.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    check_blocksize(blocksize)
    _check_tensor(w, "the weight")
    x = w.detach().contiguous()
    packed, absmax = _quant4_dispatch(x, quant_type, blocksize, rounding)
    if check_finite and not bool(torch.isfinite(absmax).all()):  # a NaN/Inf makes its block's absmax non-finite
        _raise_non_finite(x, "the weight")
    code = get_code(quant_type, x.device).clone()
    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code)
    if double_quant:
        offset = absmax.mean()  # float32 scalar; stored in the state, never recomputed on load
        q8, absmax2 = quantize_blockwise_8bit(absmax - offset, blocksize=NESTED_BLOCKSIZE, rounding=rounding)
        state.absmax = q8
        state.nested = NestedState(absmax=absmax2, code=get_dynamic_map(True, x.device).clone(),
                                   offset=float(offset), blocksize=NESTED_BLOCKSIZE)
    packed = packed.view(-1, 1)
    if quant_storage != torch.uint8:
        packed = _to_storage(packed, quant_storage)
    return packed, state


def _to_storage(packed: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    size = torch.empty(0, dtype=storage).element_size()
    nbytes = packed.numel()
    if nbytes % size:
        raise ValueError(f"quant_storage {storage} needs the packed size ({nbytes} bytes) to be a multiple of {size}")
    return packed.view(-1).view(storage).view(-1, 1)


def triton_kernels():
    """The Triton kernel module (`fourbit.quant.kernels.triton_4bit`) when Triton and a CUDA device
    are usable, else None: the one check callers outside the codec use too (Linear4bit's gemv)."""
    try:
        from fourbit.quant.kernels import triton_4bit
    except ImportError:
        return None
    return triton_4bit if triton_4bit.available() else None


def _quant4_dispatch(x: torch.Tensor, quant_type: str, blocksize: int, rounding: str):
    if x.device.type == "cpu":
        from fourbit.quant.kernels import cpu

        if cpu.available(x.dtype):
            mids, order = quantize_bounds(quant_type, "cpu")
            return cpu.quant4(x, blocksize, mids, order, rounding == "bnb-cpu", zero_code(quant_type))
    elif x.device.type == "cuda" and (triton_4bit := triton_kernels()) is not None:
        return triton_4bit.quantize_4bit(x, quant_type, blocksize, rounding)
    return _quant4_reference(x, quant_type, blocksize, rounding)


def _dequant4_reference(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """Flat [n] tensor of `dtype`: code[nibble] * absmax[block] in float32, then rounded once."""
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n].long()  # (n,) high nibble first
    nb = absmax.numel()
    vals = torch.nn.functional.pad(code[codes], (0, nb * blocksize - n)).view(nb, blocksize)
    return (vals * absmax[:, None]).reshape(-1)[:n].to(dtype)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize packed codes to a tensor of `state.shape` and `dtype` (default: state.dtype).

    `out` (contiguous, right shape and dtype) is filled and returned instead of allocating.
    """
    dtype = dtype or state.dtype
    if dtype not in FLOAT_DTYPES + (torch.float64,):  # float64: for reference computations
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    n = state.numel
    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"packed data has {p.numel()} bytes but shape {list(state.shape)} needs {(n + 1) // 2}")
    if out is not None and (out.shape != state.shape or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {dtype} of shape {list(state.shape)}, "
                         f"got {out.dtype} {list(out.shape)}")
    if p.device.type == "cpu":
        from fourbit.quant.kernels import cpu

        if cpu.available(dtype):  # resolves double quantization in the same pass
            out = out if out is not None else torch.empty(state.shape, dtype=dtype)
            return cpu.dequant4(p.contiguous(), state.absmax.contiguous(), state.code.contiguous(), n,
                                state.blocksize, out, state.nested)
    elif p.device.type == "cuda" and (triton_4bit := triton_kernels()) is not None:
        return triton_4bit.dequantize_4bit(p, state, dtype, out)
    res = _dequant4_reference(p, dequantize_absmax(state), state.code, n, state.blocksize, dtype).view(state.shape)
    return out.copy_(res) if out is not None else res


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 block scales: dyn[q8[b]] * absmax2[b // 256] + offset when double-quantized."""
    if state.nested is None:
        return state.absmax
    n = state.nested
    return dequantize_blockwise_8bit(state.absmax, n.absmax, n.code, n.blocksize) + n.offset


# -- 8-bit blockwise (double quantization, 8-bit optimizer states) ---------------------------------
def _nearest_index(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted code book; exact ties go to the lower level."""
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(y, mids)


def _lut_index(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes-CPU 8-bit rounding: a 65,536-entry table indexed by trunc(fma(t, 65535, 0.5)).

    # Note: bitsandbytes' CPU 8-bit rule
    bitsandbytes 0.50's CPU quantizer (csrc/cpu_ops.cpp, read from its compiled code) computes
    t = (clamp(y, -1, 1) + 1) * 0.5 in float32, then k = trunc(fma(t, 65535, 0.5)): one fused
    multiply-add, rounded to float32 once. Its table maps each grid point 2k/65535 - 1 to the
    number of level midpoints strictly below it, so y takes the level nearest to the grid point
    closest to it, not to y itself. Rounding t * 65535 before adding 0.5 (two roundings) moves k
    by one for ~1 value in 10^7 that lies within ~1e-5 of a grid midpoint; emulating the fused
    product in float64 (exact: a 24-bit t times a 16-bit 65535 fits 53 bits) then rounding to
    float32 reproduces bitsandbytes' bytes.
    """
    grid = torch.arange(65536, dtype=torch.float32, device=y.device) / 65535 * 2 - 1
    table = _nearest_index(grid, code)
    t = (y.float().clamp(-1, 1) + 1) * 0.5  # float32, as bitsandbytes
    k = (t.double() * 65535 + 0.5).float().to(torch.int64)  # fma: exact in float64, one float32 rounding
    return table[k]


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256,
                            rounding: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of x's shape, float32 absmax [nblocks]): blockwise absmax scaling + dynamic map."""
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got {rounding!r}")
    code = get_dynamic_map(True, x.device) if code is None else code
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if rounding == "bnb-cpu":  # bitsandbytes' CPU path multiplies by a float32 reciprocal
        y = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)[:n]  # (n,) in [-1, 1]
        idx = _lut_index(y, code)
    else:
        y = (blocks / absmax.clamp(min=1e-38)[:, None]).reshape(-1)[:n]
        idx = _nearest_index(y, code)
    idx[(absmax == 0).repeat_interleave(blocksize)[:n]] = 0  # all-zero block: code 0 (x 0 = -0.0), like bnb
    return idx.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                              blocksize: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code[q] * absmax[i // blocksize] in float32, then cast to dtype; same shape as q."""
    code = get_dynamic_map(True, q.device) if code is None else code
    vals = code[q.reshape(-1).long()]
    n = vals.numel()
    nb = absmax.numel()
    if nb != -(-n // blocksize):
        raise ValueError(f"{n} codes in blocks of {blocksize} need {-(-n // blocksize)} absmax values, got {nb}")
    vals = torch.nn.functional.pad(vals, (0, nb * blocksize - n)).view(nb, blocksize)
    return (vals * absmax[:, None]).reshape(-1)[:n].view(q.shape).to(dtype)


def bits_per_parameter(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = NESTED_BLOCKSIZE) -> float:
    """Storage cost of 4-bit blockwise quantization: 4 + 32/64 = 4.5, or 4 + 8/64 + 32/(64*256) = 4.127 with DQ."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)
    return 4 + 32 / blocksize


def quantized_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes of packed codes + block constants (+ nested constants) for `numel` elements."""
    nb = -(-numel // blocksize)
    if double_quant:
        return (numel + 1) // 2 + nb + 4 * math.ceil(nb / NESTED_BLOCKSIZE) + 4 * 256 + 4 * 16
    return (numel + 1) // 2 + 4 * nb + 4 * 16
