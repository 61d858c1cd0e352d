"""Typed dataclass configs mapped 1:1 to command-line flags.

A config is a dataclass whose fields carry `metadata={"help": ...}`; `parse_cli` turns it into
flags with transformers' `HfArgumentParser` (both `--max-steps` and `--max_steps` work),
reads `--config run.yaml` first when given (flags on the command line override the file), and
runs the dataclass's `validate()` (if it has one), which reports every problem at once.
Unknown flags and unknown YAML keys are `UserError`s that list what exists.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from fourbit.errors import UserError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read_yaml(path: str, cls: type) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(names)}")
    return data


def parse_cli(cls: type[T], argv: list[str], prog: str, description: str | None = None) -> T:
    """Parse `argv` into a `cls` instance; `--config FILE.yaml` supplies defaults."""
    from transformers import HfArgumentParser

    yaml_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a path to a YAML file")
        yaml_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    parser = HfArgumentParser(cls, prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags override it")
    if yaml_path:
        parser.set_defaults(**_read_yaml(yaml_path, cls))
    try:
        cfg, *_ = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)  # _: the --config slot
    except ValueError as e:  # HfArgumentParser's message for unknown flags
        known = ", ".join(_flag(f.name) for f in dataclasses.fields(cls))
        raise UserError(f"{e}. Known flags: {known}") from None
    return validate(cfg)


def validate(cfg: T) -> T:
    """Run `cfg.validate()` if defined: it returns a list of problems, reported together."""
    check = getattr(cfg, "validate", None)
    problems = check() if check else []
    if problems:
        raise UserError("invalid options:\n  " + "\n  ".join(problems))
    return cfg
