"""Retrieval benchmark: FAISS Flat / HNSW / IVF-PQ stores over 100k and 1M vectors.

For every (size, index) it builds a store through the public API (``create_store`` + one
atomic ``add``, so build time includes writing and hashing the files), then measures
single-query latency p50/p99 (after a warm-up), batched throughput (queries/s), store size on
disk, peak RSS, and recall@10 against exact search (ground truth = the Flat store's answers).

Data: deterministic clustered Gaussians (``--clusters`` centres, dim 384 by default, seeded),
queries drawn from the same mixture but never stored. ``--latents FILE.npy`` uses real stored
latents instead (rows beyond the stored ones become queries).

    python benchmarks/retrieval.py                                  # 100k and 1M, ~10 min
    python benchmarks/retrieval.py --sizes 100000 --indexes flat hnsw --out /tmp/r.json

Exact search over 1M vectors costs ~0.4 GFLOP per query, so latency uses ``--latency-queries``
(default 100) single queries and throughput one batch of ``--batch-queries`` (default 1000).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.retrieval import create_store

INDEX_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 16, "ef_construction": 40, "ef_search": 64},
    "ivfpq": {"nlist": 1024, "m": 48, "nbits": 8, "nprobe": 32, "train_size": 50_000},
}


def clustered(n: int, dim: int, clusters: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """``n`` vectors around ``clusters`` fixed centres; the same seed gives the same data."""
    centres = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        which = rng.integers(0, clusters, stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = centres[which] + 0.6 * noise
    return out


def load_data(args: argparse.Namespace, n: int) -> tuple[np.ndarray, np.ndarray]:
    nq = max(args.latency_queries, args.batch_queries)
    if args.latents:
        arr = np.load(args.latents, mmap_mode="r")
        if len(arr) < n + nq:
            raise SystemExit(f"{args.latents} has {len(arr)} rows; need {n + nq}")
        return np.asarray(arr[:n], np.float32), np.asarray(arr[n : n + nq], np.float32)
    return (
        clustered(n, args.dim, args.clusters, seed=n),
        clustered(nq, args.dim, args.clusters, seed=7),
    )


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))


def bench_one(
    index: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray | None, args: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray]:
    folder = Path(tempfile.mkdtemp(prefix=f"retr-{index}-", dir=args.workdir))
    try:
        ids = np.char.add("v", np.arange(len(x)).astype(str)).tolist()
        t0 = time.perf_counter()
        store = create_store(
            folder / "s", x.shape[1], index=index, index_params=INDEX_PARAMS[index]
        )
        store.add(ids, x)
        build_s = time.perf_counter() - t0
        lat = q[: args.latency_queries]
        for row in lat[: args.warmup]:
            store.search(row, k=10)
        times = []
        for row in lat:
            t = time.perf_counter()
            store.search(row, k=10)
            times.append(time.perf_counter() - t)
        batch = q[: args.batch_queries]
        t = time.perf_counter()
        found = store.search(batch, k=10).ids
        batch_s = time.perf_counter() - t
        row = {
            "index": index,
            "n": len(x),
            "build_s": round(build_s, 2),
            "p50_ms": round(1000 * float(np.percentile(times, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 3),
            "qps_batch": round(len(batch) / batch_s, 1),
            "disk_mb": round(dir_size(folder) / 2**20, 1),
            "peak_rss_mb": round(peak_rss_mb(), 0),
            "recall_at_10": 1.0 if truth is None else round(recall_at_10(found, truth), 4),
            "params": store.header.index_params,
        }
        return row, found
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| vectors | index | build s | p50 ms | p99 ms | batch q/s | disk MB | peak RSS MB | recall@10 |"
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['index']} | {r['build_s']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['qps_batch']:,} | {r['disk_mb']:,} | {r['peak_rss_mb']:,.0f} | {r['recall_at_10']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--indexes", nargs="+", default=["flat", "hnsw", "ivfpq"], choices=INDEX_PARAMS)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--batch-queries", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--latents", type=Path, help="a (n, dim) .npy of real stored latents")
    p.add_argument("--workdir", type=Path, default=None, help="where stores are built")
    p.add_argument("--out", type=Path, default=Path("runs/bench-retrieval.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "flat" not in args.indexes:
        args.indexes = ["flat", *args.indexes]  # the exact answers are the recall reference
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        x, q = load_data(args, n)
        truth = None
        for index in args.indexes:
            row, found = bench_one(index, x, q, truth, args)
            truth = found if index == "flat" else truth
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del x
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": _cpus(),
            "platform": platform.platform(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
