"""The recall tuner: the smallest search knob (efSearch, nprobe) that reaches a target recall.

Pure apart from the ``search`` callable it is given. The reference is exact search over every
stored vector. The queries should be vectors the index has never seen: :func:`write_tuned`
(what ``mmcompose index --target-recall`` uses) holds a seeded sample of the new rows back,
tunes with them as queries, then stores them. Without such queries the tuner samples stored
vectors, each one's own row left out of both answers; that is optimistic for HNSW (a stored
vector is a graph node whose links are its neighbours: on 1M clustered vectors efSearch 14
gave 0.954 on stored vectors but 0.834 on fresh queries). Recall counts ties: a returned item
is right when its exact score is at least the k-th best exact score, so duplicate vectors
(repeated captions) cannot make even exact search look short of 1.0.

The knob is searched by doubling from the lowest value until the target is met, then by
bisection between the last miss and the first hit (recall is close to monotone in both knobs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcompose.errors import ConfigError

__all__ = [
    "TuneReport",
    "check_target",
    "exact_topk",
    "sample_recall",
    "smallest_reaching",
    "tune",
    "write_tuned",
]

_BLOCK = 32768  # corpus rows per matmul block of the exact search
_TIE_TOL = 1e-5  # float32 dot products of unit vectors: rounding far below this


def check_target(target: Any) -> float:
    """A recall target must be a number in (0, 1]; anything else is a ConfigError."""
    ok = isinstance(target, int | float) and not isinstance(target, bool)
    if not ok or not math.isfinite(float(target)) or not 0.0 < float(target) <= 1.0:
        raise ConfigError(
            f"target recall must be in (0, 1], got {target!r}",
            hint="e.g. --target-recall 0.95 (the share of the exact 10 nearest found)",
        )
    return float(target)


@dataclass
class TuneReport:
    """The chosen ``value`` of ``param`` and the recall it gave on the sample."""

    param: str
    value: int
    recall: float
    target: float
    k: int
    sample: int
    seed: int
    count: int
    trials: list[tuple[int, float]] = field(default_factory=list)
    queries: str = "held-out"  # or "stored" (stored vectors, own row left out: optimistic)

    def record(self) -> dict[str, Any]:
        """What the store header keeps (``tuning``)."""
        return {
            "param": self.param,
            "value": self.value,
            "recall": round(self.recall, 6),
            "target": self.target,
            "k": self.k,
            "sample": self.sample,
            "seed": self.seed,
            "count": self.count,
            "queries": self.queries,
            "trials": [[v, round(r, 6)] for v, r in self.trials],
        }


def _scores(corpus: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Higher-is-better scores of every (query, corpus row): dot, or minus squared L2."""
    s = queries @ corpus.T
    if metric == "l2":
        s = 2 * s - (corpus**2).sum(1)[None, :] - (queries**2).sum(1)[:, None]
    return s


def exact_topk(
    corpus: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and higher-is-better scores of the ``k`` best rows per query, best first,
    by blocks of the corpus (a 1M x 1000 score matrix would not fit in memory)."""
    k = min(k, len(corpus))
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(corpus), _BLOCK):
        s = _scores(corpus[start : start + _BLOCK], queries, metric).astype(np.float32)
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, keep, 1)
        best_i = np.take_along_axis(cand_i, keep, 1)
    return best_i, best_s


def sample_recall(
    found: np.ndarray,
    query_rows: np.ndarray,
    kth_score: np.ndarray,
    corpus: np.ndarray,
    queries: np.ndarray,
    metric: str,
    k: int,
) -> float:
    """Mean share of the first ``k`` found rows (own row dropped; -1 = no hit) whose exact
    score reaches the exact k-th best (ties count as found)."""
    hits = 0
    for i, row in enumerate(found):
        rows = [int(r) for r in row if r >= 0 and r != query_rows[i]][:k]
        if rows:
            s = _scores(corpus[rows], queries[i : i + 1], metric)[0]
            hits += int((s >= kth_score[i] - _TIE_TOL * max(1.0, abs(kth_score[i]))).sum())
    return hits / (k * len(found))


def smallest_reaching(
    measure: Callable[[int], float], target: float, lo: int, hi: int
) -> tuple[int, float, list[tuple[int, float]]]:
    """The smallest value in [lo, hi] whose ``measure`` reaches ``target`` (doubling, then
    bisection); if none does, ``hi`` and its recall (the caller decides what that means)."""
    trials: dict[int, float] = {}

    def m(v: int) -> float:
        if v not in trials:
            trials[v] = measure(v)
        return trials[v]

    v, miss = lo, lo - 1
    while m(v) < target:
        if v >= hi:
            return hi, trials[hi], sorted(trials.items())
        miss, v = v, min(2 * v, hi)
    while v - miss > 1:  # invariant: m(miss) < target <= m(v) (miss = lo - 1: untried)
        mid = (miss + v) // 2
        if m(mid) >= target:
            v = mid
        else:
            miss = mid
    return v, trials[v], sorted(trials.items())


def tune(
    search: Callable[[np.ndarray, int, int], np.ndarray],
    ids: Sequence[str],
    corpus: np.ndarray,
    metric: str,
    param: str,
    target: float,
    lo: int,
    hi: int,
    *,
    k: int = 10,
    sample: int = 1000,
    seed: int = 0,
    queries: np.ndarray | None = None,
) -> TuneReport:
    """Tune ``param`` so that ``search(q, width, value)`` (ids; None for no hit) finds
    ``target`` of the exact ``k`` nearest stored neighbours of the sample queries:
    ``queries`` if given (never-stored vectors), else a sample of ``corpus`` (own row left
    out, searched one wider)."""
    from mmcompose.retrieval.base import RetrievalError

    target = check_target(target)
    n = len(corpus)
    rng = np.random.default_rng(seed)
    if queries is None:
        kind, kk = "stored", min(k, n - 1)
        if kk < 1:
            return TuneReport(param, lo, 1.0, target, k, 0, seed, n, [], kind)
        rows = np.sort(rng.choice(n, min(sample, n), replace=False))
        q = np.ascontiguousarray(corpus[rows])
    else:
        kind, kk = "held-out", min(k, n)
        if kk < 1:
            return TuneReport(param, lo, 1.0, target, k, 0, seed, n, [], kind)
        pick = np.sort(rng.choice(len(queries), min(sample, len(queries)), replace=False))
        q = np.ascontiguousarray(queries[pick])
        rows = np.full(len(q), -1, dtype=np.int64)  # no query is a stored row
    width = kk + 1 if kind == "stored" else kk
    truth_i, truth_s = exact_topk(corpus, q, width, metric)
    # the k-th best score among the other rows: drop each query's own row if it is there
    kth = np.empty(len(q), dtype=np.float32)
    for i, (ti, ts) in enumerate(zip(truth_i, truth_s, strict=True)):
        kth[i] = ts[ti != rows[i]][kk - 1]
    where = {s: p for p, s in enumerate(ids)}

    def measure(value: int) -> float:
        found_ids = search(q, width, value)
        found = np.array(
            [[where.get(x, -1) if x is not None else -1 for x in row] for row in found_ids],
            dtype=np.int64,
        )
        return sample_recall(found, rows, kth, corpus, q, metric, kk)

    value, recall, trials = smallest_reaching(measure, target, lo, max(lo, hi))
    if recall < target:
        raise RetrievalError(
            f"recall@{kk} {target} is out of reach: the best is {recall:.4f} at "
            f"{param}={value} (the largest this index allows)",
            hint="a compressed index (IVF-PQ) caps recall: use an HNSW or flat index, "
            "or ask for a lower --target-recall",
        )
    return TuneReport(param, value, recall, target, kk, len(q), seed, n, trials, kind)


def write_tuned(
    store: Any,
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: Sequence[Any] | None,
    target: float,
    *,
    sample: int = 1000,
    seed: int = 0,
    k: int = 10,
) -> TuneReport:
    """Add rows to a store and tune on held-out queries: a seeded sample of the rows (at most
    a tenth of them) is added last, after the tuning has used it as queries against the rest.
    (To tune before an update, pass the new vectors as ``queries`` to ``tune_recall``.)

    A batch too small to spare ten queries is stored whole and tuned on stored vectors. On an
    error the first part may be stored; ``mmcompose index`` builds its store aside, so there
    nothing is left."""
    check_target(target)
    meta = list(metadata) if metadata is not None else [None] * len(ids)
    hold = min(sample, len(ids) // 10)
    if hold < 10:
        store.add(list(ids), vectors, meta)
        return store.tune_recall(target, k=k, sample=sample, seed=seed, vectors=vectors, ids=ids)
    held = np.zeros(len(ids), dtype=bool)
    held[np.random.default_rng(seed).choice(len(ids), hold, replace=False)] = True
    rest, back = np.flatnonzero(~held), np.flatnonzero(held)
    rest_ids = [ids[r] for r in rest]
    store.add(rest_ids, vectors[rest], [meta[r] for r in rest])
    report: TuneReport = store.tune_recall(
        target, k=k, sample=sample, seed=seed, queries=vectors[back],
        vectors=vectors[rest], ids=rest_ids,
    )  # fmt: skip
    store.add([ids[r] for r in back], vectors[back], [meta[r] for r in back])
    return report
