"""The `fourbit` command: a table of subcommands, each a `main(argv) -> int` in its own module.

Subcommand modules are imported only when their command runs, so `fourbit --help` and
`fourbit --version` do not import torch. Every subcommand parses its flags from a typed
dataclass (see `fourbit.config`); a `UserError` anywhere becomes a one-paragraph message
and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from importlib import import_module

from fourbit import __version__

# name -> (module, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("fourbit.train", "cli_main", "fine-tune a model with QLoRA (no arguments: the embedded demo)"),
    "quantize": ("fourbit.models", "quantize_main", "quantize a model to 4-bit (bitsandbytes format) as it streams"),
    "merge": ("fourbit.export", "merge_main", "merge an adapter into its base model; optional GGUF export"),
    "chat": ("fourbit.generate", "chat_main", "chat with a model (and adapter) in the terminal"),
    "generate": ("fourbit.generate", "generate_main", "answer a file of prompts, writing JSONL"),
    "eval": ("fourbit.eval.cli", "eval_main", "perplexity (eval ppl) and MMLU (eval mmlu)"),
    "judge": ("fourbit.eval.judge", "judge_main", "pairwise judgments of two answer files"),
    "elo": ("fourbit.eval.elo", "elo_main", "Elo and Bradley-Terry ratings from judgments"),
    "memory": ("fourbit.memory", "memory_main", "predict the peak memory of a QLoRA run"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, _, desc) in COMMANDS.items())
    return (
        f"usage: fourbit [--version] [--help] COMMAND [flags]\n\n"
        f"QLoRA fine-tuning with 4-bit NormalFloat base models and LoRA adapters.\n\n"
        f"commands:\n{rows}\n\n"
        f"`fourbit COMMAND --help` lists a command's flags."
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
    module, func, _ = COMMANDS[name]
    from fourbit.errors import UserError

    try:
        return int(getattr(import_module(module), func)(rest) or 0)
    except UserError as e:
        print(f"fourbit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfourbit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
