"""Which directions train at a step (pure, no torch): round-robin, weighted round-robin, joint.

A pure function of the step, so a resumed run needs no scheduler state. Weighted alternation
is the smooth weighted round-robin (nginx's): in each cycle of ``sum(w)`` turns direction i
takes ``w_i`` of them, spread as evenly as integers allow (weights 2, 1, 1 give a b c a, not
a a b c), and unit weights give plain round-robin, the reference's ``i mod D``. A turn lasts
``period`` steps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache

__all__ = [
    "Direction",
    "direction_schedule",
    "parse_direction",
    "resolve_weights",
    "steps_before",
    "weighted_cycle",
]

Direction = tuple[str, str]


def parse_direction(name: str) -> Direction:
    """``"image->text"`` -> ``("image", "text")``; a malformed name is a ValueError naming it."""
    parts = name.split("->")
    if len(parts) != 2 or not all(p.strip() for p in parts) or parts[0] == parts[1]:
        raise ValueError(f"{name!r} is not a direction (write it as 'source->target')")
    return parts[0].strip(), parts[1].strip()


def resolve_weights(
    weights: Mapping[str, int] | None, directions: Sequence[Direction]
) -> tuple[int, ...] | None:
    """Per-direction integer weights in ``directions`` order (unlisted: 1); None if no weights.

    A key naming a direction that is not trained is a ValueError listing the trained ones: a
    typo would otherwise silently train with uniform weights."""
    if not weights:
        return None
    names = [f"{s}->{t}" for s, t in directions]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(
            f"train.schedule_weights names {', '.join(unknown)}, which this run does not train "
            f"(it trains {', '.join(names)})"
        )
    return tuple(int(weights.get(n, 1)) for n in names)


@lru_cache(maxsize=64)
def weighted_cycle(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One cycle of smooth weighted round-robin: ``sum(weights)`` direction indices.

    Every turn each index gains its weight; the richest (lowest index on ties) is chosen and
    pays the total. Index i occurs exactly ``weights[i]`` times per cycle."""
    if not weights or any(w < 1 for w in weights):
        raise ValueError(f"weights must be positive integers, got {weights}")
    total, credit, out = sum(weights), [0] * len(weights), []
    for _ in range(total):
        for i, w in enumerate(weights):
            credit[i] += w
        best = max(range(len(weights)), key=lambda i: (credit[i], -i))
        credit[best] -= total
        out.append(best)
    return tuple(out)


def _cycle(n: int, weights: Sequence[int] | None) -> tuple[int, ...]:
    if weights is not None and len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} directions")
    return weighted_cycle(tuple(weights) if weights is not None else (1,) * n)


def direction_schedule(
    step: int,
    directions: Sequence[Direction],
    schedule: str,
    period: int = 1,
    weights: Sequence[int] | None = None,
) -> list[Direction]:
    """Directions trained at ``step``: one, in turn (alternating), or all (joint)."""
    if schedule == "joint":
        return list(directions)
    cycle = _cycle(len(directions), weights)
    return [directions[cycle[(step // period) % len(cycle)]]]


def steps_before(
    step: int,
    members: Collection[int],
    num_directions: int,
    schedule: str,
    period: int = 1,
    weights: Sequence[int] | None = None,
) -> int:
    """How many steps before ``step`` trained at least one direction index in ``members``.

    Each group of paired rows draws its batches with its own counter, so a group that trains
    on a third of the steps still walks through its epochs in order (closed form, O(cycle))."""
    if schedule == "joint":
        return step if members else 0
    cycle = _cycle(num_directions, weights)
    span = period * len(cycle)
    full, rest = divmod(step, span)
    hits = [d in members for d in cycle]
    count = full * period * sum(hits)
    turns, partial = divmod(rest, period)
    count += period * sum(hits[:turns])
    if partial and hits[turns]:
        count += partial
    return count
