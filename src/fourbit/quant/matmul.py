"""`matmul_4bit`: y = x @ dequant(W)^T (+ bias) straight from packed NF4/FP4 codes, for few rows of x.

Generation multiplies one row (or a handful, in a batch) by every weight matrix per token.
Dequantizing W into a float32 buffer first writes and reads back 8 bytes per weight for 1 to 16
multiply-adds each; reading the 0.5-byte codes once and decoding them in registers (a 16-entry
table per nibble, the block scale applied once per block) does the same product 3-5x faster at
one row on a CPU (bench/quant_matmul.py measures both).

Dispatch, one function for every device:
  * CPU: the C kernel in `fourbit.quant.kernels.cpu` (AVX2 + FMA when the CPU has them, a
    scalar loop otherwise), output rows split over `torch.get_num_threads()` threads;
  * CUDA, one row: the Triton gemv of `fourbit.quant.kernels.triton_4bit`;
  * otherwise: the pure-torch reference, dequantize then matmul.
From ~32 rows dequantize + sgemm is as fast on a CPU, so callers (Linear4bit, LoraLinear) use
this function up to SKINNY_MAX_ROWS rows. `batch_invariant_linear` is the same kind of kernel for
the float32 products beside a 4-bit one (LoRA adapters, an lm_head): F.linear's BLAS gives a row
different last bits alone and in a batch, these do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fourbit.quant.blockwise import dequantize_4bit, triton_kernels
from fourbit.quant.kernels import cpu
from fourbit.quant.state import QuantState

# Rows of x up to which Linear4bit uses the CPU kernel rather than dequantize + sgemm
# (bench/quant_matmul.py, SmolLM2-135M's shapes, one thread: 3.4-5.3x faster at 1 row, 2.1-2.6x
# at 8, 1.4-1.6x at 16, even at 32).
SKINNY_MAX_ROWS = 16


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T + bias -> (..., O) in x's dtype, W = dequant(packed, state) of shape (O, K).

    Contract (what a batched decoding engine may rely on):
      * x: any float dtype, any leading dims (M rows in all); packed: the contiguous packed codes
        (uint8, or any storage dtype holding the same bytes); bias: (O,) or None.
      * CPU: float32 arithmetic (fp16/bf16 inputs are converted to float32 and the result back),
        output rows split over torch.get_num_threads() threads. Each output element is computed
        by the same sequence of float operations whatever M and the thread count are, so a row
        of x gives bit-identical output alone or in a batch of any size. It is the float32 dot
        product of x with the dequantized W (the same float32 weights) summed in another order:
        tests/test_quant_matmul.py bounds the difference to dequantize-then-matmul and to float64.
      * CUDA: one row goes through the Triton gemv (float32 accumulation); more rows dequantize
        to x's dtype and call F.linear.
      * The CPU kernel serves any M, but above SKINNY_MAX_ROWS rows dequantize + matmul is faster.
    """
    n_out, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"matmul_4bit: x has {x.shape[-1]} features (shape {list(x.shape)}), "
                         f"W is {n_out}x{k}: x's last dim must be {k}")
    if x.device.type == "cpu" and cpu.available():
        x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.to(torch.float32).contiguous()
        y = cpu.matmul4(x2, packed, state, bias, torch.empty((*x.shape[:-1], n_out)), torch.get_num_threads())
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    if x.device.type == "cuda" and x.numel() == k and (t := triton_kernels()) is not None:
        y = t.gemv_4bit(x, packed, state)
        if y is not None:
            return y if bias is None else y + bias.to(y.dtype)
    return matmul_4bit_reference(x, packed, state, bias)


def matmul_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize W to x's dtype (float32 for CPU half inputs, as the kernel computes), then F.linear."""
    dtype = torch.float32 if x.device.type == "cpu" else x.dtype
    p = packed.reshape(-1).view(torch.uint8)[: (state.numel + 1) // 2]  # storage may be padded (FSDP)
    w = dequantize_4bit(p, state, dtype)  # (O, K)
    y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
    return y.to(x.dtype)


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for a float weight, with matmul_4bit's guarantee on a CPU: each output
    row is bit-identical whether x has 1 row or many (BLAS picks different kernels for 1 row and for
    8, so F.linear's rows differ in the last bits). For the small float products beside a 4-bit one
    in batched decoding: a LoRA adapter's A and B, an unquantized lm_head. float32 arithmetic; off
    the CPU, or without the C kernel, it is F.linear (no guarantee).
    """
    if x.device.type != "cpu" or not cpu.available():
        return F.linear(x, weight, bias)
    x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    w = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    y = cpu.matmul_f32(x2, w, bias, torch.empty((*x.shape[:-1], w.shape[0])), torch.get_num_threads())
    return y if x.dtype == torch.float32 else y.to(x.dtype)
