"""Measuring what a real training step adds to memory: the quantity `fourbit memory` predicts.

`measure_step` runs real steps and measures peak RSS growth on CPU (glibc's heap caching turned
off) or torch.cuda.max_memory_allocated + paged states on CUDA; tests/test_memory.py holds the
prediction (fourbit.memory.plan) to it. `python -m fourbit.memory PLAN_JSON [MODEL_DIR]` runs one
measurement in a fresh process and prints it as JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fourbit.memory.plan import Plan


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _fix_glibc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc return freed large blocks to the OS at once (as torch's CUDA allocator accounting
    sees them), instead of raising its mmap threshold and keeping them in the heap. True if set."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD; setting it disables the dynamic one
    except (OSError, AttributeError):
        return False


def measure_step(plan: Plan, model_path: str | None = None, steps: int = 2, seed: int = 0) -> dict:
    """Load the model 4-bit, add LoRA, run `steps` training steps (loss as fourbit train computes it,
    backward, gradient clipping, optimizer step) and measure how much memory the steps add.

    CPU: peak RSS during the last step (Linux: VmHWM, reset through /proc/self/clear_refs) minus the
    RSS before the first step, with glibc's mmap threshold fixed (see _fix_glibc_mmap_threshold).
    CUDA: torch.cuda.max_memory_allocated during the last step minus memory_allocated before the
    first, plus paged optimizer states (managed memory, outside torch's allocator).
    The first step's growth is reported too (it has no optimizer states yet)."""
    import gc

    from fourbit.loss import causal_lm_loss
    from fourbit.memory.trace import synthetic_labels
    from fourbit.models import load_model
    from fourbit.nn import add_lora
    from fourbit.optim import build_optimizer

    cuda = plan.device == "cuda"
    if not cuda:
        _fix_glibc_mmap_threshold()
        if not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("measuring a CPU step's peak needs Linux (/proc/self/clear_refs)")
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(seed)
    model, _ = load_model(model_path or plan.model, quant=plan.quant_type,
                          double_quant=plan.double_quant, compute_dtype=plan.compute_dtype, device=device,
                          blocksize=plan.blocksize,
                          load_tokenizer=False)
    add_lora(model, r=plan.r, alpha=plan.alpha, dropout=plan.dropout, target=plan.targets,
             gradient_checkpointing=plan.checkpointing, verbose=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(plan.optim, params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (plan.batch, plan.seq), device=device)
    labels = torch.where(synthetic_labels(plan.batch, plan.seq, plan.label_fraction).to(device) == -100, -100, ids)

    def now() -> int:
        return torch.cuda.memory_allocated(device) if cuda else _rss("VmRSS")

    def reset_peak() -> None:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak() -> int:
        if cuda:
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        return _rss("VmHWM")

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = now()
    growth = []
    for _ in range(steps):
        reset_peak()
        loss, _ = causal_lm_loss(model, ids, labels, chunk=plan.loss_chunk or None)
        loss.backward()
        del loss
        if plan.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        managed = opt.state_bytes() if cuda and getattr(opt, "paged", False) else 0
        growth.append(peak() - before + managed)
        gc.collect()
    out = {"growth_bytes": growth[-1], "first_step_growth_bytes": growth[0], "before_bytes": before,
           "device": str(device)}
    if cuda:
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out
