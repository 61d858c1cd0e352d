"""One QLoRA training step on SmolLM2-135M: fourbit vs PEFT + bitsandbytes (vs PEFT on fp32) on a CPU.

    python bench/train_step.py [--batch 4] [--seq 256] [--r 64] [--steps 2] [--rounds 1] [--threads N]
                               [--ckpt both|on|off] [--sides fourbit peft+bnb] [--profile]

Each run is its own process (so peak RSS is its own): load the model, add LoRA r=64 (alpha 16)
on every linear layer, then a warm-up step + `--steps` timed steps of forward + backward + AdamW
on a batch of `--batch` x `--seq` tokens taken from the Guanaco test split (loss on the second
half of each sequence, standing in for the response). Sides run in A-B-B-A order per
checkpointing setting (`--rounds` repeats the pattern), so a change in the machine's load hits
both; the table gives the mean wall-clock seconds per step, the process CPU seconds per step
(with --threads 1 the better measure on a shared machine), peak RSS, and ratios against PEFT +
bitsandbytes. Side "fourbit-3dq" is fourbit with the checkpoint weight reuse switched off (the
backward dequantizes a third time), to measure that change alone. `--profile` prints
torch.profiler's top ops of one step instead.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "guanaco" / "openassistant_best_replies_eval.jsonl"


def batch(tok, b, t):
    import torch

    if DATA.is_file():
        from itertools import islice

        from fourbit.data import iter_jsonl

        text = "\n".join(row["text"] for _, row in islice(iter_jsonl(DATA), 200))
        ids = tok(text, return_tensors="pt")["input_ids"][0][: b * t].view(b, t)
    else:
        ids = torch.randint(0, tok.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : t // 2] = -100
    return ids, labels


def run_one(kind: str, b: int, t: int, r: int, steps: int, ckpt: bool, profile: bool = False) -> dict:
    import resource

    import torch

    from fourbit.embedded import embedded_model_dir

    torch.manual_seed(0)
    path = str(embedded_model_dir())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids, labels = batch(tok, b, t)
    if kind.startswith("fourbit"):
        from fourbit.loss import causal_lm_loss
        from fourbit.models import load_model
        from fourbit.nn import add_lora

        if kind == "fourbit-3dq":  # no reuse of the recomputed W: backward dequantizes again
            import fourbit.nn.linear4bit as l4
            import fourbit.nn.lora as lora

            l4.forward_weight = lora.forward_weight = lambda p, s, d, keep: l4.dequantize_weight(p, s, d)
        model, _ = load_model(path, quant="nf4", device="cpu", load_tokenizer=False)
        add_lora(model, r=r, alpha=16, dropout=0.0, gradient_checkpointing=ckpt, verbose=False)

        def loss_fn():
            return causal_lm_loss(model, ids, labels)[0]
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if kind == "peft+bnb":
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                         dtype=torch.float32)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            if ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    first = step()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(steps):
        step()
    c1 = os.times()
    return {"kind": kind, "ckpt": ckpt, "s_per_step": (time.perf_counter() - t0) / steps,
            "cpu_s_per_step": (c1.user + c1.system - c0.user - c0.system) / steps,
            "sys_share": (c1.system - c0.system) / max(c1.user + c1.system - c0.user - c0.system, 1e-9),
            "first_loss": first,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_after_load": rss_loaded}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the A-B-B-A pattern")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each run (default: torch's)")
    ap.add_argument("--ckpt", choices=["both", "on", "off"], default="both", help="gradient checkpointing")
    ap.add_argument("--sides", nargs="+", default=["fourbit", "peft+bnb"],
                    help="the first is A, the others B (fourbit, fourbit-3dq, peft+bnb, peft fp32)")
    ap.add_argument("--profile", action="store_true", help="profile one step of the first side and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one or args.profile:
        res = run_one(args.one or args.sides[0], args.batch, args.seq, args.r, args.steps,
                      args.ckpt == "on" if args.profile else args.ckpt != "off", args.profile)
        print("RESULT " + json.dumps(res))
        return
    results = []
    a, others = args.sides[0], args.sides[1:]
    order = [a, *others, *reversed(others), a] * args.rounds
    for ckpt in {"both": (False, True), "on": (True,), "off": (False,)}[args.ckpt]:
        for kind in order:
            cmd = [sys.executable, __file__, "--one", kind, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--r", str(args.r), "--steps", str(args.steps), "--ckpt", "on" if ckpt else "off"]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(f"{kind} ckpt={ckpt} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(line[0][7:]))
            r = results[-1]
            print(f"  {kind} ckpt={ckpt}: {r['s_per_step']:.2f} s/step, {r['cpu_s_per_step']:.2f} CPU s/step, "
                  f"({r['sys_share']:.0%} in the kernel), peak {r['peak_rss'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    print(f"# SmolLM2-135M, batch {args.batch} x {args.seq} tokens, LoRA r={args.r} on all linear layers, "
          f"CPU {args.threads or torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"order per setting: {' '.join(order)}")
    print("| setup | grad ckpt | s/step (runs) | CPU s/step | peak RSS GB | speed vs PEFT+bnb (wall / CPU) "
          "| peak vs PEFT+bnb | first loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for ckpt in (False, True):
        ref = _mean([x for x in results if x["kind"] == "peft+bnb" and x["ckpt"] == ckpt])
        for kind in dict.fromkeys(order):
            runs = [x for x in results if x["kind"] == kind and x["ckpt"] == ckpt]
            if not runs:
                continue
            m = _mean(runs)
            speed = f"{ref['s_per_step'] / m['s_per_step']:.2f}x / {ref['cpu_s_per_step'] / m['cpu_s_per_step']:.2f}x" \
                if ref else "n/a"
            mem = f"{m['peak_rss'] / ref['peak_rss']:.2f}x" if ref else "n/a"
            each = ", ".join(f"{x['s_per_step']:.1f}" for x in runs)
            print(f"| {kind} | {'on' if ckpt else 'off'} | {m['s_per_step']:.2f} ({each}) | {m['cpu_s_per_step']:.2f} "
                  f"| {m['peak_rss'] / 1e9:.2f} | {speed} | {mem} | {runs[0]['first_loss']:.4f} |")


def _mean(runs: list[dict]) -> dict | None:
    if not runs:
        return None
    keys = ("s_per_step", "cpu_s_per_step", "peak_rss")
    return {k: sum(x[k] for x in runs) / len(runs) for k in keys}


if __name__ == "__main__":
    main()
