"""The columns of a composition job's table and the evaluation task behind each one.

Columns, in order: each modality's own test split (classification over the modality's whole
label set), the job's MCUB set (all its modalities), then each subset's MCUB set when the
budget composes subsets. Which model fills which cell is :func:`takes`: a single-modality
model answers its own modality's test split and every MCUB set that holds its modality
(seeing only its own input of each item); a composition answers the MCUB set of exactly its
modalities, and the test splits when it composes all of the job's modalities.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcompose.pipeline import file_digest

if TYPE_CHECKING:
    from mmcompose.quickstart import Benchmark, Model
    from mmcompose.recipe import Budget

__all__ = [
    "Task",
    "column_tasks",
    "columns",
    "evenly_spaced",
    "mcub_column",
    "subset_sets",
    "takes",
    "tasks_info",
]


@dataclass(frozen=True)
class Task:
    """One column: how to run it on a loaded model and which metric the table shows."""

    name: str
    modality: str | None  # classification of this modality; None: an MCUB set
    metric: str
    key: list[Any]
    run: Callable[..., dict]  # run(model, processor, modalities, progress) -> metrics block
    n: int
    modalities: tuple[str, ...] | None = None  # MCUB: the set's modalities (None: the job's)


def subset_sets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """The MCUB-(N-1) subsets of the job's modalities (at least 3 each), in the canonical
    modality order the MCUB builder names its sets by (IAV, IAP, IVP, AVP for all four)."""
    from mmcompose.modalities import MODALITIES

    mods = [m for m in MODALITIES if m in modalities]
    if len(mods) - 1 < 3:
        return []
    return list(itertools.combinations(mods, len(mods) - 1))


def mcub_column(modalities: Sequence[str]) -> str:
    from mmcompose.bench.mcub_build import SET_LETTERS

    return "mini-MCUB " + "".join(SET_LETTERS[m] for m in modalities)


def columns(modalities: Sequence[str], subsets: Sequence[Sequence[str]] = ()) -> list[str]:
    return [
        *(f"{m} (test)" for m in modalities),
        mcub_column(modalities),
        *(mcub_column(s) for s in subsets),
    ]


def evenly_spaced(rows: list, limit: int | None) -> list:
    """An evenly spaced, deterministic subset (keeps every label group represented)."""
    if limit is None or len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def takes(model: Model, task: Task, job_modalities: Sequence[str]) -> bool:
    """Whether ``model`` fills ``task``'s column (module docstring)."""
    full = tuple(job_modalities)
    if task.modality is not None:
        if task.modality not in model.modalities:
            return False
        return model.kind == "single" or (model.classify and tuple(model.modalities) == full)
    mods = task.modalities or full
    if model.kind == "single":
        return model.modalities[0] in mods
    return tuple(model.modalities) == tuple(mods)


def column_tasks(
    manifests: dict[str, Path],
    bench: Benchmark,
    budget: Budget,
    modalities: Sequence[str],
) -> list[Task]:
    """Per column, in :func:`columns` order: the classification of each modality (its test
    rows from every manifest of that modality, unreadable files dropped), the MCUB sets."""
    from mmcompose.bench.classify import classify, read_manifest
    from mmcompose.bench.results import task_block

    tasks = []
    modes = ("loglikelihood", "generate") if budget.generate else ("loglikelihood",)
    rows_by_modality: dict[str, list[dict]] = {}
    for path in manifests.values():
        for r in read_manifest(path, None):
            rows_by_modality.setdefault(r["modality"], []).append(r)
    for m in modalities:
        rows_all = rows_by_modality.get(m, [])
        labels = sorted({r["label"] for r in rows_all})
        test = [
            r for r in rows_all if r["split"] == "test" and str(r["path"]) not in bench.unreadable
        ]
        test = evenly_spaced(test, budget.classify_limit)

        def run(model, proc, _mods, progress, test=test, labels=labels, m=m):
            r = classify(model, proc, test, labels=labels, modes=modes, progress=progress)
            return {**task_block(r.correct, f"classify_{m}"), "n": r.n, "per_item": r.correct}

        key = ["classify", [r["id"] for r in test], labels, modes]
        tasks.append(Task(f"classify_{m}", m, "acc,loglikelihood", key, run, len(test)))
    tasks.append(_mcub_task(bench.test, budget, tuple(modalities), full=True))
    tasks += [_mcub_task(s.test, budget, s.modalities) for s in bench.subsets]
    return tasks


def _mcub_task(
    files: tuple[Path, Path], budget: Budget, modalities: tuple[str, ...], full: bool = False
) -> Task:
    from mmcompose.bench.mcub import evaluate_mcub, load_mcub, restrict_modalities
    from mmcompose.bench.results import task_block

    items = evenly_spaced(load_mcub(*files), budget.mcub_limit)
    name = "mcub_" + "_".join(modalities)
    modes = ("loglikelihood", "generate") if budget.generate_mcub else ("loglikelihood",)

    def run_mcub(model, proc, mods, progress):
        its = restrict_modalities(items, list(mods)) if len(mods) < len(modalities) else items
        r = evaluate_mcub(model, proc, its, modes, progress=progress)
        return {**task_block(r.correct, name), "n": r.n, "per_item": r.correct}

    # Without generation the key is the quickstart's (its cached scores stay warm).
    key = ["mcub", file_digest(files[0]), file_digest(files[1]), len(items)]
    key += [list(modes)] if budget.generate_mcub else []
    return Task(
        name, None, "acc,loglikelihood", key, run_mcub, len(items), None if full else modalities
    )


def tasks_info(manifests: dict[str, Path], bench: Benchmark, budget: Budget) -> dict[str, Any]:
    info: dict[str, Any] = {
        "datasets": {d: str(p) for d, p in manifests.items()},
        "mcub_test": [str(p) for p in bench.test],
        "mcub_val": [str(p) for p in bench.val],
        "budget": budget.__dict__,
    }
    if bench.subsets:
        info["mcub_subsets"] = {
            mcub_column(s.modalities): [str(p) for p in s.test] for s in bench.subsets
        }
    return info
