"""Gradient checkpointing without the third dequantization: the backward of a 4-bit weight reuses
the W its checkpoint recomputation dequantized (see Note: Weights kept across checkpoint
recomputation in fourbit/nn/linear4bit.py).

Oracles: the same step with the reuse switched off (bit-identical gradients: the kept W holds the
same float32 values the backward would dequantize) and the step without checkpointing (torch's
own checkpointing tolerance). Memory: at most one decoder layer's weights are kept at a time, and
nothing is left once backward ends.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fourbit.nn.linear4bit as l4
from conftest import tiny_model
from fourbit.nn import Linear4bit, add_lora, find_linear_names, lora_modules
from fourbit.nn.inject import set_module


class _Counting(dict):
    """_RECOMPUTED that remembers its largest size."""

    most = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.most = max(self.most, len(self))


@pytest.fixture
def counted(monkeypatch):
    """Counts dequantizations and tracks the kept weights."""
    calls = [0]
    orig = l4.dequantize_4bit

    def dequantize_4bit(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    kept = _Counting()
    monkeypatch.setattr(l4, "dequantize_4bit", dequantize_4bit)
    monkeypatch.setattr(l4, "_RECOMPUTED", kept)
    return calls, kept


def _lora_step(ckpt: bool, reentrant: bool = False, reuse: bool = True, monkeypatch=None):
    torch.manual_seed(0)
    model = tiny_model("llama")  # 2 layers, 7 linear layers each
    for name in find_linear_names(model):  # every linear but lm_head to 4-bit
        set_module(model, name, Linear4bit.from_linear(model.get_submodule(name)))
    add_lora(model, r=4, dropout=0.0, gradient_checkpointing=ckpt, verbose=False)
    if ckpt and reentrant:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.02)
    if not reuse:
        monkeypatch.setattr(l4.torch._C, "_current_graph_task_id", lambda: -1)  # never "recomputing"
    x = torch.randint(0, 256, (2, 12))
    model(input_ids=x, labels=x).loss.backward()
    if not reuse:
        monkeypatch.undo()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_checkpointed_step_dequantizes_each_weight_twice(counted):
    calls, kept = counted
    _lora_step(ckpt=False)
    assert calls[0] == 14 + 11  # forward, backward (q/k/v of layer 0 get no input gradient: nothing needs it)
    calls[0] = 0
    _lora_step(ckpt=True)  # the embeddings' output requires grad here (checkpointing needs it)
    assert calls[0] == 14 + 14  # forward + recomputed forward, not + 14 more in backward
    assert kept.most == 7  # one decoder layer's weights at a time
    assert len(kept) == 0  # all taken by their backward


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradients_equal_the_step_without_reuse(reentrant, monkeypatch):
    reused = _lora_step(ckpt=True, reentrant=reentrant)
    assert not l4._RECOMPUTED
    again = _lora_step(ckpt=True, reentrant=reentrant, reuse=False, monkeypatch=monkeypatch)
    assert torch.equal(reused, again)
    plain = _lora_step(ckpt=False)
    torch.testing.assert_close(reused, plain, rtol=1e-5, atol=1e-7)


def test_plain_linear4bit_and_leftovers_are_dropped_at_the_end_of_backward(counted):
    """A kept W whose backward never comes (its output unused) is freed when backward ends."""
    calls, kept = counted
    torch.manual_seed(0)
    used, unused = (Linear4bit.from_linear(nn.Linear(32, 16)) for _ in range(2))
    x = torch.randn(3, 32, requires_grad=True)

    def block(x):
        unused(x)  # recomputed, kept, never differentiated
        return used(x)

    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert len(kept) == 0 and kept.most == 2
    ref = torch.ones(3, 16) @ used.dequantize(torch.float32)
    assert torch.equal(x.grad, ref)


def test_no_reuse_without_input_gradient(counted):
    """A layer whose input needs no gradient keeps nothing (its backward computes no grad_x)."""
    calls, kept = counted
    q = Linear4bit.from_linear(nn.Linear(32, 16))
    w = nn.Parameter(torch.ones(16))
    x = torch.randn(20, 32)  # more rows than the skinny kernel takes: the autograd function
    checkpoint(lambda x: q(x) * w, x, use_reentrant=False).sum().backward()
    assert kept.most == 0 and calls[0] == 2
