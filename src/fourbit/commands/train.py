"""`fourbit train`: QLoRA instruction tuning (fourbit.train). With `--data builtin` (the default)
the demo preset fills in every flag the user did not set, on the command line or in --config; with
`--resume`, the run's own settings do (fourbit.rundir), so `fourbit train --output runs/x --resume`
continues runs/x as it was started. `--config NAME` runs a shipped recipe (fourbit.recipes: the
paper's Guanaco runs), `--config list` lists them."""

SUMMARY = "fine-tune a model with QLoRA (no arguments: the embedded demo)"


def run(argv: list[str]) -> int:
    from pathlib import Path

    from fourbit import recipes as R
    from fourbit import train as T
    from fourbit.commands.flags import config_arg, first_line, parse_cli
    from fourbit.config import validate
    from fourbit.rundir import resume_settings

    shipped = R.recipes()
    if config_arg(argv) == "list" and not Path("list").exists():
        width = max(map(len, shipped))
        print("\n".join(f"{name:<{width}}  {R.describe(path)}" for name, path in shipped.items()))
        return 0
    cfg, given = parse_cli(T.TrainConfig, argv, prog="fourbit train", description=first_line(T.__doc__),
                           recipes=shipped)
    cfg = T.apply_demo_preset(cfg, given)
    if cfg.resume:
        cfg = resume_settings(cfg, given)
    T.train(validate(cfg))
    return 0
