"""Sign-election merges (ties, dare_ties, breadcrumbs_ties; mergekit's and PEFT's arithmetic) on
one 32000x1024 bf16 tensor and two fine-tunes: the whole-tensor path against the blocked one
(methods.BLOCK), checking that both give the same bits.

    python benchmarks/sign_election.py            # OMP_NUM_THREADS=1 for one core
"""

from __future__ import annotations

import time

import torch

import mmcompose.compose.methods as M

CASES = [
    ("ties", dict(density=[0.5, 0.3], normalize=True)),
    ("ties", dict(density=0.5, normalize=False, lambda_=0.7)),
    ("dare_ties", dict(density=1.0)),
    ("breadcrumbs_ties", dict(density=0.5, gamma=0.01)),
    ("ties", dict(density=0.5, semantics="peft")),
]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(32000, 1024, generator=g) * 0.02).bfloat16()
    ts = [(base.float() + torch.randn(32000, 1024, generator=g) * 0.002).bfloat16() for _ in "ab"]
    block = M.BLOCK
    for name, kw in CASES:
        fn = M.MERGE_METHODS.get(name).fn
        timed = {}
        for label, b in (("whole", 1 << 40), ("blocked", block)):
            M.BLOCK = b
            t = time.perf_counter()
            timed[label] = (fn(ts, [0.5, 0.5], base, **kw), time.perf_counter() - t)
        M.BLOCK = block
        (ref, t1), (ours, t2) = timed["whole"], timed["blocked"]
        same = torch.equal(ref.view(torch.int16), ours.view(torch.int16))
        print(f"{name} {kw}: bit-identical {same}, whole {t1:.2f} s, blocked {t2:.2f} s, "
              f"{t1 / t2:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
