"""fourbit on a GPU in one run and one table: kernels, decoding, a QLoRA training step, paged optimizers.

    PYTHONUNBUFFERED=1 python bench/gpu.py [--json out.json] [--sections copy,dequant,...] [--layers 32]
    python bench/gpu.py --dry-run      # CPU, TRITON_INTERPRET=1, tiny sizes, no timing: checks the script

Compared in the same run with bitsandbytes (+ PEFT) when importable (else "n/a"):
  copy     device-to-device copy bandwidth, bytes read + written (the roofline for dequantization)
  dequant  NF4 + double-quant -> bf16 GB/s (4096x4096, 11008x4096) as GPU time (CUDA-graph replays over
           buffers larger than L2) and as an eager call; bit-exactness vs the torch reference and the
           CPU kernel for bf16/fp16/fp32 out; our dequantization of bitsandbytes' bytes
  quant    Triton quantizer == torch reference == CPU kernel (bytes, absmax); packed codes differing
           from bitsandbytes' CUDA quantizer (fp32 and bf16 weights); time of a full NF4+DQ quantize
  gemv     batch-1 x @ W^T from packed weights: normwise error vs float64 (and that of bf16
           dequantize + matmul), GPU time vs bitsandbytes; eager cost of one 1-token Linear4bit call
           next to a bare Triton launch and a torch op (what generation pays per layer on this host)
  decode   batch-1 greedy tokens/s of a Llama-2-7B-shaped model with random weights (transformers
           generate), fourbit vs bitsandbytes Linear4bit; how many fused gemv calls one token makes
  train    one QLoRA step: seq 2048, batch 1, r=64 alpha=16 dropout 0 on all linear layers, gradient
           checkpointing, bf16, paged AdamW: tokens/s, peak torch-allocator memory and first-step loss
           for fourbit, PEFT + bitsandbytes, and fourbit with the optimizer stepped inside backward
           (a prototype: gradients freed as soon as they are used; no global-norm clipping possible)
  paged    paged AdamW through a memory spike that makes torch's AdamW run out of memory
  sweep    (not in the default list) tile sizes of the dequantization and gemv kernels
Nothing is downloaded: models are built from a config with random weights. Each section is
guarded: one failure prints its traceback and the table goes on.
"""

import os
import sys

DRY = "--dry-run" in sys.argv
if DRY:  # must be set before triton is imported (by fourbit or torch)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

ROWS = []
NAN = float("nan")


# -- table ----------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3g}"
    return str(v)


def row(section, name, fourbit, other="n/a", unit="", note=""):
    """One table line, printed at once (a later failure must not lose it)."""
    ok = isinstance(fourbit, float) and isinstance(other, float) and other and not math.isnan(fourbit + other)
    ratio = f"{fourbit / other:.2f}x" if ok else ""
    ROWS.append(dict(section=section, name=name, fourbit=fourbit, other=other, ratio=ratio, unit=unit, note=note))
    print(f"| {section} | {name} | {_fmt(fourbit)} | {_fmt(other)} | {ratio} | {unit} | {note} |", flush=True)


HEADER = "| section | measurement | fourbit | bitsandbytes/PEFT | ratio | unit | note |\n|---|---|---:|---:|---:|---|---|"


# -- timing ---------------------------------------------------------------------------------------
def sync():
    if torch.cuda.is_available() and not DRY:
        torch.cuda.synchronize()


def gpu_time(fns, calls: int = 0) -> float:
    """Median GPU seconds per call: `calls` calls cycling through `fns` (one per buffer set, so
    that the working set exceeds L2) captured in a CUDA graph and replayed 5 times (no launch
    gaps). Dry run: each fn runs once, NaN."""
    for f in fns:
        f()
    if DRY:
        return NAN
    sync()
    calls = calls or max(len(fns), 20)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fns[i % len(fns)]()
        run = g.replay
    except Exception as e:  # noqa: BLE001  (something in fns cannot be captured: time it eagerly)
        print(f"  (CUDA graph capture failed, {type(e).__name__}: {str(e)[:100]}; eager loop timed instead)")
        torch.cuda.synchronize()

        def run():
            for i in range(calls):
                fns[i % len(fns)]()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls / 1e3)
    return statistics.median(times)


def eager_time(fn, reps: int = 200) -> float:
    """Wall-clock seconds per call of a plain Python loop (host overhead included). Dry run: NaN."""
    fn()
    if DRY:
        return NAN
    for _ in range(10):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def free_memory():
    gc.collect()
    if torch.cuda.is_available() and not DRY:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bnb():
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception:  # noqa: BLE001  (absent, or present without a usable backend)
        return None


def n_sets(bytes_per_set: int) -> int:
    """Buffer sets to cycle through so that the working set is >= 4x an H100's 50 MB L2."""
    if DRY:
        return 1
    return max(2, min(16, math.ceil(200e6 / bytes_per_set)))


# -- sections -------------------------------------------------------------------------------------
def sec_copy(ctx):
    if DRY:
        return row("copy", "device-to-device copy", NAN, unit="GB/s (read+write)", note="dry run: not timed")
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()  # 1 GiB
    y = torch.empty_like(x)
    t = gpu_time([lambda: y.copy_(x)], calls=10)
    ctx.copy_gbs = 2 * x.numel() * 4 / t / 1e9
    row("copy", "device-to-device copy (1 GiB fp32)", ctx.copy_gbs, unit="GB/s (read+write)")


def _pct_copy(ctx, gbs):
    return f"{100 * gbs / ctx.copy_gbs:.0f}% of copy bandwidth" if getattr(ctx, "copy_gbs", None) and gbs == gbs else ""


def sec_dequant(ctx):
    from fourbit.quant import QuantState, dequantize_4bit, quantize_4bit
    from fourbit.quant.blockwise import _dequant4_reference, dequantize_absmax
    from fourbit.quant.kernels import triton_4bit as T

    b = bnb()
    for shape in ctx.dequant_shapes:
        tag = f"{shape[0]}x{shape[1]}"
        n = shape[0] * shape[1]
        w = (torch.randn(shape, device=ctx.dev) * 0.02).to(torch.bfloat16)
        q, s = quantize_4bit(w)
        # bit-exactness, every output dtype, against the torch reference on this device and the CPU kernel
        exact_ref, exact_cpu = [], []
        for odt in (torch.bfloat16, torch.float16, torch.float32):
            got = T.dequantize_4bit(q.view(-1), s, odt)
            ref = _dequant4_reference(q, dequantize_absmax(s), s.code, n, s.blocksize, odt).view(shape)
            exact_ref.append(torch.equal(got, ref))
            exact_cpu.append(torch.equal(got.cpu(), dequantize_4bit(q.cpu(), s.to("cpu"), odt)))
        row("dequant", f"bit-exact {tag}: bf16/fp16/fp32 out vs torch reference", "/".join(map(str, exact_ref)))
        row("dequant", f"bit-exact {tag}: bf16/fp16/fp32 out vs CPU kernel", "/".join(map(str, exact_cpu)))
        # bandwidth: packed + uint8 block constants read, bf16 written
        nbytes = n // 2 + s.absmax.numel() + 2 * n
        k = n_sets(nbytes)
        sets = [(q.clone(), s, torch.empty_like(w)) for _ in range(k)]
        t = gpu_time([lambda qq=qq, ss=ss, oo=oo: T.dequantize_4bit(qq.view(-1), ss, torch.bfloat16, oo)
                      for qq, ss, oo in sets])
        te = eager_time(lambda: dequantize_4bit(q, s, torch.bfloat16, out=sets[0][2]))
        other, other_e = "n/a", "n/a"
        if b:
            import bitsandbytes.functional as F

            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            bsets = [qb.clone() for _ in range(k)]  # their output is allocated per call, as in their Linear4bit
            tb = gpu_time([lambda qq=qq: F.dequantize_4bit(qq, sb) for qq in bsets])
            other = nbytes / tb / 1e9
            other_e = eager_time(lambda: F.dequantize_4bit(qb, sb)) * 1e6
            theirs = F.dequantize_4bit(qb, sb)
            ours = T.dequantize_4bit(qb.view(-1), QuantState.from_dict(sb.as_dict(packed=True), device=ctx.dev),
                                     torch.bfloat16)
            row("dequant", f"our dequantization of bitsandbytes' bytes == theirs {tag}", str(torch.equal(ours, theirs)))
        gbs = nbytes / t / 1e9
        row("dequant", f"NF4+DQ -> bf16 {tag}, GPU time ({k} buffer sets)", gbs, other, "GB/s", _pct_copy(ctx, gbs))
        row("dequant", f"NF4+DQ -> bf16 {tag}, eager call", te * 1e6, other_e, "us",
            "fourbit through quant.dequantize_4bit (dispatch included)")
        del w, q, sets
        free_memory()


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).view(torch.uint8)
    return torch.stack([p >> 4, p & 15], 1).reshape(-1)[:n]


def sec_quant(ctx):
    from fourbit.quant import quantize_4bit
    from fourbit.quant.blockwise import _quant4_reference
    from fourbit.quant.kernels import triton_4bit as T

    b = bnb()
    for shape in ctx.dequant_shapes:
        tag = f"{shape[0]}x{shape[1]}"
        n = shape[0] * shape[1]
        for wdt in (torch.bfloat16, torch.float32):
            w = (torch.randn(shape, device=ctx.dev) * 0.02).to(wdt)
            pk, am = T.quantize_4bit(w, "nf4", 64, "nearest")
            rp, ra = _quant4_reference(w, "nf4", 64, "nearest")
            qc, sc = quantize_4bit(w.cpu(), double_quant=False)
            same_ref = torch.equal(pk, rp) and torch.equal(am, ra)
            same_cpu = torch.equal(pk.cpu(), qc.view(-1)) and torch.equal(am.cpu(), sc.absmax)
            row("quant", f"{tag} {str(wdt)[6:]}: Triton == torch reference / == CPU kernel (bytes, absmax)",
                f"{same_ref}/{same_cpu}")
            if b:
                import bitsandbytes.functional as F

                qb, sb = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
                diff = int((_nibbles(qb, n) != _nibbles(pk, n)).sum())
                row("quant", f"{tag} {str(wdt)[6:]}: codes differing from bitsandbytes ({b.__name__} "
                    f"{'CUDA' if ctx.dev == 'cuda' else 'CPU'})", float(diff), note=f"of {n:,}; absmax equal: "
                    f"{torch.equal(sb.absmax.float(), am)}; bitsandbytes CUDA uses fast-math: ~5 in 16.8M flip for fp32")
        w = (torch.randn(shape, device=ctx.dev) * 0.02).to(torch.bfloat16)
        tq = eager_time(lambda: quantize_4bit(w), reps=10)
        tqb = "n/a"
        if b:
            import bitsandbytes.functional as F

            tqb = eager_time(lambda: F.quantize_4bit(w, quant_type="nf4", compress_statistics=True), reps=10) * 1e3
        row("quant", f"quantize_4bit NF4+DQ {tag} (eager, host sync included)", tq * 1e3, tqb, "ms")
        free_memory()


def sec_gemv(ctx):
    from torch import nn

    from fourbit.nn import Linear4bit
    from fourbit.quant import quantize_4bit
    from fourbit.quant.blockwise import _dequant4_reference, dequantize_absmax
    from fourbit.quant.kernels import triton_4bit as T

    b = bnb()
    for shape in ctx.gemv_shapes:
        tag = f"{shape[0]}x{shape[1]}"
        n = shape[0] * shape[1]
        w = (torch.randn(shape, device=ctx.dev) * 0.02).to(torch.bfloat16)
        q, s = quantize_4bit(w)
        x = torch.randn(1, shape[1], device=ctx.dev).to(torch.bfloat16)
        y = T.gemv_4bit(x, q, s)
        w64 = _dequant4_reference(q, dequantize_absmax(s), s.code, n, 64, torch.float64).view(shape)
        ref = x.double() @ w64.t()  # (1, N)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        err_mm = ((x @ w64.to(torch.bfloat16).t()).double() - ref).norm().item() / ref.norm().item()
        row("gemv", f"{tag} normwise error vs float64 (tolerance 4e-3)", err, err_mm, "",
            "other column: bf16 dequantize + matmul; ratio < 1: the fused kernel is the more accurate")
        wbytes = n // 2 + s.absmax.numel()
        k = n_sets(wbytes)
        sets = [(q.clone(), torch.randn_like(x)) for _ in range(k)]
        t = gpu_time([lambda qq=qq, xx=xx: T.gemv_4bit(xx, qq, s) for qq, xx in sets])
        other = "n/a"
        if b:
            import bitsandbytes as bb
            import bitsandbytes.functional as F

            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            bsets = [(qb.clone(), xx) for _, xx in sets]
            other = gpu_time([lambda qq=qq, xx=xx: bb.matmul_4bit(xx, qq.t(), quant_state=sb) for qq, xx in bsets]) * 1e6
        row("gemv", f"{tag} 1 token, GPU time", t * 1e6, other, "us",
            f"{wbytes / t / 1e9:.0f} GB/s of packed weights" if t == t else "")
        del w, q, sets, w64
        free_memory()
    # what one generated token pays per linear layer on this host (Python + launch)
    k_in, k_out = ctx.gemv_shapes[0][1], ctx.gemv_shapes[0][0]
    lin = nn.Linear(k_in, k_out, bias=False, dtype=torch.bfloat16, device=ctx.dev)
    ours = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    xv = torch.randn(1, 1, k_in, dtype=torch.bfloat16, device=ctx.dev)
    with torch.no_grad():
        t_ours = eager_time(lambda: ours(xv))
        t_theirs = "n/a"
        if b:
            import bitsandbytes as bb

            theirs = bb.nn.Linear4bit(k_in, k_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                      device="meta")
            theirs.weight = bb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4").to(ctx.dev)
            t_theirs = eager_time(lambda: theirs(xv)) * 1e6
        row("gemv", f"Linear4bit({k_in}, {k_out}) 1-token call, eager", t_ours * 1e6, t_theirs, "us",
            "host-bound in generation: compare with the launches below")
        if T.triton is not None:
            z = torch.zeros(16, device=ctx.dev)
            row("gemv", "bare Triton launch (1 program) / torch.add", eager_time(lambda: _nop[(1,)](z)) * 1e6,
                eager_time(lambda: torch.add(z, z)) * 1e6, "us", "this host's launch overheads")


def _make_nop():
    from fourbit.quant.kernels import triton_4bit as T

    if T.triton is None:
        return None
    tl = T.tl

    @T.triton.jit
    def nop(p):
        tl.store(p + tl.arange(0, 16), tl.zeros((16,), tl.float32))

    return nop


_nop = _make_nop()


def llama7b_config(ctx, layers: int):
    from transformers import LlamaConfig

    if DRY:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=256, max_position_embeddings=256, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, use_cache=True)


def random_model(ctx, cfg, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(ctx.dev):
        m = AutoModelForCausalLM.from_config(cfg, dtype=ctx.dtype)
    return m.eval().requires_grad_(False)


def bnb_quantize_model(ctx, model):
    """Every linear layer but lm_head -> bitsandbytes Linear4bit (NF4, double quant), quantized on the device."""
    import bitsandbytes as bb

    from fourbit.nn import find_linear_names
    from fourbit.nn import set_module

    for name in find_linear_names(model):
        lin = model.get_submodule(name)
        q = bb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=ctx.dtype,
                             quant_type="nf4", compress_statistics=True, device="meta")
        q.weight = bb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                    compress_statistics=True).to(ctx.dev)
        set_module(model, name, q)
        lin.weight = None
    return model


@contextlib.contextmanager
def count_gemv():
    """Counts calls of the fused 4-bit gemv (Linear4bit looks it up on the module at call time)."""
    from fourbit.quant.kernels import triton_4bit as T

    orig, box = T.gemv_4bit, [0]

    def counted(*a, **k):
        box[0] += 1
        return orig(*a, **k)

    T.gemv_4bit = counted
    try:
        yield box
    finally:
        T.gemv_4bit = orig


def sec_decode(ctx):
    from fourbit.models import quantize_model

    cfg = llama7b_config(ctx, ctx.layers)
    tokens = 4 if DRY else ctx.decode_tokens
    res, calls = {}, None
    for kind in ("fourbit", "bnb"):
        try:
            if kind == "bnb" and not bnb():
                continue
            free_memory()
            model = random_model(ctx, cfg)
            if kind == "fourbit":
                quantize_model(model, "nf4", True, ctx.dtype)
            else:
                bnb_quantize_model(ctx, model)
            free_memory()
            ids = torch.randint(3, cfg.vocab_size, (1, 16), device=ctx.dev)
            kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                model.generate(ids, **kw)  # warm-up as long as the timed run: every Triton specialization compiled
                sync()
                with count_gemv() as box:
                    t = time.perf_counter()
                    model.generate(ids, **kw)
                    sync()
                    dt = time.perf_counter() - t
                if kind == "fourbit":
                    calls = box[0] / max(tokens - 1, 1)
                if kind in ctx.profile:
                    _profile(lambda: model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4}),
                             f"{kind} decode (4 tokens)")
            res[kind] = NAN if DRY else tokens / dt
            del model
        except Exception as e:  # noqa: BLE001
            print(f"decode {kind} failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    if "fourbit" in res:
        row("decode", f"batch-1 greedy, Llama-2-7B shape ({cfg.num_hidden_layers} layers)", res["fourbit"],
            res.get("bnb", "n/a"), "tokens/s", "transformers generate, eager")
        n_lin = 7 * cfg.num_hidden_layers
        row("decode", "fused gemv calls per generated token", float(calls or 0), note=f"{n_lin} linear layers")


def _profile(fn, title):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() and not DRY else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    key = "cuda_time_total" if len(acts) > 1 else "cpu_time_total"
    print(f"## profile: {title}\n" + prof.key_averages().table(sort_by=key, row_limit=18), flush=True)


def optimizer_in_backward(model, make_opt):
    """Prototype: one optimizer per LoRA layer, stepped by a gradient hook as soon as both of the
    layer's gradients exist, which are then freed; at most one layer's gradients are alive. Needs
    no global gradient state (so no global-norm clipping, no accumulation across micro-batches)."""
    from fourbit.nn import lora_modules

    opts = []
    for m in lora_modules(model).values():
        params = [m.lora_A.weight, m.lora_B.weight]
        opt = make_opt(params)

        def hook(_, opt=opt, params=params):
            if all(p.grad is not None for p in params):
                opt.step()
                for p in params:
                    p.grad = None

        for p in params:
            p.register_post_accumulate_grad_hook(hook)
        opts.append(opt)
    return opts


def _train_setup(ctx, kind, cfg, ids, labels):
    """(model, step function, optimizers) for one of: fourbit, fourbit+opt-in-bwd, peft+bnb."""
    model = random_model(ctx, cfg)
    if kind.startswith("fourbit"):
        from fourbit.loss import causal_lm_loss
        from fourbit.models import quantize_model
        from fourbit.nn import add_lora
        from fourbit.optim import PagedAdamW

        opt_cls = PagedAdamW if ctx.dev == "cuda" else torch.optim.AdamW
        quantize_model(model, "nf4", True, ctx.dtype)
        add_lora(model, r=64, alpha=16, dropout=0.0, target="all-linear", gradient_checkpointing=True, verbose=False)
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "fourbit+opt-in-bwd":
            opts = optimizer_in_backward(model, lambda ps: opt_cls(ps, lr=1e-4))
        else:
            opts = [opt_cls(params, lr=1e-4)]
        loss_fn = lambda: causal_lm_loss(model, ids, labels)[0]  # noqa: E731
    else:
        import bitsandbytes as bb
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        bnb_quantize_model(ctx, model)
        model.is_loaded_in_4bit = True
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opts = [bb.optim.PagedAdamW32bit(params, lr=1e-4) if ctx.dev == "cuda" else torch.optim.AdamW(params, lr=1e-4)]
        loss_fn = lambda: model(input_ids=ids, labels=labels).loss  # noqa: E731
    model.train()

    def step():
        loss = loss_fn()
        loss.backward()
        for o in opts:  # opt-in-bwd: already stepped inside backward, nothing left here
            if kind != "fourbit+opt-in-bwd":
                o.step()
                o.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step, opts


def sec_train(ctx):
    cfg = llama7b_config(ctx, ctx.layers)
    cfg.use_cache = False
    seq = 32 if DRY else ctx.seq
    gen = torch.Generator(ctx.dev).manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (1, seq), device=ctx.dev, generator=gen)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt without loss, as in instruction tuning
    res = {}
    for kind in ("fourbit", "peft+bnb", "fourbit+opt-in-bwd"):
        try:
            if kind == "peft+bnb" and not bnb():
                continue
            free_memory()
            model, step, opts = _train_setup(ctx, kind, cfg, ids, labels)
            free_memory()
            first_loss = step().item()
            if kind in ctx.profile:
                _profile(step, f"{kind} training step")
            sync()
            steps = 1 if DRY else ctx.steps
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            dt = (time.perf_counter() - t) / steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.dev == "cuda" else NAN
            managed = sum(o.state_bytes() for o in opts if hasattr(o, "state_bytes")) / 2**30
            res[kind] = dict(tok_s=NAN if DRY else seq / dt, peak=peak, managed=managed, loss=first_loss)
            print(f"train {kind}: {json.dumps(res[kind])}", flush=True)
            del model, step, opts
        except Exception as e:  # noqa: BLE001  (one failing setup must not lose the others' numbers)
            print(f"train {kind} failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    f, p, o = res.get("fourbit"), res.get("peft+bnb"), res.get("fourbit+opt-in-bwd")
    what = f"seq {seq}, r=64, ckpt, {cfg.num_hidden_layers} layers"
    pv = lambda k: p[k] if p else "n/a"  # noqa: E731
    for name, r in (("fourbit", f), ("fourbit, optimizer in backward", o)):
        if r:
            row("train", f"{name}: QLoRA step tokens/s ({what})", r["tok_s"], pv("tok_s"), "tokens/s",
                "target >= 1.5x PEFT+bnb")
            row("train", f"{name}: peak GPU memory (torch allocator)", r["peak"], pv("peak"), "GiB",
                f"target <= 0.8x PEFT+bnb; paged states outside it: {r['managed']:.2f} GiB")
    if f:
        row("train", "first-step loss (same random model)", f["loss"], pv("loss"), "", "should agree to ~1e-2")
        try:
            from fourbit.memory import Plan, predict

            plan = predict(Plan(model="llama-7b", seq=seq, batch=1, r=64, dropout=0.0, checkpointing=True,
                                label_fraction=0.75, device="cpu"), config=cfg)
            row("train", "fourbit memory's prediction vs measured (allocator + paged states)",
                plan["total_bytes"] / 2**30, f["peak"] + f["managed"], "GiB", "ratio = predicted / measured")
            print("prediction parts (GiB): " + json.dumps({k: round(v / 2**30, 3) for k, v in plan["parts"].items()}))
        except Exception as e:  # noqa: BLE001
            print(f"memory prediction failed: {type(e).__name__}: {e}", flush=True)


def sec_paged(ctx):
    if DRY:
        return row("paged", "AdamW through a memory spike", NAN, note="dry run: needs CUDA managed memory")
    from fourbit.optim import PagedAdamW

    free, total = torch.cuda.mem_get_info()
    n_params = int(min(free * 0.15, 8 * 2**30) / 4 / 3)  # params + 2 states ~ 45% of free memory
    chunk = 2**26
    results = {}
    for kind in ("paged", "unpaged"):
        free_memory()
        params = [torch.nn.Parameter(torch.zeros(chunk, device="cuda")) for _ in range(max(1, n_params // chunk))]
        opt = PagedAdamW(params, lr=1e-3) if kind == "paged" else torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        t_quiet = _event_time(opt.step, reps=3)
        free_now, _ = torch.cuda.mem_get_info()
        spike = None
        try:  # an activation-like spike: all free memory plus half of what the states occupy
            spike = torch.empty(int(free_now + 0.5 * 2 * n_params * 4) // 2, dtype=torch.bfloat16, device="cuda")
            spike.fill_(1)
            results[kind] = (t_quiet, _event_time(opt.step, reps=3), "ok")
        except torch.OutOfMemoryError:
            results[kind] = (t_quiet, NAN, "OOM")
        del spike, params, opt
        free_memory()
    state_gb = 2 * n_params * 4 / 2**30
    row("paged", f"AdamW step, {state_gb:.1f} GiB of states, no pressure", results["paged"][0] * 1e3,
        results["unpaged"][0] * 1e3, "ms", "paged vs torch AdamW")
    row("paged", "step during a spike (free memory + half the states' size)", results["paged"][1] * 1e3,
        results["unpaged"][1] * 1e3, "ms", f"paged: {results['paged'][2]}, unpaged: {results['unpaged'][2]}")


def _event_time(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3


def sec_sweep(ctx):
    """Tile sizes of the dequantization and gemv kernels (GPU time), to pick the defaults."""
    import itertools

    from fourbit.quant import quantize_4bit
    from fourbit.quant.kernels import triton_4bit as T

    for shape in ctx.dequant_shapes:
        w = (torch.randn(shape, device=ctx.dev) * 0.02).to(torch.bfloat16)
        q, s = quantize_4bit(w)
        n = w.numel()
        nbytes = n // 2 + s.absmax.numel() + 2 * n
        sets = [(q.clone(), torch.empty_like(w)) for _ in range(n_sets(nbytes))]
        res = []
        grid = [(2048, None), (512, 2)] if DRY else itertools.product([1024, 2048, 4096, 8192], [None, 2, 4, 8])
        for bb, nw in grid:
            t = gpu_time([lambda qq=qq, oo=oo: T.dequantize_4bit(qq.view(-1), s, torch.bfloat16, oo, bb, nw)
                          for qq, oo in sets])
            res.append((nbytes / t / 1e9 if t == t else NAN, bb, nw))
        res.sort(key=lambda r: -r[0] if r[0] == r[0] else 0)
        row("sweep", f"dequant {shape[0]}x{shape[1]} best block_bytes/num_warps", res[0][0], unit="GB/s",
            note=f"{res[0][1]}/{res[0][2]}; next: " + ", ".join(f"{g:.0f}@{b}/{w}" for g, b, w in res[1:5]))
        free_memory()
    for shape in ctx.gemv_shapes:
        w = (torch.randn(shape, device=ctx.dev) * 0.02).to(torch.bfloat16)
        q, s = quantize_4bit(w)
        xv = torch.randn(1, shape[1], dtype=torch.bfloat16, device=ctx.dev)
        sets = [q.clone() for _ in range(n_sets(w.numel() // 2))]
        res = []
        grid = [(8, 8, 4), (4, 2, 2)] if DRY else itertools.product([2, 4, 8, 16], [2, 4, 8, 16], [2, 4, 8])
        for bn, g, nw in grid:
            try:
                t = gpu_time([lambda qq=qq: T.gemv_4bit(xv, qq, s, bn, g, nw) for qq in sets])
                res.append((t, bn, g, nw))
            except Exception as e:  # noqa: BLE001  (a tile that does not compile)
                print(f"gemv {shape} bn={bn} g={g} w={nw}: {type(e).__name__}", flush=True)
        res.sort(key=lambda r: r[0] if r[0] == r[0] else 0)
        row("sweep", f"gemv {shape[0]}x{shape[1]} best block_n/groups/num_warps", res[0][0] * 1e6, unit="us",
            note=f"{res[0][1]}/{res[0][2]}/{res[0][3]}; next: " +
            ", ".join(f"{t * 1e6:.1f}@{b}/{g}/{w}" for t, b, g, w in res[1:5]))
        free_memory()


SECTIONS = {"copy": sec_copy, "dequant": sec_dequant, "quant": sec_quant, "gemv": sec_gemv, "decode": sec_decode,
            "train": sec_train, "paged": sec_paged, "sweep": sec_sweep}
DEFAULT = "copy,dequant,quant,gemv,decode,train,paged"


def versions() -> str:
    import importlib.metadata as md

    out = []
    for p in ("torch", "triton", "transformers", "bitsandbytes", "peft"):
        try:
            out.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            out.append(f"{p} absent")
    return ", ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes, no timing")
    ap.add_argument("--sections", default=DEFAULT, help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--profile", default="", help="torch.profiler table for: fourbit, bnb (decode), "
                                                  "peft+bnb, fourbit+opt-in-bwd (train step)")
    ctx = ap.parse_args(argv)
    ctx.profile = [p for p in ctx.profile.split(",") if p]
    if not DRY and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device (or --dry-run to check the script on CPU).")
        return 1
    ctx.dev = "cpu" if DRY else "cuda"
    ctx.dtype = torch.float32 if DRY else torch.bfloat16
    ctx.dequant_shapes = [(64, 96), (33, 65)] if DRY else [(4096, 4096), (11008, 4096)]
    ctx.gemv_shapes = [(48, 128), (40, 192)] if DRY else [(4096, 4096), (11008, 4096), (4096, 11008)]
    device = "CPU dry run (TRITON_INTERPRET=1, not timed)" if DRY else torch.cuda.get_device_name()
    print(f"# {device} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {versions()}", flush=True)
    print(HEADER, flush=True)
    t0 = time.time()
    for name in ctx.sections.split(","):
        t1 = time.time()
        try:
            SECTIONS[name](ctx)
        except Exception as e:  # noqa: BLE001
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            row(name, "SECTION FAILED", f"{type(e).__name__}: {str(e)[:120]}")
        print(f"# {name}: {time.time() - t1:.0f} s", flush=True)
        free_memory()
    print(f"\n# summary ({time.time() - t0:.0f} s)\n{HEADER}")
    for r in ROWS:
        print(f"| {r['section']} | {r['name']} | {_fmt(r['fourbit'])} | {_fmt(r['other'])} | {r['ratio']} | "
              f"{r['unit']} | {r['note']} |")
    if ctx.json:
        with open(ctx.json, "w") as f:
            json.dump(dict(device=device, versions=versions(), rows=ROWS), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
