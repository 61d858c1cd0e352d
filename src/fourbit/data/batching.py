"""Held-out splits, batch order, padding and packing: pure functions of (data, seed, epoch).

`batch_order` is what makes resuming exact: the micro-batches of an epoch depend only on the
example lengths, the batch size, the seed and the epoch number (Python's `random.Random`, whose
sequence for an int seed is stable across versions and platforms), so a resumed run recomputes the
same order and skips to its (epoch, cursor). Group-by-length (QLoRA §5) shuffles, sorts within
mega-batches of 50 micro-batches so padding is small, then shuffles the micro-batches.

Packing (`pack_examples`) concatenates whole examples into sequences of up to `max_len` tokens and
gives them position_ids that restart at 0 for each example, and `collate` then returns no
attention_mask. transformers (>= 4.54, `masking_utils.find_packed_sequence_indices`) turns
position_ids that restart into a block-diagonal causal mask for eager, sdpa and flex attention,
and flash-attention uses them as varlen boundaries, so a token never attends across examples and
RoPE positions are per example. This holds only when the model is called with
attention_mask=None and without a KV cache (use_cache=False, as fourbit.loss does): with a mask
or a cache transformers ignores the boundaries. The first label of each packed example is masked
(it would be predicted from the previous example's last token), so a packed batch has exactly the
losses of its examples run alone (tests/test_data_batching.py checks this on tiny models, fp32).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from fourbit.data.example import Example
from fourbit.data.tokenize import IGNORE

MEGA_BATCH = 50

if TYPE_CHECKING:
    import torch


def split_eval(examples: list[Example], eval_size: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out), each in the original order. eval_size < 1 is a fraction, >= 1 a count, 0 none.
    Examples with a split of their own (the builtin task) keep it: the held-out set is the first
    eval_size of the "eval" ones. Otherwise a seeded random subset is held out, always leaving at
    least one training example."""
    fixed_eval = [e for e in examples if e.split == "eval"]
    fixed_train = [e for e in examples if e.split == "train"]
    rest = [e for e in examples if e.split is None]
    if fixed_eval or fixed_train:
        n_eval = int(eval_size) if eval_size >= 1 else round(eval_size * len(examples))
        return fixed_train + rest, fixed_eval[: max(n_eval, 1)] if eval_size else []
    order = list(range(len(rest)))
    random.Random(seed).shuffle(order)
    n = int(eval_size) if eval_size >= 1 else round(eval_size * len(rest))
    n = min(n, len(rest) - 1) if len(rest) > 1 else 0
    held = sorted(order[:n])
    keep = sorted(order[n:])
    return [rest[i] for i in keep], [rest[i] for i in held]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True) -> list[list[int]]:
    """The micro-batches of one epoch, as lists of example indices: every index exactly once, the
    last batch possibly short. A pure function of its arguments, so a run resumed at (epoch,
    cursor) recomputes this list and continues with batches[cursor:]."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        mega = batch_size * MEGA_BATCH
        idx = [i for s in range(0, len(idx), mega)
               for i in sorted(idx[s:s + mega], key=lambda i: -lengths[i])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) int64 tensors, T the longest example: input_ids (pad_id on padding),
    labels (-100 on padding) and attention_mask (1 on tokens); for packed examples position_ids
    instead of attention_mask (call the model with attention_mask=None and use_cache=False)."""
    import torch  # here, so that reading and tokenizing data does not import torch

    t = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    packed = "position_ids" in examples[0]
    extra = torch.zeros((b, t), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        if packed:
            extra[i, :n] = torch.tensor(e["position_ids"])
            extra[i, n:] = torch.arange(t - n)  # padding forms its own block
        else:
            extra[i, :n] = 1
    return {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


def pack_examples(examples: list[dict], max_len: int) -> list[dict]:
    """Pack examples in the given order into sequences of at most max_len tokens (next-fit: a new
    sequence starts when the next example does not fit); examples are never split, and one longer
    than max_len gets a sequence of its own. Each pack holds input_ids, labels, position_ids."""
    packs, cur = [], None
    for e in examples:
        n = len(e["input_ids"])
        if cur is None or len(cur["input_ids"]) + n > max_len:
            cur = {"input_ids": [], "labels": [], "position_ids": []}
            packs.append(cur)
        labels = list(e["labels"])
        if cur["input_ids"]:
            labels[0] = IGNORE  # not predictable from the previous example
        cur["input_ids"] += e["input_ids"]
        cur["labels"] += labels
        cur["position_ids"] += list(range(n))
    return packs
