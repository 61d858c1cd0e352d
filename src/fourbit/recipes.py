"""Training recipes shipped with fourbit, by name: `fourbit train --config guanaco-7b`.

A recipe is a YAML file of `fourbit train` options in fourbit/configs/recipes/ (package data),
read exactly as a user's own `--config` file is, so it can say nothing a user's file could not,
and flags on the command line override it. Its first line is a comment: the one-line description
`fourbit train --config list` prints. The Guanaco recipes are the QLoRA paper's (Dettmers et al.
2023, Appendix B.2 and Table 9); each file cites its sources and says where it departs from them.
"""

from __future__ import annotations

import re
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "configs" / "recipes"


def recipes() -> dict[str, Path]:
    """{name: YAML path} of the shipped recipes, in natural order (guanaco-7b before guanaco-13b)."""
    natural = lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.stem)]  # noqa: E731
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"), key=natural)}


def describe(path: Path) -> str:
    """A recipe's one-line description: its first line, a comment."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.lstrip("#").strip()
