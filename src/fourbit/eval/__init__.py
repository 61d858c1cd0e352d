"""Evaluation as in the QLoRA paper: perplexity, MMLU, pairwise judges, Elo / Bradley-Terry."""

from fourbit.eval.elo import EloResult, bradley_terry, elo_orderings, elo_ratings, read_judgments
from fourbit.eval.judge import EndpointJudge, HumanJudge, ModelJudge, parse_verdict, run_judging
from fourbit.eval.mmlu import MMLUResult, evaluate_mmlu
from fourbit.eval.perplexity import PerplexityResult, perplexity

__all__ = ["perplexity", "PerplexityResult", "evaluate_mmlu", "MMLUResult", "elo_ratings", "EloResult",
           "elo_orderings", "bradley_terry", "read_judgments", "run_judging", "parse_verdict", "ModelJudge",
           "EndpointJudge", "HumanJudge"]
