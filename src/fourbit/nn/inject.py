"""Putting adapters into a model: find the linear layers, wrap them, freeze everything else.

QLoRA puts LoRA on every linear layer of the transformer blocks (QLoRA §4: "LoRA on all linear
transformer block layers are required to match full finetuning performance"), not on lm_head.
`add_lora` does that by default, or wraps the layers whose leaf names are listed (PEFT's
`target_modules` semantics). It also prepares a quantized model for training the way PEFT's
`prepare_model_for_kbit_training` does: everything frozen, norms in fp32 (fp16 models; see
Note: Norms in bf16), inputs of the first block requiring grad when gradient checkpointing is on.

The LoRA settings are kept on the model as `model.lora_config` (a `LoraConfig`), which is what
`save_adapter` writes as adapter_config.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fourbit.errors import UserError
from fourbit.nn.linear4bit import Linear4bit
from fourbit.nn.loftq import WeightSource, init_loftq, read_weight
from fourbit.nn.lora import LoraLinear

log = logging.getLogger(__name__)
LINEAR_TYPES = (nn.Linear, Linear4bit)
INITS = ("default", "loftq")  # LoRA starting points: B = 0, or LoftQ (fourbit.nn.loftq)


@dataclass
class LoraConfig:
    """What adapter_config.json records (PEFT's field names)."""

    r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)
    use_rslora: bool = False
    base_model_name_or_path: str | None = None


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of lm_head-like modules (the output embedding), which QLoRA leaves alone."""
    names = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in ("lm_head", "embed_out"):
            names.add(name)
    return names


def find_linear_names(model: nn.Module, target: str | list[str] = "all-linear") -> list[str]:
    """Full names of the linear modules to wrap; UserError listing what exists when nothing matches."""
    skip = output_embedding_names(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n not in skip]
    if not linears:
        raise UserError(f"{type(model).__name__} has no linear layers (nn.Linear or Linear4bit) to put LoRA on")
    if target == "all-linear":
        return linears
    targets = [target] if isinstance(target, str) else list(target)
    chosen = [n for n in linears if n.split(".")[-1] in targets or n in targets]
    leaf_names = sorted({n.split(".")[-1] for n in linears})
    unmatched = [t for t in targets if not any(n.split(".")[-1] == t or n == t for n in linears)]
    if unmatched:
        raise UserError(f"LoRA target(s) {unmatched} match no linear layer; the model's linear layers are "
                        f"named {leaf_names} (or pass target='all-linear')")
    return chosen


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name`."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def linear4bit_shells(model: nn.Module, names, quant_type: str = "nf4", **kw) -> None:
    """Replace each named linear layer by an empty Linear4bit of its shape on the meta device: the
    streaming loader fills them with `set_quantized`; fourbit.memory's trace runs them empty."""
    for name in names:
        lin = model.get_submodule(name)
        set_module(model, name, Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                           quant_type=quant_type, device="meta", **kw))


def quantize_linears(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                     compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                     device: torch.device | str | None = None) -> int:
    """Replace every linear layer but lm_head by a Linear4bit holding its weight (in place); returns how many."""
    names = find_linear_names(model)
    for name in names:
        lin = model.get_submodule(name)
        w = lin.weight.detach().to(device or lin.weight.device)
        q = Linear4bit.from_linear(lin, quant_type, blocksize, double_quant, compute_dtype, weight=w)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().to(w.device), requires_grad=False)
        set_module(model, name, q)
        lin.weight = None  # drop the 16-bit weight now, not at the end
    return len(names)


def dequantize_linears(model: nn.Module, dtype: torch.dtype, names=None) -> int:
    """Replace every Linear4bit (or those named) by a frozen nn.Linear holding its weight, computed in
    float32 and rounded once to `dtype` (in place); returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)] if names is None else list(names)
    for name in names:
        q = model.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        set_module(model, name, lin.requires_grad_(False))
    return len(names)


def is_norm(module: nn.Module) -> bool:
    cls = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "RMSNorm" in cls or "LayerNorm" in cls


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze every parameter, keep norms in fp32 (fp16 models), optionally gradient checkpointing.

    # Note: Norms in bf16
    PEFT upcasts norm weights to fp32 for every k-bit model. transformers' RMSNorms already
    normalise in fp32 internally; an fp32 *weight* only makes the norm's output fp32, and with it
    every activation downstream (2x activation memory, a cast per linear layer, and lm_head
    receiving fp32 input). fp16 needs the fp32 weights for range; bf16 does not, so bf16 (and fp32)
    models keep their norms as they are.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if is_norm(m) and any(p.dtype == torch.float16 for p in m.parameters(recurse=False)):
            m.float()
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def add_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
             target: str | list[str] = "all-linear", use_rslora: bool = False, gradient_checkpointing: bool = False,
             adapter_dtype: torch.dtype = torch.float32, verbose: bool = True, init: str = "default",
             weights: WeightSource | None = None) -> nn.Module:
    """Wrap the target linear layers with LoRA (in place), freeze the rest; returns the model.

    init="default" starts at B = 0 (the model unchanged); init="loftq" starts from the SVD of each
    4-bit layer's quantization residual, reading the 16-bit W of each layer from `weights` (a
    mapping or function from module name to W; `fourbit.models.checkpoint_weight_reader(model_name,
    model)` reads them from the model's safetensors one at a time). The base stays as it is, so the
    adapter is an ordinary PEFT adapter: see fourbit.nn.loftq, Note: Which LoftQ a user gets.
    """
    if init not in INITS:
        raise UserError(f"LoRA init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "loftq" and weights is None:
        raise UserError("init='loftq' needs the 16-bit weights the 4-bit layers were quantized from: pass "
                        "weights=fourbit.models.checkpoint_weight_reader(<model name or directory>, model)")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise UserError("this model already has LoRA adapters; load or merge them instead of adding a second set")
    names = find_linear_names(model, target)
    quantized = [n for n in names if isinstance(model.get_submodule(n), Linear4bit)]
    if init == "loftq" and not quantized:
        raise UserError("init='loftq' starts LoRA from the 4-bit quantization error, but no target layer is "
                        "quantized (load the model with quant='nf4' or 'fp4', or use init='default')")
    prepare_for_training(model, gradient_checkpointing)
    errors = []
    for name in names:
        lora = LoraLinear(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                          adapter_dtype=adapter_dtype)
        if init == "loftq" and name in quantized:
            errors.append(_init_loftq(lora, weights, name))
        set_module(model, name, lora.train(model.training))  # a new module would otherwise be in train mode
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    model.lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                   target_modules=sorted({n.split(".")[-1] for n in names}),
                                   base_model_name_or_path=base)
    if verbose:
        print(trainable_summary(model))
    if errors:
        log.info("LoftQ init of %d layers: relative error ||W - base - sBA|| / ||W||, mean %.4f (%d unquantized "
                 "layers kept the default init)", len(errors), sum(errors) / len(errors), len(names) - len(quantized))
    return model


def _init_loftq(lora: LoraLinear, weights: WeightSource, name: str) -> float:
    try:
        w = read_weight(weights, name)
    except KeyError:
        raise UserError(f"init='loftq': the 16-bit weights have no tensor for layer {name}") from None
    if not w.is_floating_point():
        raise UserError(f"init='loftq': the weight given for {name} is {w.dtype}, not a 16/32-bit float "
                        f"(an already quantized checkpoint?); LoftQ needs the original weights")
    try:
        return init_loftq(lora, w)
    except ValueError as e:
        raise UserError(f"init='loftq', layer {name}: {e}") from None


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable parameters, all parameters (4-bit weights counted as parameters), percent."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None, requantize: bool = False) -> nn.Module:
    """Replace every LoraLinear by its merged base layer (in place); returns the model."""
    for name, m in lora_modules(model).items():
        set_module(model, name, m.merge(dtype=dtype, requantize=requantize))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
