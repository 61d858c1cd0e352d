"""Merging a LoRA adapter into its base model, measuring what that cost, and exporting to GGUF.

`merge_adapter` (`fourbit merge`) loads the base the way the adapter was trained (4-bit NF4 by
default), loads the adapter, and records the logits of this unmerged model on a few texts. It
then folds `scaling * B @ A` into each base weight, in float32 from the dequantized 4-bit weight,
casts the result to the output dtype (and, with `quantize`, quantizes it to 4-bit again in
bitsandbytes' format), writes a directory that `AutoModelForCausalLM.from_pretrained` loads,
reloads what it wrote and compares: max |logit difference| and perplexity, merged vs unmerged,
on the same tokens. See Note: What merging costs.

`write_gguf` writes a merged Llama-architecture model as a GGUF file (f16 or q8_0) for
llama.cpp-style runtimes, with the `gguf` package's writer: llama.cpp's metadata keys, the
byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`), and the tensors under llama.cpp's
names with q/k rows permuted to its rotary layout. See Note: Rotary layout in GGUF. Other
architectures and tokenizers are refused rather than written half right.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fourbit.errors import UserError

GGUF_TYPES = ("f16", "q8_0")
OUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GGUF_CHECK_MAX_PARAMS = 1_500_000_000  # reading a GGUF back with transformers takes 4 bytes/parameter
MAX_EVAL_TEXTS = 64  # the unmerged logits of every text are kept in memory: texts * tokens * vocab * 4 bytes
REPORT_NAME = "merge_report.json"

# Short texts of different kinds (prose, code, numbers, a dialogue) for measuring the merge.
DEFAULT_EVAL_TEXTS = (
    "The river ran high after a week of rain, and the old stone bridge, built in 1887, was closed "
    "until engineers could check its arches for cracks.",
    "def mean(xs):\n    total = 0.0\n    for x in xs:\n        total += x\n    return total / len(xs)\n",
    "Plants turn light into chemical energy: they take in carbon dioxide and water and give off oxygen, "
    "storing the energy as sugar.",
    None,  # a short dialogue in the tokenizer's chat template (Guanaco's format when it has none)
)
_DIALOGUE = [{"role": "user", "content": "How many legs does a spider have?"},
             {"role": "assistant", "content": "A spider has eight legs."}]


# -- merging ----------------------------------------------------------------------------------------
@dataclass
class MergeReport:
    """What merging cost, measured on `texts` texts (`tokens` predicted tokens) against the unmerged model.

    Logit differences are max/mean |merged - unmerged| over every position and vocabulary entry;
    perplexities are exp(mean NLL) over the same tokens; `top1_agreement` is the fraction of
    positions where both models rank the same token first. All computed in float32 from the
    weights as written to `output`.
    """

    model: str
    adapter: str
    output: str
    dtype: str
    base_quant: str | None
    quantize: str | None
    texts: int = 0
    tokens: int = 0
    max_abs_logit_diff: float = 0.0
    mean_abs_logit_diff: float = 0.0
    top1_agreement: float = 1.0
    ppl_unmerged: float = 0.0
    ppl_merged: float = 0.0
    ppl_change_pct: float = 0.0
    gguf: dict | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        kind = f"4-bit {self.quantize} ({self.dtype} compute)" if self.quantize else self.dtype
        lines = [f"merged {self.adapter} into {self.model} -> {self.output} ({kind})",
                 f"cost on {self.texts} texts / {self.tokens} tokens: max |logit diff| {self.max_abs_logit_diff:.3g}, "
                 f"mean {self.mean_abs_logit_diff:.3g}, top-1 agreement {self.top1_agreement:.1%}; perplexity "
                 f"{self.ppl_unmerged:.4f} unmerged -> {self.ppl_merged:.4f} merged ({self.ppl_change_pct:+.3f}%)"]
        if self.gguf:
            g = self.gguf
            line = f"gguf {g['type']}: {g['path']} ({g['bytes'] / 2**20:.1f} MiB)"
            if "max_abs_logit_diff" in g:
                line += (f"; vs unmerged: max |logit diff| {g['max_abs_logit_diff']:.3g}, perplexity "
                         f"{g['ppl']:.4f} ({g['ppl_change_pct']:+.3f}%)")
            lines.append(line)
            lines += [f"warning: {w}" for w in g.get("warnings", [])]
        return "\n".join(lines)


def merge_adapter(model_name_or_path: str | os.PathLike, adapter_dir: str | os.PathLike, output: str | os.PathLike,
                  dtype: str = "bf16", quantize: str | None = None, gguf: str | None = None,
                  base_quant: str | None = "nf4", double_quant: bool = True, eval_texts: list[str] | None = None,
                  max_tokens: int = 256, overwrite: bool = False, check_gguf: bool | None = None,
                  device: str | torch.device | None = None) -> MergeReport:
    """Merge a LoRA adapter into its base model and write the result to `output`; returns a MergeReport.

    The base is loaded as the adapter was trained (`base_quant` "nf4", "fp4" or None for 16/32-bit).
    The merged weights are computed in float32 and stored as `dtype` ("bf16", "fp16", "fp32"), or
    quantized to 4-bit (`quantize` "nf4"/"fp4", bitsandbytes' format). `gguf` ("f16"/"q8_0") also
    writes `output/model-<type>.gguf` from the 16-bit merge (Llama architecture only); `check_gguf`
    reads it back with transformers (fp32, 4 bytes per parameter; None: only up to
    GGUF_CHECK_MAX_PARAMS parameters) and measures it like the merge. The report is printed by the
    CLI and written to `output/merge_report.json`.
    """
    from fourbit.models import load_model, normalize_quant
    from fourbit.nn import load_adapter, merge_lora, read_adapter_config

    t0 = time.perf_counter()
    out_dtype = _out_dtype(dtype)
    base_quant, quantize = normalize_quant(base_quant), normalize_quant(quantize)
    if gguf is not None and gguf not in GGUF_TYPES:
        raise UserError(f"gguf type must be one of {GGUF_TYPES}, got {gguf!r}")
    if max_tokens < 2:
        raise UserError(f"max_tokens must be at least 2 (one token predicts the next), got {max_tokens}")
    out = Path(output)
    _check_output(out, overwrite, model_name_or_path, adapter_dir)
    if gguf is not None:
        _check_gguf_source(model_name_or_path)
    read_adapter_config(adapter_dir)  # a missing or malformed adapter fails before the model loads

    model, tok = load_model(model_name_or_path, quant=base_quant, double_quant=double_quant,
                            compute_dtype=torch.float32, device=device)
    if tok is None:
        raise UserError(f"model {model_name_or_path} has no tokenizer files; merge needs one to measure the merge "
                        f"and to copy it next to the merged weights")
    if gguf is not None:
        check_gguf_supported(model.config)
    try:
        load_adapter(model, adapter_dir)
    except UserError as e:
        why = str(e).removeprefix(f"adapter {Path(adapter_dir)}: ")
        raise UserError(f"adapter {adapter_dir} does not fit model {model_name_or_path}: {why}") from None
    texts = resolve_eval_texts(eval_texts, tok)
    ids = [tokenize_text(tok, t, max_tokens) for t in texts]
    reference = [_logits(model, x) for x in ids]  # the unmerged adapter model, fp32 compute

    merge_lora(model, dtype=out_dtype)  # W + scaling * B @ A in float32, then cast (see LoraLinear.merge)
    dequantize_linears(model, out_dtype)  # base layers the adapter did not touch
    model.to(out_dtype)
    model.config.dtype = out_dtype
    report = MergeReport(model=str(model_name_or_path), adapter=str(adapter_dir), output=str(out), dtype=dtype,
                         base_quant=base_quant, quantize=quantize)
    n_params = sum(p.numel() for p in model.parameters())
    _clear_output(out)
    gguf_path = None
    if gguf is not None:  # from the 16-bit merge, before any 4-bit rounding
        gguf_path = out / f"model-{gguf}.gguf"
        warnings = write_gguf(model, tok, gguf_path, gguf)
        report.gguf = {"type": gguf, "path": str(gguf_path), "bytes": gguf_path.stat().st_size, "warnings": warnings}
    _save_merged(model, tok, out, quantize, double_quant, out_dtype)
    del model

    merged, _ = load_model(out, quant=quantize, compute_dtype=torch.float32, device=device, load_tokenizer=False)
    _fill_costs(report, reference, [_logits(merged, x) for x in ids], ids)
    del merged
    if gguf_path is not None:
        if check_gguf or (check_gguf is None and n_params <= GGUF_CHECK_MAX_PARAMS):
            report.gguf.update(_gguf_costs(gguf_path, reference, ids))
        else:
            report.gguf["warnings"].append(f"not read back: transformers' GGUF loader would need "
                                           f"{4 * n_params / 2**30:.1f} GiB (fp32); --check-gguf yes to force")
    report.files = sorted(p.name for p in out.iterdir()) + [REPORT_NAME]
    report.seconds = round(time.perf_counter() - t0, 2)
    (out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _out_dtype(name: str) -> torch.dtype:
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    name = aliases.get(name, name)
    if name not in OUT_DTYPES:
        raise UserError(f"dtype must be one of {list(OUT_DTYPES)}, got {name!r}")
    return OUT_DTYPES[name]


def _check_output(out: Path, overwrite: bool, *inputs) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is a file; pass a directory")
    for src in inputs:
        if Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UserError(f"output {out} is the input directory {src}; write the merged model somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace the model files in it, "
                        f"or choose another directory")


def _clear_output(out: Path) -> None:
    """`out` without the files a merge writes (--overwrite: an old .gguf or shards must not mix with the
    new model); files of other names are left alone."""
    from fourbit.models import TOKENIZER_FILES

    out.mkdir(parents=True, exist_ok=True)
    patterns = ("model*.safetensors", "model.safetensors.index.json", "model-*.gguf", "config.json", REPORT_NAME,
                *TOKENIZER_FILES)
    for pattern in patterns:
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink()


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every Linear4bit by an nn.Linear holding its dequantized weight (in place); returns how many."""
    from fourbit.nn import Linear4bit

    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in names:
        q = model.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin.requires_grad_(False))
    return len(names)


def _save_merged(model: nn.Module, tok, out: Path, quantize: str | None, double_quant: bool,
                 dtype: torch.dtype) -> None:
    from fourbit.models import bnb_quantization_config, quantize_model, save_model

    quant_info = None
    if quantize is not None:
        quantize_model(model, quantize, double_quant, compute_dtype=dtype)
        head = model.get_output_embeddings()
        skip = sorted({n.split(".")[-1] for n, m in model.named_modules() if m is head}) or ["lm_head"]
        quant_info = bnb_quantization_config(quantize, double_quant, dtype, skip)
    save_model(model, out, tok, quant_info)


# -- measuring ---------------------------------------------------------------------------------------
# Note: What merging costs
# In exact arithmetic a merged model equals the unmerged one. Three things make them differ, and the
# report measures their sum on the same tokens: (1) float32 rounding of W + s*B@A (~1e-6 relative),
# (2) rounding the merged weights to the stored dtype (bf16 keeps 8 mantissa bits: ~0.4% per weight),
# (3) with --quantize, rounding them to 16 NF4 levels per block again, which is the big one: the
# adapter's update is small next to a 4-bit step, so part of it is rounded away. Both models are
# evaluated in float32 from the weights as written, so the numbers are about the files, not the
# compute dtype of whoever runs them.
def resolve_eval_texts(texts: list[str] | None, tok) -> list[str]:
    if texts is None:
        texts = [t if t is not None else _dialogue(tok) for t in DEFAULT_EVAL_TEXTS]
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError("no evaluation texts: the eval file has no non-empty texts")
    if len(texts) > MAX_EVAL_TEXTS:
        raise UserError(f"{len(texts)} evaluation texts; at most {MAX_EVAL_TEXTS} (the unmerged model's logits for "
                        f"every text are kept in memory), so pass a shorter --eval-file")
    return texts


def _dialogue(tok) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(_DIALOGUE, tokenize=False)
    return "".join(f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in _DIALOGUE)


def read_eval_file(path: str | os.PathLike) -> list[str]:
    """Texts from a .jsonl file (a "text" field per line) or a text file (one text per non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--eval-file {p}: no such file")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix != ".jsonl":
        return lines
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--eval-file {p}, line {i}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"--eval-file {p}, line {i}: expected an object with a string \"text\" field")
        texts.append(row["text"])
    return texts


def tokenize_text(tok, text: str, max_tokens: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"][:, :max_tokens]  # (1, T)
    if ids.shape[1] < 2:
        raise UserError(f"evaluation text {text[:40]!r} is shorter than 2 tokens; nothing to predict")
    return ids


@torch.inference_mode()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[0].float().cpu()  # (T, V)


def compare_logits(reference: list[torch.Tensor], other: list[torch.Tensor], ids: list[torch.Tensor] | None = None
                   ) -> dict:
    """max/mean |difference|, top-1 agreement, and both perplexities (when `ids` are given)."""
    diffs = [(a - b).abs() for a, b in zip(reference, other)]
    n = sum(d.numel() for d in diffs)
    res = {"max_abs_logit_diff": max(d.max().item() for d in diffs),
           "mean_abs_logit_diff": sum(d.sum().item() for d in diffs) / n,
           "top1_agreement": sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(reference, other))
           / sum(a.shape[0] for a in reference)}
    if ids is not None:
        res["ppl_reference"], res["tokens"] = _perplexity(reference, ids)
        res["ppl"], _ = _perplexity(other, ids)
        res["ppl_change_pct"] = 100 * (res["ppl"] / res["ppl_reference"] - 1)
    return res


def _perplexity(logits: list[torch.Tensor], ids: list[torch.Tensor]) -> tuple[float, int]:
    """exp(mean NLL) of each next token, pooled over texts; and how many tokens were predicted."""
    nll, count = 0.0, 0
    for lg, x in zip(logits, ids):
        targets = x[0, 1:]  # (T-1,)
        nll += torch.nn.functional.cross_entropy(lg[:-1].double(), targets, reduction="sum").item()
        count += targets.numel()
    return float(np.exp(nll / count)), count


def _fill_costs(report: MergeReport, reference: list[torch.Tensor], merged: list[torch.Tensor],
                ids: list[torch.Tensor]) -> None:
    c = compare_logits(reference, merged, ids)
    report.texts, report.tokens = len(reference), c["tokens"]
    report.max_abs_logit_diff, report.mean_abs_logit_diff = c["max_abs_logit_diff"], c["mean_abs_logit_diff"]
    report.top1_agreement = c["top1_agreement"]
    report.ppl_unmerged, report.ppl_merged, report.ppl_change_pct = c["ppl_reference"], c["ppl"], c["ppl_change_pct"]


# -- GGUF ------------------------------------------------------------------------------------------
# Note: Rotary layout in GGUF
# transformers' Llama rotates each head's dims in two halves (dim i pairs with dim i + D/2,
# `rotate_half`); llama.cpp's Llama rope pairs neighbours (dim 2i with 2i + 1). llama.cpp's HF
# converter therefore reorders the output rows of W_q and W_k within each head so that pair
# (i, i + D/2) lands on rows (2i, 2i + 1); q.k is unchanged because both sides move alike.
# transformers' GGUF loader applies the inverse, so a round trip gives back the same model. With
# grouped-query attention W_k has n_kv_heads heads, so it is reordered per KV head.
def rotary_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (n_heads * D, ...) from half-split to interleaved pairs."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # (H, 2, D/2) -> (H, D/2, 2)


def _rope(config) -> tuple[float, str]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def check_gguf_supported(config) -> None:
    """UserError unless fourbit can write this model as a GGUF llama.cpp and transformers read back."""
    arch = getattr(config, "model_type", "?")
    if arch != "llama":
        raise UserError(f"--gguf writes Llama-architecture models only (llama.cpp's 'llama' layout, e.g. SmolLM2, "
                        f"Llama 2); this model is {arch!r}. Merge without --gguf, or convert the merged directory "
                        f"with llama.cpp's convert_hf_to_gguf.py")
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("it has attention/MLP biases")
    _, kind = _rope(config)
    if kind != "default":
        problems.append(f"its RoPE is scaled ({kind!r})")
    if problems:
        raise UserError(f"--gguf cannot export this Llama model: {'; '.join(problems)}. Merge without --gguf, or "
                        f"convert the merged directory with llama.cpp's convert_hf_to_gguf.py")


def _check_gguf_source(model_name_or_path) -> None:
    """Refuse --gguf for a non-Llama model before spending minutes loading it (directories only)."""
    from fourbit.models import load_config, resolve_source

    src = resolve_source(model_name_or_path)
    if src.is_dir():
        check_gguf_supported(load_config(src))


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, gguf_type: str = "f16") -> list[str]:
    """Write a (merged, unquantized) Llama model + its tokenizer as a GGUF file; returns warnings.

    `gguf_type` "f16": 2-D weights in float16; "q8_0": in llama.cpp's Q8_0 (blocks of 32 int8 with an
    fp16 scale), falling back to f16 for rows not a multiple of 32. Norm weights stay float32, as
    llama.cpp's converter writes them. Tensors are converted and written one at a time.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf type must be one of {GGUF_TYPES}, got {gguf_type!r}")
    config = model.config
    check_gguf_supported(config)
    path = Path(path)
    warnings: list[str] = []
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_llama_metadata(writer, config, gguf_type, path)
        warnings += _add_tokenizer(writer, tokenizer, config)
        plan = _tensor_plan(model, gguf_type, warnings)
        for name, _, shape, qtype in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from tqdm.auto import tqdm

        state = model.state_dict()
        for name, key, _, qtype in tqdm(plan, desc=f"writing gguf {gguf_type}", unit="tensor", leave=False,
                                        disable=len(plan) < 50):
            writer.write_tensor_data(_gguf_array(name, state[key], qtype, config).view(np.uint8))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return warnings


def _add_llama_metadata(writer, config, gguf_type: str, path: Path) -> None:
    import gguf

    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, _ = _rope(config)
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or path.parent.name)).name or path.stem)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _tensor_plan(model: nn.Module, gguf_type: str, warnings: list[str]) -> list[tuple]:
    """(gguf name, state_dict key, shape, GGML type) for every tensor, in state_dict order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan, fallback = [], []
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when `output` is absent
        if not t.is_floating_point():
            raise UserError(f"tensor {key} is {t.dtype}; --gguf needs an unquantized (16/32-bit) merged model")
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {key} has no llama.cpp name; is this a standard Llama checkpoint?")
        qtype = gguf.GGMLQuantizationType.F32 if t.dim() == 1 else gguf.GGMLQuantizationType.F16
        if t.dim() == 2 and gguf_type == "q8_0":
            if t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                qtype = gguf.GGMLQuantizationType.Q8_0
            else:
                fallback.append(name)
        plan.append((name, key, tuple(t.shape), qtype))
    if fallback:
        warnings.append(f"{len(fallback)} tensor(s) have rows that are not a multiple of 32 and were written as f16 "
                        f"instead of q8_0, e.g. {fallback[0]}")
    return plan


def _gguf_array(name: str, t: torch.Tensor, qtype, config) -> np.ndarray:
    import gguf

    w = t.detach().to("cpu", torch.float32)
    heads = config.num_attention_heads
    if name.endswith("attn_q.weight"):
        w = rotary_to_interleaved(w, heads)
    elif name.endswith("attn_k.weight"):
        w = rotary_to_interleaved(w, getattr(config, "num_key_value_heads", None) or heads)
    a = w.contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        big = float(np.abs(a).max(initial=0.0))
        if big > float(np.finfo(np.float16).max):
            raise UserError(f"tensor {name} holds a value of magnitude {big:.3g}, beyond float16's range "
                            f"(65504); write --gguf q8_0 instead")
    return gguf.quants.quantize(a, qtype)


def _add_tokenizer(writer, tok, config) -> list[str]:
    """tokenizer.ggml.* for a byte-level BPE tokenizer; returns warnings."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"--gguf needs a fast (tokenizers) tokenizer; got {type(tok).__name__}")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(f"--gguf writes byte-level BPE tokenizers (llama.cpp's 'gpt2' tokenizer model, as in GPT-2, "
                        f"SmolLM, Llama 3); this one is a {bpe.get('type')} model"
                        f"{' with byte fallback (sentencepiece style)' if bpe.get('byte_fallback') else ''}. "
                        f"Merge without --gguf and convert with llama.cpp's convert_hf_to_gguf.py")
    warnings = []
    tokens, types = _vocab_table(tok, spec, config.vocab_size)
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        pre = "default"
        warnings.append("the tokenizer's pre-tokenizer is not one fourbit recognises (GPT-2's byte-level regex, or "
                        "SmolLM's digit split + byte-level); wrote tokenizer.ggml.pre = 'default', with which "
                        "llama.cpp may split text differently than transformers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if tid is None and kind != "unk":
            tid = getattr(config, f"{kind}_token_id", None)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    add_bos, add_eos = _adds_special_tokens(tok)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tok, "chat_template", None)
    if template:
        writer.add_chat_template(template)
    return warnings


def _vocab_table(tok, spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (ids no token uses: [PADn], UNUSED)."""
    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
                        f"is this the tokenizer the model was trained with?")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for the pre-tokenizers we can recognise exactly, else None."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if not pre:
        return None
    if byte_level(pre):
        return "gpt-2"  # GPT-2's split regex, then bytes to the byte alphabet
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"  # every digit alone, then GPT-2's regex
    return None


def _adds_special_tokens(tok) -> tuple[bool, bool]:
    """Whether encoding text puts BOS in front / EOS at the end, observed rather than read from config."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos


def _gguf_costs(path: Path, reference: list[torch.Tensor], ids: list[torch.Tensor]) -> dict:
    """The GGUF file read back by transformers' GGUF loader, measured like the merge."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as alone:  # the GGUF alone: nothing may come from config.json beside it
        (Path(alone) / path.name).symlink_to(path.resolve())
        m = AutoModelForCausalLM.from_pretrained(alone, gguf_file=path.name, dtype=torch.float32).eval()
    c = compare_logits(reference, [_logits(m, x) for x in ids], ids)
    return {k: c[k] for k in ("max_abs_logit_diff", "mean_abs_logit_diff", "top1_agreement", "ppl", "ppl_change_pct")}


# -- CLI -------------------------------------------------------------------------------------------
@dataclass
class MergeArgs:
    """fourbit merge --model M --adapter A --output DIR"""

    model: str = field(default="smollm2-135m", metadata={"help": "base model the adapter was trained on: directory, "
                                                                "hub id or smollm2-135m"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory (PEFT format; required)"})
    output: str = field(default="", metadata={"help": "directory to write the merged model to (required)"})
    dtype: str = field(default="bf16", metadata={"help": "dtype of the merged weights: bf16, fp16 or fp32"})
    quantize: str | None = field(default=None, metadata={"help": "quantize the merged weights to 4-bit (nf4 or fp4, "
                                                                 "bitsandbytes' format); default: keep them 16-bit"})
    gguf: str | None = field(default=None, metadata={"help": "also write DIR/model-<type>.gguf (f16 or q8_0) from "
                                                             "the 16-bit merge; Llama architecture only"})
    base_quant: str = field(default="nf4", metadata={"help": "how the adapter's base was loaded in training: nf4, "
                                                             "fp4 or none"})
    double_quant: bool = field(default=True, metadata={"help": "double quantization for the 4-bit base and for "
                                                               "--quantize (--no-double-quant: off)"})
    eval_file: str | None = field(default=None, metadata={"help": "texts to measure the merge on: .jsonl with a "
                                                                  "\"text\" field, or one text per line (default: "
                                                                  "4 built-in texts)"})
    max_tokens: int = field(default=256, metadata={"help": "tokens per evaluation text (longer texts are cut)"})
    check_gguf: str = field(default="auto", metadata={"help": "read the GGUF back with transformers (fp32, 4 bytes "
                                                              "per parameter) and measure it too: yes, no, or auto "
                                                              "(yes up to 1.5B parameters)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)"})

    def validate(self) -> list[str]:
        p = []
        if not self.adapter:
            p.append("--adapter DIR is required")
        if not self.output:
            p.append("--output DIR is required")
        if self.dtype not in OUT_DTYPES:
            p.append(f"--dtype must be one of {list(OUT_DTYPES)}, got {self.dtype!r}")
        if self.quantize not in (None, "none", "nf4", "fp4"):
            p.append(f"--quantize must be nf4 or fp4, got {self.quantize!r}")
        if self.gguf not in (None, *GGUF_TYPES):
            p.append(f"--gguf must be one of {list(GGUF_TYPES)}, got {self.gguf!r}")
        if self.base_quant not in ("nf4", "fp4", "none"):
            p.append(f"--base-quant must be nf4, fp4 or none, got {self.base_quant!r}")
        if self.check_gguf not in ("auto", "yes", "no"):
            p.append(f"--check-gguf must be auto, yes or no, got {self.check_gguf!r}")
        if self.max_tokens < 2:
            p.append(f"--max-tokens must be at least 2, got {self.max_tokens}")
        return p


def merge_main(argv: list[str]) -> int:
    from fourbit.config import parse_cli

    a = parse_cli(MergeArgs, argv, prog="fourbit merge",
                  description="Merge a LoRA adapter into its base model, report what merging cost, optionally "
                              "quantize to 4-bit and/or export GGUF.")
    texts = read_eval_file(a.eval_file) if a.eval_file else None
    r = merge_adapter(a.model, a.adapter, a.output, dtype=a.dtype, quantize=a.quantize, gguf=a.gguf,
                      base_quant=a.base_quant, double_quant=a.double_quant, eval_texts=texts, max_tokens=a.max_tokens,
                      overwrite=a.overwrite, check_gguf={"auto": None, "yes": True, "no": False}[a.check_gguf],
                      device=a.device)
    print(r.summary())
    print(f"report: {Path(a.output) / REPORT_NAME}")
    return 0
