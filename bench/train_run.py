"""`fourbit train` against PEFT + bitsandbytes with the transformers Trainer: tokens/s and peak RSS
on the same data and settings (CPU), each run in its own process.

    python bench/train_run.py [--steps 6] [--cases demo,guanaco]

Cases:
  demo     the embedded default run's settings (built-in task, SmolLM2-135M, batch 8, r=16,
           lr 1e-3, no checkpointing), --steps steps instead of 24.
  guanaco  SmolLM2-135M on the Guanaco split in ../shared/data (OASST format, responses only),
           batch 4, source/target max 128/128 tokens, r=64 alpha 16 on every linear layer,
           gradient checkpointing, as the paper's recipe but for a 2-core CPU.
Both sides get the same tokenized examples (fourbit.data), the same LoRA shape, AdamW at the same
lr, constant schedule, max grad norm 0.3, no dropout. tokens/s counts non-pad tokens of the
batches processed, divided by the training loop's time (model loading and scoring excluded).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fourbit.data import iter_jsonl

GUANACO = Path(__file__).resolve().parents[2] / "shared" / "data" / "guanaco" / "openassistant_best_replies_eval.jsonl"
CASES = {
    "demo": dict(data="builtin", batch_size=8, r=16, alpha=32, lr=1e-3, source_max_len=96, target_max_len=48,
                 gradient_checkpointing=False),
    "guanaco": dict(data=str(GUANACO), batch_size=4, r=64, alpha=16, lr=2e-4, source_max_len=128,
                    target_max_len=128, gradient_checkpointing=True),
}
COMMON = dict(grad_accum=1, dropout=0.0, group_by_length=False, eval_size=8, optim="adamw", max_grad_norm=0.3)


def run_fourbit(case: dict, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "fourbit", "train", "--output", str(Path(tmp) / "run"), "--max-steps", str(steps),
                "--score-examples", "1"]
        for k, v in {**COMMON, **case}.items():
            args += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
        rows = [row for _, row in iter_jsonl(Path(tmp) / "run" / "metrics.jsonl")]
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    return {"tokens_per_s": rows[-1]["tokens_per_s"], "peak_mb": summary["peak_memory_mb"], "loss": rows[-1]["loss"]}


def peft_child(case: dict, steps: int) -> None:
    """Runs in a subprocess: transformers Trainer + PEFT LoRA on a bitsandbytes NF4 model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    from fourbit.embedded import embedded_model_dir
    from fourbit.models import peak_rss_bytes
    from fourbit.train import TrainConfig, setup_data
    from fourbit.data import collate
    from transformers import AutoTokenizer

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = TrainConfig(**{**COMMON, **case, "max_steps": steps})
    data = setup_data(cfg, tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    seen = {"batches": []}

    def collator(rows):  # accelerate's loader collates one batch ahead: only the first `steps` count
        b = collate(rows, data.pad_id)
        seen["batches"].append(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel())
        return b

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            seen["t0"], seen["batches"] = time.perf_counter(), []

        def on_step_end(self, *a, **k):
            seen["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
                                 max_steps=steps, learning_rate=cfg.lr, lr_scheduler_type="constant", optim="adamw_torch",
                                 max_grad_norm=0.3, gradient_checkpointing=cfg.gradient_checkpointing,
                                 logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                 remove_unused_columns=False, dataloader_num_workers=0, seed=cfg.seed)
        trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=collator, callbacks=[Clock()])
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(seen["batches"][:steps])
    print(json.dumps({"tokens_per_s": tokens / (seen["t1"] - seen["t0"]), "peak_mb": peak_rss_bytes() / 2**20,
                      "loss": losses[-1] if losses else None}))


def run_peft(name: str, steps: int) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cases", default="demo,guanaco")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return peft_child(CASES[args.child], args.steps)
    print(f"# {args.steps} optimizer steps per run, CPU, {time.strftime('%Y-%m-%d')}")
    print("| case | fourbit tok/s | PEFT+bnb Trainer tok/s | speed ratio | fourbit peak RSS | PEFT+bnb peak RSS | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.cases.split(","):
        a, b = run_fourbit(CASES[name], args.steps), run_peft(name, args.steps)
        print(f"| {name} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x "
              f"| {a['peak_mb']:.0f} MB | {b['peak_mb']:.0f} MB | {a['peak_mb'] / b['peak_mb']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
