"""The CPU kernel: `cpu4bit.c`, compiled on first use with the system C compiler, loaded with ctypes.

Why C and not torch ops: dequantizing is a table lookup per nibble, which torch can only express
as a gather plus a multiply plus a cast, three passes over memory with per-op overhead; one
pass in C is 2-3x faster (bench/quant.py). The shared library is cached under
`$FOURBIT_CACHE/kernels/` keyed by a hash of the source and flags, built into a temporary file
and renamed into place. No compiler, a failed build, or `FOURBIT_NO_CKERNEL=1` means
`available()` is False and callers use the pure-torch reference. Work is split by blocks over
`torch.get_num_threads()` Python threads; ctypes releases the GIL during each call.
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
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu4bit.c")
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-fno-fast-math"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_BLOCKS_PER_THREAD = 256

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
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *_FLAGS, sys.platform]).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("FOURBIT_CACHE") or Path.home() / ".cache" / "fourbit") / "kernels"  # standalone: no fourbit import
    lib_path = out_dir / f"cpu4bit-{key}.so"
    if not lib_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        res = subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            log.warning("fourbit: building the CPU 4-bit kernel failed; using pure torch.\n%s", res.stderr[-2000:])
            return None
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.fb_dequant4.argtypes = [ptr, ptr, ptr, ptr, c_int, i64, i64, i64, i64, ptr, ptr, i64, ctypes.c_float]
    lib.fb_dequant4.restype = None
    lib.fb_quant4.argtypes = [ptr, c_int, i64, i64, ptr, ptr, c_int, ctypes.c_uint8, ptr, ptr, i64, i64]
    lib.fb_quant4.restype = None
    lib.fb_has_f16.restype = c_int
    return lib


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
