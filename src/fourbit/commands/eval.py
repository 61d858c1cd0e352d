"""`fourbit eval ppl` (sliding-window perplexity) and `fourbit eval mmlu` (MMLU, 5-shot as in the
QLoRA paper). Window sizes, data files and subjects are checked before the model loads."""

from dataclasses import dataclass, field

SUMMARY = "perplexity (eval ppl) and MMLU (eval mmlu)"
USAGE = ("usage: fourbit eval ppl --model M --data FILE [flags]\n"
         "       fourbit eval mmlu --model M --data-dir DIR [flags]\n"
         "`fourbit eval ppl --help` and `fourbit eval mmlu --help` list the flags.")
SPLITS = ("test", "val")


@dataclass
class PplArgs:
    """fourbit eval ppl --model M --data FILE"""

    data: str = field(default="", metadata={"help": "text file to score (e.g. WikiText-2 raw test)"})
    max_length: int = field(default=0, metadata={"help": "window length in tokens (0: the model's context)"})
    stride: int = field(default=0, metadata={"help": "window step in tokens (0: = max length)"})
    max_chars: int = field(default=0, metadata={"help": "score only the first N characters (0: all)"})

    def validate(self) -> list[str]:
        p = [] if self.data else ["--data FILE is required"]
        p += [f"--{k.replace('_', '-')} must be >= 0, got {getattr(self, k)}"
              for k in ("max_length", "stride", "max_chars") if getattr(self, k) < 0]
        if self.max_length and self.stride > self.max_length:
            p.append(f"--stride must be at most --max-length ({self.max_length}), got {self.stride}")
        return p


@dataclass
class MmluArgs:
    """fourbit eval mmlu --model M --data-dir DIR"""

    data_dir: str = field(default="", metadata={"help": "MMLU CSV directory with dev/, val/, test/"})
    split: str = field(default="test", metadata={"help": f"{' or '.join(SPLITS)}"})
    shots: int = field(default=5, metadata={"help": "few-shot examples from dev (0-5)"})
    subjects: list[str] | None = field(default=None, metadata={"help": "subjects to run (default: all 57)"})
    limit: int = field(default=0, metadata={"help": "questions per subject (0: all)"})
    batch_size: int = field(default=4, metadata={"help": "prompts per forward pass"})

    def validate(self) -> list[str]:
        p = [] if self.data_dir else ["--data-dir DIR is required"]
        p += [] if self.split in SPLITS else [f"--split must be {' or '.join(SPLITS)}, got {self.split!r}"]
        p += [] if 0 <= self.shots <= 5 else [f"--shots must be 0-5, got {self.shots}"]
        p += [] if self.limit >= 0 else [f"--limit must be >= 0, got {self.limit}"]
        p += [] if self.batch_size >= 1 else [f"--batch-size must be >= 1, got {self.batch_size}"]
        return p


def run(argv: list[str]) -> int:
    from fourbit.errors import UserError

    if argv[:1] in ([], ["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if argv[0] not in ("ppl", "mmlu"):
        raise UserError(f"unknown evaluation {argv[0]!r}; expected ppl or mmlu ({USAGE.splitlines()[0]})")
    return {"ppl": _ppl, "mmlu": _mmlu}[argv[0]](argv[1:])


def _ppl(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from fourbit.commands.flags import JsonOutput, parse_cli
    from fourbit.errors import UserError
    from fourbit.eval.perplexity import perplexity, window_sizes
    from fourbit.models import ModelArgs, load_config, load_model_and_adapter, resolve_source

    (m, a, out), _ = parse_cli((ModelArgs, PplArgs, JsonOutput), argv, prog="fourbit eval ppl",
                               description="Sliding-window perplexity.")
    if not Path(a.data).is_file():
        raise UserError(f"--data {a.data}: no such file")
    src = resolve_source(m.model)
    if src.is_dir():  # the context is known before loading: check the window now, not after minutes
        window_sizes(a.max_length or None, a.stride or None,
                     getattr(load_config(src), "max_position_embeddings", 2048))
    text = Path(a.data).read_text(encoding="utf-8")[: a.max_chars or None]
    model, tok = load_model_and_adapter(m, need_tokenizer="eval ppl")
    r = perplexity(model, tok, text, a.max_length or None, a.stride or None)
    res = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "windows": r.windows,
           "model": m.model, "quant": m.quant, "double_quant": m.double_quant}
    print(json.dumps(res) if out.json else f"perplexity {r.perplexity:.3f} ({r.tokens} tokens, {r.windows} windows)")
    return 0


def _mmlu(argv: list[str]) -> int:
    import json

    from fourbit.commands.flags import JsonOutput, parse_cli
    from fourbit.eval.mmlu import evaluate_mmlu, mmlu_subjects
    from fourbit.models import ModelArgs, load_model_and_adapter

    (m, a, out), _ = parse_cli((ModelArgs, MmluArgs, JsonOutput), argv, prog="fourbit eval mmlu",
                               description="MMLU, 5-shot, as in the QLoRA paper.")
    mmlu_subjects(a.data_dir, a.split, a.subjects)  # a missing directory or subject fails before the model loads
    model, tok = load_model_and_adapter(m, need_tokenizer="eval mmlu")
    r = evaluate_mmlu(model, tok, a.data_dir, a.split, a.shots, a.subjects, a.limit or None, a.batch_size)
    if out.json:
        print(json.dumps(r.as_dict(), indent=2))
        return 0
    for s, acc in r.subjects.items():
        print(f"{s:<40} {acc:6.1%}  ({r.counts[s]})")
    print(f"{'macro (mean of subjects)':<40} {r.macro:6.1%}\n{'micro (all questions)':<40} {r.micro:6.1%}  ({r.n})")
    return 0
