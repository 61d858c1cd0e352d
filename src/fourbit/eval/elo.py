"""Elo ratings from pairwise judgments, as in the QLoRA paper (§6.1), and Bradley-Terry.

Elo: every system starts at 1000; for a match between a and b with score S (1 a wins, 0 b wins,
0.5 tie), E = 1 / (1 + 10^((Rb - Ra) / 400)), Ra += K (S - E), Rb -= K (S - E), K = 32. Elo
depends on the order of the matches, so the paper averages the final ratings over 10,000 random
orderings. Each ordering gives one final rating per system; we report their mean and two
intervals, both over those N per-ordering ratings:
- `ci95`: the 2.5th and 97.5th percentiles (the spread due to match order alone: where one
  random ordering's rating falls 95% of the time);
- `mean_ci95`: the half-width 1.96 * std / sqrt(N) of a normal 95% confidence interval of the
  mean itself. This is the paper's "1348 +- 1" convention (it shrinks with N; the spread does not).
Neither interval covers the uncertainty of the judgments themselves (a bootstrap over prompts
would). All orderings run at once as a batch dimension (blocks of 2,000, so memory stays
~300 MB), the Python loop is over matches only: 10,000 orderings of ~4,500 matches take seconds.

Bradley-Terry: the maximum-likelihood strengths p (P(a beats b) = p_a / (p_a + p_b)), ties
counted as half a win for each, fitted with Hunter's MM iterations and reported on the Elo scale
(400 log10 p, shifted to mean 1000). It does not depend on order.

Input: fourbit judgment JSONL (`first`, `second`, `score`) and the paper's released files as
they are (`A-vs-B-gpt-4-reviewer-threeclass.jsonl`, names from the file name; score 1 = A wins,
2 = B wins, 3 = tie, -1 = unreadable judge output: counted, reported, not used). Rows that cannot
be a match are counted and reported, never used: a system judged against itself (its Elo update
would be written twice, the second write winning, so the rating would drift), and malformed lines
(not JSON, not an object, no systems, no score or one outside 1/2/3/-1, a partial last line left by
a judge killed mid-line), each with file:line.

When one system won every match (or some group never scored against the rest) Bradley-Terry has
no finite maximum-likelihood solution; the result says so (`bradley_terry` None, with a
`bradley_terry_note`) and Elo is reported as always.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fourbit.data import iter_jsonl
from fourbit.errors import UserError

START, K = 1000.0, 32.0
_PAPER_NAME = re.compile(r"^(?P<a>.+?)-vs-(?P<b>.+?)-gpt-4-reviewer-threeclass\.jsonl$")


@dataclass
class Matches:
    players: list[str]
    a: np.ndarray  # (M,) index of the first system
    b: np.ndarray  # (M,)
    s: np.ndarray  # (M,) score of the first: 1, 0 or 0.5
    unreadable: int = 0  # score -1: the judge's verdict could not be read
    bad_lines: list[str] = field(default_factory=list)  # "file:line: why", one per malformed line
    self_play: int = 0  # rows judging a system against itself


_SCORES = {1: 1.0, 2: 0.0, 3: 0.5}  # 1 -> first wins, 2 -> second wins, 3 -> tie; -1 -> unreadable


def read_judgments(paths: list[str]) -> Matches:
    names: dict[str, int] = {}
    a, b, s, unreadable, self_play, bad = [], [], [], 0, 0, []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"judgment file {path} does not exist")
        m = _PAPER_NAME.match(p.name)
        for i, row in iter_jsonl(p, objects=True, bad=bad):
            first, second = (m["a"], m["b"]) if m else (row.get("first"), row.get("second"))
            score = row.get("score")
            if not isinstance(first, str) or not isinstance(second, str) or not first or not second:
                bad.append(f"{p}:{i}: no 'first'/'second' systems (and the file name is not A-vs-B-...)")
            elif "score" not in row:
                bad.append(f"{p}:{i}: no score")
            elif score == -1 and isinstance(score, int):
                unreadable += 1
            elif not isinstance(score, int) or isinstance(score, bool) or score not in _SCORES:
                bad.append(f"{p}:{i}: score {score!r} is not 1, 2, 3 or -1")
            elif first == second:
                self_play += 1
            else:
                a.append(names.setdefault(first, len(names)))
                b.append(names.setdefault(second, len(names)))
                s.append(_SCORES[score])
    if not a:
        raise UserError(f"no usable judgments in {len(paths)} file(s) ({unreadable} unreadable, {self_play} "
                        f"self-play rows, {len(bad)} malformed lines" + (f", first: {bad[0]}" if bad else "") + ")")
    return Matches(list(names), np.array(a), np.array(b), np.array(s, dtype=np.float64), unreadable, bad, self_play)


_BLOCK = 2000  # orderings per batch: (matches, 2000) index arrays, ~70 MB each for 4,500 matches


def random_orderings(rng: np.random.Generator, n: int, n_match: int) -> np.ndarray:
    """(n, n_match) int: row i is a uniformly random permutation of the match indices."""
    return rng.permuted(np.broadcast_to(np.arange(n_match, dtype=np.intp), (n, n_match)), axis=1)


def elo_replay(m: Matches, order: np.ndarray, k: float = K) -> np.ndarray:
    """(n, players) final Elo ratings after playing the matches in each row's order.

    order: (n, M) match indices, one ordering per row. The batch runs in parallel: step t plays
    match order[:, t] of every ordering, gathering and scattering in a flat (n * players,) array.
    """
    n, n_match = order.shape
    n_players = len(m.players)
    cols = np.ascontiguousarray(order.T)  # (M, n): step t reads one contiguous row
    base = np.arange(n, dtype=np.intp) * n_players  # (n,) offset of each ordering's ratings
    fa = m.a.astype(np.intp)[cols]  # (M, n) flat index of the first system's rating
    fa += base
    fb = m.b.astype(np.intp)[cols]
    fb += base
    score = m.s[cols]  # (M, n)
    del cols
    r = np.full(n * n_players, START)  # (n * P,) float64
    ra, rb, e = np.empty(n), np.empty(n), np.empty(n)
    c = np.log(10.0) / 400.0  # 10^(x/400) = exp(c x)
    for t in range(n_match):
        ia, ib = fa[t], fb[t]
        np.take(r, ia, out=ra)
        np.take(r, ib, out=rb)
        np.subtract(rb, ra, out=e)  # E = 1 / (1 + 10^((Rb - Ra)/400))
        e *= c
        np.exp(e, out=e)
        e += 1.0
        np.reciprocal(e, out=e)
        np.subtract(score[t], e, out=e)  # S - E
        e *= k
        ra += e
        rb -= e
        r[ia] = ra  # a != b in every match, so the two scatters never collide
        r[ib] = rb
    return r.reshape(n, n_players)


def elo_orderings(m: Matches, orderings: int = 10_000, seed: int = 0, k: float = K,
                  progress: bool = False) -> np.ndarray:
    """(orderings, players) final ratings, each row from one random ordering of the matches.

    Orderings are drawn and played in blocks of 2,000 from one generator seeded with `seed`, so
    the result depends only on (matches, orderings, seed, k)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    out = np.empty((orderings, len(m.players)))
    starts = range(0, orderings, _BLOCK)
    for i in tqdm(starts, desc="elo", unit="block", disable=not progress or len(starts) < 2):
        n = min(_BLOCK, orderings - i)
        out[i:i + n] = elo_replay(m, random_orderings(rng, n, len(m.s)), k)
    return out


def _strongly_connected(m: Matches) -> bool:
    """Whether every system can be reached from every other through "scored at least a tie
    against" edges: the condition (Zermelo, Ford) under which Bradley-Terry's MLE exists."""
    n = len(m.players)
    beats = np.zeros((n, n), dtype=bool)
    beats[m.a[m.s > 0], m.b[m.s > 0]] = True  # a scored against b
    beats[m.b[m.s < 1], m.a[m.s < 1]] = True

    def reach(adj: np.ndarray) -> int:
        seen, todo = {0}, [0]
        while todo:
            for j in np.flatnonzero(adj[todo.pop()]):
                if int(j) not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
        return len(seen)

    return reach(beats) == n and reach(beats.T) == n


def bradley_terry_problem(m: Matches) -> str | None:
    """Why Bradley-Terry has no finite solution for these matches, in words; None when it has one."""
    if len(m.players) < 2:
        return "no Bradley-Terry ratings for fewer than 2 systems"
    if _strongly_connected(m):
        return None
    n = len(m.players)
    scored, conceded = np.zeros(n), np.zeros(n)  # points won / points given away, ties half each
    np.add.at(scored, m.a, m.s)
    np.add.at(scored, m.b, 1 - m.s)
    np.add.at(conceded, m.a, 1 - m.s)
    np.add.at(conceded, m.b, m.s)
    won = [m.players[i] for i in range(n) if conceded[i] == 0]
    lost = [m.players[i] for i in range(n) if scored[i] == 0]
    why = [f"{', '.join(won)} won every match"] if won else []
    why += [f"{', '.join(lost)} lost every match"] if lost else []
    if not why:
        why = ["some group of systems never scored against the rest (no win or tie linking them)"]
    return "no finite Bradley-Terry solution: " + "; ".join(why)


def bradley_terry(m: Matches, iters: int = 10_000, tol: float = 1e-10) -> np.ndarray | None:
    """Bradley-Terry strengths on the Elo scale (mean 1000), ties as half wins (Hunter's MM).

    None when the maximum-likelihood estimate does not exist (some group of systems never
    scored against the rest, e.g. a system that lost every match: its strength would be 0)."""
    n = len(m.players)
    if n < 2 or not _strongly_connected(m):
        return None
    wins = np.zeros(n)
    np.add.at(wins, m.a, m.s)
    np.add.at(wins, m.b, 1 - m.s)
    games = np.zeros((n, n))
    np.add.at(games, (m.a, m.b), 1)
    games = games + games.T  # (P, P) matches between each pair, either order
    p = np.ones(n)
    for _ in range(iters):
        new = wins / (games / (p[:, None] + p[None, :])).sum(1)  # Hunter (2004), eq. 3
        new /= np.exp(np.log(new).mean())  # fix the scale: geometric mean 1
        done = np.abs(new - p).max() < tol
        p = new
        if done:
            break
    elo = 400 * np.log10(p)
    return elo - elo.mean() + START


@dataclass
class EloResult:
    ratings: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    bradley_terry: dict[str, float] | None  # None when it has no finite solution (see bradley_terry_note)
    matches: int
    unreadable: int
    orderings: int
    self_play: int = 0  # rows of a system against itself, skipped
    bad_lines: int = 0  # malformed lines, skipped
    bad_examples: list[str] = field(default_factory=list)  # the first few, "file:line: why"
    bradley_terry_note: str | None = None  # why there are no Bradley-Terry ratings

    def as_dict(self) -> dict:
        return {"ratings": self.ratings, "ci95": {k: list(v) for k, v in self.ci95.items()},
                "bradley_terry": self.bradley_terry, "bradley_terry_note": self.bradley_terry_note,
                "matches": self.matches, "unreadable": self.unreadable, "self_play": self.self_play,
                "bad_lines": self.bad_lines, "bad_examples": self.bad_examples, "orderings": self.orderings}


def elo_ratings(paths: list[str], orderings: int = 10_000, seed: int = 0) -> EloResult:
    if orderings < 1:  # the mean of no orderings is NaN
        raise UserError(f"orderings must be >= 1, got {orderings}")
    m = read_judgments(paths)
    r = elo_orderings(m, orderings, seed)
    mean, lo, hi = r.mean(0), np.percentile(r, 2.5, axis=0), np.percentile(r, 97.5, axis=0)
    note = bradley_terry_problem(m)
    bt = bradley_terry(m) if note is None else None
    order = np.argsort(-mean)
    return EloResult(ratings={m.players[i]: float(mean[i]) for i in order},
                     ci95={m.players[i]: (float(lo[i]), float(hi[i])) for i in order},
                     bradley_terry=None if bt is None else {m.players[i]: float(bt[i]) for i in order},
                     matches=len(m.s), unreadable=m.unreadable, orderings=orderings, self_play=m.self_play,
                     bad_lines=len(m.bad_lines), bad_examples=m.bad_lines[:5], bradley_terry_note=note)


def plot_elo(result: EloResult, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'fourbit[plot]'") from None
    names = list(result.ratings)[::-1]
    mean = [result.ratings[n] for n in names]
    err = [[result.ratings[n] - result.ci95[n][0] for n in names], [result.ci95[n][1] - result.ratings[n] for n in names]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.errorbar(mean, range(len(names)), xerr=err, fmt="o", capsize=3)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"Elo (mean of {result.orderings} orderings, 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
