"""`fourbit memory`'s arithmetic: the peak memory of a QLoRA run, predicted from config.json before launch.

The prediction has two halves.

**Held for the whole run** is arithmetic over the architecture, built on the meta device (no
memory): the linear layers as 4-bit codes + block constants (`quantized_nbytes`: 4.127
bits/parameter with double quantization, 4.5 without), everything else (embeddings, lm_head,
norms, biases) in the compute dtype, the LoRA parameters and their gradients (fp32, fourbit's
`adapter_dtype`), the optimizer states (AdamW 32-bit: 8 bytes/parameter; 8-bit: 2 bytes + a
float32 scale per 256), fourbit's one shared dequantization buffer (the largest linear weight in
the compute dtype, see Note: Shared dequantization buffer in fourbit.nn.linear4bit) and, on a GPU,
the CUDA context as a stated constant. With gradient accumulation (`grad_accum` > 1, the paper's
batch 1 x 16 and fourbit train's default) the LoRA gradients are held: they live from the first
micro-batch to the optimizer step. Without it they are not: backward creates them while it frees
the activations, and the trace (which runs the step with them absent) counts them where they are
alive, as a part of the phase that sets the peak.

**What a step needs on top** is simulated, not guessed (fourbit.memory.trace), at 2 and 3 layers
and extrapolated to L; beyond ~8k tokens per micro-batch, linearly in the batch or the length.

# Note: What "peak" means
peak = held + max over the phases of a step (forward, loss, backward, optimizer step) of what the
phase has live at its worst moment. The reported parts sum to the peak: the held parts plus the
parts of the phase that sets the peak; the other phases are reported beside them.

A `Plan` is a `fourbit train` run: its shared options are TrainConfig's own fields (fourbit.config
`option`), so a plan with no flags is the run `fourbit train` does by default. fourbit.memory.measure
runs a real step and measures the same quantity; tests/test_memory.py holds the prediction to it.
Not modelled: padding masks (the simulated batch has none: pack or group by length), allocator
fragmentation on CUDA, and the CPU-side memory of paged optimizer states that spill (they are
counted on the GPU, as the paper does).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fourbit.config import option, validate
from fourbit.embedded import DEFAULT_MODEL, EMBEDDED, resolve_model
from fourbit.errors import UserError
from fourbit.memory.trace import Simulator, extrapolate
from fourbit.models import QUANT_CHOICES, QuantizeArgs, meta_model, normalize_quant
from fourbit.models.load import choice_problems
from fourbit.nn import find_linear_names
from fourbit.optim import OPTIMIZERS
from fourbit.quant import DTYPES, bits_per_parameter, quantized_nbytes
from fourbit.quant.blockwise import check_blocksize
from fourbit.train import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CUDA_CONTEXT = 512 * 2**20  # bytes: CUDA context + cuBLAS workspace outside torch's allocator (~0.4-0.6 GiB)

# The parts of a prediction: the keys of predict()["parts"]. Held for the whole run ...
WEIGHTS_4BIT = "4-bit linear weights"
WEIGHTS_16BIT = "linear weights (not quantized)"
OTHER_WEIGHTS = "embeddings, lm_head, norms"
LORA_PARAMETERS = "LoRA parameters (fp32)"
LORA_GRADIENTS = "LoRA gradients (fp32)"
OPTIMIZER_STATES = "optimizer states"
DEQUANT_BUFFER = "dequantization buffer"
CUDA_RUNTIME = "CUDA context and workspace"
# ... and, of the phase that sets the peak, what autograd keeps plus that phase's own temporaries.
ACTIVATIONS = "activations kept for backward"
FORWARD_TEMPS = "forward temporaries"
LOSS_TEMPS = "logits + cross-entropy"
BACKWARD_TEMPS = "backward: recomputation and gradients in flight"
STEP_TEMPS = "optimizer step temporaries"
# What exists once the model is loaded with its adapters, before any step (measure_step measures the rest).
LOADED_PARTS = (WEIGHTS_4BIT, WEIGHTS_16BIT, OTHER_WEIGHTS, LORA_PARAMETERS, CUDA_RUNTIME)

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
        if name_or_path not in EMBEDDED:
            raise UserError(f"--model {name_or_path!r}: no such file or directory, and not a shipped config "
                            f"({', '.join(shipped_configs())}); pass a config.json or a model directory")
        p = Path(resolve_model(name_or_path))
    if p.is_dir():
        p = p / "config.json"
    from fourbit.files import read_json_file

    raw = read_json_file(p, "--model's config.json")  # file:line of a JSON mistake, one line
    if "model_type" not in raw:
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
    """A QLoRA run's settings, as `fourbit memory` flags: the options it shares with `fourbit train`
    are train's own (same default, same meaning)."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "config.json, model directory, the embedded "
                                                                "smollm2-135m, or llama-7b/-13b/-33b/-65b"})
    seq: int = field(default=512, metadata={"help": "sequence length in tokens"})
    batch: int = option(TrainConfig, "batch_size")
    grad_accum: int = option(TrainConfig, "grad_accum", help="micro-batches per optimizer step (above 1 the "
                                                              "LoRA gradients are held from one step to the next)")
    r: int = option(TrainConfig, "r")
    alpha: float = option(TrainConfig, "alpha")
    target: str = option(TrainConfig, "target")
    dropout: float = option(TrainConfig, "dropout", help="LoRA dropout (it keeps a mask and a copy of each adapter "
                                                         "input for backward)")
    optim: str = option(TrainConfig, "optim")
    checkpointing: bool = option(TrainConfig, "gradient_checkpointing", help="gradient checkpointing, as fourbit "
                                                                             "train (--no-checkpointing: off)")
    max_grad_norm: float = option(TrainConfig, "max_grad_norm")
    quant: str = option(TrainConfig, "quant")
    double_quant: bool = option(TrainConfig, "double_quant")
    blocksize: int = option(QuantizeArgs, "blocksize")
    dtype: str = field(default="auto", metadata={"help": f"compute dtype: {', '.join(DTYPES)}, or auto (bf16 on "
                                                         f"cuda, fp32 on cpu)"})
    device: str = field(default="cuda", metadata={"help": "cuda (adds the CUDA context) or cpu"})
    loss_chunk: int = option(TrainConfig, "loss_chunk")
    label_fraction: float = field(default=1.0, metadata={"help": "fraction of positions with a label "
                                                                 "(responses only: less)"})
    gpu: str | None = field(default=None, metadata={"help": "memory to fit in, e.g. 24GB, 48GiB, 80G, 24000MB"})

    def validate(self) -> list[str]:
        p = [f"--{k} must be >= 1, got {getattr(self, k)}" for k in ("seq", "batch", "grad_accum", "r")
             if getattr(self, k) < 1]
        p += choice_problems(self.optim, OPTIMIZERS, "--optim")
        p += choice_problems(self.quant, QUANT_CHOICES, "--quant")
        p += choice_problems(self.dtype, (*DTYPES, "auto"), "--dtype")
        p += choice_problems(self.device, ("cuda", "cpu"), "--device")
        if not 0 <= self.dropout < 1:
            p.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.alpha > 0:
            p.append(f"--alpha must be > 0 (LoRA's scaling is alpha / r), got {self.alpha}")
        if self.loss_chunk < 0:
            p.append(f"--loss-chunk must be >= 0 (0: full logits), got {self.loss_chunk}")
        if self.max_grad_norm < 0:
            p.append(f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0 < self.label_fraction <= 1:
            p.append(f"--label-fraction must be in (0, 1], got {self.label_fraction}")
        try:
            check_blocksize(self.blocksize)
        except ValueError as e:
            p.append(f"--{e}")
        if self.gpu is not None:
            try:
                parse_size(self.gpu)
            except UserError as e:
                p.append(str(e))
        return p

    @property
    def quant_type(self) -> str | None:
        """nf4 / fp4, or None for a 16-bit base (--quant none)."""
        return normalize_quant(self.quant)

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return DTYPES[self.dtype]

    @property
    def targets(self) -> str | list[str]:
        return "all-linear" if self.target == "all-linear" else [t.strip() for t in self.target.split(",") if t.strip()]


def dtype_flag(dtype: torch.dtype) -> str:
    """The short name (fp32, bf16, fp16) of a compute dtype, as the flags and the JSON say it."""
    return next(k for k, v in DTYPES.items() if v == dtype)


# -- held for the whole run (arithmetic) ----------------------------------------------------------
def _optimizer_state_bytes(optim: str, numel: int) -> int:
    """Bytes of AdamW state for one parameter tensor (fourbit.optim's layout)."""
    if optim.endswith("8bit") and numel >= 4096:  # min_8bit_size: smaller tensors keep 32-bit states
        return 2 * numel + 2 * 4 * -(-numel // 256)  # two uint8 states + a float32 absmax per block of 256
    return 8 * numel  # exp_avg + exp_avg_sq, float32


def held_parts(plan: Plan, config) -> tuple[dict[str, int], dict]:
    """({part: bytes} held for the whole run, facts: parameter counts and bits/parameter)."""
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
    bs = plan.blocksize
    dq = lambda d: sum(quantized_nbytes(m.in_features * m.out_features, bs, d) for m in quantized)  # noqa: E731
    parts = {}
    if plan.quant_type is None:
        parts[WEIGHTS_16BIT] = lin * esize
    else:
        parts[WEIGHTS_4BIT] = dq(plan.double_quant)
    parts[OTHER_WEIGHTS] = other * esize
    parts[LORA_PARAMETERS] = 4 * lora
    if plan.grad_accum > 1:  # held between micro-batches; with one, the step creates and frees them
        parts[LORA_GRADIENTS] = 4 * lora
    parts[OPTIMIZER_STATES] = sum(_optimizer_state_bytes(plan.optim, a * b) for a, b in lora_shapes)
    if plan.quant_type is not None:
        parts[DEQUANT_BUFFER] = max(m.in_features * m.out_features for m in quantized) * esize
    if plan.device == "cuda":
        parts[CUDA_RUNTIME] = CUDA_CONTEXT
    facts = {"parameters": total, "linear_parameters": lin, "other_parameters": other, "lora_parameters": lora,
             "lora_layers": len(adapted),
             "bits_per_parameter": {"with_double_quant": round(bits_per_parameter(bs, True), 4),
                                    "without_double_quant": round(bits_per_parameter(bs, False), 4),
                                    "this_model": None if plan.quant_type is None
                                    else round(8 * dq(plan.double_quant) / lin, 4)},
             "quantized_weights_bytes": {"with_double_quant": dq(True), "without_double_quant": dq(False)}}
    return parts, facts


# -- the step's parts and the fit search ---------------------------------------------------------
_PHASE_PART = {"forward": FORWARD_TEMPS, "loss": LOSS_TEMPS, "backward": BACKWARD_TEMPS, "optimizer step": STEP_TEMPS}


def _step_parts(plan: Plan, phases: dict) -> tuple[str, dict[str, int]]:
    """(the phase that sets the peak, its parts), summing to that phase's bytes: the activations
    still kept at that moment (forward: those it ends with), the gradients the step created (no
    accumulation: they are not held) and the rest, the phase's own temporaries."""
    worst = max(_PHASE_PART, key=lambda k: phases[k])
    grads = phases[worst + " grads"]
    act = min(phases["activations"], phases[worst]) if worst == "forward" else phases[worst + " activations"]
    parts = {ACTIVATIONS: act} if act else {}
    parts |= {LORA_GRADIENTS: grads} if grads else {}
    return worst, {**parts, _PHASE_PART[worst]: phases[worst] - grads - act}


_AFFINE_FROM = 4096  # tokens per micro-batch above which Predictor.phases extrapolates linearly


class Predictor:
    """Predictions for one model and plan at any batch x sequence (the fit search calls it often)."""

    def __init__(self, plan: Plan, config=None):
        validate(plan)
        self.plan = plan
        self.config = config if config is not None else load_architecture(plan.model)
        self.held, self.facts = held_parts(plan, self.config)
        L = self.config.num_hidden_layers
        self.sims = [(n, Simulator(plan, self.config, n)) for n in sorted({min(L, 2), min(L, 3)})]

    def phases(self, batch: int, seq: int) -> dict[str, int]:
        """Simulated up to ~2 x _AFFINE_FROM tokens; beyond, every phase is affine in the sequence
        length at a fixed batch and in the batch at a fixed length (flash attention, fixed loss
        chunks), so two simulated points give the rest: the fit search stays seconds, not minutes."""
        def sim(b: int, t: int) -> dict[str, int]:
            ph = extrapolate(self.sims, self.config.num_hidden_layers, b, t, self.plan.loss_chunk)
            if self.plan.optim == "paged_adamw":  # fourbit's 32-bit update runs in chunks: see below
                grads = ph["optimizer step grads"]
                ph["optimizer step"] = grads + min(ph["optimizer step"] - grads, self._chunked_step_bytes(b, t))
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
        ph = s0.phases(batch, seq, self.plan.loss_chunk)
        per = (ph["optimizer step"] - ph["optimizer step grads"]) / max(n0, 1)
        biggest = max((p.numel() for p in s0.params), default=0)
        return round(per * min(self.facts["lora_parameters"], _FOREACH_ELEMENTS + biggest))

    def total(self, batch: int, seq: int) -> int:
        p = self.phases(batch, seq)
        return sum(self.held.values()) + max(p[k] for k in _PHASE_PART)

    def predict(self, batch: int | None = None, seq: int | None = None) -> dict:
        plan = self.plan
        batch, seq = batch or plan.batch, seq or plan.seq
        phases = self.phases(batch, seq)
        worst, step = _step_parts(plan, phases)
        parts = {**self.held, **step}
        held = sum(self.held.values())
        other = Plan(**{**asdict(plan), "checkpointing": not plan.checkpointing})
        out = {"total_bytes": sum(parts.values()), "parts": parts, "held_parts": list(self.held), "fits": None,
               "model": plan.model,
               "settings": asdict(plan) | {"compute_dtype": dtype_flag(plan.compute_dtype), "batch": batch,
                                           "seq": seq},
               "peak_phase": worst, "held_bytes": held,
               "phases": {k: held + phases[k] for k in _PHASE_PART},
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
        sims = [(n, Simulator(plan, config, n)) for n in sorted({min(L, 2), min(L, 3)})]
        return extrapolate(sims, L, batch, seq, plan.loss_chunk)["activations"]


def predict(plan: Plan, config=None) -> dict:
    """{"total_bytes", "parts": {name: bytes} (summing to the total), "fits", "peak_phase", "phases", ...}."""
    return Predictor(plan, config).predict()


def predicted_step_growth(result: dict) -> int:
    """The part of a prediction that appears during training steps: the total minus what exists once
    the model is loaded with its adapters (weights, LoRA parameters, CUDA context). This is what
    `measure_step` measures."""
    return result["total_bytes"] - sum(result["parts"].get(k, 0) for k in LOADED_PARTS)


def predicted_allocated(result: dict) -> int:
    """The part of a prediction that torch.cuda.max_memory_allocated plus the paged optimizer
    states measure: the total minus the CUDA context, which lives outside torch's allocator."""
    return result["total_bytes"] - result["parts"].get(CUDA_RUNTIME, 0)


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
