"""Measuring what a real training step adds to memory: the quantity `fourbit memory` predicts.

`measure_step` loads a model and `measure_training` runs real steps on it (loss as fourbit train
computes it, `grad_accum` backward passes, gradient clipping, optimizer step) and measures the
peak. tests/test_memory.py holds the prediction (fourbit.memory.plan) to it. Three counters:

- "cuda": torch.cuda.max_memory_allocated, plus the paged optimizer states (CUDA managed memory,
  outside torch's allocator; the paper counts them on the GPU, and so does the prediction).
- "allocator" (CPU): every allocation and free of torch's CPU allocator, recorded by the
  profiler (profile_memory=True) and summed in time order: exact bytes, as the CUDA counter is,
  including the scratch space inside ops that a dispatch-level trace cannot see. What the tests
  hold the simulation to.
- "rss" (CPU): peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) with
  glibc's heap caching turned off: what the operating system sees, allocator overheads included.

`python -m fourbit.memory PLAN_JSON [MODEL_DIR]` runs one measurement in a fresh process and
prints it as JSON.
"""

from __future__ import annotations

import gc
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


def allocator_peak(fn) -> tuple[int, int]:
    """(peak, end): the most bytes torch's CPU allocator held during fn() beyond what it held
    before, and what it still holds at the end, from the profiler's allocation records."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:  # frees of blocks allocated before fn() are negative: peak stays >= 0
        live += nbytes
        peak = max(peak, live)
    return peak, live


def measure_step(plan: Plan, model_path: str | None = None, steps: int = 2, seed: int = 0,
                 counter: str | None = None) -> dict:
    """Load the model 4-bit (`model_path` or plan.model), add LoRA and `measure_training`."""
    from fourbit.models import load_model
    from fourbit.nn import add_lora

    device = torch.device("cuda" if plan.device == "cuda" else "cpu")
    torch.manual_seed(seed)
    model, _ = load_model(model_path or plan.model, quant=plan.quant_type,
                          double_quant=plan.double_quant, compute_dtype=plan.compute_dtype, device=device,
                          blocksize=plan.blocksize, load_tokenizer=False)
    add_lora(model, r=plan.r, alpha=plan.alpha, dropout=plan.dropout, target=plan.targets,
             gradient_checkpointing=plan.checkpointing, verbose=False)
    return measure_training(model, plan, steps, seed, counter)


def measure_training(model, plan: Plan, steps: int = 2, seed: int = 0, counter: str | None = None) -> dict:
    """Run `steps` optimizer steps of `plan` (each of plan.grad_accum micro-batches of plan.batch x
    plan.seq random tokens) on `model` (with LoRA, on plan.device) and measure memory.

    {"growth_bytes": the last step's peak minus what was allocated before the first step (so it
    includes the optimizer states and the dequantization buffer the first step created; paged
    states are added, being outside the allocator); "first_step_growth_bytes"; "before_bytes";
    "peak_bytes": the last step's absolute peak, plus paged states, and "phases_bytes": the same for
    each phase of the step as fourbit.memory's trace splits it (cuda only); "counter"}. counter: "cuda" on a CUDA plan, else "rss"
    (default) or "allocator". The optimizer is built here and dropped at the end."""
    from fourbit.loss import causal_lm_loss
    from fourbit.memory.trace import synthetic_labels
    from fourbit.optim import build_optimizer

    cuda = plan.device == "cuda"
    counter = "cuda" if cuda else (counter or "rss")
    if counter not in ("cuda", "rss", "allocator") or (counter == "cuda") != cuda:
        raise ValueError(f"counter {counter!r} does not measure a {plan.device} plan")
    if counter == "rss":
        _fix_glibc_mmap_threshold()
        if not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("measuring a CPU step's peak RSS needs Linux (/proc/self/clear_refs)")
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(plan.optim, params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (plan.batch, plan.seq), device=device)
    labels = torch.where(synthetic_labels(plan.batch, plan.seq, plan.label_fraction).to(device) == -100, -100, ids)

    phases: dict[str, int] = {}  # CUDA: the allocator's peak in each phase of the step, as the trace splits it

    def mark(name: str) -> None:  # the allocator's bookkeeping is on the host: no sync needed
        if cuda:
            phases[name] = max(phases.get(name, 0), torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

    def at_decoder_output(module, args, out):
        mark("forward")
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        if hidden.requires_grad:
            hidden.register_hook(lambda g: mark("loss"))  # the loss's backward is done

    def step() -> None:
        for _ in range(plan.grad_accum):
            loss, _ = causal_lm_loss(model, ids, labels, chunk=plan.loss_chunk or None)
            loss.backward()
            del loss
            mark("backward")
        if plan.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        opt.step()
        mark("optimizer step")
        opt.zero_grad(set_to_none=True)

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if cuda else _rss("VmRSS")
    growth, peaks, kept = [], [], 0  # kept: what earlier steps left allocated (allocator counter)
    hook = model.get_decoder().register_forward_hook(at_decoder_output) if cuda else None
    try:
        for _ in range(steps):
            if counter == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                phases.clear()
                step()
                torch.cuda.synchronize(device)
                paged = opt.state_bytes() if getattr(opt, "paged", False) else 0
                phases.update({k: v + paged for k, v in phases.items()})
                peaks.append(max(phases.values()))
                growth.append(peaks[-1] - before)
            elif counter == "allocator":  # relative to the start of this step: add what earlier steps kept
                peak, end = allocator_peak(step)
                growth.append(kept + peak)
                kept += end
            else:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                step()
                growth.append(_rss("VmHWM") - before)
            gc.collect()
    finally:
        if hook is not None:
            hook.remove()
        opt.zero_grad(set_to_none=True)
        del opt
    out = {"growth_bytes": growth[-1], "first_step_growth_bytes": growth[0], "before_bytes": before,
           "device": str(device), "counter": counter}
    if cuda:
        out.update(peak_bytes=peaks[-1], phases_bytes=dict(phases),
                   max_reserved_bytes=torch.cuda.max_memory_reserved(device))
    return out
