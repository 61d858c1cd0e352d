"""AdamW with 32-bit or blockwise 8-bit states, optionally paged (QLoRA §3, "Paged Optimizers").

One class does the arithmetic; the public names choose its two switches:

    PagedAdamW        32-bit states, paged on CUDA     (the paper's default)
    AdamW8bit         8-bit states
    PagedAdamW8bit    8-bit states, paged on CUDA

The 32-bit update follows torch.optim.AdamW's order of operations exactly (decoupled weight
decay first, then m / (sqrt(v) / sqrt(1 - b2^t) + eps) with step size lr / (1 - b1^t)), which
is Loshchilov & Hutter's AdamW (Algorithm 2) rearranged; tests/test_optim.py holds it to torch.optim.AdamW at 1e-6.

8-bit states (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): m with the
signed dynamic map, v with the unsigned one, each in blocks of 256 with a float32 absmax per
block (2.03 bytes per parameter instead of 8). Every step dequantizes, updates in float32 and
quantizes again. Tensors under `min_8bit_size` elements keep 32-bit states, as bitsandbytes does.

Paging: on CUDA, states of parameters with >= `page_threshold` elements live in managed memory
(fourbit.optim.paged) and are prefetched to the GPU right before their update when memory
pressure since the last step may have evicted them (`prefetch="auto"`, see fourbit.optim.paged,
Note: Prefetch only after pressure), or before every update (`prefetch="always"`). Elsewhere
(CPU parameters, small tensors) states are ordinary tensors, so the same classes run everywhere.
`state_dict()` is torch's format with plain tensors, and `load_state_dict` checks that the state
came from the same kind of optimizer and fits the parameters' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from fourbit.quant import dequantize_blockwise_8bit, get_dynamic_map, quantize_blockwise_8bit

BLOCK = 256


PREFETCH = ("auto", "always")  # when paged states are prefetched: after possible eviction, or every step
_FOREACH_ELEMENTS = 1 << 25  # parameters per multi-tensor update: its temporaries stay <= 128 MB (fp32)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: updating it updates the parameter), else t."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_hparams(lr, betas, eps, weight_decay) -> None:
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class _AdamW(Optimizer):
    optim_bits = 32
    paged = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096, page_threshold: int = 100_000,
                 prefetch: str = "auto"):
        _check_hparams(lr, betas, eps, weight_decay)
        if prefetch not in PREFETCH:
            raise ValueError(f"prefetch must be one of {', '.join(PREFETCH)}, got {prefetch!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size, self.page_threshold, self.prefetch = min_8bit_size, page_threshold, prefetch
        self._watches: dict[torch.device, object] = {}  # device -> fourbit.optim.paged.EvictionWatch

    # -- state ----------------------------------------------------------------------------------
    def _is_paged(self, p: torch.Tensor) -> bool:
        return self.paged and p.device.type == "cuda" and p.numel() >= self.page_threshold

    def _eviction_watch(self, device: torch.device):
        from fourbit.optim.paged import EvictionWatch

        return EvictionWatch(device)

    def _needs_prefetch(self, device: torch.device, checked: dict) -> bool:
        """Once per step and device: whether this step prefetches its paged states."""
        if device not in checked:
            if device not in self._watches:
                self._watches[device] = self._eviction_watch(device)
            evicted = self._watches[device].may_have_evicted()  # keeps its own count up to date
            checked[device] = self.prefetch == "always" or evicted
        return checked[device]

    def _empty(self, p: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self._is_paged(p):
            from fourbit.optim.paged import managed_empty

            return managed_empty(numel, dtype, p.device).zero_()
        return torch.zeros(numel, dtype=dtype, device=p.device)

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": torch.zeros((), dtype=torch.float32)}
        n = p.numel()
        if self._uses_8bit(p):
            nb = -(-n // BLOCK)
            st["exp_avg_q"], st["exp_avg_sq_q"] = self._empty(p, n, torch.uint8), self._empty(p, n, torch.uint8)
            st["exp_avg_absmax"], st["exp_avg_sq_absmax"] = self._empty(p, nb, torch.float32), self._empty(p, nb, torch.float32)
        else:
            st["exp_avg"] = self._empty(p, n, torch.float32).view(p.shape)
            st["exp_avg_sq"] = self._empty(p, n, torch.float32).view(p.shape)
        return st

    def state_bytes(self) -> int:
        """Bytes of optimizer state held (all tensors but the step counters)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for k, t in st.items()
                   if isinstance(t, torch.Tensor) and k != "step")

    # -- update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        checked: dict[torch.device, bool] = {}  # device -> prefetch this step
        for group in self.param_groups:
            batch = []  # 32-bit fp32 parameters: updated together with multi-tensor (foreach) kernels
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                p, g = _local(param), _local(param.grad)  # a sharded (FSDP2) parameter: this rank's shard
                st = self.state[param]
                if not st:
                    st.update(self._init_state(p))
                if self._is_paged(p) and self._needs_prefetch(p.device, checked):
                    from fourbit.optim import paged

                    for k, t in st.items():
                        if k != "step":  # the step count lives on the CPU
                            paged.prefetch(t, p.device)
                if "exp_avg" in st and p.dtype == torch.float32 and g.dtype == torch.float32:
                    batch.append((p, g, st))
                else:
                    self._update(p, g, st, group)
            start, size = 0, 0
            for i, (p, _, _) in enumerate(batch):  # chunks of <= _FOREACH_ELEMENTS: bounded temporaries
                size += p.numel()
                if size >= _FOREACH_ELEMENTS or i == len(batch) - 1:
                    self._update_foreach(batch[start:i + 1], group)
                    start, size = i + 1, 0
        return loss

    def _update_foreach(self, batch: list, group: dict) -> None:
        """The 32-bit update of `_update`, the same operations in the same order, over many tensors
        per kernel launch (a 7B LoRA has ~450 adapter tensors: one launch each is the bottleneck)."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        ps, grads, sts = [p for p, _, _ in batch], [g for _, g, _ in batch], [st for _, _, st in batch]
        ms, vs = [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts]
        for st in sts:
            st["step"] += 1
        ts = [float(st["step"]) for st in sts]
        if wd:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1 - b2**t) for t in ts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1**t) for t in ts])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, st: dict, group: dict) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        st["step"] += 1
        t = float(st["step"])
        g = grad.float()
        eight = "exp_avg_q" in st
        if eight:
            m = dequantize_blockwise_8bit(st["exp_avg_q"], st["exp_avg_absmax"], get_dynamic_map(True, p.device),
                                          BLOCK).view(p.shape)
            v = dequantize_blockwise_8bit(st["exp_avg_sq_q"], st["exp_avg_sq_absmax"],
                                          get_dynamic_map(False, p.device), BLOCK).view(p.shape)
        else:
            m, v = st["exp_avg"], st["exp_avg_sq"]
        pf = p if p.dtype == torch.float32 else p.float()
        pf.mul_(1 - lr * wd)  # decoupled weight decay
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1, bias2 = 1 - b1**t, 1 - b2**t
        denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
        pf.addcdiv_(m, denom, value=-lr / bias1)
        if pf is not p:
            p.copy_(pf)
        if eight:
            st["exp_avg_q"], st["exp_avg_absmax"] = self._requant(st["exp_avg_q"], st["exp_avg_absmax"], m, True)
            st["exp_avg_sq_q"], st["exp_avg_sq_absmax"] = self._requant(st["exp_avg_sq_q"], st["exp_avg_sq_absmax"],
                                                                        v, False)

    @staticmethod
    def _requant(q_old, absmax_old, x, signed):
        q, absmax = quantize_blockwise_8bit(x.reshape(-1), get_dynamic_map(signed, x.device), BLOCK)
        q_old.copy_(q)  # in place: paged buffers stay where they are
        absmax_old.copy_(absmax)
        return q_old, absmax_old

    # -- (de)serialization ----------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["fourbit_optimizer"] = type(self).__name__
        sd["state"] = {k: {n: (t.clone() if isinstance(t, torch.Tensor) and t.device.type == "cuda" and
                               self.paged else t) for n, t in v.items()} for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        kind = state_dict.get("fourbit_optimizer")
        if kind != type(self).__name__:
            raise ValueError(f"this state_dict was saved by {kind or 'another optimizer (not fourbit)'}, "
                             f"not {type(self).__name__}; load it into the same optimizer type")
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in state_dict["state"].items():
            idx = int(idx)
            if idx >= len(params):
                raise ValueError(f"state for parameter {idx}, but this optimizer has {len(params)} parameters")
            p, expect = params[idx], self._init_state(_local(params[idx]))
            for name, t in st.items():
                if name not in expect:
                    raise ValueError(f"state of parameter {idx} has {name!r}; expected {sorted(expect)}")
                if isinstance(t, torch.Tensor) and t.shape != expect[name].shape:
                    raise ValueError(f"state {name!r} of parameter {idx} has shape {list(t.shape)}, the parameter "
                                     f"of shape {list(p.shape)} needs {list(expect[name].shape)}")
        sd = {k: v for k, v in state_dict.items() if k != "fourbit_optimizer"}
        super().load_state_dict(sd)
        for p, st in self.state.items():  # move states into (paged) buffers of our own
            fresh = self._init_state(_local(p))
            for name, t in st.items():
                if isinstance(t, torch.Tensor) and name != "step":
                    fresh[name].copy_(t)
                    st[name] = fresh[name]
                elif name == "step":
                    st[name] = t.detach().float().cpu().reshape(())


class PagedAdamW(_AdamW):
    """AdamW, 32-bit states; paged in CUDA managed memory for large parameters (QLoRA's default)."""

    paged = True


class AdamW8bit(_AdamW):
    """AdamW with blockwise 8-bit states (~2 bytes/parameter)."""

    optim_bits = 8


class PagedAdamW8bit(_AdamW):
    """AdamW with blockwise 8-bit states, paged in CUDA managed memory."""

    optim_bits = 8
    paged = True


OPTIMIZERS = {"adamw": torch.optim.AdamW, "paged_adamw": PagedAdamW, "adamw8bit": AdamW8bit,
              "paged_adamw8bit": PagedAdamW8bit}


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> Optimizer:
    """The trainer's optimizers by name: adamw (torch), paged_adamw, adamw8bit, paged_adamw8bit."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    if name == "adamw":
        _check_hparams(lr, betas, eps, weight_decay)
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
