"""Loading causal LMs with their linear layers quantized as the weights stream in; saving them.

`load_model` accepts a local safetensors checkpoint (sharded or not), a directory already
quantized by bitsandbytes or fourbit (loaded as is), a GGUF file, the embedded `smollm2-135m`,
or a hub name (downloaded when a hub is reachable). For safetensors it never materialises the
16-bit model: it builds the architecture on the meta device, swaps the linear layers (all but
lm_head) for empty `Linear4bit` shells, then reads the checkpoint one tensor at a time, quantizing
each linear weight on arrival. Peak memory is about the 4-bit model plus one 16-bit tensor. GGUF files go through transformers' own reader,
which dequantizes the whole file first, and are quantized afterwards. See Note: One mapping per tensor.

`quantize_checkpoint` (`fourbit quantize`) does the same streaming from disk to disk and writes
bitsandbytes' 4-bit layout plus a `quantization_config`, so transformers + bitsandbytes loads it.
Only safetensors files are read: pickled checkpoints (pytorch_model.bin) are refused.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fourbit.embedded import EMBEDDED, resolve_model
from fourbit.errors import UserError
from fourbit.nn.inject import _set_module, find_linear_names
from fourbit.nn.linear4bit import Linear4bit, default_compute_dtype
from fourbit.quant import QuantState, quantize_4bit

QUANT_CHOICES = ("nf4", "fp4", None)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def normalize_quant(quant: str | None) -> str | None:
    quant = None if quant in (None, "none", "None", "") else quant
    if quant not in QUANT_CHOICES:
        raise UserError(f"quant must be 'nf4', 'fp4' or 'none', got {quant!r}")
    return quant


# -- finding the weights ------------------------------------------------------------------------
def resolve_source(name_or_path: str | os.PathLike) -> Path:
    """A local directory or .gguf file for an embedded name, a path, or a hub repository id."""
    name = str(name_or_path)
    if name in EMBEDDED:
        return Path(resolve_model(name))
    p = Path(name).expanduser()
    if p.exists():
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _download(name)
    raise UserError(f"model {name!r} not found: no such file or directory, and not an embedded model "
                    f"({', '.join(EMBEDDED)}) or a hub id (owner/name)")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                               "*.model", "tokenizer*"]))
    except Exception as e:  # offline, unknown repo, gated: all say the same thing to the user
        raise UserError(f"model {repo_id!r} is not a local path and could not be fetched from the hub "
                        f"({type(e).__name__}: {str(e)[:200]})") from None


def checkpoint_shards(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickles:
        raise UserError(f"{directory} holds only pickled weights ({', '.join(pickles)}); fourbit reads safetensors "
                        f"only, since unpickling a file can run code. Convert it first (e.g. save_pretrained with "
                        f"safe_serialization=True in a trusted environment)")
    raise UserError(f"{directory} has no model.safetensors (or shards with an index); is it a model directory?")


def iter_checkpoint(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, one at a time.

    # Note: One mapping per tensor
    safetensors reads through a memory map; pages of the file that were read stay resident (and
    count in RSS) until the file is closed. Re-opening the shard for each tensor (a header parse,
    microseconds) releases them, so peak memory is the tensors we keep plus one in flight.
    """
    from safetensors import safe_open

    for shard in checkpoint_shards(directory):
        with safe_open(str(shard), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            with safe_open(str(shard), framework="pt") as f:
                t = f.get_tensor(key)
            yield key, t


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


def checkpoint_keys(directory: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for shard in checkpoint_shards(directory):
        with safe_open(str(shard), framework="pt") as f:
            keys.extend(f.keys())
    return keys


# -- building the model ---------------------------------------------------------------------------
def load_config(directory: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; is it a model directory?")
    try:
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise UserError(f"{directory}/config.json: {e}") from None


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
    that merge several tensors into one (fused MoE experts) are not streamable one tensor at a time;
    `check_no_merging` refuses such checkpoints.
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


def _resolve_key(model_keys: set[str], key: str, prefix: str) -> str | None:
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
        model, tok, report = _load_gguf(src, quant, double_quant, compute_dtype, device, blocksize, load_tokenizer)
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
        lin = model.get_submodule(name)
        _set_module(model, name, Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                            quant_type=qt, compute_dtype=compute_dtype, device="meta"))
    to_quantize = set()
    if quant is not None and not preq:
        to_quantize = set(find_linear_names(model))
        for name in to_quantize:
            lin = model.get_submodule(name)
            _set_module(model, name, Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                                quant_type=quant, blocksize=blocksize, double_quant=double_quant,
                                                compute_dtype=compute_dtype, device="meta"))
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
        name = _resolve_key(model_keys, rename(key), prefix)
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
        for name in preq:
            _set_module(model, name, _dequantized_linear(model.get_submodule(name), compute_dtype))
    return model, report


def _dequantized_linear(m: Linear4bit, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(m.dequantize(dtype))
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin.requires_grad_(False)


def _load_gguf(path: Path, quant, double_quant, compute_dtype, device, blocksize, load_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=compute_dtype)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.requires_grad_(False)
    report = LoadReport()
    if quant is not None:
        report.quantized = quantize_model(model, quant, double_quant, compute_dtype, blocksize, device)
    model.to(device)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if load_tokenizer else None
    return model, tok, report


def quantize_model(model: nn.Module, quant: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   device: torch.device | str | None = None) -> int:
    """Replace every linear layer but lm_head by a Linear4bit, in place; returns how many."""
    quant = normalize_quant(quant) or "nf4"
    names = find_linear_names(model)
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().to(device or lin.weight.device)
        q = Linear4bit.from_linear(lin, quant, blocksize, double_quant, compute_dtype, weight=w)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().to(w.device), requires_grad=False)
        _set_module(model, name, q)
        lin.weight = None  # drop the 16-bit weight now, not at the end
    return len(names)


def load_tokenizer_from(directory: Path):
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# -- saving ---------------------------------------------------------------------------------------
def bnb_quantization_config(quant: str, double_quant: bool, compute_dtype: torch.dtype,
                            skip: list[str]) -> dict:
    """The config.json block transformers + bitsandbytes expects for a 4-bit checkpoint."""
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _copy_side_files(src: Path, out: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, out / f)


def _write_config(config_dict: dict, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def save_model(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, quant_info: dict | None = None) -> Path:
    """Save a (possibly 4-bit) model as safetensors + config.json (+ tokenizer), atomically per file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:
        sd = {k: v for k, v in sd.items() if not (k.endswith("weight") and v is out_emb.weight and "lm_head" in k)}
    seen, tensors = {}, {}
    for k, v in sd.items():  # safetensors refuses shared storage: keep one name per tensor
        if v.data_ptr() in seen and v.numel() and seen[v.data_ptr()][1] == v.shape:
            continue
        seen[v.data_ptr()] = (k, v.shape)
        tensors[k] = v.detach().contiguous().cpu()
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    if quant_info is not None:
        cfg["quantization_config"] = quant_info
    _write_config(cfg, out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@dataclass
class QuantizeReport:
    tensors: int = 0
    quantized: int = 0
    params_quantized: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    largest_tensor_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    baseline_rss_bytes: int = 0


def quantize_checkpoint(model: str | os.PathLike, output: str | os.PathLike, quant: str = "nf4",
                        double_quant: bool = True, blocksize: int = 64, dtype: torch.dtype | str | None = None,
                        rounding: str = "nearest", overwrite: bool = False) -> QuantizeReport:
    """Stream a safetensors checkpoint into a bitsandbytes-format 4-bit checkpoint at `output`.

    Linear weights (not lm_head) are quantized one at a time; everything else is copied (cast to
    `dtype` when given). Peak memory ~ the quantized output + the largest input tensor.
    """
    from safetensors.torch import save_file

    quant = normalize_quant(quant)
    if quant is None:
        raise UserError("fourbit quantize needs --quant nf4 or fp4")
    dtype = parse_dtype(dtype)
    report = QuantizeReport(baseline_rss_bytes=peak_rss_bytes())
    t0 = time.perf_counter()
    src = resolve_source(model)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace its files")
    if src.is_file():  # GGUF: transformers dequantizes it whole; quantize from memory
        return _quantize_gguf_checkpoint(src, out, quant, double_quant, blocksize, dtype, report, t0)
    config = load_config(src)
    if getattr(config, "quantization_config", None) is not None:
        raise UserError(f"{src} is already quantized ({config.quantization_config.get('quant_method', '?')}); "
                        f"fourbit quantize needs a 16/32-bit checkpoint")
    skeleton = meta_model(config, torch.float32)
    linear = set(find_linear_names(skeleton))
    prefix = getattr(skeleton, "base_model_prefix", "")
    rename = key_renamer(skeleton)
    keys = set(skeleton.state_dict().keys())
    tied = bool(getattr(config, "tie_word_embeddings", False))
    from tqdm.auto import tqdm

    tensors: dict[str, torch.Tensor] = {}
    state_dtype = None
    for key, t in tqdm(iter_checkpoint(src), total=len(checkpoint_keys(src)), desc="quantizing", unit="tensor"):
        report.tensors += 1
        nbytes = t.numel() * t.element_size()
        report.bytes_in += nbytes
        report.largest_tensor_bytes = max(report.largest_tensor_bytes, nbytes)
        name = _resolve_key(keys, rename(key), prefix) or key
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in linear and leaf == "weight":
            w = t.to(dtype) if dtype is not None else t
            state_dtype = w.dtype
            packed, state = quantize_4bit(w, quant, blocksize, double_quant, rounding=rounding)
            tensors[key] = packed
            tensors.update({k: v.contiguous() for k, v in state.as_dict(key + ".").items()})
            report.quantized += 1
            report.params_quantized += t.numel()
        else:
            tensors[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        del t
    if tied:  # one copy of a tied embedding; the loader ties it back
        for k in [k for k in tensors if rename(k).endswith("lm_head.weight")]:
            del tensors[k]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    report.bytes_out = (out / "model.safetensors").stat().st_size
    cfg = json.loads((src / "config.json").read_text())
    compute = state_dtype or torch.float32
    cfg["quantization_config"] = bnb_quantization_config(quant, double_quant, compute, _skipped(skeleton))
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_config(cfg, out)
    _copy_side_files(src, out)
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _skipped(model: nn.Module) -> list[str]:
    from fourbit.nn.inject import _output_embedding_names

    return sorted(n.split(".")[-1] for n in _output_embedding_names(model)) or ["lm_head"]


def _quantize_gguf_checkpoint(src, out, quant, double_quant, blocksize, dtype, report, t0):
    model, tok, _ = _load_gguf(src, None, double_quant, dtype or torch.float32, torch.device("cpu"), blocksize, True)
    report.params_quantized = sum(model.get_submodule(n).weight.numel() for n in find_linear_names(model))
    report.quantized = quantize_model(model, quant, double_quant, dtype or torch.float32, blocksize)
    skip = _skipped(model)
    save_model(model, out, tok, bnb_quantization_config(quant, double_quant, dtype or torch.float32, skip))
    report.bytes_out = (out / "model.safetensors").stat().st_size
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    return report


# -- CLI ------------------------------------------------------------------------------------------
@dataclass
class QuantizeArgs:
    """fourbit quantize MODEL --output DIR"""

    model: str = field(default="smollm2-135m", metadata={"help": "model directory, .gguf file, embedded name "
                                                                "(smollm2-135m) or hub id"})
    output: str = field(default="", metadata={"help": "directory to write the 4-bit checkpoint to (required)"})
    quant: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4"})
    double_quant: bool = field(default=True, metadata={"help": "8-bit quantize the block constants (QLoRA's DQ); "
                                                               "--no-double-quant to keep them fp32"})
    blocksize: int = field(default=64, metadata={"help": "elements per quantization block (power of two, 32-4096)"})
    dtype: str | None = field(default=None, metadata={"help": "cast weights to fp32/bf16/fp16 first (default: as stored)"})
    rounding: str = field(default="nearest", metadata={"help": "nearest (bitsandbytes CUDA rule) or bnb-cpu "
                                                              "(byte-identical to bitsandbytes on CPU)"})
    overwrite: bool = field(default=False, metadata={"help": "replace files in a non-empty output directory"})

    def validate(self) -> list[str]:
        problems = []
        if not self.output:
            problems.append("--output DIR is required")
        if self.quant not in ("nf4", "fp4"):
            problems.append(f"--quant must be nf4 or fp4, got {self.quant!r}")
        if self.rounding not in ("nearest", "bnb-cpu"):
            problems.append(f"--rounding must be nearest or bnb-cpu, got {self.rounding!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        return problems


def quantize_main(argv: list[str]) -> int:
    from fourbit.config import parse_cli

    if argv and not argv[0].startswith("-"):  # the model may be given positionally
        argv = ["--model", argv[0], *argv[1:]]
    args = parse_cli(QuantizeArgs, argv, prog="fourbit quantize",
                     description="Quantize a model's linear layers to 4-bit, streaming one tensor at a time.")
    try:
        r = quantize_checkpoint(args.model, args.output, args.quant, args.double_quant, args.blocksize, args.dtype,
                                args.rounding, args.overwrite)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    mb = 1 / 2**20
    print(f"quantized {r.quantized} linear weights ({r.params_quantized / 1e6:.1f}M parameters) of {r.tensors} "
          f"tensors in {r.seconds:.1f} s -> {args.output}")
    print(f"size: {r.bytes_in * mb:.0f} MiB in, {r.bytes_out * mb:.0f} MiB out; "
          f"peak RSS {r.peak_rss_bytes * mb:.0f} MiB (process baseline {r.baseline_rss_bytes * mb:.0f} MiB, "
          f"largest input tensor {r.largest_tensor_bytes * mb:.0f} MiB)")
    return 0
