"""Loading and saving models: fourbit vs transformers (fp32) and transformers + bitsandbytes.

References: transformers' own fp32 forward for unquantized loading (exact); transformers +
bitsandbytes for 4-bit (identical dequantized weights with rounding="bnb-cpu", logits within
1e-4: bitsandbytes' CPU matmul sums in another order).
"""

import json
import re

import pytest
import torch

from conftest import bnb_exact, requires_bnb, requires_smollm2, tiny_model
from fourbit.errors import UserError
from fourbit.models import load_model, quantize_checkpoint
from fourbit.nn import Linear4bit, find_linear_names

ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox"]


def _ids(vocab=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (2, 11), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_load_matches_transformers_exactly(arch, tmp_path):
    ref = tiny_model(arch)
    ref.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, quant=None, device="cpu")
    assert tok is None  # a tiny checkpoint without tokenizer files
    torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_load_quantizes_every_linear_but_lm_head(arch, tmp_path):
    ref = tiny_model(arch)
    ref.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, quant="nf4", device="cpu")
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert quantized == set(find_linear_names(ref))
    assert model.fourbit_load_report.quantized == len(quantized)
    out, ref_out = model(_ids()).logits, ref(_ids()).logits
    assert 0 < (out - ref_out).abs().max() < 0.5  # 4-bit rounding changes logits a little, not wildly


@requires_bnb
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_same_weights_and_logits_as_transformers_bitsandbytes(arch, quant, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(arch).save_pretrained(tmp_path)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = bnb_exact(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg, device_map="cpu",
                                                            dtype=torch.float32))
    ours, _ = load_model(tmp_path, quant=quant, device="cpu", rounding="bnb-cpu")
    _assert_same_4bit_weights(ours, theirs)
    torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)


def _assert_same_4bit_weights(ours, theirs):
    import bitsandbytes.functional as F

    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            t = theirs.get_submodule(name).weight
            assert torch.equal(m.dequantize(torch.float32), F.dequantize_4bit(t.data, t.quant_state).float()), name
            n += 1
    assert n > 0


@requires_bnb
def test_bitsandbytes_checkpoint_loads_without_requantizing(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path / "fp32")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = bnb_exact(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=cfg,
                                                            device_map="cpu", dtype=torch.float32))
    theirs.save_pretrained(tmp_path / "bnb")
    ours, _ = load_model(tmp_path / "bnb", device="cpu")
    assert ours.fourbit_load_report.prequantized == 14 and ours.fourbit_load_report.quantized == 0
    _assert_same_4bit_weights(ours, theirs)
    torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)


@requires_bnb
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_fourbit_quantize_output_loads_in_transformers_bitsandbytes(quant, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "fp32")
    report = quantize_checkpoint(tmp_path / "fp32", tmp_path / "q", quant=quant, rounding="bnb-cpu")
    assert report.quantized == 14
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == quant
    theirs = bnb_exact(AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu"))
    ours, _ = load_model(tmp_path / "q", device="cpu")
    assert ours.fourbit_load_report.prequantized == 14
    _assert_same_4bit_weights(ours, theirs)
    torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint(tmp_path):
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a, _ = load_model(tmp_path, quant="nf4", device="cpu")
    ref.save_pretrained(tmp_path / "one")
    b, _ = load_model(tmp_path / "one", quant="nf4", device="cpu")
    torch.testing.assert_close(a(_ids()).logits, b(_ids()).logits, rtol=0, atol=0)


def test_quantize_then_load_equals_load_quantizing(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "fp32")
    quantize_checkpoint(tmp_path / "fp32", tmp_path / "q")
    a, _ = load_model(tmp_path / "q", device="cpu")
    b, _ = load_model(tmp_path / "fp32", quant="nf4", device="cpu")
    torch.testing.assert_close(a(_ids()).logits, b(_ids()).logits, rtol=0, atol=0)


# -- bad input ---------------------------------------------------------------------------------------
def test_missing_path():
    with pytest.raises(UserError, match="not found: no such file or directory"):
        load_model("./no/such/model", device="cpu")


def test_pickle_only_directory_is_refused(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match="pickled weights.*safetensors only"):
        load_model(tmp_path, device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_model(tmp_path, device="cpu")


def test_checkpoint_missing_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model("llama").save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks 1 tensor.*layers.1.mlp.down_proj.weight"):
        load_model(tmp_path, device="cpu")


def test_bad_quant_name(tmp_path):
    with pytest.raises(UserError, match="quant must be 'nf4', 'fp4' or 'none'"):
        load_model(tmp_path, quant="int3")


def test_quantize_refuses_nonempty_output(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        quantize_checkpoint(tmp_path / "m", tmp_path / "out")


# -- the embedded model ------------------------------------------------------------------------------
@requires_smollm2
@pytest.mark.slow
def test_smollm2_nf4_still_answers(smollm2_dir):
    model, tok = load_model("smollm2-135m", quant="nf4", device="cpu")
    assert model.fourbit_load_report.quantized == 210
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@requires_smollm2
@pytest.mark.slow
def test_quantize_cli_streams_with_bounded_memory(smollm2_dir, tmp_path):
    """Peak RSS of `fourbit quantize` <= baseline + output + 2 x largest tensor (+ 64 MiB slack)."""
    import subprocess
    import sys

    code = ("import json; from fourbit.models import quantize_checkpoint as q; "
            f"r = q('smollm2-135m', r'{tmp_path / 'q'}'); print(json.dumps(r.__dict__))")
    r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.strip().splitlines()[-1])
    assert r["quantized"] == 210
    budget = r["baseline_rss_bytes"] + r["bytes_out"] + 2 * r["largest_tensor_bytes"] + 64 * 2**20
    assert r["peak_rss_bytes"] < budget, r
    assert r["peak_rss_bytes"] < r["baseline_rss_bytes"] + r["bytes_in"]  # never the whole fp32 model


# -- bad model files: one line naming the file (issue 12 items 2, 10, 13, 14) -------------------------
def _edit_checkpoint(tmp_path, edit, config=None):
    """A tiny Llama saved, with its tensors passed through `edit(state_dict)` and config.json's keys updated."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    tiny_model("llama").save_pretrained(d)
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    if config:
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **config}))
    return d


@pytest.mark.parametrize("key,shape", [("model.norm.weight", (63,)), ("model.embed_tokens.weight", (255, 64)),
                                       ("model.layers.0.self_attn.q_proj.weight", (64, 60))])
def test_wrong_shaped_tensor_is_refused_at_load_naming_it(key, shape, tmp_path):
    """Main loaded a wrong-shaped norm or embedding, then crashed in forward."""
    d = _edit_checkpoint(tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(shape)))
    for quant in ("nf4", "none"):
        with pytest.raises(UserError, match=re.escape(f"m: tensor {key} has shape {list(shape)}, but the architecture "
                                                      f"in config.json needs [")):
            load_model(d, quant=quant, device="cpu")


def test_non_finite_weight_names_the_tensor_and_offers_no_api_flag(tmp_path):
    """Main raised a ValueError traceback ('pass check_finite=False', which no CLI flag offers)."""
    def poison(sd):
        sd["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
        sd["model.layers.0.input_layernorm.weight"][0] = float("inf")

    d = _edit_checkpoint(tmp_path, poison)
    with pytest.raises(UserError) as e:
        load_model(d, device="cpu")
    msg = str(e.value)
    assert "tensor model.layers.0.input_layernorm.weight has 1 non-finite value(s)" in msg or \
        "tensor model.layers.1.mlp.down_proj.weight has 1 non-finite value(s) (NaN/Inf), first at index (3, 5)" in msg
    assert "check_finite" not in msg
    with pytest.raises(UserError, match=r"non-finite") as e:
        quantize_checkpoint(d, tmp_path / "q")
    assert "check_finite" not in str(e.value) and not (tmp_path / "q").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"model\.safetensors: truncated"),
    (lambda p: p.write_bytes(b""), r"model\.safetensors: not a safetensors file: an empty file"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + p.read_bytes()[8:].replace(b"[64,64]", b"[64,65]", 1)),
     r"model\.safetensors: bad safetensors header"),
])
def test_damaged_safetensors_is_one_line_naming_the_file(damage, message, tmp_path):
    d = _edit_checkpoint(tmp_path, lambda sd: None)
    damage(d / "model.safetensors")
    with pytest.raises(UserError, match=message):
        load_model(d, device="cpu")
    with pytest.raises(UserError, match=message):
        quantize_checkpoint(d, tmp_path / "q")


def test_bad_config_json_and_shard_index(tmp_path):
    d = _edit_checkpoint(tmp_path, lambda sd: None)
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(UserError, match=r"config\.json:1: the model's config\.json is not valid JSON"):
        load_model(d, device="cpu")
    (d / "config.json").write_text(json.dumps({"model_type": "strange", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(UserError, match="needs its own Python code") as e:
        load_model(d, device="cpu")
    assert "trust_remote_code" not in str(e.value)  # main told CLI users to pass trust_remote_code=True
    tiny_model("llama").save_pretrained(tmp_path / "s", max_shard_size="100KB")
    (tmp_path / "s" / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    with pytest.raises(UserError, match=r"expected a \"weight_map\" object"):
        load_model(tmp_path / "s", device="cpu")


def test_damaged_gguf_is_one_line_naming_the_file(tmp_path):
    """Main said 'cannot reshape array' (a truncated GGUF) or went on into transformers' reader."""
    (tmp_path / "text.gguf").write_text("not a model\n")
    with pytest.raises(UserError, match=r"text\.gguf: not a GGUF file: it starts with b'not '"):
        load_model(tmp_path / "text.gguf", device="cpu")
    with pytest.raises(UserError, match=r"text\.gguf: not a GGUF file"):
        quantize_checkpoint(tmp_path / "text.gguf", tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_quantize_checks_every_shape_against_config_json(tmp_path):
    """Main wrote a 4-bit checkpoint from wrongly shaped tensors; the error came only at load."""
    d = _edit_checkpoint(tmp_path, lambda sd: sd.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(100, 64)))
    with pytest.raises(UserError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \[100, 64\], but "
                                        r"the architecture in config\.json needs \[128, 64\]"):
        quantize_checkpoint(d, tmp_path / "q")
    d2 = _edit_checkpoint(tmp_path / "x", lambda sd: sd.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(UserError, match=r"lacks 1 tensor\(s\) .*post_attention_layernorm.weight'\]; nothing was "
                                        r"written"):
        quantize_checkpoint(d2, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_quantize_never_writes_over_its_input_or_what_it_did_not_write(tmp_path):
    """Main: `fourbit quantize M --output M --overwrite` replaced M's weights with 4-bit codes."""
    m = tmp_path / "m"
    tiny_model("llama").save_pretrained(m)
    before = {p.name: p.read_bytes() for p in m.iterdir()}
    for out, msg in [(m, r"--output .*m is MODEL .*m itself"), (m / "q", r"lies inside MODEL"),
                     (tmp_path, r"MODEL .*m lies inside --output")]:
        with pytest.raises(UserError, match=msg):
            quantize_checkpoint(m, out, overwrite=True)
    (tmp_path / "link").symlink_to(m)
    with pytest.raises(UserError, match="itself"):  # symlinks resolved
        quantize_checkpoint(m, tmp_path / "link", overwrite=True)
    assert {p.name: p.read_bytes() for p in m.iterdir()} == before
    other = tmp_path / "downloaded"  # a model the user put there: not fourbit's, never replaced
    tiny_model("llama", seed=1).save_pretrained(other)
    with pytest.raises(UserError, match="is not recognisably a model fourbit wrote"):
        quantize_checkpoint(m, other, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--output .*file is a file"):
        quantize_checkpoint(m, tmp_path / "file")
    quantize_checkpoint(m, tmp_path / "q")
    first = (tmp_path / "q" / "model.safetensors").read_bytes()
    quantize_checkpoint(m, tmp_path / "q", overwrite=True, quant="fp4")  # its own output: replaced
    assert (tmp_path / "q" / "model.safetensors").read_bytes() != first
    assert json.loads((tmp_path / "q" / "fourbit-output.json").read_text())["written_by"] == "fourbit quantize"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloaded", "file", "link", "m", "q"]
