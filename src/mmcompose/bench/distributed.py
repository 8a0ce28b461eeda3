"""Data-parallel evaluation under torchrun: strided shards, results gathered to every rank.

Each rank evaluates ``items[rank::world]`` with the same model; the per-rank results are
exchanged with ``all_gather_object`` (gloo on CPU) and put back into the original order with
:func:`interleave`, so N processes produce the same per-item results as one. Every rank learns
of an error on any rank, so all of them fail together instead of waiting forever in a
collective that a failed rank never joins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from mmcompose.errors import MMComposeError

T = TypeVar("T")


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the evaluation ranks (world 1 = plain single process)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's strided shard: the shards differ in size by at most one item."""
        return list(items[self.rank :: self.world])

    def run(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on this rank and return every rank's result, in rank order.

        An exception on any rank is raised on all ranks: the failing rank re-raises its own,
        the others an MMComposeError naming that rank (so the CLI exits 2 everywhere)."""
        if self.world == 1:
            return [fn()]
        import torch.distributed as dist

        mine: BaseException | None = None
        try:
            result: Any = fn()
            report = None
        except Exception as e:  # reported to every rank below
            mine, result = e, None
            hint = e.hint if isinstance(e, MMComposeError) else "see that rank's traceback"
            msg = e.message if isinstance(e, MMComposeError) else f"{type(e).__name__}: {e}"
            report = (msg, hint)
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, (result, report))
        if mine is not None:
            raise mine
        for r, (_, rep) in enumerate(gathered):
            if rep is not None:
                raise MMComposeError(f"rank {r}: {rep[0]}", hint=rep[1])
        return [g[0] for g in gathered]


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of the strided sharding: ``parts[r] = items[r::world]`` -> ``items``."""
    world, total = len(parts), sum(len(p) for p in parts)
    return [parts[i % world][i // world] for i in range(total)]


@contextmanager
def data_parallel() -> Iterator[DataParallel]:
    """Join torchrun's process group when WORLD_SIZE > 1 and leave it at the end if we created
    it; a plain run yields the single-process context. Gloo: only Python objects travel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DataParallel()
        return
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo")
    try:
        yield DataParallel(dist.get_rank(), dist.get_world_size())
    finally:
        if owns:
            dist.destroy_process_group()
