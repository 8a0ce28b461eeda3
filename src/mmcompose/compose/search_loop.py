"""The coefficient search itself, pure: grid or coordinate ascent over a ``weights -> score``
callable, every candidate recorded (its table as rows, JSON and markdown).

Nothing here reads a model or a file, so the search logic is tested with plain functions;
:mod:`mmcompose.compose.search` feeds it the scores of an in-memory composition.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mmcompose.errors import ConfigError, MergeError

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MAX_GRID_CANDIDATES = 500
MAX_PASSES = 3
Method = Literal["coordinate", "grid"]
Weights = tuple[float, ...]


class InvalidWeights(MergeError):
    """The merge method refuses these weights (e.g. linear normalising a zero sum): the
    candidate is recorded as invalid and the search goes on."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search. ``cached``: these weights were scored earlier in the search
    (coordinate sweeps revisit the current point), so the score was reused, not recomputed."""

    index: int
    weights: Weights
    accuracy: float | None  # None: the weights are invalid for the method (see ``error``)
    seconds: float
    pass_: int = 0  # coordinate: 1-based pass, 0 for the start point; grid: 0
    swept: int | None = None  # coordinate: the source whose lambda varies in this sweep
    cached: bool = False
    error: str | None = None


@dataclass
class SearchResult:
    """Every candidate in evaluation order and the best one; I/O fields are filled by
    :func:`search_coefficients` (None when the pure :func:`run_search` made it)."""

    method: str
    grid: Weights
    start: Weights
    candidates: list[Candidate]
    best: Candidate
    passes: int = 0
    sources: list[str] = field(default_factory=list)
    mode: str | None = None
    metric: str | None = None
    n_items: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # None: a labelled search (accuracy); "consistency": the label-free search
    # (:mod:`~mmcompose.compose.consistency`), whose candidates' ``accuracy`` holds that score
    criterion: str | None = None

    @property
    def score_name(self) -> str:
        """What each candidate's ``accuracy`` field measures."""
        return self.criterion or "accuracy"

    @property
    def best_weights(self) -> Weights:
        return self.best.weights

    @property
    def best_accuracy(self) -> float:
        assert self.best.accuracy is not None
        return self.best.accuracy

    def source_names(self) -> list[str]:
        return self.sources or [f"source {i}" for i in range(len(self.start))]

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per candidate, the weights keyed by source name."""
        names = self.source_names()
        return [
            {
                "index": c.index,
                "pass": c.pass_,
                "swept": None if c.swept is None else names[c.swept],
                "weights": dict(zip(names, c.weights, strict=True)),
                "accuracy": c.accuracy,
                "seconds": round(c.seconds, 4),
                "cached": c.cached,
                "best": c.index == self.best.index,
                **({"error": c.error} if c.error else {}),
            }
            for c in self.candidates
        ]

    def to_json_dict(self) -> dict[str, Any]:
        names = self.source_names()
        return {
            "method": self.method,
            "mode": self.mode,
            "metric": self.metric,
            "n_items": self.n_items,
            "grid": list(self.grid),
            "sources": names,
            "start": dict(zip(names, self.start, strict=True)),
            "best": {
                "weights": dict(zip(names, self.best.weights, strict=True)),
                "accuracy": self.best.accuracy,
                "index": self.best.index,
            },
            "passes": self.passes,
            "evaluated": sum(not c.cached for c in self.candidates),
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            **({"criterion": self.criterion} if self.criterion else {}),
            "candidates": self.rows(),
        }

    def to_markdown(self) -> str:
        names = self.source_names()
        what = self.metric or self.score_name
        items = f" on {self.n_items} items" if self.n_items is not None else ""
        best = ", ".join(
            f"{n} = {fmt_num(w)}" for n, w in zip(names, self.best.weights, strict=True)
        )
        lines = [
            f"# Coefficient search ({self.method}, {what}{items})",
            "",
            f"Best: {best} -> {fmt_num(self.best.accuracy)} (candidate {self.best.index}); "
            f"start {fmt_vec(self.start)}, grid {fmt_vec(self.grid)}, {self.passes} pass(es), "
            f"{sum(not c.cached for c in self.candidates)} evaluated in {self.seconds:.1f} s.",
            *([""] + [f"- {n}" for n in self.notes] if self.notes else []),
            "",
            "| # | pass | swept | " + " | ".join(f"lambda {n}" for n in names)
            + f" | {self.score_name} | seconds | note |",
            "|" + "---|" * (len(names) + 6),
        ]  # fmt: skip
        for c in self.candidates:
            note = []
            if c.index == self.best.index:
                note.append("**best**")
            if c.cached:
                note.append("cached")
            if c.error:
                note.append(c.error.replace("|", "/").replace("\n", " "))
            swept = "" if c.swept is None else names[c.swept]
            cells = [str(c.index), str(c.pass_), swept, *(fmt_num(w) for w in c.weights),
                     fmt_num(c.accuracy), f"{c.seconds:.2f}", "; ".join(note)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def fmt_num(x: float | None) -> str:
    """Four significant digits; ``-`` for a candidate without a score."""
    return "-" if x is None else f"{x:.4g}"


def fmt_vec(xs: Iterable[float]) -> str:
    return "(" + ", ".join(fmt_num(x) for x in xs) + ")"


def parse_grid(grid: str | Iterable[float | str]) -> Weights:
    """Candidate lambda values from ``"0,0.5,1"`` or a sequence: finite numbers, at least one;
    repeats are dropped (the order is kept: it breaks ties)."""
    parts = grid.split(",") if isinstance(grid, str) else list(grid)
    values: list[float] = []
    for p in parts:
        try:
            v = float(p.strip() if isinstance(p, str) else p)
        except (TypeError, ValueError):
            raise ConfigError(
                f"grid value {p!r} is not a number",
                hint="give comma-separated numbers, e.g. --grid 0,0.25,0.5,0.75,1",
            ) from None
        if not math.isfinite(v):
            raise ConfigError(f"grid value {p!r} is not finite", hint="use finite numbers")
        if v not in values:
            values.append(v)
    if not values:
        raise ConfigError("the grid is empty", hint="e.g. --grid 0,0.25,0.5,0.75,1")
    return tuple(values)


def check_choice(name: str, value: str, options: Iterable[str]) -> None:
    """Refuse an option outside ``options`` (the API is called without the CLI's checks)."""
    options = list(options)
    if value not in options:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(options)}")


def run_search(
    evaluate: Callable[[Weights], float],
    n: int,
    grid: Sequence[float],
    *,
    method: Method = "coordinate",
    start: Sequence[float] | None = None,
    max_passes: int = MAX_PASSES,
    max_candidates: int = MAX_GRID_CANDIDATES,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> SearchResult:
    """Maximise ``evaluate(weights)`` over per-source weights (pure: no I/O).

    ``grid``: every vector of the Cartesian product (refused above ``max_candidates``); ties
    go to the vector nearest ``start`` (L1), then to the earlier one. ``coordinate``: score
    ``start`` (default 1/N each), then sweep one source's lambda over the grid with the others
    fixed and move only on a strict improvement (ties keep the current point, then the earlier
    grid value); repeat passes until one changes nothing, at most ``max_passes``.
    ``evaluate`` may raise :class:`InvalidWeights` for weights the method refuses: the
    candidate is recorded as invalid and never chosen; any other error ends the search.
    """
    check_choice("search method", method, ("coordinate", "grid"))
    if n < 1:
        raise ConfigError("nothing to search: no sources")
    grid = parse_grid(grid)
    start_w: Weights = tuple(float(x) for x in start) if start is not None else (1.0 / n,) * n
    if len(start_w) != n:
        raise ConfigError(f"{len(start_w)} start weights for {n} sources")
    if method == "grid":
        check_grid_size(n, grid, max_candidates)
    cands: list[Candidate] = []
    memo: dict[Weights, Candidate] = {}

    def score(w: Weights, pass_: int = 0, swept: int | None = None) -> Candidate:
        w = tuple(float(x) for x in w)
        prior = memo.get(w)
        if prior is not None:
            c = Candidate(len(cands), w, prior.accuracy, 0.0, pass_, swept, True, prior.error)
        else:
            t0 = time.perf_counter()
            acc, error = None, None
            try:
                acc = float(evaluate(w))
                if not math.isfinite(acc):
                    acc, error = None, f"score {acc} is not finite"
            except InvalidWeights as e:
                error = e.message
            c = Candidate(len(cands), w, acc, time.perf_counter() - t0, pass_, swept, False, error)
            memo[w] = c
        cands.append(c)
        if on_candidate is not None:
            on_candidate(c)
        return c

    passes = 0
    if method == "grid":
        best: Candidate | None = None
        for w in itertools.product(grid, repeat=n):
            c = score(w)
            if _better_grid(c, best, start_w):
                best = c
    else:
        best = score(start_w)
        for p in range(1, max_passes + 1):
            passes = p
            before = best.weights
            for m in range(n):
                current = best.weights
                for v in grid:
                    c = score((*current[:m], float(v), *current[m + 1 :]), p, m)
                    if _beats(c, best):
                        best = c
            if best.weights == before:
                break
    if best is None or best.accuracy is None:
        errors = sorted({c.error for c in cands if c.error})
        raise MergeError(
            "no candidate weights could be scored: " + "; ".join(errors[:3]),
            hint="choose grid values the merge method accepts (linear with normalize needs "
            "a nonzero sum), or use task_arithmetic",
        )
    return SearchResult(method, grid, start_w, cands, best, passes)


def check_grid_size(n: int, grid: Sequence[float], limit: int = MAX_GRID_CANDIDATES) -> None:
    """Refuse a Cartesian product too large to score."""
    total = len(grid) ** n
    if total > limit:
        raise ConfigError(
            f"grid search over {n} sources x {len(grid)} values is {total} candidates "
            f"(more than {limit})",
            hint="use --search-method coordinate, or a shorter --grid",
        )


def _beats(c: Candidate, best: Candidate | None) -> bool:
    if c.accuracy is None:
        return False
    return best is None or best.accuracy is None or c.accuracy > best.accuracy


def _better_grid(c: Candidate, best: Candidate | None, start: Weights) -> bool:
    if c.accuracy is None:
        return False
    if best is None or best.accuracy is None or c.accuracy > best.accuracy:
        return True
    if c.accuracy < best.accuracy:
        return False
    return _distance(c.weights, start) < _distance(best.weights, start)


def _distance(a: Weights, b: Weights) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))
