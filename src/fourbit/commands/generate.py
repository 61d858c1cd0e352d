"""`fourbit generate --prompts FILE --output answers.jsonl`: answer a prompt file, one JSON line per
answer, appended as batches finish; ids already in the output are skipped, so a rerun resumes."""

from dataclasses import dataclass, field

SUMMARY = "answer a file of prompts, writing JSONL"


@dataclass
class GenerateOptions:
    prompts: str = field(default="", metadata={"help": "JSONL prompts (Vicuna question.jsonl, OASST, or prompt/text)"})
    output: str = field(default="", metadata={"help": "answers JSONL (appended; ids already there are skipped)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch"})
    model_id: str | None = field(default=None, metadata={"help": "name recorded in the answers (default: the "
                                                                 "adapter's or model's directory name)"})
    limit: int = field(default=0, metadata={"help": "answer only the first N prompts (0: all)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def validate(self) -> list[str]:
        p = [] if self.prompts else ["--prompts FILE is required"]
        p += [] if self.output else ["--output FILE is required"]
        p += [] if self.batch_size >= 1 else [f"--batch-size must be >= 1, got {self.batch_size}"]
        p += [] if self.limit >= 0 else [f"--limit must be >= 0, got {self.limit}"]
        return p


def run(argv: list[str]) -> int:
    from pathlib import Path

    import torch

    from fourbit.commands.flags import parse_cli
    from fourbit.generate import Sampling, answered_ids, read_prompts, write_answers
    from fourbit.models import ModelArgs, load_model_and_adapter

    (m, sampling, a), _ = parse_cli((ModelArgs, Sampling, GenerateOptions), argv, prog="fourbit generate",
                                    description="Answer a file of prompts.")
    prompts = read_prompts(a.prompts)[: a.limit or None]
    done = answered_ids(a.output)
    todo = [(q, t) for q, t in prompts if q not in done]
    print(f"{len(prompts)} prompts, {len(done)} already answered in {a.output}, {len(todo)} to go")
    if not todo:
        return 0
    torch.manual_seed(a.seed)
    model, tok = load_model_and_adapter(m, need_tokenizer="generate")
    write_answers(model, tok, todo, a.output, a.model_id or Path(m.adapter or m.model).name, sampling, a.batch_size)
    return 0
