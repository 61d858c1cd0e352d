"""The CPU 4-bit skinny matmul (fourbit.quant.matmul_4bit) vs dequantize + F.linear, per layer
shape and in batch-1 generation on SmolLM2-135M.

    python bench/quant_matmul.py [--rows 1 8 16 32] [--tokens 48] [--rounds 2] [--threads N]
                                 [--skip-shapes] [--skip-generate]

Shapes: SmolLM2-135M's linear layers (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536
down), NF4 + double quantization, blocksize 64; microseconds per call at torch's thread count,
the two methods interleaved call by call so a change in the machine's load hits both (median of
the per-round times; the minimum is printed too). "dequantize + F.linear" is what Linear4bit did
before: dequantize into the shared scratch buffer, then sgemm.

Generation: `fourbit.load_model("smollm2-135m", quant="nf4")` then greedy `model.generate` of
--tokens tokens at batch 1, each side in its own process, sides in A-B-B-A order (--rounds
repeats the pattern). Side "kernel" is the code as is; side "dequantize" turns the skinny path
off (patching `skinny` to False), which is the old path. The kernel side also reports the
lm_head's share of the decode time (49152x576 float32, tied to the embedding; not quantized).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def bench_shapes(rows_list, rounds=15, calls=40):
    import torch.nn.functional as F

    from fourbit.nn.linear4bit import dequantize_weight
    from fourbit.quant import matmul_4bit, quantize_4bit

    # one thread: the thread's CPU time, which a busy machine does not inflate; else wall time
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    print(f"# per call, {torch.get_num_threads()} threads, {clock.__name__}, median (min) of {rounds} interleaved "
          f"rounds of {calls} calls")
    print("| W (out x in) | rows | matmul_4bit us | dequantize + F.linear us | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for o, k in SHAPES:
        packed, state = quantize_4bit(torch.randn(o, k) * 0.02, "nf4", 64, True)
        for rows in rows_list:
            x = torch.randn(rows, k)
            fns = {"kernel": lambda: matmul_4bit(x, packed, state),
                   "dequant": lambda: F.linear(x, dequantize_weight(packed, state, torch.float32))}
            times = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(rounds):
                for name, fn in fns.items():
                    t = clock()
                    for _ in range(calls):
                        fn()
                    times[name].append((clock() - t) / calls * 1e6)
            a, b = statistics.median(times["kernel"]), statistics.median(times["dequant"])
            print(f"| {o}x{k} | {rows} | {a:.0f} ({min(times['kernel']):.0f}) | {b:.0f} ({min(times['dequant']):.0f}) "
                  f"| {b / a:.2f}x |", flush=True)


def generate_one(side: str, tokens: int) -> dict:
    """One side, in this process: tokens/s of greedy batch-1 generate, and the lm_head's share."""
    from fourbit.embedded import embedded_model_dir
    from fourbit.models import load_model

    if side == "dequantize":
        import fourbit.nn.linear4bit as l4
        import fourbit.nn.lora as lora

        l4.skinny = lora.skinny = lambda x, in_features: False
    model, tok = load_model(str(embedded_model_dir()), quant="nf4", device="cpu")
    ids = tok("Tell me about the history of the bicycle.", return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    spent = [0.0]

    def pre(*_):
        spent.append(time.perf_counter())

    def post(*_):
        spent[0] += time.perf_counter() - spent.pop()

    model.lm_head.register_forward_pre_hook(pre)
    model.lm_head.register_forward_hook(post)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up as long as the timed run
        spent[0] = 0.0
        t, c = time.perf_counter(), time.process_time()
        out = model.generate(ids, **kw)
        dt, dc = time.perf_counter() - t, time.process_time() - c
    return {"side": side, "tokens_per_s": tokens / dt, "tokens_per_cpu_s": tokens / dc, "lm_head_share": spent[0] / dt,
            "text": tok.decode(out[0, ids.shape[1]:])}


def bench_generate(tokens: int, rounds: int):
    order = ["kernel", "dequantize", "dequantize", "kernel"] * rounds
    res = {"kernel": [], "dequantize": []}
    texts = {}
    for side in order:
        cmd = [sys.executable, __file__, "--one", side, "--tokens", str(tokens), "--threads", str(torch.get_num_threads())]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(f"{side} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        res[side].append(r)
        texts[side] = r["text"]
        print(f"  {side}: {r['tokens_per_s']:.2f} tokens/s", file=sys.stderr, flush=True)
    share = statistics.mean(r["lm_head_share"] for r in res["kernel"])
    print(f"\n# SmolLM2-135M NF4+DQ, greedy batch 1, {tokens} new tokens, {torch.get_num_threads()} threads, "
          f"order {' '.join(order)}")
    print("| side | tokens/s (each run) | mean | tokens per CPU second (each run) | mean |\n|---|---|---:|---|---:|")
    mean = {}
    for side, name in (("dequantize", "dequantize + F.linear (before)"), ("kernel", "matmul_4bit (after)")):
        w = [r["tokens_per_s"] for r in res[side]]
        c = [r["tokens_per_cpu_s"] for r in res[side]]
        mean[side] = (statistics.mean(w), statistics.mean(c))
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in w)} | {mean[side][0]:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in c)} | {mean[side][1]:.2f} |")
    print(f"speed-up {mean['kernel'][0] / mean['dequantize'][0]:.2f}x (wall), "
          f"{mean['kernel'][1] / mean['dequantize'][1]:.2f}x (CPU); lm_head share of the decode time with the "
          f"kernel: {share:.0%}; same greedy text: {texts.get('kernel') == texts.get('dequantize')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the A-B-B-A pattern")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(generate_one(args.one, args.tokens)))
        return
    if not args.skip_shapes:
        bench_shapes(args.rows)
    if not args.skip_generate:
        bench_generate(args.tokens, args.rounds)


if __name__ == "__main__":
    main()
