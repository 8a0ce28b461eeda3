"""Accuracy intervals and paired comparisons from per-item correctness (0/1 per test item).

Inputs are correctness vectors: shape ``(items,)`` for one run, or ``(seeds, items)`` for
several training seeds scored on the same items (row ``s`` of two models is the same seed:
the reproduction trains every model of a seed from that seed, so seeds pair as items do).

Which interval and why:

- One run: the Wilson score interval. It keeps close to its nominal coverage for the small
  test sets and the accuracies near 0 or 1 seen here, where the normal ("Wald") interval is
  too narrow and can leave [0, 1].
- Several seeds: a two-level percentile bootstrap over items and seeds (each replicate draws
  items with replacement, the same draw for every seed, and seeds with replacement). The
  accuracy a paper reports varies with both the test items drawn and the training seed; a
  t-interval over per-seed accuracies sees only the seeds (3 seeds: 2 degrees of freedom,
  t = 4.3) and claims no uncertainty at all when the seeds agree on a small test set.
- Paired comparisons of two models on the same items: the exact McNemar test (a two-sided
  binomial test on the discordant items, deterministic, for one run) and the paired
  bootstrap of the accuracy difference (seeded; one run or several seeds), whose p-value is
  two-sided: the share of replicates at least as far from the observed difference as that
  difference is from 0 (the bootstrap distribution shifted to the null of no difference).
- Retention (a composition's accuracy on a source's own modality divided by the source's):
  the paired percentile bootstrap of the ratio, and optionally the one-sided p-value of
  "the ratio is below a threshold" (the share of replicates below it), which is below 0.05
  exactly when the one-sided 95% lower bound is above the threshold.

Bootstrap sums are counted in integers, so the p-values are exact functions of the draws
(no float ties) and a seed reproduces every number.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "Interval",
    "McNemar",
    "PairedBootstrap",
    "Retention",
    "accuracy_interval",
    "mcnemar_exact",
    "paired_bootstrap",
    "retention",
    "wilson_interval",
]

N_BOOT = 10_000
_CHUNK = 2_000_000  # resampled entries per bootstrap chunk (bounds memory at ~16 MB)

ArrayLike = Sequence[float] | Sequence[Sequence[float]] | np.ndarray


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    method: str  # "wilson" or "bootstrap (items x seeds)"


@dataclass(frozen=True)
class McNemar:
    a_only: int  # items a gets right and b wrong
    b_only: int
    p: float  # two-sided
    difference: float  # accuracy of a minus accuracy of b


@dataclass(frozen=True)
class PairedBootstrap:
    difference: float  # accuracy of a minus accuracy of b
    low: float
    high: float
    p: float  # two-sided, for "no difference"
    n_boot: int
    seed: int


@dataclass(frozen=True)
class Retention:
    ratio: float  # accuracy of the composition / accuracy of the source
    low: float
    high: float
    p_below: float | None  # one-sided p for "ratio < threshold" (None: no threshold given)
    threshold: float | None


def correctness(x: ArrayLike) -> np.ndarray:
    """``x`` as an int64 array (seeds, items) of 0/1; a 1-D vector is one seed."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"correctness must be (items,) or (seeds, items), got shape {arr.shape}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("correctness values must be 0 or 1")
    return arr.astype(np.int64)


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion ``successes / n``."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z, p = _z(level), successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _resampled_sums(
    arrays: Sequence[np.ndarray], n_boot: int, seed: int
) -> Iterator[list[np.ndarray]]:
    """Per chunk of replicates: each array's total correct under the same draw of items and
    of seeds (all arrays (seeds, items) of one shape). Totals, not means: integers."""
    if n_boot <= 0:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    s, n = arrays[0].shape
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK // (s * n))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        items = rng.integers(0, n, size=(b, n))
        seeds = rng.integers(0, s, size=(b, s)) if s > 1 else np.zeros((b, 1), np.int64)
        out = []
        for arr in arrays:
            per_seed = arr[:, items].sum(axis=2)  # (seeds, b): each seed on the drawn items
            out.append(np.take_along_axis(per_seed, seeds.T, axis=0).sum(axis=0))
        yield out


def _bootstrap_totals(arrays: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """(len(arrays), n_boot) int64 resampled totals."""
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"paired inputs must have one shape (seeds, items), got {sorted(shapes)}")
    chunks = list(_resampled_sums(arrays, n_boot, seed))
    return np.stack([np.concatenate([c[k] for c in chunks]) for k in range(len(arrays))])


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    _z(level)  # validates level
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def accuracy_interval(
    correct: ArrayLike, level: float = 0.95, *, n_boot: int = N_BOOT, seed: int = 0
) -> Interval:
    """Accuracy (the mean over seeds and items) and its interval: Wilson for one run, the
    bootstrap over items and seeds for several (module docstring: why)."""
    arr = correctness(correct)
    s, n = arr.shape
    total = int(arr.sum())
    if s == 1:
        return Interval(total / n, *wilson_interval(total, n, level), "wilson")
    means = _bootstrap_totals([arr], n_boot, seed)[0] / (s * n)
    return Interval(total / (s * n), *_percentiles(means, level), "bootstrap (items x seeds)")


def mcnemar_exact(a: ArrayLike, b: ArrayLike) -> McNemar:
    """Exact two-sided McNemar test of two models on the same items (one run each): under
    "equally accurate", each discordant item is a fair coin, so p = min(1, 2 P[X <= min]) for
    X ~ Binomial(discordant, 1/2) (equal to scipy's ``binomtest``, two-sided)."""
    x, y = correctness(a), correctness(b)
    if x.shape != y.shape or x.shape[0] != 1:
        raise ValueError(
            f"McNemar needs two vectors over the same items, got {x.shape} and {y.shape}"
        )
    a_only = int(((x == 1) & (y == 0)).sum())
    b_only = int(((x == 0) & (y == 1)).sum())
    m = a_only + b_only
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1))
    p = min(1.0, 2 * tail / 2**m) if m else 1.0
    return McNemar(a_only, b_only, p, (a_only - b_only) / x.shape[1])


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    level: float = 0.95,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> PairedBootstrap:
    """The accuracy difference a - b on the same items (and seeds), its percentile interval,
    and the two-sided bootstrap p-value for "no difference" (module docstring)."""
    x, y = correctness(a), correctness(b)
    tx, ty = _bootstrap_totals([x, y], n_boot, seed)
    observed = int(x.sum() - y.sum())  # difference of totals: exact integers
    shifted = np.abs((tx - ty) - observed)
    p = (1 + int((shifted >= abs(observed)).sum())) / (n_boot + 1)
    scale = x.size
    lo, hi = _percentiles((tx - ty) / scale, level)
    return PairedBootstrap(observed / scale, lo, hi, min(1.0, p), n_boot, seed)


def retention(
    composed: ArrayLike,
    source: ArrayLike,
    level: float = 0.95,
    *,
    threshold: float | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Retention:
    """How much of a source's accuracy on its own modality a composition keeps: the ratio of
    accuracies on the same items (and seeds), its paired bootstrap interval and, with a
    ``threshold``, the one-sided p-value for "ratio < threshold". Replicates where the source
    gets nothing right have no ratio and count as below any threshold (conservative)."""
    c, s = correctness(composed), correctness(source)
    tc, ts = _bootstrap_totals([c, s], n_boot, seed)
    ratio = float(c.sum() / s.sum()) if s.sum() else math.nan
    reps = np.where(ts > 0, tc / np.maximum(ts, 1), np.nan)
    defined = reps[~np.isnan(reps)]
    lo, hi = _percentiles(defined, level) if defined.size else (math.nan, math.nan)
    p_below = None
    if threshold is not None:
        below = int((np.isnan(reps) | (reps < threshold)).sum())
        p_below = (1 + below) / (n_boot + 1)
    return Retention(ratio, lo, hi, p_below, threshold)
