"""Checking the files a user hands us before anything reads them in earnest: one clear line, not a traceback.

A truncated download, a header that lies about its sizes, a text file with the wrong suffix: the
readers underneath (safetensors' Rust loader, gguf's memory map, pyarrow, json) either crash with
messages about their own internals ("incomplete metadata, file not fully covered", "cannot
reshape array of size 3 into shape (8,)") or, worse, read on and fail much later. These checks
read only headers and sizes (never the tensor data, so they cost milliseconds on a 30 GB model)
and raise `UserError` naming the file and what is wrong with it.

    check_safetensors(path)      -> {name: (dtype, shape)}   the rules safetensors itself enforces
    check_gguf(path)             -> {name: (ggml type, shape)}  magic, version, metadata, tensor extents
    check_parquet(path)          -> None                     the PAR1 magic at both ends
    read_json_file(path, what)   -> the parsed JSON (an object unless told otherwise)

Each check is the same as or weaker than the reader it guards: a file that passes may still be
refused by the reader (e.g. a dtype it does not know), but a file it refuses would have been refused
or misread there too. Imports nothing from the rest of fourbit but its error type.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from fourbit.errors import UserError

# -- safetensors ------------------------------------------------------------------------------------
# bits per element, as safetensors' Dtype::bitsize (sub-byte float types pack several per byte)
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
                          "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
                          "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers (HeaderTooLarge)


def check_safetensors(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header, after checking what the format
    requires: an 8-byte little-endian header length, a JSON object header, and tensors whose
    data_offsets tile the data section exactly (no gap, overlap or missing byte), each as long as its
    dtype and shape say. Reads the header only. Raises UserError naming the file and the problem."""
    p = Path(path)
    size = _file_size(p, "safetensors file")
    if size < 8:
        raise UserError(f"{p}: not a safetensors file: {_bytes(size)}, shorter than the 8-byte header length "
                        f"(a truncated or failed download?)")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _SAFETENSORS_MAX_HEADER:
            raise UserError(f"{p}: not a safetensors file: its first 8 bytes give a header of {n} bytes (at most "
                            f"{_SAFETENSORS_MAX_HEADER} allowed)")
        if 8 + n > size:
            raise UserError(f"{p}: truncated: the header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a safetensors file: its header is not JSON ({_short(e)})") from None
    if not isinstance(header, dict):
        raise UserError(f"{p}: not a safetensors file: its header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{p}: bad safetensors header: __metadata__ must map names to strings")
    spans, out = [], {}
    for name, info in header.items():
        dtype, shape, nbytes, span = _safetensors_entry(p, name, info)
        spans.append((span, name, nbytes))
        out[name] = (dtype, shape)
    data = size - 8 - n  # bytes after the header
    end = 0
    for (begin, stop), name, nbytes in sorted(spans):
        if begin != end:
            raise UserError(f"{p}: bad safetensors header: tensor {name!r} starts at data byte {begin}, expected "
                            f"{end} (" + ("overlaps the tensor before it)" if begin < end else "a gap before it)"))
        if stop - begin != nbytes:
            raise UserError(f"{p}: bad safetensors header: tensor {name!r} is {out[name][0]} {out[name][1]}, "
                            f"{nbytes} bytes, but its data_offsets span {stop - begin}")
        end = stop
    if end > data:
        raise UserError(f"{p}: truncated: the header describes {end} bytes of tensor data, the file holds {data} "
                        f"({size} bytes in all; a truncated or failed download?)")
    if end < data:
        raise UserError(f"{p}: bad safetensors file: {data - end} bytes after the last tensor's data")
    return out


def _safetensors_entry(p: Path, name: str, info) -> tuple[str, list[int], int, tuple[int, int]]:
    """(dtype, shape, bytes its dtype and shape need, (begin, end)) of one header entry."""
    bad = f"{p}: bad safetensors header: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise UserError(f"{bad} needs dtype, shape and data_offsets, got {info!r:.120}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise UserError(f"{bad} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise UserError(f"{bad} has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise UserError(f"{bad} has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if bits % 8:
        raise UserError(f"{bad} is {dtype} {shape}: {bits} bits, not a whole number of bytes")
    return dtype, shape, bits // 8, (offsets[0], offsets[1])


# -- GGUF -------------------------------------------------------------------------------------------
# Note: GGUF layout (ggml's docs/gguf.md, versions 2 and 3; version 1 used 32-bit counts)
# "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata as (string key, u32 type,
# value); tensor infos as (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset);
# padding to `general.alignment` (default 32); the tensor data, each tensor at its offset from the
# start of the data. A string is a u64 length and UTF-8 bytes; an array a u32 item type, a u64
# count and the items. All little-endian.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Cursor:
    """Bounds-checked little-endian reads over a file's bytes: a short read is a UserError."""

    def __init__(self, f, size: int, p: Path):
        self.f, self.size, self.p, self.pos = f, size, p, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise UserError(f"{self.p}: truncated GGUF: {what} at byte {self.pos} needs {n} bytes, the file has "
                            f"{self.size} in all (a truncated or failed download?)")
        self.pos += n
        return self.f.read(n)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("<Q", what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.p}: bad GGUF: {what} at byte {self.pos - len(raw)} is not UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            itype, count = self.unpack("<I", what), self.unpack("<Q", what)
            if itype in _GGUF_SCALARS:  # skipped, not decoded: a vocabulary's scores are long
                self.take(count * struct.calcsize(_GGUF_SCALARS[itype]), what)
                return None
            if itype not in (_GGUF_STRING, _GGUF_ARRAY):
                raise UserError(f"{self.p}: bad GGUF: {what} is an array of unknown type {itype}")
            for _ in range(count):  # each item takes >= 8 bytes, so a lying count ends at the file's end
                self.value(itype, what)
            return None
        raise UserError(f"{self.p}: bad GGUF: {what} has unknown value type {vtype}")


def check_gguf(path: str | os.PathLike) -> dict[str, tuple[int, list[int]]]:
    """{tensor name: (ggml type, shape as stored, fastest dimension first)} after checking the
    magic, the version (2 or 3), that every header field lies inside the file, and that every
    tensor's data does. Reads the header only. Raises UserError naming the file and the problem."""
    from gguf import GGML_QUANT_SIZES  # block size and bytes per block of each ggml type

    p = Path(path)
    size = _file_size(p, "GGUF file")
    with open(p, "rb") as f:
        head = f.read(4)
        if head != b"GGUF":
            raise UserError(f"{p}: not a GGUF file: it starts with {head!r}, not b'GGUF'"
                            + (" (an empty file)" if not head else ""))
        c = _Cursor(f, size, p)
        c.pos = 4
        version = c.unpack("<I", "the version")
        if version not in (2, 3):
            raise UserError(f"{p}: GGUF version {version}; fourbit reads versions 2 and 3")
        n_tensors, n_kv = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the metadata count")
        alignment = 32
        for i in range(n_kv):
            key = c.string(f"metadata key {i}")
            value = c.value(c.unpack("<I", f"the type of {key!r}"), f"metadata {key!r}")
            if key == "general.alignment":
                if not isinstance(value, int) or value <= 0 or value & (value - 1):
                    raise UserError(f"{p}: bad GGUF: general.alignment is {value!r}, not a power of two")
                alignment = value
        infos = []
        for i in range(n_tensors):
            name = c.string(f"the name of tensor {i}")
            n_dims = c.unpack("<I", f"tensor {name!r}")
            if n_dims > 8:
                raise UserError(f"{p}: bad GGUF: tensor {name!r} has {n_dims} dimensions")
            dims = [c.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims)]
            infos.append((name, dims, c.unpack("<I", f"tensor {name!r}"), c.unpack("<Q", f"tensor {name!r}")))
    data_start = -(-c.pos // alignment) * alignment
    out = {}
    for name, dims, gtype, offset in infos:
        if gtype not in {int(k) for k in GGML_QUANT_SIZES}:
            raise UserError(f"{p}: bad GGUF: tensor {name!r} has unknown ggml type {gtype}")
        block, type_size = GGML_QUANT_SIZES[gtype]
        n = math.prod(dims)
        if dims and dims[0] % block:
            raise UserError(f"{p}: bad GGUF: tensor {name!r} has {dims[0]} columns, not a multiple of its type's "
                            f"block of {block}")
        end = data_start + offset + n // block * type_size
        if end > size:
            raise UserError(f"{p}: truncated GGUF: tensor {name!r} ends at byte {end}, the file has {size} "
                            f"(a truncated or failed download?)")
        out[name] = (gtype, dims)
    return out


# -- parquet and JSON -------------------------------------------------------------------------------
def check_parquet(path: str | os.PathLike) -> None:
    """A parquet file starts and ends with the 4 bytes PAR1 (Apache Parquet's file format); a text
    file or a truncated download with the suffix is refused here, before pyarrow reads it."""
    p = Path(path)
    size = _file_size(p, "parquet file")
    with open(p, "rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        what = "it starts with " + repr(head) if head != b"PAR1" else "it does not end with b'PAR1' (truncated?)"
        raise UserError(f"{p}: not a parquet file ({_bytes(size)}; {what}). Name JSON lines .jsonl, a JSON "
                        f"list .json and comma-separated text .csv")


def read_json_file(path: str | os.PathLike, what: str, kind: type = dict):
    """The JSON in `path`, which must be a `kind` (dict: an object; list; object: anything).
    `what` names the file for people ("the model's config.json", "the adapter config")."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        empty = " (the file is empty)" if not e.doc.strip() else ""
        raise UserError(f"{p}:{e.lineno}: {what} is not valid JSON ({e.msg}, column {e.colno}){empty}") from None
    if kind is not object and not isinstance(data, kind):
        want = {dict: "object", list: "list"}.get(kind, kind.__name__)
        raise UserError(f"{p}: {what} must be a JSON {want}, got {type(data).__name__}")
    return data


# -- helpers ----------------------------------------------------------------------------------------
def _file_size(p: Path, what: str) -> int:
    if not p.exists():
        raise UserError(f"{what} {p} does not exist")
    if not p.is_file():
        raise UserError(f"{p} is a directory, not a {what}")
    return p.stat().st_size


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _bytes(n: int) -> str:
    return "an empty file (0 bytes)" if n == 0 else f"{n} byte{'s' * (n != 1)}"


def _short(e: Exception) -> str:
    return getattr(e, "msg", None) or getattr(e, "reason", None) or str(e)[:120]
