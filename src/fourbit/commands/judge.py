"""`fourbit judge A.jsonl B.jsonl --judge model|endpoint|human`: pairwise judgments of two answer
files, appended to a JSONL file as they come (a rerun skips the pairs already judged)."""

from dataclasses import dataclass, field

SUMMARY = "pairwise judgments of two answer files"
JUDGES = ("model", "endpoint", "human")


@dataclass
class JudgeArgs:
    """fourbit judge A.jsonl B.jsonl --judge model|endpoint|human"""

    answers_a: str = field(default="", metadata={"help": "first answer file (JSONL)"})
    answers_b: str = field(default="", metadata={"help": "second answer file (JSONL)"})
    judge: str = field(default="model", metadata={"help": f"{', '.join(JUDGES)}: a local LM, an OpenAI-compatible "
                                                           f"endpoint, or a person at the terminal"})
    judge_model: str = field(default="smollm2-135m", metadata={"help": "judge model: a path/name for --judge model, "
                                                                      "the model id for --judge endpoint"})
    output: str = field(default="judgments.jsonl", metadata={"help": "judgment JSONL (appended; done pairs skipped)"})
    questions: str | None = field(default=None, metadata={"help": "question file (Vicuna question.jsonl) for the "
                                                                  "question text and category"})
    limit: int = field(default=0, metadata={"help": "judge only the first N questions (0: all)"})
    one_order: bool = field(default=False, metadata={"help": "judge each pair once instead of in both orders"})

    def validate(self) -> list[str]:
        p = [] if self.answers_a and self.answers_b else ["two answer files are required: "
                                                          "fourbit judge A.jsonl B.jsonl"]
        p += [] if self.judge in JUDGES else [f"--judge must be one of {', '.join(JUDGES)}, got {self.judge!r}"]
        p += [] if self.limit >= 0 else [f"--limit must be >= 0, got {self.limit}"]
        return p


def run(argv: list[str]) -> int:
    import sys

    from fourbit.commands.flags import parse_cli
    from fourbit.eval.judge import EndpointJudge, HumanJudge, ModelJudge, read_answers, run_judging

    a, _ = parse_cli(JudgeArgs, argv, prog="fourbit judge", positional=("answers_a", "answers_b"),
                     description="Pairwise judgments of two answer files.")
    read_answers(a.answers_a), read_answers(a.answers_b)  # a bad answer file fails before a judge model loads
    judge = {"model": lambda: ModelJudge(a.judge_model), "endpoint": lambda: EndpointJudge(a.judge_model),
             "human": HumanJudge}[a.judge]()
    try:
        s = run_judging(a.answers_a, a.answers_b, judge, a.output, a.questions, a.limit, not a.one_order)
    except KeyboardInterrupt:
        print(f"\nstopped; every judgment so far is in {a.output}; run the same command to continue", file=sys.stderr)
        return 130
    print(f"{s.judged} judgments written to {a.output} ({s.skipped_existing} already there, {s.unreadable} "
          f"unreadable); wins (ties count half): " + ", ".join(f"{k} {v:g}" for k, v in s.wins.items()))
    return 0
