"""Loading and saving models: fourbit vs transformers (fp32) and transformers + bitsandbytes.

References: transformers' own fp32 forward for unquantized loading (exact); transformers +
bitsandbytes for 4-bit (identical dequantized weights with rounding="bnb-cpu", logits within
1e-4: bitsandbytes' CPU matmul sums in another order).
"""

import json

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
