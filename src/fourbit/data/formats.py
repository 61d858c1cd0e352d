"""Reading datasets and recognising their format.

Every row becomes an `Example`: a list of turns (role, text) where role is "system", "user" or
"assistant", or for plain text a single "text" turn. Formats, detected from the keys of the
first rows (or forced with `format=`):

    alpaca   instruction, input (optional), output      -> ALPACA prompt templates (QLoRA §B)
    oasst    text: "### Human: ... ### Assistant: ..."   -> alternating turns (Guanaco, OASST1)
    chat     messages: [{role, content}, ...]           -> turns as given (tokenizer's chat template)
    io       input, output                              -> one user turn, one assistant turn
    text     text without ### markers                   -> continued pretraining, every token trained

Sources: a .json/.jsonl/.csv/.parquet file, a directory of such files, the word `builtin`
(fourbit's demo task), or a hub dataset name through the optional `datasets` package. Rows with
missing or empty fields are skipped and reported with file:line (or raise, with
on_bad_row="error").
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fourbit.errors import UserError

FORMATS = ("alpaca", "oasst", "chat", "io", "text")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
_OASST_TURN = re.compile(r"### (Human|Assistant):")


@dataclass
class Example:
    turns: list[tuple[str, str]]  # (role, text); roles: system, user, assistant, text
    where: str = ""  # file:line, for messages
    chat: bool = False  # render with the tokenizer's chat template
    split: str | None = None  # a split assigned by the source (the builtin task), else None


@dataclass
class DataReport:
    """What happened to the rows: read, used, skipped (and why), truncated."""

    source: str = ""
    format: str = ""
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0  # examples cut to fit the length limits
    dropped_truncated: int = 0  # examples left with no target token at all (not used)
    used: int = 0

    def summary(self) -> str:
        s = f"{self.rows} rows ({self.format}) from {self.source}: {self.used} used"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (e.g. {self.skipped[0]})"
        if self.truncated:
            s += f", {self.truncated} truncated"
        if self.dropped_truncated:
            s += f", {self.dropped_truncated} dropped because truncation left no response"
        return s

    def as_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "rows": self.rows, "used": self.used,
                "skipped": len(self.skipped), "skipped_examples": self.skipped[:20], "truncated": self.truncated,
                "dropped_truncated": self.dropped_truncated}


# -- reading rows ---------------------------------------------------------------------------------
def _read_file(path: Path) -> list[tuple[str, dict]]:
    """(file:line, row) for every row of one file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects (or JSON lines in a .jsonl file)")
        return [(f"{path}:[{i}]", r) for i, r in enumerate(data)]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(csv.DictReader(f))]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow: pip install 'fourbit[data]'") from None
        return [(f"{path}:[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise UserError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def read_rows(source: str) -> list[tuple[str, dict]]:
    p = Path(source).expanduser()
    if p.is_file():
        return _read_file(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES)
        if not files:
            raise UserError(f"{p} holds no {'/'.join(SUFFIXES)} files")
        return [row for f in files for row in _read_file(f)]
    if "/" in source and not source.startswith((".", "/", "~")):
        return _read_hub(source)
    raise UserError(f"dataset {source!r} not found: no such file or directory (and not a hub name owner/name)")


def _read_hub(name: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name!r} is not a local path; loading hub datasets needs `datasets`: "
                        f"pip install 'fourbit[data]'") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, unknown name: one message for the user
        raise UserError(f"could not load dataset {name!r} from the hub ({type(e).__name__}: {str(e)[:200]})") from None
    return [(f"{name}:[{i}]", dict(r)) for i, r in enumerate(ds)]


# -- recognising formats --------------------------------------------------------------------------
def detect_format(rows: list[tuple[str, dict]], source: str) -> str:
    keys: set[str] = set()
    for _, r in rows[:20]:
        if isinstance(r, dict):
            keys |= set(r)
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"input", "output"} <= keys:
        return "io"
    if "text" in keys:
        sample = [r.get("text") for _, r in rows[:20] if isinstance(r, dict)]
        return "oasst" if any(isinstance(t, str) and _OASST_TURN.search(t) for t in sample) else "text"
    raise UserError(f"{source}: rows with keys {sorted(keys)} match no known format. Known formats: alpaca "
                    f"(instruction, input, output), oasst (text with '### Human:'/'### Assistant:'), chat "
                    f"(messages: [{{role, content}}]), io (input, output), text (text); pass --format to choose")


def _nonempty(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"missing or empty field {key!r}")
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be text, got {type(v).__name__}")
    return v


def _alpaca(row: dict) -> Example:
    inst, out = _nonempty(row, "instruction"), _nonempty(row, "output")
    inp = row.get("input") or ""
    prompt = ALPACA_WITH_INPUT.format(instruction=inst, input=inp) if str(inp).strip() else \
        ALPACA_NO_INPUT.format(instruction=inst)
    return Example([("user", prompt), ("assistant", out)])


def _oasst(row: dict) -> Example:
    """'### Human: q ### Assistant: a ...': the markers and human text are prompt, each reply a target."""
    pieces = _OASST_TURN.split(_nonempty(row, "text"))  # ['', 'Human', ' q ', 'Assistant', ' a', ...]
    turns, prompt = [], pieces[0]
    for role, body in zip(pieces[1::2], pieces[2::2]):
        if role == "Human":
            prompt += f"### Human:{body}"
        elif body.strip():
            turns += [("user", prompt + "### Assistant:"), ("assistant", body)]
            prompt = ""
    if not turns:
        raise ValueError("no '### Assistant:' reply in text")
    return Example(turns)  # a trailing human turn without a reply is not trained on


def _chat(row: dict) -> Example:
    msgs = row.get("messages", row.get("conversations"))
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("missing or empty 'messages' list")
    turns = []
    for m in msgs:
        if not isinstance(m, dict):
            raise ValueError("each message must be an object with role and content")
        role = m.get("role", m.get("from"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str) or not content.strip():
            raise ValueError(f"message with role {role!r} and content {str(content)[:30]!r}: expected role "
                             f"system/user/assistant and non-empty text")
        turns.append((role, content))
    if not any(r == "assistant" for r, _ in turns):
        raise ValueError("no assistant message")
    return Example(turns, chat=True)


def _io(row: dict) -> Example:
    return Example([("user", _nonempty(row, "input")), ("assistant", _nonempty(row, "output"))])


def _text(row: dict) -> Example:
    return Example([("text", _nonempty(row, "text"))])


PARSERS = {"alpaca": _alpaca, "oasst": _oasst, "chat": _chat, "io": _io, "text": _text}


def load_examples(source: str, format: str = "auto", on_bad_row: str = "skip") -> tuple[list[Example], DataReport]:
    """Read `source` into Examples; bad rows are skipped and reported (or raise, on_bad_row='error')."""
    if source == "builtin":
        from fourbit.data.builtin import builtin_examples

        ex = builtin_examples()
        return ex, DataReport(source="builtin", format="chat", rows=len(ex), used=len(ex))
    rows = read_rows(source)
    if not rows:
        raise UserError(f"dataset {source} is empty: no rows to train on")
    if format == "auto":
        format = detect_format(rows, source)
    if format not in PARSERS:
        raise UserError(f"unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    report = DataReport(source=source, format=format, rows=len(rows))
    out = []
    for where, row in rows:
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected an object, got {type(row).__name__}")
            ex = PARSERS[format](row)
        except ValueError as e:
            if on_bad_row == "error":
                raise UserError(f"{where}: {e} (pass --on-bad-row skip to skip such rows)") from None
            report.skipped.append(f"{where}: {e}")
            continue
        ex.where = where
        out.append(ex)
    if not out:
        raise UserError(f"no usable rows in {source} as format {format}: all {len(rows)} were skipped, e.g. "
                        f"{report.skipped[0] if report.skipped else '?'}")
    report.used = len(out)
    return out, report
