"""Linear4bit and LoraLinear against independent references (float64 math, dequantized weights)."""

import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from fourbit.errors import UserError
from fourbit.nn import Linear4bit, LoraLinear, add_lora, find_linear_names, lora_modules, merge_lora
from fourbit.nn.linear4bit import _Linear4bitFn


def _q(out_f=48, in_f=80, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return lin, Linear4bit.from_linear(lin)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_use_the_dequantized_weight(bias):
    lin, q = _q(bias=bias)
    w = q.dequantize(torch.float64)  # (out, in)
    x = torch.randn(3, 5, 80, requires_grad=True)
    y = q(x)
    ref = x.double() @ w.T + (lin.bias.double() if bias else 0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(x.grad.double(), gy.double() @ w, rtol=1e-5, atol=1e-5)


def test_no_weight_gradient_and_only_packed_data_saved():
    _, q = _q()
    x = torch.randn(4, 80, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _Linear4bitFn.apply(x, q.weight, q.quant_state, None).sum().backward()
    assert [t.dtype for t in saved] == [torch.uint8] and saved[0].numel() == 48 * 80 // 2
    assert not any(p.requires_grad for p in q.parameters())


def test_compute_dtype_casts_and_restores():
    _, q = _q()
    q.compute_dtype = torch.float64
    x = torch.randn(2, 80)
    y = q(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ q.dequantize(torch.float64).T + q.bias.double()).float())


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(48, 80), (7, 9)])  # 7x9: 32 bytes, padded for 4-byte storage
def test_float_storage_keeps_the_bytes_and_the_outputs(storage, shape):
    """quant_storage for FSDP2: packed bytes stored as a frozen float parameter, reinterpreted."""
    _, q = _q(*shape)
    raw, x = q.weight.clone(), torch.randn(3, shape[1], requires_grad=True)
    y0 = q(x)
    q.set_storage_dtype(storage)
    assert q.weight.dtype == storage and isinstance(q.weight, nn.Parameter) and not q.weight.requires_grad
    assert q.weight.numel() * q.weight.element_size() >= raw.numel()
    assert torch.equal(q.packed, raw.reshape(-1))
    y1 = q(x)
    assert torch.equal(y1, y0)
    y1.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(y1) @ q.dequantize(torch.float32))
    q.set_storage_dtype(torch.uint8)
    assert q.weight.dtype == torch.uint8 and torch.equal(q.weight, raw) and "weight" in dict(q.named_buffers())


def test_state_dict_round_trip_uses_bnb_keys():
    _, q = _q()
    sd = q.state_dict()
    assert {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"} == set(sd)
    q2 = Linear4bit(80, 48, bias=True)
    q2.load_state_dict(sd)
    assert torch.equal(q2.dequantize(), q.dequantize())


# -- LoRA ----------------------------------------------------------------------------------------
def test_lora_init_matches_peft_convention():
    torch.manual_seed(0)
    _, q = _q(in_f=256)
    lora = LoraLinear(q, r=8, alpha=16)
    assert torch.all(lora.lora_B.weight == 0)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert lora.lora_A.weight.abs().max() <= bound and lora.lora_A.weight.abs().max() > 0.9 * bound
    assert lora.scaling == 2.0 and LoraLinear(q, r=16, alpha=16, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("quantized", [True, False])
def test_lora_forward_and_merge_match_float64(quantized):
    lin, q = _q()
    base = q if quantized else lin
    lora = LoraLinear(base, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(6, 80)
    w = (q.dequantize(torch.float64) if quantized else lin.weight.double())
    delta = lora.lora_B.weight.double() @ lora.lora_A.weight.double() * 2.0
    ref = x.double() @ (w + delta).T + lin.bias.double()
    torch.testing.assert_close(lora(x).double(), ref, rtol=1e-5, atol=1e-5)
    merged = lora.merge()
    assert isinstance(merged, nn.Linear)
    torch.testing.assert_close(merged(x).double(), ref, rtol=1e-5, atol=1e-5)
    requant = lora.merge(requantize=True)
    assert isinstance(requant, Linear4bit)
    err = (requant(x) - merged(x)).abs().max().item()
    assert 0 < err < 1.0  # rounding to 4-bit costs something, bounded


def test_lora_gradients_reach_only_adapters():
    _, q = _q()
    lora = LoraLinear(q, r=4, alpha=8)
    nn.init.normal_(lora.lora_B.weight)
    lora(torch.randn(3, 80)).pow(2).sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad is not None
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)


def test_bf16_compute_with_fp32_adapters():
    lin = nn.Linear(64, 32, dtype=torch.bfloat16)
    q = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    lora = LoraLinear(q, r=4, alpha=8)
    assert lora.lora_A.weight.dtype == torch.float32
    y = lora(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lora.lora_B.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("r", [0, -1, 2.5])
def test_bad_rank(r):
    with pytest.raises((ValueError, UserError), match="rank r must be a positive integer"):
        add_lora(tiny_model(), r=r)


# -- injection -------------------------------------------------------------------------------------
def test_add_lora_wraps_every_linear_but_lm_head(capsys):
    model = tiny_model("llama")
    names = find_linear_names(model)
    assert "lm_head" not in names and len(names) == 7 * 2
    add_lora(model, r=4)
    assert set(lora_modules(model)) == set(names)
    assert capsys.readouterr().out.startswith("trainable params: ")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    norms = [m for n, m in model.named_modules() if "norm" in n and hasattr(m, "weight")]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)


@pytest.mark.parametrize("dtype,norm_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_norms_go_to_fp32_for_fp16_models_only(dtype, norm_dtype):
    model = tiny_model("llama").to(dtype)
    add_lora(model, r=4, verbose=False)
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert norms and all(m.weight.dtype == norm_dtype for m in norms)
    assert model.get_output_embeddings().weight.dtype == dtype


def test_add_lora_named_targets_and_unknown_names():
    model = tiny_model("llama")
    add_lora(model, r=4, target=["q_proj", "v_proj"], verbose=False)
    assert {n.split(".")[-1] for n in lora_modules(model)} == {"q_proj", "v_proj"}
    with pytest.raises(UserError, match=r"match no linear layer.*'down_proj'.*'q_proj'"):
        add_lora(tiny_model("llama"), target=["qkv"])


def test_model_without_linear_layers():
    with pytest.raises(UserError, match="has no linear layers"):
        add_lora(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))


def test_fresh_adapter_leaves_the_model_unchanged_and_merge_round_trip():
    model = tiny_model("llama")
    x = torch.randint(0, 256, (2, 12))
    ref = model(x).logits
    add_lora(model, r=4, verbose=False)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.02)
    with torch.no_grad():
        adapted = model(x).logits
    merge_lora(model)
    assert not lora_modules(model)
    torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    grads = []
    for ckpt in (False, True):
        model = tiny_model("llama")
        add_lora(model, r=4, dropout=0.0, gradient_checkpointing=ckpt, verbose=False)
        model.train()
        for m in lora_modules(model).values():
            nn.init.constant_(m.lora_B.weight, 0.01)
        x = torch.randint(0, 256, (2, 12))
        model(input_ids=x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
