"""Tile-size sweep of fourbit's Triton kernels on the current GPU (the defaults come from this).

    python bench/kernel_sweep.py

Times dequantization (NF4+DQ -> bf16) and the batch-1 gemv for Llama-7B shapes over tile sizes
and warp counts, with bitsandbytes' kernels as the reference point, using CUDA graphs so that
the numbers are GPU time, not Python launch overhead.
"""

import itertools

import torch


def graph_time(fn, reps=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / 1e3


def main():
    from fourbit.quant import quantize_4bit
    from fourbit.quant.kernels import triton_4bit as T

    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
    x = torch.empty(2**28, device="cuda")
    y = torch.empty_like(x)
    copy = 8 * x.numel() / graph_time(lambda: y.copy_(x), 10) / 1e9
    print(f"copy bandwidth {copy:.0f} GB/s")
    del x, y
    for shape in [(4096, 4096), (11008, 4096)]:
        w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        q, s = quantize_4bit(w)
        out = torch.empty_like(w)
        nbytes = w.numel() // 2 + s.absmax.numel() + 2 * w.numel()
        best = None
        for bb, nw in itertools.product([2048, 4096, 8192], [4, 8]):
            t = graph_time(lambda: T.dequantize_4bit(q.view(-1), s, torch.bfloat16, out, bb, nw))
            gbs = nbytes / t / 1e9
            best = max(best or (0,), (gbs, bb, nw))
        line = f"dequant {shape}: best {best[0]:.0f} GB/s ({100 * best[0] / copy:.0f}% of copy) at block_bytes={best[1]}, warps={best[2]}"
        if F:
            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            tb = graph_time(lambda: F.dequantize_4bit(qb, sb))
            line += f"; bitsandbytes {nbytes / tb / 1e9:.0f} GB/s"
        print(line, flush=True)
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
        q, s = quantize_4bit(w)
        xv = torch.randn(1, shape[1], dtype=torch.bfloat16, device="cuda")
        res = []
        for bn, g, nw in itertools.product([4, 8, 16, 32], [2, 4, 8], [4]):
            try:
                t = graph_time(lambda: T.gemv_4bit(xv, q, s, bn, g, nw))
                res.append((t, bn, g, nw))
            except Exception as e:  # noqa: BLE001 (a tile that does not compile)
                print(f"gemv {shape} bn={bn} g={g} w={nw}: {type(e).__name__}")
        t, bn, g, nw = min(res)
        gbs = (w.numel() / 2 + s.absmax.numel()) / t / 1e9
        line = f"gemv {shape}: best {t * 1e6:.1f} us ({gbs:.0f} GB/s of weights) at block_n={bn}, groups={g}, warps={nw}"
        if F:
            import bitsandbytes as bnb

            qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            tb = graph_time(lambda: bnb.matmul_4bit(xv, qb.t(), quant_state=sb))
            line += f"; bitsandbytes {tb * 1e6:.1f} us"
        print(line, flush=True)
    # the eager cost of one token through one layer (what generation pays per linear, Python included)
    from torch import nn

    from fourbit.nn import Linear4bit

    lin = nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda")
    ours = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    xv = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        line = f"eager Linear4bit(4096, 4096), 1 token: fourbit {eager_time(lambda: ours(xv)) * 1e6:.0f} us"
        if F:
            import bitsandbytes as bnb

            theirs = bnb.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            theirs.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4").to("cuda")
            line += f", bitsandbytes {eager_time(lambda: theirs(xv)) * 1e6:.0f} us"
    print(line, flush=True)


def eager_time(fn, reps=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    import time

    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


if __name__ == "__main__":
    main()
