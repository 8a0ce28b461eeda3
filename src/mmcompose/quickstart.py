"""``mmcompose quickstart``: the first method's claim, measured end to end on offline assets.

The job is six stages (:func:`stages`), each a function of the job and earlier outputs:

1. ``prepare``: SmolLM2-135M-Instruct, EfficientNet-Lite0, Whisper tiny.en, the
   mesh-pretrained PointNet, and the image / spoken-word / mesh datasets.
2. ``build_benchmark``: mini-MCUB (image + audio + point cloud) from the test split, one from
   the val split, and its first items as the lambda search's validation set.
3. ``train_models``: image, audio and point-cloud MLLMs on SmolLM2 in the ``shared``
   (NaiveMC) and ``decoupled`` (DAMC) variants.
4. ``compose_models``: NaiveMC (shared LoRA deltas averaged) and DAMC (text adapters merged
   with lambdas searched on the validation set).
5. ``evaluate``: every single-modality model and both compositions on each modality's test
   split and on mini-MCUB.
6. ``report``: one table, the paper's claims on it (each with its paired test on the same
   items, :mod:`mmcompose.bench.stats`), and the report folder (markdown, results
   JSON in lm-evaluation-harness's layout, PNG chart; :mod:`mmcompose.report`).

Everything expensive is a :class:`mmcompose.pipeline.Cache` entry under
``<asset cache>/quickstart`` keyed by a digest of what it depends on (the ``*_key``
functions: configs, data manifests, upstream keys, package version), so a second run only
re-reads results. :class:`Budget` says how much work: the default is sized for a 2-core CPU
(4-token pooled projectors fitted in closed form, see :mod:`mmcompose.train.anchor`, under one
epoch of LoRA training, evaluation subsets).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mmcompose.model.config import ModuleSpec, TowerConfig
from mmcompose.pipeline import Cache, Stage, digest, file_digest, run_stages
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
    "format_cell",
    "render_markdown",
    "run_quickstart",
    "stages",
    "train_config",
]

DEFAULT_OUT = Path("runs/quickstart")
BASE_LLM = "smollm2-135m-instruct"
MODALITIES = ("image", "audio", "point")
STRATEGIES = ("shared", "decoupled")
DATASETS: dict[str, tuple[str, ...]] = {
    "image": ("emoji", "openclipart", "photos"),
    "audio": ("spoken",),
    "point": ("meshes",),
}


def tower(modality: str) -> TowerConfig:
    """The quickstart's towers: frozen pretrained encoders, 4-token pooled projectors."""
    encoders = {
        "image": ModuleSpec(name="efficientnet_lite0"),
        # context "clip": Whisper attends over the 2 s used, not its 30 s window; ~15x faster
        # to encode, same accuracy here (85.0% vs 86.7% on 60 test clips, docs/results.md).
        "audio": ModuleSpec(
            name="whisper_tiny_en", params={"seconds": 2, "pool": 10, "context": "clip"}
        ),
        "point": ModuleSpec(name="pointnet_meshes"),
    }
    return TowerConfig(
        modality=modality,
        encoder=encoders[modality],
        projector=ModuleSpec(name="pooled", params={"num_tokens": 4}),
        num_prefix=2,
        num_suffix=2,
    )


@dataclass(frozen=True)
class Budget:
    """How much work the quickstart does. The default fits the 15-minute cold budget on a
    2-core CPU with evaluation subsets; ``Budget.full()`` scores whole test splits, all of
    mini-MCUB, and generation too (for the figures in docs/results.md; much longer)."""

    # Epochs of stage 2 per modality, as short as each stood (docs/results.md, "Recipe"):
    # audio kept its accuracy at 1/2 epoch, image lost 8-12 points at 1/2 but not at 3/4,
    # point clouds (ridge residual 0.6: the closed-form fit leaves most to training) lost half
    # their accuracy at 3/4 of an epoch.
    stage2_epochs: tuple[tuple[str, float], ...] = (
        ("image", 0.75),
        ("audio", 0.5),
        ("point", 1.0),
    )
    stage2_lr: float = 2e-4
    batch_size: int = 16
    classify_limit: int | None = 24  # test items per modality (None: all)
    mcub_limit: int | None = 60  # mini-MCUB test items (None: all)
    search_limit: int = 24  # validation items per lambda candidate
    search_grid: tuple[float, ...] = (0.5, 1.0)
    search_passes: int = 1  # coordinate sweeps over the three lambdas
    generate: bool = False  # also score classification by generation

    @classmethod
    def full(cls) -> Budget:
        return cls(
            classify_limit=None,
            mcub_limit=None,
            search_limit=112,
            search_grid=(0.25, 0.5, 0.75, 1.0),
            search_passes=3,
            generate=True,
        )


def train_config(modality: str, strategy: str, budget: Budget, dataset_files: list[str]):
    from mmcompose.train.trainer import LoRASettings, StageConfig, TrainConfig

    return TrainConfig(
        base_llm=BASE_LLM,
        tower=tower(modality),
        data=dataset_files,
        system_prompt="",
        projector_init="lstsq",
        # No LoRA dropout: drawing its Bernoulli masks is a quarter of a training step on
        # this CPU (benchmarks/train_step.py).
        lora=LoRASettings(strategy=strategy, rank=16, alpha=32, dropout=0.0),
        stage1=StageConfig(epochs=0),
        stage2=StageConfig(
            epochs=dict(budget.stage2_epochs)[modality],
            lr=budget.stage2_lr,
            batch_size=budget.batch_size,
            warmup_ratio=0.1,
        ),
        max_length=96,
    )


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


@dataclass(frozen=True)
class Assets:
    manifests: dict[str, Path]  # dataset -> manifest.jsonl
    data_key: dict[str, str]  # dataset -> digest of its manifest


@dataclass(frozen=True)
class Benchmark:
    test: tuple[Path, Path]  # mini-MCUB questions, answers
    val: tuple[Path, Path]
    search: tuple[Path, Path]  # the first ``search_limit`` of val: the lambda search's set


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # "single" or "composed"
    path: Path
    key: str  # its cache key; its evaluations are keyed under it
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """One column: how to run it on a loaded model and which metric the table shows."""

    name: str
    modality: str | None  # None: every model takes it (mini-MCUB)
    metric: str
    key: list[Any]
    run: Callable[..., dict]  # run(model, processor, modalities, progress) -> metrics block
    n: int


@dataclass(frozen=True)
class Evaluation:
    columns: list[str]
    rows: list[Row]
    results: dict[str, dict[str, dict]]  # model -> task -> metrics block


# ----------------------------------------------------------------------------- cache keys
def mcub_key(data_key: dict[str, str], version: str) -> str:
    return digest(data_key, version)


def search_set_key(val_questions_digest: str, limit: int) -> str:
    return digest(val_questions_digest, limit)


def model_key(config: Any, data_keys: list[str], version: str) -> str:
    return digest(config.model_dump(mode="json"), data_keys, version)


def naive_key(source_keys: list[str], version: str) -> str:
    return digest("naive", source_keys, version)


def damc_key(source_keys: list[str], budget: Budget, search_set: str, version: str) -> str:
    return digest(
        "damc", source_keys, budget.search_grid, budget.search_passes, search_set, version
    )


def eval_key(task_key: list[Any], modalities: Sequence[str]) -> str:
    """Under the model's key: the task's items and the modalities the model was given."""
    return digest(task_key, list(modalities))


# ----------------------------------------------------------------------------- the stages
def stages(modalities: Sequence[str] = MODALITIES) -> list[Stage]:
    n = len(modalities) * len(STRATEGIES)
    return [
        Stage("assets", prepare, title="prepare assets"),
        Stage("benchmark", build_benchmark, ("assets",), "build mini-MCUB"),
        Stage("singles", train_models, ("assets",), f"train {n} single-modality models"),
        Stage(
            "composed",
            compose_models,
            ("benchmark", "singles"),
            "compose NaiveMC and DAMC (lambda search)",
        ),
        Stage("evaluation", evaluate, ("assets", "benchmark", "singles", "composed"), "evaluate"),
        Stage("report", report, ("assets", "benchmark", "composed", "evaluation"), timed=False),
    ]


def run_quickstart(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    force: bool = False,
    budget: Budget = Budget(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> QuickstartReport:
    """Run the whole job; returns the table and writes the report folder at ``out_dir``."""
    import mmcompose
    from mmcompose.assets.cache import cache_dir
    from mmcompose.fs import exclusive, refuse_existing

    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    cache = Cache(cache_dir() / "quickstart", log=log)
    job = Job(out_dir, budget, cache, mmcompose.__version__, progress=progress, log=log)
    with exclusive(cache.root, what="quickstart cache"):  # a second quickstart is refused
        outputs = run_stages(
            stages(job.modalities), job, timings=job.timings, log=log, tag="quickstart"
        )
    return outputs["report"]


def prepare(job: Job) -> Assets:
    from mmcompose.assets.datasets import prepare_datasets
    from mmcompose.assets.encoders import prepare_encoders
    from mmcompose.assets.llm import prepare_base_llm

    prepare_base_llm(BASE_LLM)
    prepare_encoders([tower(m).encoder.name for m in job.modalities])
    names = [d for m in job.modalities for d in DATASETS[m]]
    folders = prepare_datasets(only=names, progress=job.progress)
    manifests = {d: folders[d] / "manifest.jsonl" for d in names}
    return Assets(manifests, {d: file_digest(p) for d, p in manifests.items()})


def build_benchmark(job: Job, assets: Assets) -> Benchmark:
    from mmcompose.bench.mcub_build import set_name

    set_file = set_name(job.modalities)
    key = mcub_key(assets.data_key, job.version)
    sets = {}
    for split in ("test", "val"):
        folder = job.cache.folder(
            "mcub",
            split,
            key,
            partial(_build_mcub, assets, split, job.modalities),
            done=f"{set_file}.json",
            in_place=True,
            label=f"mini-MCUB ({split} split)",
        )
        sets[split] = (folder / f"{set_file}.json", folder / f"{set_file}.answers.json")
    limit = job.budget.search_limit
    folder = job.cache.folder(
        "mcub",
        "search",
        search_set_key(file_digest(sets["val"][0]), limit),
        partial(_first_items, sets["val"], limit),
        done=sets["val"][1].name,
    )
    return Benchmark(
        sets["test"], sets["val"], (folder / sets["val"][0].name, folder / sets["val"][1].name)
    )


def train_models(job: Job, assets: Assets) -> dict[str, Model]:
    models = {}
    for m in job.modalities:
        files = [str(assets.manifests[d]) for d in DATASETS[m]]
        for s in STRATEGIES:
            cfg = train_config(m, s, job.budget, files)
            key = model_key(cfg, [assets.data_key[d] for d in DATASETS[m]], job.version)
            label = f"{m} ({s})"
            path = job.cache.folder(
                "models",
                f"{m}-{s}",
                key,
                partial(_train, job, cfg, label),
                in_place=True,
                label=label,
            )
            models[f"{m}-{s}"] = Model(f"{m}-{s}", "single", path, key, (m,))
    return models


def compose_models(job: Job, bench: Benchmark, singles: dict[str, Model]) -> dict[str, Model]:
    mods = job.modalities
    shared = [singles[f"{m}-shared"] for m in mods]
    decoupled = [singles[f"{m}-decoupled"] for m in mods]
    nkey = naive_key([s.key for s in shared], job.version)
    naive = job.cache.folder(
        "compositions", "naivemc", nkey, partial(_naive, shared), in_place=True, label="NaiveMC"
    )
    dkey = damc_key(
        [s.key for s in decoupled], job.budget, file_digest(bench.search[0]), job.version
    )
    damc = job.cache.folder(
        "compositions",
        "damc",
        dkey,
        partial(_damc, job, decoupled, bench.search),
        in_place=True,
        label="DAMC (lambda search)",
    )
    return {
        "NaiveMC": Model("NaiveMC", "composed", naive, nkey, mods),
        "DAMC": Model("DAMC", "composed", damc, dkey, mods),
    }


def evaluate(
    job: Job,
    assets: Assets,
    bench: Benchmark,
    singles: dict[str, Model],
    composed: dict[str, Model],
) -> Evaluation:
    from mmcompose.model.encode_memo import memoized_encoders

    columns = _columns(job.modalities)
    tasks = _tasks(assets.manifests, bench.test, job.budget, job.modalities)
    order = [singles[f"{m}-{s}"] for s in STRATEGIES for m in job.modalities]
    rows, results = [], {}
    with memoized_encoders():
        for model in [*order, *composed.values()]:
            loaded = functools.cache(partial(_load, model.path))  # only if an entry is missing
            row = Row(model.name, model.kind)
            results[model.name] = {}
            for col, task in zip(columns, tasks, strict=True):
                if task.modality is not None and task.modality not in model.modalities:
                    row.scores[col] = None
                    continue
                block = _evaluation(job, model, task, loaded)
                results[model.name][task.name] = block
                row.scores[col] = block[task.metric]
                row.stderr[col] = block.get(task.metric.replace(",", "_stderr,"))
                if task.metric in block["per_item"]:
                    row.correct[col] = block["per_item"][task.metric]
                if job.budget.generate and "acc,generate" in block:
                    row.scores[f"{col} gen"] = block["acc,generate"]
            rows.append(row)
            job.log(f"  {model.name}: " + ", ".join(pct(row.scores.get(c)) for c in columns))
    return Evaluation(columns, rows, results)


def report(
    job: Job,
    assets: Assets,
    bench: Benchmark,
    composed: dict[str, Model],
    ev: Evaluation,
) -> QuickstartReport:
    out = QuickstartReport(job.out_dir, ev.rows, job.timings, columns=ev.columns)
    out.claims = check_claims(ev.rows, ev.columns, job.modalities)
    job.timings["total"] = time.perf_counter() - job.started
    info = tasks_info(assets.manifests, bench, job.budget)
    write_report(out, ev.results, composed["DAMC"].path / "search", info)
    return out


# ----------------------------------------------------------------------------- stage helpers
def _build_mcub(assets: Assets, split: str, modalities: Sequence[str], path: Path) -> None:
    from mmcompose.bench.mcub_build import build_mcub

    manifests = [str(p) for p in assets.manifests.values()]
    build_mcub(manifests, path, split=split, modalities=list(modalities), force=True)


def _first_items(files: tuple[Path, Path], limit: int, folder: Path) -> None:
    """The first ``limit`` items of a set (the builder shuffles by seed) as their own files."""
    from mmcompose.fs import write_json_atomic

    for f in files:
        write_json_atomic(folder / f.name, json.loads(f.read_text())[:limit])


def _train(job: Job, cfg: Any, label: str, path: Path) -> None:
    from mmcompose.train.trainer import train

    r = train(cfg, path, force=True, progress=job.progress)
    job.log(f"  {label}: {r.steps} steps, loss {r.final_loss:.3f}")


def _naive(sources: list[Model], path: Path) -> None:
    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.executor import compose

    cfg = ComposeConfig.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": str(s.path), "parameters": {"weight": 1.0}} for s in sources],
        }
    )
    compose(cfg, path, force=True, progress=False)


def _damc(job: Job, sources: list[Model], val: tuple[Path, Path], path: Path) -> None:
    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.search import compose_with_search

    cfg = ComposeConfig.model_validate(
        {"merge_method": "task_arithmetic", "models": [{"model": str(s.path)} for s in sources]}
    )
    b = job.budget
    result, _ = compose_with_search(
        cfg,
        path,
        *val,
        force=True,
        progress=job.progress,
        grid=b.search_grid,
        method="coordinate",
        max_passes=b.search_passes,
        mode="loglikelihood",
    )
    weights = zip((s.modalities[0] for s in sources), result.best_weights, strict=True)
    job.log(
        "  DAMC lambdas "
        + ", ".join(f"{m}={w:g}" for m, w in weights)
        + f" (val acc {result.best_accuracy:.3f})"
    )


def _load(path: Path):
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    model = MMComposeForCausalLM.from_pretrained(path).fold_for_inference()
    return model, MMProcessor.from_pretrained(path)


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


def _subset(rows: list, limit: int | None) -> list:
    """An evenly spaced, deterministic subset (keeps every label group represented)."""
    if limit is None or len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def _columns(modalities: Sequence[str]) -> list[str]:
    from mmcompose.bench.mcub_build import SET_LETTERS

    return [
        *(f"{m} (test)" for m in modalities),
        "mini-MCUB " + "".join(SET_LETTERS[m] for m in modalities),
    ]


def _tasks(
    manifests: dict[str, Path],
    mcub: tuple[Path, Path],
    budget: Budget,
    modalities: Sequence[str] = MODALITIES,
) -> list[Task]:
    """Per column, in :func:`_columns` order: the classification of each modality, mini-MCUB."""
    from mmcompose.bench.classify import classify, read_manifest
    from mmcompose.bench.mcub import evaluate_mcub, load_mcub, restrict_modalities
    from mmcompose.bench.results import task_block

    tasks = []
    modes = ("loglikelihood", "generate") if budget.generate else ("loglikelihood",)
    for m in modalities:
        rows_all = [r for d in DATASETS[m] for r in read_manifest(manifests[d], None)]
        labels = sorted({r["label"] for r in rows_all})
        test = _subset([r for r in rows_all if r["split"] == "test"], budget.classify_limit)

        def run(model, proc, _mods, progress, test=test, labels=labels, m=m):
            r = classify(model, proc, test, labels=labels, modes=modes, progress=progress)
            return {**task_block(r.correct, f"classify_{m}"), "n": r.n, "per_item": r.correct}

        key = ["classify", [r["id"] for r in test], labels, modes]
        tasks.append(Task(f"classify_{m}", m, "acc,loglikelihood", key, run, len(test)))
    items = _subset(load_mcub(*mcub), budget.mcub_limit)
    name = "mcub_" + "_".join(modalities)

    def run_mcub(model, proc, mods, progress):
        its = restrict_modalities(items, list(mods)) if len(mods) < len(modalities) else items
        r = evaluate_mcub(model, proc, its, ("loglikelihood",), progress=progress)
        return {**task_block(r.correct, name), "n": r.n, "per_item": r.correct}

    key = ["mcub", file_digest(mcub[0]), file_digest(mcub[1]), len(items)]
    tasks.append(Task(name, None, "acc,loglikelihood", key, run_mcub, len(items)))
    return tasks


def tasks_info(manifests: dict[str, Path], bench: Benchmark, budget: Budget) -> dict[str, Any]:
    return {
        "datasets": {d: str(p) for d, p in manifests.items()},
        "mcub_test": [str(p) for p in bench.test],
        "mcub_val": [str(p) for p in bench.val],
        "budget": budget.__dict__,
    }
