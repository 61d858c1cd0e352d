"""causal_lm_loss (labelled positions only, lm_head + cross-entropy in chunks) against its plain
reference: transformers' full logits and F.cross_entropy (chunk=None), values and gradients at
fp32, relative tolerance 1e-5 (gradients: in norm). The frozen-head path forms the loss
gradient in forward and runs lm_head once per chunk, not twice.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from fourbit.loss import causal_lm_loss
from fourbit.nn import add_lora, lora_modules


def _model():
    model = tiny_model("llama")
    add_lora(model, r=4, dropout=0.0, verbose=False)
    model.train()
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("chunk", [512, 7])  # one chunk; several chunks with a partial last one
def test_frozen_head_loss_and_gradients_match_full_logits(chunk, monkeypatch):
    model = _model()
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[1, 15:] = -100
    calls, linear = [0], F.linear

    def counted(x, w, *a, **k):
        calls[0] += w is model.lm_head.weight
        return linear(x, w, *a, **k)

    monkeypatch.setattr(F, "linear", counted)
    loss, n = causal_lm_loss(model, ids, labels, chunk=chunk)
    loss.backward()
    monkeypatch.undo()
    fused_grads = _grads(model)
    assert n == int((labels[:, 1:] != -100).sum()) == 31
    assert calls[0] == -(-n // chunk)  # lm_head once per chunk: no recomputation in backward
    model.zero_grad(set_to_none=True)
    ref, n_ref = causal_lm_loss(model, ids, labels, chunk=None)
    ref.backward()
    assert n_ref == n
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    ref_grads = _grads(model)
    assert float((fused_grads - ref_grads).norm() / ref_grads.norm()) < 1e-5


def test_num_tokens_scales_the_gradient():
    model = _model()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    causal_lm_loss(model, ids, ids, num_tokens=1)[0].backward()
    g1 = _grads(model)
    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, ids, ids, num_tokens=22)[0].backward()
    assert float((_grads(model) * 22 - g1).norm() / g1.norm()) < 1e-6


def test_trainable_head_keeps_the_checkpointed_path():
    model = _model()
    model.lm_head.weight.requires_grad_(True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    loss, _ = causal_lm_loss(model, ids, ids)
    loss.backward()
    head_grad = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, ids, ids, chunk=None)[0].backward()
    ref = model.lm_head.weight.grad
    assert float((head_grad - ref).norm() / ref.norm()) < 1e-5
