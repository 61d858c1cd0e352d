"""`Engine`: continuous batching of generation requests over one base model and many LoRA adapters.

The server, `fourbit generate`, eval and judge share it. Requests are submitted at any time;
each `step()` first prefills the waiting requests that fit into free batch rows, then runs ONE
batched decoding forward for every request already running, and returns one `TokenEvent` per
request that advanced. Rows join and leave between steps (Orca's iteration-level scheduling,
Yu et al. 2022). Each request may name its own adapter; adapters are added and removed while
requests run (a running request keeps the weights it started with).

The arithmetic lives in `fourbit.decoder` (our own loop over Llama/Mistral/Qwen2 layers with a
static KV cache and unmerged per-row LoRA). Any other architecture runs on transformers' own
forward with a per-request cache, one row at a time, and adapters are refused there; the reason
is in `Engine.fallback_reason`.

Greedy tokens of a request do not depend on the other requests in its steps (see Note: Batch
invariance in fourbit.decoder), and sampling draws from a `torch.Generator` per request, so a
sampled answer depends only on its own seed.

The engine is driven by ONE thread (the server's engine thread); it is not thread-safe.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from fourbit.decoder import GROUPS, Decoder, LoraWeights, unsupported_reason
from fourbit.errors import UserError

DEFAULT_MAX_SEQ = 2048  # the KV cache's length when the caller gives none (and the model allows it)
IN_MODEL_ADAPTER = "default"  # the name under which LoRA layers already in the model are registered


class TokenEvent(NamedTuple):
    request_id: int
    token_id: int
    finished: bool
    finish_reason: str | None  # "stop" (a stop token, included as token_id), "length", or None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    adapter: str | None
    lora: LoraWeights | None
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    stop: frozenset[int]
    slot: int = -1
    length: int = 0  # tokens whose keys/values are in the cache
    last: int = -1  # the newest token (not yet in the cache)
    tokens: list[int] = field(default_factory=list)


class Engine:
    """Continuous-batching generation; see the module docstring.

    model: a loaded transformers causal LM (fourbit.load_model: Linear4bit or nn.Linear layers,
    possibly LoraLinear-wrapped; its LoRA layers are registered as adapter "default"). tokenizer:
    supplies the default stop token (eos) and may be None. max_batch: rows decoded together;
    max_seq_len: the KV cache's length, prompt + new tokens (default: the model's context, at most
    2048). device: where to run (the model is moved there). row_block: rows per dense matmul call
    while decoding (see Note: Batch invariance in fourbit.decoder; 2 costs a 1-row batch nothing
    on MKL). head_screen: greedy tokens through a float16 copy of lm_head and a float32 check of the
    few candidates it leaves, the float32 argmax (see Note: Exact greedy through a float16 screen in
    fourbit.decoder)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_seq_len: int | None = None, device=None,
                 row_block: int = 2, head_screen: bool = True):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise UserError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(row_block, int) or row_block < 1:
            raise UserError(f"row_block must be a positive integer, got {row_block!r}")
        limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ
        max_seq_len = max_seq_len or min(limit, DEFAULT_MAX_SEQ)
        if not isinstance(max_seq_len, int) or not 2 <= max_seq_len:
            raise UserError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if device is not None and torch.device(device) != model.get_input_embeddings().weight.device:
            model.to(device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.fallback_reason = unsupported_reason(model)
        if self.fallback_reason is None:
            self._backend = Decoder(model, max_batch, max_seq_len, row_block, head_screen)
        else:
            self._backend = _TransformersBackend(model)
        self.device = model.get_input_embeddings().weight.device
        self._adapters: dict[str, LoraWeights] = {}
        self._free = list(range(max_batch - 1, -1, -1))  # slot numbers, popped from the end
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}
        self._next_id = 0
        self.default_stop = frozenset(_stop_ids(model, tokenizer))
        if self.fallback_reason is None and _lora_modules(model):
            self.add_adapter(IN_MODEL_ADAPTER, model)

    # -- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path_or_module) -> None:
        """Register a LoRA adapter: a PEFT-format directory, or a module holding fourbit LoraLinear layers."""
        if not isinstance(name, str) or not name:
            raise UserError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise UserError(f"adapter {name!r} is already loaded; remove_adapter({name!r}) first to replace it")
        if self.fallback_reason is not None:
            raise UserError(f"cannot serve adapters on this model: {self.fallback_reason} (the engine falls back "
                            "to transformers' forward, which has no per-request adapters); merge the adapter instead")
        if isinstance(path_or_module, nn.Module):
            modules = {n: (m.lora_A.weight, m.lora_B.weight, m.scaling)
                       for n, m in _lora_modules(path_or_module).items()}
            if not modules:
                raise UserError(f"adapter {name!r}: the module holds no LoraLinear layers")
            source = f"module {type(path_or_module).__name__}"
        else:
            modules, source = _read_peft_dir(path_or_module), str(path_or_module)
        per_layer = self._place(modules, source)
        dec = self._backend
        self._adapters[name] = LoraWeights(per_layer, dec.layers, dec.dtype, dec.device)

    def _place(self, modules: dict, source: str) -> list[dict]:
        """Module paths -> per-layer {relative name: (A, B, scaling)}, with every shape checked."""
        n_layers = len(self._backend.layers)
        per_layer: list[dict] = [{} for _ in range(n_layers)]
        names = {n for group in GROUPS.values() for n in group}
        for path, (a, b, s) in modules.items():
            parts = path.split(".")
            try:
                i = parts.index("layers")
                li, rel = int(parts[i + 1]), ".".join(parts[i + 2:])
            except (ValueError, IndexError):
                li, rel = -1, path
            if not 0 <= li < n_layers or rel not in names:
                raise UserError(f"adapter {source}: LoRA on {path!r} is not supported; the engine applies adapters "
                                f"to the decoder layers' {sorted(n.split('.')[-1] for n in names)} projections")
            base = self.model.model.layers[li].get_submodule(rel)
            base = getattr(base, "base_layer", base)
            want_a, want_b = (a.shape[0], base.in_features), (base.out_features, a.shape[0])
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise UserError(f"adapter {source}: {path} has A {list(a.shape)} and B {list(b.shape)}, the model "
                                f"needs A [r, {base.in_features}] and B [{base.out_features}, r] (another base model?)")
            per_layer[li][rel] = (a.detach(), b.detach(), float(s))
        return per_layer

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; requests already running with it finish with it."""
        if name not in self._adapters:
            raise UserError(f"no adapter named {name!r}; loaded: {self.adapter_names}")
        del self._adapters[name]

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self._adapters)

    # -- requests ------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], *, adapter: str | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop_token_ids: list[int] | None = None) -> int:
        """Queue a request; its id. stop_token_ids=None: the model's end-of-sequence tokens."""
        self._check(prompt_ids, adapter, max_new_tokens, temperature, top_p, seed, stop_token_ids)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
        rid = self._next_id
        self._next_id += 1
        stop = self.default_stop if stop_token_ids is None else frozenset(stop_token_ids)
        self._waiting.append(_Request(rid, list(prompt_ids), adapter, self._adapters.get(adapter) if adapter else None,
                                      max_new_tokens, float(temperature), float(top_p), gen, stop))
        return rid

    def _check(self, prompt_ids, adapter, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> None:
        problems = []
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            problems.append(f"prompt_ids must be a non-empty list of token ids, got {type(prompt_ids).__name__} "
                            f"of length {len(prompt_ids) if hasattr(prompt_ids, '__len__') else '?'}")
        elif not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt_ids):
            bad = next(t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size))
            problems.append(f"prompt token {bad!r} is not an id in [0, {self.vocab_size})")
        elif len(prompt_ids) >= self.max_seq_len:
            problems.append(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_seq_len} "
                            f"including at least one new token: shorten the prompt to <= {self.max_seq_len - 1}")
        if adapter is not None and adapter not in self._adapters:
            problems.append(f"unknown adapter {adapter!r}; loaded: {self.adapter_names or 'none'}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            problems.append(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and not isinstance(seed, int):
            problems.append(f"seed must be an integer or None, got {seed!r}")
        if stop_token_ids is not None and not all(isinstance(t, int) for t in stop_token_ids):
            problems.append(f"stop_token_ids must be a list of integers, got {stop_token_ids!r}")
        if problems:
            raise UserError("; ".join(problems))

    def cancel(self, request_id: int) -> None:
        """Drop a request (waiting or running) and free its batch row now; unknown ids are ignored."""
        req = self._running.pop(request_id, None)
        if req is not None:
            self._release(req)
            return
        self._waiting = deque(r for r in self._waiting if r.id != request_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- stepping ------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Prefill waiting requests into free rows, then one batched decode of the rows running before."""
        rows = list(self._running.values())
        events = []
        admitted = []
        while self._waiting and self._free:
            req = self._waiting.popleft()
            req.slot = self._free.pop()
            self._running[req.id] = req
            admitted.append(req)
        if admitted:
            hidden = self._backend.prefill([(r.slot, r.prompt, r.lora) for r in admitted])
            for req, tok in zip(admitted, self._pick(admitted, hidden)):
                req.length = len(req.prompt)
                events.append(self._advance(req, tok))
        if rows:
            lora_rows = self._lora_rows(rows)
            hidden = self._backend.decode([r.slot for r in rows], [r.last for r in rows], [r.length for r in rows],
                                          lora_rows)
            for req, tok in zip(rows, self._pick(rows, hidden)):
                req.length += 1
                events.append(self._advance(req, tok))
        return events

    def _lora_rows(self, rows: list[_Request]) -> list[tuple[LoraWeights, torch.Tensor | None]]:
        """[(adapter weights, indices of its rows in this batch, or None when it has every row)]."""
        by_adapter: dict[int, tuple[LoraWeights, list[int]]] = {}
        for i, r in enumerate(rows):
            if r.lora is not None:
                by_adapter.setdefault(id(r.lora), (r.lora, []))[1].append(i)
        return [(w, None if len(idx) == len(rows) else torch.tensor(idx, device=self.device))
                for w, idx in by_adapter.values()]

    def _pick(self, rows: list[_Request], hidden: torch.Tensor) -> list[int]:
        """The next token of each row: the argmax, or a draw from the row's own generator."""
        greedy = [i for i, r in enumerate(rows) if r.temperature == 0]
        sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
        out = [0] * len(rows)
        if greedy:
            for i, tok in zip(greedy, self._backend.greedy(hidden[greedy] if sampled else hidden)):
                out[i] = tok
        if sampled:
            logits = self._backend.logits(hidden[sampled])
            for j, i in enumerate(sampled):
                out[i] = _sample(logits[j], rows[i].temperature, rows[i].top_p, rows[i].generator)
        return out

    def _advance(self, req: _Request, tok: int) -> TokenEvent:
        req.tokens.append(tok)
        req.last = tok
        reason = "stop" if tok in req.stop else "length" if (
            len(req.tokens) >= req.max_new_tokens or req.length + 1 >= self.max_seq_len) else None
        if reason is not None:
            del self._running[req.id]
            self._release(req)
        return TokenEvent(req.id, tok, reason is not None, reason)

    def _release(self, req: _Request) -> None:
        self._backend.release(req.slot)
        self._free.append(req.slot)
        req.slot = -1

    # -- convenience ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, adapters: str | list[str | None] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_token_ids: list[int] | None = None) -> list[list[int]]:
        """New tokens for each prompt (a stop token included, as transformers' generate does), batched
        max_batch at a time. With a seed, prompt i samples with seed + i."""
        if self.has_work():
            raise RuntimeError("Engine.generate needs an idle engine; this one has requests in flight")
        names = adapters if isinstance(adapters, list) else [adapters] * len(prompts)
        if len(names) != len(prompts):
            raise UserError(f"got {len(names)} adapters for {len(prompts)} prompts; give one per prompt or one for all")
        ids = []
        try:
            for i, (p, a) in enumerate(zip(prompts, names)):
                ids.append(self.submit(p, adapter=a, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, seed=None if seed is None else seed + i,
                                       stop_token_ids=stop_token_ids))
            out: dict[int, list[int]] = {i: [] for i in ids}
            while self.has_work():
                for ev in self.step():
                    out[ev.request_id].append(ev.token_id)
        finally:
            for i in ids:
                self.cancel(i)
        return [out[i] for i in ids]


def generate_texts(model, tokenizer, texts: list[str], *, adapter: str | None = None, max_new_tokens: int = 256,
                   batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop_token_ids: list[int] | None = None, engine: Engine | None = None) -> list[str]:
    """Answers (new text only) to model inputs that are already rendered (chat template applied),
    generated by an Engine batch_size rows at a time: the batched path for generate / eval / judge.
    Greedy answers equal batch-1 answers token for token. A model carrying a LoRA adapter
    (fourbit.nn.load_adapter) answers with it unless another registered `adapter` is named. Pass
    `engine` (built once on `model`) to reuse it across calls instead of building one per call."""
    if not texts:
        return []
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if engine is None:
        limit = getattr(model.config, "max_position_embeddings", None) or (max(map(len, prompts)) + max_new_tokens)
        engine = Engine(model, tokenizer, max_batch=min(batch_size, len(texts)),
                        max_seq_len=min(limit, max(map(len, prompts)) + max_new_tokens))
    if adapter is None and IN_MODEL_ADAPTER in engine.adapter_names:
        adapter = IN_MODEL_ADAPTER
    outs = engine.generate(prompts, adapters=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)
    return tokenizer.batch_decode(outs, skip_special_tokens=True)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One draw from softmax(logits / temperature), restricted to the top_p nucleus (Holtzman et al. 2020):
    the most likely tokens whose mass before them is below top_p (so at least one)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < top_p
        return int(idx[torch.multinomial(p * keep, 1, generator=gen)].item())
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _stop_ids(model, tokenizer) -> list[int]:
    ids = []
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
        ids += src if isinstance(src, (list, tuple)) else [] if src is None else [src]
    return [int(i) for i in ids]


def _lora_modules(module: nn.Module) -> dict:
    from fourbit.nn import lora_modules

    return lora_modules(module)


def _read_peft_dir(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module path: (A, B, scaling)} from a PEFT adapter directory (safetensors only)."""
    from safetensors import safe_open

    from fourbit.nn.adapters import PREFIX, WEIGHTS_NAME, read_adapter_config

    d = Path(os.fspath(path))
    cfg = read_adapter_config(d)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle, which fourbit never loads)" if (d / "adapter_model.bin").exists() else ""
        raise UserError(f"{d} has no {WEIGHTS_NAME}{extra}")
    scaling = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, pairs = {}, {}
    for key, t in tensors.items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.startswith(PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(PREFIX):-len(suffix)], {})[part] = t
                break
        else:
            raise UserError(f"adapter {d}: unexpected key {key!r}; expected '{PREFIX}<module>.lora_A.weight' or "
                            "'.lora_B.weight'")
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"adapter {d}: {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
        out[name] = (ab["A"], ab["B"], scaling)
    if not out:
        raise UserError(f"adapter {d} holds no LoRA tensors")
    return out


class _TransformersBackend:
    """The fallback: transformers' forward with one cache per request, one row per call."""

    def __init__(self, model):
        self.model = model
        self.caches: dict[int, object] = {}

    @torch.no_grad()
    def prefill(self, items) -> torch.Tensor:
        logits = []
        for slot, ids, _ in items:
            out = self.model(input_ids=torch.tensor([ids], device=self.model.device), use_cache=True)
            self.caches[slot] = out.past_key_values
            logits.append(out.logits[0, -1])
        return torch.stack(logits)

    @torch.no_grad()
    def decode(self, slots, tokens, positions, lora_rows) -> torch.Tensor:
        logits = []
        for s, t in zip(slots, tokens):
            out = self.model(input_ids=torch.tensor([[t]], device=self.model.device), past_key_values=self.caches[s],
                             use_cache=True)
            self.caches[s] = out.past_key_values
            logits.append(out.logits[0, -1])
        return torch.stack(logits)

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)

    # its "hidden states" are the logits already
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h.float()

    def greedy(self, h: torch.Tensor) -> list[int]:
        return h.argmax(dim=-1).tolist()
