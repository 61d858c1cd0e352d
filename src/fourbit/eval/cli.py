"""`fourbit eval ppl` and `fourbit eval mmlu`: flags map 1:1 to the dataclasses below."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fourbit.errors import UserError


@dataclass
class PplArgs:
    """fourbit eval ppl --model M --data FILE"""

    model: str = field(default="smollm2-135m", metadata={"help": "model directory, .gguf, hub id or smollm2-135m"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory"})
    data: str = field(default="", metadata={"help": "text file to score (e.g. WikiText-2 raw test)"})
    quant: str = field(default="nf4", metadata={"help": "nf4, fp4 or none"})
    double_quant: bool = field(default=True, metadata={"help": "double quantization (--no-double-quant: off)"})
    max_length: int = field(default=0, metadata={"help": "window length in tokens (0: the model's context)"})
    stride: int = field(default=0, metadata={"help": "window step in tokens (0: = max length)"})
    max_chars: int = field(default=0, metadata={"help": "score only the first N characters (0: all)"})
    json: bool = field(default=False, metadata={"help": "print the result as JSON"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda"})

    def validate(self) -> list[str]:
        return [] if self.data else ["--data FILE is required"]


@dataclass
class MmluArgs:
    """fourbit eval mmlu --model M --data-dir DIR"""

    model: str = field(default="smollm2-135m", metadata={"help": "model directory, .gguf, hub id or smollm2-135m"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory"})
    data_dir: str = field(default="", metadata={"help": "MMLU CSV directory with dev/, val/, test/"})
    split: str = field(default="test", metadata={"help": "test or val"})
    shots: int = field(default=5, metadata={"help": "few-shot examples from dev (0-5)"})
    subjects: list[str] | None = field(default=None, metadata={"help": "subjects to run (default: all 57)"})
    limit: int = field(default=0, metadata={"help": "questions per subject (0: all)"})
    batch_size: int = field(default=4, metadata={"help": "prompts per forward pass"})
    quant: str = field(default="nf4", metadata={"help": "nf4, fp4 or none"})
    json: bool = field(default=False, metadata={"help": "print {macro, micro, subjects, n} as JSON"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda"})

    def validate(self) -> list[str]:
        p = [] if self.data_dir else ["--data-dir DIR is required"]
        p += [] if self.split in ("test", "val") else [f"--split must be test or val, got {self.split!r}"]
        p += [] if 0 <= self.shots <= 5 else [f"--shots must be 0-5, got {self.shots}"]
        return p


def _load(model, adapter, quant, device, double_quant=True):
    from fourbit.models import load_model
    from fourbit.nn import load_adapter

    m, tok = load_model(model, quant=quant, double_quant=double_quant, device=device)
    if tok is None:
        raise UserError(f"model {model} has no tokenizer files")
    if adapter:
        load_adapter(m, adapter)
    return m, tok


def eval_main(argv: list[str]) -> int:
    from fourbit.config import parse_cli

    if not argv or argv[0] not in ("ppl", "mmlu"):
        raise UserError("usage: fourbit eval ppl --model M --data FILE | fourbit eval mmlu --model M --data-dir DIR")
    what, rest = argv[0], argv[1:]
    if what == "ppl":
        from fourbit.eval.perplexity import perplexity

        a = parse_cli(PplArgs, rest, prog="fourbit eval ppl", description="Sliding-window perplexity.")
        if not Path(a.data).is_file():
            raise UserError(f"--data {a.data}: no such file")
        text = Path(a.data).read_text(encoding="utf-8")[: a.max_chars or None]
        model, tok = _load(a.model, a.adapter, a.quant, a.device, a.double_quant)
        r = perplexity(model, tok, text, a.max_length or None, a.stride or None)
        res = {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "windows": r.windows,
               "model": a.model, "quant": a.quant, "double_quant": a.double_quant}
        print(json.dumps(res) if a.json else f"perplexity {r.perplexity:.3f} ({r.tokens} tokens, {r.windows} windows)")
        return 0
    from fourbit.eval.mmlu import evaluate_mmlu

    a = parse_cli(MmluArgs, rest, prog="fourbit eval mmlu", description="MMLU, 5-shot, as in the QLoRA paper.")
    model, tok = _load(a.model, a.adapter, a.quant, a.device)
    r = evaluate_mmlu(model, tok, a.data_dir, a.split, a.shots, a.subjects, a.limit or None, a.batch_size)
    if a.json:
        print(json.dumps(r.as_dict(), indent=2))
    else:
        for s, acc in r.subjects.items():
            print(f"{s:<40} {acc:6.1%}  ({r.counts[s]})")
        print(f"{'macro (mean of subjects)':<40} {r.macro:6.1%}\n{'micro (all questions)':<40} {r.micro:6.1%}  ({r.n})")
    return 0
