"""``mmcompose reproduce alignment``: the Alt-MoE ablation on one set of stored latents, with
intervals over queries and seeds and paired tests (issue 16, item 2).

What runs. Two tasks: image-text on the ``captions`` set (3 captions per image, CLIP_benchmark
recall, see :mod:`mmcompose.align.recall`) and audio-text on ``spoken`` + ``sounds`` (a clip
matches every text equal to its own: the spoken word, or the sound's caption). For each task,
two text encoders: the base LLM (SmolLM2-135M, mean of the last two layers' hidden states, as
the paper) and MiniLM. Frozen features are computed once into feature stores
(:func:`~mmcompose.align.features.build_feature_store`, cached by content), and every variant
and seed trains and is scored on exactly those latents and the same test queries:

- ``moe_alt``: the Alt-MoE connector, alternating directions (the paper's method);
- ``moe_joint``: the same connector, both directions every step (same optimizer steps);
- ``mlp_alt``: one MLP in place of the MoE, its hidden width chosen so that its parameter count
  matches the MoE connector's (:func:`matched_mlp_hidden`), alternating;
- ``linear``: per-direction linear maps of the pooled latents;
- ``asif``: training-free relative representations over the training pairs as anchors, its
  (k, p) picked on the validation split (:mod:`mmcompose.align.baselines`);
- ``fusemix``: MLP adapters trained with latent mixup on the pooled latents.

The connectors are trained by :func:`mmcompose.align.trainer.train_connector` (early stopping
on validation R@1) and scored in the contrastive space. Image tokens are the encoder's 7x7 grid
average-pooled to ``image_grid`` x ``image_grid`` (3: 9 tokens) so that the run fits a 2-core
CPU (the MoE runs per token); the other variants take pooled latents, the mean of the same grid.

Every (task, text encoder, variant, seed) result is stored in ``<out>.work/`` as it finishes
(safetensors hits + JSON), so an interrupted run resumes; the report folder (results.json,
report.md, chart.png, hits.safetensors) is written whole at the end
(:mod:`mmcompose.align.reproduce_report`), and ``render_alignment_docs`` regenerates the
marked section of docs/results.md and its chart from it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmcompose.align.reproduce_data import (
    TASKS,
    TEXT_ENCODERS,
    TaskData,
    load_task,
    pool_grid,
    synthetic_task,
)
from mmcompose.errors import ConfigError

__all__ = [
    "BUDGETS",
    "TASKS",
    "VARIANTS",
    "AlignBudget",
    "AlignmentRun",
    "TaskData",
    "load_task",
    "matched_mlp_hidden",
    "plan",
    "pool_grid",
    "run_ablation",
    "run_alignment_reproduction",
    "run_unit",
    "synthetic_task",
]

VARIANTS: dict[str, str] = {
    "moe_alt": "MoE + alternating",
    "moe_joint": "MoE + joint",
    "mlp_alt": "MLP + alternating (matched params)",
    "linear": "linear",
    "asif": "ASIF (training-free)",
    "fusemix": "FuseMix (MLP adapters + latent mixup)",
}
KIND = "mmcompose reproduce alignment"
FORMAT = 1


class AlignBudget(BaseModel):
    """How much work the run does; ``full`` is sized for ~40 min on this 2-core machine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = tuple(TASKS)
    text_encoders: tuple[str, ...] = TEXT_ENCODERS
    variants: tuple[str, ...] = tuple(VARIANTS)
    hidden: int = Field(default=128, gt=0)
    num_experts: int = Field(default=12, gt=0)
    top_k: int = Field(default=4, gt=0)
    steps: dict[str, int] = Field(default_factory=lambda: {"image-text": 200, "audio-text": 150})
    batch_size: int = Field(default=64, gt=1)
    lr: float = Field(default=1e-3, gt=0)
    warmup_steps: int = Field(default=30, ge=0)
    eval_every: int = Field(default=50, gt=0)
    patience: int = Field(default=2, gt=0)
    image_grid: int | None = Field(default=2, gt=0)
    # items kept per split (seeded pick): {task: {split: n}}; test is always whole
    max_items: dict[str, dict[str, int]] = Field(
        default_factory=lambda: {
            "image-text": {"train": 500, "val": 100},
            "audio-text": {"train": 200, "val": 60},
        }
    )
    fusemix_steps: int = Field(default=200, gt=0)
    asif_k: tuple[int, ...] = (16, 64, 256)
    asif_p: tuple[float, ...] = (1.0, 4.0, 8.0)
    n_boot: int = Field(default=2000, gt=0)

    def steps_for(self, task: str) -> int:
        return self.steps.get(task, max(self.steps.values(), default=200))


BUDGETS: dict[str, AlignBudget] = {
    "full": AlignBudget(),
    "smoke": AlignBudget(
        seeds=(0,),
        text_encoders=("minilm",),
        steps={"image-text": 40, "audio-text": 40},
        eval_every=20,
        fusemix_steps=40,
        n_boot=500,
    ),
}


# =========================================================================== variants
def _connector_dims(data: TaskData) -> dict[str, int]:
    train = data.splits["train"]
    return {m: f.dim for m, f in train.features.items()}


def count_connector_parameters(kind: str, hidden: int, data: TaskData, budget: AlignBudget) -> int:
    """Parameters of a connector of ``kind`` and width ``hidden`` on this task (built on the
    meta device: no memory, no time)."""
    import torch

    from mmcompose.align.moe import AltMoEConnector, ConnectorConfig

    cfg = ConnectorConfig(
        kind=kind,  # type: ignore[arg-type]
        hidden=hidden,
        num_experts=budget.num_experts,
        top_k=budget.top_k,
        modalities=_connector_dims(data),
        directions=tuple(data.directions),
    )
    with torch.device("meta"):
        return sum(p.numel() for p in AltMoEConnector(cfg).parameters())


def matched_mlp_hidden(data: TaskData, budget: AlignBudget) -> int:
    """The MLP connector's width whose parameter count is closest to the MoE connector's at
    ``budget.hidden`` (the count grows with the width, so a bisection finds it)."""
    target = count_connector_parameters("moe", budget.hidden, data, budget)
    lo, hi = 1, budget.hidden * max(2, budget.num_experts)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_connector_parameters("mlp", mid, data, budget) < target:
            lo = mid + 1
        else:
            hi = mid
    cands = [h for h in (lo - 1, lo) if h >= 1]
    return min(
        cands, key=lambda h: abs(count_connector_parameters("mlp", h, data, budget) - target)
    )


def _align_config(variant: str, hidden: int, task: str, seed: int, budget: AlignBudget) -> Any:
    from mmcompose.align.config import AlignConfig

    kind = {"moe_alt": "moe", "moe_joint": "moe", "mlp_alt": "mlp", "linear": "linear"}[variant]
    raw = {
        "seed": seed,
        "data": {"kind": "synthetic"},  # the rows are handed to the trainer directly
        "connector": {
            "kind": kind,
            "hidden": hidden,
            "num_experts": budget.num_experts,
            "top_k": budget.top_k,
            "dropout": 0.1,
        },
        "train": {
            "schedule": "joint" if variant == "moe_joint" else "alternating",
            "max_steps": budget.steps_for(task),
            "batch_size": budget.batch_size,
            "lr": budget.lr,
            "warmup_steps": budget.warmup_steps,
            "weight_decay": 0.05,
            "grad_clip": 1.0,
            "temperature": 0.03,
            "eval_every": budget.eval_every,
            "patience": budget.patience,
            "checkpoint_every": 10**9,
            "num_threads": 1,
        },
        "eval": {"space": "cl", "split": "test"},
    }
    try:
        return AlignConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid alignment budget for {variant}: {exc}") from None


def _side(split: Any, modality: str) -> tuple[np.ndarray, np.ndarray]:
    rows = split.side_rows(modality)
    return rows, split.keys[rows]


def _score(
    split: Any, directions: Sequence[tuple[str, str]], embed: Callable[..., tuple[Any, Any]]
) -> dict[str, np.ndarray]:
    """{"src->tgt": (Q, len(KS)) hits}; ``embed(src, tgt, q_rows, g_rows)`` -> (queries, gallery)
    unit vectors (or a ready (Q, G) similarity as (sim, None))."""
    from mmcompose.align.moe import direction_name
    from mmcompose.align.recall import hits_at_k

    out = {}
    for src, tgt in directions:
        q_rows, q_keys = _side(split, src)
        g_rows, g_keys = _side(split, tgt)
        q, g = embed(src, tgt, q_rows, g_rows)
        sim = q if g is None else q @ g.T
        out[direction_name((src, tgt))] = hits_at_k(sim, q_keys, g_keys)
    return out


def _pooled(split: Any, modality: str, rows: np.ndarray | None = None) -> Any:
    import torch

    pooled = np.asarray(split.features[modality].pooled, dtype=np.float32)
    return torch.as_tensor(pooled if rows is None else pooled[rows])


def _run_connector(variant: str, data: TaskData, seed: int, budget: AlignBudget) -> tuple:
    from mmcompose.align.evaluate import gallery_embeddings, query_embeddings
    from mmcompose.align.trainer import train_connector

    hidden = matched_mlp_hidden(data, budget) if variant == "mlp_alt" else budget.hidden
    cfg = _align_config(variant, hidden, data.task, seed, budget)
    outcome = train_connector(cfg, data.splits, None, progress=False)
    model = outcome.model
    test = data.splits["test"]

    def embed(src: str, tgt: str, q_rows: np.ndarray, g_rows: np.ndarray) -> tuple:
        q = query_embeddings(model, (src, tgt), test.features[src].take(q_rows), "cl")
        return q, gallery_embeddings(model, (src, tgt), _pooled(test, tgt, g_rows), "cl")

    info = {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden": hidden,
        "steps": outcome.steps,
        "best_step": outcome.best_step,
        "best_val_r1": outcome.best_val,
        "stopped_early": outcome.stopped_early,
    }
    return _score(test, data.directions, embed), info


def _asif_hits(data: TaskData, split: Any, cfg: Any) -> dict[str, np.ndarray]:
    from mmcompose.align.baselines import asif_similarity

    train = data.splits["train"]

    def embed(src: str, tgt: str, q_rows: np.ndarray, g_rows: np.ndarray) -> tuple:
        sim = asif_similarity(
            _pooled(split, src, q_rows), _pooled(split, tgt, g_rows),
            _pooled(train, src), _pooled(train, tgt), cfg,
        )  # fmt: skip
        return sim, None

    return _score(split, data.directions, embed)


def _run_asif(data: TaskData, seed: int, budget: AlignBudget) -> tuple:
    """(k, p) chosen by mean R@1 over both directions on val; the training pairs are anchors.
    No training: every seed gives the same result (kept per seed for the paired tests)."""
    from mmcompose.align.baselines import ASIFConfig

    val = data.splits.get("val", data.splits["train"])
    grid = []
    for k in budget.asif_k:
        for p in budget.asif_p:
            cfg = ASIFConfig(k=k, p=p)
            hits = _asif_hits(data, val, cfg)
            grid.append((float(np.mean([h[:, 0].mean() for h in hits.values()])), -k, -p, cfg))
    score, _, _, best = max(grid, key=lambda g: g[:3])
    info = {"params": 0, "k": best.k, "p": best.p, "val_mean_r1": score * 100,
            "anchors": len(data.splits["train"])}  # fmt: skip
    return _asif_hits(data, data.splits["test"], best), info


def _run_fusemix(data: TaskData, seed: int, budget: AlignBudget) -> tuple:
    from mmcompose.align.baselines import FuseMixConfig, fit_fusemix

    train, test = data.splits["train"], data.splits["test"]
    cfg = FuseMixConfig(proj_dim=budget.hidden, steps=budget.fusemix_steps)
    m = data.modality
    fit = fit_fusemix(_pooled(train, m), _pooled(train, "text"), train.keys, cfg, seed, (m, "text"))

    def embed(src: str, tgt: str, q_rows: np.ndarray, g_rows: np.ndarray) -> tuple:
        return fit.model.embed(src, _pooled(test, src, q_rows)), fit.model.embed(
            tgt, _pooled(test, tgt, g_rows)
        )

    info = {
        "params": sum(p.numel() for p in fit.model.parameters()),
        "steps": cfg.steps,
        "final_loss": float(np.mean(fit.losses[-10:])),
        "alpha": cfg.alpha,
    }
    return _score(test, data.directions, embed), info


def run_unit(variant: str, data: TaskData, seed: int, budget: AlignBudget) -> tuple:
    """One variant, one seed: ({"src->tgt": (Q, len(KS)) hits}, info with ``seconds``)."""
    import torch

    started = time.perf_counter()
    torch.set_num_threads(1)  # small steps: one thread avoids oversubscribing a shared CPU
    if variant in ("moe_alt", "moe_joint", "mlp_alt", "linear"):
        hits, info = _run_connector(variant, data, seed, budget)
    elif variant == "asif":
        hits, info = _run_asif(data, seed, budget)
    elif variant == "fusemix":
        hits, info = _run_fusemix(data, seed, budget)
    else:
        raise ConfigError(f"unknown variant {variant!r}", hint=", ".join(VARIANTS))
    info["seconds"] = round(time.perf_counter() - started, 2)
    return hits, info


# =========================================================================== the run
def _unit_key(data: TaskData, variant: str, seed: int, budget: AlignBudget) -> str:
    import mmcompose
    from mmcompose.pipeline import digest

    b = budget.model_dump(mode="json")
    for k in ("seeds", "tasks", "text_encoders", "variants", "n_boot"):
        b.pop(k)
    return digest(data.fingerprint(), variant, seed, b, getattr(mmcompose, "__version__", ""))


def _load_unit(path: Path) -> tuple | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = json.loads((fh.metadata() or {})["info"])
            hits = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (OSError, KeyError, ValueError):
        return None  # damaged: recomputed
    return hits, meta


def _save_unit(path: Path, hits: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    from mmcompose.fs import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in hits.items()}, str(tmp),
                  metadata={"info": json.dumps(info)})  # fmt: skip


@dataclass
class AlignmentRun:
    out_dir: Path
    doc: dict[str, Any]


def run_ablation(
    tasks: Sequence[TaskData],
    budget: AlignBudget,
    out_dir: str | Path,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    timings: dict[str, float] | None = None,
) -> AlignmentRun:
    """Every variant x seed on every task's stored latents, then the report folder."""
    from mmcompose.align.reproduce_report import build_doc, write_report

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    units = [(d, v, s) for d in tasks for v in budget.variants for s in budget.seeds]
    results: dict[tuple[str, str, str], list[tuple[dict, dict]]] = {}
    started = time.perf_counter()
    for n, (data, variant, seed) in enumerate(units, 1):
        path = work / f"{_unit_key(data, variant, seed, budget)}.safetensors"
        unit = _load_unit(path)
        cached = unit is not None
        if unit is None:
            unit = run_unit(variant, data, seed, budget)
            _save_unit(path, *unit)
        hits, info = unit
        results.setdefault((data.task, data.text_encoder, variant), []).append(unit)
        r1 = "  ".join(f"{d} R@1 {h[:, 0].mean() * 100:5.1f}" for d, h in hits.items())
        took = "cached" if cached else f"{info['seconds']:.0f} s"
        log(
            f"[{n}/{len(units)}] {data.task} {data.text_encoder} {variant} seed {seed}: {r1}"
            f"  ({took}, {time.perf_counter() - started:.0f} s elapsed)"
        )
    t = dict(timings or {})
    t["ablation"] = round(time.perf_counter() - started, 1)
    doc = build_doc(tasks, budget, results, t)
    write_report(out_dir, doc, results, force=force)
    shutil.rmtree(work, ignore_errors=True)
    return AlignmentRun(out_dir, doc)


def plan(
    budget: str | AlignBudget = "full", seeds: str | Sequence[int] | None = None
) -> AlignBudget:
    """The run's budget with every option checked (nothing runs yet)."""
    from mmcompose.reproduce import parse_seeds

    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ConfigError(f"unknown budget {budget!r}", hint=f"use {' or '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    if seeds is not None:
        budget = budget.model_copy(update={"seeds": parse_seeds(seeds)})
    bad = [t for t in budget.tasks if t not in TASKS] + [
        v for v in budget.variants if v not in VARIANTS
    ]
    if bad:
        raise ConfigError(f"unknown task/variant {bad}", hint=f"{list(TASKS)}, {list(VARIANTS)}")
    return budget


def run_alignment_reproduction(
    out_dir: str | Path,
    *,
    budget: str | AlignBudget = "full",
    seeds: str | Sequence[int] | None = None,
    force: bool = False,
    progress: bool = True,
    feature_root: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> AlignmentRun:
    """Check the options and the output path, then features -> ablation -> report."""
    from mmcompose.fs import exclusive, refuse_existing

    b = plan(budget, seeds)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    with exclusive(out_dir, what="alignment reproduction"):
        started = time.perf_counter()
        tasks = []
        for task in b.tasks:
            for enc in b.text_encoders:
                t0 = time.perf_counter()
                log(f"features: {task} with text encoder {enc}")
                data = load_task(
                    task,
                    enc,
                    b.image_grid,
                    max_items=b.max_items.get(task),
                    feature_root=feature_root,
                    progress=progress,
                )
                tasks.append(data)
                log(f"features: {task} / {enc} ready in {time.perf_counter() - t0:.0f} s "
                    f"({json.dumps(tasks[-1].info['counts'])})")  # fmt: skip
        timings = {"features": round(time.perf_counter() - started, 1)}
        run = run_ablation(tasks, b, out_dir, force=force, log=log, timings=timings)
    print(f"mmcompose: alignment reproduction written to {out_dir}", file=sys.stderr)
    return run
