"""Batch-1 greedy decode on one GPU, fourbit vs bitsandbytes, timed the plain way (and optionally
profiled with cProfile, to see where host time goes).

    python bench/decode_profile.py [--layers 32] [--tokens 64] [--profile]

A Llama-2-7B-shaped model with random weights (bf16), every linear layer NF4 + DQ: fourbit's
Linear4bit (fused Triton gemv per token) or bitsandbytes' Linear4bit; transformers' generate,
eager, KV cache. Each side: one warm-up generate, then one timed generate of --tokens tokens.
"""
import argparse
import cProfile
import pstats
import time

import torch


def build(kind: str, layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, use_cache=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.eval().requires_grad_(False)
    if kind == "fourbit":
        from fourbit.models import quantize_model

        quantize_model(m, "nf4", True, torch.bfloat16)
    else:
        import bitsandbytes as bb

        from fourbit.nn import find_linear_names
        from fourbit.nn import set_module

        for name in find_linear_names(m):
            lin = m.get_submodule(name)
            q = bb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                 quant_type="nf4", compress_statistics=True, device="meta")
            q.weight = bb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                        compress_statistics=True).to("cuda")
            set_module(m, name, q)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    res = {}
    for kind in ("fourbit", "bitsandbytes"):
        m = build(kind, args.layers)
        ids = torch.randint(3, 32000, (1, 16), device="cuda")
        kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            m.generate(ids, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            m.generate(ids, **kw)
            torch.cuda.synchronize()
            res[kind] = args.tokens / (time.perf_counter() - t)
            if args.profile:
                pr = cProfile.Profile()
                pr.enable()
                m.generate(ids, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
                torch.cuda.synchronize()
                pr.disable()
                print(f"## {kind}")
                pstats.Stats(pr).sort_stats("tottime").print_stats(12)
        del m
        torch.cuda.empty_cache()
    print(f"# {torch.cuda.get_device_name()} | {time.strftime('%Y-%m-%d')} | {args.layers} layers, {args.tokens} tokens")
    print("| decode (batch 1, greedy) | fourbit | bitsandbytes | ratio |\n|---|---:|---:|---:|")
    print(f"| tokens/s | {res['fourbit']:.1f} | {res['bitsandbytes']:.1f} | {res['fourbit'] / res['bitsandbytes']:.2f}x |")


if __name__ == "__main__":
    main()
