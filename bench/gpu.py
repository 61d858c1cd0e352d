"""fourbit on a GPU, in one run, one table: kernels, decoding, a QLoRA training step, paged optimizers.

    python bench/gpu.py [--layers 32] [--quick] [--sections copy,dequant,decode,train,paged]

Compared in the same run with bitsandbytes (+ PEFT) when importable (else "n/a"):
  copy     device-to-device copy bandwidth (GB/s counting bytes read + written): the roofline
  dequant  NF4 + double-quant -> bf16 dequantization GB/s (4096x4096, 11008x4096), exactness vs the
           CPU reference and agreement with bitsandbytes' CUDA quantizer
  decode   batch-1 greedy decoding tokens/s of a Llama-2-7B-shaped model with random weights
  train    one QLoRA step: seq 2048, batch 1, r=64 on all linear layers, gradient checkpointing,
           bf16: tokens/s and peak memory, fourbit vs PEFT + bitsandbytes; fourbit memory's prediction
  paged    paged AdamW through a memory spike that makes unpaged AdamW run out of memory
Nothing is downloaded: models are built from a config with random weights.
"""

import argparse
import gc
import json
import time
import traceback

import torch

ROWS = []


def row(section, name, fourbit, other="n/a", unit="", note=""):
    ratio = f"{fourbit / other:.2f}x" if isinstance(fourbit, float) and isinstance(other, float) and other else ""
    ROWS.append((section, name, fourbit, other, ratio, unit, note))
    f = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"| {section} | {name} | {f(fourbit)} | {f(other)} | {ratio} | {unit} | {note} |", flush=True)


def timed(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3  # seconds


def bnb():
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception:
        return None


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# -- sections -------------------------------------------------------------------------------------
def sec_copy(args):
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    args.copy_gbs = 2 * x.numel() * 4 / t / 1e9
    row("copy", "device-to-device copy", args.copy_gbs, unit="GB/s (read+write)")


def sec_dequant(args):
    from fourbit.quant import dequantize_4bit, quantize_4bit

    b = bnb()
    for shape in [(4096, 4096), (11008, 4096)]:
        w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        q, s = quantize_4bit(w)
        out = torch.empty_like(w)
        n = w.numel()
        nbytes = n // 2 + s.absmax.numel() + n * 2  # packed + uint8 constants read, bf16 written
        t = timed(lambda: dequantize_4bit(q, s, out=out))
        gbs = nbytes / t / 1e9
        other = "n/a"
        if b:
            import bitsandbytes.functional as F

            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            tb = timed(lambda: F.dequantize_4bit(qb, sb))
            other = nbytes / tb / 1e9
        row("dequant", f"NF4+DQ -> bf16 {shape[0]}x{shape[1]}", gbs, other, "GB/s",
            f"{100 * gbs / args.copy_gbs:.0f}% of copy bandwidth" if getattr(args, "copy_gbs", None) else "")
        ref = dequantize_4bit(q.cpu(), s.to("cpu"))
        row("dequant", f"exact vs CPU reference {shape[0]}x{shape[1]}", str(torch.equal(out.cpu(), ref)))
        qc, sc = quantize_4bit(w.cpu())  # quantizer: GPU (Triton) vs CPU (C kernel), both "nearest"
        row("dequant", f"GPU quantize codes == CPU quantize codes {shape[0]}x{shape[1]}", str(torch.equal(q.cpu(), qc)),
            note="double-quant offset = mean(absmax) sums in another order on GPU")
        tq = timed(lambda: quantize_4bit(w), reps=5)
        tqb = timed(lambda: F.quantize_4bit(w, quant_type="nf4", compress_statistics=True), reps=5) if b else "n/a"
        row("dequant", f"quantize (NF4+DQ) {shape[0]}x{shape[1]}", tq * 1e3, tqb * 1e3 if b else "n/a", "ms")
        if b:
            mism = (qb.view(-1) != q.view(-1)).float().mean().item()
            row("dequant", f"packed bytes differing from bnb CUDA {shape[0]}x{shape[1]}", f"{mism:.2e}",
                note="fraction; bnb CUDA uses fast-math reciprocals")
            from fourbit.quant import QuantState

            ours_of_theirs = dequantize_4bit(qb, QuantState.from_dict(sb.as_dict(packed=True), device="cuda"))
            row("dequant", f"our dequant of bnb's tensor == bnb's {shape[0]}x{shape[1]}",
                str(torch.equal(ours_of_theirs, F.dequantize_4bit(qb, sb))))
        del w, q, out
        free_memory()


def llama7b_config(layers):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, use_cache=True)


def random_model(cfg, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return m.eval().requires_grad_(False)


def bnb_quantize_model(model):
    import bitsandbytes as bb

    from fourbit.nn import find_linear_names
    from fourbit.nn.inject import _set_module

    for name in find_linear_names(model):
        lin = model.get_submodule(name)
        q = bb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                             compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True, device="meta")
        q.weight = bb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True).to("cuda")
        _set_module(model, name, q)
        lin.weight = None
    return model


def sec_decode(args):
    from fourbit.models import quantize_model

    cfg = llama7b_config(args.layers)
    results = {}
    for kind in ("fourbit", "bnb"):
        if kind == "bnb" and not bnb():
            continue
        free_memory()
        model = random_model(cfg)
        if kind == "fourbit":
            quantize_model(model, "nf4", True, torch.bfloat16)
        else:
            bnb_quantize_model(model)
        torch.cuda.empty_cache()
        ids = torch.randint(3, 32000, (1, 16), device="cuda")
        kw = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False,
                  pad_token_id=0)
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        results[kind] = args.decode_tokens / (time.perf_counter() - t)
        del model
    row("decode", f"batch-1 greedy, Llama-2-7B shape ({args.layers} layers)", results["fourbit"],
        results.get("bnb", "n/a"), "tokens/s")


def sec_train(args):
    cfg = llama7b_config(args.layers)
    cfg.use_cache = False
    seq = args.seq
    ids = torch.randint(3, 32000, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt without loss, as in instruction tuning
    res = {}
    for kind in ("fourbit", "peft+bnb"):
        try:
            free_memory()
            model = random_model(cfg)
            if kind == "fourbit":
                from fourbit.loss import causal_lm_loss
                from fourbit.models import quantize_model
                from fourbit.nn import add_lora
                from fourbit.optim import PagedAdamW

                quantize_model(model, "nf4", True, torch.bfloat16)
                add_lora(model, r=64, alpha=16, dropout=0.0, gradient_checkpointing=True, verbose=False)
                opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                loss_fn = lambda: causal_lm_loss(model, ids, labels)[0]  # noqa: E731
            else:
                if not bnb():
                    continue
                import bitsandbytes as bb
                from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

                bnb_quantize_model(model)
                model.is_loaded_in_4bit = True
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
                model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
                opt = bb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                loss_fn = lambda: model(input_ids=ids, labels=labels).loss  # noqa: E731
            model.train()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()

            def step():
                loss = loss_fn()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            step()
            if args.profile and kind in args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    step()
                    torch.cuda.synchronize()
                print(f"## {kind} step profile (top CUDA time)\n" +
                      prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / args.steps
            managed = opt.state_bytes() if hasattr(opt, "state_bytes") else 0  # paged states live outside torch
            res[kind] = (seq / dt, torch.cuda.max_memory_allocated() / 2**30, managed / 2**30)
            del model, opt
        except Exception as e:  # noqa: BLE001  (one failing setup must not lose the other's numbers)
            print(f"train {kind} failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    f, p = res.get("fourbit"), res.get("peft+bnb")
    if f:
        row("train", f"QLoRA step tokens/s (seq {seq}, r=64, ckpt, {args.layers} layers)", f[0],
            p[0] if p else "n/a", "tokens/s")
        row("train", "peak GPU memory (torch allocator)", f[1], p[1] if p else "n/a", "GiB",
            "target <= 0.8x of PEFT+bnb")
        from fourbit.memory import Plan, predict

        plan = predict(Plan(model="llama-7b", seq=seq, batch=1, r=64, checkpointing=True, label_fraction=0.75,
                            device="cpu"), config=cfg)  # allocator view: no CUDA context
        row("train", "fourbit memory's prediction (torch allocator + managed states)", plan["total_bytes"] / 2**30,
            f[1] + f[2], "GiB", f"ratio = predicted / measured; managed (paged) states {f[2]:.2f} GiB")
        print("prediction parts (GiB): " + json.dumps({k: round(v / 2**30, 3) for k, v in plan["parts"].items()}))


def sec_paged(args):
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
        t_quiet = timed(opt.step, reps=3, warmup=1)
        free_now, _ = torch.cuda.mem_get_info()
        spike = None
        try:  # an activation-like spike: all free memory plus half of what the states occupy
            spike = torch.empty(int(free_now + 0.5 * 2 * n_params * 4) // 2, dtype=torch.bfloat16, device="cuda")
            spike.fill_(1)
            t_spike = timed(opt.step, reps=3, warmup=1)
            results[kind] = (t_quiet, t_spike, "ok")
        except torch.OutOfMemoryError:
            results[kind] = (t_quiet, float("nan"), "OOM")
        del spike, params, opt
        free_memory()
    state_gb = 2 * n_params * 4 / 2**30
    row("paged", f"AdamW step, {state_gb:.1f} GiB of states, no pressure", results["paged"][0] * 1e3,
        results["unpaged"][0] * 1e3, "ms", "paged vs torch AdamW")
    row("paged", "step during a spike (free memory + half the states' size)", results["paged"][1] * 1e3,
        results["unpaged"][1] * 1e3, "ms", f"paged: {results['paged'][2]}, unpaged: {results['unpaged'][2]}")


SECTIONS = {"copy": sec_copy, "dequant": sec_dequant, "decode": sec_decode, "train": sec_train, "paged": sec_paged}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--profile", default="", help="profile one training step of: fourbit, peft+bnb (comma list)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; none found.")
        return
    import importlib.metadata as md

    vers = {p: (md.version(p) if p in {d.metadata["Name"] for d in md.distributions()} else "absent")
            for p in ("torch", "triton", "transformers", "bitsandbytes", "peft")}
    print(f"# {torch.cuda.get_device_name()} | " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    print("| section | measurement | fourbit | bitsandbytes/PEFT | ratio | unit | note |\n|---|---|---:|---:|---:|---|---|",
          flush=True)
    for name in args.sections.split(","):
        try:
            SECTIONS[name](args)
        except Exception as e:  # noqa: BLE001
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        free_memory()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
