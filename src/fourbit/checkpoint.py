"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint is a directory `checkpoint-<step>` holding
    adapter_config.json, adapter_model.safetensors   the LoRA adapter (PEFT format)
    optimizer.safetensors                            optimizer state tensors, keyed state/<param>/<name>
                                                     (--fsdp: optimizer-<rank>.safetensors, each rank's shard)
    rng-<rank>.safetensors, rng-<rank>.json          each rank's torch (CUDA) and Python RNG states
    trainer_state.json                               step, data position, scheduler, optimizer scalars,
                                                     world size, the run's config
It is written into a hidden temporary directory and renamed into place, so a directory named
`checkpoint-<step>` is always complete: a run killed while saving leaves the previous one intact.
Nothing is pickled; loading reads safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fourbit.nn import load_adapter, save_adapter

STATE_NAME = "trainer_state.json"


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
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _sharded(model) -> bool:
    from fourbit.distributed import is_sharded

    return is_sharded(model)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer, scheduler and this rank's RNG from `path`; returns the trainer state."""
    from fourbit import distributed as D
    from fourbit.errors import UserError

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
