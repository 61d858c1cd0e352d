"""The arena: people judge two answers side by side with the names hidden (QLoRA §6's human raters).

Systems are answer files (fourbit generate's output, the QLoRA paper's generation files, the
Vicuna reference answers: whatever `fourbit.eval.judge.read_answers` reads) and models this
server serves, answering live (`live:NAME`: greedy, generated on first need, kept in memory).
A pair is one question answered by two systems, for every unordered pair of systems. Each rater
sees the pairs in an order of their own, and each pair's left/right placement is drawn per
rater; both come from a hash of the rater id, so a reload shows the same pair the same way
round and a returning rater continues where they stopped.

Judgments are appended (flushed and fsynced) to a JSONL file in `fourbit judge`'s row format:
`question_id`, `first` (the system shown on the left), `second`, `score` (1 left better, 2 right
better, 3 tie), `judge` ("human"), `raw`; plus `rater`, `key` and `time`. `fourbit elo` reads the
file as it is. Two raters at once: one lock around check-and-append, so nothing is lost or
written twice; the page sends an idempotency key with each judgment, so a retried POST is
answered from the record, and a rater's second judgment of a pair is refused (409). On start
the file is read back, so progress survives a restart. One server process per judgments file.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fourbit.errors import UserError
from fourbit.serve.protocol import ApiError

LIVE = "live:"  # --arena live:NAME: a served model answers the questions itself
RATER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
KEY = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
CHOICES = {"A": 1, "B": 2, "tie": 3}  # -> score, as fourbit judge writes it


@dataclass(frozen=True)
class Pair:
    question_id: str
    systems: tuple[str, str]  # sorted; which one is shown left depends on the rater


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


class Arena:
    """Pairs to judge, who judged what, and the judgments file."""

    def __init__(self, judgments: str | os.PathLike, sources: list[str] = (), questions: str | None = None,
                 orderings: int = 10_000):
        from fourbit.eval.judge import read_answers
        from fourbit.generate import read_prompts

        self.path = Path(judgments)
        self.orderings = orderings  # Elo orderings on the leaderboard: `fourbit elo`'s default, same numbers
        self.questions: dict[str, str] = dict(read_prompts(questions)) if questions else {}
        self.answers: dict[str, dict[str, str]] = {}  # system -> question id -> answer text
        self.live: list[str] = []  # systems answering live: served model names
        for src in sources:
            if src.startswith(LIVE):
                if not questions:
                    raise UserError(f"--arena {src}: a live system answers the questions of --questions FILE, "
                                    f"which was not given")
                self.live.append(src[len(LIVE):])
                continue
            name, rows = read_answers(src)
            if name in self.answers:
                name = f"{name}@{Path(src).stem}"
            self.answers[name] = {q: r["answer"] for q, r in rows.items()}
            for q, r in rows.items():
                if r.get("question") and q not in self.questions:
                    self.questions[q] = r["question"]
        self.systems = sorted({*self.answers, *self.live})
        if len(self.systems) < 2:
            raise UserError(f"the arena needs at least two systems (answer files or live:MODEL), got "
                            f"{len(self.systems)}: {self.systems}")
        self.pairs = self._make_pairs()
        self.index = {(p.question_id, frozenset(p.systems)): i for i, p in enumerate(self.pairs)}
        self.answer_fn = None  # async (model, question) -> str, set by the app for live systems
        self._live_answers: dict[tuple[str, str], asyncio.Future] = {}
        self._lock = threading.Lock()
        self._judged: dict[str, set[int]] = {}  # rater -> pair indices judged
        self._by_key: dict[str, dict] = {}  # idempotency key -> the row written
        self._orders: dict[str, list[int]] = {}
        self._board: tuple[tuple, dict] | None = None
        self.skipped_lines = self._read_back()

    def _make_pairs(self) -> list[Pair]:
        def qids(system: str) -> set[str]:
            return set(self.questions) if system in self.live else set(self.answers[system])

        pairs = []
        for a, b in itertools.combinations(self.systems, 2):
            pairs += [Pair(q, (a, b)) for q in sorted(qids(a) & qids(b), key=lambda q: (len(q), q))]
        if not pairs:
            raise UserError(f"no question is answered by two of the systems {self.systems}; check the answer "
                            f"files' question ids")
        missing = sorted({p.question_id for p in pairs} - set(self.questions), key=lambda q: (len(q), q))
        if missing:
            raise UserError(f"no question text for question ids {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                            f"pass --questions FILE (e.g. the Vicuna question.jsonl)")
        return pairs

    def _read_back(self) -> int:
        """Rebuild who judged what from the judgments file; the number of lines that could not be used."""
        if not self.path.is_file():
            return 0
        skipped = 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(row, dict) or not row.get("rater"):
                continue  # another judge's row: it counts on the leaderboard, not as a rater's progress
            i = self.index.get((str(row.get("question_id")), frozenset((row.get("first"), row.get("second")))))
            if i is not None:
                self._judged.setdefault(row["rater"], set()).add(i)
                if row.get("key"):
                    self._by_key[row["key"]] = row
        return skipped

    # -- what a rater sees ----------------------------------------------------------------------
    def order(self, rater: str) -> list[int]:
        if rater not in self._orders:
            self._orders[rater] = random.Random(_hash("order", rater)).sample(range(len(self.pairs)), len(self.pairs))
        return self._orders[rater]

    def placement(self, rater: str, i: int) -> tuple[str, str]:
        """(left system, right system) of pair i for this rater."""
        a, b = self.pairs[i].systems
        return (b, a) if _hash("flip", rater, str(i)) & 1 else (a, b)

    def progress(self, rater: str) -> tuple[int, int]:
        return len(self._judged.get(rater, ())), len(self.pairs)

    async def next_pair(self, rater: str) -> dict:
        """The rater's next unjudged pair with both answers (names hidden), or {"done": True}."""
        judged, total = self.progress(rater)
        done = self._judged.get(rater, set())
        i = next((i for i in self.order(rater) if i not in done), None)
        if i is None:
            return {"done": True, "judged": judged, "total": total}
        left, right = self.placement(rater, i)
        q = self.pairs[i].question_id
        a, b = await asyncio.gather(self._answer(left, q), self._answer(right, q))
        return {"done": False, "pair": i, "question": self.questions[q], "a": a, "b": b, "judged": judged,
                "total": total}

    async def _answer(self, system: str, qid: str) -> str:
        if system not in self.live:
            return self.answers[system][qid]
        key = (system, qid)
        fut = self._live_answers.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):  # first need, or retry after a failure
            fut = self._live_answers[key] = asyncio.ensure_future(self.answer_fn(system, self.questions[qid]))
        try:
            return await asyncio.shield(fut)  # a rater who leaves does not cancel it for the others
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - the page shows it and the rater can retry
            raise ApiError(503, f"the live system could not answer: {e}") from None

    # -- judging --------------------------------------------------------------------------------
    def judge(self, rater: str, i: int, choice: str, key: str) -> tuple[dict, bool]:
        """Record one judgment: (the row, whether it was written now). Safe to call from any thread."""
        if not isinstance(rater, str) or not RATER.match(rater):
            raise ApiError(400, "rater must be 1-64 letters, digits, '_', '.', '@' or '-'", param="rater")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.pairs):
            raise ApiError(400, f"pair must be an index in [0, {len(self.pairs)})", param="pair")
        if choice not in CHOICES:
            raise ApiError(400, f"choice must be one of {', '.join(CHOICES)}", param="choice")
        if not isinstance(key, str) or not KEY.match(key):
            raise ApiError(400, "key must be 8-64 letters, digits, '_' or '-' (one per judgment, reused on retry)",
                           param="key")
        left, right = self.placement(rater, i)
        score = CHOICES[choice]
        with self._lock:
            seen = self._by_key.get(key)
            if seen is not None:
                same = (seen["rater"], seen["first"], seen["second"], seen["score"]) == (rater, left, right, score)
                if not same or seen["question_id"] != self.pairs[i].question_id:
                    raise ApiError(409, "this key was used for a different judgment; send a new key",
                                   param="key", code="key_reused")
                return seen, False
            if i in self._judged.get(rater, ()):
                raise ApiError(409, "you have judged this pair already", param="pair", code="already_judged")
            row = {"question_id": self.pairs[i].question_id, "first": left, "second": right, "score": score,
                   "judge": "human", "raw": str(score), "rater": rater, "key": key,
                   "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            self._append(row)
            self._judged.setdefault(rater, set()).add(i)
            self._by_key[key] = row
        return row, True

    def _append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            head = b""
            if f.tell() > 0:  # a line cut short by a crash must not swallow this one
                f.seek(-1, os.SEEK_END)
                head = b"" if f.read(1) == b"\n" else b"\n"
            f.write(head + (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    # -- leaderboard ----------------------------------------------------------------------------
    def leaderboard(self) -> dict:
        """Elo (mean over random orderings, as `fourbit elo`), Bradley-Terry and win/tie/loss counts."""
        from fourbit.eval.elo import bradley_terry, elo_orderings, read_judgments

        st = self.path.stat() if self.path.is_file() else None
        stamp = (st.st_size, st.st_mtime_ns) if st else None
        if self._board is not None and self._board[0] == stamp:
            return self._board[1]
        try:
            m = read_judgments([str(self.path)]) if st else None
        except UserError:
            m = None
        rows = []
        if m is not None:
            r = elo_orderings(m, self.orderings, seed=0)
            mean, lo, hi = r.mean(0), np.percentile(r, 2.5, axis=0), np.percentile(r, 97.5, axis=0)
            bt = bradley_terry(m)  # None when the MLE does not exist (e.g. one system never lost)
            for k in np.argsort(-mean):
                won = np.sum(np.where(m.a == k, m.s, 0) + np.where(m.b == k, 1 - m.s, 0))
                ties = np.sum(((m.a == k) | (m.b == k)) & (m.s == 0.5))
                games = int(np.sum((m.a == k) | (m.b == k)))
                wins = int(round(won - 0.5 * ties))
                rows.append({"system": m.players[k], "elo": float(mean[k]), "ci95": [float(lo[k]), float(hi[k])],
                             "bradley_terry": None if bt is None else float(bt[k]), "wins": wins,
                             "ties": int(ties), "losses": games - wins - int(ties), "matches": games})
        raters = {}
        with self._lock:
            for rater, done in self._judged.items():
                raters[rater] = len(done)
        board = {"systems": rows, "matches": 0 if m is None else len(m.s), "unreadable": 0 if m is None else
                 m.unreadable, "orderings": self.orderings, "raters": len(raters), "pairs": len(self.pairs),
                 "file": self.path.name}
        self._board = (stamp, board)
        return board


def arena_routes(arena: Arena, api, read_json) -> list:
    """/arena/api/next, /arena/api/judgments, /arena/api/leaderboard (behind the API key when set)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    @api()
    async def next_pair(request):
        rater = request.query_params.get("rater", "")
        if not RATER.match(rater):
            raise ApiError(400, "rater must be 1-64 letters, digits, '_', '.', '@' or '-'", param="rater")
        return JSONResponse(await arena.next_pair(rater))

    @api()
    async def judge(request):
        body = await read_json(request)
        row, created = arena.judge(body.get("rater"), body.get("pair"), body.get("choice"), body.get("key"))
        judged, total = arena.progress(row["rater"])
        return JSONResponse({"recorded": True, "created": created, "judged": judged, "total": total},
                            status_code=201 if created else 200)

    @api()
    async def leaderboard(request):
        return JSONResponse(await asyncio.to_thread(arena.leaderboard))

    return [Route("/arena/api/next", next_pair), Route("/arena/api/judgments", judge, methods=["POST"]),
            Route("/arena/api/leaderboard", leaderboard)]
