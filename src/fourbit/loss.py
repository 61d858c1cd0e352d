"""Causal-LM loss that computes logits only where a label needs them, a chunk at a time.

A 49,152-token vocabulary makes the logits the largest activation of a small model: batch 4 x
256 tokens of fp32 logits is 200 MB, and the softmax doubles it. QLoRA trains on responses only,
so most positions carry label -100 and need no logits at all. `causal_lm_loss` runs the
backbone, gathers the hidden states of labelled positions, and applies lm_head + cross-entropy
in chunks under activation checkpointing, so at most one chunk of logits exists at a time, in
forward and in backward. With a frozen head (QLoRA) the chunk's gradient is formed in the
forward pass instead, which saves the recomputation (Note: Loss gradient in the forward pass).

The loss is a *sum* over labelled tokens divided by `num_tokens` (default: the count in this
batch); a trainer accumulating gradients passes the count of the whole accumulated (or
distributed) batch so that the gradient equals that of one big batch exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _head_ce_sum(h: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    return F.cross_entropy(logits, labels, reduction="sum")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(h_i W^T + b, y_i) for a frozen head, its gradient formed in forward.

    # Note: Loss gradient in the forward pass
    Autograd needs a chunk's logits twice: for the loss, and in backward for softmax - onehot.
    Keeping them costs chunk x V floats; checkpointing them costs a second lm_head matmul in
    backward (a tenth of a SmolLM2 step's matmuls). With the head frozen, as in QLoRA, all that
    backward needs is d loss / d h = (softmax - onehot) W (chunk x H), so forward computes it
    while the logits are at hand and keeps only that. The loss is linear in the incoming
    gradient, so backward just scales it.
    """

    @staticmethod
    def forward(ctx, h, labels, weight, bias):
        logp = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)  # (n, V)
        labels = labels.to(logp.device)
        nll = -logp.gather(1, labels[:, None]).sum()
        grad = logp.exp_()  # softmax, in place: (n, V)
        grad[torch.arange(len(labels), device=grad.device), labels] -= 1.0
        ctx.save_for_backward((grad.to(weight.dtype) @ weight).to(h.dtype))  # (n, H)
        return nll

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g, None, None, None


def _frozen_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def supports_split_head(model: nn.Module) -> bool:
    """Whether logits are exactly lm_head(hidden): no softcapping or output scaling in the model."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                   num_tokens: int | None = None, chunk: int | None = 512) -> tuple[torch.Tensor, int]:
    """(sum of token losses / num_tokens, number of labelled tokens in this batch).

    labels are aligned with input_ids (token t predicts labels[t + 1], as in transformers);
    chunk=None computes the full logits through model(...) instead (the reference path).
    """
    shift = labels[:, 1:]  # (B, T-1) targets for positions 0..T-2
    mask = shift != IGNORE_INDEX
    n = int(mask.sum())
    denom = num_tokens if num_tokens is not None else max(n, 1)
    if chunk is None or not supports_split_head(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), reduction="sum",
                                ignore_index=IGNORE_INDEX)
        return total / denom, n
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state  # (B, T, H); no KV cache in training
    h = hidden[:, :-1][mask]  # (n, H) only positions with a label
    y = shift[mask]  # (n,)
    head = model.get_output_embeddings()
    fused = torch.is_grad_enabled() and h.requires_grad and _frozen_linear(head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        hc, yc = h[i:i + chunk], y[i:i + chunk]
        if fused:  # see Note: Loss gradient in the forward pass
            total = total + _FrozenHeadCrossEntropy.apply(hc, yc, head.weight, head.bias)
        elif torch.is_grad_enabled():  # recompute this chunk's logits in backward instead of keeping them
            total = total + checkpoint(_head_ce_sum, hc, yc, head, use_reentrant=False)
        else:
            total = total + _head_ce_sum(hc, yc, head)
    return total / denom, n
