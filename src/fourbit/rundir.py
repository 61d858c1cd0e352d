"""The run directory of `fourbit train`: what fourbit writes there, recognising one, and which
settings a resumed run may change.

A run directory holds (fourbit.outputs.MARKER) fourbit-output.json, config.json, metrics.jsonl,
summary.json, loss.png, base_answers.json (the demo's replay), tensorboard/ (when installed), checkpoint-<step>/ (fourbit.checkpoint)
and the final adapter (adapter_config.json, adapter_model.safetensors). `--overwrite` replaces a
directory only when every entry is one of these and it is recognisably a run: it holds the marker
written at the start of every run, or (runs from before the marker) a config.json holding a train
config or a checkpoint. See fourbit.outputs for how the replacement happens (beside, then a swap).

# Note: What a resumed run may change
A checkpoint continues one run: every setting that changes what is computed must be the one the
run started with, or the resumed run would silently be a different run (a new --lr with the old
optimizer state, a new --alpha scaling the old adapter: an adapter 4x off). So on --resume each
such setting is compared with the checkpoint's saved config and every difference is named. The
settings below may change; a flag the user did not give takes the checkpoint's value (so
`fourbit train --output runs/x --resume` continues with the run's own settings, not the defaults),
except the ENVIRONMENT ones, which describe this machine and this invocation.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields
from pathlib import Path

from fourbit.checkpoint import STATE_NAME, _NAME, _TMP_NAME, _only_own_files, latest_good_checkpoint
from fourbit.errors import UserError
from fourbit.outputs import MARKER, marker_of

WRITTEN_BY = "fourbit train"
# how long to train and how often to log, save and score; memory-for-compute trades that do not
# change the arithmetic; what makes the data loader refuse rather than what it trains on
RESUME_MAY_CHANGE = ("max_steps", "epochs", "save_steps", "eval_steps", "logging_steps", "save_total_limit",
                     "score_examples", "gradient_checkpointing", "loss_chunk", "on_bad_row", "max_bad_fraction")
# this machine and this invocation: never taken from the checkpoint
ENVIRONMENT = ("output", "resume", "overwrite", "device", "threads", "dist_timeout")
_PATHS = ("model", "data")  # compared as the files they name when both exist
_FILES = re.compile(r"^(fourbit-output\.json|config\.json|summary\.json|metrics\.jsonl|loss\.png|"
                    r"base_answers\.json(\.tmp)?|"
                    r"adapter_config\.json|adapter_model\.safetensors|\.(adapter_model\.safetensors|"
                    r"adapter_config\.json)\..+|\.(fourbit-output\.json|config\.json|summary\.json|metrics\.jsonl|"
                    r"loss\.png)\.tmp)$")


def is_run_file(p: Path) -> bool:
    """Whether `p` (an entry of a run directory) is something `fourbit train` writes there."""
    if p.is_dir():
        if _NAME.match(p.name) or _TMP_NAME.match(p.name):
            return _only_own_files(p)
        if p.name == "tensorboard":
            return all(f.is_file() and f.name.startswith("events.out.tfevents.") for f in p.iterdir())
        return False
    return p.is_file() and bool(_FILES.match(p.name))


def is_run(directory: Path) -> bool:
    """Whether `directory` is recognisably a train run: the marker, or (older runs) a train config
    or a checkpoint. Entries are checked separately (fourbit.outputs.refuse_unless_own)."""
    if marker_of(directory) == WRITTEN_BY:
        return True
    if (directory / MARKER).exists():  # another command's output: not a run
        return False
    try:
        cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and {"model", "data", "output", "lr", "r"} <= set(cfg):
            return True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    return any((p / STATE_NAME).is_file() for p in directory.iterdir() if _NAME.match(p.name))


# -- resuming -----------------------------------------------------------------------------------------
def resume_settings(cfg, given: set[str]):
    """`cfg` with every setting the user did not give taken from the config of the checkpoint it will
    resume (the newest good one), but the ENVIRONMENT ones. Unchanged when there is none: training
    then says what is wrong. See Note: What a resumed run may change."""
    path, _ = latest_good_checkpoint(Path(cfg.output))
    if path is None:
        return cfg
    try:
        saved = json.loads((path / STATE_NAME).read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return cfg
    names = {f.name for f in fields(cfg)}
    for k, v in (saved if isinstance(saved, dict) else {}).items():
        if k in names and k not in given and k not in ENVIRONMENT:
            setattr(cfg, k, v)
    return cfg


def resume_differences(saved: dict, cfg) -> list[str]:
    """'--name OLD -> NEW' for each setting that changes the result and differs from the checkpoint's."""
    out = []
    now = asdict(cfg)
    for k, new in now.items():
        if k in RESUME_MAY_CHANGE or k in ENVIRONMENT or k not in saved:
            continue  # a checkpoint from an older fourbit may lack a setting: nothing to compare
        old = saved[k]
        if _same(k, old, new):
            continue
        out.append(f"--{k.replace('_', '-')} {old!r} -> {new!r}")
    return out


def _same(name: str, old, new) -> bool:
    if old == new:
        return True
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    if name in _PATHS and isinstance(old, str) and isinstance(new, str):
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def check_resume(saved: dict, cfg, checkpoint: Path) -> None:
    """A UserError naming every setting that differs from the checkpoint's (see resume_differences)."""
    diff = resume_differences(saved, cfg)
    if diff:
        raise UserError(f"--resume: {len(diff)} setting(s) differ from the run being resumed ({checkpoint}): "
                        f"{'; '.join(diff)}. A resumed run must compute what the run started computing: drop "
                        f"those flags (unset flags take the run's values), or start a new run with another "
                        f"--output. May change on resume: "
                        f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)}")
