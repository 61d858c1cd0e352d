"""LoftQ initialization (fourbit.nn.loftq) against float64 and against PEFT's own LoftQ.

References and tolerances:
- the factors: float64 truncated SVD of the same residual; s * B @ A agrees to 1e-5 (fp32 SVD).
- PEFT 0.21 (`peft.utils.loftq_utils`) on a transformers + bitsandbytes NF4 + DQ model with the
  same bytes (fourbit's rounding="bnb-cpu"). PEFT's `replace_lora_weights_loftq` hard-codes a CUDA
  device, so on CPU `_peft_loftq` runs its loop with PEFT's own `_low_rank_decomposition` on the
  residual from bitsandbytes' `dequantize_4bit` (the function body minus the device move); on a GPU
  `test_replace_lora_weights_loftq_on_cuda` calls PEFT's function itself. PEFT does not divide by
  the LoRA scaling (PEFT issue #1982), so the like-for-like comparison uses alpha = r (s = 1):
  the per-layer residual errors agree to rtol 1e-4, the updates s*B@A to 1e-5, the logits to 1e-4
(bitsandbytes kept in its fp32 path: see `_fp32`).
"""

import pytest
import torch

from conftest import HAS_CUDA, requires_bnb, requires_peft, tiny_model
from fourbit.errors import UserError
from fourbit.models import checkpoint_weight_reader, load_model
from fourbit.nn import add_lora, lora_modules, save_adapter
from fourbit.nn.loftq import loftq, low_rank_factors, residual_error
from fourbit.quant import dequantize_4bit, quantize_4bit


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _weight(out=96, inp=64, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02


# -- the factors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("r,scaling", [(8, 0.25), (8, 2.0), (200, 1.0)])
def test_factors_are_the_truncated_svd_scaled_by_one_over_s(r, scaling):
    res = _weight()
    a, b = low_rank_factors(res, r, scaling)
    assert a.shape == (r, 64) and b.shape == (96, r) and a.dtype == b.dtype == torch.float32
    u, s, vh = torch.linalg.svd(res.double(), full_matrices=False)
    k = min(r, s.numel())
    best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young: the best rank-k approximation
    torch.testing.assert_close((scaling * (b @ a)).double(), best, rtol=0, atol=1e-5)
    # sqrt(S) split evenly: A and B carry the same energy
    torch.testing.assert_close(a.norm(), b.norm(), rtol=1e-5, atol=0)
    if r >= 64:  # full rank: the residual is represented exactly, padding rows are zero
        torch.testing.assert_close(scaling * (b @ a), res, rtol=0, atol=1e-5)
        assert not a[64:].any() and not b[:, 64:].any()


def test_factors_of_rank_deficient_and_zero_residuals_are_finite():
    g = torch.Generator().manual_seed(2)
    low = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)  # rank 3
    a, b = low_rank_factors(low, 8, 0.5)
    torch.testing.assert_close(0.5 * (b @ a), low, rtol=0, atol=1e-5)
    assert not a[3:].any() and not b[:, 3:].any()  # no made-up directions past the rank
    a, b = low_rank_factors(torch.zeros(10, 12), 4, 0.25)  # a weight NF4 represents exactly
    assert not a.any() and not b.any()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_one_iteration_keeps_the_ordinary_base_and_more_iterations_lower_the_error(quant_type):
    w = _weight(128, 128, seed=1)
    plain, _ = quantize_4bit(w, quant_type, 64, True)
    errors = []
    for t in (1, 3):
        packed, state, a, b = loftq(w, r=8, scaling=0.25, quant_type=quant_type, iterations=t)
        deq = dequantize_4bit(packed, state, torch.float32)
        if t == 1:
            assert torch.equal(packed, plain)  # the base every loader makes: a portable adapter
        # A, B are the rank-8 SVD of the residual of the base they were returned with
        a_ref, b_ref = low_rank_factors(w - deq, 8, 0.25)
        torch.testing.assert_close(b @ a, b_ref @ a_ref, rtol=0, atol=1e-6)
        errors.append(residual_error(w, deq, 0.25 * (b @ a)))
        assert errors[-1] < residual_error(w, deq)
    assert errors[1] < errors[0]  # the paper's alternation helps (at the price of a changed base)
    with pytest.raises(ValueError, match="at least one"):
        loftq(w, 8, 0.25, iterations=0)


# -- on a model ----------------------------------------------------------------------------------
def _fp_and_4bit(path, **kw):
    model = tiny_model("llama")
    model.save_pretrained(path)
    q, _ = load_model(path, quant="nf4", device="cpu", load_tokenizer=False, **kw)
    return model, q


def test_add_lora_loftq_moves_the_4bit_model_toward_the_16bit_one(tmp_path):
    fp, q = _fp_and_4bit(tmp_path)
    ids = _ids()
    ref = fp(ids).logits
    before = (q(ids).logits - ref).norm() / ref.norm()
    add_lora(q, r=16, alpha=16, dropout=0.0, verbose=False, init="loftq",
             weights=checkpoint_weight_reader(tmp_path, q))
    after = (q(ids).logits - ref).norm() / ref.norm()
    assert after < 0.7 * before, (float(before), float(after))
    sd = fp.state_dict()
    for name, m in lora_modules(q).items():
        w, deq = sd[f"{name}.weight"], m.base_layer.dequantize(torch.float32)
        assert residual_error(w, deq, m.delta_weight()) < 0.9 * residual_error(w, deq), name
        assert m.lora_A.weight.requires_grad and m.lora_B.weight.requires_grad and m.lora_B.weight.any()


def test_scaling_is_divided_out(tmp_path):
    """The starting point does not depend on alpha (or rsLoRA): s * B @ A is the same update."""
    fp, _ = _fp_and_4bit(tmp_path)
    deltas = []
    for alpha, rs in ((16, False), (4, False), (16, True)):
        q, _ = load_model(tmp_path, quant="nf4", device="cpu", load_tokenizer=False)
        add_lora(q, r=8, alpha=alpha, use_rslora=rs, verbose=False, init="loftq", weights=_weights(fp))
        deltas.append({n: m.delta_weight() for n, m in lora_modules(q).items()})
    for d in deltas[1:]:
        for n in d:
            torch.testing.assert_close(d[n], deltas[0][n], rtol=0, atol=1e-6)


def _weights(fp):
    """module name -> 16-bit weight, as a mapping (the other form `weights` takes)."""
    from fourbit.nn import find_linear_names

    return {n: fp.get_submodule(n).weight.detach() for n in find_linear_names(fp)}


def test_a_weight_4bit_represents_exactly_keeps_a_trainable_default_adapter(tmp_path):
    from fourbit.nn.loftq import init_loftq

    _, q = _fp_and_4bit(tmp_path)
    add_lora(q, r=4, alpha=8, verbose=False)
    m = lora_modules(q)["model.layers.0.self_attn.q_proj"]
    default_a = m.lora_A.weight.detach().clone()
    init_loftq(m, m.base_layer.dequantize(torch.float32))  # residual 0: nothing to correct
    assert torch.equal(m.lora_A.weight, default_a) and not m.lora_B.weight.any()
    m(torch.randn(3, 64)).sum().backward()
    assert m.lora_B.weight.grad.any()  # B = 0 with the default A: training can start


def test_loftq_errors_are_for_people(tmp_path):
    fp, q = _fp_and_4bit(tmp_path)
    with pytest.raises(UserError, match="needs the 16-bit weights"):
        add_lora(q, verbose=False, init="loftq")
    with pytest.raises(UserError, match="init must be one of"):
        add_lora(q, verbose=False, init="pissa")
    with pytest.raises(UserError, match="no target layer is quantized"):
        add_lora(tiny_model(), verbose=False, init="loftq", weights={})
    with pytest.raises(UserError, match="no tensor for layer model.layers.0.self_attn.q_proj"):
        add_lora(q, r=4, verbose=False, init="loftq", weights={})
    _, q = _fp_and_4bit(tmp_path)
    with pytest.raises(UserError, match=r"shape \[3, 3\]"):
        add_lora(q, r=4, verbose=False, init="loftq", weights={n: torch.zeros(3, 3) for n in _weights(fp)})
    _, q = _fp_and_4bit(tmp_path)
    with pytest.raises(UserError, match="not a 16/32-bit float"):
        add_lora(q, r=4, verbose=False, init="loftq", weights=lambda n: q.get_submodule(n).packed)


def test_checkpoint_weight_reader_reads_one_tensor_per_call(tmp_path):
    fp, q = _fp_and_4bit(tmp_path)
    read = checkpoint_weight_reader(tmp_path, q)
    for name in _weights(fp):
        assert torch.equal(read(name), fp.get_submodule(name).weight)
    with pytest.raises(UserError, match="has no tensor model.layers.7.mlp.up_proj.weight"):
        read("model.layers.7.mlp.up_proj")


def test_train_config_refuses_loftq_without_a_4bit_base():
    from fourbit.train import TrainConfig

    assert any("--init loftq" in p for p in TrainConfig(init="loftq", quant="none").validate())
    assert any("--init must be" in p for p in TrainConfig(init="svd").validate())
    assert not TrainConfig(init="loftq").validate()


# -- against PEFT -------------------------------------------------------------------------------
def _bnb_peft(path, r, alpha):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    return _fp32(get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")))


def _fp32(model):
    """Train mode (no dropout anywhere here): on CPUs with AVX512-BF16, bitsandbytes' eval-mode
    forward repacks the weights and computes in bf16 whatever the compute dtype (bnb 0.50
    Linear4bit.forward); in train mode it computes in fp32, as fourbit does."""
    return model.train()


@torch.no_grad()
def _peft_loftq(peft_model, weights: dict) -> None:
    """PEFT's replace_lora_weights_loftq on CPU: its loop and its SVD split, without the CUDA move."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition

    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, Linear4bit):
            w = weights[name[len(prefix):] + ".weight"].float()
            residual = w - bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            out = _low_rank_decomposition(residual, reduced_rank=module.r["default"])
            module.lora_A["default"].weight.data = out["R"]
            module.lora_B["default"].weight.data = out["L"]


def _peft_layers(peft_model):
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, Linear4bit):
            deq = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            delta = m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
            out[name.removeprefix("base_model.model.")] = (deq, delta)
    return out


@requires_bnb
@requires_peft
def test_same_improvement_as_peft_loftq_and_the_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    fp, ours = _fp_and_4bit(tmp_path / "base", rounding="bnb-cpu")
    sd = fp.state_dict()
    add_lora(ours, r=8, alpha=8, dropout=0.0, verbose=False, init="loftq",
             weights=checkpoint_weight_reader(tmp_path / "base", ours))
    theirs = _bnb_peft(tmp_path / "base", r=8, alpha=8)  # s = 1: PEFT's LoftQ is then right too
    _peft_loftq(theirs, sd)
    peft_layers = _peft_layers(theirs)
    for name, m in lora_modules(ours).items():
        w = sd[f"{name}.weight"]
        deq, delta = peft_layers[name]
        torch.testing.assert_close(m.base_layer.dequantize(torch.float32), deq, rtol=0, atol=0)  # same base
        torch.testing.assert_close(m.delta_weight(), delta, rtol=0, atol=1e-5, msg=name)
        e_ours, e_peft = residual_error(w, deq, m.delta_weight()), residual_error(w, deq, delta)
        assert e_ours == pytest.approx(e_peft, rel=1e-4) and e_ours < residual_error(w, deq)
    ids = _ids()
    ref = fp(ids).logits
    lo, lt = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-4)
    # the adapter is an ordinary PEFT adapter: PEFT loads it onto its own NF4 base, same logits
    save_adapter(ours, tmp_path / "adapter")
    loaded = _fp32(PeftModel.from_pretrained(_bnb_peft(tmp_path / "base", r=8, alpha=8).get_base_model(),
                                             tmp_path / "adapter"))
    torch.testing.assert_close(loaded(ids).logits, lo, rtol=1e-4, atol=1e-4)
    with theirs.disable_adapter():  # and the logits moved toward the 16-bit model's, as PEFT's did
        e_base = float((theirs(ids).logits - ref).norm())
    assert float((lo - ref).norm()) < 0.8 * e_base  # 0.72x at r=8 of 64 dims (PEFT: the same, above)


@requires_bnb
@requires_peft
def test_peft_without_the_scaling_under_corrects_at_qlora_alpha(tmp_path):
    """At QLoRA's alpha < r PEFT's LoftQ adds only s of the correction; ours adds all of it."""
    fp, ours = _fp_and_4bit(tmp_path / "base", rounding="bnb-cpu")
    sd = fp.state_dict()
    add_lora(ours, r=8, alpha=2, dropout=0.0, verbose=False, init="loftq", weights=_weights(fp))
    theirs = _bnb_peft(tmp_path / "base", r=8, alpha=2)  # s = 0.25
    _peft_loftq(theirs, sd)
    ids = _ids()
    ref = fp(ids).logits
    with theirs.disable_adapter():
        e_base = float((theirs(ids).logits - ref).norm())
    e_ours, e_peft = float((ours(ids).logits - ref).norm()), float((theirs(ids).logits - ref).norm())
    assert e_ours < e_peft < e_base, (e_ours, e_peft, e_base)


@pytest.mark.skipif(not HAS_CUDA, reason="PEFT's replace_lora_weights_loftq hard-codes a CUDA device")
@requires_bnb
@requires_peft
def test_replace_lora_weights_loftq_on_cuda(tmp_path):
    from peft import replace_lora_weights_loftq

    fp, ours = _fp_and_4bit(tmp_path / "base", rounding="bnb-cpu")
    add_lora(ours, r=8, alpha=8, dropout=0.0, verbose=False, init="loftq",
             weights=checkpoint_weight_reader(tmp_path / "base", ours))
    theirs = _bnb_peft(tmp_path / "base", r=8, alpha=8)
    replace_lora_weights_loftq(theirs, model_path=str(tmp_path / "base"))
    deltas = _peft_layers(theirs)
    for name, m in lora_modules(ours).items():
        torch.testing.assert_close(m.delta_weight(), deltas[name][1].cpu(), rtol=0, atol=1e-5, msg=name)
