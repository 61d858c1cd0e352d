"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is a directory `checkpoint-<step>` holding
    adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT format)
    optimizer.safetensors                            optimizer state tensors, keyed state/<param>/<name>
                                                     (--fsdp: optimizer-<rank>.safetensors, each rank's shard)
    rng-<rank>.safetensors, rng-<rank>.json          each rank's torch (CUDA) and Python RNG states
    trainer_state.json                               step, data position, scheduler, optimizer scalars,
                                                     world size, the run's config
It is written into a hidden temporary directory and renamed into place, so a directory named
`checkpoint-<step>` is complete when published: a run killed while saving leaves the previous one
intact (and a `.tmp-checkpoint-<step>` behind). Nothing is pickled; loading reads safetensors and
JSON only.

What can still go wrong on disk, and what resume does about it: a disk that filled up or a copy
that was cut short (truncated or zero-byte files), a run killed while deleting an old checkpoint
(a half-deleted directory), a user's own `checkpoint-final` folder. `validate_checkpoint` finds
these cheaply (safetensors headers against file sizes, JSON parses, every rank's files present)
without reading tensor data; `latest_good_checkpoint` returns the newest checkpoint that passes
with the reasons each newer one was skipped, for the caller to print; `prune_broken_checkpoints`
removes half-deleted checkpoints and unfinished saves, and only directories that are provably
fourbit's own: named checkpoint-<step> (or .tmp-checkpoint-<step>) and holding nothing but the
files fourbit writes there. Rotation (`keep`) deletes only such directories too.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fourbit.nn import load_adapter, save_adapter

STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.tmp-checkpoint-(\d+)$")
# every file fourbit writes into a checkpoint directory, including save_adapter's temporary names
_OWN_FILE = re.compile(r"^(trainer_state\.json|adapter_config\.json|adapter_model\.safetensors|optimizer(-\d+)?"
                       r"\.safetensors|rng-\d+\.(safetensors|json)|\.(adapter_model\.safetensors|adapter_config\.json)"
                       r"\..+)$")


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if hasattr(v, "to_local") else v  # sharded: this rank's shard
                tensors[f"state/{idx}/{name}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{name}"] = v
    extra = {k: v for k, v in sd.items() if k not in ("state", "param_groups")}  # e.g. which optimizer wrote it
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "extra": extra}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, v in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"], **meta.get("extra", {})}


def rng_state() -> tuple[dict[str, torch.Tensor], list]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    v, internal, gauss = random.getstate()
    return tensors, [v, list(internal), gauss]


def set_rng_state(tensors: dict[str, torch.Tensor], py: list) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint-<step> atomically; keep the newest `keep` checkpoints.

    Called by every rank of a distributed run: each adds its own RNG state (rng-<rank>.*), rank 0
    writes the rest (the LoRA parameters and optimizer state are the same on every rank) and
    publishes the directory with one rename.
    """
    from fourbit import distributed as D

    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    if final.is_dir() and not _only_own_files(final):  # it is replaced below: never a user's folder
        from fourbit.errors import UserError

        foreign = sorted(f.name for f in final.iterdir() if not _OWN_FILE.match(f.name))
        raise UserError(f"{final} holds files fourbit did not write ({', '.join(foreign[:5])}), and step {step}'s "
                        f"checkpoint would replace it; move it out of the run directory and resume")
    if D.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    rng_t, rng_py = rng_state()
    save_file(rng_t, str(tmp / f"rng-{D.rank()}.safetensors"))
    (tmp / f"rng-{D.rank()}.json").write_text(json.dumps(rng_py))
    sharded = _sharded(model)
    if sharded or D.is_main():  # data-parallel ranks hold identical states: rank 0 writes them
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    if sharded:  # each rank holds its own shard of the optimizer state
        save_file(opt_tensors, str(tmp / f"optimizer-{D.rank()}.safetensors"), metadata={"format": "pt"})
    D.barrier()
    save_adapter(model, tmp)  # a collective when sharded; rank 0 writes
    if D.is_main():
        if not sharded:
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        state = {**trainer_state, "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                 "world_size": D.world(), "sharded": sharded}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            if _only_own_files(old):  # never a directory holding something fourbit did not write
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _sharded(model) -> bool:
    from fourbit.distributed import is_sharded

    return is_sharded(model)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Published checkpoints (checkpoint-<step> directories holding a trainer_state.json), oldest
    first. Not validated: see latest_good_checkpoint."""
    found = [p for p in Path(out_dir).glob("checkpoint-*")
             if _NAME.match(p.name) and p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=_step)


def _step(path: Path) -> int:
    return int(_NAME.match(path.name)[1])


def _expected_files(state: dict | None) -> list[str]:
    """The files a checkpoint written with this trainer state holds (a single process's without one)."""
    world = state.get("world_size", 1) if isinstance(state, dict) else 1
    world = world if isinstance(world, int) and world >= 1 else 1
    sharded = bool(state.get("sharded", False)) if isinstance(state, dict) else False
    opt = [f"optimizer-{r}.safetensors" for r in range(world)] if sharded else ["optimizer.safetensors"]
    rng = [f"rng-{r}.{ext}" for r in range(world) for ext in ("safetensors", "json")]
    return [STATE_NAME, "adapter_config.json", "adapter_model.safetensors", *opt, *rng]


def _read_json(path: Path) -> tuple[object, str | None]:
    try:
        return json.loads(path.read_bytes().decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} is not valid JSON ({getattr(e, 'msg', None) or e.reason})"


def validate_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint directory, [] when nothing is: every file present for each
    rank, JSON that parses, safetensors headers that match their files' sizes, a trainer state
    whose step is the directory's. Cheap: no tensor data is read."""
    from fourbit.errors import UserError
    from fourbit.files import check_safetensors

    d = Path(path)
    if not d.is_dir():
        return [f"{d} is not a directory"]
    state, why = _read_json(d / STATE_NAME) if (d / STATE_NAME).is_file() else (None, None)
    problems = [why] if why else []
    if state is not None:
        problems += _state_problems(state, d)
    expected = _expected_files(state if not problems else None)
    missing = [f for f in expected if not (d / f).is_file()]
    if len(missing) == len(expected):
        return ["missing every checkpoint file"]
    if missing:
        problems.insert(0, f"missing {', '.join(missing)}")
    for name in (f for f in expected if f not in missing):
        if name.endswith(".safetensors"):
            try:
                keys = check_safetensors(d / name)
            except UserError as e:
                problems.append(str(e))
                continue
            if name.startswith("optimizer") and not all(re.match(r"^state/\d+/.+$", k) for k in keys):
                problems.append(f"{name} holds keys that are not optimizer state (state/<index>/<name>)")
            if name.startswith("rng") and "torch" not in keys:
                problems.append(f"{name} lacks the torch generator state")
        elif name != STATE_NAME:  # adapter_config.json, rng-<rank>.json
            value, why = _read_json(d / name)
            if why:
                problems.append(why)
            elif name.startswith("rng") and not (isinstance(value, list) and len(value) == 3):
                problems.append(f"{name} is not a Python random state ([version, state, gauss])")
            elif name == "adapter_config.json" and not isinstance(value, dict):
                problems.append(f"{name} is not a JSON object")
    return problems


def _state_problems(state: object, d: Path) -> list[str]:
    if not isinstance(state, dict):
        return [f"{STATE_NAME} is not a JSON object"]
    problems = []
    m = _NAME.match(d.name)
    if not isinstance(state.get("step"), int):
        problems.append(f"{STATE_NAME} has no step")
    elif m and int(m[1]) != state["step"]:
        problems.append(f"{STATE_NAME} says step {state['step']}, the directory's name step {m[1]}")
    for key in ("optimizer", "scheduler"):
        if not isinstance(state.get(key), dict):
            problems.append(f"{STATE_NAME} has no {key} state")
    return problems


def latest_good_checkpoint(out_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that validates, or None; [(directory, why it was skipped)]).

    Skipped: every checkpoint-<step> newer than the one returned (each with its problems joined by
    "; "), and checkpoint-* directories whose name is not checkpoint-<step> (a user's
    checkpoint-final): never resumed from, never deleted. The caller prints the warnings."""
    out = Path(out_dir)
    if not out.is_dir():
        return None, []
    dirs = [p for p in out.glob("checkpoint-*") if p.is_dir()]
    stray = sorted(p for p in dirs if not _NAME.match(p.name))
    skipped = []
    for d in sorted((p for p in dirs if _NAME.match(p.name)), key=_step, reverse=True):
        problems = validate_checkpoint(d)
        if not problems:
            return d, skipped + [(p, "not named checkpoint-<step>: ignored") for p in stray]
        skipped.append((d, "; ".join(problems)))
    return None, skipped + [(p, "not named checkpoint-<step>: ignored") for p in stray]


def prune_broken_checkpoints(out_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """Delete half-deleted checkpoints (checkpoint-<step> missing some of its files, e.g. a run
    killed while rotating) and unfinished saves (.tmp-checkpoint-<step>); returns [(directory, why)]
    for the caller's warning. An unfinished save that is complete and valid (killed after
    save_checkpoint deleted the old checkpoint-<step> it replaces, before the rename) is published
    instead. Only directories holding nothing but fourbit's own checkpoint files are touched; a
    checkpoint whose files are all there but corrupt is kept (latest_good_checkpoint skips it) so
    that someone can look at it. Call it on one process (rank 0) only."""
    out, pruned = Path(out_dir), []
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        if d.is_symlink() or not d.is_dir() or not _only_own_files(d):
            continue
        tmp = _TMP_NAME.match(d.name)
        if tmp and _publishable(d, int(tmp[1])):  # killed between replacing the old one and the rename
            os.replace(d, out / f"checkpoint-{tmp[1]}")
            pruned.append((out / f"checkpoint-{tmp[1]}", "published: a complete save killed before its rename"))
            continue
        if tmp:
            why = "an unfinished save (killed before it was published)"
        elif _NAME.match(d.name):
            problems = validate_checkpoint(d)
            if not problems or not problems[0].startswith("missing "):
                continue
            why = f"half deleted ({problems[0]})"
        else:
            continue
        shutil.rmtree(d)
        pruned.append((d, why))
    return pruned


def _publishable(tmp: Path, step: int) -> bool:
    """A .tmp-checkpoint-<step> that save_checkpoint finished writing (rank 0 writes the trainer
    state last) and whose checkpoint-<step> is not there."""
    if (tmp.parent / f"checkpoint-{step}").exists() or validate_checkpoint(tmp):
        return False
    return json.loads((tmp / STATE_NAME).read_text()).get("step") == step


def _only_own_files(d: Path) -> bool:
    """Whether a directory holds only regular files with the names fourbit writes into checkpoints."""
    return all(f.is_file() and not f.is_symlink() and _OWN_FILE.match(f.name) for f in d.iterdir())


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer, scheduler and this rank's RNG from `path`; returns the trainer state."""
    from fourbit import distributed as D
    from fourbit.errors import UserError

    problems = validate_checkpoint(path)
    if problems:
        raise UserError(f"cannot resume from {path}: {'; '.join(problems)}. Move that directory away to resume "
                        f"from the checkpoint before it")
    state = json.loads((path / STATE_NAME).read_text())
    if state.get("world_size", 1) != D.world():
        raise UserError(f"cannot resume from {path}: it was written by {state.get('world_size', 1)} process(es), "
                        f"this run has {D.world()}; resume with the same number of processes")
    if bool(state.get("sharded", False)) != _sharded(model):
        raise UserError(f"cannot resume from {path}: it was written {'with' if state.get('sharded') else 'without'} "
                        f"--fsdp; resume with the same setting")
    load_adapter(model, path, trainable=True)
    name = f"optimizer-{D.rank()}.safetensors" if _sharded(model) else "optimizer.safetensors"
    try:
        sd = _unflatten_optimizer(load_file(str(path / name)), state["optimizer"])
        if _sharded(model) and isinstance(optimizer, torch.optim.AdamW):  # torch's AdamW keeps DTensor states
            from torch.distributed.tensor import DTensor

            params = [p for g in optimizer.param_groups for p in g["params"]]
            for idx, st in sd["state"].items():
                p = params[int(idx)]
                for k, v in st.items():
                    if k != "step" and isinstance(v, torch.Tensor):
                        st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements)
        optimizer.load_state_dict(sd)
    except ValueError as e:
        raise UserError(f"cannot resume from {path}: its optimizer state does not fit this run ({e}). Resume with "
                        f"the settings the run started with (see {path / STATE_NAME})") from None
    scheduler.load_state_dict(state["scheduler"])
    r = D.rank()
    set_rng_state(load_file(str(path / f"rng-{r}.safetensors")), json.loads((path / f"rng-{r}.json").read_text()))
    return state
