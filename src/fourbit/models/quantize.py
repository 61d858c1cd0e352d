"""Quantizing a checkpoint from disk to disk (`fourbit quantize`) and saving a 4-bit model.

`quantize_checkpoint` streams a safetensors checkpoint one tensor at a time (as the loader does,
fourbit.models.load) and writes bitsandbytes' 4-bit layout plus a `quantization_config`, so
transformers + bitsandbytes loads the result. Peak memory ~ the quantized output + the largest
input tensor. A GGUF source is read whole by transformers and quantized from memory.
`QuantizeArgs` is its one statement of options: `fourbit quantize`'s flags, checked once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fourbit.config import option
from fourbit.errors import UserError
from fourbit.models.gguf import load_gguf
from fourbit.models.load import (ModelArgs, choice_problems, key_renamer, meta_model, parse_dtype, peak_rss_bytes,
                                 resolve_key)
from fourbit.models.source import (TOKENIZER_FILES, check_finite, check_shape, checkpoint_keys, iter_checkpoint,
                                   load_config, resolve_source)
from fourbit.nn import find_linear_names, output_embedding_names, quantize_linears
from fourbit.outputs import MARKER, marker_of, refuse_unless_own, write_marker
from fourbit.quant import DTYPES, QUANT_TYPES, quantize_4bit
from fourbit.quant.blockwise import ROUNDING, check_blocksize


@dataclass
class QuantizeArgs:
    """fourbit quantize MODEL --output DIR"""

    model: str = option(ModelArgs, "model")
    output: str = field(default="", metadata={"help": "directory to write the 4-bit checkpoint to (required)"})
    quant: str = field(default="nf4", metadata={"help": f"4-bit data type: {' or '.join(QUANT_TYPES)}"})
    double_quant: bool = option(ModelArgs, "double_quant")
    blocksize: int = field(default=64, metadata={"help": "elements per quantization block (power of two, 32-4096)"})
    dtype: str | None = field(default=None, metadata={"help": f"cast weights to one of {', '.join(DTYPES)} first "
                                                              f"(default: as stored)"})
    rounding: str = field(default="nearest", metadata={"help": "nearest (bitsandbytes CUDA rule) or bnb-cpu "
                                                              "(byte-identical to bitsandbytes on CPU)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a model fourbit wrote in --output (only a "
                                                             "directory holding nothing but its files); the new one "
                                                             "is written beside it and swapped in"})

    def validate(self) -> list[str]:
        problems = [] if self.output else ["--output DIR is required"]
        problems += choice_problems(self.quant, QUANT_TYPES, "--quant")
        problems += choice_problems(self.rounding, ROUNDING, "--rounding")
        if not isinstance(self.dtype, torch.dtype):
            problems += choice_problems(self.dtype, (None, *DTYPES), "--dtype")
        try:
            check_blocksize(self.blocksize)
        except ValueError as e:
            problems.append(f"--{e}")
        return problems


# -- saving -------------------------------------------------------------------------------------
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


def bnb_skip_modules(model: nn.Module) -> list[str]:
    """bitsandbytes' `llm_int8_skip_modules`: the leaf names of the output embedding left unquantized."""
    return sorted(n.split(".")[-1] for n in output_embedding_names(model)) or ["lm_head"]


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


# -- disk to disk -------------------------------------------------------------------------------
@dataclass
class QuantizeReport:
    notes: list[str] = field(default_factory=list)  # e.g. a directory repaired after a killed run
    tensors: int = 0
    quantized: int = 0
    params_quantized: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    largest_tensor_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    baseline_rss_bytes: int = 0


def quantize_checkpoint(model: str | os.PathLike, output: str | os.PathLike, **options) -> QuantizeReport:
    """Stream a safetensors checkpoint into a bitsandbytes-format 4-bit checkpoint at `output`.

    `options` are QuantizeArgs' fields (quant, double_quant, blocksize, dtype, rounding, overwrite).
    Linear weights (not lm_head) are quantized one at a time; everything else is copied (cast to
    `dtype` when given). Every tensor's shape is checked against the architecture config.json
    describes, and every value for NaN/Inf, before anything is written. The result is written beside
    `output` and renamed into place (fourbit.outputs.StagedDir); `overwrite` replaces only a model
    fourbit wrote. Peak memory ~ the quantized output + the largest input tensor.
    """
    from fourbit.config import validate
    from fourbit.outputs import StagedDir, check_output

    a = validate(QuantizeArgs(model=str(model), output=str(output), **options))
    dtype = parse_dtype(a.dtype)
    report = QuantizeReport(baseline_rss_bytes=peak_rss_bytes())
    t0 = time.perf_counter()
    out = check_output(output, {"MODEL": model})
    src = resolve_source(model)
    out = check_output(out, {"MODEL": src})  # a hub id or embedded name: the directory it names
    staged = StagedDir(out)
    note = staged.recover()
    report.notes += [note] if note else []
    check_replaceable(out, a.overwrite)
    work = staged.begin()
    try:
        if src.is_file():  # GGUF: transformers dequantizes it whole; quantize from memory
            _quantize_gguf_checkpoint(src, work, a.quant, a.double_quant, a.blocksize, dtype, report)
        else:
            _quantize_safetensors(src, work, a, dtype, report)
        write_marker(work, "fourbit quantize")
        staged.commit()
    except BaseException:
        staged.abort()  # the output directory is as it was
        raise
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _quantize_safetensors(src: Path, out: Path, a: QuantizeArgs, dtype, report: QuantizeReport) -> None:
    from safetensors.torch import save_file

    from fourbit.files import read_json_file

    config = load_config(src)
    if getattr(config, "quantization_config", None) is not None:
        raise UserError(f"{src} is already quantized ({config.quantization_config.get('quant_method', '?')}); "
                        f"fourbit quantize needs a 16/32-bit checkpoint")
    skeleton = meta_model(config, torch.float32)
    linear = set(find_linear_names(skeleton))
    prefix = getattr(skeleton, "base_model_prefix", "")
    rename = key_renamer(skeleton)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}  # what config.json implies
    tied = bool(getattr(config, "tie_word_embeddings", False))
    optional = {f"{n}.weight" for n in output_embedding_names(skeleton)} if tied else set()
    from tqdm.auto import tqdm

    tensors: dict[str, torch.Tensor] = {}
    seen, state_dtype = set(), None
    for key, t in tqdm(iter_checkpoint(src), total=len(checkpoint_keys(src)), desc="quantizing", unit="tensor"):
        report.tensors += 1
        nbytes = t.numel() * t.element_size()
        report.bytes_in += nbytes
        report.largest_tensor_bytes = max(report.largest_tensor_bytes, nbytes)
        name = resolve_key(set(expected), rename(key), prefix)
        if name is not None:  # a tensor the architecture has: its shape must be the one config.json implies
            check_shape(key, t.shape, expected[name], src)
            seen.add(name)
        name = name or key
        mod_name, _, leaf = name.rpartition(".")
        if mod_name in linear and leaf == "weight":
            w = t.to(dtype) if dtype is not None else t
            state_dtype = w.dtype
            try:
                packed, state = quantize_4bit(w, a.quant, a.blocksize, a.double_quant, rounding=a.rounding)
            except ValueError:
                check_finite(key, w, src)  # the codec refuses NaN/Inf: name the tensor and the model
                raise
            tensors[key] = packed
            tensors.update({k: v.contiguous() for k, v in state.as_dict(key + ".").items()})
            report.quantized += 1
            report.params_quantized += t.numel()
        else:
            check_finite(key, t, src)
            tensors[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        del t
    if tied:  # one matrix under either name will do (fourbit's GGUF conversion keeps lm_head's)
        inp = skeleton.get_input_embeddings()
        emb = next((f"{n}.weight" for n, m in skeleton.named_modules() if m is inp), None)
        held = [k for k in tensors if rename(k).endswith("lm_head.weight")]
        if emb is not None and emb not in seen and held:
            tensors[emb] = tensors[held[0]]
            seen.add(emb)
    missing = sorted(set(expected) - seen - optional)
    if missing:
        raise UserError(f"{src}: the checkpoint lacks {len(missing)} tensor(s) its config.json's architecture "
                        f"needs, e.g. {missing[:3]}; nothing was written")
    if tied:  # one copy of a tied embedding; the loader ties it back
        for k in [k for k in tensors if rename(k).endswith("lm_head.weight")]:
            del tensors[k]
    tmp = out / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    report.bytes_out = (out / "model.safetensors").stat().st_size
    cfg = read_json_file(src / "config.json", "the model's config.json")
    compute = state_dtype or torch.float32
    cfg["quantization_config"] = bnb_quantization_config(a.quant, a.double_quant, compute, bnb_skip_modules(skeleton))
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_config(cfg, out)
    _copy_side_files(src, out)


def _quantize_gguf_checkpoint(src, out, quant, double_quant, blocksize, dtype, report) -> None:
    model, tok, _ = load_gguf(src, None, double_quant, dtype or torch.float32, torch.device("cpu"), blocksize, True)
    report.params_quantized = sum(model.get_submodule(n).weight.numel() for n in find_linear_names(model))
    report.quantized = quantize_linears(model, quant, double_quant, dtype or torch.float32, blocksize)
    skip = bnb_skip_modules(model)
    save_model(model, out, tok, bnb_quantization_config(quant, double_quant, dtype or torch.float32, skip))
    report.bytes_out = (out / "model.safetensors").stat().st_size


# -- what a model output directory may hold ----------------------------------------------------------
# The files fourbit writes into a model directory (quantize, merge): the model, its config, the
# tokenizer (as save_pretrained writes it), merge's report and GGUF file, the marker, and their
# temporary names.
MODEL_OUTPUT_FILES = frozenset({"model.safetensors", "config.json", "generation_config.json", "merge_report.json",
                                MARKER, "added_tokens.json", *TOKENIZER_FILES})
_MODEL_TMP = re.compile(r"^(model-[a-z0-9_]+\.gguf|\.model\.safetensors\.tmp|\.model-[a-z0-9_]+\.gguf\.tmp|"
                        r"\.[\w.-]+\.tmp)$")
WRITERS = ("fourbit quantize", "fourbit merge")


def is_model_output_file(p: Path) -> bool:
    return p.is_file() and (p.name in MODEL_OUTPUT_FILES or bool(_MODEL_TMP.match(p.name)))


def is_model_output(directory: Path) -> bool:
    """A model fourbit wrote: its marker, or (merges from before the marker) a merge_report.json. A
    quantized model from before the marker cannot be told from one downloaded from the hub, so it
    is not recognised: the user deletes it."""
    who = marker_of(directory)
    return who in WRITERS or (who is None and not (directory / MARKER).exists()
                              and (directory / "merge_report.json").is_file())


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless --overwrite and it is a model fourbit wrote (fourbit.outputs)."""
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace a model fourbit wrote "
                        f"there, or choose another directory")
    refuse_unless_own(out, is_model_output_file, is_model_output, "a model fourbit wrote (quantize or merge)")
