"""`fourbit train`: QLoRA instruction tuning (fourbit.train). With `--data builtin` (the default)
the demo preset fills in every flag the user did not set, on the command line or in --config; with
`--resume`, the run's own settings do (fourbit.rundir), so `fourbit train --output runs/x --resume`
continues runs/x as it was started."""

SUMMARY = "fine-tune a model with QLoRA (no arguments: the embedded demo)"


def run(argv: list[str]) -> int:
    from fourbit import train as T
    from fourbit.commands.flags import first_line, parse_cli
    from fourbit.config import validate
    from fourbit.rundir import resume_settings

    cfg, given = parse_cli(T.TrainConfig, argv, prog="fourbit train", description=first_line(T.__doc__))
    cfg = T.apply_demo_preset(cfg, given)
    if cfg.resume:
        cfg = resume_settings(cfg, given)
    T.train(validate(cfg))
    return 0
