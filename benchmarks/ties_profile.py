"""Where a ties merge of one large tensor spends its time (issue 18, part 2).

One 32000x1024 bf16 tensor (a scaled embedding), a base and two fine-tunes (base + small
noise), density 0.5. Times, best of ``--repeats``: the whole streamed sign election, the same
without sparsifying (pass 2 alone: tau recomputed per block, masked, elected), and ``linear``
on the same inputs for scale; then a cProfile of one streamed run, largest self time first.

    python benchmarks/ties_profile.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable

import torch

from mmcompose.compose import election
from mmcompose.compose import methods as M


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="profile rows shown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.rows * args.cols
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    fts = [(base.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16) for _ in "ab"]
    kw = dict(
        densities=[0.5, 0.5], gammas=[0.01, 0.01], rescale=False, consensus="sum",
        semantics="mergekit", normalize=True, lambda_=1.0, work=torch.float32,
        dtype=torch.bfloat16, block=M.BLOCK,
    )  # fmt: skip

    def ties() -> object:
        return election.streamed_disjoint(fts, base, [0.5, 0.5], sparsify="magnitude", **kw)

    def pass2() -> object:
        return election.streamed_disjoint(fts, base, [0.5, 0.5], sparsify="none", **kw)

    def linear() -> object:
        return M.MERGE_METHODS.get("linear").fn(fts, [0.5, 0.5])

    print(f"{args.rows}x{args.cols} bf16, 2 fine-tunes, {torch.get_num_threads()} threads")
    for label, fn in (("ties (streamed)", ties), ("pass 2 alone", pass2), ("linear", linear)):
        print(f"  {label:18s} {best(fn, args.repeats):.3f} s")
    prof = cProfile.Profile()
    prof.runcall(ties)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
