"""Code books: the 16 values of NF4 and FP4, and the 256-value dynamic map used for 8-bit states.

NF4 (QLoRA §3, "4-bit NormalFloat"): quantiles of N(0, 1), normalised to [-1, 1], asymmetric so
that zero is exactly representable: 8 positive levels from ndtri(linspace(offset, 0.5, 9)[:-1]),
7 negative levels from -ndtri(linspace(offset, 0.5, 8)[:-1]), and 0. `offset = 0.9677083` is the
midpoint of the two outermost quantiles (1/2 (1/32 + 1/30) below 1), the paper's choice. The
derivation reproduces bitsandbytes' table bit for bit (tests/test_quant_codebook.py).

FP4 is bitsandbytes' 1-sign/2-exponent/1-mantissa format with the sign in bit 3.

The dynamic map (Dettmers 2015, "8-bit approximations") spends bits on exponents: for i = 0..6,
2^i (signed) or 2^(i+1) (unsigned) linearly spaced fractions at scale 10^(i-6). Double
quantization (QLoRA §3) uses the signed map for the block constants; 8-bit optimizers use the
signed map for Adam's first moment and the unsigned one for the second.
"""

from __future__ import annotations

from functools import lru_cache

import torch

NF4_OFFSET = 0.9677083
QUANT_TYPES = ("nf4", "fp4")
# The float dtypes a 4-bit tensor is quantized from and dequantizes to, by fourbit's short names
# (the CLI's --dtype values) and torch's / bitsandbytes' long ones (the quant_state JSON's "dtype").
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


def nf4_values() -> torch.Tensor:
    """The 16 NF4 levels, derived from normal quantiles (float32, sorted, exact +-1 at the ends)."""
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # (8,)
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # (7,)
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    v = v.float()
    return v / v.max()


def fp4_values() -> torch.Tensor:
    """The 16 FP4 levels in code order (index = 4-bit code), normalised to [-1, 1]."""
    return torch.tensor(_FP4, dtype=torch.float32) / 12.0


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted levels of the dynamic 8-bit data type (float32)."""
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i + 1 if signed else 2 ** (i + 1) + 1
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2  # float32, like the reference implementation
        scaled = (10.0 ** (i - 6)) * means
        values += scaled.tolist()
        if signed:
            values += (-scaled).tolist()
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _code(quant_type: str, device: str) -> torch.Tensor:
    if quant_type == "nf4":
        return nf4_values().to(device)
    if quant_type == "fp4":
        return fp4_values().to(device)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def get_code(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-value code book of `quant_type` on `device` (cached; do not modify in place)."""
    return _code(quant_type, str(torch.device(device)))


@lru_cache(maxsize=None)
def _dyn(signed: bool, device: str) -> torch.Tensor:
    return dynamic_map(signed).to(device)


def get_dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value dynamic map on `device` (cached; do not modify in place)."""
    return _dyn(signed, str(torch.device(device)))


@lru_cache(maxsize=None)
def _bounds(quant_type: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code(quant_type, device)
    order = torch.argsort(code, stable=True)  # FP4 is not sorted; NF4's order is the identity
    sorted_code = code[order]
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2  # (15,) float32 midpoints
    return mids, order.to(torch.uint8)


def quantize_bounds(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(15 float32 midpoints between sorted levels, sorted position -> 4-bit code) for rounding."""
    return _bounds(quant_type, str(torch.device(device)))


def zero_code(quant_type: str, device: torch.device | str = "cpu") -> int:
    """The 4-bit code that 0.0 rounds to: what pads an odd tail (and, in bitsandbytes' CPU rule,
    codes an all-zero block)."""
    mids, order = quantize_bounds(quant_type, device)
    return int(order[torch.bucketize(torch.zeros(1, device=mids.device), mids)])
