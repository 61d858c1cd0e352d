"""The meta-device trace behind `fourbit memory`: one training step simulated without data.

One training step of the architecture -- fourbit's Linear4bit + LoRA, transformers' modeling
code, gradient checkpointing, the real `fourbit.loss.causal_lm_loss` and the real optimizer --
runs on the meta device under a TorchDispatchMode (`_LiveBytes`) that adds the bytes of every
storage an op creates and subtracts them when the storage dies: an allocator trace without data.
It sees what autograd keeps for backward, the logits of one loss chunk and their gradients, a
recomputed layer, gradients in flight and the optimizer's temporaries, for any architecture
transformers can build. Three substitutions keep it faithful to the kernels that run for real:
attention is the fused (flash) kernel, which keeps q, k, v, the output and a float32
log-sum-exp, not the T x T probabilities of the meta device's math fallback; dequantization
returns the shared buffer (fourbit.nn's `dequantize_hook`; the buffer is a held part); on CUDA,
dropout keeps a 1-byte mask (CPU keeps one in the activation dtype). A `Simulator` runs a fixed
layer count; `extrapolate` carries its phases to L layers (every phase's peak is affine in the
count of identical layers). `plan` here is a fourbit.memory.Plan (read, never imported: the plan
module drives the trace).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it; `peak` is the high-water mark.

    A storage is new when an op returns it and none of the op's inputs has it (views and in-place
    results share their input's storage); it is freed when its Python object dies (torch keeps
    one Python object per storage for its whole life)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.grads = self.peak_grads = 0  # bytes of gradients created under it: now, and at the peak
        self.kept = self.peak_kept = 0  # bytes of the storages alive at keep_alive_ones() still alive
        self._kept: set[int] = set()
        self._alive: dict[int, int] = {}

    def _free(self, key: int) -> None:
        nbytes = self._alive.pop(key, 0)
        self.live -= nbytes
        if key in self._kept:
            self._kept.discard(key)
            self.kept -= nbytes

    def keep_alive_ones(self) -> None:
        """Follow the storages alive now (the activations autograd keeps, at the end of forward):
        `peak_kept` says how many of their bytes were still alive at the peak."""
        self._kept = set(self._alive)
        self.kept = self.peak_kept = self.live

    def _new_peak(self) -> None:
        self.peak, self.peak_grads, self.peak_kept = self.live, self.grads, self.kept

    def add_gradient(self, grad: torch.Tensor) -> None:
        """A parameter's .grad came into being (it is already counted in `live`): remember its
        bytes, so that a phase's peak can say how much of it was gradients."""
        self.grads += grad.untyped_storage().nbytes()
        if self.live >= self.peak:
            self._new_peak()

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
            if self.live > self.peak:
                self._new_peak()
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


class _KeptWeights:
    """The dequantized weights fourbit.nn keeps on a CPU from a checkpoint recomputation for the
    backward that follows (fourbit.nn.linear4bit, Note: Weights kept across checkpoint
    recomputation), mirrored on the meta device: a dequantization inside a backward pass and inside
    a 4-bit layer's forward (a recomputation) makes a fresh W, which the backward of the same
    weight takes; whatever is left is dropped when backward ends (`clear`). Elsewhere, and on
    CUDA, W is a view of the shared buffer."""

    def __init__(self, plan, model, scratch: torch.Tensor):
        from fourbit.nn import Linear4bit, LoraLinear

        self.scratch, self.on = scratch, plan.device == "cpu"
        self.kept: dict[tuple[int, torch.dtype], list] = {}  # (id of the codes, dtype) -> [W, uses left]
        self.forwards = 0  # 4-bit layer forwards running now
        self.hooks = []
        if self.on:
            for m in model.modules():
                if isinstance(m, (Linear4bit, LoraLinear)):
                    self.hooks.append(m.register_forward_pre_hook(self._enter))
                    self.hooks.append(m.register_forward_hook(self._leave, always_call=True))  # early-stopped recomputation raises

    def _enter(self, *_):
        self.forwards += 1

    def _leave(self, *_):
        self.forwards -= 1

    def dequantize(self, packed, state, dtype):
        if not self.on or torch._C._current_graph_task_id() == -1:
            return self.scratch[: state.numel * dtype.itemsize].view(dtype).view(state.shape)
        key = (id(packed), dtype)
        hit = self.kept.get(key)
        if self.forwards:  # a recomputation: a fresh W, kept
            if hit is None:
                hit = self.kept[key] = [torch.empty(state.shape, dtype=dtype, device="meta"), 0]
            hit[1] += 1
            return hit[0]
        if hit is None:
            return self.scratch[: state.numel * dtype.itemsize].view(dtype).view(state.shape)
        hit[1] -= 1
        if hit[1] == 0:
            del self.kept[key]
        return hit[0]

    def clear(self) -> None:
        self.kept.clear()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@contextlib.contextmanager
def _meta_kernels(plan, scratch: torch.Tensor, model):
    """What makes a meta-device step allocate what the real kernels allocate: fourbit.nn's
    dequantization hook (a view of the shared buffer, counted in the held parts, or a weight kept
    across recomputation: see _KeptWeights), and patches of torch/transformers functions that
    have no such hook. Yields the _KeptWeights, to be cleared when backward ends."""
    import transformers.masking_utils as mu
    from torch.nn import functional as F

    from fourbit.nn import dequantize_hook

    weights = _KeptWeights(plan, model, scratch)

    ce = F.cross_entropy

    def cross_entropy(input, target, *a, **k):  # labels stay on the CPU (their values pick the positions)
        return ce(input, target.to(input.device), *a, **k)

    drop = F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):  # CUDA keeps a bool mask (native_dropout)
        return torch.native_dropout(x, p, training)[0] if training and 0 < p < 1 else drop(x, p, training, inplace)

    patches = [(F, "cross_entropy", cross_entropy),
               (F, "scaled_dot_product_attention", _fused_attention(F.scaled_dot_product_attention)),
               (mu, "find_packed_sequence_indices", lambda position_ids: None)]  # it reads values
    if plan.device == "cuda":
        patches.append((F, "dropout", dropout))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        with dequantize_hook(weights.dequantize):
            yield weights
    finally:
        weights.remove()
        for obj, name, old in saved:
            setattr(obj, name, old)


def _with_layers(config, n_layers: int):
    d = {**config.to_dict(), "num_hidden_layers": n_layers, "use_cache": False}
    for k, v in list(d.items()):  # per-layer lists (layer_types, ...) must match the layer count
        if isinstance(v, list) and len(v) == config.num_hidden_layers and k != "architectures":
            d[k] = v[:n_layers]
    return type(config).from_dict(d)


def _meta_training_model(plan, config, n_layers: int):
    """The model `fourbit train` builds (4-bit linears, LoRA, checkpointing), on the meta device,
    with accumulated gradients and optimizer states in place (the steady state of training)."""
    from fourbit.models import meta_model
    from fourbit.nn import add_lora, find_linear_names, linear4bit_shells
    from fourbit.optim import build_optimizer

    dtype = plan.compute_dtype
    model = meta_model(_with_layers(config, n_layers), dtype)
    if plan.quant_type is not None:
        linear4bit_shells(model, find_linear_names(model), plan.quant_type, blocksize=plan.blocksize,
                          double_quant=plan.double_quant, compute_dtype=dtype, dtype=dtype)
    add_lora(model, r=plan.r, alpha=plan.alpha, dropout=plan.dropout, target=plan.targets,
             gradient_checkpointing=plan.checkpointing, verbose=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = build_optimizer(plan.optim, params, lr=1e-4)
    with torch.no_grad():
        opt.step()  # creates the states: held, not part of the step
    if plan.grad_accum == 1:  # no accumulation: a step starts without gradients (zero_grad(set_to_none))
        opt.zero_grad(set_to_none=True)
    return model, params, opt


def synthetic_labels(batch: int, seq: int, label_fraction: float) -> torch.Tensor:
    """(B, T) labels with the first (1 - fraction) of each sequence masked, like a prompt."""
    labels = torch.zeros((batch, seq), dtype=torch.long)
    labels[:, : seq - max(1, round(seq * label_fraction))] = -100
    return labels


class Simulator:
    """Simulated steps of one plan at a fixed layer count (models built once, steps cached)."""

    def __init__(self, plan, config, n_layers: int):
        self.plan = plan
        self.model, self.params, self.opt = _meta_training_model(plan, config, n_layers)
        lin = [m for m in self.model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
        n = max((m.in_features * m.out_features for m in lin), default=0)
        self.scratch = torch.empty(n * plan.compute_dtype.itemsize, dtype=torch.uint8, device="meta")
        self._tracker: _LiveBytes | None = None  # the step being simulated
        self._new_grads: set[int] = set()  # parameters whose .grad this step created
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_gradient)

    def _on_gradient(self, p: torch.Tensor) -> None:
        if self._tracker is not None and id(p) in self._new_grads:
            self._new_grads.discard(id(p))
            self._tracker.add_gradient(p.grad)

    @functools.lru_cache(maxsize=256)  # noqa: B019  (a few simulators per process, each short-lived)
    def phases(self, batch: int, seq: int, loss_chunk: int) -> dict[str, int]:
        """Bytes live over the held parts at each phase's worst moment ("forward", "loss", "backward",
        "optimizer step"); of them, the gradients this step created ("backward grads", ...: none when
        gradients are held) and the activations still kept ("loss activations", ...: those alive at
        the end of forward); and the activations kept at the end of forward ("activations")."""
        from fourbit.loss import causal_lm_loss

        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        labels = synthetic_labels(batch, seq, self.plan.label_fraction)
        marks: dict[str, int] = {}
        tracker = _LiveBytes()
        self._tracker, self._new_grads = tracker, {id(p) for p in self.params if p.grad is None}

        def mark(name: str) -> None:
            marks[name], marks[name + " grads"] = tracker.peak, tracker.peak_grads
            marks[name + " activations"] = tracker.peak_kept
            tracker._new_peak()

        def at_decoder_output(module, args, out):
            mark("forward")
            marks["activations"] = tracker.live  # what autograd keeps (+ the final hidden states)
            tracker.keep_alive_ones()
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            if hidden.requires_grad:
                hidden.register_hook(lambda g: mark("loss"))  # fires when the loss's backward is done

        hook = self.model.get_decoder().register_forward_hook(at_decoder_output)
        try:
            with _meta_kernels(self.plan, self.scratch, self.model) as weights, tracker:
                loss, _ = causal_lm_loss(self.model, ids, labels, chunk=loss_chunk or None)
                loss.backward()
                weights.clear()
                del loss
                mark("backward")
                if self.plan.max_grad_norm > 0:  # as fourbit train does
                    torch.nn.utils.clip_grad_norm_(self.params, self.plan.max_grad_norm)
                self.opt.step()
                mark("optimizer step")
                if self.plan.grad_accum == 1:
                    self.opt.zero_grad(set_to_none=True)
        finally:
            hook.remove()
            self._tracker = None
        return marks


def extrapolate(sims: list[tuple[int, Simulator]], n_layers: int, batch: int, seq: int, chunk: int) -> dict:
    (l0, s0), (l1, s1) = sims[0], sims[-1]
    a, b = s0.phases(batch, seq, chunk), s1.phases(batch, seq, chunk)
    if l1 == l0:
        return dict(a)
    return {k: round(a[k] + (b[k] - a[k]) * (n_layers - l0) / (l1 - l0)) for k in a}
