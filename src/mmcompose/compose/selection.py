"""Selection by magnitude in O(n), with the same result as the sort it replaces.

TIES keeps ``torch.argsort(|tau|, descending=True)[:k]`` and breadcrumbs keeps
``torch.sort(|tau|).indices[start:stop]``: that is how mergekit 0.1.5 selects, and how
mmcompose did. Both sort the whole tensor, O(n log n), only to learn which entries fall in
one slice of the order. Here a selection pass (``np.partition``, O(n)) finds the values at
the slice's ends, which decides every entry whose magnitude differs from them.

Entries *equal* to an end value (common in bf16 task vectors) can be split by the slice, and
which of them it keeps is where the sort leaves them: torch's sort is not stable. On CPU it is
libstdc++'s ``std::sort``: introsort, median-of-three Hoare partitions down to 16 elements,
then insertion sort. ``_replay`` performs those partitions with numpy, only on the part that
holds a slice end (O(n) on average), so it keeps the same tied entries. The replay is checked
against ``torch.sort`` once per process on a tie-heavy probe; where it disagrees (a torch built
with another sort), on other devices, with NaN or infinite magnitudes, and where introsort
would fall back to heapsort (its depth limit), the tensor is sorted as before.

``SELECTION = "sort"`` restores the sort everywhere (benchmarks compare the two).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from mmcompose.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")  # imported at the first merge, not with the schema

__all__ = [
    "SELECTION",
    "magnitude_keep",
    "magnitude_mask",
    "outlier_slice",
    "sort_mask",
    "top_k_slice",
]

SELECTION: Literal["threshold", "sort"] = "threshold"

_LEAF = 16  # libstdc++ _S_threshold: introsort leaves ranges this small to insertion sort
_SWAP_CHUNK = 1 << 22  # positions per chunk of a partition's swaps (32 MiB of int64)
_BLOCK = 4096  # bisections on counts stop at spans this small, then look inside


def magnitude_mask(tau: Tensor, start: int, stop: int, *, descending: bool) -> Tensor:
    """1 where ``torch.sort(|tau|, descending=...).indices[start:stop]`` points, else 0.

    Flat (1-D), in tau's dtype, so ``tau.view(-1) * mask`` applies it.
    """
    w = tau.detach().reshape(-1).abs()  # a fresh buffer: scratch, then the result
    if SELECTION == "sort":
        return w.copy_(sort_mask(w, start, stop, descending))
    keep = _threshold_mask(w, start, stop, descending)
    if keep is None:  # the replay gave up, having rearranged w: sort the magnitudes anew
        keep = sort_mask(tau.detach().reshape(-1).abs(), start, stop, descending)
    return w.copy_(keep)


def top_k_slice(n: int, density: float) -> tuple[int, int, bool]:
    """TIES' slice of the order: the ``max(1, int(density * n))`` largest |tau| (mergekit keeps
    at least one). Returns (start, stop, descending) for :func:`magnitude_mask`."""
    return 0, max(1, int(density * n)), True


def outlier_slice(n: int, density: float, gamma: float) -> tuple[int, int, bool]:
    """Breadcrumbs' slice: the ``density`` fraction just below the ``gamma`` fraction of
    largest |tau| (fewer outliers dropped when density + gamma exceeds 1, as in mergekit)."""
    keep, top = int(density * n), int(gamma * n)
    skip = max(0, n - keep - top)
    return skip, skip + keep, False


def magnitude_keep(
    w: Tensor, start: int, stop: int, *, descending: bool, refill: Callable[[Tensor], None]
) -> Tensor:
    """:func:`magnitude_mask` as a flat boolean tensor, with ``w`` (holding ``|tau|``, flat) as
    the only tensor-sized float buffer: the selection partitions it in place, and
    ``refill(w)`` must write ``|tau|`` into it again (an O(n) pass over the inputs, cheaper
    than a second buffer on an embedding matrix). ``w`` is left rearranged."""
    if SELECTION == "sort":
        return sort_mask(w, start, stop, descending)
    keep = _threshold_mask(w, start, stop, descending, refill)
    if keep is None:
        refill(w)
        keep = sort_mask(w, start, stop, descending)
    return keep


def sort_mask(w: Tensor, start: int, stop: int, descending: bool) -> Tensor:
    """The reference: sort all of ``w`` and mark the slice (what mergekit does)."""
    keep = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    keep[torch.sort(w.reshape(-1), descending=descending).indices[start:stop]] = True
    return keep


def _threshold_mask(
    w: Tensor,
    start: int,
    stop: int,
    descending: bool,
    refill: Callable[[Tensor], None] | None = None,
) -> Tensor | None:
    """The slice's mask; None if the replay gave up after rearranging ``w`` (a scratch). With
    ``refill``, the order statistics partition ``w`` itself, and ``refill`` restores it."""
    n = w.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop or (start == 0 and stop == n):
        return torch.full((n,), start < stop, dtype=torch.bool, device=w.device)
    # The slice's first and last positions in the order, where they are not the order's ends.
    first, last = start > 0, stop < n
    ranks = [start] * first + [stop - 1] * last
    stats = _order_stats(w, [n - 1 - q if descending else q for q in ranks], refill is not None)
    if refill is not None and stats is not None:
        refill(w)
    if stats is None:  # NaN, inf, or neither float32 nor float64
        return sort_mask(w, start, stop, descending)
    after, before = (torch.lt, torch.gt) if descending else (torch.gt, torch.lt)
    keep: Tensor | None = None
    if first:  # strictly after the first position's value
        keep = after(w, stats[0][0])
    if last:  # strictly before the last position's value
        inside = before(w, stats[-1][0])
        keep = inside if keep is None else keep.logical_and_(inside)
    assert keep is not None
    ties: list[float] = []
    for v, n_less, n_eq in dict.fromkeys(stats):  # one group per distinct value at an end
        at = n - n_less - n_eq if descending else n_less  # the group's first position
        kept = min(stop, at + n_eq) - max(start, at)
        if kept == n_eq:
            keep.logical_or_(w == v)
        elif kept > 0:
            ties.append(v)
    if not ties:
        return keep
    if w.device.type != "cpu" or not _replay_matches_torch():
        return sort_mask(w, start, stop, descending)
    chosen = _replay(w.numpy(), start, stop, descending, ties)
    if chosen is None:  # introsort's depth limit: heapsort, which the replay does not follow
        return None
    keep[torch.from_numpy(chosen)] = True
    return keep


# ---------------------------------------------------------------- order statistics


def _order_stats(
    w: Tensor, ranks: Sequence[int], in_place: bool = False
) -> list[tuple[float, int, int]] | None:
    """For each ascending rank: (value there, #entries below it, #entries equal to it).

    One ``np.partition`` (introselect, O(n)) on CPU, ``kthvalue`` elsewhere; on CPU it
    partitions a copy of ``w``, or ``w`` itself if ``in_place`` (the counts do not depend on
    the order). None if ``w`` holds NaN or inf (the sort handles those; ``w`` is untouched
    then) or is not float32/float64.
    """
    if w.dtype not in (torch.float32, torch.float64):
        return None
    if w.device.type == "cpu":
        x = w.numpy()
        if not np.isfinite(x.max()):  # NaN propagates through max
            return None
        part = x if in_place else x.copy()
        done = 0  # part[:done] is settled (one kth at a time: numpy's multi-kth is slower)
        for r in sorted(set(ranks)):
            part[done:].partition(r - done)
            done = r + 1
        values = [part[r] for r in ranks]
        return [
            (float(v), int(np.count_nonzero(part < v)), int(np.count_nonzero(part == v)))
            for v in values
        ]
    if not bool(torch.isfinite(w).all()):
        return None
    values = [torch.kthvalue(w, r + 1).values for r in ranks]
    return [
        (float(v), int(torch.count_nonzero(w < v)), int(torch.count_nonzero(w == v)))
        for v in values
    ]


# ---------------------------------------------------------------- replaying std::sort


def _replay(
    x: np.ndarray, start: int, stop: int, descending: bool, ties: Sequence[float]
) -> np.ndarray | None:
    """Indices of the entries valued in ``ties`` that ``std::sort`` leaves in [start, stop).

    Follows ``std::__introsort_loop`` into every range that holds a slice end, rearranging
    ``x`` (a scratch) as the sort does, with the entries' indices alongside. A range that
    holds no slice end is settled: if it lies inside the slice, its tied entries are kept. The
    values of a range lie in [lo, hi] (its ancestors' pivots), which settles most ranges
    without a look. None where a range over the leaf size reaches the depth limit (introsort
    heapsorts it).
    """
    n = x.size
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    bufs = (np.empty(n, dtype=bool), np.empty(n, dtype=bool))
    ends = [q for q in (start, stop) if 0 < q < n]
    tie_values = np.array(ties, dtype=x.dtype)
    found: list[np.ndarray] = []

    def must_sort(a: int, b: int) -> bool:
        return any(a < q < b for q in ends)

    def holds_kept_ties(a: int, b: int, v_lo: float, v_hi: float) -> bool:
        return start <= a and b <= stop and any(v_lo <= t <= v_hi for t in ties)

    stack = [(0, n, 2 * (n.bit_length() - 1), -math.inf, math.inf)]
    while stack:
        a, b, depth, v_lo, v_hi = stack.pop()
        part, ids = x[a:b], idx[a:b]
        if not must_sort(a, b):  # pushed only because it holds kept ties
            found.append(ids[np.isin(part, tie_values)])
            continue
        if b - a <= _LEAF:  # insertion sort, which is stable
            order = np.argsort(-part if descending else part, kind="stable")
            order = order[max(start, a) - a : min(stop, b) - a]
            found.append(ids[order][np.isin(part[order], tie_values)])
            continue
        if depth == 0:
            return None
        m = _median_to_front(part, descending)
        ids[0], ids[m] = ids[m], ids[0]
        pivot = float(part[0])
        plan = _plan_partition(part, descending, bufs)
        if plan is None:
            return None
        cut, pairs = plan
        halves = [  # positions and value bounds of the two halves, left first
            (a, a + cut, (pivot, v_hi) if descending else (v_lo, pivot)),
            (a + cut, b, (v_lo, pivot) if descending else (pivot, v_hi)),
        ]
        need = [must_sort(h0, h1) or holds_kept_ties(h0, h1, *iv) for h0, h1, iv in halves]
        for lpos, rpos in pairs():
            for arr in (part, ids):
                _swap(arr[1:], lpos, rpos, need)
        for (h0, h1, (h_lo, h_hi)), wanted in zip(halves[::-1], need[::-1], strict=True):
            if wanted:  # the halves are disjoint: the order they are done in does not matter
                stack.append((h0, h1, depth - 1, h_lo, h_hi))
    return np.concatenate(found).astype(np.int64) if found else _EMPTY


def _plan_partition(
    vals: np.ndarray, descending: bool, bufs: tuple[np.ndarray, np.ndarray]
) -> tuple[int, Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]] | None:
    """``std::__unguarded_partition`` of vals[1:] around the pivot vals[0], swaps not yet made.

    The left scan stops at entries not before the pivot (L_0 < L_1 < ...), the right one at
    entries not after it (R_0 > R_1 > ...); they swap L_i with R_i while L_i < R_i. Returns
    the cut (start of the right half, in vals) and the swapped positions (in vals[1:]) as
    chunks of pairs (a quarter of a large range swaps: whole position arrays would be twice
    the range's size in int64), or None if the scans do not meet as they must (a bug guard).
    """
    pivot = vals[0]
    s = vals[1:]
    left, right = bufs[0][: s.size], bufs[1][: s.size]
    if descending:  # the order is "greater first"
        np.less_equal(s, pivot, out=left)
        np.greater_equal(s, pivot, out=right)
    else:
        np.greater_equal(s, pivot, out=left)
        np.less_equal(s, pivot, out=right)
    n_l, n_r = int(np.count_nonzero(left)), int(np.count_nonzero(right))
    # swaps = max over x of min(#L before x, #R from x), where #L - #R rises: bisect for the
    # crossing (counting only the halved span each step), then look inside the last span
    lo, hi, l_lo, r_lo = 0, s.size, 0, n_r
    while hi - lo > _BLOCK:
        mid = (lo + hi) // 2
        l_mid = l_lo + int(np.count_nonzero(left[lo:mid]))
        r_mid = r_lo - int(np.count_nonzero(right[lo:mid]))
        if l_mid >= r_mid:
            hi = mid
        else:
            lo, l_lo, r_lo = mid, l_mid, r_mid
    local_l = l_lo + np.concatenate(([0], np.cumsum(left[lo:hi])))
    local_r = r_lo - np.concatenate(([0], np.cumsum(right[lo:hi])))
    swaps = int(np.minimum(local_l, local_r).max())
    if swaps == 0:
        return 1 + _nth_true(left, 1), lambda: iter(())
    r_last = _nth_true(right, n_r - swaps + 1)  # R_{swaps-1}
    cut = r_last
    if swaps < n_l:  # the left scan's next stop, L_swaps, is the cut if it comes first
        cut = min(cut, _nth_true(left, swaps + 1))
    if np.count_nonzero(left[:cut]) != swaps or np.count_nonzero(right[r_last:]) != swaps:
        return None
    return 1 + cut, functools.partial(_swap_pairs, left, right, cut, r_last)


def _swap_pairs(
    left: np.ndarray, right: np.ndarray, cut: int, r_last: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(L_i, R_i) in chunks: the i-th set entry of ``left[:cut]`` with the i-th of
    ``right[r_last:]`` counted from its end. The pairs are disjoint (every L_i lies before
    ``cut``, every R_i from ``r_last`` on), so swapping chunk by chunk swaps them all."""
    chunk = _SWAP_CHUNK
    r_hi, r_buf = right.size, _EMPTY
    for a in range(0, cut, chunk):
        lpos = np.flatnonzero(left[a : min(cut, a + chunk)]) + a
        while r_buf.size < lpos.size:
            r_lo = max(r_last, r_hi - chunk)
            r_buf = np.concatenate([r_buf, np.flatnonzero(right[r_lo:r_hi])[::-1] + r_lo])
            r_hi = r_lo
        yield lpos, r_buf[: lpos.size]
        r_buf = r_buf[lpos.size :]


_EMPTY = np.empty(0, dtype=np.int64)


def _swap(vals: np.ndarray, lpos: np.ndarray, rpos: np.ndarray, need: Sequence[bool]) -> None:
    """Exchange vals at lpos[i] and rpos[i], writing only the halves still to be read."""
    if lpos.size == 0:
        return
    old = vals[lpos] if need[1] else None
    if need[0]:
        vals[lpos] = vals[rpos]
    if need[1]:
        vals[rpos] = old


def _median_to_front(vals: np.ndarray, descending: bool) -> int:
    """``std::__move_median_to_first(first, first + 1, mid, last - 1)``; returns where from."""
    n = vals.size
    a, b, c = 1, n // 2, n - 1
    va, vb, vc = vals[a], vals[b], vals[c]

    def comp(x: float, y: float) -> bool:
        return x > y if descending else x < y

    if comp(va, vb):
        m = b if comp(vb, vc) else c if comp(va, vc) else a
    elif comp(va, vc):
        m = a
    elif comp(vb, vc):
        m = c
    else:
        m = b
    vals[0], vals[m] = vals[m], vals[0]
    return m


def _nth_true(mask: np.ndarray, k: int) -> int:
    """Position of the k-th (1-based) True: bisect on counts, then look in one block."""
    lo, hi, below = 0, mask.size, 0  # invariant: mask[:lo] holds ``below`` < k Trues
    while hi - lo > _BLOCK:
        mid = (lo + hi) // 2
        c = below + int(np.count_nonzero(mask[lo:mid]))
        if c >= k:
            hi = mid
        else:
            lo, below = mid, c
    return lo + int(np.flatnonzero(mask[lo:hi])[k - below - 1])


@functools.cache
def _replay_matches_torch() -> bool:
    """Whether this torch's CPU sort is the introsort ``_replay`` follows (checked once)."""
    g = torch.Generator().manual_seed(0)
    for n, distinct in ((5000, 40), (1500, 7), (40, 3)):
        w = torch.randint(0, distinct, (n,), generator=g).float()
        for descending, start, stop in ((True, 0, n // 3), (False, n // 5, n - n // 7)):
            ranked = torch.sort(w, descending=descending).values
            ties = sorted({float(ranked[start]), float(ranked[stop - 1])})
            chosen = _replay(w.numpy().copy(), start, stop, descending, ties)
            if chosen is None:
                return False
            got = (w > ties[0]) & (w < ties[-1])
            got[torch.from_numpy(chosen)] = True
            if not torch.equal(got, sort_mask(w, start, stop, descending)):
                return False
    return True
