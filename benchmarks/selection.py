"""Magnitude selection: the full sort (before) against the O(n) threshold, one large tensor.

The tensor is the benchmark merge's largest, a 32000x1024 embedding: bf16 ``base`` and two
fine-tunes ``base + noise``, so |tau| has few distinct values and every threshold falls inside
a large group of equal magnitudes (the case the replay of torch's sort exists for). Timed,
interleaved, median of ``--repeats``: the TIES selection of one task vector (``magnitude``,
density 0.5), breadcrumbs' slice (density 0.5, gamma 0.01), and a whole ``ties`` merge of the
two (densities 0.5 / 0.3) with each selection; results are checked bit for bit.

    python benchmarks/selection.py --repeats 5 --json benchmarks/selection.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mmcompose.compose import selection
from mmcompose.compose.methods import ties


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=32000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (args.rows, 1024)
    base32 = torch.randn(shape, generator=g) * 0.02
    fts = [(base32 + 0.002 * torch.randn(shape, generator=g)).bfloat16() for _ in range(2)]
    base = base32.bfloat16()
    tau = fts[0].float() - base.float()
    n = tau.numel()
    skip = n - n // 2 - n // 100
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "magnitude (ties), one task vector": lambda: selection.magnitude_mask(
            tau, 0, n // 2, descending=True
        ),
        "magnitude_outliers (breadcrumbs)": lambda: selection.magnitude_mask(
            tau, skip, skip + n // 2, descending=False
        ),
        "ties merge, 2 models": lambda: ties(fts, [0.5, 0.5], base, density=[0.5, 0.3]),
    }
    rows = []
    for name, fn in cases.items():
        runs: dict[str, list[tuple[float, float]]] = {"sort": [], "threshold": []}
        outs = {}
        for _ in range(args.repeats):
            for mode in runs:  # interleaved
                selection.SELECTION = mode  # type: ignore[assignment]
                wall, cpu, outs[mode] = _timed(fn)
                runs[mode].append((wall, cpu))
        selection.SELECTION = "threshold"
        same = torch.equal(_bits(outs["sort"]), _bits(outs["threshold"]))
        med = {m: [statistics.median(x[i] for x in r) for i in (0, 1)] for m, r in runs.items()}
        rows.append({"case": name, "median_wall_cpu_s": med, "runs": runs, "bit_identical": same})
        print(
            f"{name:36s} sort {med['sort'][0]:6.2f} s (cpu {med['sort'][1]:5.2f})  "
            f"threshold {med['threshold'][0]:6.2f} s (cpu {med['threshold'][1]:5.2f})  "
            f"{med['sort'][0] / med['threshold'][0]:4.1f}x  identical {same}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
