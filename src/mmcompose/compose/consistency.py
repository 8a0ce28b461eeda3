"""The label-free coefficient search, pure: AdaMMS's generation consistency over a grid.

AdaMMS (Du et al., CVPR 2025, arXiv 2503.23733) chooses merge coefficients without labels:
merge at every candidate coefficient, let each merged model answer the same unlabelled
inputs, and keep the candidate whose answers change least when the coefficient moves to its
neighbours on the grid. Where a coefficient is good the merged model is on a flat stretch of
its behaviour; near a bad one small changes flip many answers. As AdaMMS does, answers are
compared whole (two responses agree or they do not) and a candidate's score is its
*consistency*::

    consistency(v) = mean over its grid neighbours u of agreement(responses(v), responses(u))
    agreement(a, b) = fraction of inputs on which a and b give the same response

With several coefficients (one lambda per source) the search is AdaMMS's rule along one axis
at a time: ``coordinate`` sweeps one source's lambda over the grid with the others fixed,
scores each value by its neighbours in that sweep and moves to the most consistent value
(ties keep the current value, then the nearest, then the earlier grid value), for at most
``max_passes`` passes or until a pass changes nothing. ``grid`` scores every vector of the
Cartesian product by its neighbours along every axis (ties: nearest the start, then earlier).
A score is only comparable within its sweep, so the coordinate result is where the last
sweep ends, not the largest score seen.

Nothing here reads a model or a file: ``respond(weights) -> responses`` is any callable
(tested with plain functions); :mod:`mmcompose.compose.search_unlabelled` feeds it the answers
of an in-memory composition. Results are :class:`~mmcompose.compose.search_loop.SearchResult`,
so the labelled search's report and curve apply unchanged (``accuracy`` holds the
consistency there).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from mmcompose.compose.search_loop import (
    MAX_GRID_CANDIDATES,
    MAX_PASSES,
    Candidate,
    InvalidWeights,
    Method,
    SearchResult,
    Weights,
    check_choice,
    check_grid_size,
    parse_grid,
)
from mmcompose.errors import ConfigError, MergeError

__all__ = [
    "CRITERION",
    "Response",
    "agreement",
    "axis_consistency",
    "run_consistency_search",
]

CRITERION = "consistency"  # AdaMMS: agreement of a candidate's answers with its neighbours'
Response = Hashable  # one input's answer: an option letter, a normalised text, None
Responses = Sequence[Response]


def agreement(a: Responses, b: Responses) -> float:
    """The fraction of inputs on which two candidates give the same response."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} responses: the candidates saw different inputs")
    if not a:
        raise ValueError("no responses to compare")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def axis_consistency(responses: Sequence[Responses | None]) -> list[float | None]:
    """Consistency of each point of one axis (``responses`` in ascending coefficient order):
    the mean agreement with its nearest scored neighbour on each side. A point without
    responses (invalid weights), or with no scored neighbour at all, gets None."""
    scored = [i for i, r in enumerate(responses) if r is not None]
    out: list[float | None] = [None] * len(responses)
    for k, i in enumerate(scored):
        near = [scored[j] for j in (k - 1, k + 1) if 0 <= j < len(scored)]
        if near:
            ri = responses[i]
            assert ri is not None
            out[i] = sum(agreement(ri, responses[j]) for j in near) / len(near)  # type: ignore[arg-type]
    return out


class _Memo:
    """Each weight vector's responses computed once; revisits are marked ``cached``."""

    def __init__(self, respond: Callable[[Weights], Responses]) -> None:
        self.respond = respond
        self.done: dict[Weights, tuple[Responses | None, str | None]] = {}

    def get(self, w: Weights) -> tuple[Responses | None, str | None, float, bool]:
        if w in self.done:
            r, err = self.done[w]
            return r, err, 0.0, True
        t0 = time.perf_counter()
        r: Responses | None
        err: str | None = None
        try:
            r = list(self.respond(w))
            if not r:
                r, err = None, "no responses"
        except InvalidWeights as e:
            r, err = None, e.message
        self.done[w] = (r, err)
        return r, err, time.perf_counter() - t0, False


def run_consistency_search(
    respond: Callable[[Weights], Responses],
    n: int,
    grid: Sequence[float],
    *,
    method: Method = "coordinate",
    start: Sequence[float] | None = None,
    max_passes: int = MAX_PASSES,
    max_candidates: int = MAX_GRID_CANDIDATES,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> SearchResult:
    """Choose per-source weights by generation consistency (module docstring; pure).

    ``respond(weights)`` returns one response per unlabelled input, the same inputs in the same
    order for every call; it may raise :class:`InvalidWeights` (the candidate is recorded as
    invalid, never chosen, and its neighbours compare with the next scored point instead).
    Needs at least two grid values (a point needs a neighbour)."""
    check_choice("search method", method, ("coordinate", "grid"))
    if n < 1:
        raise ConfigError("nothing to search: no sources")
    grid = parse_grid(grid)
    if len(grid) < 2:
        raise ConfigError(
            f"the label-free search compares neighbouring grid values; the grid {list(grid)} "
            "has one",
            hint="give at least 3 values, e.g. --grid 0.25,0.5,0.75,1",
        )
    if max_passes < 1:
        raise ConfigError(f"max_passes is {max_passes}", hint="search at least one pass")
    start_w: Weights = tuple(float(x) for x in start) if start is not None else (1.0 / n,) * n
    if len(start_w) != n:
        raise ConfigError(f"{len(start_w)} start weights for {n} sources")
    if method == "grid":
        check_grid_size(n, grid, max_candidates)
    memo = _Memo(respond)
    cands: list[Candidate] = []

    def record(points: list[Weights], scores: list[float | None], got: list[Any], pass_: int,
               swept: int | None) -> list[Candidate]:  # fmt: skip
        made = []
        for w, s, (_, err, secs, cached) in zip(points, scores, got, strict=True):
            if s is None and err is None:
                err = "no scored neighbour to compare with"
            c = Candidate(len(cands), w, s, secs, pass_, swept, cached, err)
            cands.append(c)
            made.append(c)
            if on_candidate is not None:
                on_candidate(c)
        return made

    order = sorted(range(len(grid)), key=lambda i: grid[i])  # ascending coefficient
    passes = 0
    best: Candidate | None = None
    if method == "grid":
        points = [tuple(float(x) for x in p) for p in itertools.product(grid, repeat=n)]
        got = {p: memo.get(p) for p in points}
        scores = [_grid_score(p, grid, order, got) for p in points]
        made = record(points, scores, [got[p] for p in points], 0, None)
        for c in made:
            if c.accuracy is not None and _better(c, best, start_w):
                best = c
    else:
        current = start_w
        for p in range(1, max_passes + 1):
            passes = p
            before = current
            for m in range(n):
                points = [(*current[:m], float(v), *current[m + 1 :]) for v in grid]
                got_list = [memo.get(w) for w in points]
                axis = axis_consistency([got_list[i][0] for i in order])
                scores: list[float | None] = [None] * len(points)
                for rank, i in enumerate(order):
                    scores[i] = axis[rank]
                made = record(points, scores, got_list, p, m)
                chosen = _choose(made, current, m)
                if chosen is not None:
                    best, current = chosen, chosen.weights
            if current == before:
                break
    if best is None:
        errors = sorted({c.error for c in cands if c.error})
        raise MergeError(
            "no candidate weights could be scored for consistency: " + "; ".join(errors[:3]),
            hint="choose grid values the merge method accepts (linear with normalize needs "
            "a nonzero sum), or use task_arithmetic",
        )
    result = SearchResult(method, grid, start_w, cands, best, passes)
    result.criterion = CRITERION
    return result


def _grid_score(
    point: Weights, grid: Weights, order: list[int], got: dict[Weights, Any]
) -> float | None:
    """A Cartesian-grid point's consistency: the mean, over the axes along which it has a
    scored neighbour, of that axis's consistency at the point."""
    if got[point][0] is None:
        return None
    per_axis = []
    for m in range(len(point)):
        line = [(*point[:m], float(grid[i]), *point[m + 1 :]) for i in order]
        axis = axis_consistency([got[q][0] for q in line])
        s = axis[line.index(point)]
        if s is not None:
            per_axis.append(s)
    return sum(per_axis) / len(per_axis) if per_axis else None


def _choose(made: list[Candidate], current: Weights, m: int) -> Candidate | None:
    """The sweep's most consistent value; ties: the current value, the nearest, the earlier."""
    valid = [c for c in made if c.accuracy is not None]
    if not valid:
        return None
    top = max(c.accuracy for c in valid)  # type: ignore[type-var]
    tied = [c for c in valid if c.accuracy == top]
    return min(tied, key=lambda c: (c.weights != current, abs(c.weights[m] - current[m])))


def _better(c: Candidate, best: Candidate | None, start: Weights) -> bool:
    if best is None or best.accuracy is None:
        return True
    assert c.accuracy is not None
    if c.accuracy != best.accuracy:
        return c.accuracy > best.accuracy
    dist = sum(abs(x - y) for x, y in zip(c.weights, start, strict=True))
    return dist < sum(abs(x - y) for x, y in zip(best.weights, start, strict=True))
