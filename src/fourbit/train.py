"""`fourbit train`: QLoRA instruction tuning, setup -> fit -> evaluate, in plain functions.

The defaults are the paper's recipe (QLoRA §5 and Appendix B.2): NF4 + double quantization, LoRA r=64
alpha=16 on every linear layer, paged AdamW, lr 2e-4, constant schedule, max grad norm 0.3,
Adam beta2 0.999, batch 16 as 1 x 16 accumulation, gradient checkpointing, group by length, loss
on responses only. With `--data builtin` (the default) a demo preset sized for a laptop CPU
overrides the flags you did not give (see DEMO_PRESET), so `fourbit train` with no arguments
fine-tunes the embedded SmolLM2-135M-Instruct on fourbit's built-in task in minutes and prints
the held-out score before and after. The command (fourbit.commands.train) applies the preset;
`train(cfg)` runs exactly the config it is given.

Runs are resumable bit for bit: checkpoints (fourbit.checkpoint) hold the adapter, optimizer,
scheduler, RNG and data position, and `--resume` continues from the newest one. The loss is a
sum over labelled tokens divided by the accumulated batch's token count (fourbit.loss), so
gradient accumulation equals one big batch. A NaN/Inf loss stops the run, naming the step, and
keeps the last good checkpoint.

Refused on purpose: a callback framework, mixed-precision scalers (bf16 needs none), and
"resume from any step" without a checkpoint (we replay nothing).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fourbit.config import option
from fourbit.data import FORMATS, iter_jsonl
from fourbit.data.formats import BAD_ROW_POLICIES
from fourbit.errors import UserError
from fourbit.models import QUANT_CHOICES, ModelArgs
from fourbit.models.load import choice_problems
from fourbit.optim import OPTIMIZERS
from fourbit.quant import DTYPES

SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """Everything a run needs; each field is a `fourbit train` flag (--max-steps or --max_steps)."""

    model: str = option(ModelArgs, "model")
    data: str = field(default="builtin", metadata={"help": "dataset file/directory/hub name, or 'builtin' (fourbit's demo task)"})
    format: str = field(default="auto", metadata={"help": f"auto or one of {', '.join(FORMATS)}"})
    output: str = field(default="runs/fourbit", metadata={"help": "run directory: checkpoints, adapter, metrics, plots"})
    quant: str = option(ModelArgs, "quant")
    double_quant: bool = option(ModelArgs, "double_quant")
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps to run; -1: as many as --epochs gives"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data (when --max-steps is -1)"})
    batch_size: int = field(default=1, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=16, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    schedule: str = field(default="constant", metadata={"help": "constant, cosine or linear (after warmup)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    max_grad_norm: float = field(default=0.3, metadata={"help": "clip the global gradient norm to this (0: off)"})
    optim: str = field(default="paged_adamw", metadata={"help": f"one of {', '.join(OPTIMIZERS)}"})
    r: int = field(default=64, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    init: str = field(default="default", metadata={"help": "LoRA init: default (B = 0) or loftq (from the SVD of the "
                                                           "4-bit quantization error; reads the 16-bit weights)"})
    target: str = field(default="all-linear", metadata={"help": "all-linear, or comma-separated module names (q_proj,v_proj)"})
    source_max_len: int = field(default=512, metadata={"help": "max prompt tokens (longer prompts are cut from the left)"})
    target_max_len: int = field(default=512, metadata={"help": "max response tokens (longer responses are cut)"})
    train_on_inputs: bool = field(default=False, metadata={"help": "also train on prompt tokens"})
    group_by_length: bool = field(default=True, metadata={"help": "batch sequences of similar length together"})
    packing: bool = field(default=False, metadata={"help": "pack several examples into each sequence"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward (less memory)"})
    eval_size: float = field(default=0.02, metadata={"help": "held-out examples: a fraction (<1) or a count (>=1)"})
    eval_steps: int = field(default=0, metadata={"help": "eval loss every N steps (0: at the end only)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints to keep"})
    logging_steps: int = field(default=1, metadata={"help": "write metrics every N steps"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, dropout, LoRA init)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --output"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing run in --output and start over"})
    on_bad_row: str = field(default="skip", metadata={"help": f"{' or '.join(BAD_ROW_POLICIES)} on rows with "
                                                              f"missing/empty fields"})
    max_examples: int = field(default=0, metadata={"help": "use at most this many training examples (0: all)"})
    device: str | None = option(ModelArgs, "device")
    compute_dtype: str | None = option(ModelArgs, "dtype")
    loss_chunk: int = field(default=512, metadata={"help": "labelled tokens per lm_head chunk in the loss (0: full logits)"})
    score_examples: int = field(default=32, metadata={"help": "builtin task: held-out examples scored before/after"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    dist_timeout: float = field(default=600.0, metadata={"help": "seconds a rank waits for the others (torchrun runs) "
                                                                 "before failing"})
    fsdp: bool = field(default=False, metadata={"help": "torchrun runs: shard the 4-bit base, adapters and optimizer "
                                                        "states across the processes (FSDP2) instead of a copy each"})

    def validate(self) -> list[str]:
        p = choice_problems(self.quant, QUANT_CHOICES, "--quant")
        p += choice_problems(self.optim, OPTIMIZERS, "--optim")
        p += choice_problems(self.schedule, SCHEDULES, "--schedule")
        p += choice_problems(self.format, ("auto", *FORMATS), "--format")
        p += choice_problems(self.on_bad_row, BAD_ROW_POLICIES, "--on-bad-row")
        p += choice_problems(self.compute_dtype, (None, *DTYPES), "--compute-dtype")
        for name in ("batch_size", "grad_accum", "r", "source_max_len", "target_max_len", "logging_steps"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_steps", "save_steps", "max_examples", "weight_decay", "max_grad_norm",
                     "save_total_limit", "loss_chunk", "threads"):
            if getattr(self, name) < 0:
                p.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            p.append(f"--max-steps must be -1 (use --epochs) or >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            p.append(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            p.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.adam_beta2 < 1:
            p.append(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if self.eval_size < 0:
            p.append(f"--eval-size must be >= 0, got {self.eval_size}")
        if self.init not in ("default", "loftq"):
            p.append(f"--init must be default or loftq, got {self.init!r}")
        elif self.init == "loftq" and self.quant == "none":
            p.append("--init loftq starts from the 4-bit quantization error; with --quant none there is none")
        if self.resume and self.overwrite:
            p.append("--resume and --overwrite contradict each other; pick one")
        return p


# The demo: the flags `fourbit train --data builtin` uses unless given on the command line.
# Sized by measurement: the held-out score goes 0% -> ~97% in 40 steps and the loss is < 0.01
# after 12; 20 steps reached 87.5%, so 24 steps of 8 examples (~3-4 minutes on 2 CPU cores).
DEMO_PRESET = dict(output="runs/demo", max_steps=24, batch_size=8, grad_accum=1, lr=1e-3, r=16, alpha=32,
                   dropout=0.0, eval_steps=10, save_steps=10, source_max_len=96, target_max_len=48,
                   gradient_checkpointing=False, eval_size=32)


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    score_before: float | None
    score_after: float | None
    summary: dict


# -- setup ----------------------------------------------------------------------------------------
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_output(cfg: TrainConfig) -> Path:
    """Refuse to write over another run unless --resume or --overwrite (checked by every rank;
    rank 0 alone clears and creates the directory)."""
    from fourbit import distributed as dd

    out = Path(cfg.output)
    has_run = out.exists() and any(out.iterdir())
    if has_run and not (cfg.resume or cfg.overwrite):
        raise UserError(f"output directory {out} already holds files (another run?); pass --resume to continue it "
                        f"or --overwrite to start over")
    if cfg.resume and not has_run:
        raise UserError(f"--resume: {out} holds no run to resume")
    dd.barrier()  # everyone has looked before rank 0 changes anything
    if dd.is_main():
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    dd.barrier()
    return out


def build_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(cfg: TrainConfig, params):
    from fourbit.optim import build_optimizer as build

    return build(cfg.optim, params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2))


def setup_model(cfg: TrainConfig, device: torch.device):
    from fourbit.models import checkpoint_weight_reader, load_model, parse_dtype
    from fourbit.nn import add_lora

    model, tok = load_model(cfg.model, quant=cfg.quant, double_quant=cfg.double_quant,
                            compute_dtype=parse_dtype(cfg.compute_dtype), device=device)
    if tok is None:
        raise UserError(f"model {cfg.model} has no tokenizer files; fourbit train needs a tokenizer to read the data")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    targets = "all-linear" if cfg.target == "all-linear" else [t.strip() for t in cfg.target.split(",") if t.strip()]
    torch.manual_seed(cfg.seed)  # LoRA init depends only on the seed
    init = "default" if cfg.resume else cfg.init  # a resumed run's adapter comes from its checkpoint
    weights = checkpoint_weight_reader(cfg.model, model) if init == "loftq" else None
    add_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target=targets,
             gradient_checkpointing=cfg.gradient_checkpointing, verbose=False, init=init, weights=weights)
    model.lora_config.base_model_name_or_path = cfg.model
    return model, tok


# -- data -----------------------------------------------------------------------------------------
@dataclass
class Data:
    train: list  # tokenized examples: dicts with input_ids, labels
    eval: list
    eval_raw: list  # held-out examples before tokenization (for generation-based scores)
    report: object  # fourbit.data's report: used / skipped / truncated
    pad_id: int


def setup_data(cfg: TrainConfig, tokenizer) -> Data:
    from fourbit import data as D

    examples, report = D.load_examples(cfg.data, format=cfg.format, on_bad_row=cfg.on_bad_row)
    train_raw, eval_raw = D.split_eval(examples, cfg.eval_size, seed=cfg.seed)
    if cfg.max_examples:
        train_raw = train_raw[: cfg.max_examples]
    train, stats = D.tokenize_examples(train_raw, tokenizer, cfg.source_max_len, cfg.target_max_len,
                                       train_on_inputs=cfg.train_on_inputs, report=report)
    held, _ = D.tokenize_examples(eval_raw, tokenizer, cfg.source_max_len, cfg.target_max_len,
                                  train_on_inputs=cfg.train_on_inputs)
    if not train:
        raise UserError(f"no training examples left from {cfg.data}: {report.summary()}")
    if cfg.packing:
        train = D.pack_examples(train, cfg.source_max_len + cfg.target_max_len)
    return Data(train=train, eval=held, eval_raw=eval_raw, report=report, pad_id=tokenizer.pad_token_id)


def epoch_batches(data: Data, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches (lists of example indices) of one epoch: a pure function of (seed, epoch)."""
    from fourbit import data as D

    from fourbit import distributed as dd

    lengths = [len(e["input_ids"]) for e in data.train]  # global micro-batches: batch_size x world examples
    batches = D.batch_order(lengths, cfg.batch_size * dd.world(), seed=cfg.seed, epoch=epoch,
                            group_by_length=cfg.group_by_length)
    # a short last batch with fewer examples than ranks would leave a rank without data: dropped
    return [b for b in batches if len(b) >= dd.world()]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -- the loop -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_loss(model, data: Data, cfg: TrainConfig, device: torch.device) -> float | None:
    from fourbit import data as D
    from fourbit.loss import causal_lm_loss

    from fourbit import distributed as dd

    if not data.eval:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    sharded = dd.is_sharded(model)  # sharded: every forward is a collective, so every rank scores everything
    mine = data.eval if sharded else data.eval[dd.rank()::dd.world()]  # else each rank scores its share
    for i in range(0, len(mine), cfg.batch_size):
        b = to_device(D.collate(mine[i:i + cfg.batch_size], data.pad_id), device)
        loss_sum, n = causal_lm_loss(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                                     b.get("position_ids"), num_tokens=1, chunk=cfg.loss_chunk or None)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    if sharded:
        return total / max(count, 1)
    return dd.sum_scalar(total, device) / max(dd.sum_scalar(count, device), 1)


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    from fourbit.models import peak_rss_bytes

    return peak_rss_bytes()


def fit(model, data: Data, cfg: TrainConfig, out: Path, device: torch.device, optimizer, scheduler,
        start: dict, total_steps: int, log) -> dict:
    """Run optimizer steps start["step"]..total_steps; returns the final trainer state."""
    from tqdm.auto import tqdm

    from fourbit import data as D
    from fourbit import distributed as dd
    from fourbit.checkpoint import list_checkpoints, save_checkpoint
    from fourbit.loss import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    sharded = dd.is_sharded(model)  # FSDP2 reduce-scatters the gradients itself
    step, epoch, cursor = start["step"], start["epoch"], start["cursor"]
    batches = epoch_batches(data, cfg, epoch)
    base_tokens, tokens_seen = start.get("tokens", 0), 0  # tokens: all ranks, all sessions; tokens_seen: ours
    t0, last_loss = time.perf_counter(), float("nan")
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not dd.is_main())
    model.train()
    while step < total_steps:
        micro = []
        for _ in range(cfg.grad_accum):  # the data for one optimizer step
            if cursor >= len(batches):
                epoch, cursor = epoch + 1, 0
                batches = epoch_batches(data, cfg, epoch)
            micro.append(D.collate([data.train[i] for i in dd.my_share(batches[cursor])], data.pad_id))
            cursor += 1
        # the token count of the whole (accumulated, all-rank) batch: see Note: Exactly one big batch
        n_tokens = int(dd.sum_scalar(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), device))
        loss_sum = 0.0
        for b in micro:
            b = to_device(b, device)
            loss, _ = causal_lm_loss(model, b["input_ids"], b["labels"], b.get("attention_mask"),
                                     b.get("position_ids"), num_tokens=max(n_tokens, 1), chunk=cfg.loss_chunk or None)
            loss.backward()
            loss_sum += float(loss.detach())
            tokens_seen += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
        loss_sum = dd.sum_scalar(loss_sum, device)  # every rank sees the same loss (and NaN)
        if not sharded:
            dd.sum_gradients(params)
        if not math.isfinite(loss_sum):
            kept = list_checkpoints(out)
            raise UserError(f"the loss became {loss_sum} at step {step + 1}; stopped without saving this step. "
                            f"Last good checkpoint: {kept[-1] if kept else 'none'}. Try a lower --lr or check the data.")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = loss_sum
        elapsed = time.perf_counter() - t0
        all_tokens = base_tokens + int(dd.sum_scalar(tokens_seen, device))  # every rank's tokens
        row = {"step": step, "loss": round(loss_sum, 6), "lr": scheduler.get_last_lr()[0],
               "grad_norm": round(float(grad_norm), 6), "tokens": all_tokens, "epoch": epoch,
               "tokens_per_s": round((all_tokens - base_tokens) / max(elapsed, 1e-9), 1),
               "memory_mb": round(memory_bytes(device) / 2**20)}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            row["eval_loss"] = evaluate_loss(model, data, cfg, device)
        if (step % cfg.logging_steps == 0 or "eval_loss" in row) and dd.is_main():
            log(row)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                        mem=f"{row['memory_mb']}MB")
        bar.update(1)
        state = {"epoch": epoch, "cursor": cursor, "tokens": all_tokens, "config": asdict(cfg)}
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            save_checkpoint(out, step, model, optimizer, scheduler, state, keep=cfg.save_total_limit)
    bar.close()
    state = {"epoch": epoch, "cursor": cursor, "tokens": base_tokens + int(dd.sum_scalar(tokens_seen, device)),
             "config": asdict(cfg), "loss": last_loss}
    save_checkpoint(out, step, model, optimizer, scheduler, state, keep=cfg.save_total_limit)
    return {"step": step, **state}


class MetricsLog:
    """metrics.jsonl (appended, flushed per row; truncated to the resume step) + TensorBoard when installed."""

    def __init__(self, out: Path, resume_step: int):
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # drop rows written after the checkpoint we resume from
            keep = [row for _, row in iter_jsonl(self.path) if row.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))
        self.f = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def __call__(self, row: dict) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(out: Path) -> Path | None:
    """loss.png from metrics.jsonl (training loss, and eval loss where measured); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [row for _, row in iter_jsonl(out / "metrics.jsonl")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    ev = [r for r in rows if r.get("eval_loss") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the built-in task's score --------------------------------------------------------------------
@torch.no_grad()
def builtin_score(model, tokenizer, examples: list, device: torch.device, n: int) -> float:
    """Exact-match score of greedy answers on held-out built-in examples (fourbit.data.builtin)."""
    from fourbit import data as D
    from fourbit.generate import generate_batch

    sample = examples[:n]
    prompts = [D.prompt_text(e, tokenizer) for e in sample]
    answers = generate_batch(model, tokenizer, prompts, max_new_tokens=24, batch_size=16, device=device,
                             chat_template=False)  # an answer is ~16 tokens
    return D.score_builtin(answers, [D.reference_answer(e) for e in sample])


# -- orchestration --------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """setup -> (score before) -> fit -> eval -> save adapter, summary, plot -> (score after).

    Under torchrun every rank runs this; rank 0 alone prints, scores and writes (fourbit.distributed)."""
    from fourbit import distributed as dd

    dist_device = dd.init(cfg.dist_timeout)
    try:
        return _train(cfg, dist_device)
    finally:
        dd.shutdown()


def _train(cfg: TrainConfig, dist_device: torch.device | None) -> TrainResult:
    from fourbit import distributed as dd
    from fourbit.checkpoint import list_checkpoints, load_checkpoint
    from fourbit.nn import save_adapter, trainable_summary

    main = dd.is_main()
    say = print if main else (lambda *a, **k: None)
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = dist_device or _device(cfg)
    out = prepare_output(cfg)
    seed_everything(cfg.seed)
    model, tok = setup_model(cfg, device)  # same LoRA init on every rank (seeded)
    if cfg.fsdp:
        if dd.world() < 2:
            raise UserError("--fsdp shards the model across processes: launch with torchrun --nproc-per-node N (N >= 2)")
        dd.shard_model(model)
    scores_everywhere = cfg.fsdp  # generation on a sharded model needs every rank
    torch.manual_seed(cfg.seed + dd.rank())  # dropout differs per rank, like separate data
    data = setup_data(cfg, tok)
    per_epoch = len(epoch_batches(data, cfg, 0))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = build_schedule(optimizer, cfg, total)
    start = {"step": 0, "epoch": 0, "cursor": 0, "tokens": 0}
    is_builtin = cfg.data == "builtin"
    score_before = None
    if cfg.resume:
        ckpts = list_checkpoints(out)
        if not ckpts:
            raise UserError(f"--resume: {out} has no complete checkpoint-<step> directory to resume from")
        start = load_checkpoint(ckpts[-1], model, optimizer, scheduler)
        score_before = start.get("score_before")
        say(f"resuming from {ckpts[-1]} (step {start['step']} of {total})")
    elif is_builtin and (main or scores_everywhere):
        score_before = builtin_score(model, tok, data.eval_raw, device, cfg.score_examples)
        say(f"held-out score before training: {score_before:.1%}")
    say(trainable_summary(model))
    say(f"data: {data.report.summary()}; {len(data.train)} train / {len(data.eval)} held-out examples, "
        f"{per_epoch} micro-batches per epoch, {total} optimizer steps" +
        (f", {dd.world()} processes" if dd.world() > 1 else ""))
    log = None
    if main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        log = MetricsLog(out, start["step"])
    try:
        start["score_before"] = score_before
        final = fit(model, data, cfg, out, device, optimizer, scheduler, start, total, log)
    finally:
        if log is not None:
            log.close()
    eval_loss = evaluate_loss(model, data, cfg, device)
    save_adapter(model, out, base_model_name_or_path=cfg.model)  # every rank joins (sharded: a gather); rank 0 writes
    score_after = None
    if is_builtin and (main or scores_everywhere):
        score_after = builtin_score(model, tok, data.eval_raw, device, cfg.score_examples)
    summary = {
        "steps": final["step"], "final_loss": final.get("loss"), "eval_loss": eval_loss,
        "score_before": score_before, "score_after": score_after, "examples": data.report.as_dict(),
        "train_examples": len(data.train), "eval_examples": len(data.eval), "tokens": final["tokens"],
        "trainable": trainable_summary(model), "seconds": round(time.perf_counter() - t_start, 1),
        "peak_memory_mb": round(memory_bytes(device) / 2**20), "device": str(device), "processes": dd.world(),
    }
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot = plot_losses(out)
        say(f"done: {summary['steps']} steps in {summary['seconds']} s, final loss {summary['final_loss']:.4f}, "
            f"eval loss {eval_loss if eval_loss is None else round(eval_loss, 4)}, peak memory "
            f"{summary['peak_memory_mb']} MB; adapter in {out}" + (f", plot {plot}" if plot else ""))
        if is_builtin:
            say(f"held-out score: {score_before:.1%} before -> {score_after:.1%} after training")
            say(f"try it: fourbit chat --adapter {out}")
    dd.barrier()  # nobody leaves (and tears the group down) before rank 0 has written everything
    return TrainResult(out, final["step"], final.get("loss"), eval_loss, score_before, score_after, summary)


def apply_demo_preset(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """For --data builtin: take DEMO_PRESET's value for every field not in `given` (the fields the
    user set, on the command line or in --config YAML)."""
    if cfg.data == "builtin":
        for k, v in DEMO_PRESET.items():
            if k not in given:
                setattr(cfg, k, v)
    return cfg
