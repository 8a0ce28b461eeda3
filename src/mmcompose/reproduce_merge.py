"""``mmcompose reproduce merge``: one report from reproduction runs of different seeds.

Seeds are independent (each trains its own models on the same items), so a user with several
machines runs one seed on each and merges the folders; the merged table, claims and retention
are computed from every run's per-item results exactly as one run over all the seeds would
compute them (:func:`mmcompose.paper_report.build_doc`). Runs are checked to be of the same
experiment (modalities, columns, rows, item counts) before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mmcompose.errors import ConfigError

__all__ = ["merge_runs", "merged_inputs"]


def _same(docs: list[tuple[Path, dict]], what: str, get: Any) -> None:
    first_path, first = docs[0]
    for path, doc in docs[1:]:
        if get(doc) != get(first):
            raise ConfigError(
                f"{path} and {first_path} differ in their {what}: they are not runs of the "
                "same experiment",
                hint="merge runs made with the same budget, modalities and subsets",
            )


def merged_inputs(run_dirs: Sequence[str | Path]) -> tuple[Any, Any, dict[str, Any], Path | None]:
    """(job, evaluation, setup, lambda search folder) of the merged runs, every run checked;
    pure apart from reading the runs' ``results.json``."""
    from mmcompose.quickstart import Evaluation
    from mmcompose.report import Row
    from mmcompose.reproduce import read_run

    if len(run_dirs) < 2:
        raise ConfigError("give at least two run folders to merge",
                          hint="e.g. mmcompose reproduce merge runs/seed0 runs/seed1 -o runs/all")  # fmt: skip
    docs = [(Path(d), read_run(d)) for d in run_dirs]
    _same(docs, "modalities", lambda d: d["modalities"])
    _same(docs, "columns", lambda d: d["columns"])
    _same(docs, "rows", lambda d: [(r["name"], r["kind"]) for r in d["rows"]])
    _same(docs, "item counts", lambda d: [
        {k: (c or {}).get("items") for k, c in r["cells"].items()} for r in d["rows"]
    ])  # fmt: skip
    seen: dict[int, Path] = {}
    by_seed: dict[int, list[Any]] = {}
    for path, doc in docs:
        kinds = {r["name"]: r["kind"] for r in doc["rows"]}
        for seed_text, rows in doc["per_item"].items():
            seed = int(seed_text)
            if seed in seen:
                raise ConfigError(
                    f"seed {seed} is in both {seen[seed]} and {path}",
                    hint="merge runs of different seeds (each seed once)",
                )
            seen[seed] = path
            by_seed[seed] = [
                Row(name=r["name"], kind=kinds[r["name"]], correct=dict(rows.get(r["name"], {})))
                for r in doc["rows"]
            ]
    first = docs[0][1]
    cols = [c["key"] for c in first["columns"]]
    n_mod = len(first["modalities"])
    columns = [*cols[-n_mod:], *cols[:-n_mod]]  # the evaluation's order: tests, then MCUB
    lowest = min(by_seed)
    ev = Evaluation(columns=columns, rows=by_seed[lowest], results={}, by_seed=dict(sorted(by_seed.items())))  # fmt: skip
    timings: dict[str, float] = {}
    for _, doc in docs:
        for k, v in doc.get("timings_s", {}).items():
            timings[k] = timings.get(k, 0.0) + float(v)
    job = SimpleNamespace(modalities=tuple(first["modalities"]), timings=timings, out_dir=None)
    setup = {**first.get("setup", {}), "merged_from": [str(p) for p, _ in docs],
             "timings_note": "times are summed over the merged runs"}  # fmt: skip
    if isinstance(setup.get("budget"), dict):
        setup["budget"] = {**setup["budget"], "seeds": sorted(by_seed)}
    search = seen[lowest] / "lambda_search"
    return job, ev, setup, search if search.is_dir() else None


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, force: bool = False):
    """Write the merged report folder (results.json, report.md, chart.png, lambda_search/)
    at ``out_dir``, whole or not at all; returns the :class:`~mmcompose.paper_report.PaperReport`."""
    from mmcompose.fs import refuse_existing
    from mmcompose.paper_report import write_paper_report

    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    job, ev, setup, search = merged_inputs(run_dirs)
    job.out_dir = out_dir
    return write_paper_report(job, ev, setup, search)
