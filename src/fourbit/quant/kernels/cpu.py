"""The CPU kernel: `cpu4bit.c`, compiled on first use with the system C compiler, loaded with ctypes.

Why C and not torch ops: dequantizing is a table lookup per nibble, which torch can only express
as a gather plus a multiply plus a cast, three passes over memory with per-op overhead; one
pass in C is 2-3x faster (bench/quant.py). The shared library is cached under
`$FOURBIT_CACHE/kernels/` keyed by a hash of the source and flags, built into a temporary file
and renamed into place. No compiler, a failed build, or `FOURBIT_NO_CKERNEL=1` means
`available()` is False and callers use the pure-torch reference. (De)quantization is split by
blocks over `torch.get_num_threads()` Python threads (ctypes releases the GIL during each call);
the skinny matmuls split output rows over OpenMP threads inside C when the compiler has
OpenMP (a fork/join costs ~1 us, a Python thread pool ~25 us per call, measured), else over
Python threads. Debug switches: FOURBIT_NO_OPENMP=1 builds without OpenMP, FOURBIT_NO_AVX2=1
takes the scalar matmul path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu4bit.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-fno-fast-math", "-ffp-contract=off"]
# OpenMP when the compiler has it: the library then links libgomp.so.1, which resolves to the copy
# torch has already loaded, so the matmul kernel shares torch's (already warm) thread team.
_OPENMP = ["-fopenmp"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_BLOCKS_PER_THREAD = 256
# Python threads cost ~50-100 us per split (an OpenMP fork/join with warm threads, ~1 us), so
# without OpenMP a matmul is split only when its work is worth a few milliseconds.
_MIN_PY_SPLIT = 1 << 23  # multiply-adds

i64, c_int, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.info("fourbit: no C compiler found; using the pure-torch 4-bit codec")
        return None
    # the codec stands alone: its own cache directory, not fourbit.embedded's
    _KERNEL_DIR = Path(os.environ.get("FOURBIT_CACHE") or Path.home() / ".cache" / "fourbit") / "kernels"
    lib, err = None, ""
    variants = [_FLAGS] if os.environ.get("FOURBIT_NO_OPENMP") else [_FLAGS + _OPENMP, _FLAGS]
    for flags in variants:  # without OpenMP, Python threads split the matmul's rows
        lib_path, err = _compile(cc, flags, _KERNEL_DIR)
        try:
            lib = lib_path and ctypes.CDLL(str(lib_path))
        except OSError as e:  # e.g. no libgomp at run time
            err = str(e)
        if lib:
            break
    if not lib:
        log.warning("fourbit: building the CPU 4-bit kernel failed; using pure torch.\n%s", err[-2000:])
        return None
    lib.fb_dequant4.argtypes = [ptr, ptr, ptr, ptr, c_int, i64, i64, i64, i64, ptr, ptr, i64, ctypes.c_float]
    lib.fb_dequant4.restype = None
    lib.fb_quant4.argtypes = [ptr, c_int, i64, i64, ptr, ptr, c_int, ctypes.c_uint8, ptr, ptr, i64, i64]
    lib.fb_quant4.restype = None
    lib.fb_has_f16.restype = c_int
    lib.fb_matmul4.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, c_int, c_int]
    lib.fb_matmul4.restype = c_int
    lib.fb_matmul_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, c_int, c_int]
    lib.fb_matmul_f32.restype = c_int
    lib.fb_has_openmp.restype = c_int
    lib.fb_has_avx2.restype = c_int
    return lib


def _compile(cc: str, flags: list[str], out_dir: Path) -> tuple[Path | None, str]:
    """(path of the cached shared library, "") or (None, the compiler's error output)."""
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *flags, sys.platform]).encode()).hexdigest()[:16]
    lib_path, failed = out_dir / f"cpu4bit-{key}.so", out_dir / f"cpu4bit-{key}.failed"
    if lib_path.exists():
        return lib_path, ""
    if failed.exists():  # this compiler cannot build these flags: do not retry in every process
        return None, failed.read_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    res = subprocess.run([cc, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        failed.write_text(res.stderr)
        return None, res.stderr
    os.replace(tmp, lib_path)
    return lib_path, ""


@lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("FOURBIT_NO_CKERNEL"):
        return None
    try:
        return _build()
    except OSError as e:  # unwritable cache, unloadable library: fall back, say why once
        log.warning("fourbit: CPU 4-bit kernel unavailable (%s); using pure torch", e)
        return None


def available(dtype: torch.dtype = torch.float32) -> bool:
    lib = _lib()
    return lib is not None and dtype in _DTYPES and (dtype != torch.float16 or bool(lib.fb_has_f16()))


@lru_cache(maxsize=1)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="fourbit-cpu4bit")


def _run_blocks(fn, nblocks: int, *args) -> None:
    """Call fn(<args before the range>, b0, b1, <args after>) over [0, nblocks), split across threads.

    The block range goes where the C signature has it: after the first `_RANGE_AT[fn]` arguments."""
    at = _RANGE_AT.get(fn.__name__, len(args))
    head, tail = args[:at], args[at:]
    threads = max(1, min(torch.get_num_threads(), nblocks // _MIN_BLOCKS_PER_THREAD))
    if threads == 1:
        fn(*head, 0, nblocks, *tail)
        return
    step = -(-nblocks // threads)
    futures = [_pool(threads).submit(fn, *head, b, min(b + step, nblocks), *tail) for b in range(0, nblocks, step)]
    for f in futures:
        f.result()


_RANGE_AT = {"fb_dequant4": 7}


def dequant4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
             out: torch.Tensor, nested=None) -> torch.Tensor:
    """out.flatten()[:n] = code[nibbles] * absmax[block]; all tensors contiguous on CPU.

    With `nested` (a fourbit.quant.NestedState), absmax holds the uint8 double-quantized
    constants and nested.absmax / nested.code / nested.offset resolve them in the same pass."""
    lib = _lib()
    nblocks = absmax.numel()
    if nested is None:
        dq = (None, None, 1, 0.0)
    else:
        dq = (absmax.data_ptr(), nested.code.data_ptr(), nested.blocksize, nested.offset)
        absmax = nested.absmax
    _run_blocks(lib.fb_dequant4, nblocks, packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                out.data_ptr(), _DTYPES[out.dtype], n, blocksize, *dq)
    return out


def quant4(x: torch.Tensor, blocksize: int, mids: torch.Tensor, order: torch.Tensor, cpu_tail: bool,
           zero_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], absmax float32 [nblocks]) of a contiguous CPU tensor."""
    lib = _lib()
    n = x.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    _run_blocks(lib.fb_quant4, nblocks, x.data_ptr(), _DTYPES[x.dtype], n, blocksize, mids.data_ptr(),
                order.data_ptr(), int(cpu_tail), zero_code, packed.data_ptr(), absmax.data_ptr())
    return packed, absmax


@lru_cache(maxsize=None)
def _features() -> tuple[bool, bool]:
    """(built with OpenMP, CPU has AVX2 + FMA and FOURBIT_NO_AVX2 is unset), asked once."""
    lib = _lib()
    return bool(lib.fb_has_openmp()), bool(lib.fb_has_avx2()) and not os.environ.get("FOURBIT_NO_AVX2")


class _W4(ctypes.Structure):
    """fb_w4 in cpu4bit.c: the pointers and sizes of one packed weight and its QuantState."""

    _fields_ = [("packed", ptr), ("absmax", ptr), ("q8", ptr), ("code2", ptr), ("nested_bs", i64),
                ("offset", ctypes.c_float), ("code", ptr), ("bs", i64)]


# Note: Weight descriptors
# At batch 1 a 135M model makes ~210 of these calls per token, each doing 20-200 us of work, so
# the Python side must stay at a few microseconds: the pointers of a (packed, state) pair are
# gathered into a _W4 once and reused while the same tensors back it. An entry is keyed by the
# address of the packed bytes (a fresh view of the same bytes hits it too), holds every tensor
# it points into (so that memory cannot be freed and reused under the cached pointers), and is
# dropped when the QuantState is garbage collected.
_W4S: dict[tuple[int, int], tuple[tuple, _W4]] = {}


def _descriptor(packed: torch.Tensor, state) -> _W4:
    nested = state.nested
    key = (packed.data_ptr(), id(state))
    hit = _W4S.get(key)
    if hit is not None:
        t = hit[0]
        if t[1] is state.absmax and t[2] is state.code and t[3] is nested and (
                nested is None or (t[4] is nested.absmax and t[5] is nested.code)):
            return hit[1]
    nbytes = packed.numel() * packed.element_size()
    if nbytes < (state.numel + 1) // 2 or not packed.is_contiguous():
        raise ValueError(f"packed weight: {nbytes} bytes (contiguous: {packed.is_contiguous()}); "
                         f"{list(state.shape)} needs {(state.numel + 1) // 2} contiguous bytes")
    if nested is None:
        w = _W4(packed.data_ptr(), state.absmax.data_ptr(), None, None, 1, 0.0, state.code.data_ptr(),
                state.blocksize)
    else:
        w = _W4(packed.data_ptr(), nested.absmax.data_ptr(), state.absmax.data_ptr(), nested.code.data_ptr(),
                nested.blocksize, nested.offset, state.code.data_ptr(), state.blocksize)
    if hit is None:
        weakref.finalize(state, _W4S.pop, key, None)
    _W4S[key] = ((packed, state.absmax, state.code, nested, nested and nested.absmax, nested and nested.code), w)
    return w


def matmul4(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None, out: torch.Tensor,
            threads: int) -> torch.Tensor:
    """out (..., O) = x (..., K) @ dequant(W)^T + bias: float32, contiguous, on CPU; W = (O, K)
    from the uint8 view of `packed` and its QuantState. Output rows are split over `threads`
    (OpenMP threads in C, or Python threads when the library was built without OpenMP); see
    fb_matmul4 for why the result depends neither on the number of rows nor on the threads."""
    lib = _lib()
    omp, avx2 = _features()
    o, k = state.shape
    m = x.numel() // k
    w = _descriptor(packed, state)
    b = None if bias is None else bias.data_ptr()
    if omp or threads <= 1 or m * k * o < _MIN_PY_SPLIT:
        rc = lib.fb_matmul4(x.data_ptr(), m, k, o, ctypes.byref(w), b, out.data_ptr(), 0, o, threads if omp else 1,
                            avx2)
    else:
        step = -(-o // threads)
        args = (x.data_ptr(), m, k, o, ctypes.byref(w), b, out.data_ptr())
        futures = [_pool(threads).submit(lib.fb_matmul4, *args, a, min(a + step, o), 1, avx2)
                   for a in range(0, o, step)]
        rc = min(f.result() for f in futures)
    if rc:
        raise MemoryError(f"fourbit: the CPU 4-bit matmul could not allocate its scratch ({m} x {k} floats)")
    return out


def matmul_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
               threads: int) -> torch.Tensor:
    """out (..., O) = x (..., K) @ weight (O, K)^T + bias, all float32 and contiguous on CPU, each
    output element computed the same way whatever the number of rows (fb_matmul_f32)."""
    omp, avx2 = _features()
    o, k = weight.shape
    m = x.numel() // k
    _lib().fb_matmul_f32(x.data_ptr(), m, k, o, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                         out.data_ptr(), 0, o, threads if omp else 1, avx2)
    return out
