"""`Linear4bit`: a frozen linear layer stored as packed 4-bit codes (bitsandbytes' format).

One autograd.Function does the work (QLoRA §3; torchao's LinearNF4): forward dequantizes W to the input's
dtype and computes x @ W^T + b; backward dequantizes W again and returns grad_y @ W. Only the
packed codes and the QuantState are kept for backward, never a 16-bit copy of W, and W gets no
gradient. Dequantization goes through `fourbit.quant.dequantize_4bit` (C kernel on CPU, Triton
on CUDA, pure torch otherwise) into a scratch buffer shared by all Linear4bit layers of the same
device and dtype, so a forward pass allocates one weight-sized buffer instead of one per layer.
When no gradient is needed and x has few rows (generation), forward skips the buffer and
multiplies straight from the codes with `fourbit.quant.matmul_4bit` (the C kernel on a CPU up to
SKINNY_MAX_ROWS rows, the Triton gemv on CUDA for one row).

The module's state_dict uses bitsandbytes' keys (`weight`, `weight.absmax`, `weight.quant_map`,
..., see `fourbit.quant.state`), so `model.state_dict()` of a quantized model saves as a
checkpoint that transformers + bitsandbytes loads.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fourbit.quant import SKINNY_MAX_ROWS, QuantState, dequantize_4bit, matmul_4bit, quantize_4bit
from fourbit.quant.state import NestedState


def default_compute_dtype(device: torch.device | str | None) -> torch.dtype:
    """bf16 on CUDA (the paper's setting), fp32 elsewhere (CPUs here have no bf16 arithmetic)."""
    return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32


# Note: Shared dequantization buffer
# Dequantized weights live only between a dequantize and the matmul that consumes it, so every
# Linear4bit on a device can reuse one flat buffer per dtype, grown to the largest weight seen.
# Autograd never holds on to it: backward dequantizes again into the same buffer.
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    n = shape.numel()
    buf = _SCRATCH.get((device, dtype))
    if buf is None or buf.numel() < n:
        _SCRATCH.pop((device, dtype), None)  # free the old one before allocating the bigger one
        buf = _SCRATCH[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def skinny(x: torch.Tensor, in_features: int) -> bool:
    """True when `matmul_4bit` beats dequantize + matmul for x and no gradient is needed: on a CPU
    up to SKINNY_MAX_ROWS rows (the C kernel), on CUDA one row (the Triton gemv)."""
    if (torch.is_grad_enabled() and x.requires_grad) or x.dtype == torch.float64:  # float64: a reference run
        return False
    rows = x.numel() // in_features
    return rows <= SKINNY_MAX_ROWS if x.device.type == "cpu" else rows == 1 and x.is_cuda


def dequantize_weight(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) in `dtype`, in the shared scratch buffer: valid until the next call."""
    if _HOOK:
        return _HOOK[-1](packed, state, dtype)
    return dequantize_4bit(packed, state, dtype, out=_scratch(state.shape, dtype, packed.device))


_HOOK: list = []  # see dequantize_hook


@contextlib.contextmanager
def dequantize_hook(fn):
    """Inside the block, every Linear4bit and LoraLinear dequantizes with `fn(packed, state, dtype)`
    instead: how fourbit.memory's meta-device trace stands in a view of its own counted buffer for
    the weight (meta tensors hold no codes), without patching this module from outside."""
    _HOOK.append(fn)
    try:
        yield
    finally:
        _HOOK.remove(fn)


# Note: Weights kept across checkpoint recomputation
# With gradient checkpointing a layer's forward runs twice, the second time during backward,
# right before that layer's backward, and each run dequantizes W; backward would dequantize it a
# third time. A forward that runs inside a backward pass is such a recomputation (both torch
# checkpoint modes run it there): it dequantizes into a fresh tensor instead of the scratch
# buffer and leaves it in _RECOMPUTED, where the backward of the same weight takes it. That
# holds one decoder layer's weights at most (the recomputation covers one layer and its
# backward follows at once); anything not taken is dropped when the backward pass ends. CPU
# only: there dequantizing costs a visible share of the step, while on a GPU it is cheap next
# to the matmuls and memory is the scarce resource.
# An entry is keyed by the QuantState object (the module's cached state, the same in the recomputed
# forward and in backward) and holds it, so the key cannot be reused by another weight while the
# entry lives; the address of the codes could be (FSDP gathers each layer's codes into fresh memory).
_RECOMPUTED: dict[tuple[int, torch.dtype], list] = {}  # (id(state), dtype) -> [W, uses left, state]
_CLEAR_QUEUED_FOR = [-1]  # the backward pass (graph task id) that will clear _RECOMPUTED at its end


def forward_weight(packed: torch.Tensor, state: QuantState, dtype: torch.dtype, keep: bool) -> torch.Tensor:
    """W (out, in) for a forward pass: the scratch buffer, or, when this forward is a checkpoint
    recomputation on a CPU and `keep` (backward will need W), a fresh tensor kept for backward."""
    task = torch._C._current_graph_task_id() if keep and packed.device.type == "cpu" else -1
    if task == -1:
        return dequantize_weight(packed, state, dtype)
    key = (id(state), dtype)
    hit = _RECOMPUTED.get(key)
    if hit is not None:  # the same weight twice in one layer (tied weights)
        hit[1] += 1
        return hit[0]
    if _CLEAR_QUEUED_FOR[0] != task:
        _CLEAR_QUEUED_FOR[0] = task
        torch.autograd.Variable._execution_engine.queue_callback(_RECOMPUTED.clear)
    w = dequantize_4bit(packed, state, dtype)
    _RECOMPUTED[key] = [w, 1, state]
    return w


def backward_weight(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """W (out, in) for a backward pass: the one its recomputed forward kept, else dequantized again."""
    key = (id(state), dtype)
    hit = _RECOMPUTED.get(key)
    if hit is None:
        return dequantize_weight(packed, state, dtype)
    hit[1] -= 1
    if hit[1] == 0:
        del _RECOMPUTED[key]
    return hit[0]


class _Linear4bitFn(torch.autograd.Function):
    """y = x @ dequant(W)^T + b; grad_x = grad_y @ dequant(W); no gradient for W or b."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        w = forward_weight(packed, state, x.dtype, keep=ctx.needs_input_grad[0])  # (out, in)
        ctx.state = state
        ctx.save_for_backward(packed)
        return F.linear(x, w, bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = backward_weight(packed, ctx.state, grad_y.dtype)  # (out, in)
            grad_x = grad_y @ w  # (..., in)
        return grad_x, None, None, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is packed NF4/FP4 (+ double-quantized block constants)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = dtype  # the dtype W had before quantization (dequantizes to it by default)
        n = in_features * out_features
        self.register_buffer("weight", torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        # QuantState tensors as non-persistent buffers so .to()/.cuda() move them; the state_dict
        # carries them under bitsandbytes' names instead (see _save_to_state_dict).
        self._offset = 0.0
        for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            self.register_buffer(f"_{name}", None, persistent=False)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, weight: torch.Tensor | None = None) -> Linear4bit:
        """Quantize an nn.Linear (or `weight`, when the module is an empty shell on the meta device)."""
        w = linear.weight if weight is None else weight
        b = linear.bias
        device = w.device
        mod = cls(linear.in_features, linear.out_features, bias=b is not None, quant_type=quant_type,
                  blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, device="meta",
                  dtype=w.dtype)
        mod.set_quantized(*quantize_4bit(w.detach(), quant_type, blocksize, double_quant))
        if b is not None:
            mod.bias = nn.Parameter(b.detach().to(device) if not b.is_meta else torch.zeros_like(b, device=device),
                                    requires_grad=False)
        return mod

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install packed codes + state (shapes are checked against the layer)."""
        expect = torch.Size([self.out_features, self.in_features])
        if state.shape != expect:
            raise ValueError(f"quantized weight has shape {list(state.shape)}, layer needs {list(expect)}")
        self.weight = packed.reshape(-1, 1) if packed.dtype == torch.uint8 else packed.view(-1, 1)
        self.quant_type, self.blocksize, self.weight_dtype = state.quant_type, state.blocksize, state.dtype
        self._absmax, self._quant_map = state.absmax, state.code
        self.double_quant = state.nested is not None
        if state.nested is not None:
            self._nested_absmax, self._nested_quant_map = state.nested.absmax, state.nested.code
            self._offset = state.nested.offset
        else:
            self._nested_absmax = self._nested_quant_map = None

    @property
    def quant_state(self) -> QuantState:
        """The QuantState over the current buffers (cached; rebuilt after .to() or set_quantized)."""
        qs = self.__dict__.get("_qs")
        if qs is None or qs.absmax is not self._absmax:
            qs = self.__dict__["_qs"] = self._build_quant_state()
        return qs

    def _build_quant_state(self) -> QuantState:
        nested = None
        if self._nested_absmax is not None:
            nested = NestedState(absmax=self._nested_absmax, code=self._nested_quant_map, offset=self._offset)
        return QuantState(absmax=self._absmax, shape=torch.Size([self.out_features, self.in_features]),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          code=self._quant_map, nested=nested)

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes as uint8 bytes, whatever dtype stores them (see set_storage_dtype)."""
        w = self.weight
        if w.dtype == torch.uint8:
            return w
        n = (self.in_features * self.out_features + 1) // 2
        return w.detach().reshape(-1).view(torch.uint8)[:n]

    def set_storage_dtype(self, dtype: torch.dtype) -> None:
        """Store the packed bytes as a frozen nn.Parameter of a float `dtype` (zero-padded to whole
        elements), shape (elements, 1): what FSDP2 can shard and all-gather (bitsandbytes calls this
        quant_storage). The bytes and the quantization are unchanged; uint8 restores a buffer."""
        raw = self.packed.reshape(-1)
        if dtype == torch.uint8:
            del self.weight
            self.register_buffer("weight", raw.clone().reshape(-1, 1))
            return
        size = torch.empty((), dtype=dtype).element_size()
        padded = torch.zeros(-(-raw.numel() // size) * size, dtype=torch.uint8, device=raw.device)
        padded[: raw.numel()] = raw
        if "weight" in self._buffers:
            del self._buffers["weight"]
        self.weight = nn.Parameter(padded.view(dtype).reshape(-1, 1), requires_grad=False)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor holding W (out, in), in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.packed, self.quant_state, dtype or self.weight_dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype or x.dtype
        if cd != torch.float64 and skinny(x, self.in_features):  # generation: no weight-sized buffer
            xc = x if x.device.type == "cpu" else x.to(cd)  # the CPU kernel computes in float32
            return matmul_4bit(xc, self.packed, self.quant_state, self.bias).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(cd)
        y = _Linear4bitFn.apply(x.to(cd), self.packed, self.quant_state, bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")

    # -- state dict in bitsandbytes' layout -----------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.quant_state.as_dict(prefix + "weight.").items():
            destination[k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        qkeys = [k for k in state_dict if k.startswith(prefix + "weight.")]
        if qkeys:
            packed = state_dict.get(prefix + "weight")
            try:
                state = QuantState.from_dict({k: state_dict[k] for k in qkeys}, prefix + "weight.", packed=packed)
                self.set_quantized(packed.to(self.weight.device if not self.weight.is_meta else packed.device),
                                   state.to(packed.device))
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
            consumed = {prefix + "weight", *qkeys}
            state_dict = {k: v for k, v in state_dict.items() if k not in consumed}
            if self.bias is not None and prefix + "bias" in state_dict:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].to(self.weight.device), requires_grad=False)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
