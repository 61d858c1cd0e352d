"""`fourbit memory`: predict the peak memory of a QLoRA run from config.json alone, before launch.

Weights and optimizer state are arithmetic over the architecture, built on the meta device (no
memory): 4-bit linears at `quantized_nbytes` (4.127 bits/parameter with double quantization,
4.5 without), embeddings/lm_head/norms in the compute dtype, LoRA parameters (fp32) with their
gradients and AdamW states (8 bytes/parameter at 32 bit, ~2 at 8 bit), fourbit's one shared
dequantization buffer (the largest linear weight in the compute dtype).

Activations are measured, not guessed: one and two decoder layers (with LoRA, frozen base) run a
forward pass on the meta device under `saved_tensors_hooks`, which records every tensor autograd
keeps for backward; the difference is what one layer keeps, whatever the architecture's code
does. With gradient checkpointing a layer keeps only its input, and one layer's activations are
rebuilt during backward. The loss keeps the hidden states of labelled positions and one chunk of
fp32 logits (fourbit.loss), or the full B x T x V logits without chunking. A transient term covers
gradients in flight during backward (one layer's activations again), and a constant covers the
CUDA context and allocator slack on GPUs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fourbit.errors import UserError

CONFIGS = Path(__file__).with_name("configs")
GPU_OVERHEAD = 600 * 2**20  # bytes: CUDA context + cuBLAS workspace + allocator slack (measured ~0.5-0.7 GB)
OPTIM_STATE_BYTES = {"adamw": 8.0, "paged_adamw": 8.0, "adamw8bit": 2 + 8 / 256, "paged_adamw8bit": 2 + 8 / 256}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 2**30,
          "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}  # GPU "24GB" means GiB in practice


def parse_size(text: str) -> int:
    """'24GB', '24 GiB', '80G', '24000MB' -> bytes (GB/G read as GiB, as GPU sizes are quoted)."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"--gpu: cannot read {text!r} as a memory size; expected e.g. 24GB, 24GiB, 80G or 24000MB")
    return int(float(m.group(1)) * _UNITS[unit])


def load_architecture(name_or_path: str):
    """A transformers config from a shipped name (llama-7b...), an embedded name, a directory or a config.json."""
    from transformers import AutoConfig

    shipped = CONFIGS / f"{name_or_path}.json"
    p = shipped if shipped.is_file() else Path(name_or_path)
    if not p.exists():
        from fourbit.embedded import EMBEDDED, resolve_model

        if name_or_path not in EMBEDDED:
            names = sorted(f.stem for f in CONFIGS.glob("*.json"))
            raise UserError(f"--model {name_or_path!r}: not a config.json, a model directory, the embedded "
                            f"smollm2-135m, or a shipped config ({', '.join(names)})")
        p = Path(resolve_model(name_or_path))
    if p.is_dir():
        p = p / "config.json"
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--model {p}: cannot read config.json ({e})") from None
    if "model_type" not in raw:
        raise UserError(f"{p}: config has no 'model_type'; cannot tell the architecture")
    raw.pop("quantization_config", None)
    need = ["hidden_size", "num_hidden_layers", "vocab_size"]
    missing = [k for k in need if k not in raw and not any(k2 in raw for k2 in _ALIASES.get(k, []))]
    if missing:
        raise UserError(f"{p}: config lacks {missing}; fourbit memory needs the architecture's sizes")
    try:
        cfg_cls = AutoConfig.for_model(raw["model_type"]).__class__
    except ValueError:
        raise UserError(f"{p}: unknown architecture model_type={raw['model_type']!r}") from None
    return cfg_cls.from_dict(raw)


_ALIASES = {"hidden_size": ["n_embd", "d_model"], "num_hidden_layers": ["n_layer", "num_layers"]}


@dataclass
class Plan:
    """A QLoRA run's settings, as `fourbit memory` flags."""

    model: str = field(default="smollm2-135m", metadata={"help": "config.json, model directory, smollm2-135m, or "
                                                                "llama-7b / llama-13b / llama-33b / llama-65b"})
    seq: int = field(default=512, metadata={"help": "sequence length in tokens"})
    batch: int = field(default=1, metadata={"help": "sequences per micro-batch"})
    r: int = field(default=64, metadata={"help": "LoRA rank (all linear layers but lm_head)"})
    optim: str = field(default="paged_adamw", metadata={"help": "adamw, paged_adamw, adamw8bit or paged_adamw8bit"})
    checkpointing: bool = field(default=False, metadata={"help": "gradient checkpointing"})
    quant: str = field(default="nf4", metadata={"help": "nf4, fp4 or none (16-bit base)"})
    double_quant: bool = field(default=True, metadata={"help": "double quantization"})
    dtype: str = field(default="bf16", metadata={"help": "compute dtype: bf16, fp16 or fp32"})
    device: str = field(default="cuda", metadata={"help": "cuda (adds the CUDA context) or cpu"})
    loss_chunk: int = field(default=512, metadata={"help": "labelled tokens per lm_head chunk (0: full logits)"})
    label_fraction: float = field(default=1.0, metadata={"help": "fraction of positions with a label (responses only)"})
    gpu: str | None = field(default=None, metadata={"help": "memory to fit in, e.g. 24GB, 48GiB, 80G"})
    json: bool = field(default=False, metadata={"help": "print {total_bytes, parts, fits, ...} as JSON"})

    def validate(self) -> list[str]:
        p = []
        for k in ("seq", "batch", "r"):
            if getattr(self, k) < 1:
                p.append(f"--{k} must be >= 1, got {getattr(self, k)}")
        if self.optim not in OPTIM_STATE_BYTES:
            p.append(f"--optim must be one of {', '.join(OPTIM_STATE_BYTES)}, got {self.optim!r}")
        if self.quant not in ("nf4", "fp4", "none"):
            p.append(f"--quant must be nf4, fp4 or none, got {self.quant!r}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            p.append(f"--dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if not 0 < self.label_fraction <= 1:
            p.append(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        return p


def _meta_lora_model(config, n_layers: int, dtype: torch.dtype, r: int):
    from fourbit.models import meta_model
    from fourbit.nn import add_lora

    cfg = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": n_layers, "use_cache": False})
    for k in ("layer_types",):  # per-layer lists must match the layer count
        if isinstance(getattr(cfg, k, None), list):
            setattr(cfg, k, getattr(config, k)[:n_layers])
    model = meta_model(cfg, dtype)
    add_lora(model, r=r, alpha=16, dropout=0.0, verbose=False, adapter_dtype=torch.float32)
    return model


class _FlashAttentionLike(torch.autograd.Function):
    """Stands in for SDPA while tracing on meta: keeps what fused attention kernels keep
    (q, k, v, output and a float32 log-sum-exp per query), not the T x T probabilities that the
    meta device's math fallback would."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):
        return g, g, g


def _sdpa_like(q, k, v, *args, **kwargs):
    return _FlashAttentionLike.apply(q, k, v)


def _saved_bytes(config, n_layers: int, dtype: torch.dtype, r: int, b: int, t: int) -> int:
    """Bytes autograd keeps for backward in a forward of the backbone with `n_layers` layers."""
    model = _meta_lora_model(config, n_layers, dtype, r)
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen, total = set(), 0

    def pack(x):
        nonlocal total
        # frozen weights (or their casts) are saved too; they are parameters, not activations
        if isinstance(x, torch.nn.Parameter) or tuple(x.shape) in weight_shapes or id(x) in seen:
            return x
        seen.add(id(x))
        total += x.numel() * x.element_size()
        return x

    import transformers.masking_utils as mu

    ids = torch.zeros((b, t), dtype=torch.long, device="meta")
    find_packed, sdpa = mu.find_packed_sequence_indices, torch.nn.functional.scaled_dot_product_attention
    mu.find_packed_sequence_indices = lambda position_ids: None  # it reads values (.item()): meta has none
    torch.nn.functional.scaled_dot_product_attention = _sdpa_like
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        mu.find_packed_sequence_indices = find_packed
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return total


def activation_model(config, dtype: torch.dtype, r: int) -> tuple[float, float, float, float]:
    """(layer intercept, layer bytes per token, rest intercept, rest bytes per token): what autograd
    keeps, traced at 64 and 128 tokens; with fused attention it is affine in batch x sequence."""
    pts = {}
    for t in (64, 128):
        one = _saved_bytes(config, 1, dtype, r, 1, t)
        two = _saved_bytes(config, 2, dtype, r, 1, t)
        pts[t] = (two - one, 2 * one - two)  # (one layer, everything outside the layers)
    layer_slope = (pts[128][0] - pts[64][0]) / 64
    rest_slope = (pts[128][1] - pts[64][1]) / 64
    return pts[64][0] - 64 * layer_slope, layer_slope, pts[64][1] - 64 * rest_slope, rest_slope


def _parts(plan: Plan, config, model, act, b: int, t: int) -> dict:
    from fourbit.nn import find_linear_names
    from fourbit.quant import quantized_nbytes

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.dtype]
    esize = torch.empty(0, dtype=dtype).element_size()
    linears = [model.get_submodule(n) for n in find_linear_names(model)]
    lin_params = sum(m.in_features * m.out_features for m in linears)
    other = sum(p.numel() for p in model.parameters()) - lin_params - \
        sum(m.bias.numel() for m in linears if m.bias is not None)
    parts = {}
    if plan.quant == "none":
        parts["base linear weights (16-bit)"] = lin_params * esize
    else:
        parts["quantized linear weights"] = sum(quantized_nbytes(m.in_features * m.out_features, 64, plan.double_quant)
                                                for m in linears)
    parts["embeddings, lm_head, norms"] = other * esize
    lora = sum(plan.r * (m.in_features + m.out_features) for m in linears)
    parts["LoRA parameters (fp32)"] = lora * 4
    parts["LoRA gradients (fp32)"] = lora * 4
    parts[f"optimizer states ({plan.optim})"] = int(lora * OPTIM_STATE_BYTES[plan.optim])
    if plan.quant != "none":
        parts["dequantization buffer"] = max(m.in_features * m.out_features for m in linears) * esize
    n_tok, L, h, v = b * t, config.num_hidden_layers, config.hidden_size, config.vocab_size
    layer = act[0] + act[1] * n_tok
    if plan.checkpointing:
        parts["activations (checkpointed layer inputs)"] = L * n_tok * h * esize
        parts["activations (one layer recomputed)"] = layer
    else:
        parts["activations"] = L * layer + act[2] + act[3] * n_tok
    n_lab = int(n_tok * plan.label_fraction)
    if plan.loss_chunk:
        # one chunk's logits at 20 bytes per element: the head's output, its fp32 copy, log-softmax,
        # and in backward (recomputed) their gradients; plus the gathered hidden states
        parts["logits (chunked loss)"] = n_lab * h * esize + 20 * min(plan.loss_chunk, n_lab) * v
    else:
        parts["logits (full)"] = 20 * n_tok * v  # as above, for every position at once
    parts["gradients in flight (backward)"] = layer
    if plan.device == "cuda":
        parts["CUDA context and allocator slack"] = GPU_OVERHEAD
    return {k: int(x) for k, x in parts.items()}, lora, lin_params


def predict(plan: Plan, config=None) -> dict:
    """{"total_bytes", "parts": {name: bytes}, "fits", ...} for the plan."""
    from fourbit.models import meta_model

    config = config or load_architecture(plan.model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.dtype]
    model = meta_model(config, dtype)
    act = activation_model(config, dtype, plan.r)
    total = lambda b, t: sum(_parts(plan, config, model, act, b, t)[0].values())  # noqa: E731
    parts, lora, lin_params = _parts(plan, config, model, act, plan.batch, plan.seq)
    out = {"total_bytes": sum(parts.values()), "parts": parts, "model": plan.model,
           "parameters": sum(p.numel() for p in model.parameters()), "lora_parameters": lora,
           "bits_per_parameter": None if plan.quant == "none"
           else round(8 * parts["quantized linear weights"] / lin_params, 4),
           "settings": {"seq": plan.seq, "batch": plan.batch, "r": plan.r, "optim": plan.optim,
                        "checkpointing": plan.checkpointing, "quant": plan.quant, "double_quant": plan.double_quant,
                        "dtype": plan.dtype}, "fits": None}
    if plan.gpu:
        budget = parse_size(plan.gpu)
        out.update(gpu_bytes=budget, fits=out["total_bytes"] <= budget,
                   max_seq_at_batch=_largest(lambda t: total(plan.batch, t) <= budget),
                   max_batch_at_seq=_largest(lambda b: total(b, plan.seq) <= budget))
    return out


def _largest(ok, hi: int = 1 << 22) -> int:
    """The largest n >= 0 with ok(n) (ok is monotone), by binary search."""
    if not ok(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def format_table(res: dict) -> str:
    gib = 2**30
    w = max(len(k) for k in res["parts"]) + 2
    lines = [f"{'part':<{w}} {'GiB':>8}"]
    lines += [f"{k:<{w}} {v / gib:8.3f}" for k, v in res["parts"].items()]
    lines.append(f"{'total (predicted peak)':<{w}} {res['total_bytes'] / gib:8.3f}")
    s = res["settings"]
    lines.append(f"{res['model']}: {res['parameters'] / 1e9:.2f}B parameters, LoRA r={s['r']} "
                 f"{res['lora_parameters'] / 1e6:.1f}M, seq {s['seq']} x batch {s['batch']}, "
                 f"{'checkpointing' if s['checkpointing'] else 'no checkpointing'}, {s['optim']}"
                 + (f", {res['bits_per_parameter']} bits/parameter" if res["bits_per_parameter"] else ""))
    if res.get("gpu_bytes"):
        verdict = "fits" if res["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {res['gpu_bytes'] / gib:.1f} GiB; at this batch the longest sequence that fits "
                     f"is ~{res['max_seq_at_batch']}, at this length the largest batch is ~{res['max_batch_at_seq']}")
    return "\n".join(lines)


def memory_main(argv: list[str]) -> int:
    from fourbit.config import parse_cli

    plan = parse_cli(Plan, argv, prog="fourbit memory", description="Predict the peak memory of a QLoRA run.")
    res = predict(plan)
    print(json.dumps(res, indent=2) if plan.json else format_table(res))
    return 0


def paper_comparison() -> list[dict]:
    """The paper's settings (NF4+DQ, bf16, r=64 all linear, paged AdamW, checkpointing, batch 1, seq 512)."""
    paper = {"llama-7b": 5, "llama-13b": 10, "llama-33b": 21, "llama-65b": 41}
    rows = []
    for name, gb in paper.items():
        res = predict(Plan(model=name, seq=512, batch=1, r=64, checkpointing=True, gpu="48GB"))
        rows.append({"model": name, "predicted_gib": res["total_bytes"] / 2**30,
                     "weights_gib": res["parts"]["quantized linear weights"] / 2**30
                     + res["parts"]["embeddings, lm_head, norms"] / 2**30,
                     "paper_gb": gb, "fits_48gb": res["fits"]})
    return rows
