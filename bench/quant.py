"""Quantize / dequantize throughput: fourbit vs bitsandbytes on an 11008 x 4096 bf16 matrix (CPU).

    python bench/quant.py [--rows 11008] [--cols 4096] [--repeat 5]

Prints a table with the best-of-N time of each, and fourbit's speed as a ratio of bitsandbytes'.
NF4 with double quantization, blocksize 64, dequantizing to bf16 (the QLoRA setting). Both write
into freshly allocated outputs, as a caller would see it.
"""

import argparse
import platform
import time

import torch


def best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from fourbit.quant import dequantize_4bit, quantize_4bit
    from fourbit.quant.kernels import cpu

    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols, dtype=torch.bfloat16)
    n = w.numel()
    rows = []
    q, s = quantize_4bit(w)
    out = torch.empty_like(w)
    fb_q = best(lambda: quantize_4bit(w), args.repeat)
    fb_d = best(lambda: dequantize_4bit(q, s), args.repeat)
    fb_d_out = best(lambda: dequantize_4bit(q, s, out=out), args.repeat)
    try:
        import bitsandbytes.functional as F

        qb, sb = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        bnb_q = best(lambda: F.quantize_4bit(w, quant_type="nf4", compress_statistics=True), max(2, args.repeat // 2))
        bnb_d = best(lambda: F.dequantize_4bit(qb, sb), args.repeat)
    except ImportError:
        bnb_q = bnb_d = float("nan")
    rows = [("quantize (NF4+DQ)", fb_q, bnb_q), ("dequantize -> bf16", fb_d, bnb_d),
            ("dequantize -> bf16, into a reused buffer", fb_d_out, bnb_d)]
    print(f"# {args.rows}x{args.cols} bf16 ({n / 1e6:.1f}M elements), {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, C kernel: {cpu.available()}")
    print(f"| operation | fourbit ms | bitsandbytes ms | speedup (bnb / fourbit) | fourbit GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, a, b in rows:
        gbs = (n * 2 + n / 2) / a / 1e9  # bytes of bf16 + packed 4-bit touched
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x | {gbs:.1f} |")


if __name__ == "__main__":
    main()
