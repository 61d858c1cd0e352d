"""Pairwise judging of two answer files: a local model, an OpenAI-compatible endpoint, or a person.

For every question both files answer, the judge sees the question and the two answers and says
1 (first better), 2 (second better) or 3 (tie), with the QLoRA paper's three-class prompt
(judge_prompts.jsonl, from the paper's released evaluation code, MIT). Each pair is judged in
both orders to cancel position bias (QLoRA §6.1: the judge favours the answer shown first). Judgments are appended to a JSONL file as they
come, one line each (`question_id`, `first`, `second`, `score`, `judge`, `raw`), and pairs already
in that file are skipped, so a long or interrupted run loses nothing and resumes. Judge output
whose last line is not 1, 2 or 3 is recorded with score -1 and counted; `fourbit elo` skips it.

Answer files: fourbit generate's output, the Vicuna reference answers, or the QLoRA paper's
generation files (`generation` holds the answer there). Files whose question ids differ are
refused, naming the ids that differ.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fourbit.data import iter_jsonl, truncate_partial_line
from fourbit.errors import UserError, redact

PROMPTS = Path(__file__).with_name("judge_prompts.jsonl")
_LAST_NUMBER = re.compile(r"([123])\s*\W*\s*$")


def load_prompts() -> dict[str, dict]:
    return {r["category"]: r for _, r in iter_jsonl(PROMPTS) if "category" in r}


def read_answers(path: str) -> tuple[str, dict[str, dict]]:
    """(system name, {question_id: {"question", "answer"}})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"answer file {path} does not exist")
    out, name = {}, None
    for i, row in iter_jsonl(p, objects=True):
        if "question_id" not in row:
            raise UserError(f"{path}:{i}: no question_id")
        answer = row.get("generation", row.get("text"))
        if not isinstance(answer, str):
            raise UserError(f"{path}:{i}: no answer text ('text' or 'generation')")
        question = row.get("prompt") if "generation" not in row else row.get("text")
        out[str(row["question_id"])] = {"question": question, "answer": answer, "category": row.get("category")}
        name = name or row.get("model_id")
    if not out:
        raise UserError(f"answer file {path} holds no answers")
    return name or p.stem, out


def attach_questions(answers: dict[str, dict], questions_file: str | None) -> None:
    if not questions_file:
        return
    if not Path(questions_file).is_file():
        raise UserError(f"question file {questions_file} does not exist")
    for _, q in iter_jsonl(questions_file, objects=True):
        qid = str(q.get("question_id"))
        if qid in answers:
            answers[qid]["question"] = (q.get("turns") or [q.get("text")])[0]
            answers[qid]["category"] = q.get("category")


def judge_prompt(question: str, first: str, second: str, category: str | None) -> tuple[str, str]:
    """(system prompt, user prompt) for one ordered pair."""
    prompts = load_prompts()
    p = prompts.get(category if category in prompts else "general")
    user = p["prompt_template"].format(question=question, answer_1=first, answer_2=second, prompt=p["prompt"])
    return p["system_prompt"], user


def parse_verdict(text: str) -> int:
    """1, 2 or 3 from the judge's last line; -1 if it cannot be read."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return -1
    m = _LAST_NUMBER.search(lines[-1])
    return int(m.group(1)) if m and len(lines[-1].strip()) <= 12 else -1


# -- judges -----------------------------------------------------------------------------------------
class ModelJudge:
    """Any causal LM fourbit loads (a model name or fourbit.models.ModelArgs), prompted with the
    paper's template, greedy, up to 512 tokens."""

    def __init__(self, model, adapter: str | None = None, quant: str = "nf4", max_new_tokens: int = 512):
        from fourbit.models import ModelArgs, load_model_and_adapter

        args = model if isinstance(model, ModelArgs) else ModelArgs(model=str(model), adapter=adapter, quant=quant)
        self.name = Path(args.model).name
        self.model, self.tok = load_model_and_adapter(args, need_tokenizer="the model judge")
        self.max_new_tokens = max_new_tokens

    def __call__(self, system: str, user: str) -> str:
        from fourbit.generate import generate_batch, render

        prompt = render(self.tok, [{"role": "system", "content": system}, {"role": "user", "content": user}])
        return generate_batch(self.model, self.tok, [prompt], self.max_new_tokens, chat_template=False)[0]


class EndpointJudge:
    """An OpenAI-compatible /chat/completions endpoint: OPENAI_BASE_URL and OPENAI_API_KEY from the env."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 120):
        self.name = model
        self.url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.key = api_key or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        if not self.key:
            raise UserError("the endpoint judge needs an API key in OPENAI_API_KEY (and OPENAI_BASE_URL for a "
                            "non-OpenAI server)")

    def __call__(self, system: str, user: str) -> str:
        body = json.dumps({"model": self.name, "temperature": 0, "max_tokens": 512,
                           "messages": [{"role": "system", "content": system},
                                        {"role": "user", "content": user}]}).encode()
        req = urllib.request.Request(f"{self.url}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read())
        except urllib.error.HTTPError as e:  # servers echo keys back: never print one
            raise UserError(redact(f"judge endpoint {self.url} answered HTTP {e.code}: {e.read()[:300]!r}",
                                   [self.key])) from None
        except (urllib.error.URLError, TimeoutError) as e:
            if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                raise UserError(redact(f"judge endpoint {self.url} did not answer within {self.timeout:g} s (a "
                                       f"timeout: the server is reachable but slow or overloaded)",
                                       [self.key])) from None
            raise UserError(redact(f"judge endpoint {self.url} is unreachable ({e})", [self.key])) from None
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""  # recorded as unreadable


class HumanJudge:
    """A person at the terminal: both answers shown, keys 1 / 2 / 3, q to stop (all saved so far kept)."""

    name = "human"

    def __init__(self, read=input, write=print):
        self.read, self.write = read, write

    def __call__(self, system: str, user: str) -> str:
        self.write("\n" + "=" * 78 + "\n" + user.split("[System]")[0].strip() + "\n" + "-" * 78)
        while True:
            key = self.read("Which is better? 1 = first, 2 = second, 3 = tie, q = quit: ").strip().lower()
            if key in ("1", "2", "3"):
                return key
            if key in ("q", "quit"):
                raise KeyboardInterrupt
            self.write("please answer 1, 2, 3 or q")


# -- the tournament ---------------------------------------------------------------------------------
@dataclass
class JudgeStats:
    judged: int = 0
    skipped_existing: int = 0
    unreadable: int = 0
    wins: dict[str, float] = field(default_factory=dict)
    partial_line: object = None  # a PartialLine cut off the output before appending (a killed earlier run)


def run_judging(file_a: str, file_b: str, judge, output: str, questions: str | None = None,
                limit: int = 0, both_orders: bool = True) -> JudgeStats:
    name_a, ans_a = read_answers(file_a)
    name_b, ans_b = read_answers(file_b)
    if name_a == name_b:
        name_a, name_b = f"{name_a}@{Path(file_a).stem}", f"{name_b}@{Path(file_b).stem}"
    only_a, only_b = sorted(set(ans_a) - set(ans_b)), sorted(set(ans_b) - set(ans_a))
    if only_a or only_b:
        raise UserError(f"the answer files cover different questions: only in {file_a}: {only_a[:10]}"
                        f"{'...' if len(only_a) > 10 else ''}; only in {file_b}: {only_b[:10]}"
                        f"{'...' if len(only_b) > 10 else ''}")
    attach_questions(ans_a, questions)
    out = Path(output)
    done, partial = set(), None
    if out.exists():
        for i, r in iter_jsonl(out, allow_partial_last=True, objects=True):
            if not {"question_id", "first", "second"} <= set(r):
                raise UserError(f"{out}:{i}: not a judgment (no question_id/first/second); is --output another file?")
            done.add((str(r["question_id"]), r["first"], r["second"], r.get("judge")))
        partial = truncate_partial_line(out)  # a killed run's half-written line: judged again, not glued onto
    stats = JudgeStats(wins={name_a: 0.0, name_b: 0.0}, partial_line=partial)
    qids = sorted(ans_a, key=lambda q: (len(q), q))[: limit or None]
    pairs = [(q, (name_a, ans_a), (name_b, ans_b)) for q in qids]
    if both_orders:
        pairs += [(q, (name_b, ans_b), (name_a, ans_a)) for q in qids]
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for q, (n1, a1), (n2, a2) in tqdm(pairs, desc="judging", unit="pair", disable=isinstance(judge, HumanJudge)):
            if (q, n1, n2, judge.name) in done:
                stats.skipped_existing += 1
                continue
            question = ans_a[q]["question"] or ""
            system, user = judge_prompt(question, a1[q]["answer"], a2[q]["answer"], ans_a[q].get("category"))
            raw = judge(system, user)
            score = parse_verdict(raw)
            f.write(json.dumps({"question_id": q, "first": n1, "second": n2, "score": score, "judge": judge.name,
                                "raw": raw}, ensure_ascii=False) + "\n")
            f.flush()
            stats.judged += 1
            if score == -1:
                stats.unreadable += 1
            else:
                stats.wins[n1] += {1: 1, 2: 0, 3: 0.5}[score]
                stats.wins[n2] += {1: 0, 2: 1, 3: 0.5}[score]
    return stats
