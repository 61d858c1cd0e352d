"""`LoraLinear`: a low-rank adapter around any linear layer, quantized or not (Hu et al., 2021).

    y = base(x) + scaling * B(A(dropout(x)))        A: (r, in), B: (out, r), scaling = alpha / r

A is initialised like PEFT (kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(in))), B with
zeros, so a fresh adapter leaves the model unchanged. rsLoRA uses scaling = alpha / sqrt(r).
The adapter's parameters are kept in `adapter_dtype` (fp32 by default, so optimizer updates are
not lost to bf16 rounding) and cast to the base layer's compute dtype inside forward; the cast
is part of the graph, so gradients reach the fp32 parameters.

`merge()` folds scaling * B @ A into the base weight and returns a plain nn.Linear; for a 4-bit
base the sum is computed in float32 from the dequantized weight and optionally quantized again
(`requantize=True`), which rounds: `fourbit merge` measures and reports that cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fourbit.nn.linear4bit import Linear4bit, backward_weight, forward_weight, skinny
from fourbit.quant import batch_invariant_linear, matmul_4bit


class _QLoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T, W frozen 4-bit, in one node of the autograd graph.

    # Note: Fused QLoRA linear
    Written as separate modules this is ~8 autograd nodes and kernels per layer (dequantize, base
    matmul, two weight casts, two LoRA matmuls, scale, add), each paying Python and launch
    overhead, which dominates a 7B step on an H100. Here the LoRA product is added into the base
    output by one addmm (alpha = s), and backward computes exactly what is needed:
        grad_B = s gy^T h,  grad_h = s gy B,  grad_A = grad_h^T xd,  grad_xd = grad_h A,  grad_x = gy W
    with W dequantized again (only the packed codes are kept). Saved: xd (the LoRA input after
    dropout), h = xd A^T (N, r), and the adapter weights cast to the compute dtype.
    """

    @staticmethod
    def forward(ctx, x, xd, a, b, packed, state, bias, scaling):
        shape = x.shape
        cd = x.dtype
        x2, xd2 = x.reshape(-1, shape[-1]), xd.reshape(-1, shape[-1])  # (N, in)
        a_c, b_c = a.to(cd), b.to(cd)  # (r, in), (out, r)
        w = forward_weight(packed, state, cd, keep=ctx.needs_input_grad[0])  # (out, in), usually the scratch buffer
        y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()  # (N, out)
        h = xd2 @ a_c.t()  # (N, r)
        y.addmm_(h, b_c.t(), alpha=scaling)
        ctx.save_for_backward(xd2, h, a_c, b_c, packed)
        ctx.state, ctx.scaling, ctx.same = state, scaling, xd is x
        ctx.dtypes = (a.dtype, b.dtype)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xd2, h, a_c, b_c, packed = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])  # (N, out)
        s = ctx.scaling
        gh = (gy2 @ b_c).mul_(s)  # (N, r)
        g_a = (gh.t() @ xd2).to(ctx.dtypes[0])  # (r, in)
        g_b = (gy2.t() @ h).mul_(s).to(ctx.dtypes[1])  # (out, r)
        g_x = g_xd = None
        shape = (*gy.shape[:-1], xd2.shape[-1])
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_xd = gh @ a_c  # (N, in)
            if ctx.needs_input_grad[0]:
                w = backward_weight(packed, ctx.state, gy2.dtype)  # (out, in)
                if ctx.same:  # xd is x: one gradient, accumulated into by the matmul itself
                    g_x, g_xd = g_xd.addmm_(gy2, w), None
                else:
                    g_x = gy2 @ w  # (N, in)
            g_x = None if g_x is None else g_x.view(shape)
            g_xd = None if g_xd is None or not ctx.needs_input_grad[1] else g_xd.view(shape)
        return g_x, g_xd, g_a, g_b, None, None, None, None


class LoraLinear(nn.Module):
    """base_layer (frozen) + a trainable rank-r update; the layout PEFT uses (lora_A, lora_B)."""

    def __init__(self, base_layer: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: U(+-1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, Linear4bit):  # the fused path: one autograd node, see _QLoraLinearFn
            trains = self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad
            if not (torch.is_grad_enabled() and trains) and base.compute_dtype != torch.float64 \
                    and skinny(x, self.in_features):
                return self._forward_skinny(x)
            cd = base.compute_dtype or x.dtype
            xc = x.to(cd)
            xd = self.lora_dropout(xc) if self.training else xc
            bias = None if base.bias is None else base.bias.to(cd)
            y = _QLoraLinearFn.apply(xc, xd, self.lora_A.weight, self.lora_B.weight, base.packed, base.quant_state,
                                     bias, self.scaling)
            return y.to(x.dtype)
        y = base(x)  # (..., out)
        cd = y.dtype
        a = self.lora_A.weight.to(cd)  # (r, in); a no-op when the adapter dtype is the compute dtype
        b = self.lora_B.weight.to(cd)  # (out, r)
        h = torch.nn.functional.linear(self.lora_dropout(x).to(cd), a)  # (..., r)
        return y + torch.nn.functional.linear(h, b) * self.scaling

    def _forward_skinny(self, x: torch.Tensor) -> torch.Tensor:
        """Generation with a 4-bit base: base product straight from the codes, adapter unmerged; every
        product keeps each row's bits independent of the batch (see matmul_4bit)."""
        base = self.base_layer
        xc = x if x.device.type == "cpu" else x.to(base.compute_dtype or x.dtype)  # CPU: float32 inside
        y = matmul_4bit(xc, base.packed, base.quant_state, base.bias)  # (..., out)
        cd = y.dtype
        h = batch_invariant_linear(self.lora_dropout(xc).to(cd), self.lora_A.weight.to(cd))  # (..., r)
        return y.add_(batch_invariant_linear(h, self.lora_B.weight.to(cd)), alpha=self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self, dtype: torch.dtype | None = None, requantize: bool = False) -> nn.Module:
        """The base layer with the adapter folded in: an nn.Linear, or a Linear4bit if `requantize`."""
        base = self.base_layer
        if isinstance(base, Linear4bit):
            w = base.dequantize(torch.float32)
            out_dtype = dtype or base.weight_dtype
        else:
            w = base.weight.float()
            out_dtype = dtype or base.weight.dtype
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=w.device, dtype=out_dtype)
        merged.weight.copy_((w + self.delta_weight()).to(out_dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        if requantize:
            q = base if isinstance(base, Linear4bit) else None
            return Linear4bit.from_linear(merged, quant_type=q.quant_type if q else "nf4",
                                          blocksize=q.blocksize if q else 64,
                                          double_quant=q.double_quant if q else True,
                                          compute_dtype=q.compute_dtype if q else None)
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
