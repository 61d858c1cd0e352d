"""`Decoder`: the forward pass of a Llama-family model over a static KV cache, with per-row LoRA.

The engine (fourbit.engine) owns requests and sampling; this module owns the arithmetic. It reads
the weights out of a loaded transformers model (Llama, Mistral, Qwen2: RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU) and runs its own loop over the layers, because transformers'
eager forward spends most of a CPU decoding step in Python (module calls, cache objects, mask
building) rather than arithmetic. Per layer and step the loop makes four projection calls: q|k|v
and gate|up are fused into one matrix each (dense weights concatenated; 4-bit codes concatenated
and multiplied by `fourbit.quant.matmul_4bit` straight from the codes), plus one RMSNorm per
sublayer, the rotary embedding, and three small ops of attention per row (two bmm and a softmax,
written out: torch's SDPA opens an OpenMP region per call, which cost 20 ms instead of 20 us per
call on a busy 2-core machine). lm_head's argmax goes through a float16 screen (see `Head`).
We also tried torch.compile on transformers' static-cache forward instead: it compiled for 10
minutes on this (busy) 2-core CPU, cannot see into the 4-bit kernel (an opaque ctypes call), and
on the 16-bit SmolLM2 decoded at 2.1 s/token against 4.9 eager and 1.0 for this loop (same
machine and load, runs one after the other).

The KV cache is allocated once (gpt-fast's static cache), V as (layers, max_batch, kv_heads,
max_seq, head_dim) and K as the transposed view of the same layout, so a row's attention scores
are one bmm: a request owns one batch row ("slot") from prefill to finish, and rows join and
leave between steps without copying anything.

Adapters stay unmerged (S-LoRA, Sheng et al. 2023; Punica, Chen et al. 2023): for each adapter
and layer we keep A^T (in, r) and B^T * scaling (r, out) per projection group (q|k|v stacked
along r with a block-diagonal B, gate|up likewise), each adapter at its own rank. The rows of a
step are grouped by adapter and each group's product is a batch of one-row matmuls, so a row's
LoRA output depends only on that row.

# Note: Batch invariance
A request's greedy tokens must not depend on which other requests share its steps. Attention,
LoRA, norms and elementwise ops are computed per row (attention over the row's own length). The
BLAS matmuls are the problem: MKL picks its kernel and thread split from the shape, and row i of
x @ W^T differs in its last bits between 1 and 8 rows (measured on torch 2.13 / MKL 2024.2: every
shape we tried), while a call with a FIXED number of rows gives the same bits for a row whatever
the other rows hold or where it sits. So while decoding, dense linears go through fourbit's C
kernel that computes rows independently (`batch_invariant_linear`) where it applies, and
otherwise are called on blocks of exactly `row_block` rows (the batch is padded at the
embedding). The 4-bit kernel (`matmul_4bit`, up to SKINNY_MAX_ROWS rows) computes rows
independently too. We do not assume either: each group's decoding call is probed once at build
time (1, 2, 3 and 8 rows against 16) and the ones that fail get row blocks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from fourbit.nn.linear4bit import Linear4bit, dequantize_weight
from fourbit.nn.lora import LoraLinear
from fourbit.quant import SKINNY_MAX_ROWS, QuantState, batch_invariant_linear, dequantize_absmax, matmul_4bit

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why our own decode loop cannot run this model (None: it can)."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        return f"model type {mtype!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the engine implements SwiGLU with silu)"
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, attr):
            return f"model.model has no {attr}"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if "dynamic" in rope or rope == "longrope":
        return f"rope type {rope!r} depends on the sequence length"
    for i, layer in enumerate(inner.layers):
        for names in GROUPS.values():
            for name in names:
                base = _base(layer.get_submodule(name))
                if not isinstance(base, (nn.Linear, Linear4bit)):
                    return f"layers.{i}.{name} is a {type(base).__name__}, not nn.Linear or Linear4bit"
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return "the output embedding is not an nn.Linear"
    return None


def _base(m: nn.Module) -> nn.Module:
    return m.base_layer if isinstance(m, LoraLinear) else m


class _Proj:
    """One projection group of a layer: x (N, in) -> (N, sum of outs), q|k|v or gate|up concatenated.

    Dense bases are fused into one weight (see _fuse); 4-bit bases into one packed matrix when they
    share a format (see _fuse_4bit), multiplied by `matmul_4bit` straight from the codes for few
    rows and dequantized into the shared scratch buffer for a prompt's many rows."""

    def __init__(self, modules: list[nn.Module]):
        bases = [_base(m) for m in modules]
        self.outs = [b.out_features for b in bases]
        self.in_features = bases[0].in_features
        self.dense = all(isinstance(b, nn.Linear) for b in bases)
        self.row_independent = False  # set by Decoder._probe
        if self.dense:
            self.weight, self.bias = _fuse(bases)
        elif all(isinstance(b, Linear4bit) for b in bases):
            self.parts = _fuse_4bit(bases)
        else:  # a mix (a partly quantized checkpoint): the modules as they are
            self.parts = [(b, None, None) for b in bases]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return F.linear(x, self.weight, self.bias)
        ys = [_q4(x, *part) for part in self.parts]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The decoding call: as __call__, but a dense group goes through the batch-invariant kernel."""
        return _dense_rows(x, self.weight, self.bias) if self.dense else self(x)

    def many(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """[self(x) for x in xs], the same arithmetic, dequantizing each 4-bit matrix at most once."""
        if self.dense:
            return [self(x) for x in xs]
        per_part = []
        for packed, state, bias in self.parts:
            w = None
            ys = []
            for x in xs:
                if state is None or x.shape[0] <= SKINNY_MAX_ROWS:
                    ys.append(_q4(x, packed, state, bias))
                else:
                    w = dequantize_weight(packed, state, x.dtype) if w is None else w  # (out, in), scratch
                    ys.append(F.linear(x, w, bias))
            per_part.append(ys)
        return [ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1) for ys in zip(*per_part)]


def _dense_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b, through batch_invariant_linear where it applies (float32 on a CPU), else F.linear."""
    if x.device.type == "cpu" and weight.dtype == torch.float32:
        return batch_invariant_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _q4(x: torch.Tensor, packed, state, bias) -> torch.Tensor:
    if state is None:  # a module
        return packed(x)
    if x.shape[0] <= SKINNY_MAX_ROWS:
        return matmul_4bit(x, packed, state, bias)
    return F.linear(x, dequantize_weight(packed, state, x.dtype), bias)  # (N, out)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outs, in) weight for several nn.Linear sharing an input; the modules' weights become
    views into it, so the fused copy costs no memory and the transformers model still works."""
    if len(linears) == 1:
        return linears[0].weight, linears[0].bias
    with torch.no_grad():
        w = torch.cat([m.weight for m in linears])  # (sum outs, in)
        b = _cat_bias(linears, w)
        for m, wi, bi in zip(linears, w.split([m.out_features for m in linears]),
                             b.split([m.out_features for m in linears]) if b is not None else [None] * len(linears)):
            m.weight = nn.Parameter(wi, requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(bi, requires_grad=m.bias.requires_grad)
    return w, b


def _cat_bias(linears, like: torch.Tensor) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias.to(like.dtype) if m.bias is not None else
                      torch.zeros(m.out_features, dtype=like.dtype, device=like.device) for m in linears])


def _fuse_4bit(layers: list[Linear4bit]) -> list[tuple]:
    """[(packed, QuantState, bias)]: one fused matrix when the layers share a 4-bit format and their
    blocks end at row boundaries, else one entry per layer.

    The fused state keeps the block scales as float32 (double quantization's 8-bit scales,
    dequantized once: the values the kernel would compute, 4 bytes instead of ~1 per 64 weights),
    because the layers' 256-scale nested blocks do not line up once concatenated. The layers'
    codes become views into the fused codes, so they cost no second copy."""
    s0 = layers[0].quant_state
    same = all(m.quant_type == layers[0].quant_type and m.blocksize == s0.blocksize and
               m.in_features == layers[0].in_features and (m.in_features * m.out_features) % s0.blocksize == 0
               and torch.equal(m.quant_state.code, s0.code) and m.packed.device == s0.device for m in layers)
    if len(layers) == 1 or not same:
        return [(m.packed, m.quant_state, m.bias) for m in layers]
    with torch.no_grad():
        packed = torch.cat([m.packed.reshape(-1) for m in layers])
        absmax = torch.cat([dequantize_absmax(m.quant_state).float() for m in layers])
        state = QuantState(absmax=absmax, shape=torch.Size([sum(m.out_features for m in layers), layers[0].in_features]),
                           dtype=s0.dtype, blocksize=s0.blocksize, quant_type=s0.quant_type, code=s0.code)
        bias = _cat_bias(layers, absmax)
        for m, codes in zip(layers, packed.split([m.packed.numel() for m in layers])):
            if m.weight.dtype == torch.uint8:  # (a float storage dtype, for FSDP, keeps its own copy)
                st = m.quant_state  # a fresh absmax object makes the layer drop its cached state and
                m.set_quantized(codes, dataclasses.replace(st, absmax=st.absmax.clone()))  # the old codes
    return [(packed, state, bias)]


class LoraWeights:
    """One adapter in the decoder's layout: per layer and group, A^T (in, R) and B^T * scaling (R, out).

    `per_layer[i]` maps a module path inside decoder layer i ("self_attn.q_proj") to (A (r, in),
    B (out, r), scaling). A group's rank R is the sum of its projections' ranks (zero blocks where
    a projection has no adapter), so q, k and v share one pair of matmuls. Adapters are not padded
    to a common rank: the rows of a step are grouped by adapter, so none is needed, and a
    request's bits then do not depend on which other adapters happen to be loaded."""

    def __init__(self, per_layer: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
                 layers: list[dict[str, _Proj]], dtype: torch.dtype, device: torch.device):
        self.groups: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        for mods, projs in zip(per_layer, layers):
            out = {}
            for g, names in GROUPS.items():
                present = [n for n in names if n in mods]
                if not present:
                    continue
                r_total = sum(mods[n][0].shape[0] for n in present)
                at = torch.zeros(projs[g].in_features, r_total, dtype=torch.float32)
                bt = torch.zeros(r_total, sum(projs[g].outs), dtype=torch.float32)
                r0 = 0
                for n, o0, o in zip(names, _starts(projs[g].outs), projs[g].outs):
                    if n in mods:
                        a, b, s = mods[n]
                        r = a.shape[0]
                        at[:, r0:r0 + r] = a.float().t()
                        bt[r0:r0 + r, o0:o0 + o] = b.float().t() * s
                        r0 += r
                out[g] = (at.to(device, dtype).contiguous(), bt.to(device, dtype).contiguous())
            self.groups.append(out)


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]


class Decoder:
    """Prefill prompts into their cache rows (each on its own), or decode one token for many rows at once."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq: int, row_block: int = 2, head_screen: bool = True):
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.head = Head(model.get_output_embeddings(), row_block, head_screen)
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.scale = attn0.scaling
        self.row_block = row_block
        self.layers = []
        self.norms = []
        self.windows = []
        for layer in inner.layers:
            self.layers.append({g: _Proj([layer.get_submodule(n) for n in names]) for g, names in GROUPS.items()})
            self.norms.append(((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                               (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)))
            w = getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
            self.windows.append(w if w is not None and w < max_seq else None)
        self.max_batch, self.max_seq = max_batch, max_seq
        shape = (len(self.layers), max_batch, self.n_kv, max_seq, self.head_dim)
        self.kt_cache = torch.zeros(shape, dtype=self.dtype, device=self.device).transpose(3, 4)  # K^T: (.., D, S)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cos, self.sin = _rope_tables(inner.rotary_emb, max_seq, self.dtype, self.device)
        self._probe()

    # -- build-time checks -----------------------------------------------------------------------
    @torch.no_grad()
    def _probe(self) -> None:
        """Mark the groups whose decoding call computes rows independently (Note: Batch invariance)."""
        seen: dict[tuple, bool] = {}
        g = torch.Generator(device="cpu").manual_seed(0)
        for projs in self.layers:
            for p in projs.values():
                key = (p.dense, p.in_features, tuple(p.outs), 0 if p.dense else len(p.parts))
                if key not in seen:
                    x = torch.randn(SKINNY_MAX_ROWS, p.in_features, generator=g).to(self.device, self.dtype)
                    full = p.step(x)
                    seen[key] = all(torch.equal(p.step(x[i:j]), full[i:j]) for i, j in ((0, 1), (0, 2), (1, 4), (3, 11)))
                p.row_independent = seen[key]

    # -- pieces ------------------------------------------------------------------------------------
    def _linear(self, p: _Proj, x: torch.Tensor, decode: bool) -> torch.Tensor:
        """x (N, in) -> (N, out); in decode, row blocks that keep each row's bits batch-invariant."""
        if not decode:
            return p(x)
        block = SKINNY_MAX_ROWS if p.row_independent else self.row_block
        if x.shape[0] <= block and (p.row_independent or x.shape[0] == block):
            return p.step(x)
        return torch.cat([p.step(c) for c in x.split(block)])  # decode batches are padded to whole blocks

    def _lora(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str, lora_rows) -> torch.Tensor:
        """y += per-row LoRA products; lora_rows: [(LoraWeights, row index tensor or None for all rows)]."""
        for weights, rows in lora_rows:  # (usually empty: a base-model batch)
            ab = weights.groups[layer].get(group)
            if ab is None:
                continue
            at, bt = ab
            xs = x if rows is None else x.index_select(0, rows)  # (m, in)
            m = xs.shape[0]
            h = torch.bmm(xs.unsqueeze(1), at.expand(m, *at.shape))  # (m, 1, R): m one-row matmuls
            d = torch.bmm(h, bt.expand(m, *bt.shape)).squeeze(1)  # (m, out)
            if rows is None:
                y = y.add_(d)
            else:
                y.index_add_(0, rows, d)
        return y

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding, the same arithmetic as transformers' apply_rotary_pos_emb:
        x * cos + rotate_half(x) * sin, with rotate_half's sign folded into the sin table."""
        return qk * cos + qk.roll(self.head_dim // 2, dims=-1) * sin

    # -- forward -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, items: list[tuple[int, list[int], LoraWeights | None]]) -> torch.Tensor:
        """Run prompts into their cache rows: items are (slot, prompt ids, adapter or None). The final
        hidden state of each prompt's last token, (len(items), hidden).

        Each prompt is computed on its own (its own matmuls, so its bits do not depend on the others);
        done together, layer by layer, so that a 4-bit matrix dequantized for one prompt's many rows
        serves every prompt of the step."""
        xs = [F.embedding(torch.tensor(ids, device=self.device), self.embed) for _, ids, _ in items]  # (T, hidden)
        loras = [[(lora, None)] if lora is not None else [] for _, _, lora in items]
        for li, projs in enumerate(self.layers):
            (w1, e1), (w2, e2) = self.norms[li]
            hs = [F.rms_norm(x, (x.shape[-1],), w1, e1) for x in xs]
            qkvs = [self._lora(y, h, li, "qkv", lr) for y, h, lr in zip(projs["qkv"].many(hs), hs, loras)]
            attn = [self._attend_prompt(li, slot, qkv) for (slot, _, _), qkv in zip(items, qkvs)]
            for x, y, a, lr in zip(xs, projs["o"].many(attn), attn, loras):
                x.add_(self._lora(y, a, li, "o", lr))
            hs = [F.rms_norm(x, (x.shape[-1],), w2, e2) for x in xs]
            gus = [self._lora(y, h, li, "gate_up", lr) for y, h, lr in zip(projs["gate_up"].many(hs), hs, loras)]
            acts = [F.silu(gu[:, :gu.shape[1] // 2]) * gu[:, gu.shape[1] // 2:] for gu in gus]
            for x, y, a, lr in zip(xs, projs["down"].many(acts), acts, loras):
                x.add_(self._lora(y, a, li, "down", lr))
        return torch.cat([F.rms_norm(x[-1:], (x.shape[-1],), *self.norm) for x in xs])  # the head's inputs

    def _attend_prompt(self, li: int, slot: int, qkv: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of one prompt (T, (H + 2 Hkv) * D) -> (T, H * D); fills its cache row."""
        h_q, h_kv, d = self.n_heads, self.n_kv, self.head_dim
        t = qkv.shape[0]
        qkv = qkv.view(t, -1, d)
        qk = self._rope(qkv[:, :h_q + h_kv], self.cos[:t, None], self.sin[:t, None])  # (T, H + Hkv, D)
        k = qk[:, h_q:].transpose(0, 1)  # (Hkv, T, D)
        v = qkv[:, h_q + h_kv:].transpose(0, 1)
        self.kt_cache[li, slot, :, :, :t] = k.transpose(1, 2)
        self.v_cache[li, slot, :, :t] = v
        mask = _window_mask(t, self.windows[li], self.device)
        a = F.scaled_dot_product_attention(qk[:, :h_q].transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                           is_causal=mask is None, scale=self.scale, enable_gqa=h_q != h_kv)
        return a[0].transpose(0, 1).reshape(t, h_q * d)  # (T, H*D)

    def _mlp(self, h, li, projs, lora_rows, decode):
        gu = self._lora(self._linear(projs["gate_up"], h, decode), h, li, "gate_up", lora_rows)
        i = gu.shape[-1] // 2
        a = F.silu(gu[:, :i]) * gu[:, i:]
        return self._lora(self._linear(projs["down"], a, decode), a, li, "down", lora_rows)

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int], lora_rows) -> torch.Tensor:
        """One new token for each row: token `tokens[i]` at position `positions[i]` of cache row
        `slots[i]`; lora_rows as in `_lora` (row indices into this batch). Final hidden states (rows, hidden)."""
        n = len(slots)
        n_pad = n if self._all_row_independent() else -(-n // self.row_block) * self.row_block
        ids = torch.tensor(tokens + [tokens[0]] * (n_pad - n), device=self.device)
        pos = torch.tensor(positions, device=self.device)
        slot_t = torch.tensor(slots, device=self.device)
        x = F.embedding(ids, self.embed)  # (N, hidden); rows >= n are padding, never attended or cached
        cos, sin = self.cos[pos, None], self.sin[pos, None]  # (n, 1, D)
        h_q, h_kv, d = self.n_heads, self.n_kv, self.head_dim
        attn = torch.zeros(n_pad, h_q * d, dtype=self.dtype, device=self.device)
        for li, projs in enumerate(self.layers):
            (w1, e1), (w2, e2) = self.norms[li]
            h = F.rms_norm(x, (x.shape[-1],), w1, e1)
            qkv = self._lora(self._linear(projs["qkv"], h, True), h, li, "qkv", lora_rows).view(n_pad, -1, d)
            qk = self._rope(qkv[:n, :h_q + h_kv], cos, sin)  # (n, H + Hkv, D)
            kt, vc = self.kt_cache[li], self.v_cache[li]
            kt[slot_t, :, :, pos] = qk[:, h_q:]
            vc[slot_t, :, pos] = qkv[:n, h_q + h_kv:]
            w = self.windows[li]
            q = (qk[:, :h_q] * self.scale).view(n, h_kv, h_q // h_kv, d)  # (n, Hkv, G, D): query h uses kv head h // G
            out = attn.view(n_pad, h_kv, h_q // h_kv, d)
            for i in range(n):  # attention per row, over that row's own length (Note: Batch invariance)
                s, end = slots[i], positions[i] + 1
                start = 0 if w is None else max(0, end - w)
                scores = torch.bmm(q[i], kt[s, :, :, start:end])  # (Hkv, G, L)
                torch.bmm(torch.softmax(scores, dim=-1), vc[s, :, start:end], out=out[i])  # (Hkv, G, D)
            x.add_(self._lora(self._linear(projs["o"], attn, True), attn, li, "o", lora_rows))
            x.add_(self._mlp(F.rms_norm(x, (x.shape[-1],), w2, e2), li, projs, lora_rows, True))
        return F.rms_norm(x[:n], (x.shape[-1],), *self.norm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head.logits(h)

    def greedy(self, h: torch.Tensor) -> list[int]:
        return self.head.greedy(h)

    def release(self, slot: int) -> None:
        """Nothing to free: a slot's stale cache entries are overwritten by its next prefill."""

    def _all_row_independent(self) -> bool:
        flag = self.__dict__.get("_all_ri")
        if flag is None:
            flag = self._all_ri = all(p.row_independent for projs in self.layers for p in projs.values())
        return flag


class Head:
    """lm_head while decoding: float32 logits for sampling, argmax tokens for greedy rows.

    logits() computes blocks of exactly row_block rows (Note: Batch invariance). greedy() goes
    through a float16 screen when it can (a CPU with torch's fbgemm/x86 quantized engine):

    # Note: Exact greedy through a float16 screen
    At SmolLM2's size lm_head (49,152 x 576, float32: 113 MB) costs ~10 ms of a ~55 ms CPU token at
    batch 1 and ~40 ms of a batch-8 step (four blocks of two rows), bound by reading its weights.
    fbgemm's float16 linear (weights stored as float16 and widened in registers, activations and
    sums in float32) reads half the bytes and serves 1 to 8 rows in one pass, computing each row
    alike (checked: the same bits for a row alone or among others). Rounding a weight to float16
    moves it by at most 2^-11 of itself (2^-25 when subnormal), and a float32 sum of K products is
    off by at most ~K 2^-24 of the sum of their magnitudes, so with ||.|| the Euclidean norm
        |y_j - y16_j| <= (2^-11 + 2 K 2^-24) ||x|| ||w_j|| + 2^-25 ||x||_1 =: e_j   (Cauchy-Schwarz),
    and the argmax of y is among the tokens with y16_j + e_j >= max_i (y16_i - e_i): a handful. Those
    are computed again in float32 from the float32 weights and the best is the token, the float32
    head's argmax up to the last-bit rounding of float32 dot products (the freedom any two float32
    matmul kernels have). Ties resolve to the lowest token id, as argmax does. The float16 copy
    costs half the head's memory; tests/test_engine.py checks the bound and the tokens."""

    def __init__(self, linear: nn.Linear, row_block: int, screen: bool):
        self.weight, self.bias, self.row_block = linear.weight, linear.bias, row_block
        self.screen = _fp16_screen(linear.weight) if screen else None
        self.rows_free = self.weight.device.type == "cpu" and self.weight.dtype == torch.float32 and \
            self._rows_independent()

    @torch.no_grad()
    def _rows_independent(self) -> bool:
        """Probe the batch-invariant kernel on this head once, as Decoder._probe does the projections."""
        x = torch.randn(SKINNY_MAX_ROWS, self.weight.shape[1], generator=torch.Generator().manual_seed(0))
        full = _dense_rows(x, self.weight, self.bias)
        return all(torch.equal(_dense_rows(x[i:j], self.weight, self.bias), full[i:j]) for i, j in ((0, 1), (3, 11)))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, vocab) float32 logits: the batch-invariant kernel where it applies, else row blocks of
        exactly row_block rows."""
        w, b, r = self.weight, self.bias, self.row_block
        if self.rows_free:
            return _dense_rows(x, w, b).float()
        n = x.shape[0]
        if n % r:
            x = torch.cat([x, x.new_zeros(r - n % r, x.shape[1])])
        y = F.linear(x, w, b) if x.shape[0] == r else torch.cat([F.linear(c, w, b) for c in x.split(r)])
        return y[:n].float()

    @torch.no_grad()
    def greedy(self, x: torch.Tensor) -> list[int]:
        if self.screen is None:
            return self.logits(x).argmax(dim=-1).tolist()
        q16, w_norm = self.screen
        y16 = q16(x)  # (N, vocab), float32 sums of float16 weights
        if self.bias is not None:
            y16 = y16 + self.bias
        k = x.shape[1]
        scale = x.norm(dim=1, keepdim=True) * (1.01 * (2.0 ** -11 + 2 * k * 2.0 ** -24))  # (N, 1)
        e = torch.addcmul(x.abs().sum(dim=1, keepdim=True) * (1.01 * 2.0 ** -25), scale, w_norm)  # (N, vocab)
        floor = (y16 - e).amax(dim=1, keepdim=True)
        keep = (y16 + e) >= floor  # the argmax of each row's float32 logits is among these
        out = []
        for i in range(x.shape[0]):
            cand = keep[i].nonzero()[:, 0]
            exact = F.linear(x[i:i + 1], self.weight.index_select(0, cand),
                             None if self.bias is None else self.bias[cand])
            out.append(int(cand[exact[0].argmax()]))
        return out


def _fp16_screen(weight: torch.Tensor):
    """(fbgemm float16 linear over a float16 copy of the weight, ||w_j|| per row), or None where
    torch has no quantized CPU engine (CUDA, some builds; torch.ao's quantized ops are deprecated
    as of torch 2.13, and without them the head stays float32) or the weights overflow float16."""
    weight = weight.detach()
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or \
            not {"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines) or \
            float(weight.abs().max()) > 6e4:
        return None
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import float16_dynamic_qconfig

        with torch.no_grad():
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            lin.weight = nn.Parameter(weight, requires_grad=False)  # shared, not copied
            lin.qconfig = float16_dynamic_qconfig
            return DynamicLinear.from_float(lin), weight.norm(dim=1)  # (vocab,)
    except (ImportError, AttributeError, RuntimeError):
        return None


def _rope_tables(rotary: nn.Module, max_seq: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin, (max_seq, head_dim), from the model's own rotary module (so its rope
    scaling is applied exactly as transformers applies it)."""
    pos = torch.arange(max_seq, device=device)[None]
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), pos)  # (1, S, D) each
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    half = sin.shape[-1] // 2
    sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half(x) = cat(-x2, x1) = roll(x) * sign
    return cos.contiguous(), sin.contiguous()


def _window_mask(t: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (T, T) mask of a causal sliding window (query i sees keys i - window < j <= i), or None."""
    if window is None or window >= t:
        return None
    i = torch.arange(t, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)

