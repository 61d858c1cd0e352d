"""Adapters in PEFT's format, both directions, and QLoRA numerics against transformers+bnb+PEFT.

Reference: PEFT 0.21 on a transformers + bitsandbytes 4-bit model with the same weights, fp32
compute. Tolerances: logits rtol/atol 1e-4 (bitsandbytes' CPU matmul sums in a different order
than ours); LoRA gradients rtol 1e-3 / atol 1e-5 (the same, through a backward pass).
"""

import json

import pytest
import torch
from torch import nn

from conftest import bnb_exact, requires_bnb, requires_peft, tiny_model
from fourbit.errors import UserError
from fourbit.models import load_model
from fourbit.nn import add_lora, load_adapter, lora_modules, save_adapter


def _ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def _bnb_peft(path, quant="nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    return bnb_exact(AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu",
                                                         dtype=torch.float32))


def test_save_layout(tmp_path):
    model = add_lora(tiny_model(), r=4, alpha=8, verbose=False)
    save_adapter(model, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["r"] == 4
    assert conf["lora_alpha"] == 8 and conf["bias"] == "none" and conf["use_dora"] is False
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28


def test_round_trip_in_fourbit(tmp_path):
    a = add_lora(tiny_model(), r=4, verbose=False)
    _randomize(a)
    save_adapter(a, tmp_path)
    b = load_adapter(tiny_model(), tmp_path)
    torch.testing.assert_close(b(_ids()).logits, a(_ids()).logits, rtol=0, atol=0)


@requires_bnb
@requires_peft
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_same_logits_and_lora_gradients_as_bnb_peft(arch, tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny_model(arch).save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, quant="nf4", device="cpu", rounding="bnb-cpu")
    add_lora(ours, r=8, alpha=16, dropout=0.0, verbose=False)
    theirs = get_peft_model(_bnb_peft(tmp_path), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules="all-linear"))
    # same adapter weights: copy ours (random B) into theirs by PEFT's names
    _randomize(ours)
    sd = {k.replace(".weight", ".default.weight"): v for k, v in _peft_named(ours).items()}
    missing = theirs.load_state_dict(sd, strict=False).unexpected_keys
    assert not missing
    # with B = 0 the output is the quantized base's
    ids = _ids()
    lo, lt = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(lo.logits, lt.logits, rtol=1e-4, atol=1e-4)
    lo.loss.backward()
    lt.loss.backward()
    g_ours = _peft_named(ours, grad=True)
    g_theirs = {k.replace(".default", ""): p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    assert set(g_ours) == set(g_theirs)
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=1e-3, atol=1e-5, msg=k)


def _peft_named(model, grad=False):
    out = {}
    for name, m in lora_modules(model).items():
        for x in ("A", "B"):
            w = getattr(m, f"lora_{x}").weight
            out[f"base_model.model.{name}.lora_{x}.weight"] = w.grad if grad else w.detach()
    return out


@requires_bnb
@requires_peft
def test_lora_b_zero_equals_quantized_base(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    base, _ = load_model(tmp_path, quant="nf4", device="cpu")
    ref = base(_ids()).logits
    add_lora(base, r=8, verbose=False)
    torch.testing.assert_close(base(_ids()).logits, ref, rtol=0, atol=0)


@requires_bnb
@requires_peft
def test_fourbit_adapter_loads_in_peft_and_back(tmp_path):
    from peft import PeftModel

    tiny_model("llama").save_pretrained(tmp_path / "base")
    ours, _ = load_model(tmp_path / "base", quant="nf4", device="cpu", rounding="bnb-cpu")
    add_lora(ours, r=8, alpha=16, dropout=0.0, verbose=False)
    _randomize(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(_bnb_peft(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)

    theirs.save_pretrained(tmp_path / "peft_adapter")  # PEFT's own file -> fourbit
    again, _ = load_model(tmp_path / "base", quant="nf4", device="cpu", rounding="bnb-cpu")
    load_adapter(again, tmp_path / "peft_adapter")
    torch.testing.assert_close(again(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)


# -- bad adapters leave the model untouched ---------------------------------------------------------
def _saved(tmp_path, **kw):
    model = add_lora(tiny_model(), r=4, verbose=False, **kw)
    _randomize(model)
    save_adapter(model, tmp_path)
    return tmp_path


def _unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and \
        set(before) == set(model.state_dict())


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    d = _saved(tmp_path)
    model = tiny_model(hidden_size=32, intermediate_size=64)
    same = _unchanged(model)
    with pytest.raises(UserError, match=r"down_proj.lora_A.weight has shape \[4, 128\] but the model needs \[4, 64\]"):
        load_adapter(model, d)
    assert same() and not lora_modules(model)


def test_shape_mismatch_into_existing_lora_layers(tmp_path):
    d = _saved(tmp_path)
    model = add_lora(tiny_model(), r=8, verbose=False)
    same = _unchanged(model)
    with pytest.raises(UserError, match=r"has shape \[4, 128\] but the model's layer needs \[8, 128\]"):
        load_adapter(model, d)
    assert same()


def test_missing_and_malformed_config(tmp_path):
    d = _saved(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(tiny_model(), d)
    (d / "adapter_config.json").write_text("{r: 4")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(tiny_model(), d)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0}))
    with pytest.raises(UserError, match="r must be a positive integer, got 0"):
        load_adapter(tiny_model(), d)


def test_pickled_adapter_is_refused(tmp_path):
    d = _saved(tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(UserError, match="adapter_model.bin is a pickle"):
        load_adapter(tiny_model(), d)


def test_adapter_for_other_modules(tmp_path):
    d = _saved(tmp_path)
    model = nn.Module()
    model.lin = nn.Linear(64, 64)
    with pytest.raises(UserError, match=r"match no linear layer"):
        load_adapter(model, d)


# -- corrupt adapter files (issue 12 items 5 and 13) ------------------------------------------------------
_Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _rewrite(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("damage,msg", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size - 100]), r"adapter_model.safetensors: truncated"),
    (lambda p: p.write_bytes(b""), r"adapter_model.safetensors: not a safetensors file: an empty file \(0 bytes\)"),
    (lambda p: p.write_bytes(p.read_bytes().replace(b'"shape":[64,4]', b'"shape":[64,8]', 1)),  # a lying header
     r"adapter_model.safetensors: bad safetensors header: tensor '.*' is F32 \[64, 8\], 2048 bytes, but its "
     r"data_offsets span 1024"),
])
def test_a_corrupt_adapter_file_is_one_line_and_leaves_the_model_alone(tmp_path, damage, msg):
    d = _saved(tmp_path)
    damage(d / "adapter_model.safetensors")
    for model in (tiny_model(), add_lora(tiny_model(), r=4, verbose=False)):
        same = _unchanged(model)
        with pytest.raises(UserError, match=msg):
            load_adapter(model, d)
        assert same()


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")])
def test_non_finite_adapter_values_are_an_error_naming_the_tensor(tmp_path, value, what):
    d = _saved(tmp_path)
    _rewrite(d, lambda t: t[_Q_B].view(-1).index_fill_(0, torch.tensor([3, 7]), value))
    model = add_lora(tiny_model(), r=4, verbose=False)
    same = _unchanged(model)
    with pytest.raises(UserError, match=rf"adapter .*: {_Q_B} has 2 non-finite values \(.*{what}.*\)"):
        load_adapter(model, d)
    assert same()


def test_adapter_tensors_that_are_not_floats_are_refused(tmp_path):
    d = _saved(tmp_path)
    _rewrite(d, lambda t: t.__setitem__(_Q_B, t[_Q_B].round().to(torch.int64)))
    with pytest.raises(UserError, match=rf"{_Q_B} has dtype torch.int64; LoRA weights are floating point"):
        load_adapter(tiny_model(), d)


@pytest.mark.parametrize("field,value,msg", [
    ("lora_alpha", float("nan"), r"lora_alpha must be a finite number, got nan"),
    ("lora_alpha", True, r"lora_alpha must be a finite number, got True"),
    ("lora_dropout", "lots", r"lora_dropout must be a number in \[0, 1\), got 'lots'"),
    ("r", True, r"r must be a positive integer, got True"),
])
def test_adapter_config_values_of_the_wrong_kind(tmp_path, field, value, msg):
    d = _saved(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=msg):
        load_adapter(tiny_model(), d)


def test_saving_a_non_finite_adapter_is_refused_and_writes_nothing(tmp_path):
    model = add_lora(tiny_model(), r=4, verbose=False)
    with torch.no_grad():
        lora_modules(model)["model.layers.0.self_attn.q_proj"].lora_B.weight[1, 2] = float("nan")
    with pytest.raises(UserError, match=rf"{_Q_B} has 1 non-finite values \(NaN\)"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_an_adapter_path_that_is_a_file_or_not_utf8(tmp_path):
    d = _saved(tmp_path / "a")
    with pytest.raises(UserError, match=r"adapter_model.safetensors is a file, not an adapter directory"):
        load_adapter(tiny_model(), d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_bytes(b'{"r": 4, "note": "\xff"}')
    with pytest.raises(UserError, match=r"adapter_config.json: the adapter config is not UTF-8 text"):
        load_adapter(tiny_model(), d)
