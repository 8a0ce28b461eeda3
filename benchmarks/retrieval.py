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

HNSW tuning sweep (``--hnsw M:EFC ...``): one HNSW store per (M, efConstruction), each searched
at every ``--ef`` value (efSearch is a search-time knob, so one build serves the whole sweep),
plus what ``store.tune_recall(target, queries=...)`` picks on ``--tune-sample`` fresh queries
(another seed than the measured ones; exact reference = all stored vectors), then measured on
the held-out queries as every other row:

    python benchmarks/retrieval.py --sizes 1000000 --dim 128 --hnsw 32:200 --ef 64 128 256 \
        --out runs/bench-retrieval-hnsw.json

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


def latency_ms(store: Any, queries: np.ndarray, warmup: int) -> list[float]:
    """Single-query wall times through the public ``store.search`` (checks and id mapping
    included), after ``warmup`` untimed queries."""
    for row in queries[:warmup]:
        store.search(row, k=10)
    times = []
    for row in queries:
        t = time.perf_counter()
        store.search(row, k=10)
        times.append(1000 * (time.perf_counter() - t))
    return times


def sweep_hnsw(
    m: int, efc: int, x: np.ndarray, q: np.ndarray, truth: np.ndarray, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Build one HNSW store, then measure recall and latency at every efSearch of ``--ef``."""
    folder = Path(tempfile.mkdtemp(prefix=f"retr-hnsw{m}-{efc}-", dir=args.workdir))
    rows: list[dict[str, Any]] = []
    try:
        ids = np.char.add("v", np.arange(len(x)).astype(str)).tolist()
        params = {"M": m, "ef_construction": efc, "ef_search": args.ef[0]}
        t0 = time.perf_counter()
        store = create_store(folder / "s", x.shape[1], index="hnsw", index_params=params)
        store.add(ids, x)
        build_s = time.perf_counter() - t0
        disk = dir_size(folder) / 2**20
        batch = q[: args.batch_queries]
        for ef in args.ef:
            store.tune(ef_search=ef)
            t = time.perf_counter()
            found = store.search(batch, k=10).ids
            batch_s = time.perf_counter() - t
            times = latency_ms(store, q[: args.latency_queries], args.warmup)
            row = {
                "index": "hnsw", "n": len(x), "dim": x.shape[1], "M": m,
                "ef_construction": efc, "ef_search": ef, "build_s": round(build_s, 1),
                "recall_at_10": round(recall_at_10(found, truth), 4),
                "p50_ms": round(float(np.percentile(times, 50)), 3),
                "p95_ms": round(float(np.percentile(times, 95)), 3),
                "p99_ms": round(float(np.percentile(times, 99)), 3),
                "qps_batch": round(len(batch) / batch_s, 1),
                "disk_mb": round(disk, 1), "peak_rss_mb": round(peak_rss_mb(), 0),
                "load_avg": round(_load(), 2),
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if args.target_recall:
            tune_q = tune_queries(args, len(x))
            rows.append(_tuned(store, args, batch, truth, m, efc, build_s, tune_q))
        if args.keep:
            print(f"kept {folder / 's'}", file=sys.stderr)
        store.close()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def _tuned(
    store: Any,
    args: argparse.Namespace,
    batch: np.ndarray,
    truth: np.ndarray,
    m: int,
    efc: int,
    build_s: float,
    tune_q: np.ndarray,
) -> dict[str, Any]:
    """What the recall tuner picks on its own fresh queries, checked on the measured ones."""
    t = time.perf_counter()
    report = store.tune_recall(args.target_recall, sample=args.tune_sample, queries=tune_q)
    tune_s = time.perf_counter() - t
    store.tune()  # the recorded value, as a later search uses it
    found = store.search(batch, k=10).ids
    times = latency_ms(store, batch[: args.latency_queries], args.warmup)
    row = {
        "index": "hnsw (tuned)", "n": store.header.count, "dim": store.header.dim, "M": m,
        "ef_construction": efc, "ef_search": report.value, "build_s": round(build_s, 1),
        "tune_s": round(tune_s, 1), "sample_recall": round(report.recall, 4),
        "recall_at_10": round(recall_at_10(found, truth), 4),
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "load_avg": round(_load(), 2),
    }  # fmt: skip
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def tune_queries(args: argparse.Namespace, n: int) -> np.ndarray:
    """The tuner's queries: from the same mixture (or latents) as the measured ones, not them."""
    if args.latents:
        arr = np.load(args.latents, mmap_mode="r")
        start = n + max(args.latency_queries, args.batch_queries)
        return np.asarray(arr[start : start + args.tune_sample], np.float32)
    return clustered(args.tune_sample, args.dim, args.clusters, seed=8)


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| vectors | dim | M | efConstruction | efSearch | build s | recall@10 | p50 ms | "
        "p95 ms | p99 ms | load avg |"
    )
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ef = f"{r['ef_search']} (tuned)" if "tune_s" in r else r["ef_search"]
        lines.append(
            f"| {r['n']:,} | {r['dim']} | {r['M']} | {r['ef_construction']} | {ef} | "
            f"{r['build_s']} | {r['recall_at_10']} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {r['load_avg']} |"
        )
    return "\n".join(lines)


def _load() -> float:
    import os

    return os.getloadavg()[0]


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
    p.add_argument(
        "--hnsw",
        nargs="+",
        metavar="M:EFC",
        help="sweep mode: HNSW stores with these (M, efConstruction) pairs, searched at --ef",
    )
    p.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256], help="efSearch values")
    p.add_argument(
        "--target-recall", type=float, default=0.95, help="sweep mode: run the tuner (0 = off)"
    )
    p.add_argument("--tune-sample", type=int, default=1000, help="tuner's query sample")
    p.add_argument("--keep", action="store_true", help="keep the built stores in --workdir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "flat" not in args.indexes:
        args.indexes = ["flat", *args.indexes]  # the exact answers are the recall reference
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        x, q = load_data(args, n)
        truth = None
        if args.hnsw:  # sweep mode: exact answers from a Flat store, then the HNSW grid
            # Flat single queries cost ~0.1-0.5 s each at 1M: time only a few
            few = argparse.Namespace(
                **{**vars(args), "latency_queries": min(args.latency_queries, 50)}
            )
            flat, truth = bench_one("flat", x, q, None, few)
            rows.append(flat)
            print(json.dumps(flat), file=sys.stderr, flush=True)
            for spec in args.hnsw:
                m, efc = (int(v) for v in spec.split(":"))
                rows += sweep_hnsw(m, efc, x, q, truth, args)
            del x
            continue
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
    print(sweep_markdown([r for r in rows if "M" in r]) if args.hnsw else markdown(rows))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
