"""fourbit.engine: greedy tokens equal transformers' generate (fp32, tokens identical); a request's
tokens do not depend on its batch neighbours, their adapters or when it joined (bit-identical
logits); unmerged adapters equal the LoraLinear model; seeded sampling; continuous batching API."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import requires_smollm2, tiny_model
from fourbit.engine import IN_MODEL_ADAPTER, Engine, generate_texts
from fourbit.errors import UserError
from fourbit.models import load_model
from fourbit.nn import add_lora, load_adapter, lora_modules, save_adapter

PROMPTS = [[5, 17, 33, 9], [100, 3, 7, 8, 9, 10, 11, 12, 50, 61, 62], [42], [7, 7, 7, 7, 7, 7, 7], [200, 201]]
NEW = 10


def _hf_greedy(model, prompt, n=NEW):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _adapter(tmp_path, base, name, r, target, seed):
    """A PEFT-format adapter with random (non-zero) A and B, so it changes the tokens."""
    m = copy.deepcopy(base)
    add_lora(m, r=r, alpha=2 * r, dropout=0.0, target=target, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lm in lora_modules(m).values():
            lm.lora_B.weight.copy_(torch.randn(lm.lora_B.weight.shape, generator=g) * 0.3)
    return save_adapter(m, tmp_path / name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine-tiny")
    tiny_model("llama").save_pretrained(d)
    return d


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {})])
def test_greedy_equals_transformers(arch, extra):
    # mistral with a 6-token window exercises the sliding-window mask; qwen2 the q/k/v biases
    model = tiny_model(arch, **extra)
    if arch == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    ref = [_hf_greedy(model, p) for p in PROMPTS]
    engine = Engine(model, None, max_batch=8, max_seq_len=64)
    assert engine.fallback_reason is None
    assert engine.generate(PROMPTS, max_new_tokens=NEW) == ref


def test_greedy_equals_transformers_4bit(tiny_dir):
    model, _ = load_model(tiny_dir, quant="nf4", device="cpu")
    ref = [_hf_greedy(model, p) for p in PROMPTS]
    assert Engine(model, None, max_batch=4, max_seq_len=64).generate(PROMPTS, max_new_tokens=NEW) == ref


def test_adapters_equal_the_lora_model(tiny_dir, tmp_path):
    base, _ = load_model(tiny_dir, quant="nf4", device="cpu")
    dirs = {"a": _adapter(tmp_path, base, "a", 4, "all-linear", 1), "b": _adapter(tmp_path, base, "b", 8, ["q_proj", "v_proj"], 2)}
    refs = {}
    for name, d in dirs.items():
        m = load_adapter(copy.deepcopy(base), d)
        refs[name] = [_hf_greedy(m, p) for p in PROMPTS[:3]]
    engine = Engine(base, None, max_batch=8, max_seq_len=64)
    for name, d in dirs.items():
        engine.add_adapter(name, d)
    assert engine.adapter_names == ["a", "b"]
    base_tokens = engine.generate(PROMPTS[:3], max_new_tokens=NEW)
    for name in dirs:
        got = engine.generate(PROMPTS[:3], adapters=name, max_new_tokens=NEW)
        assert got == refs[name]
        assert got != base_tokens  # the adapter does something
    # LoRA layers already in the model are registered as "default"
    with_lora = load_adapter(copy.deepcopy(base), dirs["a"])
    e2 = Engine(with_lora, None, max_batch=2, max_seq_len=64)
    assert e2.adapter_names == [IN_MODEL_ADAPTER]
    assert e2.generate(PROMPTS[:3], adapters=IN_MODEL_ADAPTER, max_new_tokens=NEW) == refs["a"]


def _run_alone(engine, reqs):
    return [engine.generate([p], adapters=a, max_new_tokens=NEW)[0] for p, a in reqs]


def _run_staggered(engine, reqs):
    """Two requests start; the others join one per step while the first ones decode."""
    out, ids = {}, []
    pending = list(reqs)
    for p, a in pending[:2]:
        ids.append(engine.submit(p, adapter=a, max_new_tokens=NEW))
    pending = pending[2:]
    while engine.has_work() or pending:
        if pending:
            p, a = pending.pop(0)
            ids.append(engine.submit(p, adapter=a, max_new_tokens=NEW))
        for ev in engine.step():
            out.setdefault(ev.request_id, []).append(ev.token_id)
    return [out[i] for i in ids]


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_batch_invariance(tiny_dir, tmp_path, quant):
    model, _ = load_model(tiny_dir, quant=quant, device="cpu")
    engine = Engine(model, None, max_batch=8, max_seq_len=64)
    engine.add_adapter("a", _adapter(tmp_path, model, "a", 4, "all-linear", 1))
    engine.add_adapter("b", _adapter(tmp_path, model, "b", 8, ["q_proj", "v_proj", "down_proj"], 2))
    reqs = list(zip(PROMPTS, [None, "a", "b", "a", None]))
    alone = _run_alone(engine, reqs)
    together = engine.generate([p for p, _ in reqs], adapters=[a for _, a in reqs], max_new_tokens=NEW)
    staggered = _run_staggered(engine, reqs)
    small = Engine(model, None, max_batch=2, max_seq_len=64)  # queueing: rows leave and others take their slots
    small._adapters = engine._adapters
    queued = small.generate([p for p, _ in reqs], adapters=[a for _, a in reqs], max_new_tokens=NEW)
    assert together == alone and staggered == alone and queued == alone
    assert len({tuple(t) for t in alone}) == len(alone)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_decode_logits_bit_identical_in_any_batch(tiny_dir, tmp_path, quant):
    """Stronger than tokens: a request's hidden state and logits are the same bits alone and among others."""
    model, _ = load_model(tiny_dir, quant=quant, device="cpu")
    engine = Engine(model, None, max_batch=8, max_seq_len=64)
    engine.add_adapter("a", _adapter(tmp_path, model, "a", 4, "all-linear", 1))
    dec, lora = engine._backend, engine._adapters["a"]
    items = [(slot, p, lora if slot % 2 else None) for slot, p in enumerate(PROMPTS)]
    items.append((5, list(range(30, 52)), lora))  # > 16 rows: the dequantize-once path
    together = dec.prefill(items)  # the prompts' first tokens: computed together, the same bits as alone
    for i in (5, 4, 1):
        assert torch.equal(dec.prefill([items[i]])[0], together[i])
    toks, pos = [3, 4, 5, 6, 7], [len(p) for p in PROMPTS]
    full = dec.decode([0, 1, 2, 3, 4], toks, pos, [(lora, torch.tensor([1, 3]))])
    full_logits, full_greedy = dec.logits(full), dec.greedy(full)
    for i in range(5):
        alone = dec.decode([i], [toks[i]], [pos[i]], [(lora, None)] if i % 2 else [])
        assert torch.equal(alone[0], full[i]), f"row {i}"
        assert torch.equal(dec.logits(alone)[0], full_logits[i]) and dec.greedy(alone) == [full_greedy[i]]
    pair = dec.decode([3, 1], [toks[3], toks[1]], [pos[3], pos[1]], [(lora, None)])
    assert torch.equal(pair[0], full[3]) and torch.equal(pair[1], full[1])


def test_float16_screen_bound_and_exact_argmax():
    """The screen's error bound holds against float64, and its tokens are the float32 head's argmax,
    on hidden states with outliers and on near-ties (two rows of W almost equal)."""
    from fourbit.decoder import Head

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 3000, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3000, 96, generator=g) * 0.05)
        lin.weight[7] = lin.weight[11] * (1 + 1e-4)  # near-tie between tokens 7 and 11
    head = Head(lin, row_block=2, screen=True)
    assert head.screen is not None
    x = torch.randn(64, 96, generator=g) * 2
    x[::5, :3] *= 40  # outlier features
    x[1] = lin.weight[11] * 50  # a row whose best tokens are 7 and 11
    q16, w_norm = head.screen
    err = (q16(x).double() - torch.nn.functional.linear(x.double(), lin.weight.double())).abs()
    k = x.shape[1]
    bound = x.norm(dim=1, keepdim=True).double() * (2.0 ** -11 + 2 * k * 2.0 ** -24) * w_norm.double() + \
        x.abs().sum(dim=1, keepdim=True).double() * 2.0 ** -25
    assert bool((err <= bound).all())
    assert head.greedy(x) == head.logits(x).argmax(dim=-1).tolist()
    assert head.greedy(x) == [head.greedy(x[i:i + 1])[0] for i in range(len(x))]  # row by row: the same


def test_finish_reasons_and_events():
    model = tiny_model("llama")
    engine = Engine(model, None, max_batch=2, max_seq_len=16)
    first = engine.generate([PROMPTS[0]], max_new_tokens=4, stop_token_ids=[])[0]
    rid = engine.submit(PROMPTS[0], max_new_tokens=50, stop_token_ids=[first[2]])
    events = []
    while engine.has_work():
        events += engine.step()
    assert [e.token_id for e in events] == first[:3]
    assert events[-1] == (rid, first[2], True, "stop") and not any(e.finished for e in events[:-1])
    ev = [e for _ in range(20) for e in engine.step()] if engine.has_work() else []
    assert ev == []
    # the context (16) ends a request that would run past it
    out = engine.generate([PROMPTS[1]], max_new_tokens=50, stop_token_ids=[])[0]
    assert len(PROMPTS[1]) + len(out) == 16


def test_sampling_is_per_request():
    model = tiny_model("llama")
    engine = Engine(model, None, max_batch=8, max_seq_len=64)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, stop_token_ids=[])
    alone = engine.generate([PROMPTS[0]], seed=7, **kw)[0]
    ids = [engine.submit(PROMPTS[0], seed=7, **kw)] + [engine.submit(p, seed=s, **kw) for s, p in enumerate(PROMPTS)]
    out = {}
    while engine.has_work():
        for e in engine.step():
            out.setdefault(e.request_id, []).append(e.token_id)
    assert out[ids[0]] == alone  # same seed, other neighbours: same draws
    assert engine.generate([PROMPTS[0]], seed=8, **kw)[0] != alone
    greedy = engine.generate([PROMPTS[0]], max_new_tokens=16, stop_token_ids=[])[0]
    assert engine.generate([PROMPTS[0]], seed=3, max_new_tokens=16, temperature=1.0, top_p=1e-9,
                           stop_token_ids=[])[0] == greedy  # a nucleus of one token is greedy


def test_bad_requests_raise_user_errors():
    engine = Engine(tiny_model("llama"), None, max_batch=2, max_seq_len=16)
    for kwargs in (dict(prompt_ids=list(range(16))), dict(prompt_ids=[]), dict(prompt_ids=[999]),
                   dict(prompt_ids=[1], adapter="nope"), dict(prompt_ids=[1], max_new_tokens=0),
                   dict(prompt_ids=[1], temperature=-1.0), dict(prompt_ids=[1], top_p=0.0)):
        with pytest.raises(UserError):
            engine.submit(**kwargs)
    assert not engine.has_work()
    with pytest.raises(UserError, match="no adapter named"):
        engine.remove_adapter("nope")


def test_cancel_frees_the_slot_and_adapters_change_at_run_time(tiny_dir, tmp_path):
    model, _ = load_model(tiny_dir, quant=None, device="cpu")
    engine = Engine(model, None, max_batch=1, max_seq_len=64)
    d = _adapter(tmp_path, model, "a", 4, "all-linear", 1)
    engine.add_adapter("a", d)
    ref = engine.generate([PROMPTS[0]], adapters="a", max_new_tokens=NEW)[0]
    first = engine.submit(PROMPTS[1], max_new_tokens=NEW)
    second = engine.submit(PROMPTS[0], adapter="a", max_new_tokens=NEW)
    assert [e.request_id for e in engine.step()] == [first]
    engine.cancel(first)
    engine.remove_adapter("a")  # the running request keeps the adapter it started with
    tokens = []
    while engine.has_work():
        events = engine.step()
        assert all(e.request_id == second for e in events)
        tokens += [e.token_id for e in events]
    assert tokens == ref
    with pytest.raises(UserError, match="unknown adapter"):
        engine.submit(PROMPTS[0], adapter="a")
    engine.add_adapter("a", d)
    with pytest.raises(UserError, match="already loaded"):
        engine.add_adapter("a", d)


def test_unsupported_architecture_falls_back_to_transformers():
    model = tiny_model("gpt_neox")
    ref = [_hf_greedy(model, p) for p in PROMPTS[:3]]
    engine = Engine(model, None, max_batch=4, max_seq_len=64)
    assert "gpt_neox" in engine.fallback_reason
    assert engine.generate(PROMPTS[:3], max_new_tokens=NEW) == ref
    with pytest.raises(UserError, match="cannot serve adapters"):
        engine.add_adapter("a", model)


def test_generate_texts_batched_equals_batch_1(tiny_chat_dir):
    model, tok = load_model(tiny_chat_dir, quant="nf4", device="cpu")
    texts = ["Hello there", "What is the capital of France? Answer briefly.", "1 2 3", "A much longer prompt " * 5]
    one = generate_texts(model, tok, texts, max_new_tokens=8, batch_size=1)
    assert generate_texts(model, tok, texts, max_new_tokens=8, batch_size=4) == one
    assert generate_texts(model, tok, texts, max_new_tokens=8, batch_size=3) == one
    engine = Engine(model, tok, max_batch=2, max_seq_len=128)
    assert generate_texts(model, tok, texts, max_new_tokens=8, engine=engine) == one  # a reused engine
    ids = tok(texts[1], add_special_tokens=False)["input_ids"]
    ref = _hf_greedy(model, ids, 8)
    assert one[1] == tok.decode(ref, skip_special_tokens=True)


@requires_smollm2
@pytest.mark.slow
def test_smollm2_alone_batched_and_transformers(smollm2_dir):
    model, tok = load_model(smollm2_dir, quant="nf4", device="cpu")
    texts = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "The capital of France is",
             "def fib(n):"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    engine = Engine(model, tok, max_batch=4, max_seq_len=128)
    alone = [engine.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert engine.generate(prompts, max_new_tokens=8) == alone
    assert alone[1] == _hf_greedy(model, prompts[1], 8)


def test_generate_and_chat_answer_through_the_engine(tiny_chat_dir, tmp_path, monkeypatch):
    """generate_batch (fourbit generate, eval, judge --judge model, the demo's score) runs on the
    engine on a CPU, batched answers equal batch-1 answers, and the model's training mode survives."""
    from fourbit import engine as E
    from fourbit.generate import Sampling, generate_batch, use_engine, write_answers

    model, tok = load_model(tiny_chat_dir, quant="nf4", device="cpu")
    add_lora(model, r=4, alpha=8, dropout=0.1, verbose=False)
    assert use_engine(model)
    built = []
    real = E.Engine.__init__
    monkeypatch.setattr(E.Engine, "__init__", lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    prompts = ["Hello there", "What is the capital of France?", "1 2 3", "A much longer prompt " * 5]
    model.train()
    one = [generate_batch(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert generate_batch(model, tok, prompts, max_new_tokens=6, batch_size=4) == one
    assert model.training and len(built) == 5
    model.eval()
    write_answers(model, tok, list(zip("abcd", prompts)), tmp_path / "answers.jsonl", "m", Sampling(6), batch_size=3)
    assert len(built) == 6  # one engine for the whole file
    import json
    rows = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [a.strip() for a in one]
