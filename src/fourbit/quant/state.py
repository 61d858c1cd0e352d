"""`QuantState`: everything needed to dequantize a packed 4-bit tensor, and its on-disk form.

The on-disk form is bitsandbytes' (its `QuantState.as_dict(packed=True)`), so checkpoints move between fourbit and
transformers+bitsandbytes unchanged. For a weight at module path P, `as_dict("P.weight.")` gives

    P.weight.absmax                              uint8 [nblocks] (double quant) | float32 [nblocks]
    P.weight.quant_map                           float32 [16]
    P.weight.nested_absmax                       float32 [ceil(nblocks / 256)]    (double quant)
    P.weight.nested_quant_map                    float32 [256]                    (double quant)
    P.weight.quant_state.bitsandbytes__nf4       uint8 JSON: quant_type, blocksize, dtype, shape,
                                                 nested_blocksize, nested_dtype, nested_offset

`from_dict` checks every key, dtype, shape and JSON field and says what it expected; a corrupt
file never becomes a silently wrong tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from fourbit.quant.codebook import DTYPES, QUANT_TYPES


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class QuantStateError(ValueError):
    """A serialized quantization state that does not describe a valid 4-bit tensor."""


@dataclass
class NestedState:
    """Double quantization (QLoRA §3): the block constants, 8-bit quantized in blocks of 256."""

    absmax: torch.Tensor  # float32 [ceil(nblocks / blocksize)]
    code: torch.Tensor  # float32 [256], the signed dynamic map
    offset: float  # mean of the original absmax, subtracted before quantizing; stored, never recomputed
    blocksize: int = 256


@dataclass
class QuantState:
    """How to turn packed 4-bit codes back into a tensor of `shape` and `dtype`."""

    absmax: torch.Tensor  # float32 [nblocks], or uint8 [nblocks] when `nested` is set
    shape: torch.Size
    dtype: torch.dtype  # the dtype the tensor had, and dequantizes to by default
    blocksize: int
    quant_type: str
    code: torch.Tensor  # float32 [16]
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> QuantState:
        nested = self.nested and replace(self.nested, absmax=self.nested.absmax.to(device), code=self.nested.code.to(device))
        return replace(self, absmax=self.absmax.to(device), code=self.code.to(device), nested=nested)

    def nbytes(self) -> int:
        """Bytes of state (not counting the packed codes)."""
        t = [self.absmax, self.code] + ([self.nested.absmax, self.nested.code] if self.nested else [])
        return sum(x.numel() * x.element_size() for x in t)

    # -- serialization (bitsandbytes' keys) -------------------------------------------------
    def as_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": dtype_name(self.dtype),
                "shape": list(self.shape)}
        d = {f"{prefix}absmax": self.absmax, f"{prefix}quant_map": self.code}
        if self.nested is not None:
            d[f"{prefix}nested_absmax"] = self.nested.absmax
            d[f"{prefix}nested_quant_map"] = self.nested.code.clone()
            meta.update(nested_blocksize=self.nested.blocksize, nested_dtype="float32", nested_offset=self.nested.offset)
        blob = json.dumps(meta).encode()
        d[f"{prefix}quant_state.bitsandbytes__{self.quant_type}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], prefix: str = "", device: torch.device | str | None = None,
                  packed: torch.Tensor | None = None) -> QuantState:
        """Rebuild a state from `as_dict` output (or a bitsandbytes checkpoint's tensors under `prefix`).

        `packed`, when given, is checked against the shape the state describes.
        """
        where = prefix.rstrip(".") or "quant state"

        def get(name: str) -> torch.Tensor:
            key = prefix + name
            if key not in d:
                raise QuantStateError(f"{where}: missing key {key!r}; found {sorted(k for k in d if k.startswith(prefix))}")
            return d[key]

        meta_keys = [k for k in d if k.startswith(prefix + "quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise QuantStateError(f"{where}: expected exactly one '{prefix}quant_state.bitsandbytes__<nf4|fp4>' key, found {meta_keys}")
        try:
            meta = json.loads(bytes(d[meta_keys[0]].to(torch.uint8).cpu().tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QuantStateError(f"{where}: the quant_state JSON does not parse ({e})") from None
        if not isinstance(meta, dict):
            raise QuantStateError(f"{where}: quant_state JSON must be an object, got {type(meta).__name__}")
        missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in meta]
        if missing:
            raise QuantStateError(f"{where}: quant_state JSON lacks {missing}; has {sorted(meta)}")
        qt = meta["quant_type"]
        if qt not in QUANT_TYPES or not meta_keys[0].endswith(qt):
            raise QuantStateError(f"{where}: quant_type {qt!r} (key {meta_keys[0]!r}); expected one of {QUANT_TYPES}")
        if meta["dtype"] not in DTYPES:
            raise QuantStateError(f"{where}: dtype {meta['dtype']!r}; expected one of {sorted(DTYPES)}")
        bs = meta["blocksize"]
        if not isinstance(bs, int) or bs < 2 or bs & (bs - 1):
            raise QuantStateError(f"{where}: blocksize {bs!r}; expected a power of two")
        shape = meta["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise QuantStateError(f"{where}: shape {shape!r}; expected a list of non-negative ints")
        n = math.prod(shape)
        nblocks = -(-n // bs)
        code = get("quant_map")
        if code.shape != (16,) or code.dtype != torch.float32:
            raise QuantStateError(f"{where}: quant_map must be float32 [16], got {code.dtype} {list(code.shape)}")
        absmax = get("absmax")
        nested = None
        if "nested_absmax" in meta or prefix + "nested_absmax" in d or "nested_offset" in meta:
            nbs = meta.get("nested_blocksize", 256)
            if not isinstance(nbs, int) or nbs <= 0:
                raise QuantStateError(f"{where}: nested_blocksize {nbs!r}; expected a positive int")
            if not isinstance(meta.get("nested_offset"), (int, float)):
                raise QuantStateError(f"{where}: nested_offset missing or not a number: {meta.get('nested_offset')!r}")
            nabs, ncode = get("nested_absmax"), get("nested_quant_map")
            if absmax.dtype != torch.uint8 or absmax.shape != (nblocks,):
                raise QuantStateError(f"{where}: absmax must be uint8 [{nblocks}] with double quant, got {absmax.dtype} {list(absmax.shape)}")
            if nabs.dtype != torch.float32 or nabs.shape != (-(-nblocks // nbs),):
                raise QuantStateError(f"{where}: nested_absmax must be float32 [{-(-nblocks // nbs)}], got {nabs.dtype} {list(nabs.shape)}")
            if ncode.dtype != torch.float32 or ncode.shape != (256,):
                raise QuantStateError(f"{where}: nested_quant_map must be float32 [256], got {ncode.dtype} {list(ncode.shape)}")
            nested = NestedState(absmax=nabs, code=ncode, offset=float(meta["nested_offset"]), blocksize=nbs)
        elif absmax.dtype != torch.float32 or absmax.shape != (nblocks,):
            raise QuantStateError(f"{where}: absmax must be float32 [{nblocks}], got {absmax.dtype} {list(absmax.shape)}")
        if packed is not None and packed.numel() * packed.element_size() != (n + 1) // 2:
            raise QuantStateError(f"{where}: packed weight has {packed.numel() * packed.element_size()} bytes; "
                                  f"shape {shape} needs {(n + 1) // 2}")
        state = cls(absmax=absmax, shape=torch.Size(shape), dtype=DTYPES[meta["dtype"]], blocksize=bs,
                    quant_type=qt, code=code, nested=nested)
        return state.to(device) if device is not None else state
