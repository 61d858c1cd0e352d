"""`fourbit merge --model M --adapter A --output DIR`: fold an adapter into its base, report what
merging cost, optionally quantize the result to 4-bit and/or write a GGUF file."""

SUMMARY = "merge an adapter into its base model; optional GGUF export"


def run(argv: list[str]) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from fourbit.commands.flags import parse_cli
    from fourbit.export.merge import REPORT_NAME, MergeArgs, merge_adapter

    a, _ = parse_cli(MergeArgs, argv, prog="fourbit merge",
                     description="Merge a LoRA adapter into its base model, report what merging cost, optionally "
                                 "quantize to 4-bit and/or export GGUF.")
    r = merge_adapter(**asdict(a))
    print(summary(r))
    print(f"report: {Path(a.output) / REPORT_NAME}")
    return 0


def summary(r) -> str:
    """A MergeReport in a few lines."""
    kind = f"4-bit {r.quantize} ({r.dtype} compute)" if r.quantize else r.dtype
    lines = [f"merged {r.adapter} into {r.model} -> {r.output} ({kind})",
             f"cost on {r.texts} texts / {r.tokens} tokens: max |logit diff| {r.max_abs_logit_diff:.3g}, "
             f"mean {r.mean_abs_logit_diff:.3g}, top-1 agreement {r.top1_agreement:.1%}; perplexity "
             f"{r.ppl_unmerged:.4f} unmerged -> {r.ppl_merged:.4f} merged ({r.ppl_change_pct:+.3f}%)"]
    if r.gguf:
        g = r.gguf
        line = f"gguf {g['type']}: {g['path']} ({g['bytes'] / 2**20:.1f} MiB)"
        if "max_abs_logit_diff" in g:
            line += (f"; vs unmerged: max |logit diff| {g['max_abs_logit_diff']:.3g}, perplexity "
                     f"{g['ppl']:.4f} ({g['ppl_change_pct']:+.3f}%)")
        lines.append(line)
        lines += [f"warning: {w}" for w in g.get("warnings", [])]
    return "\n".join(lines)
