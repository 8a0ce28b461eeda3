"""``mmcompose quickstart``: the first method's claim, measured end to end on offline assets.

The job is six stages (:func:`stages`), each a function of the job and earlier outputs:

1. ``prepare``: SmolLM2-135M-Instruct, the encoders, and the job's datasets (quickstart:
   image / spoken-word / mesh); every video file is checked readable.
2. ``build_benchmark``: mini-MCUB (the job's modalities) from the test split, one from the
   val split, and its first items as the lambda search's validation set (each subset's too
   when the budget composes subsets).
3. ``train_models``: one MLLM per modality on SmolLM2 in the ``shared`` (NaiveMC) and
   ``decoupled`` (DAMC) variants, per seed of the budget.
4. ``compose_models``: NaiveMC (shared LoRA deltas averaged) and DAMC (text adapters merged
   with lambdas searched on the validation set), per seed and set; the ablations if asked.
5. ``evaluate``: every single-modality model and composition on each modality's test split
   and on the MCUB sets (:func:`mmcompose.job_tasks.takes`: which cell each model fills).
6. ``report``: one table, the paper's claims on it (each with its paired test on the same
   items, :mod:`mmcompose.bench.stats`), and the report folder (markdown, results
   JSON in lm-evaluation-harness's layout, PNG chart; :mod:`mmcompose.report`; with several
   seeds :mod:`mmcompose.paper_report`).

The reproduction (:mod:`mmcompose.reproduce`) is this job with another
:class:`~mmcompose.recipe.Budget`: four modalities, several seeds, every MCUB-3 subset.

Everything expensive is a :class:`mmcompose.pipeline.Cache` entry under
``<asset cache>/quickstart`` keyed by a digest of what it depends on (the ``*_key``
functions: configs, data manifests, upstream keys, package version), so a second run only
re-reads results and an interrupted one resumes with what is missing. The default budget is
sized for a 2-core CPU (4-token pooled projectors fitted in closed form, see
:mod:`mmcompose.train.anchor`, under one epoch of LoRA training, evaluation subsets).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mmcompose.job_build import (
    build_mcub_split,
    check_videos,
    file_stamp,
    first_items,
    manifest_paths,
    readable_copies,
    unreadable_videos,
    video_files,
)
from mmcompose.job_build import compose_fixed as _fixed
from mmcompose.job_build import compose_naive as _naive
from mmcompose.job_build import compose_searched as _damc
from mmcompose.job_build import load_model as _load
from mmcompose.job_build import train_model as _train
from mmcompose.job_methods import METHOD_ROWS, method_plans
from mmcompose.job_tasks import Task, mcub_column, takes, tasks_info
from mmcompose.job_tasks import column_tasks as _tasks
from mmcompose.job_tasks import columns as _columns
from mmcompose.job_tasks import evenly_spaced as _subset  # noqa: F401 (its old name)
from mmcompose.pipeline import Cache, Stage, digest, file_digest, run_stages
from mmcompose.recipe import (
    BASE_LLM,
    DATASETS,
    MODALITIES,
    STRATEGIES,
    VIDEO_FRAMES,
    Budget,
    encoder_assets,
    tower,
    train_config,
)
from mmcompose.report import (
    QuickstartReport,
    Row,
    check_claims,
    format_cell,
    pct,
    render_markdown,
    write_report,
)

__all__ = [
    "BASE_LLM",
    "DATASETS",
    "DEFAULT_OUT",
    "MODALITIES",
    "STRATEGIES",
    "Budget",
    "QuickstartReport",
    "Row",
    "Task",
    "format_cell",
    "render_markdown",
    "run_job",
    "run_quickstart",
    "stages",
    "tower",
    "train_config",
]

DEFAULT_OUT = Path("runs/quickstart")
# The ablations of DAMC's two parts (rows of the reproduction's table).
FIXED = "DAMC (lambda = 1/N, no search)"  # decoupled training, no adaptive adjustment
SEARCHED_NAIVE = "NaiveMC + lambda search"  # adaptive adjustment, no decoupling
CLASSIFIED = ("NaiveMC", "DAMC", *METHOD_ROWS)  # compositions also scored on the test splits


# ----------------------------------------------------------------------------- stage data
@dataclass
class Job:
    """What every stage reads: where the report goes, how much work, the cache, the log."""

    out_dir: Path
    budget: Budget
    cache: Cache
    version: str  # the package version: part of every key
    modalities: tuple[str, ...] = MODALITIES
    progress: bool = True
    log: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    datasets: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DATASETS))
    on_corrupt: str = "fail"  # an unreadable video: fail before any work, or skip its items


@dataclass(frozen=True)
class Assets:
    manifests: dict[str, Path]  # dataset -> manifest.jsonl
    data_key: dict[str, str]  # dataset -> digest of its manifest
    unreadable: dict[str, str] = field(default_factory=dict)  # video path -> why


@dataclass(frozen=True)
class MCUBSet:
    """A subset's MCUB test set and lambda-search set."""

    modalities: tuple[str, ...]
    test: tuple[Path, Path]
    search: tuple[Path, Path]


@dataclass(frozen=True)
class Benchmark:
    test: tuple[Path, Path]  # mini-MCUB questions, answers
    val: tuple[Path, Path]
    search: tuple[Path, Path]  # the first ``search_limit`` of val: the lambda search's set
    subsets: tuple[MCUBSet, ...] = ()  # with ``Budget.subsets``
    unreadable: frozenset[str] = frozenset()  # video files skipped (on_corrupt: skip)


@dataclass(frozen=True)
class Model:
    name: str  # its row in the table
    kind: str  # "single" or "composed"
    path: Path
    key: str  # its cache key; its evaluations are keyed under it
    modalities: tuple[str, ...]
    seed: int = 0
    classify: bool = True  # composed: also scored on each modality's test split


@dataclass(frozen=True)
class Evaluation:
    columns: list[str]
    rows: list[Row]  # the first seed's
    results: dict[str, dict[str, dict]]  # the first seed's: model -> task -> metrics block
    by_seed: dict[int, list[Row]] = field(default_factory=dict)  # every seed's rows


# ----------------------------------------------------------------------------- cache keys
def mcub_key(
    data_key: dict[str, str], version: str, modalities: Sequence[str] | None = None
) -> str:
    """``modalities``: given when they are not the quickstart's (whose key stays as it was)."""
    if modalities is None or tuple(modalities) == MODALITIES:
        return digest(data_key, version)
    return digest(data_key, version, list(modalities))


def search_set_key(val_questions_digest: str, limit: int) -> str:
    return digest(val_questions_digest, limit)


# Part of every cache key; bumped when cached artefacts made by older code are wrong.
# 2: frozen encoders stay in eval mode while training caches their features (BatchNorm had
# been updating its running statistics), and lm-eval's scoring convention (DAMC's search).
CACHE_REVISION = 2


def model_key(config: Any, data_keys: list[str], version: str) -> str:
    return digest(config.model_dump(mode="json"), data_keys, version)


def naive_key(source_keys: list[str], version: str) -> str:
    return digest("naive", source_keys, version)


def damc_key(source_keys: list[str], budget: Budget, search_set: str, version: str) -> str:
    return digest(
        "damc", source_keys, budget.search_grid, budget.search_passes, search_set, version
    )


def ablation_key(
    kind: str, source_keys: list[str], budget: Budget, search_set: str, version: str
) -> str:
    """``fixed``: lambda = 1/N (no search inputs); ``naive-search``: as DAMC's key."""
    if kind == "fixed":
        return digest("fixed", source_keys, version)
    return digest(kind, source_keys, budget.search_grid, budget.search_passes, search_set, version)


def eval_key(task_key: list[Any], modalities: Sequence[str]) -> str:
    """Under the model's key: the task's items, the modalities the model was given and the
    log-likelihood scoring convention (scores cached under an earlier one are not reused)."""
    from mmcompose.bench.multiple_choice import DEFAULT_CONTINUATION

    return digest(task_key, list(modalities), f"continuation={DEFAULT_CONTINUATION}")


# ----------------------------------------------------------------------------- the stages
def stages(modalities: Sequence[str] = MODALITIES, budget: Budget | None = None) -> list[Stage]:
    budget = budget or Budget()
    n = len(modalities) * len(STRATEGIES) * len(budget.seeds)
    seeds = f" ({len(budget.seeds)} seeds)" if len(budget.seeds) > 1 else ""
    sets = " for every MCUB set" if budget.subsets else ""
    ablations = ", ablations" if budget.ablations else ""
    ablations += ", MMER, TIES, DARE, label-free search" if budget.methods else ""
    mcub = "build mini-MCUB" + (" and its subsets" if budget.subsets else "")
    return [
        Stage("assets", prepare, title="prepare assets"),
        Stage("benchmark", build_benchmark, ("assets",), mcub),
        Stage("singles", train_models, ("assets",), f"train {n} single-modality models{seeds}"),
        Stage(
            "composed",
            compose_models,
            ("benchmark", "singles"),
            f"compose NaiveMC and DAMC (lambda search){sets}{ablations}",
        ),
        Stage("evaluation", evaluate, ("assets", "benchmark", "singles", "composed"), "evaluate"),
        Stage("report", report, ("assets", "benchmark", "composed", "evaluation"), timed=False),
    ]


def run_job(
    out_dir: str | Path,
    *,
    budget: Budget,
    modalities: Sequence[str] = MODALITIES,
    datasets: dict[str, tuple[str, ...]] | None = None,
    force: bool = False,
    progress: bool = True,
    on_corrupt: str = "fail",
    log: Callable[[str], None] = print,
    tag: str = "quickstart",
) -> Any:
    """Run the whole job; returns the report (written to ``out_dir``). The quickstart and the
    reproduction share one cache: a model both train (same config) is trained once."""
    import mmcompose
    from mmcompose.assets.cache import cache_dir
    from mmcompose.fs import exclusive, refuse_existing

    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    cache = Cache(cache_dir() / "quickstart", log=log)
    job = Job(
        out_dir,
        budget,
        cache,
        f"{mmcompose.__version__}.r{CACHE_REVISION}",
        tuple(modalities),
        progress=progress,
        log=log,
        datasets=dict(datasets or DATASETS),
        on_corrupt=on_corrupt,
    )
    with exclusive(cache.root, what="quickstart cache"):  # a second job is refused
        outputs = run_stages(
            stages(job.modalities, budget), job, timings=job.timings, log=log, tag=tag
        )
    return outputs["report"]


def run_quickstart(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    force: bool = False,
    budget: Budget | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> QuickstartReport:
    """The quickstart's job; returns the table and writes the report folder at ``out_dir``."""
    budget = budget or Budget()
    return run_job(out_dir, budget=budget, force=force, progress=progress, log=log)


def prepare(job: Job) -> Assets:
    from mmcompose.assets.datasets import prepare_datasets
    from mmcompose.assets.encoders import prepare_encoders
    from mmcompose.assets.llm import prepare_base_llm

    prepare_base_llm(BASE_LLM)
    prepare_encoders(list(dict.fromkeys(e for m in job.modalities for e in encoder_assets(m))))
    names = [d for m in job.modalities for d in job.datasets[m]]
    folders = prepare_datasets(only=names, progress=job.progress)
    manifests = {d: folders[d] / "manifest.jsonl" for d in names}
    unreadable: dict[str, str] = {}
    if "video" in job.modalities:  # decode every clip once (cached while the files stay)
        paths = video_files(manifests)
        unreadable = job.cache.json(
            "checks",
            "videos",
            digest(file_stamp(paths), VIDEO_FRAMES, job.version),
            partial(unreadable_videos, paths, VIDEO_FRAMES),
            label=f"check {len(paths)} video files",
        )
    return Assets(manifests, {d: file_digest(p) for d, p in manifests.items()}, unreadable)


def build_benchmark(job: Job, assets: Assets) -> Benchmark:
    from mmcompose.bench.mcub_build import set_name

    full = tuple(job.modalities)
    set_file = set_name(full)
    key = mcub_key(assets.data_key, job.version, full)
    folders = {}
    for split in ("test", "val"):
        folders[split] = job.cache.folder(
            "mcub",
            split,
            key,
            partial(_build_mcub, assets, split, job.modalities),
            done=f"{set_file}.json",
            in_place=True,
            label=f"mini-MCUB ({split} split)",
        )
    wanted = [full, *job.budget.subsets]
    files = {
        (split, mods): (
            folders[split] / f"{set_name(mods)}.json",
            folders[split] / f"{set_name(mods)}.answers.json",
        )
        for split in ("test", "val")
        for mods in wanted
    }
    if assets.unreadable:  # fail naming the MCUB items, or drop them (on_corrupt: skip)
        named = {f"{s}/{set_name(m)}": f for (s, m), f in files.items()}
        drop = check_videos(assets.unreadable, named, job.on_corrupt)
        folder = job.cache.folder(
            "mcub",
            "readable",
            digest(key, sorted(assets.unreadable), [str(m) for m in wanted]),
            partial(readable_copies, files, drop),
            done="done.json",
        )
        files = {
            (s, m): (folder / s / q.name, folder / s / a.name) for (s, m), (q, a) in files.items()
        }
    limit = job.budget.search_limit
    search = {}
    for mods in wanted:
        val = files[("val", mods)]
        folder = job.cache.folder(
            "mcub",
            "search",
            search_set_key(file_digest(val[0]), limit),
            partial(first_items, val, limit),
            done=val[1].name,
        )
        search[mods] = (folder / val[0].name, folder / val[1].name)
    return Benchmark(
        files[("test", full)],
        files[("val", full)],
        search[full],
        tuple(MCUBSet(m, files[("test", m)], search[m]) for m in wanted[1:]),
        frozenset(assets.unreadable),
    )


def train_models(job: Job, assets: Assets) -> dict[str, Model]:
    models = {}
    plan = [(seed, m, s) for seed in job.budget.seeds for m in job.modalities for s in STRATEGIES]
    for seed, m, s in _bar(job, plan, "single-modality models"):
        names = job.datasets[m]
        files = [str(assets.manifests[d]) for d in names]
        skip = job.on_corrupt == "skip" and any(  # only then: the config (key) is unchanged
            p in assets.unreadable for p in manifest_paths(assets.manifests, names)
        )
        cfg = train_config(m, s, job.budget, files, seed, "skip" if skip else "fail")
        key = model_key(cfg, [assets.data_key[d] for d in names], job.version)
        label = f"{m} ({s})" + _tag(job, seed)
        path = job.cache.folder(
            "models",
            f"{m}-{s}",
            key,
            partial(_train, job, cfg, label),
            in_place=True,
            label=label,
        )
        model = Model(f"{m}-{s}", "single", path, key, (m,), seed)
        models[_id(job, model)] = model
    return models


def compose_models(job: Job, bench: Benchmark, singles: dict[str, Model]) -> dict[str, Model]:
    full = tuple(job.modalities)
    sets = [(full, bench.search), *((s.modalities, s.search) for s in bench.subsets)]
    out: dict[str, Model] = {}
    work = [(seed, mods, search) for seed in job.budget.seeds for mods, search in sets]
    for seed, mods, search in _bar(job, work, "compositions"):
        shared = [_single(singles, m, "shared", seed) for m in mods]
        decoupled = [_single(singles, m, "decoupled", seed) for m in mods]
        tag = _tag(job, seed, mods)
        search_digest = file_digest(search[0])
        plans = [
            (
                "NaiveMC",
                "naivemc",
                naive_key(_keys(shared), job.version),
                partial(_naive, shared),
                "NaiveMC",
            ),
            (
                "DAMC",
                "damc",
                damc_key(_keys(decoupled), job.budget, search_digest, job.version),
                partial(_damc, job, decoupled, search, "DAMC" + tag),
                "DAMC (lambda search)",
            ),
        ]
        if job.budget.ablations and mods == full:
            plans += [
                (
                    FIXED,
                    "damc-fixed",
                    ablation_key("fixed", _keys(decoupled), job.budget, "", job.version),
                    partial(_fixed, decoupled),
                    FIXED,
                ),
                (
                    SEARCHED_NAIVE,
                    "naivemc-search",
                    ablation_key(
                        "naive-search", _keys(shared), job.budget, search_digest, job.version
                    ),
                    partial(_damc, job, shared, search, SEARCHED_NAIVE + tag),
                    SEARCHED_NAIVE,
                ),
            ]
        if mods == full:  # MMER, TIES, DARE, label-free search (when the budget asks)
            plans += method_plans(job, shared, search, search_digest, tag)
        for name, group, key, build, label in plans:
            path = job.cache.folder(
                "compositions", group, key, build, in_place=True, label=label + tag
            )
            model = Model(name, "composed", path, key, mods, seed, classify=name in CLASSIFIED)
            out[_id(job, model)] = model
    return out


def evaluate(
    job: Job,
    assets: Assets,
    bench: Benchmark,
    singles: dict[str, Model],
    composed: dict[str, Model],
) -> Evaluation:
    from mmcompose.model.encode_memo import memoized_encoders

    columns = _columns(job.modalities, [s.modalities for s in bench.subsets])
    tasks = _tasks(assets.manifests, bench, job.budget, job.modalities)
    seeds = sorted({m.seed for m in [*singles.values(), *composed.values()]})
    order = [
        *sorted(
            singles.values(),
            key=lambda m: (
                m.seed,
                STRATEGIES.index(_strategy(m)),
                job.modalities.index(m.modalities[0]),
            ),
        ),
        *sorted(composed.values(), key=lambda m: m.seed),  # stable: the stage's order
    ]
    order.sort(key=lambda m: m.seed)
    by_seed: dict[int, dict[str, Row]] = {s: {} for s in seeds}
    results: dict[str, dict[str, dict]] = {}
    with memoized_encoders():
        for model in _bar(job, order, "evaluated models"):
            loaded = functools.cache(partial(_load, model.path))  # only if an entry is missing
            rows = by_seed[model.seed]
            if model.name not in rows:
                rows[model.name] = Row(model.name, model.kind, dict.fromkeys(columns))
            row = rows[model.name]
            for col, task in zip(columns, tasks, strict=True):
                if not takes(model, task, job.modalities):
                    continue
                block = _evaluation(job, model, task, loaded)
                if model.seed == seeds[0]:
                    results.setdefault(model.name, {})[task.name] = block
                row.scores[col] = block[task.metric]
                row.stderr[col] = block.get(task.metric.replace(",", "_stderr,"))
                if task.metric in block["per_item"]:
                    row.correct[col] = block["per_item"][task.metric]
                if "acc,generate" in block:
                    row.scores[f"{col} gen"] = block["acc,generate"]
                    if "acc,generate" in block["per_item"]:
                        row.correct[f"{col} gen"] = block["per_item"]["acc,generate"]
            cells = ", ".join(pct(row.scores.get(c)) for c in columns)
            job.log(f"  {model.name}{_tag(job, model.seed, model.modalities)}: {cells}")
    rows_by_seed = {s: list(r.values()) for s, r in by_seed.items()}
    return Evaluation(columns, rows_by_seed[seeds[0]], results, rows_by_seed)


def report(
    job: Job,
    assets: Assets,
    bench: Benchmark,
    composed: dict[str, Model],
    ev: Evaluation,
) -> Any:
    job.timings["total"] = time.perf_counter() - job.started
    info = tasks_info(assets.manifests, bench, job.budget)
    first = min(m.seed for m in composed.values())
    damc = next(
        m
        for m in composed.values()
        if m.name == "DAMC" and m.seed == first and m.modalities == job.modalities
    )
    if job.budget.paper_report:
        from mmcompose.paper_report import write_paper_report

        return write_paper_report(job, ev, info, damc.path / "search")
    out = QuickstartReport(job.out_dir, ev.rows, job.timings, columns=ev.columns)
    # the claims are on the job's whole MCUB set (the column after the test splits)
    out.claims = check_claims(ev.rows, ev.columns[: len(job.modalities) + 1], job.modalities)
    write_report(out, ev.results, damc.path / "search", info)
    return out


# ----------------------------------------------------------------------------- stage helpers
def _build_mcub(assets: Assets, split: str, modalities: Sequence[str], path: Path) -> None:
    build_mcub_split(assets.manifests, split, modalities, path)


def _keys(models: Sequence[Model]) -> list[str]:
    return [m.key for m in models]


def _strategy(model: Model) -> str:
    return model.name.rsplit("-", 1)[-1]


def _single(singles: dict[str, Model], modality: str, strategy: str, seed: int) -> Model:
    return next(
        m for m in singles.values() if m.name == f"{modality}-{strategy}" and m.seed == seed
    )


def _multi(job: Job) -> bool:
    return len(job.budget.seeds) > 1 or bool(job.budget.subsets)


def _id(job: Job, model: Model) -> str:
    """A unique name for the stages' dicts: the row name alone in the quickstart."""
    if not _multi(job):
        return model.name
    return f"{model.name} [seed {model.seed}, {mcub_column(model.modalities)}]"


def _tag(job: Job, seed: int, modalities: Sequence[str] | None = None) -> str:
    if not _multi(job):
        return ""
    sets = f", {mcub_column(modalities)}" if modalities and len(modalities) > 1 else ""
    return f" [seed {seed}{sets}]"


def _bar(job: Job, work: list, what: str) -> Iterable:
    """An overall progress bar over a stage's work (the steps inside have their own)."""
    if not job.progress or len(work) < 2:
        return work
    from tqdm.auto import tqdm

    return tqdm(work, desc=what, unit="model", leave=False)


def _evaluation(job: Job, model: Model, task: Task, loaded: Callable[[], tuple]) -> dict:
    """One cell's metrics block, cached under the model's key. Entries written before the
    per-item results were kept (no ``per_item``) are scored again and replaced, since the
    claims' paired tests need them."""
    key = eval_key(task.key, model.modalities)
    compute = partial(_run_task, task, loaded, model.modalities, job.progress)
    block = job.cache.json("evals", model.key, key, compute)
    if "per_item" not in block:
        from mmcompose.fs import write_json_atomic

        block = compute()
        write_json_atomic(job.cache.path("evals", model.key, key, ".json"), block)
    return block


def _run_task(
    task: Task, loaded: Callable[[], tuple], modalities: tuple[str, ...], progress: bool
) -> dict:
    """The task's metrics block, with ``per_item``: metric -> 0/1 per item (empty if the
    task gives none)."""
    block = task.run(*loaded(), modalities, progress)
    return {**block, "per_item": block.get("per_item", {})}
