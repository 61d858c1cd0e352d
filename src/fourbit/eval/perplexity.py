"""Perplexity with a sliding window (the standard transformers recipe).

The text is tokenized once; windows of `max_length` tokens start every `stride` tokens, and each
window scores only the tokens not scored by an earlier one, with up to max_length - stride tokens
of context before them. stride == max_length gives disjoint chunks (fast, pessimistic); a smaller
stride gives every token more context. No token is scored twice; with disjoint windows the first
token of each window has no context and is not scored (as in the transformers recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fourbit.errors import UserError
from fourbit.loss import causal_lm_loss


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats per token
    tokens: int  # tokens scored
    windows: int


def window_sizes(max_length: int | None, stride: int | None, context: int) -> tuple[int, int]:
    """(window length, stride) for a model with `context` positions: the window defaults to (and is
    capped at) the context, the stride to the window. UserError for a stride outside [1, window]."""
    max_length = min(max_length or context, context)
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise UserError(f"stride must be in [1, max_length={max_length}] (the window; the model's context is "
                        f"{context} tokens), got {stride}")
    return max_length, stride


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None,
               device: torch.device | str | None = None, progress: bool = True) -> PerplexityResult:
    device = torch.device(device or next(model.parameters()).device)
    max_length, stride = window_sizes(max_length, stride, getattr(model.config, "max_position_embeddings", 2048))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    model.eval()
    total, count, prev_end, windows = 0.0, 0, 0, 0
    from tqdm.auto import tqdm

    starts = list(range(0, max(len(ids) - 1, 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress or len(starts) < 4):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end].unsqueeze(0).to(device)
        labels = window.clone()
        new = end - max(prev_end, begin)  # tokens not scored yet
        labels[:, : window.shape[1] - new] = -100
        loss_sum, n = causal_lm_loss(model, window, labels, num_tokens=1)
        total, count, prev_end, windows = total + float(loss_sum), count + n, end, windows + 1
        if end == len(ids):
            break
    nll = total / max(count, 1)
    return PerplexityResult(math.exp(nll), nll, count, windows)
