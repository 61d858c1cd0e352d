"""`fourbit quantize MODEL --output DIR`: a model's linear layers to 4-bit, streamed from disk to disk."""

SUMMARY = "quantize a model to 4-bit (bitsandbytes format) as it streams"


def run(argv: list[str]) -> int:
    from dataclasses import asdict

    from fourbit.commands.flags import parse_cli
    from fourbit.errors import UserError
    from fourbit.models import QuantizeArgs, quantize_checkpoint

    args, _ = parse_cli(QuantizeArgs, argv, prog="fourbit quantize", positional=("model",),
                        description="Quantize a model's linear layers to 4-bit, streaming one tensor at a time.")
    try:
        r = quantize_checkpoint(**asdict(args))
    except ValueError as e:  # the codec's refusals (a NaN weight, ...) are about the user's checkpoint
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    mb = 1 / 2**20
    print(f"quantized {r.quantized} linear weights ({r.params_quantized / 1e6:.1f}M parameters) of {r.tensors} "
          f"tensors in {r.seconds:.1f} s -> {args.output}")
    print(f"size: {r.bytes_in * mb:.0f} MiB in, {r.bytes_out * mb:.0f} MiB out; "
          f"peak RSS {r.peak_rss_bytes * mb:.0f} MiB (process baseline {r.baseline_rss_bytes * mb:.0f} MiB, "
          f"largest input tensor {r.largest_tensor_bytes * mb:.0f} MiB)")
    return 0
