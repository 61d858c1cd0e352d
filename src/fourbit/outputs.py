"""Where commands write: never over their own inputs, never over what fourbit did not write, never half.

Every command that writes calls `check_output` before it reads anything slow, and the library
functions they drive call it again (so the Python API is as safe as the CLI):

    check_output(output, {"--model": m, "--data": d}, "directory")

refuses an output that is one of the inputs, lies inside one, or holds one (symlinks resolved):
`fourbit quantize M --output M --overwrite` once replaced a model's weights with their 4-bit
codes, and `fourbit train --data runs/x/train.jsonl --output runs/x --overwrite` would delete the
data it is about to read. It also refuses a file where a directory is expected and the reverse.
A file output (generate's answers, judge's judgments, a plot) may be a new file inside an input
directory (`--adapter runs/x --output runs/x/answers.jsonl`): that adds a file and changes none,
and those commands append only to files of their own kind, never to an input file.

A directory fourbit writes (a train run, a quantized or merged model) holds a marker,
MARKER = fourbit-output.json, saying which command wrote it. `--overwrite` replaces only a
directory that is provably fourbit's own: every entry in it is a file that command writes (the
caller says which with `is_own`), and it holds the marker or, for outputs written before the
marker existed, the files only that command writes. Anything else (a thesis, a source tree, the
training data, a model the user downloaded) is refused, whatever the flags.

`StagedDir` writes a directory's new contents beside it (`.NAME.fourbit-new`) and swaps them in at
the end: the old directory is renamed to `.NAME.fourbit-old`, the new one into place, and the old
one deleted only then. A failed or killed run leaves the old contents where they were; a kill
between the two renames is repaired by the next run (`recover`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fourbit.errors import UserError

MARKER = "fourbit-output.json"
_NEW, _OLD = ".fourbit-new", ".fourbit-old"


# -- outputs against inputs -----------------------------------------------------------------------
def check_output(output: str | os.PathLike, inputs: dict[str, object], kind: str = "directory",
                 flag: str = "--output") -> Path:
    """`output` as a Path, after refusing one that overlaps an input (see the module docstring).

    inputs: {how the user named it ("--model"): path}; names that are not local paths (hub ids,
    the embedded model, None) are skipped. kind: "directory" or "file", what the command writes."""
    out = Path(output).expanduser()
    if kind == "directory" and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {output} is a file; this command writes a directory there. Pass a directory "
                        f"path (a new one, or one this command wrote before)")
    if kind == "file" and out.is_dir():
        raise UserError(f"{flag} {output} is a directory; this command writes a file there. Pass a file path, "
                        f"e.g. {Path(output) / 'out.jsonl'}")
    o = out.resolve()
    for name, path in inputs.items():
        if path is None or str(path) == "" or not Path(path).expanduser().exists():
            continue
        i = Path(path).expanduser().resolve()
        same = o == i or (out.exists() and os.path.samefile(out, i))
        if same:
            raise UserError(f"{flag} {output} is {name} {path} itself; writing there would destroy the input. "
                            f"Write somewhere else")
        if kind == "directory" and i.is_dir() and o.is_relative_to(i):
            raise UserError(f"{flag} {output} lies inside {name} {path}; writing there could overwrite the "
                            f"input's files. Write somewhere else")
        if kind == "directory" and i.is_relative_to(o):
            raise UserError(f"{name} {path} lies inside {flag} {output}; the command could overwrite or delete "
                            f"its own input. Write somewhere else, or move the input out first")
    return out


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_replaceable_file(path: str | os.PathLike, magic: bytes, what: str, flag: str) -> None:
    """Refuse to replace an existing file that is not `what` (its first bytes are not `magic`): a
    --plot pointed at the judgments file must not turn them into a picture."""
    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(len(magic))
        if head != magic:
            raise UserError(f"{flag} {path} exists and is not {what}; it would be replaced. Choose another path, "
                            f"or delete it yourself")


# -- fourbit's own directories ------------------------------------------------------------------
def write_marker(directory: Path, written_by: str) -> None:
    """Mark `directory` as fourbit's output (see the module docstring); written atomically."""
    from fourbit import __version__

    write_text_atomic(directory / MARKER, json.dumps({"written_by": written_by, "fourbit": __version__,
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def marker_of(directory: Path) -> str | None:
    """The command that wrote `directory` according to its marker, or None (no marker, or not one of ours)."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("written_by") if isinstance(data, dict) and isinstance(data.get("written_by"), str) else None


def foreign_entries(directory: Path, is_own: Callable[[Path], bool]) -> list[str]:
    """Names of the entries of `directory` that fourbit did not write (symlinks never count as ours)."""
    return sorted(p.name for p in directory.iterdir() if p.is_symlink() or not is_own(p))


def refuse_unless_own(directory: Path, is_own: Callable[[Path], bool], recognised: Callable[[Path], bool],
                      what: str, flag: str = "--output") -> None:
    """A UserError unless `directory` is provably `what` (e.g. "a fourbit train run") that may be replaced."""
    foreign = foreign_entries(directory, is_own)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"{flag} {directory} holds files that are not {what} ({shown}); --overwrite replaces only "
                        f"{what}, never anything else. Choose another directory, or move those files out")
    if not recognised(directory):
        raise UserError(f"{flag} {directory} is not recognisably {what} (no {MARKER}); --overwrite replaces only "
                        f"fourbit's own output. Choose another directory, or delete it yourself")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- writing beside and swapping ------------------------------------------------------------------
class StagedDir:
    """A directory's new contents, written beside it and swapped in at the end (see the module docstring).

    staging: where to write. commit(): publish (the old contents are deleted only after the new ones
    are in place). abort(): delete what was staged, leave the target as it was."""

    def __init__(self, target: str | os.PathLike):
        t = Path(target).expanduser()
        self.target = t.parent.resolve() / t.name  # the link itself if target is a symlink; resolved above it
        self.staging = self.target.with_name(f".{self.target.name}{_NEW}")
        self.backup = self.target.with_name(f".{self.target.name}{_OLD}")

    def recover(self) -> str | None:
        """Repair a run killed between the two renames of commit(); a warning to print, or None."""
        if self.backup.exists() and not self.target.exists():
            os.replace(self.backup, self.target)
            return f"restored {self.target} from {self.backup.name} (a run was killed while replacing it)"
        if self.backup.exists():
            shutil.rmtree(self.backup)
            return f"removed {self.backup}, left by a run killed after it had replaced {self.target}"
        return None

    def begin(self) -> Path:
        """An empty staging directory (a killed earlier attempt's leftovers removed)."""
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self) -> None:
        if self.target.exists():
            os.replace(self.target, self.backup)
        os.replace(self.staging, self.target)
        if self.backup.exists():
            shutil.rmtree(self.backup)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
