"""The paper's data-type result on the embedded model: WikiText-2 perplexity of SmolLM2-135M
stored as 16/32-bit, NF4, FP4, with and without double quantization (QLoRA §3, Table 2's idea),
and NF4 + DQ with a LoftQ-initialized adapter right after initialization (Li et al., 2023).

    python bench/perplexity.py [--chars 200000] [--max-length 1024] [--stride 1024]
                               [--rows fp32,nf4-dq,nf4,fp4-dq,fp4,loftq,loftq5] [--r 64] [--alpha 16]

Prints one table row per data type; the text is the WikiText-2 raw test split from
../shared/data (the first --chars characters, to keep a CPU run to minutes). LoftQ rows:
`loftq` is what `add_lora(init="loftq")` / `fourbit train --init loftq` gives (the ordinary NF4 +
DQ base, A and B from the SVD of its residual: a portable adapter); `loftq5` is the paper's
alternating form with 5 iterations, which changes the quantized base (fourbit.nn.loftq.loftq).
"""

import argparse
import time
from pathlib import Path



def shared_data() -> Path:
    """../shared/data beside the checkout (the nearest one up the tree, so git worktrees find it too)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return Path(__file__).resolve().parents[2] / "shared" / "data"


TEXT = shared_data() / "wikitext2" / "wikitext2_raw_test_joined.txt"
# row name -> (label, quant, double quant, LoftQ iterations: 0 none, 1 add_lora's, T > 1 base changed)
ROWS = {"fp32": ("fp32 (unquantized)", None, True, 0), "nf4-dq": ("NF4 + DQ", "nf4", True, 0),
        "nf4": ("NF4", "nf4", False, 0), "fp4-dq": ("FP4 + DQ", "fp4", True, 0), "fp4": ("FP4", "fp4", False, 0),
        "loftq": ("NF4 + DQ + LoftQ init", "nf4", True, 1),
        "loftq5": ("NF4 + DQ + LoftQ, 5 iterations (base changed)", "nf4", True, 5)}


def wikitext(chars: int) -> str:
    """The first `chars` characters of the WikiText-2 raw test split (0: all of it)."""
    return TEXT.read_text(encoding="utf-8")[: chars or None]


def add_loftq(model, source: str, r: int, alpha: float, iterations: int = 1):
    """LoRA on every linear layer of a 4-bit model, LoftQ-initialized from `source`'s 16-bit weights.

    iterations=1 is add_lora(init="loftq"); more re-quantize each base as the paper's algorithm does."""
    import torch

    from fourbit.models import checkpoint_weight_reader
    from fourbit.nn import add_lora, lora_modules
    from fourbit.nn.loftq import loftq

    read = checkpoint_weight_reader(source, model)
    if iterations == 1:
        return add_lora(model, r=r, alpha=alpha, dropout=0.0, verbose=False, init="loftq", weights=read)
    add_lora(model, r=r, alpha=alpha, dropout=0.0, verbose=False)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            base = m.base_layer
            packed, state, a, b = loftq(read(name).to(base.weight_dtype), r, m.scaling, base.quant_type,
                                        base.blocksize, base.double_quant, iterations)
            base.set_quantized(packed, state)
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.copy_(b)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--r", type=int, default=64, help="LoRA rank of the LoftQ rows")
    ap.add_argument("--alpha", type=float, default=16, help="LoRA alpha of the LoftQ rows")
    args = ap.parse_args()
    from fourbit.eval import perplexity
    from fourbit.models import load_model

    text = wikitext(args.chars)
    rows = []
    for key in args.rows.split(","):
        name, quant, dq, iterations = ROWS[key]
        t = time.perf_counter()
        model, tok = load_model(args.model, quant=quant, double_quant=dq, device="cpu")
        if iterations:
            add_loftq(model, args.model, args.r, args.alpha, iterations)
            name += f" (r={args.r})"
        r = perplexity(model, tok, text, args.max_length, args.stride, progress=False)
        rows.append((name, r.perplexity, r.tokens, time.perf_counter() - t))
        print(f"  {name}: {r.perplexity:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    base = rows[0][1]
    print(f"# {args.model}, WikiText-2 test (first {args.chars} chars, {rows[0][2]} tokens scored), "
          f"window {args.max_length}, stride {args.stride}")
    print(f"| data type | perplexity | vs {rows[0][0]} |\n|---|---:|---:|")
    for name, ppl, _, _ in rows:
        print(f"| {name} | {ppl:.3f} | {ppl / base:.4f}x |")


if __name__ == "__main__":
    main()
