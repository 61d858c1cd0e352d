"""One QLoRA training step on SmolLM2-135M: fourbit vs PEFT + bitsandbytes vs PEFT on fp32 (CPU).

    python bench/train_step.py [--batch 4] [--seq 256] [--r 64] [--steps 2]

Each configuration runs in its own process (so peak RSS is its own): load the model, add LoRA
r=64 (alpha 16) on every linear layer, then warm-up step + `--steps` timed steps of
forward + backward + AdamW on a batch of `--batch` x `--seq` tokens taken from the Guanaco test
split (loss on the second half of each sequence, standing in for the response). Prints seconds
per step and peak RSS, with ratios against PEFT + bitsandbytes, with and without gradient
checkpointing.
"""

import argparse
import json
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


def run_one(kind: str, b: int, t: int, r: int, steps: int, ckpt: bool) -> dict:
    import resource

    import torch

    from fourbit.embedded import embedded_model_dir

    torch.manual_seed(0)
    path = str(embedded_model_dir())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids, labels = batch(tok, b, t)
    if kind == "fourbit":
        from fourbit.loss import causal_lm_loss
        from fourbit.models import load_model
        from fourbit.nn import add_lora

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
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"kind": kind, "ckpt": ckpt, "s_per_step": (time.perf_counter() - t0) / steps, "first_loss": first,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_after_load": rss_loaded}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.batch, args.seq, args.r, args.steps, args.ckpt)))
        return
    results = []
    for ckpt in (False, True):
        for kind in ("fourbit", "peft+bnb", "peft fp32"):
            cmd = [sys.executable, __file__, "--one", kind, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--r", str(args.r), "--steps", str(args.steps)] + (["--ckpt"] if ckpt else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(f"{kind} ckpt={ckpt} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results.append(json.loads(line[0][7:]))
            print(f"  {kind} ckpt={ckpt}: {results[-1]['s_per_step']:.2f} s/step", file=sys.stderr)
    import torch

    print(f"# SmolLM2-135M, batch {args.batch} x {args.seq} tokens, LoRA r={args.r} on all linear layers, "
          f"CPU {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| setup | grad ckpt | s/step | peak RSS GB | speed vs PEFT+bnb | peak vs PEFT+bnb | first loss |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ref = next((x for x in results if x["kind"] == "peft+bnb" and x["ckpt"] == r["ckpt"]), None)
        speed = ref["s_per_step"] / r["s_per_step"] if ref else float("nan")
        mem = r["peak_rss"] / ref["peak_rss"] if ref else float("nan")
        print(f"| {r['kind']} | {'on' if r['ckpt'] else 'off'} | {r['s_per_step']:.2f} | {r['peak_rss'] / 1e9:.2f} | "
              f"{speed:.2f}x | {mem:.2f}x | {r['first_loss']:.4f} |")


if __name__ == "__main__":
    main()
