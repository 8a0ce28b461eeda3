"""Retrieval metrics as CLIP_benchmark computes them, kept per query so they get intervals
and paired tests (pure numpy/torch; the statistics are :mod:`mmcompose.bench.stats`).

Multiple captions per image (CLIP_benchmark's ``zeroshot_retrieval``): every caption is a text
query and every image an image query. Text -> image: a hit at k when the caption's own image is
among the k most similar images. Image -> text: a hit when any of the image's captions is among
the k most similar captions. Both are one rule over keys (``hits_at_k``): a gallery item is
relevant to a query when their keys are equal (the image's index for the image-caption set;
the text itself for spoken words, where several clips share one word).

Ties: the rank of a query is the number of gallery items scoring strictly above its best
relevant item, so a tie counts in the query's favour (as :func:`mmcompose.align.evaluate.
recall_at_k`; CLIP_benchmark's ``topk`` breaks ties by index, which only matters for exactly
equal scores).

Intervals (``summarize``): the headline one is the two-level bootstrap over queries and seeds
(:func:`~mmcompose.bench.stats.accuracy_interval`: each replicate redraws the queries, the same
draw for every seed, and the seeds); ``seed_interval`` is the t-interval of the per-seed
recalls (seed-to-seed spread only). Paired comparisons of two variants on the same queries and
seeds (``compare``): the paired bootstrap of the recall difference (and its p), and the exact
McNemar test on the first seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmcompose.bench.stats import accuracy_interval, mcnemar_exact, paired_bootstrap

__all__ = ["KS", "compare", "hits_at_k", "ranks", "recall", "summarize"]

KS = (1, 5, 10)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def ranks(
    sim: Tensor | np.ndarray,
    query_keys: Sequence[int] | np.ndarray,
    gallery_keys: Sequence[int] | np.ndarray,
) -> np.ndarray:
    """(Q,) 0-based rank of each query's best relevant gallery item in a (Q, G) similarity
    matrix; a query without any relevant item is an error (it would silently lower recall)."""
    s = torch.as_tensor(np.asarray(sim) if not isinstance(sim, Tensor) else sim).float()
    qk = torch.as_tensor(np.asarray(query_keys))
    gk = torch.as_tensor(np.asarray(gallery_keys))
    if s.shape != (len(qk), len(gk)):
        raise ValueError(f"similarity {tuple(s.shape)} does not match {len(qk)} x {len(gk)} keys")
    relevant = qk[:, None] == gk[None, :]
    if not bool(relevant.any(dim=1).all()):
        missing = int((~relevant.any(dim=1)).sum())
        raise ValueError(f"{missing} queries have no relevant item in the gallery")
    best = s.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    return (s > best).sum(dim=1).numpy()


def hits_at_k(
    sim: Tensor | np.ndarray,
    query_keys: Sequence[int] | np.ndarray,
    gallery_keys: Sequence[int] | np.ndarray,
    ks: Sequence[int] = KS,
) -> np.ndarray:
    """(Q, len(ks)) uint8: 1 where the query has a relevant item in its top k."""
    r = ranks(sim, query_keys, gallery_keys)
    return np.stack([(r < k) for k in ks], axis=1).astype(np.uint8)


def recall(hits: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@k in percent from (Q, len(ks)) or (seeds, Q, len(ks)) hits (mean over all)."""
    h = np.asarray(hits)
    return {f"R@{k}": float(h[..., j].mean() * 100) for j, k in enumerate(ks)}


def _seed_interval(per_seed: np.ndarray, level: float) -> tuple[float, float]:
    n = len(per_seed)
    if n < 2:
        return math.nan, math.nan
    if abs(level - 0.95) > 1e-9:
        raise ValueError("the seed t-interval is tabulated for level 0.95 only")
    t = _T975.get(n - 1, 1.96 + 2.4 / (n - 1))  # beyond the table: close to the t quantile
    mean, sd = float(per_seed.mean()), float(per_seed.std(ddof=1))
    half = t * sd / math.sqrt(n)
    return mean - half, mean + half


def summarize(
    hits: np.ndarray,
    ks: Sequence[int] = KS,
    level: float = 0.95,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per k: recall (percent), the queries x seeds bootstrap interval, the per-seed recalls and
    their t-interval. ``hits``: (seeds, queries, len(ks)) from the same queries every seed."""
    h = np.asarray(hits)
    if h.ndim == 2:
        h = h[None]
    out: dict[str, dict[str, Any]] = {}
    for j, k in enumerate(ks):
        ci = accuracy_interval(h[:, :, j], level, n_boot=n_boot, seed=seed)
        per_seed = h[:, :, j].mean(axis=1) * 100
        lo, hi = _seed_interval(per_seed, level)
        out[f"R@{k}"] = {
            "mean": ci.estimate * 100,
            "low": ci.low * 100,
            "high": ci.high * 100,
            "method": ci.method,
            "per_seed": [float(v) for v in per_seed],
            "seed_low": lo,
            "seed_high": hi,
        }
    return out


def compare(
    hits_a: np.ndarray,
    hits_b: np.ndarray,
    k_index: int = 0,
    level: float = 0.95,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Variant a minus variant b at one k, paired on the same queries and seeds (percent
    points): the bootstrap difference, its interval and p, and the first seed's McNemar p."""
    a = np.asarray(hits_a)[..., k_index]
    b = np.asarray(hits_b)[..., k_index]
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape:
        raise ValueError(f"paired hits must have one shape, got {a.shape} and {b.shape}")
    pb = paired_bootstrap(a, b, level, n_boot=n_boot, seed=seed)
    mc = mcnemar_exact(a[0], b[0])
    return {
        "difference": pb.difference * 100,
        "low": pb.low * 100,
        "high": pb.high * 100,
        "p": pb.p,
        "mcnemar_p_seed0": mc.p,
        "a_only_seed0": mc.a_only,
        "b_only_seed0": mc.b_only,
    }
