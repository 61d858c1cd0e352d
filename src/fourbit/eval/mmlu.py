"""MMLU (Hendrycks et al., 2021) as the QLoRA paper ran it: 5-shot, next-token choice among A-D.

The original CSV release (`{split}/{subject}_{split}.csv`, rows question,A,B,C,D,answer). For each
test question the prompt is "The following are multiple choice questions (with answers) about
{subject}.\n\n", then the first `shots` dev questions with their answers, then the question
ending in "Answer:". The prediction is the argmax of the next-token logits over the tokens of
" A", " B", " C", " D". Questions are scored in right-padded batches, reading the logits at each
sequence's last real token; shots are dropped (last first) when a prompt exceeds the context.
Reported: accuracy per subject, their mean (macro, the paper's number) and the overall (micro).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourbit.errors import UserError

CHOICES = "ABCD"


@dataclass
class MMLUResult:
    macro: float
    micro: float
    subjects: dict[str, float]
    n: int
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"macro": self.macro, "micro": self.micro, "subjects": self.subjects, "n": self.n}


def read_subject(data_dir: Path, subject: str, split: str) -> list[list[str]]:
    path = data_dir / split / f"{subject}_{split}.csv"
    if not path.is_file():
        raise UserError(f"{path} not found; expected MMLU's CSV layout {data_dir}/{{dev,val,test}}/<subject>_<split>.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 6 or r[5].strip() not in CHOICES]
    if bad:
        raise UserError(f"{path}: rows {bad[:5]} are not question,A,B,C,D,answer (answer one of A-D)")
    return rows


def list_subjects(data_dir: Path, split: str) -> list[str]:
    d = data_dir / split
    if not d.is_dir():
        raise UserError(f"MMLU directory {d} does not exist (expected {data_dir}/{{dev,val,test}})")
    return sorted(p.name[: -len(f"_{split}.csv")] for p in d.glob(f"*_{split}.csv"))


def format_question(row: list[str], answer: bool) -> str:
    q = row[0] + "".join(f"\n{c}. {row[i + 1]}" for i, c in enumerate(CHOICES)) + "\nAnswer:"
    return q + (f" {row[5]}\n\n" if answer else "")


def build_prompt(subject: str, shots: list[list[str]], row: list[str]) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(row, False)


def choice_token_ids(tokenizer) -> list[int]:
    """Token ids of " A".." D" as they follow "Answer:" (the last token of "Answer: X")."""
    base = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    ids = []
    for c in CHOICES:
        full = tokenizer(f"Answer: {c}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            raise UserError(f"this tokenizer does not split 'Answer: {c}' into 'Answer:' + one token; "
                            f"MMLU's next-token scoring needs it to")
        ids.append(full[-1])
    return ids


def mmlu_subjects(data_dir: str | Path, split: str, subjects: list[str] | None = None) -> list[str]:
    """The subjects to run (all of the split's when None); UserError for a missing directory or an
    unknown subject, so a command can check before it loads a model."""
    known = list_subjects(Path(data_dir), split)
    unknown = sorted(set(subjects or []) - set(known))
    if unknown:
        raise UserError(f"unknown MMLU subject(s) {unknown}; see {Path(data_dir) / split}")
    return subjects or known


@torch.no_grad()
def evaluate_mmlu(model, tokenizer, data_dir: str | Path, split: str = "test", shots: int = 5,
                  subjects: list[str] | None = None, limit: int | None = None, batch_size: int = 4,
                  max_length: int | None = None, progress: bool = True) -> MMLUResult:
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    names = mmlu_subjects(data_dir, split, subjects)
    choice_ids = torch.tensor(choice_token_ids(tokenizer))
    limit_len = max_length or getattr(model.config, "max_position_embeddings", 2048)
    device = next(model.parameters()).device
    model.eval()
    jobs = []  # (subject, prompt ids, gold index)
    for s in names:
        dev = read_subject(data_dir, s, "dev")[:shots]
        for row in read_subject(data_dir, s, split)[: limit or None]:
            k = len(dev)
            ids = tokenizer(build_prompt(s, dev[:k], row))["input_ids"]
            while len(ids) > limit_len and k > 0:
                k -= 1
                ids = tokenizer(build_prompt(s, dev[:k], row))["input_ids"]
            jobs.append((s, ids[-limit_len:], CHOICES.index(row[5].strip())))
    correct: dict[str, int] = {s: 0 for s in names}
    count: dict[str, int] = {s: 0 for s in names}
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][1]))  # similar lengths per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for b in tqdm(range(0, len(order), batch_size), desc="mmlu", unit="batch", disable=not progress):
        batch = [jobs[i] for i in order[b:b + batch_size]]
        t = max(len(j[1]) for j in batch)
        ids = torch.full((len(batch), t), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), t), dtype=torch.long)
        for i, (_, x, _) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        last = mask.sum(1) - 1
        pred = logits[torch.arange(len(batch)), last.to(device)][:, choice_ids.to(device)].argmax(-1).cpu()
        for (s, _, gold), p in zip(batch, pred.tolist()):
            correct[s] += int(p == gold)
            count[s] += 1
    acc = {s: correct[s] / count[s] for s in names if count[s]}
    n = sum(count.values())
    return MMLUResult(macro=sum(acc.values()) / max(len(acc), 1), micro=sum(correct.values()) / max(n, 1),
                      subjects=acc, n=n, counts=count)
