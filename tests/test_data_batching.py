"""fourbit.data.batching: held-out splits, deterministic (resumable) batch order, collation, and
packing that gives each example exactly the loss it has alone (tiny transformers models, fp32)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from fourbit.data import IGNORE, Example, batch_order, collate, load_examples, pack_examples, split_eval


# -- split_eval ----------------------------------------------------------------------------------------------
def _examples(n):
    return [Example([("user", f"q{i}"), ("assistant", f"a{i}")], where=f"f:{i + 1}") for i in range(n)]


@pytest.mark.parametrize("size,n_eval", [(0.1, 10), (25, 25), (0, 0), (0.001, 0)])
def test_split_eval_fraction_or_count(size, n_eval):
    ex = _examples(100)
    train, held = split_eval(ex, size, seed=3)
    assert len(held) == n_eval and len(train) == 100 - n_eval
    assert sorted(e.where for e in train + held) == sorted(e.where for e in ex)  # disjoint and complete
    assert [e.where for e in held] == [e.where for e in split_eval(ex, size, seed=3)[1]]  # deterministic
    assert [e.where for e in train] == [e.where for e in ex if e not in held]  # original order kept
    if n_eval:
        assert [e.where for e in held] != [e.where for e in split_eval(ex, size, seed=4)[1]]


def test_split_eval_always_leaves_a_training_example():
    train, held = split_eval(_examples(3), 10, seed=0)
    assert len(train) == 1 and len(held) == 2
    assert split_eval(_examples(1), 0.5, seed=0) == (_examples(1), [])


def test_split_eval_keeps_the_builtin_tasks_own_split():
    ex, _ = load_examples("builtin")
    train, held = split_eval(ex, 50)
    assert len(held) == 50 and all(e.split == "eval" for e in held) and all(e.split == "train" for e in train)
    assert len(train) == sum(e.split == "train" for e in ex)


# -- batch_order ---------------------------------------------------------------------------------------------
LENGTHS = [(i * 37) % 101 + 1 for i in range(400)]


@pytest.mark.parametrize("group", [True, False])
def test_batch_order_is_a_deterministic_permutation(group):
    a = batch_order(LENGTHS, 4, seed=1, epoch=0, group_by_length=group)
    assert a == batch_order(LENGTHS, 4, seed=1, epoch=0, group_by_length=group)
    assert a != batch_order(LENGTHS, 4, seed=1, epoch=1, group_by_length=group)
    assert a != batch_order(LENGTHS, 4, seed=2, epoch=0, group_by_length=group)
    assert sorted(i for b in a for i in b) == list(range(400)) and all(len(b) == 4 for b in a)
    odd = batch_order(LENGTHS[:10], 4, seed=1, epoch=0, group_by_length=group)
    assert sorted(len(b) for b in odd) == [2, 4, 4]


def test_group_by_length_cuts_padding():
    def padding(batches):
        return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in batches)

    grouped = padding(batch_order(LENGTHS, 4, seed=1, epoch=0))
    random = padding(batch_order(LENGTHS, 4, seed=1, epoch=0, group_by_length=False))
    assert grouped < random / 5


def test_batch_order_is_the_same_in_a_fresh_process():
    """What resuming relies on: another interpreter (other hash seed) computes the same order."""
    code = ("import json; from fourbit.data import batch_order; "
            f"print(json.dumps([batch_order({LENGTHS[:60]}, 3, seed=7, epoch=e) for e in range(2)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert json.loads(out.stdout) == [batch_order(LENGTHS[:60], 3, seed=7, epoch=e) for e in range(2)]


# -- collate ---------------------------------------------------------------------------------------------------
def test_collate_pads_right_and_masks_labels():
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert set(b) == {"input_ids", "labels", "attention_mask"} and all(v.dtype == torch.long for v in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# -- packing ---------------------------------------------------------------------------------------------------
def _random_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})  # a 2-token prompt, then the response
    return out


def _example_losses(logits, labels):
    """Mean next-token loss of one example: (T, V) logits, (T,) labels."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE).item()


def test_pack_examples_layout():
    exs = _random_examples([7, 12, 5, 9, 3])
    packs = pack_examples(exs, max_len=24)
    assert [len(p["input_ids"]) for p in packs] == [24, 12]  # greedy in order: 7+12+5 | 9+3
    assert packs[0]["position_ids"] == list(range(7)) + list(range(12)) + list(range(5))
    assert packs[0]["input_ids"] == exs[0]["input_ids"] + exs[1]["input_ids"] + exs[2]["input_ids"]
    assert packs[0]["labels"][:7] == exs[0]["labels"] and packs[0]["labels"][8:19] == exs[1]["labels"][1:]
    assert packs[0]["labels"][7] == IGNORE and packs[0]["labels"][19] == IGNORE  # boundaries never labelled
    b = collate(packs, pad_id=0)
    assert "attention_mask" not in b
    assert b["position_ids"][1].tolist()[9:] == [0, 1, 2] + list(range(12))  # padding forms its own block


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_gives_each_example_its_own_loss(arch, attn):
    """Each example's mean loss inside a packed batch == the example run alone; fp32, abs 1e-5.
    Negative control: the same batch with a KV cache (transformers then ignores the boundaries)
    gives losses that differ by far more."""
    model = tiny_model(arch, attn_implementation=attn)
    exs = _random_examples([7, 12, 5, 9, 3])
    packs = pack_examples(exs, max_len=24)
    b = collate(packs, pad_id=0)
    with torch.no_grad():
        alone = [_example_losses(model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0],
                                 torch.tensor(e["labels"])) for e in exs]
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        leaky = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=True).logits
    got, bad, k = [], [], 0
    for row, p in enumerate(packs):
        start = 0
        for e in exs[k:]:
            n = len(e["input_ids"])
            if start + n > len(p["input_ids"]):
                break
            labels = torch.tensor(e["labels"])
            got.append(_example_losses(packed[row, start:start + n], labels))
            bad.append(_example_losses(leaky[row, start:start + n], labels))
            start, k = start + n, k + 1
    assert k == len(exs)
    assert got == pytest.approx(alone, abs=1e-5)
    assert max(abs(x - y) for x, y in zip(bad, alone)) > 1e-2


def test_packed_loss_through_the_trainers_loss_function():
    """fourbit.loss.causal_lm_loss (split lm_head, chunked) on a packed batch == the sum alone; abs 1e-4."""
    from fourbit.loss import causal_lm_loss

    model = tiny_model("llama")
    exs = _random_examples([7, 12, 5, 9])
    with torch.no_grad():
        alone = sum(float(causal_lm_loss(model, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]]),
                                         num_tokens=1, chunk=4)[0]) for e in exs)
        b = collate(pack_examples(exs, max_len=24), pad_id=0)
        packed, n = causal_lm_loss(model, b["input_ids"], b["labels"], position_ids=b["position_ids"],
                                   num_tokens=1, chunk=4)
    assert n == sum(len(e["input_ids"]) - 2 for e in exs)
    assert float(packed) == pytest.approx(alone, abs=1e-4)
