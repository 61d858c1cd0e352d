"""Research check of fourbit's built-in demo task with plain transformers + PEFT (not fourbit's trainer).

Question: can SmolLM2-135M-Instruct do the task before training (it should not), and does a short
LoRA fine-tune on a CPU take the held-out exact-match score from ~0 to high? This is the
independent evidence behind the demo preset in fourbit.train (DEMO_PRESET); it uses fourbit.data
only for the examples, the token/label layout (tested on its own) and the score.

    python bench/builtin_task_check.py                     # 40 steps of 8, r=16, lr 1e-3, 48 held-out
    python bench/builtin_task_check.py --steps 60 --eval-every 10 --n-eval 200

Prints the held-out score before, at every --eval-every steps and after, with wall time. Timings
are only comparable on a quiet machine (2 CPU cores shared with other jobs inflate them a lot).
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def score(model, tok, examples, batch_size=16, max_new_tokens=24):
    from fourbit.data import prompt_text, reference_answer, score_builtin

    tok.padding_side = "left"
    answers = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        enc = tok([prompt_text(e, tok) for e in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        answers += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    return score_builtin(answers, [reference_answer(e) for e in examples]), answers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--eval-every", type=int, default=0, help="also score every N steps (0: before/after only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit.data import builtin_examples, collate, tokenize_examples
    from fourbit.embedded import embedded_model_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = embedded_model_dir("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    held = builtin_examples("eval", n=args.n_eval)
    train, stats = tokenize_examples(builtin_examples("train"), tok, source_max_len=96, target_max_len=48)
    print(f"train: {stats['examples']} examples, mean {stats['tokens'] / stats['examples']:.1f} tokens, "
          f"longest {max(len(x['input_ids']) for x in train)}; held-out: {len(held)} (unseen names and cities)")

    t0 = time.perf_counter()
    before, answers = score(model, tok, held)
    print(f"base model: held-out exact match {before:.1%} ({time.perf_counter() - t0:.0f} s); e.g. {answers[0]!r}")

    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    model.train()
    t_train, curve = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        idx = order[(step - 1) * args.batch_size: step * args.batch_size]
        b = collate([train[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  {time.perf_counter() - t_train:.0f} s")
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            s, _ = score(model, tok, held)
            curve.append((step, s))
            print(f"step {step:3d}  held-out exact match {s:.1%}")
    train_s = time.perf_counter() - t_train
    after, answers = score(model, tok, held)
    print(f"after {args.steps} steps of {args.batch_size} (r={args.r}, lr={args.lr}): held-out exact match "
          f"{after:.1%}; e.g. {answers[0]!r}")
    print("\n| steps | held-out exact match |\n| --- | --- |")
    for step, s in [(0, before), *curve, (args.steps, after)]:
        print(f"| {step} | {s:.1%} |")
    print(f"\ntraining wall time {train_s:.0f} s (includes intermediate scoring), total "
          f"{time.perf_counter() - t0:.0f} s, torch threads {args.threads}")


if __name__ == "__main__":
    main()
