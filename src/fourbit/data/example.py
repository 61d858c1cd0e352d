"""The records of fourbit.data: one training `Example` before tokenization, and the `DataReport`
of what happened to a dataset's rows (read, used, skipped, truncated, with file:line reasons)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fourbit.errors import UserError

MAX_BAD_FRACTION = 0.05  # of the rows read, the share that may be left out before it is an error


@dataclass
class Example:
    """One training example before tokenization."""

    turns: list[tuple[str, str]]  # (role, text); role: system | user | assistant | text
    where: str = ""  # "file:line" of the row, for messages
    chat: bool = False  # render with the tokenizer's chat template (else: the turns' text verbatim)
    split: str | None = None  # "train"/"eval" when the source fixes the split (the builtin task), else None


@dataclass
class DataReport:
    """What happened to the rows, for the run summary: read, used, skipped (why), truncated (why)."""

    source: str = ""
    format: str = ""  # the detected (or forced) format; "alpaca+io" when a directory mixes files
    rows: int = 0  # rows read
    used: int = 0  # examples parsed, minus those that truncation emptied (tokenize_examples)
    skipped: list[str] = field(default_factory=list)  # "file:line: reason", one per bad row (or chat
    # conversation the tokenizer's template refused)
    truncated: int = 0  # examples cut to fit source/target max lengths (still used)
    truncated_examples: list[str] = field(default_factory=list)  # "file:line: what was cut"
    context_truncated: int = 0  # of `truncated`, those cut to fit the model's context (context_len)
    context_len: int | None = None  # the model's context, when tokenize_examples was given one
    dropped_truncated: int = 0  # examples left with no response token after truncation (not used)
    dropped_examples: list[str] = field(default_factory=list)  # "file:line: why"
    max_bad_fraction: float = MAX_BAD_FRACTION  # see check_left_out

    notes: list[str] = field(default_factory=list)  # e.g. "no chat template: ..."

    def summary(self) -> str:
        """One line for the trainer's log."""
        s = f"{self.rows} rows ({self.format}) from {self.source}: {self.used} used"
        if self.skipped:
            s += f", {len(self.skipped)} skipped (e.g. {self.skipped[0]})"
        if self.truncated:
            s += f", {self.truncated} truncated"
            if self.context_truncated:
                s += f" ({self.context_truncated} to the model's context of {self.context_len} tokens)"
            s += f" (e.g. {self.truncated_examples[0]})"
        if self.dropped_truncated:
            s += f", {self.dropped_truncated} dropped because truncation left no response (e.g. " \
                 f"{self.dropped_examples[0]})"
        return s + "".join(f"; {n}" for n in self.notes)

    def as_dict(self, limit: int = 20) -> dict:
        """JSON-ready counts with the first `limit` reasons of each kind."""
        return {"source": self.source, "format": self.format, "rows": self.rows, "used": self.used,
                "skipped": len(self.skipped), "skipped_examples": self.skipped[:limit],
                "truncated": self.truncated, "truncated_examples": self.truncated_examples[:limit],
                "context_truncated": self.context_truncated, "context_len": self.context_len,
                "dropped_truncated": self.dropped_truncated, "dropped_examples": self.dropped_examples[:limit],
                "notes": list(self.notes)}

    def left_out(self) -> int:
        """Rows read that will not be trained on: skipped as bad, refused, or emptied by truncation."""
        return len(self.skipped) + self.dropped_truncated

    def check_left_out(self) -> None:
        """A UserError when more than max_bad_fraction of the rows read were left out."""
        n = self.left_out()
        if not self.rows or n <= self.max_bad_fraction * self.rows:
            return
        why = [f"{len(self.skipped)} skipped as bad"] if self.skipped else []
        why += [f"{self.dropped_truncated} emptied by truncation"] if self.dropped_truncated else []
        first = (self.skipped or self.dropped_examples)[0]
        raise UserError(f"{self.source}: {n} of {self.rows} rows ({100 * n / self.rows:.3g}%) would be left out "
                        f"({', '.join(why)}), more than max_bad_fraction {100 * self.max_bad_fraction:.3g}%; "
                        f"first: {first}. Fix those rows (or the format or length settings), or allow it with "
                        f"--max-bad-fraction (a fraction of the rows; 1 allows any)")
