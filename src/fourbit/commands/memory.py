"""`fourbit memory`: the peak memory of a QLoRA run, predicted from the model's config.json alone
(fourbit.memory). With no flags it plans the run `fourbit train` does by default; `--gpu 48GB`
adds whether it fits and the longest sequence / largest batch that do."""

SUMMARY = "predict the peak memory of a QLoRA run"


def run(argv: list[str]) -> int:
    import json

    from fourbit.commands.flags import JsonOutput, first_line, parse_cli
    from fourbit.memory import Plan, predict

    (plan, out), _ = parse_cli((Plan, JsonOutput), argv, prog="fourbit memory", description=first_line(__doc__))
    res = predict(plan)
    print(json.dumps(res, indent=2) if out.json else table(res))
    return 0


def _label(part: str, res: dict) -> str:
    """A part's name with the settings that explain it (quant type, dtype, optimizer, chunking)."""
    from fourbit import memory as M

    s = res["settings"]
    detail = {M.WEIGHTS_4BIT: s["quant"] + (" + DQ" if s["double_quant"] else ""),
              M.WEIGHTS_16BIT: s["compute_dtype"], M.OTHER_WEIGHTS: s["compute_dtype"],
              M.DEQUANT_BUFFER: s["compute_dtype"],
              M.OPTIMIZER_STATES: s["optim"] + (", may page to CPU" if s["optim"].startswith("paged") else ""),
              M.ACTIVATIONS: "checkpointed layer inputs" if s["checkpointing"] else None,
              M.LOSS_TEMPS: f"chunks of {s['loss_chunk']} tokens" if s["loss_chunk"] else "full logits"}.get(part)
    return f"{part} ({detail})" if detail else part


def table(res: dict) -> str:
    """A prediction as a table of parts (held for the run, then the step at its peak) in GiB."""
    gib = 2**30
    s = res["settings"]
    held = [k for k in res["parts"] if k in res["held_parts"]]
    step = [k for k in res["parts"] if k not in res["held_parts"]]
    w = max(len(_label(k, res)) for k in res["parts"]) + 4
    bits = res["bits_per_parameter"]
    lines = [f"{res['model']}: {res['parameters'] / 1e9:.2f}B parameters, LoRA r={s['r']} on {res['lora_layers']} "
             f"layers = {res['lora_parameters'] / 1e6:.1f}M; seq {s['seq']} x batch {s['batch']}, "
             f"{'gradient checkpointing' if s['checkpointing'] else 'no gradient checkpointing'}, {s['optim']}, "
             f"{s['compute_dtype']}, loss chunk {s['loss_chunk'] or 'off (full logits)'}",
             f"{'part':<{w}} {'GiB':>8}", "held for the whole run"]
    lines += [f"  {_label(k, res):<{w - 2}} {res['parts'][k] / gib:8.3f}" for k in held]
    lines.append(f"step, at its peak ({res['peak_phase']})")
    lines += [f"  {_label(k, res):<{w - 2}} {res['parts'][k] / gib:8.3f}" for k in step]
    lines.append(f"{'total (predicted peak)':<{w}} {res['total_bytes'] / gib:8.3f}")
    lines.append("peak of each phase (GiB): " + ", ".join(f"{k} {v / gib:.3f}" for k, v in res["phases"].items()))
    act = res["activations_bytes"]
    lines.append(f"activations kept for backward: {act['with_checkpointing'] / gib:.3f} GiB with gradient "
                 f"checkpointing, {act['without_checkpointing'] / gib:.3f} GiB without")
    if bits["this_model"] is not None:
        q = res["quantized_weights_bytes"]
        lines.append(f"4-bit weights: {bits['with_double_quant']} bits/parameter with double quantization "
                     f"({q['with_double_quant'] / gib:.2f} GiB), {bits['without_double_quant']} without "
                     f"({q['without_double_quant'] / gib:.2f} GiB)")
    if str(s["optim"]).startswith("paged"):
        lines.append("paged optimizer: its states can spill to CPU RAM under pressure; counted on the GPU "
                     "here, as the QLoRA paper does")
    if res.get("gpu_bytes"):
        spare = res["gpu_bytes"] - res["total_bytes"]
        verdict = (f"fits in {res['gpu_bytes'] / gib:.1f} GiB ({spare / gib:.2f} GiB to spare)" if res["fits"]
                   else f"does NOT fit in {res['gpu_bytes'] / gib:.1f} GiB ({-spare / gib:.2f} GiB short)")
        lines.append(f"{verdict}; longest sequence at batch {s['batch']}: {res['max_seq_at_batch']}, "
                     f"largest batch at seq {s['seq']}: {res['max_batch_at_seq']}")
    return "\n".join(lines)
