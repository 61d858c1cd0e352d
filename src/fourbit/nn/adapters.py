"""Adapters on disk in PEFT's format (its `save_pretrained` layout): adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, exactly what
`PeftModel.save_pretrained` writes, so an adapter moves between fourbit and PEFT unchanged.
Saving writes each file to a temporary name and renames it; loading checks the file (its
safetensors header against its size), every key, shape and dtype against the model, and every
value for NaN/Inf before touching a single weight, so a bad adapter leaves the model as it was and
the error names the file or the tensor. Only safetensors is read: an adapter_model.bin (pickle) is
refused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fourbit.errors import UserError
from fourbit.nn.inject import LoraConfig, add_lora, lora_modules

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors (contiguous, on CPU)."""
    out = {}
    for name, m in lora_modules(model).items():
        for x, layer in (("A", m.lora_A), ("B", m.lora_B)):
            w = layer.weight.detach()
            if hasattr(w, "full_tensor"):  # sharded (FSDP2): gathered, a collective every rank joins
                w = w.full_tensor()
            out[f"{PREFIX}{name}.lora_{x}.weight"] = w.contiguous().cpu()
    return out


def peft_config_dict(cfg: LoraConfig) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": list(cfg.target_modules), "bias": "none",
        "base_model_name_or_path": cfg.base_model_name_or_path, "use_rslora": cfg.use_rslora, "use_dora": False,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapter as a PEFT adapter directory; returns the directory.

    A model sharded with fourbit.distributed.shard_model: every rank calls this (the adapter is
    gathered), rank 0 writes."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise UserError("this model has no LoRA adapter to save; call fourbit.add_lora(model) first")
    d = Path(directory)
    tensors = adapter_state_dict(model)
    for key, t in sorted(tensors.items()):  # an adapter load_adapter would refuse is not written
        _check_finite(key, t, "this model's adapter (not saved)")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return d
    d.mkdir(parents=True, exist_ok=True)
    conf = peft_config_dict(cfg)
    if base_model_name_or_path is not None:
        conf["base_model_name_or_path"] = base_model_name_or_path
    _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(conf, indent=2) + "\n"))
    return d


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    from fourbit.files import read_json_file

    d = Path(directory)
    path = d / CONFIG_NAME
    if d.is_file():
        raise UserError(f"{d} is a file, not an adapter directory; pass the directory that holds {CONFIG_NAME} "
                        f"and {WEIGHTS_NAME}")
    if not d.is_dir():
        raise UserError(f"adapter directory {d} does not exist")
    if not path.is_file():
        raise UserError(f"{d} has no {CONFIG_NAME}: not a PEFT/fourbit adapter directory")
    raw = read_json_file(path, "the adapter config")
    problems = []
    if raw.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {raw.get('peft_type')!r}; fourbit loads LORA adapters only")
    r = raw.get("r", 8)  # PEFT's defaults for missing keys
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"r must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha) or not math.isfinite(alpha):  # NaN would make every output NaN
        problems.append(f"lora_alpha must be a finite number, got {alpha!r}")
    dropout = raw.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
    if raw.get("use_dora"):
        problems.append("use_dora is true; DoRA adapters are not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        problems.append("per-layer rank_pattern/alpha_pattern are not supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is a regex ({targets!r}); fourbit needs a list of module names")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout),
                      target_modules=list(targets or []), use_rslora=bool(raw.get("use_rslora", False)),
                      base_model_name_or_path=raw.get("base_model_name_or_path"))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_adapter(model: nn.Module, directory: str | os.PathLike, trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (adding LoRA layers if it has none)."""
    d = Path(directory)
    cfg = read_adapter_config(d)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle, which fourbit never loads; re-save it as safetensors)" \
            if (d / "adapter_model.bin").exists() else ""
        raise UserError(f"{d} has no {WEIGHTS_NAME}{extra}")
    tensors = _read_weights(weights)
    if not lora_modules(model):  # validate against the layers add_lora would create, then create them
        _check_against_model(model, tensors, cfg, d)
        add_lora(model, r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 target=cfg.target_modules or "all-linear", use_rslora=cfg.use_rslora, verbose=False)
    mods = lora_modules(model)
    _assign(mods, tensors, d)
    model.lora_config = cfg
    for m in mods.values():
        m.lora_A.weight.requires_grad_(trainable)
        m.lora_B.weight.requires_grad_(trainable)
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, after checking the file (see fourbit.files.check_safetensors) and that
    every tensor is floating point and finite: a NaN adapter would make every output NaN."""
    from fourbit.files import check_safetensors

    check_safetensors(path)  # a truncated or header-lying file: one line, not safetensors' Rust error
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise UserError(f"adapter {path}: {key} has dtype {t.dtype}; LoRA weights are floating point")
        _check_finite(key, t, f"adapter {path}")
    return tensors


def _check_finite(key: str, t: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        n_nan = int(torch.isnan(t).sum())
        kinds = ", ".join(k for k, n in (("NaN", n_nan), ("Inf", int(bad.sum()) - n_nan)) if n)
        raise UserError(f"{where}: {key} has {int(bad.sum())} non-finite values ({kinds}); the adapter is corrupt, "
                        f"or its training diverged: use an earlier checkpoint's adapter")


def _check_against_model(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: LoraConfig, d: Path) -> None:
    """Before wrapping anything: keys, shapes and completeness against the layers to be wrapped."""
    from fourbit.nn.inject import find_linear_names

    try:
        names = find_linear_names(model, cfg.target_modules or "all-linear")
    except UserError as e:
        raise UserError(f"adapter {d}: {e}") from None
    expect = {}
    for n in names:
        m = model.get_submodule(n)
        expect[f"{PREFIX}{n}.lora_A.weight"] = (cfg.r, m.in_features)
        expect[f"{PREFIX}{n}.lora_B.weight"] = (m.out_features, cfg.r)
    for key in sorted(tensors):
        module = _module_of_key(key, d)
        if key not in expect:
            raise UserError(f"adapter {d}: key {key!r} names module {module!r}, which is not a target linear "
                            f"layer of this model (targets: {cfg.target_modules or 'all-linear'})")
        if tuple(tensors[key].shape) != expect[key]:
            raise UserError(f"adapter {d}: {key} has shape {list(tensors[key].shape)} but the model needs "
                            f"{list(expect[key])} (was the adapter trained on another model or rank?)")
    missing = sorted(set(expect) - set(tensors))
    if missing:
        raise UserError(f"adapter {d} lacks {len(missing)} tensor(s) this model's layers need, e.g. {missing[0]}")


def _module_of_key(key: str, d: Path) -> str:
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)]
    raise UserError(f"adapter {d}: unexpected key {key!r}; expected '{PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")


def _assign(mods: dict, tensors: dict[str, torch.Tensor], d: Path) -> None:
    """Check all keys and shapes, then copy; nothing is written unless everything fits."""
    plan = []
    for key, t in sorted(tensors.items()):
        name = _module_of_key(key, d)
        if name not in mods:
            raise UserError(f"adapter {d}: key {key!r} has no LoRA layer {name!r} in this model")
        layer = mods[name].lora_A if ".lora_A." in key else mods[name].lora_B
        if tuple(t.shape) != tuple(layer.weight.shape):
            raise UserError(f"adapter {d}: {key} has shape {list(t.shape)} but the model's layer needs "
                            f"{list(layer.weight.shape)} (was the adapter trained on another model or rank?)")
        plan.append((layer.weight, t))
    missing = [f"{PREFIX}{n}.lora_{x}.weight" for n in mods for x in "AB"
               if f"{PREFIX}{n}.lora_{x}.weight" not in tensors]
    if missing:
        raise UserError(f"adapter {d} lacks {len(missing)} tensor(s) the model's LoRA layers need, e.g. {missing[0]}")
    with torch.no_grad():
        for param, t in plan:
            t = t.to(param.dtype)
            if hasattr(param, "device_mesh"):  # sharded (FSDP2): each rank keeps its shard
                from torch.distributed.tensor import distribute_tensor

                t = distribute_tensor(t.to(param.device), param.device_mesh, param.placements)
            param.copy_(t)
