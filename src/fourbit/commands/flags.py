"""Flags from typed dataclass configs: the one way every command reads its command line.

`parse_cli(Config, argv)` turns each field of a dataclass (or of several: a command composes
fourbit.models.ModelArgs with its own options) into a flag with transformers' `HfArgumentParser`:
`--max-steps` and `--max_steps` both work, booleans that default to true get `--no-...`, and a
field's `metadata["help"]` is its `--help` line. `--config run.yaml` supplies values first (flags
on the command line override the file). Then each config's `validate()` runs (fourbit.config),
reporting every problem at once.

Every mistake is a `UserError` (one line, exit status 2 from the CLI), never argparse's usage
dump: unknown flags and YAML keys name what exists; abbreviations are off (`--max-st 2` is an
unknown flag, not --max-steps). `parse_cli` also says which fields the user set, on the command
line or in the YAML, so a command can fill in the rest (the train demo preset).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from fourbit.errors import UserError

_UNSET = object()  # a namespace value argparse leaves alone when the flag is absent


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read_yaml(path: str, names: set[str]) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {unknown}; known: {sorted(names)}")
    return data


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config path or None, argv without it)."""
    for i, a in enumerate(argv):
        if a == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config needs a path to a YAML file")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if a.startswith("--config="):
            return a.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _parser(classes: tuple[type, ...], prog: str, description: str | None):
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str):  # argparse prints usage and exits; we want one line
            raise UserError(f"{message} (see {self.prog} --help)")

    parser = Parser(classes, prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags override it")
    return parser


def parse_cli(classes, argv: list[str], prog: str, description: str | None = None, positional: tuple[str, ...] = ()):
    """(config instance(s), names of the fields the user set) for a dataclass or a tuple of them.

    `positional`: fields that leading arguments fill, in order (the last one takes all that remain
    when it is a list), e.g. `fourbit judge A.jsonl B.jsonl` -> answers_a, answers_b.
    """
    single = not isinstance(classes, tuple)
    classes = (classes,) if single else classes
    fields = [f for cls in classes for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    argv = _positional(list(argv), positional, {f.name: f for f in fields})
    yaml_path, argv = _split_config(argv)
    parser = _parser(classes, prog, description)
    yaml_values = _read_yaml(yaml_path, names) if yaml_path else {}
    parser.set_defaults(**yaml_values)
    ns, unknown = parser.parse_known_args(argv, namespace=argparse.Namespace(**{n: _UNSET for n in names}))
    if unknown:
        raise UserError(f"unknown flag(s) {unknown}. Known flags: {', '.join(_flag(f.name) for f in fields)}")
    given = {n for n in names if getattr(ns, n) is not _UNSET} | set(yaml_values)
    for n in names:
        if getattr(ns, n) is _UNSET:  # not on the command line: the YAML's value, else the field's default
            setattr(ns, n, _typed(parser, n, yaml_path) if n in yaml_values else parser.get_default(n))
    values = vars(ns)
    configs = tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}) for cls in classes)
    problems = [p for c in configs for p in (c.validate() if hasattr(c, "validate") else [])]
    if problems:  # every problem of every config at once
        raise UserError("; ".join(problems))
    return (configs[0] if single else configs), given


def _typed(parser, name: str, yaml_path: str):
    """A YAML value as its flag would read it (a string "5" for an int option becomes 5)."""
    value = parser.get_default(name)
    action = next(a for a in parser._actions if a.dest == name)
    if not isinstance(value, str) or action.type is None:
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserError(f"--config {yaml_path}: {name}: cannot read {value!r} as {_flag(name)} expects") from None


def _positional(argv: list[str], positional: tuple[str, ...], fields: dict) -> list[str]:
    """Leading arguments that are not flags, rewritten as the flags of the `positional` fields."""
    head = []
    while argv and not argv[0].startswith("-"):
        head.append(argv.pop(0))
    if not head:
        return argv
    if not positional:
        raise UserError(f"unexpected argument {head[0]!r}; this command takes only --flags")
    out = []
    for i, name in enumerate(positional):
        if i >= len(head):
            break
        is_list = "list" in str(fields[name].type)
        take = head[i:] if is_list and i == len(positional) - 1 else head[i:i + 1]
        out += [_flag(name), *take]
    extra = head[len(positional):] if "list" not in str(fields[positional[-1]].type) else []
    if extra:
        raise UserError(f"unexpected argument(s) {extra}; expected {len(positional)}: "
                        f"{', '.join(n.upper() for n in positional)}")
    return out + argv


@dataclasses.dataclass
class JsonOutput:
    """The one output convention: `--json` prints the result as JSON on stdout (redirect it to keep it)."""

    json: bool = dataclasses.field(default=False, metadata={"help": "print the result as JSON to stdout"})


def first_line(doc: str | None) -> str:
    """A module or function docstring's first paragraph, for --help."""
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")
