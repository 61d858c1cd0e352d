"""Issue 17 on one GPU in one call: the QLoRA paper's headline measured (LLaMA-65B and -33B shapes
trained in 48 GB, beside `fourbit memory`'s prediction), then the 7B bars against PEFT +
bitsandbytes: training speed and memory, batch-1 decoding, the 1-token gemv, paged AdamW.

    PYTHONUNBUFFERED=1 python bench/gpu_headline.py     # H100/H200: ~5 min; raw output to bench/gpu_headline_*.txt/.json
    python bench/gpu_headline.py --dry-run              # CPU, TRITON_INTERPRET=1, tiny shapes: checks the script

Sections, in this order (--sections picks some); each runs under its own time limit (a section
that overruns is stopped and the run goes on) and prints its rows as it goes, so a killed run
still leaves its numbers in the .txt:

  65b        LLaMA-65B shape (src/fourbit/configs/llama-65b.json), random weights quantized NF4 +
             double quant one weight at a time on the GPU (never a 16-bit copy of the model; the
             embeddings, norms and lm_head in bf16), LoRA r=64 alpha 16 dropout 0.05 on every
             linear layer, gradient checkpointing, paged AdamW, bf16, seq 512 x batch 1, two
             micro-batches per step (so the LoRA gradients are held across micro-batches, as in the
             paper's 1 x 16); two real steps. Measured: torch's allocator peak + the paged optimizer
             states, phase by phase, against `fourbit memory`'s prediction for the same run (the
             CUDA context, outside the allocator, left out of both); and what the card holds
             (allocator reserve + CUDA context + paged states) against 48 GiB.
  65b-seq    the longest sequence that trains in 48 GiB at 65B: the allocator capped with
             torch.cuda.set_per_process_memory_fraction at 48 GiB minus the measured CUDA context
             and the paged states (what a 48 GB card leaves it), one real step per trial starting
             at the planner's figure (<= 7 trials), against that figure.
  33b        as 65b, for the LLaMA-33B shape.
  7b-memory  the 7B shape at seq 2048 x batch 1, r=64, checkpointing, 75% of tokens labelled: one
             micro-batch without clipping (the speed run's step) and two with clipping (fourbit
             train's), measured vs predicted, phase by phase.
  train      bench/gpu.py's train section: tokens/s and peak memory vs PEFT + bitsandbytes.
  paged      bench/gpu.py's paged section, then the 32-bit paged AdamW with nothing evicted:
             prefetch after pressure only (the default) / before every step / unpaged states /
             torch.optim.AdamW.
  decode     bench/gpu.py's decode section (transformers generate, fourbit vs bitsandbytes), the
             same with the split-K gemv, and fourbit's Engine (static KV cache) at batch 1.
  gemv       bench/gpu.py's gemv section (tiled kernel vs bitsandbytes), then the split-K kernel:
             error against float64, GPU time against the tiled kernel and bitsandbytes, and a sweep
             of its tile sizes.

Rows: | section | measurement | fourbit | reference | ratio | unit | note |, the reference being
the prediction (memory rows, ratio = measured / predicted) or bitsandbytes/PEFT/torch (speed rows).
bench/GPU_RUNBOOK.md says what each row means, the targets, and where the numbers go.
"""

import os
import sys

DRY = "--dry-run" in sys.argv
if DRY:  # before triton is imported (by fourbit, torch or bench/gpu.py)
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import gpu as G  # noqa: E402  (bench/gpu.py: the table, timing and the 7B sections)

NAN = float("nan")
GIB = 2**30
CARD = 48 * GIB  # the paper's card: one 48 GB GPU (fourbit memory --gpu 48GB)
LIMITS = {"65b": 150, "65b-seq": 120, "33b": 90, "7b-memory": 75, "train": 100, "paged": 60, "decode": 120,
          "gemv": 90}  # seconds per section; the run as a whole stops at --budget
SECTIONS = list(LIMITS)


# -- output: every line to the terminal and to the raw file, the rows also to JSON -----------------
class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def _write_json(path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(meta, rows=G.ROWS), indent=1, default=str))
    tmp.replace(path)  # atomic: a killed run leaves the last complete file


# -- time limits ----------------------------------------------------------------------------------
class SectionTimeout(BaseException):  # not an Exception: the sections' own `except Exception` must not catch it
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in this (main) thread after `seconds` (checked between Python
    bytecodes, so a long CUDA call finishes first)."""
    def stop(signum, frame):
        raise SectionTimeout(f"stopped after its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_all(ctx) -> None:
    """Drop what a section left (models, the shared dequantization buffer, the allocator cap)."""
    from fourbit.nn import linear4bit

    ctx.keep.clear()
    linear4bit._SCRATCH.clear()  # a bigger model's buffer would otherwise count in the next model's peak
    gc.collect()
    if not DRY:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- models ---------------------------------------------------------------------------------------
def shape_config(name: str):
    """A shipped config (llama-7b/-33b/-65b); on a dry run, the same architecture at toy sizes."""
    from fourbit.memory import load_architecture

    cfg = load_architecture(name)
    if DRY:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "hidden_size": 64, "intermediate_size": 160,
                                   "num_hidden_layers": 2 if name != "llama-33b" else 3, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "vocab_size": 512})
    return cfg


def random_4bit_model(cfg, device, dtype, seed: int = 0):
    """`cfg`'s model with random weights, every linear layer but lm_head NF4 + double quant: built
    on the meta device, then one weight at a time drawn on `device`, quantized (fourbit's
    Linear4bit.from_linear) and dropped, so at most one 16-bit weight exists at a time (360 MB at
    65B); the rest (embeddings, norms, lm_head, RoPE tables) materialized in `dtype` and
    initialized by transformers."""
    from torch import nn

    from fourbit.models import meta_model
    from fourbit.nn import Linear4bit, find_linear_names, set_module

    torch.manual_seed(seed)
    model = meta_model(cfg, dtype)
    gen = torch.Generator(device).manual_seed(seed)
    std = getattr(cfg, "initializer_range", 0.02)
    for name in find_linear_names(model):
        lin = model.get_submodule(name)
        w = torch.empty(lin.out_features, lin.in_features, device=device, dtype=dtype).normal_(0, std, generator=gen)
        set_module(model, name, Linear4bit.from_linear(lin, "nf4", 64, True, dtype, weight=w))
        del w
    for mod in model.modules():
        meta = [k for k, t in list(mod._parameters.items()) + list(mod._buffers.items()) if t is not None and t.is_meta]
        if not meta:
            continue
        for k in meta:
            if k in mod._parameters:
                mod._parameters[k] = nn.Parameter(torch.empty_like(mod._parameters[k], device=device),
                                                  requires_grad=False)
            else:
                mod._buffers[k] = torch.empty_like(mod._buffers[k], device=device)
        model._init_weights(mod)
    return model.eval()


def cuda_context_bytes() -> int:
    """What the CUDA context, cuBLAS and loaded kernels take outside torch's allocator, now: the
    device's used memory minus the allocator's reserve (fourbit memory assumes 512 MiB)."""
    if DRY:
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


# -- the headline: a big shape trained for real, against the prediction ---------------------------
def headline_plan(name: str, **kw):
    from fourbit.memory import Plan

    base = dict(model=name, seq=512, batch=1, r=64, alpha=16, dropout=0.05, checkpointing=True, optim="paged_adamw",
                grad_accum=2, gpu="48GB")
    if DRY:
        base.update(device="cpu", dtype="fp32", seq=96, r=8)
    return Plan(**{**base, **kw})


def predicted(plan, cfg) -> dict:
    from fourbit.memory import predict

    t = time.perf_counter()
    res = predict(plan, config=cfg)
    print(f"  prediction for {plan.model} seq {plan.seq}: {time.perf_counter() - t:.0f} s of CPU", flush=True)
    return res


def measure_against_prediction(ctx, sec: str, model, plan, pred: dict, steps: int = 2) -> dict:
    """Real steps of `plan` on `model`; rows: the peak and each phase, measured vs predicted."""
    from fourbit.memory import LOADED_PARTS, CUDA_RUNTIME, predicted_allocated, predicted_step_growth
    from fourbit.memory.measure import measure_training

    t = time.perf_counter()
    m = measure_training(model, plan, steps=steps, counter=None if ctx.dev == "cuda" else "allocator")
    dt = (time.perf_counter() - t) / steps
    loaded = sum(v for k, v in pred["parts"].items() if k in LOADED_PARTS and k != CUDA_RUNTIME)
    what = f"seq {plan.seq} x batch {plan.batch} x {plan.grad_accum} micro-batches"
    G.row(sec, f"step growth over the loaded model ({what}; measured vs predicted)", m["growth_bytes"] / GIB,
          predicted_step_growth(pred) / GIB, "GiB", "target: ratio 0.9-1.1")
    if ctx.dev == "cuda":
        G.row(sec, "loaded model: 4-bit weights + bf16 rest + LoRA (allocated vs predicted)", m["before_bytes"] / GIB,
              loaded / GIB, "GiB")
        G.row(sec, "peak: torch allocator + paged states (measured vs predicted)", m["peak_bytes"] / GIB,
              predicted_allocated(pred) / GIB, "GiB", f"target: ratio 0.9-1.1; predicted peak in {pred['peak_phase']}")
        for phase, got in m["phases_bytes"].items():
            want = pred["phases"][phase] - pred["parts"].get(CUDA_RUNTIME, 0)
            G.row(sec, f"  phase {phase}: allocator + paged (measured vs predicted)", got / GIB, want / GIB, "GiB")
        held = m["max_reserved_bytes"] + cuda_context_bytes() + (m["peak_bytes"] - max(m["phases_bytes"].values())
                                                                  if False else _paged_bytes(pred, plan))
        G.row(sec, "what the card holds: allocator reserve + CUDA context + paged states", held / GIB, CARD / GIB,
              "GiB", "target: ratio <= 1 (fits one 48 GB card)")
    G.row(sec, "seconds per optimizer step", NAN if DRY else dt, unit="s", note=what)
    print(f"  {sec} measured: " + json.dumps({k: (round(v / GIB, 3) if isinstance(v, int) else v)
                                               for k, v in m.items() if k != "phases_bytes"}), flush=True)
    print(f"  {sec} predicted parts (GiB): " + json.dumps({k: round(v / GIB, 3) for k, v in pred["parts"].items()}),
          flush=True)
    return m


def _paged_bytes(pred: dict, plan) -> int:
    from fourbit.memory import OPTIMIZER_STATES

    return pred["parts"].get(OPTIMIZER_STATES, 0) if plan.optim.startswith("paged") else 0


def train_shape(ctx, sec: str, name: str) -> None:
    from fourbit.memory import predicted_allocated
    from fourbit.nn import add_lora

    cfg = shape_config(name)
    plan = headline_plan(name)
    pred = predicted(plan, cfg)
    G.row(sec, f"{name} prediction: total with CUDA context / allocator + paged part", pred["total_bytes"] / GIB,
          predicted_allocated(pred) / GIB, "GiB", f"fits 48 GiB: {pred['fits']}; longest seq: {pred['max_seq_at_batch']}")
    t = time.perf_counter()
    model = random_4bit_model(cfg, ctx.dev, ctx.dtype)
    G.sync()
    build = time.perf_counter() - t
    add_lora(model, r=plan.r, alpha=plan.alpha, dropout=plan.dropout, target=plan.targets,
             gradient_checkpointing=plan.checkpointing, verbose=False)
    G.row(sec, f"{name}: built layer by layer, random NF4+DQ weights", NAN if DRY else build, unit="s",
          note=f"{sum(1 for m in model.modules() if type(m).__name__ == 'Linear4bit')} 4-bit layers")
    measure_against_prediction(ctx, sec, model, plan, pred)
    ctx.keep[name] = (model, cfg, plan, pred)


def sec_65b(ctx):
    train_shape(ctx, "65b", "llama-65b")


def sec_33b(ctx):
    ctx.keep.pop("llama-65b", None)
    free_all(ctx)
    train_shape(ctx, "33b", "llama-33b")


def longest_fitting(fits, guess: int, trials: int = 7, resolution: int = 16, multiple: int = 8):
    """(largest length that fit, smallest that did not or None, [(length, fit)]): starts at the
    planner's guess, steps out by 5%, 10%, 20%, ... until it brackets, then bisects."""
    lo, hi, tried, step = 0, None, [], 0.05
    seq = guess
    for _ in range(trials):
        ok = fits(seq)
        tried.append((seq, ok))
        print(f"  seq {seq}: {'fits' if ok else 'out of memory'}", flush=True)
        if ok:
            lo = max(lo, seq)
        else:
            hi = seq if hi is None else min(hi, seq)
        if lo and hi is not None and hi - lo <= resolution:
            break
        if hi is None:
            seq = int(seq * (1 + step))
        elif not lo:
            seq = max(multiple, int(seq * (1 - step)))
        else:
            seq = (lo + hi) // 2
        step *= 2
        seq = max(multiple, seq // multiple * multiple)
        if any(s == seq for s, _ in tried):
            break
    return lo, hi, tried


def sec_65b_seq(ctx):
    from fourbit.memory import predicted_step_growth
    from fourbit.memory.measure import measure_training

    if "llama-65b" not in ctx.keep:
        train_shape(ctx, "65b-seq", "llama-65b")
    model, cfg, plan, pred = ctx.keep["llama-65b"]
    guess = pred["max_seq_at_batch"]
    if ctx.dev == "cuda":
        context = cuda_context_bytes()
        cap = CARD - context - _paged_bytes(pred, plan)
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
        note = f"allocator capped at {cap / GIB:.2f} GiB = 48 - {context / GIB:.2f} context - paged states"
    else:  # dry run: a budget of step growth, as predicted at 1.5x the plan's length; the planner's figure is that length
        guess = int(plan.seq * 1.5)
        budget = predicted_step_growth(predicted(dataclasses.replace(plan, seq=guess, gpu=None), cfg))
        note = f"dry run: budget = predicted step growth at seq {guess}"

    def fits(seq: int) -> bool:
        p = dataclasses.replace(plan, seq=seq)
        try:
            m = measure_training(model, p, steps=1, counter=None if ctx.dev == "cuda" else "allocator")
            return ctx.dev == "cuda" or m["growth_bytes"] <= budget
        except torch.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            if ctx.dev == "cuda":
                torch.cuda.empty_cache()

    try:
        lo, hi, tried = longest_fitting(fits, guess)
    finally:
        if ctx.dev == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    G.row("65b-seq", "longest sequence at batch 1 in 48 GiB (measured vs planner)", float(lo), float(guess), "tokens",
          f"first failing length: {hi}; tried {tried}; {note}")
    ctx.keep.pop("llama-65b", None)


def sec_7b_memory(ctx):
    from fourbit.nn import add_lora

    free_all(ctx)
    cfg = shape_config("llama-7b")
    model = random_4bit_model(cfg, ctx.dev, ctx.dtype)
    add_lora(model, r=64 if not DRY else 8, alpha=16, dropout=0.0, gradient_checkpointing=True, verbose=False)
    seq = 2048 if not DRY else 96
    for accum, clip in ((1, 0.0), (2, 0.3)):
        plan = headline_plan("llama-7b", seq=seq, r=64 if not DRY else 8, dropout=0.0, grad_accum=accum,
                             max_grad_norm=clip, label_fraction=0.75, gpu=None)
        pred = predicted(plan, cfg)
        measure_against_prediction(ctx, "7b-memory", model, plan, pred)


# -- the 7B sections of bench/gpu.py, with the split-K gemv and the prefetch policy beside them ------
@contextlib.contextmanager
def using_gemv(fn):
    """Linear4bit and the Engine look the gemv up on the kernel module at call time: swap it."""
    from fourbit.quant.kernels import triton_4bit as T

    orig = T.gemv_4bit
    T.gemv_4bit = fn
    try:
        yield
    finally:
        T.gemv_4bit = orig


def split_gemv(**kw):
    from fourbit.quant.kernels import triton_4bit as T

    return functools.partial(T.gemv_4bit_split, **kw)


def sec_train(ctx):
    free_all(ctx)
    G.sec_train(ctx)


def sec_paged(ctx):
    free_all(ctx)
    G.sec_paged(ctx)
    if DRY:
        return G.row("paged", "prefetch after pressure / every step / unpaged / torch", NAN,
                     note="dry run: needs CUDA managed memory")
    from fourbit.optim import PagedAdamW

    free, _ = torch.cuda.mem_get_info()
    n_params = int(min(free * 0.15, 8 * GIB) / 4 / 3)
    chunk = 2**26
    kinds = {"paged, prefetch after pressure": lambda ps: PagedAdamW(ps, lr=1e-3),
             "paged, prefetch every step": lambda ps: PagedAdamW(ps, lr=1e-3, prefetch="always"),
             "fourbit AdamW, states not paged": lambda ps: PagedAdamW(ps, lr=1e-3, page_threshold=1 << 62),
             "torch.optim.AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}
    res = {}
    for name, make in kinds.items():
        free_all(ctx)
        params = [torch.nn.Parameter(torch.zeros(chunk, device="cuda")) for _ in range(max(1, n_params // chunk))]
        opt = make(params)
        for p in params:
            p.grad = torch.ones_like(p)
        res[name] = G._event_time(opt.step, reps=5)
        del params, opt
    torch_t = res.pop("torch.optim.AdamW")
    for name, t in res.items():
        G.row("paged", f"AdamW step, {2 * n_params * 4 / GIB:.1f} GiB of states, nothing evicted: {name}", t * 1e3,
              torch_t * 1e3, "ms", "vs torch.optim.AdamW; target <= 1.1x for the default (prefetch after pressure)")


def sec_decode(ctx):
    free_all(ctx)
    G.sec_decode(ctx)
    free_all(ctx)
    from fourbit.engine import Engine

    cfg = G.llama7b_config(ctx, ctx.layers)
    tokens = 4 if DRY else ctx.decode_tokens
    model = G.random_model(ctx, cfg)
    from fourbit.models import quantize_model

    quantize_model(model, "nf4", True, ctx.dtype)
    ids = torch.randint(3, cfg.vocab_size, (1, 16), device=ctx.dev).tolist()[0]
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    out = {}
    engine = Engine(model, None, max_batch=1, max_seq_len=len(ids) + tokens + 1)
    for label, gemv in (("tiled gemv", None), ("split-K gemv", split_gemv())):
        with using_gemv(gemv) if gemv else contextlib.nullcontext(), torch.no_grad():
            for what, run in (("transformers generate", lambda: model.generate(torch.tensor([ids], device=ctx.dev), **kw)),
                              ("Engine", lambda: engine.generate([ids], max_new_tokens=tokens,
                                                                 stop_token_ids=[]))):
                if what == "transformers generate" and gemv is None:
                    continue  # bench/gpu.py's decode section measured it just now
                run()  # warm-up as long as the timed run (every Triton specialization compiled)
                G.sync()
                t = time.perf_counter()
                run()
                G.sync()
                out[(label, what)] = NAN if DRY else tokens / (time.perf_counter() - t)
                G.row("decode", f"batch-1 greedy tokens/s, {what}, {label}", out[(label, what)], unit="tokens/s",
                      note="compare with the bitsandbytes row above; target >= 1.5x")
    del engine, model


def sec_gemv(ctx):
    free_all(ctx)
    G.sec_gemv(ctx)
    from fourbit.quant import quantize_4bit
    from fourbit.quant.blockwise import _dequant4_reference, dequantize_absmax
    from fourbit.quant.kernels import triton_4bit as T

    b = G.bnb()
    sweep = [(4, 8, 4, 4), (8, 8, 1, 4), (8, 16, 1, 4), (4, 16, 2, 4), (2, 8, 8, 4), (4, 8, 8, 4), (8, 8, 4, 8),
             (2, 16, 4, 2), (1, 16, 8, 2), (4, 4, 16, 4), (16, 8, 2, 8), (8, 4, 8, 4)]  # block_n, groups, split_k, warps
    if DRY:
        sweep = sweep[:3]
    for shape in ctx.gemv_shapes:
        tag = f"{shape[0]}x{shape[1]}"
        n = shape[0] * shape[1]
        w = (torch.randn(shape, device=ctx.dev) * 0.02).to(torch.bfloat16)
        q, s = quantize_4bit(w)
        x = torch.randn(1, shape[1], device=ctx.dev).to(torch.bfloat16)
        w64 = _dequant4_reference(q, dequantize_absmax(s), s.code, n, 64, torch.float64).view(shape)
        ref = x.double() @ w64.t()
        y = T.gemv_4bit_split(x, q, s)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        same = torch.equal(y, T.gemv_4bit_split(x, q, s))
        G.row("gemv", f"{tag} split-K: normwise error vs float64 (tolerance 4e-3) / same bits twice", err,
              note=f"same bits on a second call: {same}")
        wbytes = n // 2 + s.absmax.numel()
        sets = [(q.clone(), torch.randn_like(x)) for _ in range(G.n_sets(wbytes))]
        tiled = G.gpu_time([lambda qq=qq, xx=xx: T.gemv_4bit(xx, qq, s) for qq, xx in sets])
        best = (NAN, None)
        for bn, g, sk, nw in sweep:
            try:
                t = G.gpu_time([lambda qq=qq, xx=xx: T.gemv_4bit_split(xx, qq, s, bn, g, sk, nw) for qq, xx in sets])
            except Exception as e:  # noqa: BLE001  (a tile that does not compile: skip it)
                print(f"  gemv split {tag} {bn}/{g}/{sk}/{nw}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            if best[1] is None or t < best[0]:
                best = (t, (bn, g, sk, nw))
        other = "n/a"
        if b:
            import bitsandbytes as bb
            import bitsandbytes.functional as F

            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            bsets = [(qb.clone(), xx) for _, xx in sets]
            other = G.gpu_time([lambda qq=qq, xx=xx: bb.matmul_4bit(xx, qq.t(), quant_state=sb)
                                for qq, xx in bsets]) * 1e6
        G.row("gemv", f"{tag} 1 token, GPU time: split-K (best tile) vs bitsandbytes", best[0] * 1e6, other, "us",
              f"tile block_n/groups/split_k/warps {best[1]}; tiled kernel {tiled * 1e6:.1f} us; target <= 1.0x")
        del w, q, sets, w64
        G.free_memory()


RUN = {"65b": sec_65b, "65b-seq": sec_65b_seq, "33b": sec_33b, "7b-memory": sec_7b_memory, "train": sec_train,
       "paged": sec_paged, "decode": sec_decode, "gemv": sec_gemv}


# -- main -----------------------------------------------------------------------------------------
def make_ctx(args):
    ctx = argparse.Namespace(**vars(args))
    ctx.profile = []
    ctx.dev = "cpu" if DRY else "cuda"
    ctx.dtype = torch.float32 if DRY else torch.bfloat16
    ctx.layers, ctx.seq, ctx.steps, ctx.decode_tokens = 32, 2048, 3, 64
    ctx.dequant_shapes = [(64, 96), (33, 65)] if DRY else [(4096, 4096), (11008, 4096)]
    ctx.gemv_shapes = [(48, 128), (40, 192)] if DRY else [(4096, 4096), (11008, 4096), (4096, 11008)]
    ctx.keep = {}
    return ctx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, no timing")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole run (sections past it are skipped)")
    ap.add_argument("--out", default=None, help="file prefix for the raw .txt and .json (default on a GPU: "
                                                "bench/gpu_headline_<gpu>_<date>; none on a dry run)")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in RUN]
    if unknown:
        ap.error(f"unknown sections {unknown}; expected some of {', '.join(SECTIONS)}")
    if not DRY and not torch.cuda.is_available():
        print("bench/gpu_headline.py needs a CUDA device (or --dry-run to check the script on CPU).")
        return 1
    ctx = make_ctx(args)
    device = "CPU dry run (TRITON_INTERPRET=1, not timed)" if DRY else torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out
    if out is None and not DRY:
        out = str(Path(__file__).parent / f"gpu_headline_{device.split()[1] if ' ' in device else 'gpu'}_{now:%Y%m%d_%H%M}")
    meta = dict(device=device, date=f"{now:%Y-%m-%d %H:%M} UTC", versions=G.versions(), argv=sys.argv[1:])
    raw = open(out + ".txt", "w") if out else None  # noqa: SIM115  (closed at the end; flushed every line)
    if raw:
        sys.stdout = _Tee(sys.__stdout__, raw)
        sys.stderr = _Tee(sys.__stderr__, raw)
    if not DRY:
        torch.ones(256, 256, device="cuda") @ torch.ones(256, 256, device="cuda")  # context + cuBLAS, to measure them
        meta["cuda_context_bytes_at_start"] = cuda_context_bytes()
    print(f"# {device} | {meta['date']} | {meta['versions']} | CUDA context + cuBLAS "
          f"{meta.get('cuda_context_bytes_at_start', 0) / GIB:.2f} GiB", flush=True)
    print(G.HEADER, flush=True)
    t0 = time.time()
    for name in args.sections.split(","):
        left = args.budget - (time.time() - t0)
        if left < 15:
            G.row(name, "SECTION SKIPPED", f"the run's {args.budget:.0f} s budget is spent")
            continue
        t1 = time.time()
        try:
            with time_limit(min(LIMITS[name], left)):
                RUN[name](ctx)
        except SectionTimeout as e:
            G.row(name, "SECTION STOPPED", str(e))
        except Exception as e:  # noqa: BLE001  (one failing section must not lose the others' numbers)
            traceback.print_exc()
            G.row(name, "SECTION FAILED", f"{type(e).__name__}: {str(e)[:160]}")
        finally:
            if name != "65b" or "65b-seq" not in args.sections.split(","):
                free_all(ctx)
        print(f"# {name}: {time.time() - t1:.0f} s", flush=True)
        if out:
            _write_json(Path(out + ".json"), meta)
    print(f"\n# summary ({time.time() - t0:.0f} s)\n{G.HEADER}")
    for r in G.ROWS:
        print(f"| {r['section']} | {r['name']} | {G._fmt(r['fourbit'])} | {G._fmt(r['other'])} | {r['ratio']} | "
              f"{r['unit']} | {r['note']} |")
    if raw:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        raw.close()
        print(f"raw output: {out}.txt, rows: {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
