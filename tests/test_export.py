"""Merging adapters (`fourbit merge`) and GGUF export, checked against independent readers.

References and tolerances:
- Unmerged model: the 4-bit base + LoRA adapter as trained (fourbit), and transformers +
  bitsandbytes + PEFT (`merge_and_unload` for the requantized merge). An fp32 merge equals the
  unmerged model up to float32 rounding of W + s*B@A: atol 2e-5 on logits (measured ~5e-7).
  Against bitsandbytes atol 1e-4: its CPU matmul sums in another order (as in test_adapters).
- GGUF: read back by gguf's GGUFReader (metadata, names, types) and by transformers' GGUF loader,
  which undoes llama.cpp's q/k permutation. Against the merged fp32 model with its weights rounded
  the way the file stores them (fp16, or Q8_0 simulated here in torch): atol 1e-6 (measured 0.0:
  the same weights through the same code; any layout mistake shows as O(1) differences). Against
  the unrounded merge (logits of magnitude ~1): f16 atol 5e-3 (fp16 keeps 11 significant bits, a
  relative error <= 2^-12 per weight; measured 5e-4), q8_0 atol 5e-2 (a step of max|block|/127 per
  weight; measured 1.3e-2).
- Tokenizers read from the GGUF must tokenize exactly like the original (ids equal).

The unit tests use a tiny Llama and a small byte-level BPE tokenizer trained here (367 tokens):
transformers' GGUF reader parses every token string one by one (~12 s per read for SmolLM2's
49,152 tokens), so the 49k vocabulary is left to the SmolLM2 test, which is marked slow.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import bnb_exact, requires_bnb, requires_peft, tiny_model
from fourbit.errors import UserError
from fourbit.export import (DEFAULT_EVAL_TEXTS, merge_adapter, read_eval_file, rotary_to_interleaved,
                            tokenize_text, write_gguf)
from fourbit.models import load_model
from fourbit.nn import add_lora, load_adapter, lora_modules, save_adapter

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "Numbers 1887, 3.14159 and 42; ÜnïcÖdé — dashes, emoji 🙂, tabs\tand  double  spaces.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing ones   ",
]


# -- fixtures ------------------------------------------------------------------------------------------
def small_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "def mean(xs):\n    return sum(xs) / len(xs)\n",
              "Plants turn light into energy; 1887 was a year. Ünïcödé text — with dashes!"] * 20
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    return tok


def make_base(path, tok, seed=0, vocab_pad=0, **overrides):
    """A tiny random Llama (GQA: 4 heads, 2 KV heads) saved with `tok`; vocab_pad ids no token uses."""
    kw = dict(vocab_size=len(tok) + vocab_pad, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    kw.update(overrides)
    arch = kw.pop("arch", "llama")
    model = tiny_model(arch, seed=seed, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_adapter(base, path, r=8, double_quant=True, seed=1, scale=0.05):
    """A LoRA adapter on the 4-bit base with random, non-zero A and B (as after training)."""
    model, _ = load_model(base, quant="nf4", double_quant=double_quant, device="cpu", load_tokenizer=False)
    add_lora(model, r=r, alpha=16, dropout=0.0, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
    save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """(base dir, adapter dir) for a tied tiny Llama with a few unused vocabulary ids."""
    d = tmp_path_factory.mktemp("merge")
    base = make_base(d / "base", tok, vocab_pad=5)
    return base, make_adapter(base, d / "adapter")


def unmerged(base, adapter, double_quant=True):
    model, _ = load_model(base, quant="nf4", double_quant=double_quant, device="cpu", load_tokenizer=False)
    return load_adapter(model, adapter)


def gguf_alone(path, tmp_path):
    """A directory holding only the GGUF file, so transformers cannot read config or tokenizer files beside it."""
    d = tmp_path / "gguf-alone"
    d.mkdir()
    (d / path.name).symlink_to(path)
    return d


def hf_model(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=kw.pop("dtype", torch.float32), **kw).eval()


@torch.inference_mode()
def logits(model, tok, texts=TEXTS):
    return [model(input_ids=tokenize_text(tok, t, 64)).logits[0].float() for t in texts]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- merging -------------------------------------------------------------------------------------------
def test_fp32_merge_equals_unmerged_adapter_model(setup, tok, tmp_path):
    base, adapter = setup
    r = merge_adapter(base, adapter, tmp_path / "out", dtype="fp32", device="cpu")
    assert 0 <= r.max_abs_logit_diff < 2e-5 and r.top1_agreement == 1.0
    assert abs(r.ppl_change_pct) < 1e-3 and r.texts == len(DEFAULT_EVAL_TEXTS) and r.tokens > 40
    # transformers alone loads what was written, and it computes what the unmerged model computes
    merged = hf_model(tmp_path / "out")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    ref = logits(unmerged(base, adapter), tok)
    assert max_diff(logits(merged, tok), ref) < 2e-5
    # ... and the adapter mattered: the merged model is not the 4-bit base
    base_only, _ = load_model(base, quant="nf4", device="cpu", load_tokenizer=False)
    assert max_diff(logits(base_only, tok), ref) > 1e-2
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert saved["max_abs_logit_diff"] == r.max_abs_logit_diff and saved["dtype"] == "fp32"
    assert {"model.safetensors", "config.json", "tokenizer.json", "merge_report.json"} <= set(r.files)


def test_16bit_and_requantized_merges_report_their_cost(setup, tok, tmp_path):
    base, adapter = setup
    costs = {}
    for name, kw in {"fp32": dict(dtype="fp32"), "bf16": dict(dtype="bf16"),
                     "nf4": dict(dtype="fp32", quantize="nf4")}.items():
        costs[name] = merge_adapter(base, adapter, tmp_path / name, device="cpu", **kw)
    assert costs["fp32"].max_abs_logit_diff < costs["bf16"].max_abs_logit_diff < costs["nf4"].max_abs_logit_diff
    assert costs["nf4"].max_abs_logit_diff > 1e-3 and costs["nf4"].ppl_change_pct != 0
    assert costs["nf4"].ppl_merged != costs["nf4"].ppl_unmerged
    bf16 = hf_model(tmp_path / "bf16", dtype="auto")
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "nf4" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4"
    # fourbit reads its 4-bit output as is, and measures exactly what the report says
    again, _ = load_model(tmp_path / "nf4", quant="nf4", device="cpu", load_tokenizer=False)
    ref = logits(unmerged(base, adapter), tok, [t for t in TEXTS])
    assert max_diff(logits(again, tok), ref) > 1e-3


@requires_bnb
@requires_peft
def test_merges_match_bitsandbytes_and_peft(tok, tmp_path):
    """fp32 merge vs PEFT's unmerged bnb model; 4-bit merge vs PEFT's merge_and_unload (which requantizes).

    Without double quantization bitsandbytes' CPU rounding equals ours, so both sides
    hold the same 4-bit codes and only matmul summation order differs (atol 1e-4).
    """
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    base = make_base(tmp_path / "base", tok, seed=3, tie_word_embeddings=False)
    adapter = make_adapter(base, tmp_path / "adapter", double_quant=False)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = PeftModel.from_pretrained(bnb_exact(hf_model(base, quantization_config=bnb, device_map="cpu")),
                                      adapter).eval()
    theirs_unmerged = logits(theirs, tok)
    merge_adapter(base, adapter, tmp_path / "fp32", dtype="fp32", double_quant=False, device="cpu")
    assert max_diff(logits(hf_model(tmp_path / "fp32"), tok), theirs_unmerged) < 1e-4
    merge_adapter(base, adapter, tmp_path / "nf4", dtype="fp32", quantize="nf4", double_quant=False, device="cpu")
    ours_4bit = bnb_exact(hf_model(tmp_path / "nf4", device_map="cpu"))  # transformers + bitsandbytes read our 4-bit files
    assert type(ours_4bit.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    theirs_merged = logits(bnb_exact(theirs.merge_and_unload()), tok)
    assert max_diff(logits(ours_4bit, tok), theirs_merged) < 1e-4
    assert max_diff(theirs_merged, theirs_unmerged) > 1e-3  # requantizing does cost something


def test_eval_file_and_cli(setup, tmp_path, capsys):
    from fourbit.cli import main

    base, adapter = setup
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:2]) + "\n")
    assert read_eval_file(ev) == TEXTS[:2]
    rc = main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"),
               "--dtype", "fp16", "--eval-file", str(ev), "--max-tokens", "16", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "merge_report.json" in out
    rep = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert rep["texts"] == 2 and rep["tokens"] <= 2 * 15 and rep["dtype"] == "fp16"
    assert hf_model(tmp_path / "out", dtype="auto").lm_head.weight.dtype == torch.float16


# -- bad input -------------------------------------------------------------------------------------------
def test_adapter_for_another_model_is_a_clear_error(setup, tok, tmp_path):
    base, _ = setup
    other = make_base(tmp_path / "other", tok, hidden_size=32, intermediate_size=64)
    wrong = make_adapter(other, tmp_path / "wrong")
    with pytest.raises(UserError, match=r"does not fit model [^:]*: [^:]*has shape \[8, \d+\] but the model needs \[8, \d+\]"):
        merge_adapter(base, wrong, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_output_not_empty_needs_overwrite(setup, tmp_path):
    base, adapter = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        merge_adapter(base, adapter, out, device="cpu")
    (out / "model-q8_0.gguf").write_text("stale")
    merge_adapter(base, adapter, out, device="cpu", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model-q8_0.gguf").exists()
    with pytest.raises(UserError, match="is the input directory"):
        merge_adapter(base, adapter, base, device="cpu", overwrite=True)


def test_gguf_refuses_other_architectures_before_loading(tok, tmp_path):
    base = make_base(tmp_path / "qwen", tok, arch="qwen2")
    with pytest.raises(UserError, match=r"Llama-architecture models only.*'qwen2'"):
        merge_adapter(base, tmp_path / "no-adapter-needed-yet", tmp_path / "out", gguf="f16", device="cpu")


def test_bad_options(setup, tmp_path, capsys):
    from fourbit.cli import main

    base, adapter = setup
    for flags, msg in [(["--dtype", "int8"], "--dtype must be one of"), (["--gguf", "q4_k"], "--gguf must be one of"),
                       (["--quantize", "int4"], "--quantize must be nf4 or fp4"),
                       (["--base-quant", "q4"], "--base-quant must be")]:
        rc = main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "o"), *flags])
        assert rc == 2 and msg in capsys.readouterr().err
    assert main(["merge", "--model", str(base)]) == 2
    assert "--adapter DIR is required" in capsys.readouterr().err
    with pytest.raises(UserError, match="no adapter_config.json"):
        merge_adapter(base, tmp_path, tmp_path / "o2", device="cpu")
    with pytest.raises(UserError, match="no such file"):
        read_eval_file(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"line 1: expected an object with a string \"text\""):
        read_eval_file(tmp_path / "bad.jsonl")


# -- GGUF --------------------------------------------------------------------------------------------------
def test_rotary_permutation_pairs_half_split_dims():
    d, heads = 8, 2
    w = torch.arange(heads * d, dtype=torch.float32)[:, None]  # row index = (head, dim)
    out = rotary_to_interleaved(w, heads)[:, 0].long().tolist()
    # within each head, dims (i, i + D/2) become neighbours (2i, 2i + 1)
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def _rounded_like_gguf(model, gguf_type):
    """The model with every 2-D weight rounded as the GGUF stores it (fp16, or Q8_0 done here in torch)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 2:
                continue
            if gguf_type == "f16" or p.shape[-1] % 32:
                p.copy_(p.half().float())
                continue
            blocks = p.reshape(-1, 32)  # Q8_0: 32 weights, one fp16 scale max|x|/127, int8 codes
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            q = torch.round(blocks / torch.where(d == 0, 1, d)).clamp(-127, 127)
            p.copy_((q * d.half().float()).reshape(p.shape))
    return model


@pytest.mark.parametrize("gguf_type,tied,ffn", [("f16", True, 128), ("f16", False, 128), ("q8_0", False, 128),
                                                ("q8_0", True, 72)])
def test_gguf_round_trip(tok, tmp_path, gguf_type, tied, ffn):
    """GGUFReader sees llama.cpp's layout; transformers reads back the merged model and tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    base = make_base(tmp_path / "base", tok, seed=5, vocab_pad=5, tie_word_embeddings=tied, intermediate_size=ffn)
    adapter = make_adapter(base, tmp_path / "adapter")
    r = merge_adapter(base, adapter, tmp_path / "out", dtype="fp32", gguf=gguf_type, device="cpu")
    path = tmp_path / "out" / f"model-{gguf_type}.gguf"
    assert r.gguf["path"] == str(path) and path.is_file()
    assert (ffn % 32 != 0) == any("not a multiple of 32" in w for w in r.gguf["warnings"])

    reader = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.embedding_length"], f["llama.feed_forward_length"], f["llama.context_length"]) == (64, ffn, 256)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.rope.freq_base"] == 10000.0
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["llama.vocab_size"] == len(tok) + 5 and f["tokenizer.chat_template"] == CHATML
    tk = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")}
    assert tk == {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                  "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tok) + 5 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:4] == [3, 3, 3, 1] and types[-1] == 5 and tokens[-1] == f"[PAD{len(tok) + 4}]"
    tensors = {t.name: t for t in reader.tensors}
    expect = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm",
                                                           "ffn_gate", "ffn_up", "ffn_down", "ffn_norm")}
    assert set(tensors) == expect | (set() if tied else {"output.weight"})
    Q = gguf.GGMLQuantizationType
    want = Q.F16 if gguf_type == "f16" else Q.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == want and tensors["blk.1.ffn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == (want if ffn % 32 == 0 else Q.F16)
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]  # ggml order: (in, out)

    # transformers' GGUF loader: same logits as the merged safetensors model, up to the stored rounding
    merged = logits(hf_model(tmp_path / "out"), tok)
    alone = gguf_alone(path, tmp_path)
    back = hf_model(alone, gguf_file=path.name)
    assert back.config.tie_word_embeddings == tied
    got = logits(back, tok)
    assert max_diff(got, logits(_rounded_like_gguf(hf_model(tmp_path / "out"), gguf_type), tok)) < 1e-6
    assert 0 < max_diff(got, merged) < (5e-3 if gguf_type == "f16" else 5e-2)
    assert r.gguf["max_abs_logit_diff"] < (5e-3 if gguf_type == "f16" else 5e-2)

    # the tokenizer read from the GGUF tokenizes like the original, special tokens and chat template included
    gtok = AutoTokenizer.from_pretrained(str(alone), gguf_file=path.name)
    for t in TEXTS:
        assert gtok(t)["input_ids"] == tok(t)["input_ids"], t
        assert gtok.decode(tok(t)["input_ids"]) == tok.decode(tok(t)["input_ids"])
    chat = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert gtok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert (gtok.bos_token_id, gtok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_gguf_refuses_what_it_cannot_write(tok, tmp_path):
    from transformers import AutoTokenizer

    base = make_base(tmp_path / "base", tok)
    model = hf_model(base)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(UserError, match="beyond float16's range"):
        write_gguf(model, AutoTokenizer.from_pretrained(base), tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
    write_gguf(model, AutoTokenizer.from_pretrained(base), tmp_path / "x.gguf", "q8_0")  # q8_0 holds it
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(UserError, match="RoPE is scaled"):
        write_gguf(model, AutoTokenizer.from_pretrained(base), tmp_path / "y.gguf")
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UserError, match="byte-level BPE tokenizers.*WordPiece"):
        write_gguf(model, PreTrainedTokenizerFast(tokenizer_object=wp), tmp_path / "z.gguf")


# -- SmolLM2 -----------------------------------------------------------------------------------------------
def random_llama_adapter(config, path, targets, r=4, alpha=8, std=0.01, seed=0):
    """A PEFT-format adapter with random A and B for a Llama config, written without loading the model."""
    from safetensors.torch import save_file

    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, q, kv, f = config.hidden_size, config.num_attention_heads * hd, config.num_key_value_heads * hd, \
        config.intermediate_size
    shapes = {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
              "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, f), "up_proj": ("mlp", h, f),
              "down_proj": ("mlp", f, h)}  # name -> (parent, in, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config.num_hidden_layers):
        for t in targets:
            parent, fan_in, fan_out = shapes[t]
            key = f"base_model.model.model.layers.{i}.{parent}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * std
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "target_modules": targets}))
    return path


@pytest.mark.slow
def test_smollm2_merge_and_gguf(smollm2_dir, tmp_path):
    """A small random adapter on the embedded SmolLM2-135M: fp32 merge + GGUF f16, read back by transformers.

    One short text and no read-back inside merge_adapter: transformers' GGUF reader parses the 49k
    token strings one by one (~12 s per read on a quiet machine), so the file is read twice here only.
    """
    from transformers import AutoConfig, AutoTokenizer

    adapter = random_llama_adapter(AutoConfig.from_pretrained(smollm2_dir), tmp_path / "adapter",
                                   ["q_proj", "k_proj", "v_proj", "down_proj"])
    text = ["Plants turn light into chemical energy, and 1887 was a year."]
    r = merge_adapter(smollm2_dir, adapter, tmp_path / "out", dtype="fp32", gguf="f16", check_gguf=False,
                      eval_texts=text, device="cpu")
    assert r.max_abs_logit_diff < 1e-3 and abs(r.ppl_change_pct) < 0.01  # fp32: rounding of W + s*B@A only
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    alone = gguf_alone(tmp_path / "out" / "model-f16.gguf", tmp_path)
    got = logits(hf_model(alone, gguf_file="model-f16.gguf"), tok, text)
    merged = _rounded_like_gguf(hf_model(tmp_path / "out"), "f16")
    assert max_diff(got, logits(merged, tok, text)) < 1e-5  # same fp16-rounded weights (measured 0.0)
    gtok = AutoTokenizer.from_pretrained(str(alone), gguf_file="model-f16.gguf")
    for t in TEXTS:
        assert gtok(t)["input_ids"] == tok(t)["input_ids"], t
