"""The QLoRA paper's Table 3/4 comparison on real chat data, with seeds: does a fourbit 4-bit
fine-tune end as well as a 16-bit one, and as well as the same run in PEFT + bitsandbytes?

    python bench/parity.py                      # the CPU default (~1 hour on 2 cores, see DEFAULT)
    python bench/parity.py --quick              # a couple of steps per row, one seed: does it run
    python bench/parity.py --device cuda --full # the paper's setting: 1 epoch, 512-token targets, batch 16
    python bench/parity.py --report FILE        # reprint the tables from a results file

Every row trains the same model on the same tokenized data, in the same micro-batch order, for
the same steps with the same seeds, LoRA shape (r=64, alpha=16, every linear layer), lr and
batch; only the base (and, for the anchors, what is trained) changes:

    full16  16-bit full fine-tuning, every weight trained (transformers' Trainer): the upper anchor
    lora16  16-bit LoRA                    (fourbit train --quant none)
    nf4dq   QLoRA, NF4 + double quant.     (fourbit train, the paper's recipe)
    nf4     QLoRA, NF4                     (fourbit train --no-double-quant)
    fp4     QLoRA, FP4                     (fourbit train --quant fp4 --no-double-quant)
    loftq   QLoRA, NF4 + DQ + LoftQ init   (fourbit train --init loftq): beyond the paper
    peft    QLoRA, NF4 + DQ with PEFT + bitsandbytes + transformers' Trainer: what users would pick

fourbit rows run `fourbit.train` itself (its data pipeline, loss scaling, masking, dropout,
accumulation and optimizer), since the point is to catch a bug there. The Trainer rows get
fourbit's tokenized examples and micro-batches in fourbit's order (a batch sampler), AdamW with the
same hyperparameters, constant lr, clipping at 0.3, and transformers' own loss normalisation
over the accumulated batch. Every row is scored by the same code afterwards: adapters (PEFT's
too: it is the same file format) are loaded onto fourbit's base of the row's data type (the PEFT
row's base with bitsandbytes' CPU rounding, so the bytes are those it trained on), then held-out
loss on response tokens (nats/token) with fourbit.train.evaluate_loss and WikiText-2 perplexity
with fourbit.eval.perplexity. "Before" is the base model with a fresh adapter (B = 0, or the
LoftQ starting point), scored once per row.

Data (../shared/data): OASST1 user turns (oasst/oa_questions.jsonl) split BY CONVERSATION (rows
whose input starts with the same first "### Human:" turn are one conversation; 85% of the
conversations train, 15% are held out), and the 999-row Alpaca sample split 90/10; both splits are
seeded with 0, independent of the run seeds. (guanaco/openassistant_best_replies_eval.jsonl is
built from the same OASST1 split: it is not an independent test set for this training data.)

Each (seed, data set, row) runs in its own process and appends one JSON line to the results file,
so an interrupted run resumes where it stopped; lines carry a hash of the settings, and only
lines with the current settings count. Seeds vary the data order, dropout and LoRA init.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perplexity import shared_data  # noqa: E402  (bench/ is not a package)

DATA = shared_data()
SOURCES = {"oasst": DATA / "oasst" / "oa_questions.jsonl",
           "alpaca": DATA / "alpaca" / "llamafactory_alpaca_en_demo.json",
           "wikitext": DATA / "wikitext2" / "wikitext2_raw_test_joined.txt"}
ALPACA_ROWS = 999
HELD_OUT = {"oasst": 0.15, "alpaca": 0.10}  # fraction of conversations / rows held out
MARK = "PARITY_RESULT "  # the child's result line on stdout

# row -> (label, how it is trained); quant None is 16-bit
ROWS = {
    "full16": ("16-bit full fine-tuning (Trainer)", dict(kind="trainer", quant=None, double_quant=False, lora=False)),
    "lora16": ("16-bit LoRA", dict(kind="fourbit", quant=None, double_quant=False)),
    "nf4dq": ("QLoRA NF4 + DQ", dict(kind="fourbit", quant="nf4", double_quant=True)),
    "nf4": ("QLoRA NF4", dict(kind="fourbit", quant="nf4", double_quant=False)),
    "fp4": ("QLoRA FP4", dict(kind="fourbit", quant="fp4", double_quant=False)),
    "loftq": ("QLoRA NF4 + DQ + LoftQ init", dict(kind="fourbit", quant="nf4", double_quant=True, init="loftq")),
    "peft": ("QLoRA NF4 + DQ, PEFT + bnb + Trainer", dict(kind="trainer", quant="nf4", double_quant=True, lora=True)),
}


@dataclass(frozen=True)
class Settings:
    """What every row shares. Changing any field (but seeds) starts a new set of results."""

    model: str = "smollm2-135m"
    steps: int = 32  # optimizer steps per run; 0: `epochs` passes over the training split
    epochs: float = 1.0
    batch_size: int = 2  # sequences per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    lr: float = 2e-4
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    source_max_len: int = 64  # prompt tokens kept (from the right)
    target_max_len: int = 192  # response tokens kept
    gradient_checkpointing: bool = False
    heldout_max: int = 0  # held-out examples scored (0: all of them)
    wikitext_chars: int = 20_000  # WikiText-2 test characters scored (0: all)
    device: str = "cpu"
    seeds: tuple = (0, 1, 2)

    def key(self) -> str:
        d = asdict(self)
        d.pop("seeds")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# Sized on this project's 2-core CPU (see bench/RESULTS.md): 7 rows x 2 data sets x 3 seeds in about
# an hour. The dataclass defaults (32 steps of 8 sequences, 192-token targets, every held-out row)
# took over 17 minutes for one full fine-tuning run there: ~8 hours in all.
DEFAULT = Settings(steps=16, grad_accum=2, target_max_len=128, heldout_max=64, wikitext_chars=10_000)
QUICK = Settings(steps=2, batch_size=2, grad_accum=2, source_max_len=32, target_max_len=64, heldout_max=8,
                 wikitext_chars=3000, seeds=(0,))
# The paper's setting (QLoRA §5 / Guanaco): 1 epoch, batch 16 (4 x 4 accumulation), 512-token
# targets, gradient checkpointing. Prompts keep 256 tokens: these files separate prompt and
# reply, so the paper's 16-token OASST source (its whole conversation was the target) does not apply.
FULL = Settings(steps=0, epochs=1.0, batch_size=4, grad_accum=4, source_max_len=256, target_max_len=512,
                gradient_checkpointing=True, wikitext_chars=0)


# -- data -----------------------------------------------------------------------------------------
def _first_turn(text: str) -> str:
    """The first '### Human:' turn of an OASST prompt: what identifies its conversation."""
    return text.split("### Assistant:", 1)[0].strip()


def split_oasst(rows: list[dict], held_out: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with every conversation wholly on one side."""
    convs = sorted({_first_turn(r["input"]) for r in rows})
    random.Random(seed).shuffle(convs)
    held = set(convs[: round(held_out * len(convs))])
    inside = [_first_turn(r["input"]) in held for r in rows]
    return [r for r, h in zip(rows, inside) if not h], [r for r, h in zip(rows, inside) if h]


def split_rows(rows: list, held_out: float, seed: int = 0) -> tuple[list, list]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(held_out * len(rows))])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prepare_data(sources: dict, out: Path) -> dict:
    """Write each data set's train / held-out files (io format for OASST, Alpaca as it is); returns
    {name: {"train": path, "heldout": path, "counts": ...}}."""
    out.mkdir(parents=True, exist_ok=True)
    oasst = [json.loads(line) for line in Path(sources["oasst"]).read_text(encoding="utf-8").splitlines()
             if line.strip()]
    oasst = [{"input": r["input"], "output": r["output"]} for r in oasst]
    alpaca = json.loads(Path(sources["alpaca"]).read_text(encoding="utf-8"))
    if Path(sources["alpaca"]) == SOURCES["alpaca"] and len(alpaca) != ALPACA_ROWS:
        raise SystemExit(f"{sources['alpaca']}: expected the {ALPACA_ROWS}-row Alpaca sample, found {len(alpaca)} rows")
    splits = {"oasst": split_oasst(oasst, HELD_OUT["oasst"]), "alpaca": split_rows(alpaca, HELD_OUT["alpaca"])}
    files = {}
    for name, (train, held) in splits.items():
        files[name] = {"counts": {"train": len(train), "heldout": len(held)}}
        for part, rows in (("train", train), ("heldout", held)):
            path = out / f"{name}-{part}.jsonl"
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            tmp.replace(path)
            files[name][part] = str(path)
    if sources["oasst"] == SOURCES["oasst"]:
        n_conv = len({_first_turn(r["input"]) for r in oasst})
        files["oasst"]["counts"]["conversations"] = n_conv
    return files


# -- one run (in its own process) -----------------------------------------------------------------
def train_config(row: str, s: Settings, seed: int, data_file: str, out: Path):
    """The fourbit TrainConfig of a row; the Trainer rows read their data and batches through it too."""
    from fourbit.train import TrainConfig

    how = ROWS[row][1]
    return TrainConfig(model=s.model, data=data_file, output=str(out), quant=how["quant"] or "none",
                       double_quant=how["double_quant"], init=how.get("init", "default"),
                       max_steps=s.steps if s.steps > 0 else -1, epochs=s.epochs, batch_size=s.batch_size,
                       grad_accum=s.grad_accum, lr=s.lr, schedule="constant", warmup_steps=0, weight_decay=0.0,
                       adam_beta2=0.999, max_grad_norm=0.3, optim="adamw", r=s.r, alpha=s.alpha, dropout=s.dropout,
                       source_max_len=s.source_max_len, target_max_len=s.target_max_len, group_by_length=True,
                       gradient_checkpointing=s.gradient_checkpointing, eval_size=0, save_steps=0,
                       save_total_limit=1, seed=seed, overwrite=True, device=s.device)


def load_base(row: str, s: Settings):
    """fourbit's model of the row's data type (+ the fresh adapter "before" training means)."""
    from fourbit.models import load_model

    how = ROWS[row][1]
    rounding = "bnb-cpu" if row == "peft" and s.device == "cpu" else "nearest"  # the bytes the PEFT row trained on
    model, tok = load_model(s.model, quant=how["quant"], double_quant=how["double_quant"], device=s.device,
                            rounding=rounding)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def heldout_examples(path: str, tok, s: Settings) -> list:
    from fourbit import data as D

    examples, _ = D.load_examples(path)
    held, _ = D.tokenize_examples(examples, tok, s.source_max_len, s.target_max_len)
    return held[: s.heldout_max] if s.heldout_max else held


def score(model, tok, held: list, text: str, s: Settings) -> dict:
    """Held-out loss on response tokens (fourbit.train.evaluate_loss) and WikiText-2 perplexity."""
    import torch

    from fourbit.eval import perplexity
    from fourbit.train import Data, TrainConfig, evaluate_loss

    model.eval()
    cfg = TrainConfig(batch_size=4, loss_chunk=512)
    loss = evaluate_loss(model, Data(train=[], eval=held, eval_raw=[], report=None, pad_id=tok.pad_token_id),
                         cfg, torch.device(s.device))
    wiki = perplexity(model, tok, text, 1024, device=s.device, progress=False)  # windows of 1024, no overlap
    return {"loss": loss, "ppl": math.exp(loss), "wikitext_ppl": wiki.perplexity, "wikitext_tokens": wiki.tokens}


def fresh_adapter(model, row: str, s: Settings):
    """The adapter a run starts from: B = 0 (the base's own output), or LoftQ's starting point."""
    from fourbit.nn import add_lora

    if ROWS[row][1].get("init") == "loftq":
        from perplexity import add_loftq

        return add_loftq(model, s.model, s.r, s.alpha)
    if ROWS[row][1].get("lora", True):
        return add_lora(model, r=s.r, alpha=s.alpha, dropout=0.0, verbose=False)
    return model


def run_fourbit(row: str, s: Settings, seed: int, data_file: str, out: Path) -> dict:
    from fourbit.train import train

    result = train(train_config(row, s, seed, data_file, out))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"train_loss": result.final_loss, "steps": result.steps, "tokens": last["tokens"],
            "loop_seconds": round(last["tokens"] / last["tokens_per_s"], 1)}  # the optimizer steps alone


def run_trainer(row: str, s: Settings, seed: int, data_file: str, out: Path):
    """PEFT + bitsandbytes (or the 16-bit model, every weight trained) with transformers' Trainer,
    fed fourbit's tokenized examples in fourbit's micro-batch order. Returns (info, trained model or None)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from fourbit.data import collate
    from fourbit.models import resolve_source
    from fourbit.train import epoch_batches, setup_data

    how = ROWS[row][1]
    cfg = train_config(row, s, seed, data_file, out)
    src = resolve_source(s.model)
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    data = setup_data(cfg, tok)
    per_epoch = len(epoch_batches(data, cfg, 0))
    steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    batches, epoch = [], 0
    while len(batches) < steps * cfg.grad_accum:  # fourbit's fit walks the epochs' batches in this order
        batches += epoch_batches(data, cfg, epoch)
        epoch += 1
    batches = batches[: steps * cfg.grad_accum]
    cuda = s.device.startswith("cuda")
    compute = torch.bfloat16 if cuda else torch.float32
    kw = dict(dtype=compute if how["lora"] else torch.float32, device_map=s.device)
    if how["quant"]:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=how["quant"],
                                                       bnb_4bit_use_double_quant=how["double_quant"],
                                                       bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(src, **kw)
    torch.manual_seed(seed)  # LoRA init
    if how["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        if s.gradient_checkpointing:
            model.enable_input_require_grads()

    class Ordered(Trainer):
        def get_train_dataloader(self):
            return self.accelerator.prepare(DataLoader(data.train, batch_sampler=batches,
                                                       collate_fn=lambda rows: collate(rows, data.pad_id)))

    fields = TrainingArguments.__dataclass_fields__  # renamed in transformers 5.x
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=cfg.batch_size,
                             gradient_accumulation_steps=cfg.grad_accum, max_steps=steps, learning_rate=cfg.lr,
                             lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
                             adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm,
                             **{ckpt: s.gradient_checkpointing}, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=not cuda, bf16=cuda, remove_unused_columns=False,
                             dataloader_num_workers=0, seed=seed, data_seed=seed, disable_tqdm=True)
    trainer = Ordered(model=model, args=args, train_dataset=data.train)
    metrics = trainer.train().metrics
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {"train_loss": losses[-1] if losses else None, "steps": trainer.state.global_step,
            "loop_seconds": round(metrics["train_runtime"], 1)}
    if how["lora"]:
        model.save_pretrained(out)  # PEFT's adapter files; scored on fourbit's base like every row
        return info, None
    return info, model


def child(spec: dict) -> dict:
    """One (seed, data set, row): score the fresh model (first seed only), train, score again."""
    import torch

    from fourbit.models import load_tokenizer_from, resolve_source
    from fourbit.nn import load_adapter

    s = Settings(**{**spec["settings"], "seeds": tuple(spec["settings"]["seeds"])})
    row, seed, out = spec["row"], spec["seed"], Path(spec["out"])
    text = Path(spec["wikitext"]).read_text(encoding="utf-8")[: s.wikitext_chars or None]
    res = {"key": s.key(), "dataset": spec["dataset"], "row": row, "seed": seed, "device": s.device,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    t0, cpu0 = time.perf_counter(), time.process_time()
    if spec["before"]:
        model, tok = load_base(row, s)
        held = heldout_examples(spec["heldout"], tok, s)
        res["before"] = score(fresh_adapter(model, row, s), tok, held, text, s)
        del model
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    if ROWS[row][1]["kind"] == "fourbit":
        res.update(run_fourbit(row, s, seed, spec["train"], out))
        trained = None
    else:
        info, trained = run_trainer(row, s, seed, spec["train"], out)
        res.update(info)
    res["train_seconds"], res["before_seconds"] = round(time.perf_counter() - t1, 1), round(t1 - t0, 1)
    if trained is not None:  # full fine-tuning: the trained 16-bit model itself
        model, tok = trained.to(s.device), load_tokenizer_from(resolve_source(s.model))
    else:
        model, tok = load_base(row, s)
        load_adapter(model, out)
    held = heldout_examples(spec["heldout"], tok, s)
    res["after"] = score(model, tok, held, text, s)
    res["heldout_examples"], res["seconds"] = len(held), round(time.perf_counter() - t0, 1)
    res["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # all threads: sizes runs on a busy machine
    shutil.rmtree(out)  # this run's scratch (adapter, optimizer state: ~250 MB at r=64); the result is the line
    return res


# -- orchestration --------------------------------------------------------------------------------
def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that run is redone
                print(f"warning: {path}:{i} is not JSON (an interrupted write?); ignored", file=sys.stderr)
    return rows


def run_one(spec: dict, in_process: bool) -> dict | None:
    if in_process:
        return child(spec)
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith(MARK)]
    if r.returncode or not lines:
        print(f"  FAILED (exit {r.returncode}):\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(MARK):])


def run_all(s: Settings, rows: list[str], datasets: list[str], results: Path, sources: dict,
            in_process: bool = False) -> list[dict]:
    """Every missing (seed, data set, row), seeds outermost (an interrupted run leaves whole tables)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    files = prepare_data(sources, results.parent / "data")
    done = {(r["dataset"], r["row"], r["seed"]) for r in read_results(results) if r.get("key") == s.key()}
    for name in datasets:
        print(f"{name}: {files[name]['counts']}", flush=True)
    for i, seed in enumerate(s.seeds):
        for name in datasets:
            for row in rows:
                if (name, row, seed) in done:
                    continue
                spec = {"settings": {**asdict(s), "seeds": list(s.seeds)}, "dataset": name, "row": row, "seed": seed,
                        "before": i == 0, "train": files[name]["train"], "heldout": files[name]["heldout"],
                        "wikitext": str(sources["wikitext"]),
                        "out": str(results.parent / "runs" / f"{s.key()}-{name}-{row}-{seed}")}
                t = time.perf_counter()
                print(f"seed {seed} {name} {row} ...", end=" ", flush=True)
                res = run_one(spec, in_process)
                if res is None:
                    continue
                with open(results, "a") as f:  # one line per run, written whole
                    f.write(json.dumps(res) + "\n")
                print(f"held-out loss {res['after']['loss']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return read_results(results)


# -- the tables -----------------------------------------------------------------------------------
def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def compare(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean(a) - mean(b), its standard error from the seeds' spread; None with fewer than 2 seeds each)."""
    d = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return d, None
    return d, math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def verdict(a: list[float], b: list[float], what: str) -> str:
    d, se = compare(a, b)
    if se is None:
        return f"{what}: {d:+.4f} nats/token (one seed: no noise estimate)"
    if abs(d) <= 2 * se:
        return f"{what}: {d:+.4f} nats/token, within seed noise (2 SE = {2 * se:.4f})"
    return f"{what}: {d:+.4f} nats/token, {'WORSE' if d > 0 else 'better'} beyond seed noise (2 SE = {2 * se:.4f})"


def _relation(a: list[float], b: list[float]) -> str:
    """How held-out loss a stands to b, in words (lower loss is better)."""
    d, se = compare(a, b)
    if se is None:
        return f"differs by {d:+.4f} nats/token (one seed: noise unknown) from"
    if abs(d) <= 2 * se:
        return f"matches (within seed noise, {d:+.4f} nats/token)"
    return f"is {'worse' if d > 0 else 'better'} by {abs(d):.4f} nats/token (beyond 2 SE = {2 * se:.4f}) than"


def report(results: list[dict], key: str | None = None) -> str:
    """One table per data set (rows in ROWS order) and the conclusions, for the settings `key`
    (default: the settings of the newest line)."""
    if not results:
        return "no results"
    key = key or results[-1]["key"]
    results = [r for r in results if r["key"] == key]
    out = [f"settings {key}: {len(results)} runs, device {results[0]['device']}, "
           f"{min(r['date'] for r in results)} .. {max(r['date'] for r in results)}"]
    for name in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == name]
        by_row = {row: [r for r in runs if r["row"] == row] for row in ROWS if any(r["row"] == row for r in runs)}
        seeds = sorted({r["seed"] for r in runs})
        held = runs[0]["heldout_examples"]
        out += ["", f"### {name}: held-out loss on response tokens (nats/token) and perplexity; mean ± std over "
                    f"seeds {seeds}; {held} held-out examples",
                "| base / method | loss before | loss after | ppl before | ppl after | WikiText-2 ppl before | "
                "WikiText-2 ppl after | seeds | s/run |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row, rs in by_row.items():
            before = [r["before"] for r in rs if "before" in r]
            out.append(f"| {ROWS[row][0]} | {_ms([b['loss'] for b in before], 4)} "
                       f"| {_ms([r['after']['loss'] for r in rs], 4)} "
                       f"| {_ms([b['ppl'] for b in before], 2)} | {_ms([r['after']['ppl'] for r in rs], 2)} "
                       f"| {_ms([b['wikitext_ppl'] for b in before], 2)} "
                       f"| {_ms([r['after']['wikitext_ppl'] for r in rs], 2)} | {len(rs)} "
                       f"| {statistics.mean(r['seconds'] for r in rs):.0f} |")
        out += ["", *conclusions(by_row)]
    return "\n".join(out)


def conclusions(by_row: dict) -> list[str]:
    """The comparisons the paper makes, in words, whatever they say."""
    after = {row: [r["after"]["loss"] for r in rs] for row, rs in by_row.items()}
    before = {row: [r["before"]["loss"] for r in rs if "before" in r] for row, rs in by_row.items()}
    lines = []
    pairs = [("nf4dq", "peft", "fourbit NF4 + DQ vs PEFT + bitsandbytes NF4 + DQ (held-out loss after)"),
             ("nf4dq", "lora16", "QLoRA NF4 + DQ vs 16-bit LoRA"),
             ("nf4dq", "full16", "QLoRA NF4 + DQ vs 16-bit full fine-tuning"),
             ("lora16", "full16", "16-bit LoRA vs 16-bit full fine-tuning"),
             ("fp4", "nf4dq", "FP4 vs NF4 + DQ"), ("nf4", "nf4dq", "NF4 vs NF4 + DQ"),
             ("loftq", "nf4dq", "LoftQ init vs NF4 + DQ, after training"),
             ("loftq", "lora16", "LoftQ init vs 16-bit LoRA, after training")]
    head = []
    if after.get("nf4dq") and after.get("lora16"):
        head.append(f"QLoRA NF4 + DQ {_relation(after['nf4dq'], after['lora16'])} 16-bit LoRA after training")
    if after.get("nf4dq") and after.get("peft"):
        agree = _relation(after["nf4dq"], after["peft"])
        head.append(f"fourbit's NF4 + DQ run {agree} PEFT + bitsandbytes' same run" +
                    ("" if agree.startswith(("matches", "differs")) else ": a difference beyond seed noise is a bug "
                                                                         "to find"))
    if head:
        lines.append("**Conclusion: " + "; ".join(head) + ".**")
    for a, b, what in pairs:
        if after.get(a) and after.get(b):
            lines.append(f"- {verdict(after[a], after[b], what)}")
    if before.get("loftq") and before.get("nf4dq") and before.get("lora16"):
        gap = statistics.mean(before["nf4dq"]) - statistics.mean(before["lora16"])
        closed = statistics.mean(before["nf4dq"]) - statistics.mean(before["loftq"])
        lines.append(f"- before training, NF4 + DQ costs {gap:+.4f} nats/token against 16-bit; LoftQ init recovers "
                     f"{closed:+.4f} of it ({closed / gap:.0%})" if gap else "- before training NF4 + DQ = 16-bit")
    for row, rs in by_row.items():
        b = [r["before"]["wikitext_ppl"] for r in rs if "before" in r]
        a = [r["after"]["wikitext_ppl"] for r in rs]
        if b:
            lines.append(f"- {ROWS[row][0]}: WikiText-2 perplexity {statistics.mean(b):.2f} -> "
                         f"{statistics.mean(a):.2f} ({statistics.mean(a) / statistics.mean(b) - 1:+.1%}) after fine-tuning")
    return lines


# -- command line -----------------------------------------------------------------------------------
def settings_from(args) -> Settings:
    base = QUICK if args.quick else FULL if args.full else DEFAULT
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)
            if getattr(args, f.name, None) is not None}
    if "seeds" in over:
        over["seeds"] = tuple(int(x) for x in over["seeds"].split(","))
    return dataclasses.replace(base, **over)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a couple of steps per row, one seed (does it run?)")
    ap.add_argument("--full", action="store_true", help="the paper's setting (1 epoch, batch 16, 512-token targets)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--datasets", default="oasst,alpaca")
    ap.add_argument("--results", default=None, help="JSON-lines results file (default runs/parity/<mode>.jsonl)")
    ap.add_argument("--report", default=None, metavar="FILE", help="print the tables of a results file and exit")
    ap.add_argument("--oasst", default=str(SOURCES["oasst"]))
    ap.add_argument("--alpaca", default=str(SOURCES["alpaca"]))
    ap.add_argument("--wikitext", default=str(SOURCES["wikitext"]))
    ap.add_argument("--in-process", action="store_true", help="run every row in this process (tests only)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):  # every shared setting can be overridden
        kind = str if f.name == "seeds" else (lambda v: v.lower() in ("1", "true", "yes")) if f.type == "bool" \
            else type(f.default)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None,
                        help=f"(default {getattr(DEFAULT, f.name)}; seeds: comma-separated)")
    args = ap.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.report:
        print(report(read_results(Path(args.report))))
        return 0
    s = settings_from(args)
    mode = "quick" if args.quick else "full" if args.full else "default"
    results = Path(args.results or f"runs/parity/{mode}.jsonl")
    rows, datasets = args.rows.split(","), args.datasets.split(",")
    unknown = [r for r in rows if r not in ROWS] + [d for d in datasets if d not in HELD_OUT]
    if unknown:
        ap.error(f"unknown rows/data sets {unknown}; rows: {', '.join(ROWS)}; data sets: {', '.join(HELD_OUT)}")
    sources = {"oasst": Path(args.oasst), "alpaca": Path(args.alpaca), "wikitext": Path(args.wikitext)}
    print(f"# bench/parity.py {mode}: {s}\n# results: {results}", flush=True)
    print(report(run_all(s, rows, datasets, results, sources, args.in_process), s.key()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
