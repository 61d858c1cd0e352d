"""Typed dataclass configs: one statement of each option, shared where two configs mean the same.

A config is a dataclass whose fields carry `metadata={"help": ...}` and whose `validate()` returns
every problem at once (naming the flag the user typed). The commands turn configs into flags
(fourbit.commands.flags); the library takes the same dataclass and runs the same `validate`.
When one config holds an option another already states (fourbit memory plans a `fourbit train`
run), it takes the field with `option(OtherConfig, "name")`: one default, one help text.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from fourbit.errors import UserError

T = TypeVar("T")


def option(cls: type, name: str, help: str | None = None) -> dataclasses.Field:
    """A field stated like `cls.name`: the same default and help (or this `help`, when the
    option reads differently here)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    metadata = dict(f.metadata) | ({"help": help} if help else {})
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=metadata)
    return dataclasses.field(default=f.default, metadata=metadata)


def validate(cfg: T) -> T:
    """`cfg` when its `validate()` (if any) finds nothing; else a UserError listing every problem."""
    check = getattr(cfg, "validate", None)
    problems = check() if check else []
    if problems:
        raise UserError("; ".join(problems))
    return cfg
