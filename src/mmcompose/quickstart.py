"""``mmcompose quickstart``: the first method's claim, measured end to end on offline assets.

1. Prepare the assets: SmolLM2-135M-Instruct, EfficientNet-Lite0, Whisper tiny.en, the
   mesh-pretrained PointNet, and the image / spoken-word / mesh datasets.
2. Build mini-MCUB (image + audio + point cloud) from the test split, and a validation set
   for the lambda search from the val split.
3. Train image, audio and point-cloud MLLMs on SmolLM2 in the ``shared`` (NaiveMC) and
   ``decoupled`` (DAMC) variants, or reuse them from the cache.
4. Compose NaiveMC (shared LoRA deltas averaged) and DAMC (text adapters merged with
   lambdas searched on the validation set).
5. Evaluate every single-modality model and both compositions on each modality's test split
   and on mini-MCUB; print one table and write a report folder (markdown, results JSON in
   lm-evaluation-harness's layout, PNG chart).

Everything expensive is cached under ``<asset cache>/quickstart`` by a digest of what it
depends on (configs, data manifests, package version), so a second run only re-reads
results. The recipe is sized for a 2-core CPU: 4-token pooled projectors fitted in closed
form (see :mod:`mmcompose.train.anchor`), one epoch of LoRA training, and evaluation subsets.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcompose.model.config import ModuleSpec, TowerConfig

DEFAULT_OUT = Path("runs/quickstart")
BASE_LLM = "smollm2-135m-instruct"
MODALITIES = ("image", "audio", "point")
STRATEGIES = ("shared", "decoupled")
DATASETS: dict[str, tuple[str, ...]] = {
    "image": ("emoji", "openclipart", "photos"),
    "audio": ("spoken",),
    "point": ("meshes",),
}
ENCODERS = ("efficientnet_lite0", "whisper_tiny_en", "pointnet_meshes")


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


# ----------------------------------------------------------------------------- report types
@dataclass
class Row:
    """One model's line in the results table: accuracy per task (None: not applicable)."""

    name: str
    kind: str  # "single" or "composed"
    scores: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)


@dataclass
class QuickstartReport:
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    claims: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- helpers
def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    from mmcompose.fs import sha256_file

    return sha256_file(path)[:16]


def _subset(rows: list, limit: int | None) -> list:
    """An evenly spaced, deterministic subset (keeps every label group represented)."""
    if limit is None or len(rows) <= limit:
        return rows
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("models", "evals", "mcub", "compositions"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def eval_path(self, model_key: str, task_key: str) -> Path:
        return self.root / "evals" / f"{model_key}-{task_key}.json"


# ----------------------------------------------------------------------------- the job
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
    from mmcompose.fs import refuse_existing

    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    report = QuickstartReport(out_dir)
    cache = _Cache(cache_dir() / "quickstart")
    version = mmcompose.__version__
    t_all = time.perf_counter()

    def step(name: str):
        return _Timer(report.timings, name, log)

    # 1. assets ------------------------------------------------------------------------
    with step("prepare assets"):
        from mmcompose.assets.datasets import prepare_datasets
        from mmcompose.assets.encoders import prepare_encoders
        from mmcompose.assets.llm import prepare_base_llm

        prepare_base_llm(BASE_LLM)
        prepare_encoders(list(ENCODERS))
        names = [d for m in MODALITIES for d in DATASETS[m]]
        folders = prepare_datasets(only=names, progress=progress)
        manifests = {d: folders[d] / "manifest.jsonl" for d in names}
        data_key = {d: _file_digest(p) for d, p in manifests.items()}

    # 2. mini-MCUB ---------------------------------------------------------------------
    with step("build mini-MCUB"):
        from mmcompose.bench.mcub_build import build_mcub

        sets = {}
        for split in ("test", "val"):
            folder = cache.root / "mcub" / f"{split}-{_digest(data_key, version)}"
            if not (folder / "MCUB-3-IAP.json").is_file():
                build_mcub(
                    [str(manifests[d]) for d in names],
                    folder,
                    split=split,
                    modalities=list(MODALITIES),
                    force=True,
                )
            sets[split] = (folder / "MCUB-3-IAP.json", folder / "MCUB-3-IAP.answers.json")

    # 3. single-modality models ----------------------------------------------------------
    from mmcompose.train.trainer import train

    singles: dict[tuple[str, str], tuple[Path, str]] = {}
    with step("train 6 single-modality models"):
        for m in MODALITIES:
            files = [str(manifests[d]) for d in DATASETS[m]]
            for s in STRATEGIES:
                cfg = train_config(m, s, budget, files)
                key = _digest(
                    cfg.model_dump(mode="json"), [data_key[d] for d in DATASETS[m]], version
                )
                path = cache.root / "models" / f"{m}-{s}-{key}"
                if not (path / "config.json").is_file():
                    log(f"  training {m} ({s})")
                    r = train(cfg, path, force=True, progress=progress)
                    log(f"  {m} ({s}): {r.steps} steps, {r.seconds:.0f} s, loss {r.final_loss:.3f}")
                else:
                    log(f"  {m} ({s}): cached")
                singles[(m, s)] = (path, key)

    # 4. compositions ---------------------------------------------------------------------
    composed: dict[str, tuple[Path, str]] = {}
    search_report: Path | None = None
    with step("compose NaiveMC and DAMC (lambda search)"):
        from mmcompose.compose.config import ComposeConfig
        from mmcompose.compose.executor import compose

        naive_cfg = ComposeConfig.model_validate(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(singles[(m, "shared")][0]), "parameters": {"weight": 1.0}}
                    for m in MODALITIES
                ],
            }
        )
        key = _digest("naive", [singles[(m, "shared")][1] for m in MODALITIES], version)
        path = cache.root / "compositions" / f"naivemc-{key}"
        if not (path / "config.json").is_file():
            compose(naive_cfg, path, force=True, progress=False)
        composed["NaiveMC"] = (path, key)

        val_q, val_a = _trimmed_val(sets["val"], budget.search_limit, cache.root / "mcub")
        key = _digest(
            "damc",
            [singles[(m, "decoupled")][1] for m in MODALITIES],
            budget.search_grid,
            budget.search_passes,
            _file_digest(val_q),
            version,
        )
        path = cache.root / "compositions" / f"damc-{key}"
        if not (path / "config.json").is_file():
            from mmcompose.compose.search import compose_with_search

            damc_cfg = ComposeConfig.model_validate(
                {
                    "merge_method": "task_arithmetic",
                    "models": [{"model": str(singles[(m, "decoupled")][0])} for m in MODALITIES],
                }
            )
            result, _ = compose_with_search(
                damc_cfg,
                path,
                val_q,
                val_a,
                force=True,
                progress=progress,
                grid=budget.search_grid,
                method="coordinate",
                max_passes=budget.search_passes,
                mode="loglikelihood",
            )
            log(
                "  DAMC lambdas "
                + ", ".join(
                    f"{m}={w:g}" for m, w in zip(MODALITIES, result.best_weights, strict=True)
                )
                + f" (val acc {result.best_accuracy:.3f})"
            )
        composed["DAMC"] = (path, key)
        search_report = path / "search"

    # 5. evaluation -----------------------------------------------------------------------
    results: dict[str, dict[str, dict]] = {}
    columns = [*(f"{m} (test)" for m in MODALITIES), "mini-MCUB IAP"]
    report.columns = columns
    from mmcompose.model.encode_memo import memoized_encoders

    with step("evaluate"), memoized_encoders():
        tasks = _tasks(manifests, sets["test"], budget)
        models = [
            (f"{m}-{s}", "single", singles[(m, s)], (m,)) for s in STRATEGIES for m in MODALITIES
        ] + [(n, "composed", composed[n], MODALITIES) for n in ("NaiveMC", "DAMC")]
        for name, kind, (path, mkey), mods in models:
            row = Row(name, kind)
            results[name] = {}
            loaded = None
            for col, task in zip(columns, tasks, strict=True):
                if task["modality"] is not None and task["modality"] not in mods:
                    row.scores[col] = None
                    continue
                tkey = _digest(task["key"], mods)
                cached = cache.eval_path(mkey, tkey)
                if cached.is_file():
                    block = json.loads(cached.read_text())
                else:
                    if loaded is None:
                        loaded = _load(path)
                    block = task["run"](*loaded, mods, progress)
                    from mmcompose.fs import write_json_atomic

                    write_json_atomic(cached, block)
                results[name][task["name"]] = block
                metric = task["metric"]
                row.scores[col] = block[metric]
                row.stderr[col] = block.get(metric.replace(",", "_stderr,"))
                if budget.generate and "acc,generate" in block:
                    row.scores[f"{col} gen"] = block["acc,generate"]
            report.rows.append(row)
            log(f"  {name}: " + ", ".join(_fmt(row.scores.get(c)) for c in columns))

    report.claims = _claims(report.rows, columns)
    report.timings["total"] = time.perf_counter() - t_all
    _write_report(report, results, search_report, budget, tasks_info(manifests, sets, budget))
    return report


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


class _Timer:
    def __init__(self, timings: dict[str, float], name: str, log: Callable[[str], None]) -> None:
        self.timings, self.name, self.log = timings, name, log

    def __enter__(self) -> None:
        self.log(f"[quickstart] {self.name} ...")
        self.t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.t
        if exc[0] is None:
            self.log(f"[quickstart] {self.name}: {self.timings[self.name]:.1f} s")


def _load(path: Path):
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    model = MMComposeForCausalLM.from_pretrained(path).fold_for_inference()
    return model, MMProcessor.from_pretrained(path)


def _trimmed_val(files: tuple[Path, Path], limit: int, root: Path) -> tuple[Path, Path]:
    """The first ``limit`` validation items (the builder shuffles by seed) as their own files."""
    from mmcompose.fs import write_json_atomic

    key = _digest(_file_digest(files[0]), limit)
    out_q, out_a = root / f"val-{key}.json", root / f"val-{key}.answers.json"
    if not out_a.is_file():  # written last
        q, a = (json.loads(f.read_text()) for f in files)
        write_json_atomic(out_q, q[:limit])
        write_json_atomic(out_a, a[:limit])
    return out_q, out_a


def _tasks(manifests: dict[str, Path], mcub: tuple[Path, Path], budget: Budget) -> list[dict]:
    """Per column: how to run it on a loaded model and which metric the table shows."""
    from mmcompose.bench.classify import classify, read_manifest
    from mmcompose.bench.mcub import evaluate_mcub, load_mcub, restrict_modalities
    from mmcompose.bench.results import task_block

    tasks = []
    for m in MODALITIES:
        rows_all = [r for d in DATASETS[m] for r in read_manifest(manifests[d], None)]
        labels = sorted({r["label"] for r in rows_all})
        test = _subset([r for r in rows_all if r["split"] == "test"], budget.classify_limit)
        modes = ("loglikelihood", "generate") if budget.generate else ("loglikelihood",)

        def run(model, proc, _mods, progress, test=test, labels=labels, modes=modes, m=m):
            r = classify(model, proc, test, labels=labels, modes=modes, progress=progress)
            return {**task_block(r.correct, f"classify_{m}"), "n": r.n}

        tasks.append(
            {
                "name": f"classify_{m}",
                "modality": m,
                "metric": "acc,loglikelihood",
                "key": ["classify", [r["id"] for r in test], labels, modes],
                "run": run,
                "n": len(test),
            }
        )
    items = _subset(load_mcub(*mcub), budget.mcub_limit)

    def run_mcub(model, proc, mods, progress, items=items):
        its = restrict_modalities(items, list(mods)) if len(mods) < len(MODALITIES) else items
        r = evaluate_mcub(model, proc, its, ("loglikelihood",), progress=progress)
        return {**task_block(r.correct, "mcub_image_audio_point"), "n": r.n}

    tasks.append(
        {
            "name": "mcub_image_audio_point",
            "modality": None,
            "metric": "acc,loglikelihood",
            "key": ["mcub", _file_digest(mcub[0]), _file_digest(mcub[1]), len(items)],
            "run": run_mcub,
            "n": len(items),
        }
    )
    return tasks


def tasks_info(manifests, sets, budget: Budget) -> dict[str, Any]:
    return {
        "datasets": {d: str(p) for d, p in manifests.items()},
        "mcub_test": [str(p) for p in sets["test"]],
        "mcub_val": [str(p) for p in sets["val"]],
        "budget": budget.__dict__,
    }


def _claims(rows: list[Row], columns: list[str]) -> list[tuple[str, bool, str]]:
    """The paper's three claims, checked on this run's numbers."""
    by = {r.name: r for r in rows}
    mcub = columns[-1]
    out = []
    singles = [r for r in rows if r.kind == "single"]
    best_single = max(singles, key=lambda r: r.scores[mcub] or 0.0)
    for comp in ("NaiveMC", "DAMC"):
        c = by[comp].scores[mcub] or 0.0
        out.append(
            (
                f"{comp} beats every single-modality model on mini-MCUB",
                c > (best_single.scores[mcub] or 0.0),
                f"{_fmt(c)} vs best single {best_single.name} {_fmt(best_single.scores[mcub])}",
            )
        )
    d, n = by["DAMC"].scores[mcub] or 0.0, by["NaiveMC"].scores[mcub] or 0.0
    out.append(("DAMC >= NaiveMC on mini-MCUB", d >= n, f"{_fmt(d)} vs {_fmt(n)}"))
    for comp, strategy in (("NaiveMC", "shared"), ("DAMC", "decoupled")):
        worst = []
        for m, col in zip(MODALITIES, columns, strict=False):
            src = by[f"{m}-{strategy}"].scores[col] or 0.0
            kept = (by[comp].scores[col] or 0.0) / src if src else float("nan")
            worst.append((kept, m))
        ok = all(k >= 0.95 for k, _ in worst)
        detail = ", ".join(f"{m} {100 * k:.0f}%" for k, m in worst)
        out.append((f"{comp} keeps >= 95% of each source's own-modality accuracy", ok, detail))
    return out


def _write_report(
    report: QuickstartReport,
    results: dict[str, dict[str, dict]],
    search_report: Path | None,
    budget: Budget,
    info: dict[str, Any],
) -> None:
    import shutil

    from mmcompose.bench.results import write_results
    from mmcompose.fs import atomic_dir

    with atomic_dir(report.out_dir, overwrite=True) as tmp:
        for name, blocks in results.items():
            write_results(
                tmp / "results" / name,
                {t: {k: v for k, v in b.items() if k != "n"} for t, b in blocks.items()},
                {t: {"task": t, **info} for t in blocks},
                {t: int(b.get("n", 0)) for t, b in blocks.items()},
                {"model": "mmcompose", "model_args": f"name={name}", "device": "cpu"},
            )
        doc = {
            "columns": report.columns,
            "rows": [r.__dict__ for r in report.rows],
            "claims": [{"claim": c, "holds": ok, "detail": d} for c, ok, d in report.claims],
            "timings_s": report.timings,
            "setup": info,
        }
        (tmp / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        _chart(report, tmp / "chart.png")
        if search_report is not None and search_report.is_dir():
            shutil.copytree(search_report, tmp / "lambda_search")


def format_cell(row: Row, column: str, stderr: bool = False) -> str:
    """One table cell in %: "—" where not applicable, ± the standard error if asked, the
    generation accuracy in brackets when it was measured."""
    v = row.scores.get(column)
    if v is None:
        return "—"
    se = row.stderr.get(column)
    cell = f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if stderr and se == se and se else "")
    g = row.scores.get(f"{column} gen")
    return cell + (f" ({100 * g:.1f})" if g is not None else "")


def render_markdown(report: QuickstartReport) -> str:
    cols = report.columns
    lines = [
        "# mmcompose quickstart",
        "",
        "Accuracy (%) by log-likelihood over the label set (classification, test split) and "
        "over the four options (mini-MCUB); ± is the standard error. "
        "Generation accuracy in brackets.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in report.rows:
        cells = [format_cell(r, c, stderr=True) for c in cols]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims on this run", ""]
    for claim, ok, detail in report.claims:
        lines.append(f"- {'holds' if ok else 'does not hold'}: {claim} ({detail})")
    lines += ["", "## Time (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report.timings.items()]
    return "\n".join(lines) + "\n"


def _chart(report: QuickstartReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = report.columns
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(report.rows)
    for i, r in enumerate(report.rows):
        xs = [j + i * width for j, c in enumerate(cols) if r.scores.get(c) is not None]
        ys = [100 * r.scores[c] for c in cols if r.scores.get(c) is not None]
        ax.bar(xs, ys, width, label=r.name, hatch="//" if r.kind == "composed" else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("single-modality models vs compositions (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
