"""`fourbit elo FILES...`: Elo (mean over random match orderings, as the QLoRA paper) and
Bradley-Terry ratings from judgment files; `--json` prints them as JSON on stdout."""

from dataclasses import dataclass, field

SUMMARY = "Elo and Bradley-Terry ratings from judgments"


@dataclass
class EloArgs:
    judgments: list[str] = field(default_factory=list, metadata={"help": "judgment JSONL files (fourbit's or the "
                                                                         "QLoRA paper's)"})
    orderings: int = field(default=10_000, metadata={"help": "random match orderings to average"})
    seed: int = field(default=0, metadata={"help": "seed of the orderings"})
    plot: str | None = field(default=None, metadata={"help": "draw the ratings with their intervals to this PNG"})

    def validate(self) -> list[str]:
        p = [] if self.judgments else ["at least one judgment file is required: fourbit elo FILE.jsonl ..."]
        p += [] if self.orderings >= 1 else [f"--orderings must be >= 1, got {self.orderings}"]
        return p


def run(argv: list[str]) -> int:
    import json

    from fourbit.commands.flags import JsonOutput, parse_cli
    from fourbit.eval.elo import elo_ratings, plot_elo

    (a, out), _ = parse_cli((EloArgs, JsonOutput), argv, prog="fourbit elo", positional=("judgments",),
                            description="Elo (mean over random orderings) and Bradley-Terry ratings from pairwise "
                                        "judgment files.")
    res = elo_ratings(a.judgments, a.orderings, a.seed)
    print(json.dumps(res.as_dict(), indent=2) if out.json else table(res))
    if a.plot:
        plot_elo(res, a.plot)
    return 0


def table(result) -> str:
    """An EloResult as a table: system, Elo, its 95% interval, Bradley-Terry (when it exists)."""
    w = max(len(n) for n in result.ratings)
    lines = [f"{'system':<{w}}  {'Elo':>7}  {'95% interval':>17}  {'Bradley-Terry':>13}"]
    bt = result.bradley_terry
    for n, r in result.ratings.items():
        lo, hi = result.ci95[n]
        lines.append(f"{n:<{w}}  {r:7.1f}  [{lo:7.1f}, {hi:7.1f}]  " + (f"{bt[n]:13.1f}" if bt else f"{'-':>13}"))
    skipped = [f"{result.unreadable} unreadable judgments skipped"]
    skipped += [f"{result.self_play} self-play rows skipped"] if result.self_play else []
    skipped += [f"{result.bad_lines} malformed lines skipped (first: {result.bad_examples[0]})"] \
        if result.bad_lines else []
    lines.append(f"{result.matches} matches, {', '.join(skipped)}, {result.orderings} orderings")
    if result.bradley_terry_note:
        lines.append(result.bradley_terry_note)
    return "\n".join(lines)
