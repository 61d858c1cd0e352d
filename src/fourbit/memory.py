"""`fourbit memory`: the peak memory of a QLoRA run, predicted from config.json before launch.

The prediction has two halves.

**Held for the whole run** is arithmetic over the architecture, built on the meta device (no
memory): the linear layers as 4-bit codes + block constants (`quantized_nbytes`: 4.127
bits/parameter with double quantization, 4.5 without), everything else (embeddings, lm_head,
norms, biases) in the compute dtype, the LoRA parameters and their gradients (fp32, fourbit's
`adapter_dtype`), the optimizer states (AdamW 32-bit: 8 bytes/parameter; 8-bit: 2 bytes + a
float32 scale per 256), fourbit's one shared dequantization buffer (the largest linear weight in
the compute dtype, see Note: Shared dequantization buffer in fourbit.nn.linear4bit) and, on a GPU,
the CUDA context as a stated constant. Gradients are counted as held: with gradient accumulation
(the paper: batch 1 x 16) they live from the first micro-batch to the optimizer step.

**What a step needs on top** is simulated, not guessed: one training step of the same
architecture -- fourbit's Linear4bit + LoRA, transformers' modeling code, gradient checkpointing,
the real `fourbit.loss.causal_lm_loss` and the real optimizer -- runs on the meta device under a
TorchDispatchMode (`_LiveBytes`) that adds the bytes of every storage an op creates and subtracts
them when the storage dies: an allocator trace without data. It sees what autograd keeps for
backward, the logits of one loss chunk and their gradients, a recomputed layer, gradients in
flight and the optimizer's temporaries, for any architecture transformers can build. Three
substitutions keep it faithful to the kernels that run for real: attention is the fused (flash)
kernel, which keeps q, k, v, the output and a float32 log-sum-exp, not the T x T probabilities
of the meta device's math fallback; dequantization returns the shared buffer (counted above);
on CUDA, dropout keeps a 1-byte mask (CPU keeps one in the activation dtype). The step is
simulated at 2 and 3 layers and extrapolated to L (every phase's peak is affine in the count of
identical layers).

# Note: What "peak" means
peak = held + max over the phases of a step (forward, loss, backward, optimizer step) of what the
phase has live at its worst moment. The reported parts sum to the peak: the held parts plus the
parts of the phase that sets the peak; the other phases are reported beside them.

`measure_step` runs a real step and measures the same quantity (peak RSS growth on CPU with
glibc's heap caching turned off, torch.cuda.max_memory_allocated + paged states on CUDA);
tests/test_memory.py holds the prediction to it. Not modelled: padding masks (the simulated
batch has none: pack or group by length), allocator fragmentation on CUDA, and the CPU-side
memory of paged optimizer states that spill (they are counted on the GPU, as the paper does).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fourbit.errors import UserError

CONFIGS = Path(__file__).with_name("configs")
CUDA_CONTEXT = 512 * 2**20  # bytes: CUDA context + cuBLAS workspace outside torch's allocator (~0.4-0.6 GiB)
OPTIMIZERS = ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAPER_GB = {"llama-7b": 5, "llama-13b": 10, "llama-33b": 21, "llama-65b": 41}  # QLoRA Table 6, Guanaco sizes
PAPER_DROPOUT = {"llama-7b": 0.1, "llama-13b": 0.1, "llama-33b": 0.05, "llama-65b": 0.05}  # QLoRA App. B.2

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.I)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_NEEDED = ("hidden_size", "num_hidden_layers", "vocab_size")
_ALIASES = {"hidden_size": ("n_embd", "d_model"), "num_hidden_layers": ("n_layer", "num_layers"),
            "vocab_size": ("n_vocab",)}


# -- input ----------------------------------------------------------------------------------------
def parse_size(text: str, flag: str = "--gpu") -> int:
    """'24GB', '24 GiB', '80G', '24000MB' -> bytes. Units are binary (GB = GiB = 2^30), as GPU
    memory is sold and reported: a "24 GB" card has 24 GiB, nvidia-smi counts MiB."""
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise UserError(f"{flag}: cannot read {text!r} as a memory size; expected a number and a unit, "
                        f"e.g. 24GB, 24GiB, 80G or 24000MB")
    return int(float(m.group(1)) * 1024 ** _POWER[m.group(2).lower()])


def shipped_configs() -> list[str]:
    return sorted(f.stem for f in CONFIGS.glob("*.json"))


def load_architecture(name_or_path: str):
    """A transformers config from a shipped name (llama-7b ... llama-65b, smollm2-135m), an embedded
    model's name, a model directory or a config.json. No weights are read."""
    from transformers import AutoConfig

    shipped = CONFIGS / f"{name_or_path}.json"
    p = shipped if shipped.is_file() else Path(name_or_path)
    if not p.exists():
        from fourbit.embedded import EMBEDDED, resolve_model

        if name_or_path not in EMBEDDED:
            raise UserError(f"--model {name_or_path!r}: no such file or directory, and not a shipped config "
                            f"({', '.join(shipped_configs())}); pass a config.json or a model directory")
        p = Path(resolve_model(name_or_path))
    if p.is_dir():
        p = p / "config.json"
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--model {p}: cannot read it as a config.json ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"--model {p}: the config has no 'model_type', so the architecture is unknown; "
                        f"a transformers config.json names it (e.g. \"model_type\": \"llama\")")
    missing = [k for k in _NEEDED if k not in raw and not any(a in raw for a in _ALIASES.get(k, ()))]
    if missing:
        raise UserError(f"--model {p}: the config lacks {missing}; fourbit memory needs the architecture's "
                        f"sizes (hidden_size, num_hidden_layers, vocab_size, ...)")
    raw.pop("quantization_config", None)  # a 4-bit checkpoint's config: its architecture is what counts
    try:
        cls = type(AutoConfig.for_model(raw["model_type"]))
    except ValueError:
        raise UserError(f"--model {p}: unknown architecture model_type={raw['model_type']!r} "
                        f"(transformers cannot build it)") from None
    return cls.from_dict(raw)


@dataclass
class Plan:
    """A QLoRA run's settings, as `fourbit memory` flags (the same meaning as `fourbit train`'s)."""

    model: str = field(default="smollm2-135m", metadata={"help": "config.json, model directory, the embedded "
                                                                "smollm2-135m, or llama-7b/-13b/-33b/-65b"})
    seq: int = field(default=512, metadata={"help": "sequence length in tokens"})
    batch: int = field(default=1, metadata={"help": "sequences per micro-batch"})
    r: int = field(default=64, metadata={"help": "LoRA rank"})
    target: str = field(default="all-linear", metadata={"help": "all-linear, or comma-separated module names"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (it keeps a mask and a copy of each "
                                                           "adapter input for backward)"})
    optim: str = field(default="paged_adamw", metadata={"help": "adamw, paged_adamw, adamw8bit or paged_adamw8bit"})
    checkpointing: bool = field(default=False, metadata={"help": "gradient checkpointing"})
    quant: str = field(default="nf4", metadata={"help": "nf4, fp4 or none (16-bit base)"})
    double_quant: bool = field(default=True, metadata={"help": "double quantization of the block constants"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: bf16, fp16, fp32, or auto (bf16 on "
                                                         "cuda, fp32 on cpu)"})
    device: str = field(default="cuda", metadata={"help": "cuda (adds the CUDA context) or cpu"})
    loss_chunk: int = field(default=512, metadata={"help": "labelled tokens per lm_head chunk in the loss "
                                                           "(0: full logits)"})
    label_fraction: float = field(default=1.0, metadata={"help": "fraction of positions with a label "
                                                                 "(responses only: less)"})
    gpu: str | None = field(default=None, metadata={"help": "memory to fit in, e.g. 24GB, 48GiB, 80G, 24000MB"})
    json: bool = field(default=False, metadata={"help": "print {total_bytes, parts, fits, ...} as JSON"})

    def validate(self) -> list[str]:
        p = [f"--{k} must be >= 1, got {getattr(self, k)}" for k in ("seq", "batch", "r") if getattr(self, k) < 1]
        if self.optim not in OPTIMIZERS:
            p.append(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if self.quant not in ("nf4", "fp4", "none"):
            p.append(f"--quant must be nf4, fp4 or none, got {self.quant!r}")
        if self.dtype not in (*DTYPES, "auto"):
            p.append(f"--dtype must be bf16, fp16, fp32 or auto, got {self.dtype!r}")
        if self.device not in ("cuda", "cpu"):
            p.append(f"--device must be cuda or cpu, got {self.device!r}")
        if not 0 <= self.dropout < 1:
            p.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.loss_chunk < 0:
            p.append(f"--loss-chunk must be >= 0 (0: full logits), got {self.loss_chunk}")
        if not 0 < self.label_fraction <= 1:
            p.append(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        if self.gpu is not None:
            try:
                parse_size(self.gpu)
            except UserError as e:
                p.append(str(e))
        return p

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def targets(self) -> str | list[str]:
        return "all-linear" if self.target == "all-linear" else [t.strip() for t in self.target.split(",") if t.strip()]


def _check(plan: Plan) -> None:
    problems = plan.validate()
    if problems:
        raise UserError("fourbit memory: " + "; ".join(problems))


# -- held for the whole run (arithmetic) ----------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _optimizer_state_bytes(optim: str, numel: int) -> int:
    """Bytes of AdamW state for one parameter tensor (fourbit.optim's layout)."""
    if optim.endswith("8bit") and numel >= 4096:  # min_8bit_size: smaller tensors keep 32-bit states
        return 2 * numel + 2 * 4 * -(-numel // 256)  # two uint8 states + a float32 absmax per block of 256
    return 8 * numel  # exp_avg + exp_avg_sq, float32


def held_parts(plan: Plan, config) -> tuple[dict[str, int], dict]:
    """({part: bytes} held for the whole run, facts: parameter counts and bits/parameter)."""
    from fourbit.models import meta_model
    from fourbit.nn import find_linear_names
    from fourbit.quant import bits_per_parameter, quantized_nbytes

    dtype = plan.compute_dtype
    model = meta_model(config, dtype)
    quantized = [model.get_submodule(n) for n in find_linear_names(model)]  # every linear but lm_head
    adapted = [model.get_submodule(n) for n in find_linear_names(model, plan.targets)]
    lin = sum(m.in_features * m.out_features for m in quantized)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter
    other = total - lin  # embeddings, lm_head, norms, biases of the linears
    lora_shapes = [(plan.r, m.in_features) for m in adapted] + [(m.out_features, plan.r) for m in adapted]
    lora = sum(a * b for a, b in lora_shapes)
    esize = dtype.itemsize
    dq = lambda d: sum(quantized_nbytes(m.in_features * m.out_features, 64, d) for m in quantized)  # noqa: E731
    parts = {}
    if plan.quant == "none":
        parts[f"linear weights ({_dtype_name(dtype)}, not quantized)"] = lin * esize
    else:
        parts[f"4-bit linear weights ({plan.quant}{' + DQ' if plan.double_quant else ''})"] = dq(plan.double_quant)
    parts[f"embeddings, lm_head, norms ({_dtype_name(dtype)})"] = other * esize
    parts["LoRA parameters (fp32)"] = 4 * lora
    parts["LoRA gradients (fp32)"] = 4 * lora
    state = sum(_optimizer_state_bytes(plan.optim, a * b) for a, b in lora_shapes)
    parts[f"optimizer states ({plan.optim}{', may page to CPU' if plan.optim.startswith('paged') else ''})"] = state
    if plan.quant != "none":
        parts[f"dequantization buffer ({_dtype_name(dtype)})"] = max(m.in_features * m.out_features
                                                                     for m in quantized) * esize
    if plan.device == "cuda":
        parts["CUDA context and workspace"] = CUDA_CONTEXT
    facts = {"parameters": total, "linear_parameters": lin, "other_parameters": other, "lora_parameters": lora,
             "lora_layers": len(adapted),
             "bits_per_parameter": {"with_double_quant": round(bits_per_parameter(64, True), 4),
                                    "without_double_quant": round(bits_per_parameter(64, False), 4),
                                    "this_model": None if plan.quant == "none"
                                    else round(8 * dq(plan.double_quant) / lin, 4)},
             "quantized_weights_bytes": {"with_double_quant": dq(True), "without_double_quant": dq(False)}}
    return parts, facts


# -- what a step needs on top (simulated on the meta device) ---------------------------------------
class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it; `peak` is the high-water mark.

    A storage is new when an op returns it and none of the op's inputs has it (views and in-place
    results share their input's storage); it is freed when its Python object dies (torch keeps
    one Python object per storage for its whole life)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key = s._cdata
            if key in inputs or key in self._alive:
                continue
            self._alive[key] = s.nbytes()
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(s, self._free, key)
        return out


def _fused_attention(orig):
    """F.scaled_dot_product_attention that, on meta tensors, runs the flash kernel's op (what CUDA
    and CPU run for causal attention without a padding mask): it keeps q, k, v, out and the
    float32 log-sum-exp for backward, where the meta math fallback would keep T x T probabilities."""

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not query.is_meta:
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)  # (B, H, T, D), (B, H, T)
        return out

    return sdpa


@contextlib.contextmanager
def _meta_kernels(plan: Plan, scratch: torch.Tensor):
    """Patches that make a meta-device step allocate what the real kernels allocate."""
    import transformers.masking_utils as mu
    from torch.nn import functional as F

    import fourbit.nn.linear4bit as l4
    import fourbit.nn.lora as lora

    def dequantize_weight(packed, state, dtype):  # a view of the shared buffer, counted in the held parts
        return scratch[: state.numel * dtype.itemsize].view(dtype).view(state.shape)

    ce = F.cross_entropy

    def cross_entropy(input, target, *a, **k):  # labels stay on the CPU (their values pick the positions)
        return ce(input, target.to(input.device), *a, **k)

    drop = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):  # CUDA keeps a bool mask (native_dropout)
        return torch.native_dropout(x, p, training)[0] if training and 0 < p < 1 else drop(x, p, training, inplace)

    patches = [(l4, "dequantize_weight", dequantize_weight), (lora, "dequantize_weight", dequantize_weight),
               (F, "cross_entropy", cross_entropy),
               (F, "scaled_dot_product_attention", _fused_attention(F.scaled_dot_product_attention)),
               (mu, "find_packed_sequence_indices", lambda position_ids: None)]  # it reads values
    if plan.device == "cuda":
        patches.append((F, "dropout", dropout))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        yield
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)


def _with_layers(config, n_layers: int):
    d = {**config.to_dict(), "num_hidden_layers": n_layers, "use_cache": False}
    for k, v in list(d.items()):  # per-layer lists (layer_types, ...) must match the layer count
        if isinstance(v, list) and len(v) == config.num_hidden_layers and k != "architectures":
            d[k] = v[:n_layers]
    return type(config).from_dict(d)


def _meta_training_model(plan: Plan, config, n_layers: int):
    """The model `fourbit train` builds (4-bit linears, LoRA, checkpointing), on the meta device,
    with accumulated gradients and optimizer states in place (the steady state of training)."""
    from fourbit.models import meta_model
    from fourbit.nn import Linear4bit, add_lora, find_linear_names
    from fourbit.nn.inject import _set_module
    from fourbit.optim import build_optimizer

    dtype = plan.compute_dtype
    model = meta_model(_with_layers(config, n_layers), dtype)
    if plan.quant != "none":
        for name in find_linear_names(model):
            lin = model.get_submodule(name)
            _set_module(model, name, Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                                quant_type=plan.quant, double_quant=plan.double_quant,
                                                compute_dtype=dtype, device="meta", dtype=dtype))
    add_lora(model, r=plan.r, alpha=16, dropout=plan.dropout, target=plan.targets,
             gradient_checkpointing=plan.checkpointing, verbose=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = build_optimizer(plan.optim, params, lr=1e-4)
    with torch.no_grad():
        opt.step()  # creates the states: held, not part of the step
    return model, params, opt


def _labels(batch: int, seq: int, label_fraction: float) -> torch.Tensor:
    """(B, T) labels with the first (1 - fraction) of each sequence masked, like a prompt."""
    labels = torch.zeros((batch, seq), dtype=torch.long)
    labels[:, : seq - max(1, round(seq * label_fraction))] = -100
    return labels


class _Simulator:
    """Simulated steps of one plan at a fixed layer count (models built once, steps cached)."""

    def __init__(self, plan: Plan, config, n_layers: int):
        self.plan = plan
        self.model, self.params, self.opt = _meta_training_model(plan, config, n_layers)
        lin = [m for m in self.model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
        n = max((m.in_features * m.out_features for m in lin), default=0)
        self.scratch = torch.empty(n * plan.compute_dtype.itemsize, dtype=torch.uint8, device="meta")

    @functools.lru_cache(maxsize=256)  # noqa: B019  (a few simulators per process, each short-lived)
    def phases(self, batch: int, seq: int, loss_chunk: int) -> dict[str, int]:
        """Bytes live over the held parts at each phase's worst moment, and the activations kept."""
        from fourbit.loss import causal_lm_loss

        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        labels = _labels(batch, seq, self.plan.label_fraction)
        marks: dict[str, int] = {}
        tracker = _LiveBytes()

        def mark(name: str) -> None:
            marks[name] = tracker.peak
            tracker.peak = tracker.live

        def at_decoder_output(module, args, out):
            mark("forward")
            marks["activations"] = tracker.live  # what autograd keeps (+ the final hidden states)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            if hidden.requires_grad:
                hidden.register_hook(lambda g: mark("loss"))  # fires when the loss's backward is done

        hook = self.model.get_decoder().register_forward_hook(at_decoder_output)
        try:
            with _meta_kernels(self.plan, self.scratch), tracker:
                loss, _ = causal_lm_loss(self.model, ids, labels, chunk=loss_chunk or None)
                loss.backward()
                del loss
                mark("backward")
                torch.nn.utils.clip_grad_norm_(self.params, 0.3)  # as fourbit train does
                self.opt.step()
                mark("optimizer step")
        finally:
            hook.remove()
        return marks


def _extrapolate(sims: list[tuple[int, _Simulator]], n_layers: int, batch: int, seq: int, chunk: int) -> dict:
    (l0, s0), (l1, s1) = sims[0], sims[-1]
    a, b = s0.phases(batch, seq, chunk), s1.phases(batch, seq, chunk)
    if l1 == l0:
        return dict(a)
    return {k: round(a[k] + (b[k] - a[k]) * (n_layers - l0) / (l1 - l0)) for k in a}


_PHASE_PART = {"forward": "forward temporaries", "backward": "backward: recomputation and gradients in flight",
               "optimizer step": "optimizer step temporaries"}


def _step_parts(plan: Plan, phases: dict) -> tuple[str, dict[str, int]]:
    """(the phase that sets the peak, its parts), summing to that phase's bytes."""
    worst = max(("forward", "loss", "backward", "optimizer step"), key=lambda k: phases[k])
    if worst == "optimizer step":
        return worst, {_PHASE_PART[worst]: phases[worst]}
    act = min(phases["activations"], phases[worst])
    kept = "activations kept for backward" + (" (checkpointed layer inputs)" if plan.checkpointing else "")
    name = (f"logits + cross-entropy ({f'chunks of {plan.loss_chunk} tokens' if plan.loss_chunk else 'full logits'})"
            if worst == "loss" else _PHASE_PART[worst])
    return worst, {kept: act, name: phases[worst] - act}


_AFFINE_FROM = 4096  # tokens per micro-batch above which Predictor.phases extrapolates linearly


class Predictor:
    """Predictions for one model and plan at any batch x sequence (the fit search calls it often)."""

    def __init__(self, plan: Plan, config=None):
        _check(plan)
        self.plan = plan
        self.config = config if config is not None else load_architecture(plan.model)
        self.held, self.facts = held_parts(plan, self.config)
        L = self.config.num_hidden_layers
        self.sims = [(n, _Simulator(plan, self.config, n)) for n in sorted({min(L, 2), min(L, 3)})]

    def phases(self, batch: int, seq: int) -> dict[str, int]:
        """Simulated up to ~2 x _AFFINE_FROM tokens; beyond, every phase is affine in the sequence
        length at a fixed batch and in the batch at a fixed length (flash attention, fixed loss
        chunks), so two simulated points give the rest: the fit search stays seconds, not minutes."""
        def sim(b: int, t: int) -> dict[str, int]:
            ph = _extrapolate(self.sims, self.config.num_hidden_layers, b, t, self.plan.loss_chunk)
            if self.plan.optim == "paged_adamw":  # fourbit's 32-bit update runs in chunks: see below
                ph["optimizer step"] = min(ph["optimizer step"], self._chunked_step_bytes(b, t))
            return ph

        def line(p0: dict, p1: dict, x0: int, x: int) -> dict[str, int]:  # p1 is at 2 * x0
            return {k: round(p0[k] + (p1[k] - p0[k]) * (x - x0) / x0) for k in p0}

        s0 = max(-(-_AFFINE_FROM // batch), 2 * self.plan.loss_chunk, 2)
        if seq > 2 * s0:
            return line(sim(batch, s0), sim(batch, 2 * s0), s0, seq)
        b0 = max(-(-_AFFINE_FROM // seq), 1)
        if batch > 2 * b0:
            return line(sim(b0, seq), sim(2 * b0, seq), b0, batch)
        return sim(batch, seq)

    def _chunked_step_bytes(self, batch: int, seq: int) -> int:
        """The optimizer step's temporaries for fourbit's 32-bit AdamW, whose multi-tensor update
        runs over chunks of ~_FOREACH_ELEMENTS parameters: a few layers' simulation fits in one
        chunk, so its bytes per parameter times one chunk bounds the whole model's step (the
        affine extrapolation over layers would count every chunk at once)."""
        from fourbit.optim.adamw import _FOREACH_ELEMENTS

        _, s0 = self.sims[0]
        n0 = sum(p.numel() for p in s0.params)
        per = s0.phases(batch, seq, self.plan.loss_chunk)["optimizer step"] / max(n0, 1)
        biggest = max((p.numel() for p in s0.params), default=0)
        return round(per * min(self.facts["lora_parameters"], _FOREACH_ELEMENTS + biggest))

    def total(self, batch: int, seq: int) -> int:
        p = self.phases(batch, seq)
        return sum(self.held.values()) + max(p[k] for k in ("forward", "loss", "backward", "optimizer step"))

    def predict(self, batch: int | None = None, seq: int | None = None) -> dict:
        plan = self.plan
        batch, seq = batch or plan.batch, seq or plan.seq
        phases = self.phases(batch, seq)
        worst, step = _step_parts(plan, phases)
        parts = {**self.held, **step}
        held = sum(self.held.values())
        other = Plan(**{**asdict(plan), "checkpointing": not plan.checkpointing})
        out = {"total_bytes": sum(parts.values()), "parts": parts, "fits": None, "model": plan.model,
               "settings": asdict(plan) | {"compute_dtype": _dtype_name(plan.compute_dtype), "batch": batch,
                                           "seq": seq},
               "peak_phase": worst, "held_bytes": held,
               "phases": {k: held + v for k, v in phases.items() if k != "activations"},
               "activations_bytes": {("with" if plan.checkpointing else "without") + "_checkpointing":
                                     phases["activations"],
                                     ("without" if plan.checkpointing else "with") + "_checkpointing":
                                     Predictor._activations(other, self.config, batch, seq)},
               **self.facts}
        if plan.gpu:
            budget = parse_size(plan.gpu)
            out.update(gpu_bytes=budget, fits=out["total_bytes"] <= budget,
                       max_seq_at_batch=_largest(lambda t: self.total(batch, t), budget, first=2),  # 2: one labelled token
                       max_batch_at_seq=_largest(lambda b: self.total(b, seq), budget))
        return out

    @staticmethod
    def _activations(plan: Plan, config, batch: int, seq: int) -> int:
        L = config.num_hidden_layers
        sims = [(n, _Simulator(plan, config, n)) for n in sorted({min(L, 2), min(L, 3)})]
        return _extrapolate(sims, L, batch, seq, plan.loss_chunk)["activations"]


def predict(plan: Plan, config=None) -> dict:
    """{"total_bytes", "parts": {name: bytes} (summing to the total), "fits", "peak_phase", "phases", ...}."""
    return Predictor(plan, config).predict()


def predicted_step_growth(result: dict) -> int:
    """The part of a prediction that appears during training steps: the total minus what exists once
    the model is loaded with its adapters (weights, LoRA parameters, CUDA context). This is what
    `measure_step` measures."""
    before = ("linear weights", "embeddings, lm_head, norms", "LoRA parameters", "CUDA context")
    return result["total_bytes"] - sum(v for k, v in result["parts"].items() if any(s in k for s in before))


def _largest(cost, budget: int, first: int = 1, limit: int = 1 << 20) -> int:
    """The largest n in [first, limit] with cost(n) <= budget (cost non-decreasing), 0 if none.

    cost is piecewise affine in n (tokens scale every activation; the loss chunk and the phase
    that sets the peak add a few kinks), so interpolating between a point that fits and one that
    does not lands on the answer in a step or two; bisection takes over if it stalls."""
    lo, c_lo = first, cost(first)
    if c_lo > budget:
        return 0
    hi, c_hi = None, None
    n = 64
    while hi is None:  # bracket: grow by the slope's estimate, at least doubling
        n = min(n, limit)
        c = cost(n)
        if c > budget:
            hi, c_hi = n, c
        elif n == limit:
            return limit
        else:
            slope = max((c - c_lo) / (n - lo), 1e-9)
            lo, c_lo = n, c
            n = max(2 * n, lo + int((budget - c_lo) / slope) + 1)
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        if bisect:
            mid = (lo + hi) // 2
        else:
            mid = lo + int((budget - c_lo) * (hi - lo) / max(c_hi - c_lo, 1))
            mid = min(max(mid, lo + 1), hi - 1)
        c = cost(mid)
        if c <= budget:
            lo, c_lo = mid, c
            if mid + 1 < hi and not bisect:  # the interpolated guess is usually the answer
                c1 = cost(mid + 1)
                if c1 > budget:
                    return mid
                lo, c_lo = mid + 1, c1
        else:
            hi, c_hi = mid, c
        bisect = (hi - lo) > width // 2  # shrank by less than half: bisect next
    return lo


# -- output ---------------------------------------------------------------------------------------
def format_table(res: dict) -> str:
    gib = 2**30
    s = res["settings"]
    held = {k: v for k, v in res["parts"].items() if k in _held_names(res)}
    step = {k: v for k, v in res["parts"].items() if k not in held}
    w = max(len(k) for k in res["parts"]) + 4
    bits = res["bits_per_parameter"]
    lines = [f"{res['model']}: {res['parameters'] / 1e9:.2f}B parameters, LoRA r={s['r']} on {res['lora_layers']} "
             f"layers = {res['lora_parameters'] / 1e6:.1f}M; seq {s['seq']} x batch {s['batch']}, "
             f"{'gradient checkpointing' if s['checkpointing'] else 'no gradient checkpointing'}, {s['optim']}, "
             f"{s['compute_dtype']}, loss chunk {s['loss_chunk'] or 'off (full logits)'}",
             f"{'part':<{w}} {'GiB':>8}", "held for the whole run"]
    lines += [f"  {k:<{w - 2}} {v / gib:8.3f}" for k, v in held.items()]
    lines.append(f"step, at its peak ({res['peak_phase']})")
    lines += [f"  {k:<{w - 2}} {v / gib:8.3f}" for k, v in step.items()]
    lines.append(f"{'total (predicted peak)':<{w}} {res['total_bytes'] / gib:8.3f}")
    lines.append("peak of each phase (GiB): " + ", ".join(f"{k} {v / gib:.3f}" for k, v in res["phases"].items()))
    act = res["activations_bytes"]
    lines.append(f"activations kept for backward: {act['with_checkpointing'] / gib:.3f} GiB with gradient "
                 f"checkpointing, {act['without_checkpointing'] / gib:.3f} GiB without")
    if bits["this_model"] is not None:
        q = res["quantized_weights_bytes"]
        lines.append(f"4-bit weights: {bits['with_double_quant']} bits/parameter with double quantization "
                     f"({q['with_double_quant'] / gib:.2f} GiB), {bits['without_double_quant']} without "
                     f"({q['without_double_quant'] / gib:.2f} GiB)")
    if str(s["optim"]).startswith("paged"):
        lines.append("paged optimizer: its states can spill to CPU RAM under pressure; counted on the GPU "
                     "here, as the QLoRA paper does")
    if res.get("gpu_bytes"):
        spare = res["gpu_bytes"] - res["total_bytes"]
        verdict = (f"fits in {res['gpu_bytes'] / gib:.1f} GiB ({spare / gib:.2f} GiB to spare)" if res["fits"]
                   else f"does NOT fit in {res['gpu_bytes'] / gib:.1f} GiB ({-spare / gib:.2f} GiB short)")
        lines.append(f"{verdict}; longest sequence at batch {s['batch']}: {res['max_seq_at_batch']}, "
                     f"largest batch at seq {s['seq']}: {res['max_batch_at_seq']}")
    return "\n".join(lines)


def _held_names(res: dict) -> set[str]:
    n = len(res["parts"]) - (1 if res["peak_phase"] == "optimizer step" else 2)
    return set(list(res["parts"])[:n])


def memory_main(argv: list[str]) -> int:
    from fourbit.config import parse_cli

    plan = parse_cli(Plan, argv, prog="fourbit memory",
                     description="Predict the peak memory of a QLoRA run from the model's config.json alone.")
    res = predict(plan)
    print(json.dumps(res, indent=2) if plan.json else format_table(res))
    return 0


# -- the paper's settings ------------------------------------------------------------------------
def paper_plan(name: str, gpu: str = "48GB") -> Plan:
    """QLoRA's Guanaco recipe: NF4 + DQ, bf16, LoRA r=64 on all linear layers (dropout 0.1 up to 13B,
    0.05 above), paged AdamW, gradient checkpointing, batch 1 (x16 accumulation), sequences of 512."""
    return Plan(model=name, seq=512, batch=1, r=64, dropout=PAPER_DROPOUT.get(name, 0.05), optim="paged_adamw",
                checkpointing=True, quant="nf4", double_quant=True, dtype="bf16", device="cuda", gpu=gpu)


def paper_comparison(gpu: str = "48GB") -> list[dict]:
    """Predicted training peak and model footprint next to the paper's figures, for LLaMA 7B-65B."""
    rows = []
    for name, paper_gb in PAPER_GB.items():
        res = predict(paper_plan(name, gpu))
        p = res["parts"]
        weights = sum(v for k, v in p.items() if "linear weights" in k or "embeddings" in k)
        lora = sum(v for k, v in p.items() if k.startswith(("LoRA", "optimizer states")))
        rows.append({"model": name, "paper_gb": paper_gb, "weights_bytes": weights,
                     "weights_and_adapter_bytes": weights + p["LoRA parameters (fp32)"] // 2,  # adapter in bf16
                     "lora_bytes": lora, "lora_parameters": res["lora_parameters"], "total_bytes": res["total_bytes"],
                     "peak_phase": res["peak_phase"], "fits": res["fits"], "max_seq_at_batch": res["max_seq_at_batch"],
                     "max_batch_at_seq": res["max_batch_at_seq"]})
    return rows


# -- calibration: a real step ----------------------------------------------------------------------
def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _fix_glibc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc return freed large blocks to the OS at once (as torch's CUDA allocator accounting
    sees them), instead of raising its mmap threshold and keeping them in the heap. True if set."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD; setting it disables the dynamic one
    except (OSError, AttributeError):
        return False


def measure_step(plan: Plan, model_path: str | None = None, steps: int = 2, seed: int = 0) -> dict:
    """Load the model 4-bit, add LoRA, run `steps` training steps (loss as fourbit train computes it,
    backward, gradient clipping, optimizer step) and measure how much memory the steps add.

    CPU: peak RSS during the last step (Linux: VmHWM, reset through /proc/self/clear_refs) minus the
    RSS before the first step, with glibc's mmap threshold fixed (see _fix_glibc_mmap_threshold).
    CUDA: torch.cuda.max_memory_allocated during the last step minus memory_allocated before the
    first, plus paged optimizer states (managed memory, outside torch's allocator).
    The first step's growth is reported too (it has no optimizer states yet)."""
    import gc

    from fourbit.loss import causal_lm_loss
    from fourbit.models import load_model
    from fourbit.nn import add_lora
    from fourbit.optim import build_optimizer

    cuda = plan.device == "cuda"
    if not cuda:
        _fix_glibc_mmap_threshold()
        if not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("measuring a CPU step's peak needs Linux (/proc/self/clear_refs)")
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(seed)
    model, _ = load_model(model_path or plan.model, quant=None if plan.quant == "none" else plan.quant,
                          double_quant=plan.double_quant, compute_dtype=plan.compute_dtype, device=device,
                          load_tokenizer=False)
    add_lora(model, r=plan.r, alpha=16, dropout=plan.dropout, target=plan.targets,
             gradient_checkpointing=plan.checkpointing, verbose=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(plan.optim, params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (plan.batch, plan.seq), device=device)
    labels = torch.where(_labels(plan.batch, plan.seq, plan.label_fraction).to(device) == -100, -100, ids)

    def now() -> int:
        return torch.cuda.memory_allocated(device) if cuda else _rss("VmRSS")

    def reset_peak() -> None:
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peak() -> int:
        if cuda:
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        return _rss("VmHWM")

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = now()
    growth = []
    for _ in range(steps):
        reset_peak()
        loss, _ = causal_lm_loss(model, ids, labels, chunk=plan.loss_chunk or None)
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        managed = opt.state_bytes() if cuda and getattr(opt, "paged", False) else 0
        growth.append(peak() - before + managed)
        gc.collect()
    out = {"growth_bytes": growth[-1], "first_step_growth_bytes": growth[0], "before_bytes": before,
           "device": str(device)}
    if cuda:
        out["max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out


if __name__ == "__main__":  # python -m fourbit.memory '{"model": ..., "batch": ...}' [model_path]: one measurement
    import sys

    _plan = Plan(**json.loads(sys.argv[1]))
    print(json.dumps(measure_step(_plan, sys.argv[2] if len(sys.argv) > 2 else None)))
