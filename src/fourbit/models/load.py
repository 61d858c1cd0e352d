"""Loading a causal LM with its linear layers quantized as the weights stream in, and an adapter on top.

`load_model` accepts a local safetensors checkpoint (sharded or not), a directory already
quantized by bitsandbytes or fourbit (loaded as is), a GGUF file (fourbit.models.gguf), the
embedded `smollm2-135m`, or a hub name (fourbit.models.source). For safetensors it never
materialises the 16-bit model: it builds the architecture on the meta device, swaps the linear
layers (all but lm_head) for empty `Linear4bit` shells, then reads the checkpoint one tensor at a
time, quantizing each linear weight on arrival. Peak memory is about the 4-bit model plus one
16-bit tensor. See Note: One mapping per tensor in fourbit.models.source.

`ModelArgs` is the one statement of "which model, how loaded" that every command running a model
shares (chat, generate, eval, judge), and `load_model_and_adapter` the one way they load it.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fourbit.embedded import DEFAULT_MODEL
from fourbit.errors import UserError
from fourbit.models.gguf import load_gguf
from fourbit.models.source import (checkpoint_keys, checkpoint_shards, iter_checkpoint, load_config,
                                   load_tokenizer_from, resolve_source)
from fourbit.nn import dequantize_linears, find_linear_names, linear4bit_shells
from fourbit.nn.linear4bit import default_compute_dtype
from fourbit.quant import DTYPES, QUANT_TYPES, QuantState, quantize_4bit

QUANT_CHOICES = (*QUANT_TYPES, "none")  # "none": the 16-bit model (LoRA without quantization)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def normalize_quant(quant: str | None) -> str | None:
    """A quant type, or None for "none" / "" / None (the 16-bit model)."""
    quant = None if quant in (None, "none", "None", "") else quant
    if quant not in QUANT_TYPES and quant is not None:
        expected = ", ".join(map(repr, QUANT_CHOICES[:-1])) + f" or {QUANT_CHOICES[-1]!r}"
        raise UserError(f"quant must be {expected}, got {quant!r}")
    return quant


def choice_problems(value, choices, flag: str) -> list[str]:
    """[] or the one line a config's validate() reports for a value outside `choices`."""
    named = ", ".join(str(c) for c in choices if c is not None)
    return [] if value in choices else [f"{flag} must be one of {named}, got {value!r}"]


@dataclass
class ModelArgs:
    """Which model to run and how to load it: the flags of every command that runs one."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model directory, .gguf file, hub id (owner/name), "
                                                                "or the embedded smollm2-135m"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter directory (PEFT format, e.g. a fourbit "
                                                               "train output)"})
    quant: str = field(default="nf4", metadata={"help": f"base model data type: {', '.join(QUANT_CHOICES)} "
                                                        f"(none: 16-bit)"})
    double_quant: bool = field(default=True, metadata={"help": "double quantization of the block constants "
                                                               "(--no-double-quant: off)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": f"compute dtype: {', '.join(DTYPES)} (default: bf16 "
                                                              f"on CUDA, fp32 on CPU)"})

    def validate(self) -> list[str]:
        return choice_problems(self.quant, QUANT_CHOICES, "--quant") + \
            choice_problems(self.dtype, (None, *DTYPES), "--dtype")


def load_model_and_adapter(args: ModelArgs, need_tokenizer: str | None = "this command"):
    """(model, tokenizer) as `args` says, with the adapter loaded when one is named. The adapter's
    files are checked before the model loads, so a wrong path fails in a second, not after minutes.
    `need_tokenizer`: who needs it, for the error when the model has none (None: a tokenizer is optional)."""
    from fourbit.nn import load_adapter, read_adapter_config

    if args.adapter:
        read_adapter_config(args.adapter)
    model, tok = load_model(args.model, quant=args.quant, double_quant=args.double_quant,
                            compute_dtype=args.dtype, device=args.device)
    if tok is None and need_tokenizer:
        raise UserError(f"model {args.model} has no tokenizer files; {need_tokenizer} needs a tokenizer")
    if args.adapter:
        try:
            load_adapter(model, args.adapter)
        except UserError as e:
            why = str(e).removeprefix(f"adapter {Path(args.adapter)}: ")
            raise UserError(f"adapter {args.adapter} does not fit model {args.model}: {why}") from None
    return model, tok


def meta_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The architecture with every parameter and buffer on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    config = _without_quant_config(config)
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise UserError(f"transformers cannot build a causal LM from this config: {e}") from None


def _without_quant_config(config):
    if getattr(config, "quantization_config", None) is not None:
        config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    return config


def prequantized_modules(keys: list[str]) -> dict[str, str]:
    """module path -> quant type, for bitsandbytes-format 4-bit weights present in a checkpoint."""
    out = {}
    for k in keys:
        head, sep, qt = k.rpartition(".weight.quant_state.bitsandbytes__")
        if sep:
            out[head] = qt
    return out


def key_renamer(model: nn.Module):
    """A function mapping checkpoint names to the model's names (transformers' renaming rules).

    transformers keeps per-architecture regex renames (GPT-NeoX's `embed_out` is `lm_head` in the
    model, old checkpoints say `gamma` for `weight`, ...); we apply the plain renames. Conversions
    that merge several tensors into one (fused MoE experts) are not streamable one tensor at a time:
    their tensors stay unmatched, and the load fails naming the model's tensors that are missing.
    """
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        rules = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    except (ImportError, AttributeError):  # an older transformers: names are used as they are
        rules = []
    pairs = [(re.compile(s), t) for r in rules for s, t in zip(r.source_patterns, r.target_patterns)]

    def rename(key: str) -> str:
        for pattern, target in pairs:
            key = pattern.sub(target, key)
        return key

    return rename


def resolve_key(model_keys: set[str], key: str, prefix: str) -> str | None:
    if key in model_keys:
        return key
    if prefix and f"{prefix}.{key}" in model_keys:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_keys:
        return key[len(prefix) + 1:]
    return None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


def _finish(model: nn.Module, device: torch.device, missing_ok: set[str]) -> None:
    """Tie embeddings, rebuild computed buffers (RoPE), and refuse anything still unloaded."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and getattr(model.config, "tie_word_embeddings", False):
        if out.weight.is_meta:  # tied checkpoints store one of the two names
            out.weight = inp.weight
        elif inp.weight.is_meta:
            inp.weight = out.weight
    for mod in model.modules():  # non-persistent buffers (RoPE inv_freq, embed scales) are computed, not stored
        meta = [k for k, b in mod._buffers.items()
                if b is not None and b.is_meta and k in mod._non_persistent_buffers_set]
        if not meta:
            continue
        for t in list(mod.parameters(recurse=False)) + [b for b in mod.buffers(recurse=False) if not b.is_meta]:
            t._is_hf_initialized = True  # transformers' init functions skip tensors marked so: keep loaded ones
        for k in meta:
            mod._buffers[k] = torch.empty_like(mod._buffers[k], device=device)
        model._init_weights(mod)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p is not None and p.is_meta and n not in missing_ok]  # Linear4bit's weight is a buffer
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")


@dataclass
class LoadReport:
    """What `load_model` did: counts, bytes, seconds, peak RSS."""

    quantized: int = 0
    prequantized: int = 0
    other_tensors: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    unexpected_keys: list[str] = field(default_factory=list)


def load_model(name_or_path: str | os.PathLike, quant: str | None = "nf4", double_quant: bool = True,
               compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               blocksize: int = 64, trust_remote_code: bool = False, load_tokenizer: bool = True,
               rounding: str = "nearest"):
    """(model, tokenizer) with every linear layer but lm_head quantized to 4-bit (quant="nf4"|"fp4").

    quant=None loads the 16-bit model. compute_dtype defaults to bf16 on CUDA, fp32 elsewhere; the
    unquantized parts (embeddings, norms, lm_head) are stored in it. The tokenizer is None when the
    directory has none. `rounding` is passed to `quantize_4bit` ("bnb-cpu" reproduces bitsandbytes' CPU
    bytes). `model.fourbit_load_report` holds a LoadReport.
    """
    quant = normalize_quant(quant)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = parse_dtype(compute_dtype) or default_compute_dtype(device)
    t0 = time.perf_counter()
    src = resolve_source(name_or_path)
    if src.is_file():
        if src.suffix != ".gguf":
            raise UserError(f"{src} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
        model, tok, quantized = load_gguf(src, quant, double_quant, compute_dtype, device, blocksize, load_tokenizer)
        report = LoadReport(quantized=quantized)
    else:
        model, report = _load_safetensors(src, quant, double_quant, compute_dtype, device, blocksize,
                                          trust_remote_code, rounding)
        tok = load_tokenizer_from(src) if load_tokenizer else None
    model.config._name_or_path = str(name_or_path)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    model.fourbit_load_report = report
    return model.eval(), tok


def _load_safetensors(src: Path, quant, double_quant, compute_dtype, device, blocksize, trust_remote_code,
                      rounding="nearest"):
    config = load_config(src, trust_remote_code)
    model = meta_model(config, compute_dtype, trust_remote_code)
    keys = checkpoint_keys(src)
    preq = prequantized_modules(keys)
    report = LoadReport()
    for name, qt in preq.items():  # shells for weights stored 4-bit
        linear4bit_shells(model, [name], qt, compute_dtype=compute_dtype)
    to_quantize = set()
    if quant is not None and not preq:
        to_quantize = set(find_linear_names(model))
        linear4bit_shells(model, to_quantize, quant, blocksize=blocksize, double_quant=double_quant,
                          compute_dtype=compute_dtype)
    model_keys = set(model.state_dict(keep_vars=True).keys()) | {f"{n}.weight" for n in preq | dict.fromkeys(to_quantize)}
    prefix = getattr(model, "base_model_prefix", "")
    rename = key_renamer(model)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    need = {n: {k for k in keys if k == f"{n}.weight" or k.startswith(f"{n}.weight.")} for n in preq}
    from tqdm.auto import tqdm

    for key, t in tqdm(iter_checkpoint(src), total=len(keys), desc="loading", unit="tensor", leave=False,
                       disable=len(keys) < 50):
        mod_name = key.rsplit(".weight", 1)[0] if ".weight" in key else None
        if mod_name in preq:
            pending.setdefault(mod_name, {})[key] = t
            if set(pending[mod_name]) == need[mod_name]:
                d = pending.pop(mod_name)
                state = QuantState.from_dict(d, f"{mod_name}.weight.", device=device, packed=d[f"{mod_name}.weight"])
                model.get_submodule(mod_name).set_quantized(d[f"{mod_name}.weight"].to(device), state)
                report.prequantized += 1
            continue
        name = resolve_key(model_keys, rename(key), prefix)
        if name is None:
            report.unexpected_keys.append(key)
            continue
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in to_quantize and leaf == "weight":
            w = t.to(device=device, dtype=compute_dtype)
            model.get_submodule(mod_name).set_quantized(*quantize_4bit(w, quant, blocksize, double_quant, rounding))
            report.quantized += 1
            del w
        else:
            _set_tensor(model, name, t.to(device=device, dtype=compute_dtype) if t.is_floating_point() else t.to(device))
            report.other_tensors += 1
    _finish(model, device, missing_ok=set())
    if quant is None and preq:  # asked for 16-bit: dequantize what was stored 4-bit
        dequantize_linears(model, compute_dtype, preq)
    return model, report


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def checkpoint_weight_reader(name_or_path: str | os.PathLike, model: nn.Module):
    """A function: module name -> that module's 16-bit weight, read from the model's safetensors.

    For LoftQ on a model loaded 4-bit (fourbit.nn.add_lora(init="loftq")): one tensor is read per
    call (see Note: One mapping per tensor), so the 16-bit model never exists in memory."""
    from safetensors import safe_open

    src = resolve_source(name_or_path)
    if src.is_file():
        raise UserError(f"{src} is a GGUF file; LoftQ needs the 16-bit weights as safetensors (a model directory)")
    rename, prefix = key_renamer(model), getattr(model, "base_model_prefix", "")
    where = {}  # model-side name -> (shard, checkpoint key)
    for shard in checkpoint_shards(src):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                name = rename(key)
                where[name.removeprefix(prefix + ".") if prefix else name] = (shard, key)

    def read(module_name: str) -> torch.Tensor:
        key = f"{module_name}.weight"
        hit = where.get(key.removeprefix(prefix + ".") if prefix else key)
        if hit is None:
            raise UserError(f"{src} has no tensor {key} (LoftQ reads each layer's 16-bit weight from it)")
        with safe_open(str(hit[0]), framework="pt") as f:
            return f.get_tensor(hit[1])

    return read
