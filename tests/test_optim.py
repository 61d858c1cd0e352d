"""Optimizers against torch.optim.AdamW (32-bit) and a 32-bit run (8-bit), plus state handling.

Tolerances: 32-bit states follow torch.optim.AdamW's arithmetic exactly, so parameters must agree
to 1e-6 relative after 200 steps (they are in fact identical on CPU); 8-bit states approximate,
so a tiny model's fine-tuning loss curve must stay within 5% of the 32-bit curve.
"""

import pytest
import torch

from conftest import tiny_model
from fourbit.nn import add_lora
from fourbit.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer


def _run(opt_cls, steps=200, seed=0, **kw):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 33)), torch.nn.Parameter(torch.randn(7))]
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
        opt.step()
    return params, opt


@pytest.mark.parametrize("chunk", [1 << 25, 100])  # 100: every parameter its own multi-tensor chunk
@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)])
def test_paged_adamw_matches_torch_adamw(kw, chunk, monkeypatch):
    monkeypatch.setattr("fourbit.optim.adamw._FOREACH_ELEMENTS", chunk)
    ref, _ = _run(torch.optim.AdamW, **kw)
    ours, _ = _run(PagedAdamW, **kw)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_tiny_model_finetune_matches_torch():
    losses = {}
    for name, cls in (("torch", torch.optim.AdamW), ("ours", PagedAdamW)):
        torch.manual_seed(0)
        model = add_lora(tiny_model(), r=4, dropout=0.0, verbose=False)
        opt = cls([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
        losses[name] = []
        for _ in range(20):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"] == losses["torch"]


def test_8bit_tracks_32bit_on_a_tiny_finetune():
    curves = {}
    for cls in (PagedAdamW, AdamW8bit):
        torch.manual_seed(0)
        model = add_lora(tiny_model(), r=8, dropout=0.0, verbose=False)
        opt = cls([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0, min_8bit_size=256)
        x = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(2))
        curve = []
        for _ in range(40):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves[cls.__name__] = torch.tensor(curve)
    a, b = curves["PagedAdamW"], curves["AdamW8bit"]
    assert a[-1] < a[0] - 0.5  # it learns
    assert ((a - b).abs() / a).max() < 0.05


def test_8bit_state_is_about_two_bytes_per_parameter():
    _, o8 = _run(AdamW8bit, steps=1, lr=1e-3, min_8bit_size=100)
    _, o32 = _run(PagedAdamW, steps=1, lr=1e-3)
    n = 64 * 33 + 7
    assert o32.state_bytes() == 8 * n
    big = 64 * 33  # the 7-element tensor stays 32-bit (< min_8bit_size)
    assert o8.state_bytes() == 2 * big + 8 * -(-big // 256) + 8 * 7


@pytest.mark.parametrize("cls", [PagedAdamW, AdamW8bit, PagedAdamW8bit])
def test_state_dict_round_trip_continues_exactly(cls):
    full, _ = _run(cls, steps=30, lr=1e-2, min_8bit_size=16) if cls is not PagedAdamW else _run(cls, steps=30, lr=1e-2)
    kw = dict(lr=1e-2) if cls is PagedAdamW else dict(lr=1e-2, min_8bit_size=16)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 33)), torch.nn.Parameter(torch.randn(7))]
    opt = cls(params, **kw)
    g = torch.Generator().manual_seed(1)

    def steps(n, opt, params):
        for _ in range(n):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) + 0.1 * p.detach()
            opt.step()

    steps(12, opt, params)
    sd = opt.state_dict()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls(params2, **kw)
    opt2.load_state_dict(sd)
    steps(18, opt2, params2)
    for a, b in zip(full, params2):
        assert torch.equal(a, b)


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr must be a number >= 0, got -1"):
        PagedAdamW(p, lr=-1)
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"):
        AdamW8bit(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        PagedAdamW(p, eps=-1e-8)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", p, lr=1e-3)


def test_state_dict_from_another_optimizer_or_shape():
    _, o = _run(PagedAdamW, steps=2, lr=1e-3)
    with pytest.raises(ValueError, match="saved by PagedAdamW, not AdamW8bit"):
        _run(AdamW8bit, steps=0, lr=1e-3)[1].load_state_dict(o.state_dict())
    torch_sd = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    with pytest.raises(ValueError, match="not fourbit"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(torch_sd)
    other = PagedAdamW([torch.nn.Parameter(torch.zeros(10, 10)), torch.nn.Parameter(torch.zeros(7))], lr=1e-3)
    with pytest.raises(ValueError, match=r"has shape \[64, 33\], the parameter of shape \[10, 10\] needs \[10, 10\]"):
        other.load_state_dict(o.state_dict())


def test_paging_only_applies_to_large_cuda_parameters():
    opt = PagedAdamW([torch.nn.Parameter(torch.zeros(200_000))])
    p = opt.param_groups[0]["params"][0]
    assert not opt._is_paged(p)  # CPU tensors are never paged
    fake = torch.empty(200_000, device="meta")
    assert opt.paged and fake.numel() >= opt.page_threshold
    assert AdamW8bit([torch.nn.Parameter(torch.zeros(3))]).paged is False


def test_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = PagedAdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert p.abs().sum() < 3.0


# -- paged states: prefetch only after memory pressure (fourbit.optim.paged, Note: Prefetch only after pressure)
class _FakeDevice:
    """What EvictionWatch reads from a GPU: free bytes and the allocator's cumulative released bytes."""

    def __init__(self):
        self.free, self.released = 10 * 2**30, 0


def test_eviction_watch_sees_pressure_only_when_it_happened():
    from fourbit.optim.paged import FREE_MARGIN, EvictionWatch

    dev = _FakeDevice()
    watch = EvictionWatch(torch.device("cuda"), free_bytes=lambda: dev.free, released_bytes=lambda: dev.released)
    assert watch.may_have_evicted()  # never looked: prefetch once
    assert not watch.may_have_evicted()  # nothing happened since
    dev.released += 2**30  # the allocator gave memory back (empty_cache, or a retry after a failed cudaMalloc)
    assert watch.may_have_evicted() and not watch.may_have_evicted()
    dev.free = FREE_MARGIN - 1  # the GPU is full now: pages may be going out
    assert watch.may_have_evicted() and watch.may_have_evicted()
    dev.free = FREE_MARGIN
    assert not watch.may_have_evicted()


class _PagedOnCpu(PagedAdamW):
    """PagedAdamW whose states count as paged on a CPU (plain tensors), with a fake device to watch."""

    device = None

    def _is_paged(self, p):
        return True

    def _empty(self, p, numel, dtype):
        return torch.zeros(numel, dtype=dtype, device=p.device)

    def _eviction_watch(self, device):
        from fourbit.optim.paged import EvictionWatch

        return EvictionWatch(device, free_bytes=lambda: self.device.free, released_bytes=lambda: self.device.released)


@pytest.mark.parametrize("mode", ["auto", "always"])
def test_paged_states_are_prefetched_only_after_pressure(monkeypatch, mode):
    from fourbit.optim import paged

    calls = []
    monkeypatch.setattr(paged, "prefetch", lambda t, device=None: calls.append(t.numel()))
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 33)), torch.nn.Parameter(torch.randn(7))]
    opt = _PagedOnCpu(params, lr=1e-2, prefetch=mode)
    opt.device = _FakeDevice()
    per_step = []
    for step in range(4):
        if step == 2:
            opt.device.released += 2**20  # pressure between steps 1 and 2
        for p in params:
            p.grad = torch.ones_like(p)
        calls.clear()
        opt.step()
        per_step.append(len(calls))
    states = 2 * len(params)  # exp_avg, exp_avg_sq of each parameter
    assert per_step == ([states] * 4 if mode == "always" else [states, 0, states, 0])
    ref, _ = _run(torch.optim.AdamW, steps=0)  # the same trajectory as torch's AdamW whatever was prefetched
    ropt = torch.optim.AdamW(ref, lr=1e-2)
    for _ in range(4):
        for p in ref:
            p.grad = torch.ones_like(p)
        ropt.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_prefetch_mode_is_checked():
    with pytest.raises(ValueError, match="prefetch must be one of auto, always, got 'never'"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))], prefetch="never")
