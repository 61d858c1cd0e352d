"""The `fourbit` command: a table of subcommands, one module each in fourbit.commands.

Each command module holds `SUMMARY` and `run(argv) -> int` and imports torch only inside `run`, so
`fourbit --help` and `fourbit --version` stay fast. A `UserError` anywhere becomes one line on
stderr and exit status 2, never a traceback; `--help` exits 0. Adding a command: a module in
fourbit/commands/ and its name in the import and the tuple below.
"""

from __future__ import annotations

import sys

from fourbit import __version__
from fourbit.commands import chat, elo, eval, generate, judge, memory, merge, quantize, serve, train

COMMANDS = {m.__name__.rpartition(".")[2]: m for m in (train, quantize, merge, chat, generate, serve, eval, judge,
                                                        elo, memory)}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {m.SUMMARY}" for name, m in COMMANDS.items())
    return (
        f"usage: fourbit [--version] [--help] COMMAND [flags]\n\n"
        f"QLoRA fine-tuning with 4-bit NormalFloat base models and LoRA adapters.\n\n"
        f"commands:\n{rows}\n\n"
        f"`fourbit COMMAND --help` lists a command's flags; `--json` prints a result as JSON on stdout."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"fourbit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fourbit: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}.\n"
              f"Run `fourbit --help` for the list.", file=sys.stderr)
        return 2
    from fourbit.errors import UserError

    try:
        return int(COMMANDS[name].run(rest) or 0)
    except UserError as e:
        print(f"fourbit {name}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"\nfourbit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
