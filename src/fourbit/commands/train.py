"""`fourbit train`: QLoRA instruction tuning (fourbit.train). With `--data builtin` (the default)
the demo preset fills in every flag the user did not set, on the command line or in --config."""

SUMMARY = "fine-tune a model with QLoRA (no arguments: the embedded demo)"


def run(argv: list[str]) -> int:
    from fourbit import train as T
    from fourbit.commands.flags import first_line, parse_cli
    from fourbit.config import validate

    cfg, given = parse_cli(T.TrainConfig, argv, prog="fourbit train", description=first_line(T.__doc__))
    T.train(validate(T.apply_demo_preset(cfg, given)))
    return 0
