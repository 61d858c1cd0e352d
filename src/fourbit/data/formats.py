"""Reading datasets and recognising their format: rows in, `Example`s and a `DataReport` out.

Every row becomes an `Example`: a list of turns (role, text) with role "system", "user",
"assistant", or for plain text a single "text" turn. Formats, detected per file from the keys of
every row (or forced with `format=`):

    alpaca   instruction, input (optional), output      -> the two ALPACA prompt templates (QLoRA's)
    oasst    text: "### Human: ... ### Assistant: ..."   -> one (prompt, reply) pair per assistant turn
    chat     messages: [{role, content}, ...]           -> turns as given, rendered later with the
             (or ShareGPT conversations: [{from, value}])  tokenizer's chat template
    io       input|prompt, output|completion|response   -> the input verbatim, then the output
    text     text (no "### Human:" markers)             -> continued pretraining, every token trained

Sources: a .json (a list of objects) / .jsonl / .csv / .parquet file, a directory of such files
(recursively, sorted), the word `builtin` (fourbit's demo task, fourbit.data.builtin), or, when no
such path exists, a hub dataset name `owner/name[:split]` loaded through the optional `datasets`
package. Every row carries where it came from (`file:line`, `file:row N` for parquet) so bad rows
are reported precisely; on_bad_row="skip" skips and reports them, "error" stops at the first.

Nothing is changed or dropped without a word:
- A file whose rows are in different formats is an error naming the first row of each format
  (unless the format is forced: then rows that do not fit it are bad rows).
- A field that must be text and holds something else (a list, an object, a number, NaN, a
  boolean) makes the row bad; it is never stringified into training text ("['w5', 'w6']", "nan").
- A CSV row with more fields than its header (an unquoted comma) is bad, not cut at the comma.
- At most `max_bad_fraction` (default 5%) of the rows read may be left out, counting rows skipped
  as bad here and those the tokenizer's chat template refuses or truncation empties later
  (`DataReport.check_left_out`); more is an error, so a mis-detected or mostly broken file stops
  the run instead of training on what is left. 5% is a fraction, not a count, on purpose: one bad
  row in a 10-row file is 10% of it, and the user hears about it.

Refused on purpose: guessing field names beyond the aliases above (pass --format, or rename the
columns), and reading pickled or custom-code datasets.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fourbit.data.builtin import builtin_examples
from fourbit.data.example import MAX_BAD_FRACTION, DataReport, Example
from fourbit.errors import UserError

FORMATS = ("alpaca", "oasst", "chat", "io", "text")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
BAD_ROW_POLICIES = ("skip", "error")

# QLoRA's ALPACA_PROMPT_DICT (the paper's qlora.py), character for character; note the space after "### Response:".
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
_OASST_TURN = re.compile(r"### (Human|Assistant):")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")  # owner/name or owner/name:split
_IO_INPUT, _IO_OUTPUT = ("input", "prompt"), ("output", "completion", "response")
_FORMAT_HELP = ("alpaca (instruction, input, output), oasst (text with '### Human:' / '### Assistant:'), "
                "chat (messages: [{role, content}]), io (input/prompt, output/completion/response), text (text)")


# -- reading rows: (where, row) pairs ---------------------------------------------------------------
class _BadRow(str):
    """A row a reader could not take apart (its text is why): parsing reports it as a bad row."""
# Note: Partial last lines
# Our JSON-lines writers (metrics.jsonl, judgments, generate's answers) append one record and its
# "\n" per write. A writer killed mid-write leaves a last line without its "\n" that does not
# parse; every line before it is whole. So: a last line that lacks its newline and does not parse
# is a partial record, which readers may skip (allow_partial_last) and a writer about to append
# cuts off (truncate_partial_line, one truncate(2), never rewriting the complete lines before it),
# as otherwise the next record would be glued onto it. A line that ends in "\n" was written
# whole, so if it does not parse it is an error wherever it is, as is any bad line but the last.
@dataclass(frozen=True)
class PartialLine:
    """The unfinished last line of a JSON-lines file (see Note: Partial last lines)."""

    path: str
    line: int  # its line number
    offset: int  # bytes before it: the file's size without it
    data: bytes  # what it holds

    def __str__(self) -> str:
        text = self.data.decode("utf-8", errors="replace")
        return (f"{self.path}:{self.line}: a partial last line of {len(self.data)} bytes, left by a writer killed "
                f"mid-line ({text[:60]!r}{'...' if len(text) > 60 else ''})")


def _parse_line(raw: bytes) -> tuple[object, str | None]:
    """(row, None) or (None, why the line is not a JSON value)."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg}, column {e.colno})"


def iter_jsonl(path: str | Path, allow_partial_last: bool = False, objects: bool = False,
               bad: list[str] | None = None):
    """(line number, parsed row) for each non-blank line; a line that is not JSON is a UserError
    naming file:line. allow_partial_last: a partial last line (see Note: Partial last lines) is not
    yielded (partial_last_line says what it was). objects: a line that is not a JSON object is an
    error too. bad: instead of raising, append "file:line: why" to this list and go on (for readers
    that count bad lines, like fourbit elo)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row, why = _parse_line(raw)
            partial = why is not None and not raw.endswith(b"\n")  # only the last line can lack it
            if partial and allow_partial_last:
                return
            if why is None and objects and not isinstance(row, dict):
                why = f"expected a JSON object, got {type(row).__name__}"
            if why is not None and bad is not None:
                bad.append(f"{path}:{i}: " + ("a partial last line (a writer killed mid-line?)" if partial else why))
                continue
            if why is not None:
                raise UserError(f"{path}:{i}: {why}. " + (
                    "It is a partial last line (a writer killed mid-line?): delete it, or let the command that "
                    "wrote the file resume" if partial else
                    "Each line of a .jsonl file must be one JSON object; fix or delete that line"))
            yield i, row


def partial_last_line(path: str | Path) -> PartialLine | None:
    """The file's partial last line, or None when its last line is complete (or it is empty)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start, tail = size, b""
        while start > 0 and b"\n" not in tail:  # read back to the last newline, 64 KiB at a time
            step = min(start, 1 << 16)
            start -= step
            f.seek(start)
            tail = f.read(step) + tail
        cut = start + tail.rfind(b"\n") + 1  # 0 when there is no newline at all
        data = tail[tail.rfind(b"\n") + 1:]
        if not data.strip() or _parse_line(data)[1] is None:
            return None
        f.seek(0)
        lines, left = 0, cut
        while left:  # the newlines before it: its line number
            chunk = f.read(min(left, 1 << 20))
            lines, left = lines + chunk.count(b"\n"), left - len(chunk)
    return PartialLine(str(path), lines + 1, cut, data)


def truncate_partial_line(path: str | Path) -> PartialLine | None:
    """Make a JSON-lines file safe to append to: cut off a partial last line (returned, for the
    caller's warning) or end a complete last line that lacks its newline (returns None)."""
    tail = partial_last_line(path)
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if tail is not None:
            f.truncate(tail.offset)  # the complete lines before it are not touched
        else:
            if end == 0:
                return None
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return None
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    return tail


def _read_jsonl(path: Path) -> list[tuple[str, object]]:
    return [(f"{path}:{i}", row) for i, row in iter_jsonl(path)]


def _json_array(text: str, path: Path) -> list[tuple[str, object]] | None:
    """The elements of a top-level JSON array with the line each starts on; None if not an array."""
    dec, ws = json.JSONDecoder(), re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        return None
    pos = ws.match(text, pos + 1).end()
    rows, line, last = [], 1, 0
    while not text.startswith("]", pos):
        line, last = line + text.count("\n", last, pos), pos
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        rows.append((f"{path}:{line}", obj))
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            lineno = 1 + text.count("\n", 0, pos)
            raise UserError(f"{path}:{lineno}: not valid JSON (expected ',' or ']' between list elements)")
    return rows


def _read_json(path: Path) -> list[tuple[str, object]]:
    text = path.read_text(encoding="utf-8")
    rows = _json_array(text, path)
    if rows is not None:
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    lists = {k: v for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}
    if len(lists) != 1:  # {"data": [...]} or {"train": [...]} is fine; anything else is ambiguous
        raise UserError(f"{path}: expected a JSON list of objects (or one key holding such a list, like "
                        f'{{"train": [...]}}), got {type(data).__name__}'
                        + (f" with list keys {sorted(lists)}" if lists else "")
                        + "; for one object per line name the file .jsonl")
    (key, items), = lists.items()
    return [(f"{path}:{key}[{i}]", r) for i, r in enumerate(items)]


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        _ = reader.fieldnames  # reads the header
        start = reader.line_num + 1
        for r in reader:  # line_num counts physical lines, so quoted multi-line fields keep lines right
            extra = r.pop(None, None)  # DictReader's place for fields beyond the header
            if extra is not None:  # an unquoted comma: the row is bad, never cut at the comma
                r = _BadRow(f"{len(reader.fieldnames) + len(extra)} fields but the header names "
                            f"{len(reader.fieldnames)} (an unquoted comma or quote?); quote fields that contain "
                            f"commas")
            rows.append((f"{path}:{start}", r))
            start = reader.line_num + 1
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    from fourbit.files import check_parquet

    check_parquet(path)  # a text file named .parquet: say so, not "install pyarrow" or an Arrow traceback
    try:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise UserError(f"{path}: reading parquet needs pyarrow (or pandas): pip install 'fourbit[data]'") from None
        records = pd.read_parquet(path).to_dict("records")
    return [(f"{path}:row {i + 1}", r) for i, r in enumerate(records)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: Path) -> list[tuple[str, object]]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    try:
        return reader(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _read_hub(name: str) -> list[tuple[str, object]]:
    repo, _, split = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name!r} is not a local file or directory; loading it as a hub dataset needs the "
                        f"`datasets` package: pip install 'fourbit[data]' (or give a local path)") from None
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # offline, unknown name, no such split: one message for the user
        raise UserError(f"{name!r} is not a local path, and loading it from the hub failed "
                        f"({type(e).__name__}: {str(e)[:300]})") from None
    return [(f"{name}:row {i + 1}", dict(r)) for i, r in enumerate(ds)]


def read_files(source: str) -> dict[str, list[tuple[str, object]]]:
    """{file (or hub name): [(where, row), ...]} for a file, a directory, or a hub dataset name."""
    p = Path(source).expanduser()
    if p.is_file():
        return {str(p): _read_file(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise UserError(f"directory {p} holds no {', '.join(SUFFIXES)} files")
        return {str(f): _read_file(f) for f in files}
    if _HUB_NAME.match(source) and p.suffix.lower() not in SUFFIXES:
        return {source: _read_hub(source)}
    raise UserError(f"dataset {source!r} not found: no such file or directory. Give a .json/.jsonl/.csv/.parquet "
                    f"file, a directory of them, 'builtin', or a hub dataset name like owner/name")


def read_rows(source: str) -> list[tuple[str, object]]:
    """Every (where, row) of a source, files in sorted order."""
    return [row for rows in read_files(source).values() for row in rows]


# -- recognising formats ----------------------------------------------------------------------------
def _first(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row), None)


def _row_format(row: object) -> str | None:
    """The format a single row's keys name, or None for a row no format claims.

    Lenient on purpose: a row with the format's key fields but missing or empty values still
    belongs to that format (and is reported as a bad row of it when parsed)."""
    if not isinstance(row, dict):
        return None
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row:
        return "alpaca"
    has_in, has_out = _first(row, _IO_INPUT) is not None, _first(row, _IO_OUTPUT) is not None
    if has_in and has_out:
        return "io"
    if "text" in row:
        t = row["text"]
        return "oasst" if isinstance(t, str) and _OASST_TURN.search(t) else "text"
    return "io" if has_in or has_out else None


def detect_format(rows: list[tuple[str, object]], source: str) -> str:
    """The one format every row of a file names (see _row_format), or a UserError: rows in no known
    format, or rows in two or more formats (naming the first row of each)."""
    first: dict[str, str] = {}  # format -> where its first row is
    count: dict[str, int] = {}
    for where, row in rows:
        fmt = _row_format(row)
        if fmt is not None:
            first.setdefault(fmt, where)
            count[fmt] = count.get(fmt, 0) + 1
    if len(first) == 1:
        return next(iter(first))
    if len(first) > 1:
        kinds = ", ".join(f"{f} ({count[f]} row{'s' * (count[f] > 1)}, first {w})" for f, w in first.items())
        raise UserError(f"{source}: rows in {len(first)} formats: {kinds}. A file holds one format: fix or move "
                        f"the rows of the other format(s), or pass --format to parse every row as one format "
                        f"(rows that do not fit it are then skipped and counted)")
    dicts = [r for _, r in rows if isinstance(r, dict)]
    keys = {str(k) for r in dicts[:20] for k in r}
    found = f"rows with keys {sorted(keys)}" if dicts else \
        f"rows of type {sorted({type(r).__name__ for _, r in rows[:20]})}"
    raise UserError(f"{source}: {found} match no known format. Known formats: {_FORMAT_HELP}. Rename the "
                    f"fields, or pass --format to choose one")


def _text_field(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError(f"missing or empty field {key!r}")
    return _check_text(v, f"field {key!r}")


def _check_text(v: object, what: str) -> str:
    """v itself if it is text; a number, NaN, list or object is never turned into training text."""
    if not isinstance(v, str):
        raise ValueError(f"{what} must be text, got {type(v).__name__}")
    return v


def _alpaca(row: dict) -> Example:
    inst, out = _text_field(row, "instruction"), _text_field(row, "output")
    inp = row.get("input")
    inp = "" if inp is None else _check_text(inp, "field 'input'")
    prompt = ALPACA_WITH_INPUT.format(instruction=inst, input=inp) if inp.strip() else \
        ALPACA_NO_INPUT.format(instruction=inst)
    return Example([("user", prompt), ("assistant", out)])


def _oasst(row: dict) -> Example:
    """'### Human: q### Assistant: a### Human: ...': everything up to and including each
    '### Assistant:' marker is prompt, each non-empty reply (up to the next marker) a response."""
    pieces = _OASST_TURN.split(_text_field(row, "text"))  # ['', 'Human', ' q', 'Assistant', ' a', ...]
    turns, prompt = [], pieces[0]
    for role, body in zip(pieces[1::2], pieces[2::2]):
        if role == "Assistant" and body.strip():
            turns += [("user", prompt + "### Assistant:"), ("assistant", body)]
            prompt = ""
        else:  # a human turn, or an empty reply: kept verbatim as prompt text
            prompt += f"### {role}:{body}"
    if not turns:
        raise ValueError("no '### Assistant:' reply in field 'text'")
    return Example(turns)  # a trailing human turn without a reply is not trained on


_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


def _chat(row: dict) -> Example:
    key = "conversations" if "conversations" in row and "messages" not in row else "messages"
    msgs = row.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"missing or empty list {key!r}")
    turns = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{key}[{j}] must be an object with role and content, got {type(m).__name__}")
        given, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        role = _ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            raise ValueError(f"{key}[{j}] has role {given!r}; expected system, user or assistant")
        if content is None or (isinstance(content, str) and not content.strip()):
            raise ValueError(f"{key}[{j}] ({role}) has missing or empty content")
        _check_text(content, f"{key}[{j}] ({role}) content")
        turns.append((role, content))
    if not any(r == "assistant" for r, _ in turns):
        raise ValueError(f"no assistant message in {key!r}")
    return Example(turns, chat=True)


def _io(row: dict) -> Example:
    src, tgt = _first(row, _IO_INPUT) or "input", _first(row, _IO_OUTPUT) or "output"
    return Example([("user", _text_field(row, src)), ("assistant", _text_field(row, tgt))])


def _text(row: dict) -> Example:
    return Example([("text", _text_field(row, "text"))])


PARSERS = {"alpaca": _alpaca, "oasst": _oasst, "chat": _chat, "io": _io, "text": _text}


def parse_rows(rows: list[tuple[str, object]], format: str, on_bad_row: str, report: DataReport) -> list[Example]:
    """Rows -> Examples in one format; bad rows go to report.skipped (or raise, on_bad_row='error')."""
    out = []
    for where, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise ValueError(str(row))
            if not isinstance(row, dict):
                raise ValueError(f"expected an object with fields, got {type(row).__name__}")
            ex = PARSERS[format](row)
        except ValueError as e:
            if on_bad_row == "error":
                raise UserError(f"{where}: {e} (as format {format}). Fix the row, or pass --on-bad-row skip to "
                                f"skip such rows") from None
            report.skipped.append(f"{where}: {e}")
            continue
        ex.where = where
        out.append(ex)
    return out


def load_examples(source: str, format: str = "auto", on_bad_row: str = "skip",
                  max_bad_fraction: float = MAX_BAD_FRACTION) -> tuple[list[Example], DataReport]:
    """Read `source` (file, directory, 'builtin' or hub name) into Examples and a DataReport.

    format: "auto" (detected per file, from every row) or one of FORMATS. on_bad_row: "skip"
    (report file:line and go on) or "error" (stop with a UserError at the first bad row).
    max_bad_fraction: the share of the rows read that may be skipped (here) or dropped later by
    tokenize_examples before it is a UserError (0: none, 1: any). Raises UserError when the
    source is missing, empty, in no known format, mixes formats in one file, or has no usable row.
    """
    if format != "auto" and format not in PARSERS:
        raise UserError(f"unknown format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise UserError(f"on_bad_row must be skip or error, got {on_bad_row!r}")
    if not 0 <= max_bad_fraction <= 1:
        raise UserError(f"max_bad_fraction must be between 0 and 1, got {max_bad_fraction}")
    if source == "builtin":
        ex = builtin_examples()
        return ex, DataReport(source="builtin", format="chat", rows=len(ex), used=len(ex),
                              max_bad_fraction=max_bad_fraction)
    files = read_files(source)
    n_rows = sum(len(rows) for rows in files.values())
    if n_rows == 0:
        raise UserError(f"dataset {source} is empty: {len(files)} file(s) and no rows to train on")
    formats = {f: format if format != "auto" else detect_format(rows, f) for f, rows in files.items() if rows}
    report = DataReport(source=source, format="+".join(sorted(set(formats.values()))), rows=n_rows,
                        max_bad_fraction=max_bad_fraction)
    out = [ex for f, fmt in formats.items() for ex in parse_rows(files[f], fmt, on_bad_row, report)]
    if not out:
        raise UserError(f"no usable rows in {source} (format {report.format}): all {n_rows} rows were skipped, "
                        f"e.g. {report.skipped[0]}. Check the field names, or pass --format")
    report.used = len(out)
    report.check_left_out()
    return out, report
