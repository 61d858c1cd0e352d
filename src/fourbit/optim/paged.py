"""CUDA unified (managed) memory for optimizer states, through the CUDA runtime torch ships (ctypes).

Paged optimizers (QLoRA §3, "Paged Optimizers") keep the states of large parameters in memory allocated
with `cudaMallocManaged`. The driver migrates its pages between GPU and CPU on demand, so when
something else needs the GPU memory (a long sequence, a large batch) optimizer pages are evicted
to CPU RAM instead of the run failing with out-of-memory. Right before a parameter's update its
states are prefetched back (`cudaMemPrefetchAsync` on the current stream) when they may have
been evicted (see Note: Prefetch only after pressure), so an update never faults page by page.

No compiled extension: libcudart is found next to torch (the nvidia-cuda-runtime wheel or
torch/lib) and called with ctypes; a managed buffer becomes a torch tensor through
`__cuda_array_interface__` and is freed (`cudaFree`) when the last tensor using it dies. Before
every allocation we check `cudaMemGetInfo`: asking for more managed memory than the card has
free can hang the GPU, so that is refused with an error instead.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import weakref
from functools import lru_cache

import torch

CUDA_MEM_ATTACH_GLOBAL = 1
CUDA_CPU_DEVICE_ID = -1


class _MemLocation(ctypes.Structure):  # CUDA >= 12.2's cudaMemLocation, passed by value
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def _candidate_libs() -> list[str]:
    names = []
    for base in sys.path + [os.path.dirname(torch.__file__)]:
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*", "lib/libcudart.so*",
                        "torch/lib/libcudart*.so*"):
            names += sorted(glob.glob(os.path.join(base, pattern)), reverse=True)
    return names + ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]


@lru_cache(maxsize=1)
def cudart() -> ctypes.CDLL:
    """The CUDA runtime library torch uses; OSError if none can be loaded."""
    errors = []
    for name in _candidate_libs():
        try:
            lib = ctypes.CDLL(name)
            lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
            lib.cudaFree.argtypes = [ctypes.c_void_p]
            lib.cudaMemGetInfo.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
            return lib
        except (OSError, AttributeError) as e:
            errors.append(f"{name}: {e}")
    raise OSError("no CUDA runtime library (libcudart) could be loaded: " + "; ".join(errors[-3:]))


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"CUDA runtime call {what} failed with error {code}")


@lru_cache(maxsize=1)
def runtime_version() -> int:
    v = ctypes.c_int()
    _check(cudart().cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
    return v.value


def mem_get_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes on `device`."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    with torch.cuda.device(device):
        _check(cudart().cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
    return free.value, total.value


class _ManagedBuffer:
    """Owns one cudaMallocManaged allocation; exposes it to torch via __cuda_array_interface__."""

    _TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1", torch.bfloat16: "<f2", torch.float16: "<f2"}

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        size = torch.empty(0, dtype=dtype).element_size()
        nbytes = max(numel * size, 1)
        free, _ = mem_get_info(device)
        if nbytes > free:
            raise MemoryError(f"paged optimizer: refusing to allocate {nbytes / 2**20:.0f} MiB of managed memory "
                              f"with only {free / 2**20:.0f} MiB free on {device} (asking for more managed memory "
                              f"than the card has free can hang the GPU); use a non-paged optimizer or free memory")
        ptr = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(cudart().cudaMallocManaged(ctypes.byref(ptr), nbytes, CUDA_MEM_ATTACH_GLOBAL), "cudaMallocManaged")
        self.ptr, self.nbytes = ptr.value, nbytes
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": self._TYPESTR[dtype],
                                         "data": (self.ptr, False), "version": 3, "strides": None, "stream": None}
        weakref.finalize(self, cudart().cudaFree, ctypes.c_void_p(self.ptr))


def managed_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of `dtype` in CUDA managed memory; freed when no tensor refers to it."""
    buf = _ManagedBuffer(numel, dtype, device)
    t = torch.as_tensor(buf, device=device)  # keeps `buf` alive through the tensor's lifetime
    if dtype in (torch.bfloat16,):  # no typestr for bf16: allocated as f16, same bytes
        t = t.view(dtype)
    return t


def prefetch(t: torch.Tensor, device: torch.device | None = None) -> None:
    """Migrate a managed tensor's pages to `device` (the GPU; None: CPU) on the current stream."""
    lib = cudart()
    stream = ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)
    nbytes = t.numel() * t.element_size()
    dev = CUDA_CPU_DEVICE_ID if device is None else torch.device(device).index or 0
    if runtime_version() >= 13000:  # CUDA 13: cudaMemPrefetchAsync(ptr, n, cudaMemLocation, flags, stream)
        loc = _MemLocation(2 if dev == CUDA_CPU_DEVICE_ID else 1, 0 if dev == CUDA_CPU_DEVICE_ID else dev)
        lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint,
                                             ctypes.c_void_p]
        _check(lib.cudaMemPrefetchAsync(ctypes.c_void_p(t.data_ptr()), nbytes, loc, 0, stream), "cudaMemPrefetchAsync")
    else:
        lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        _check(lib.cudaMemPrefetchAsync(ctypes.c_void_p(t.data_ptr()), nbytes, dev, stream), "cudaMemPrefetchAsync")


# Note: Prefetch only after pressure
# A prefetch of pages that are already on the GPU is not free: the driver walks the range's page
# tables on the host (an H100 step over 5.3 GiB of states took 29 ms with a prefetch per state,
# 20 ms for torch's AdamW). CUDA cannot say where a managed page is now (the range attribute
# "last prefetch location" is only what was last asked for), but the driver evicts managed pages
# only when the GPU runs out of memory. torch's caching allocator keeps what it reserves, so a
# shortage since the last look leaves either little free memory now or a release by the
# allocator (empty_cache, or its retry after a failed cudaMalloc: `reserved_bytes.all.freed`
# grows). Neither seen: nothing can have been evicted, and the step skips the prefetch. A wrong
# guess (memory taken and given back outside torch's allocator) costs page faults, not results.
FREE_MARGIN = 512 * 2**20  # bytes: less free than this counts as pressure


class EvictionWatch:
    """Whether managed pages on one device can have been evicted since the last call (see Note:
    Prefetch only after pressure). `free_bytes` and `released_bytes` read the device (cudaMemGetInfo,
    the allocator's cumulative released bytes); tests pass fakes."""

    def __init__(self, device: torch.device, free_bytes=None, released_bytes=None, margin: int = FREE_MARGIN):
        self.free_bytes = free_bytes or (lambda: mem_get_info(device)[0])
        self.released_bytes = released_bytes or (
            lambda: torch.cuda.memory_stats(device).get("reserved_bytes.all.freed", 0))
        self.margin = margin
        self._released: int | None = None  # at the last call; None: never looked (prefetch once)

    def may_have_evicted(self) -> bool:
        released = self.released_bytes()
        pressure = self._released is None or released != self._released or self.free_bytes() < self.margin
        self._released = released
        return pressure
