"""The paper's data-type result on the embedded model: WikiText-2 perplexity of SmolLM2-135M
stored as 16/32-bit, NF4, FP4, with and without double quantization (QLoRA §3, Table 2's idea).

    python bench/perplexity.py [--chars 200000] [--max-length 1024] [--stride 1024]

Prints one table row per data type; the text is the WikiText-2 raw test split from
../shared/data (the first --chars characters, to keep a CPU run to minutes).
"""

import argparse
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wikitext2_raw_test_joined.txt"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=1024)
    args = ap.parse_args()
    from fourbit.eval import perplexity
    from fourbit.models import load_model

    text = TEXT.read_text(encoding="utf-8")[: args.chars or None]
    rows = []
    for name, quant, dq in [("fp32 (unquantized)", None, True), ("NF4 + DQ", "nf4", True), ("NF4", "nf4", False),
                            ("FP4 + DQ", "fp4", True), ("FP4", "fp4", False)]:
        t = time.perf_counter()
        model, tok = load_model(args.model, quant=quant, double_quant=dq, device="cpu")
        r = perplexity(model, tok, text, args.max_length, args.stride, progress=False)
        rows.append((name, r.perplexity, r.tokens, time.perf_counter() - t))
        print(f"  {name}: {r.perplexity:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    base = rows[0][1]
    print(f"# {args.model}, WikiText-2 test (first {args.chars} chars, {rows[0][2]} tokens scored), "
          f"window {args.max_length}, stride {args.stride}")
    print("| data type | perplexity | vs unquantized |\n|---|---:|---:|")
    for name, ppl, _, _ in rows:
        print(f"| {name} | {ppl:.3f} | {ppl / base:.4f}x |")


if __name__ == "__main__":
    main()
