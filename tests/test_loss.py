"""fourbit.loss: the chunked causal-LM loss equals its plain reference, in value and in gradient.

Reference: the full logits of `model(input_ids)`, log-softmax in float64, the NLL of every
labelled next token summed and divided by `num_tokens`, written out here independently of
fourbit.loss. The chunked path runs lm_head + cross-entropy on a few labelled positions at a time
under activation checkpointing; in float32 it differs from the reference only by summation order:
rtol 1e-5 on the loss, rtol 1e-4 / atol 1e-7 on every gradient (measured ~1e-7 and ~1e-6).
"""

import pytest
import torch

from conftest import tiny_model
from fourbit.loss import IGNORE_INDEX, causal_lm_loss


def reference_loss(model, ids, labels, num_tokens):
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    nll = -logp[keep].gather(1, target[keep][:, None])  # (n, 1)
    return nll.sum() / num_tokens, int(keep.sum())


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 5, 512])
@pytest.mark.parametrize("num_tokens", [None, 40])
def test_chunked_loss_equals_the_plain_reference(chunk, num_tokens):
    model = tiny_model("llama").train()  # dropout-free: a deterministic forward
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (3, 17), generator=g)
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt, as with responses-only training
    labels[1, 4:11] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing to learn

    ref, n_ref = reference_loss(model, ids, labels, num_tokens or int((labels[:, 1:] != IGNORE_INDEX).sum()))
    ref_grads = grads(model, ref)
    loss, n = causal_lm_loss(model, ids, labels, num_tokens=num_tokens, chunk=chunk)
    got_grads = grads(model, loss)

    assert n == n_ref == 8 + 9
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert got_grads.keys() == ref_grads.keys() and len(got_grads) == len(list(model.parameters()))
    for name, g_ref in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g_ref.float(), rtol=1e-4, atol=1e-7, msg=name)


def test_unchunked_path_is_the_same_loss():
    """chunk=None goes through model(...).logits: the path the chunked one replaces."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 9))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    a, _ = causal_lm_loss(model, ids, labels, chunk=None)
    b, _ = causal_lm_loss(model, ids, labels, chunk=3)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
