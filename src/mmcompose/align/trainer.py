"""Training the Alt-MoE connector: data, the alternating loop, checkpoints, output (the
config schema is :mod:`mmcompose.align.config`, re-exported here).

``run_align(config.yaml, OUT_DIR)`` is the whole command: load the YAML config, build (or
reuse) the feature stores, train, early-stop on validation recall, evaluate the test split and
write ``OUT_DIR`` (config.json, model.safetensors, metrics.json with the routing diagnostics,
and routing.png under ``eval.figures``) atomically. ``continue_from=DIR`` adds modalities to a trained connector
(:mod:`mmcompose.align.continuation`: new parts only, the rest frozen).

Data come in groups (:mod:`mmcompose.align.data`): several modalities, each paired with text,
and media pairs through a shared key; each direction draws its batches from its group, with
the group's own step counter, so a group walks through its epochs in order however often the
schedule visits it. One group (one modality and text, or synthetic data) trains exactly as
before groups existed.

Schedule (:mod:`mmcompose.align.schedule`). ``alternating`` (the reference): step i trains
direction ``(i // period) mod D`` only, or with ``train.schedule_weights`` a smooth weighted
round-robin; the shared MoE is updated every step, a direction's own heads only on its turns.
``joint`` (baseline): every step averages the losses of all D directions (weighted by the
schedule weights if given; D forward/backward passes per step; both schedules take the same
number of optimizer steps).

Data-parallel under torchrun: rank r takes slice r of each global batch; the contrastive
features are gathered with gradient (``gather_with_grad``) so every rank's negatives are the
whole global batch, and gradients are averaged over ranks by one all-reduce per step. We do
that rather than wrap the module in ``DistributedDataParallel`` because alternating steps
leave different heads unused each step, which DDP handles only with
``find_unused_parameters`` and by zero-filling their gradients (AdamW would then decay and
move heads that the single-process run leaves alone). The result equals one process running
the global batch.

Over 600 lines: the loop, its checkpoint and the command that runs it read best together.

Resumable: a checkpoint (model, optimizer, best-so-far, early-stop counter) is written every
``checkpoint_every`` steps to ``<OUT_DIR>.ckpt/`` (safetensors + JSON, replaced atomically; see
:mod:`mmcompose.checkpoint`); data order and dropout are functions of (seed, step), so an
interrupted run resumed from it ends with exactly the same weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from mmcompose.align.config import (
    AlignConfig,
    DataConfig,
    SyntheticData,
    TrainConfig,
    load_align_config,
)
from mmcompose.align.continuation import Continuation, compare_recall, open_continuation
from mmcompose.align.data import (
    AlignData,
    KeyedSplit,
    Layout,
    direction_sources,
    evaluate_data,
    load_align_data,
    load_data,
    pair_batch,
    resolve_directions,
    source_rows,
)
from mmcompose.align.evaluate import PairedSplit, mean_r1
from mmcompose.align.losses import gather_with_grad, info_nce, regression_loss, step_loss
from mmcompose.align.moe import AltMoEConnector, ConnectorConfig, direction_name
from mmcompose.align.schedule import direction_schedule, resolve_weights, steps_before
from mmcompose.checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.fs import atomic_dir, exclusive, refuse_existing, write_json_atomic

__all__ = [
    "AlignConfig",
    "AlignData",
    "AlignResult",
    "DataConfig",
    "SyntheticData",
    "TrainConfig",
    "batch_rows",
    "build_connector",
    "direction_schedule",
    "learning_rate",
    "load_align_config",
    "load_align_data",
    "load_data",
    "run_align",
    "train_connector",
]


# =========================================================================== schedule (pure)
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_rows(n: int, batch: int, step: int, seed: int, stream: int = 0) -> np.ndarray:
    """Global batch of ``step``: epoch-wise permutations keyed by (seed, epoch), drop-last.

    A pure function of the step, so resuming needs no sampler state. ``stream`` > 0 gives a
    group of its own permutations (stream 0 is the single group's, as before groups)."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    key = [seed, epoch] if stream == 0 else [seed, epoch, stream]
    perm = np.random.default_rng(key).permutation(n)
    return perm[i * batch : (i + 1) * batch]


# =========================================================================== training
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_distributed() -> _Dist:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owns)


def _average_gradients(model: nn.Module, world: int) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms and the direction/task embeddings are not decayed.
    Frozen parameters (a continuation's old ones) are left out of the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith("_emb") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _as_data(splits: dict[str, PairedSplit] | AlignData) -> AlignData:
    return splits if isinstance(splits, AlignData) else AlignData.from_paired(splits)


def build_connector(
    cfg: AlignConfig,
    train: PairedSplit | AlignData,
    directions: list[tuple[str, str]] | None = None,
) -> AltMoEConnector:
    """A fresh connector over the data's modalities (widths from the features) and directions
    (given, else the configured ones checked against the data, else every pairable pair)."""
    data = train if isinstance(train, AlignData) else AlignData.from_paired({"train": train})
    if directions is None:
        directions = resolve_directions(cfg.directions, data.layout(), cfg.data.cross_key)
    connector_cfg = cfg.connector.model_copy(
        update={"modalities": data.dims(), "directions": tuple(directions)}
    )
    try:
        connector_cfg = ConnectorConfig.model_validate(connector_cfg.model_dump())
    except ValidationError as exc:
        raise ConfigError(f"invalid connector/directions: {exc}") from None
    return AltMoEConnector(connector_cfg)


@dataclass(frozen=True)
class _Plan:
    """Where each trained direction's batches come from: its group, batch size, stream."""

    group: dict[tuple[str, str], str]
    batch: dict[tuple[str, str], int]
    stream: dict[str, int]  # group -> batch_rows stream (0 for the first, as before groups)
    members: dict[str, frozenset[int]]  # group -> indices of its trained directions


def _plan(data: AlignData, directions: list[tuple[str, str]], batch_size: int, world: int) -> _Plan:
    group, batch = {}, {}
    for d in directions:
        name = data.group_of(d)
        if name is None:
            raise ConfigError(f"direction {direction_name(d)}: no paired data to train it on")
        group[d] = name
        n = source_rows(data.train[name], d)
        batch[d] = min(batch_size, n)
        if batch[d] < 2:
            raise ConfigError(f"direction {direction_name(d)} has {n} training pair(s); needs 2+")
        if batch[d] % world:
            raise ConfigError(f"batch_size {batch[d]} is not divisible by the {world} ranks")
    names = list(dict.fromkeys(group[d] for d in directions))
    members = {g: frozenset(i for i, d in enumerate(directions) if group[d] == g) for g in names}
    return _Plan(group, batch, {g: i for i, g in enumerate(names)}, members)


def _direction_loss(
    model: AltMoEConnector,
    group: PairedSplit | KeyedSplit,
    direction: tuple[str, str],
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    local: slice,
    cfg: TrainConfig,
) -> torch.Tensor:
    src, tgt = direction
    src_rows, tgt_rows, keys = rows
    tokens, mask = group.features[src].batch(src_rows[local])
    pooled = group.features[tgt].pooled[tgt_rows[local]]
    target = torch.as_tensor(np.asarray(pooled), dtype=torch.float32)
    out = model(direction, tokens, mask)
    queries = gather_with_grad(out.cl)
    keys_cl = gather_with_grad(model.target_cl(direction, target))
    l_cl = info_nce(queries, keys_cl, cfg.temperature, torch.as_tensor(keys))
    l_reg = regression_loss(out.reg, target)
    return step_loss(l_cl, l_reg, cfg.cl_weight, cfg.reg_weight) + cfg.balance_weight * out.aux_loss


def _train_step(
    model: AltMoEConnector,
    data: AlignData,
    plan: _Plan,
    active: list[tuple[str, str]],
    counters: dict[str, int],
    seed: int,
    dist: _Dist,
    cfg: TrainConfig,
    weights: dict[tuple[str, str], int] | None,
) -> float:
    total = torch.zeros(())
    for d in active:
        g = plan.group[d]
        group, batch = data.train[g], plan.batch[d]
        rows = batch_rows(source_rows(group, d), batch, counters[g], seed, plan.stream[g])
        paired = pair_batch(group, d, rows, seed, counters[g])
        per_rank = batch // dist.world
        local = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        term = _direction_loss(model, group, d, paired, local, cfg)
        if weights is None:
            total = total + term / len(active)
        else:
            total = total + term * weights[d] / sum(weights[a] for a in active)
    total.backward()
    return float(total.detach())


@dataclass
class TrainOutcome:
    model: AltMoEConnector
    steps: int
    best_val: float
    best_step: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    trained: list[tuple[str, str]] = field(default_factory=list)


def train_connector(
    cfg: AlignConfig,
    splits: dict[str, PairedSplit] | AlignData,
    checkpoint_dir: Path | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    directions: list[tuple[str, str]] | None = None,
    base: Continuation | None = None,
) -> TrainOutcome:
    """The training loop (features already in memory); returns the best-on-validation model.

    ``splits``: one row-paired split per name, or :class:`AlignData` (several groups).
    ``directions``: those to train (default: the configured ones checked against the data).
    ``base``: a connector to extend; only the directions it lacks are trained."""
    dist = _init_distributed()
    tc = cfg.train
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    data = _as_data(splits)
    if directions is None:
        directions = resolve_directions(cfg.directions, data.layout(), cfg.data.cross_key)
    torch.manual_seed(cfg.seed)
    if base is None:
        model = build_connector(cfg, data, directions)
        trained = list(model.directions)
    else:
        trained = base.new_directions(directions)
        model = base.extend(cfg, data.dims(), trained)
    try:
        weight_list = resolve_weights(tc.schedule_weights, trained)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    weights = None if weight_list is None else dict(zip(trained, weight_list, strict=True))
    plan = _plan(data, trained, tc.batch_size, dist.world)
    optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr)
    state: dict[str, Any] = {
        "step": 0,
        "best_val": -1.0,
        "best_step": -1,
        "bad": 0,
        "history": [],
        "best_model": None,
    }
    ckpt = checkpoint_dir
    fingerprint = cfg.fingerprint() + f"/world{dist.world}"
    if base is not None:
        fingerprint += f"/from:{base.sha256[:16]}"
    saved = load_checkpoint(ckpt) if ckpt is not None else None
    if saved is not None and saved[1].get("fingerprint") == fingerprint:
        state = _restore(saved, ckpt, model, optimizer)
    elif saved is not None and dist.main:
        print(f"mmcompose: {ckpt} is from another config; starting over", file=sys.stderr)

    def evaluate_val() -> float:
        res = evaluate_data(model, data, "val", trained, (cfg.eval.space,), fallback="train")
        return mean_r1(res[cfg.eval.space])

    def checkpoint() -> None:
        if ckpt is not None and dist.main:
            _save(ckpt, fingerprint, model, optimizer, state)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=tc.max_steps,
        initial=state["step"],
        desc="align",
        disable=not (progress and dist.main),
        file=sys.stderr,
    )
    model.train()
    stopped = False
    while state["step"] < tc.max_steps:
        step = state["step"]
        if state["bad"] >= tc.patience:
            stopped = True
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, tc)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 7919 + dist.rank)  # dropout, per step
        active = direction_schedule(step, trained, tc.schedule, tc.period, weight_list)
        counters = {
            g: steps_before(step, m, len(trained), tc.schedule, tc.period, weight_list)
            for g, m in plan.members.items()
        }
        loss = _train_step(model, data, plan, active, counters, cfg.seed, dist, tc, weights)
        _average_gradients(model, dist.world)
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        if state["step"] % tc.eval_every == 0 or state["step"] == tc.max_steps:
            score = evaluate_val()
            state["history"].append({"step": state["step"], "loss": loss, "val_r1": score})
            if score > state["best_val"]:
                state.update(best_val=score, best_step=state["step"], bad=0)
                state["best_model"] = copy.deepcopy(model.state_dict())
            else:
                state["bad"] += 1
            bar.set_postfix(
                loss=f"{loss:.3f}", val_r1=f"{score:.1f}", best=f"{state['best_val']:.1f}"
            )
        if state["step"] % tc.checkpoint_every == 0:
            checkpoint()
        bar.update(1)
        if on_step is not None:
            on_step(state["step"])
    bar.close()
    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    model.eval()
    return TrainOutcome(
        model,
        state["step"],
        state["best_val"],
        state["best_step"],
        stopped,
        state["history"],
        trained,
    )


_STATE_KEYS = ("step", "best_val", "best_step", "bad", "history")


def _save(
    ckpt: Path,
    fingerprint: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Model, best model and optimizer moments as tensors; counters and history as JSON."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    if state["best_model"] is not None:
        tensors.update({f"best/{k}": v for k, v in state["best_model"].items()})
    opt_tensors, opt_meta = optimizer_to_flat(optimizer.state_dict(), "optimizer")
    meta = {
        "fingerprint": fingerprint,
        "state": {k: state[k] for k in _STATE_KEYS},
        "has_best": state["best_model"] is not None,
        "optimizer": opt_meta,
    }
    save_checkpoint(ckpt, {**tensors, **opt_tensors}, meta)


def _restore(
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]],
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    tensors, meta = saved

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        state = {k: meta["state"][k] for k in _STATE_KEYS}
        model.load_state_dict(part("model/"))
        state["best_model"] = part("best/") if meta["has_best"] else None
        optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"], "optimizer"))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged or incomplete ({_first_line(exc)})",
            hint=f"delete {ckpt} to start over",
        ) from None
    return state


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# =========================================================================== command
@dataclass
class AlignResult:
    out_dir: Path
    metrics: dict[str, Any]
    steps: int
    best_val: float
    best_step: int
    stopped_early: bool
    seconds: float

    def summary(self) -> str:
        m = self.metrics
        head = (
            f"aligned ({m['connector']}, {m['schedule']}) -> {self.out_dir}: {self.steps} steps"
            f"{' (early stop)' if self.stopped_early else ''}, best val mean R@1 "
            f"{self.best_val:.1f} at step {self.best_step}, {self.seconds:.0f} s"
        )
        lines = [head]
        for space, per_dir in m.get("test", {}).items():
            for name, r in per_dir.items():
                lines.append(
                    f"  test [{space}] {name:<14} R@1 {r['R@1']:5.1f}  R@5 {r['R@5']:5.1f}  "
                    f"R@10 {r['R@10']:5.1f}  ({r['queries']} queries, {r['gallery']} gallery)"
                )
        routing = m.get("routing", {})
        if routing.get("directions"):
            o = routing["overall"]
            lines.append(
                f"  routing [{routing['split']}]: load entropy {o['load_entropy_norm']:.2f}, "
                f"max load {o['max_load']:.2f} (balanced {1 / routing['num_experts']:.2f}), "
                f"dead experts {routing['dead'] or 'none'}"
            )
        cont = m.get("continuation")
        if cont:
            kept = [
                r["within_ci"] for per in cont.get("old_recall", {}).values() for r in per.values()
            ]
            lines.append(
                f"  continued from {cont['from']['path']}: added "
                f"{', '.join(cont['new_directions'])}; old parameters unchanged: "
                f"{cont['old_parameters_unchanged']}; old recall within its 95% CI: "
                f"{sum(kept)}/{len(kept)}"
            )
        return "\n".join(lines)


def _write_output(
    out_dir: Path,
    cfg: AlignConfig,
    outcome: TrainOutcome,
    stores: dict[str, str],
    metrics: dict[str, Any],
    force: bool,
    base: Continuation | None = None,
) -> None:
    from safetensors.torch import save_file

    import mmcompose

    encoders = {m: r.model_dump(mode="json") for m, r in cfg.encoders.items()}
    meta: dict[str, Any] = {
        "format": 1,
        "kind": "alt-moe",
        "connector": outcome.model.cfg.model_dump(mode="json"),
        "encoders": encoders,
        "feature_stores": stores,
        "space": cfg.eval.space,
        "text_field": cfg.data.text_field,
        "align_config": cfg.model_dump(mode="json"),
        "created_with": {
            "mmcompose": getattr(mmcompose, "__version__", "unknown"),
            "torch": torch.__version__,
        },
    }
    if base is not None:  # the old modalities' encoders and stores stay recorded
        meta["encoders"] = {**base.meta.get("encoders", {}), **encoders}
        meta["feature_stores"] = {**base.meta.get("feature_stores", {}), **stores}
        meta["continued_from"] = base.record()
    figure = cfg.eval.figures and bool(metrics.get("routing", {}).get("directions"))
    if figure:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError(
                "eval.figures needs matplotlib", hint="pip install 'mmcompose[bench]'"
            ) from None
    with atomic_dir(out_dir, overwrite=force) as tmp:
        state = {k: v.detach().contiguous() for k, v in outcome.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "config.json", meta)
        if figure:
            from mmcompose.align.diagnostics import plot_routing

            plot_routing(metrics["routing"], tmp / "routing.png")


def run_align(
    config_path: str | Path,
    out_dir: str | Path,
    force: bool = False,
    *,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
    continue_from: str | Path | None = None,
) -> AlignResult:
    """``mmcompose align CONFIG.yaml -o OUT_DIR [--from DIR]``: train, evaluate, write OUT_DIR
    atomically.

    An existing OUT_DIR is refused unless ``force``. An interrupted run leaves
    ``<OUT_DIR>.ckpt/``; running the same config again resumes from it (``resume=False``
    starts over). ``continue_from``: a trained alignment folder to add the config's new
    directions to (its own parameters frozen)."""
    started = time.perf_counter()
    cfg = load_align_config(config_path)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    base = None
    if continue_from is not None:
        base = open_continuation(continue_from)
        base.check_config(cfg)
        if cfg.data.kind == "synthetic":
            base.check_dims(cfg.data.synthetic.dims)
    dist = _init_distributed()
    with exclusive(out_dir, what="alignment output", enabled=dist.main):
        return _run_align(cfg, out_dir, force, progress, resume, on_step, dist, started, base)


def _routing(
    model: AltMoEConnector, data: AlignData, split: str, directions: list[tuple[str, str]]
) -> dict[str, Any]:
    """The routing diagnostics over one eval pass of each direction's source items."""
    from mmcompose.align.diagnostics import routing_report

    if model.cfg.kind != "moe":
        return {}
    sources = direction_sources(data, split, directions)
    return {"split": split, **routing_report(model, sources)} if sources else {}


def _run_align(
    cfg: AlignConfig,
    out_dir: Path,
    force: bool,
    progress: bool,
    resume: bool,
    on_step: Callable[[int], None] | None,
    dist: _Dist,
    started: float,
    base: Continuation | None = None,
) -> AlignResult:
    ckpt_dir = out_dir.with_name(out_dir.name + ".ckpt")
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    def check(_layout: Layout, directions: list[tuple[str, str]]) -> None:
        if base is not None:
            base.new_directions(directions)  # nothing to add: refused before any encoding

    if not dist.main:
        dist.barrier()  # rank 0 builds the feature stores first; the others then reuse them
    try:
        data, directions = load_align_data(cfg, progress=progress and dist.main, check=check)
    finally:
        if dist.main:
            dist.barrier()
    if base is not None:
        base.check_dims(data.dims())
    outcome = train_connector(
        cfg, data, ckpt_dir, progress=progress, on_step=on_step, directions=directions, base=base
    )
    model_dirs = list(outcome.model.directions)
    metrics: dict[str, Any] = {
        "connector": cfg.connector.kind,
        "schedule": cfg.train.schedule,
        "seed": cfg.seed,
        "steps": outcome.steps,
        "best_step": outcome.best_step,
        "best_val_mean_r1": outcome.best_val,
        "stopped_early": outcome.stopped_early,
        "history": outcome.history,
        "positives": "same match key (caption/label); text de-duplicated per key",
        "num_parameters": sum(p.numel() for p in outcome.model.parameters()),
    }
    if len({g for s in data.splits.values() for g in s}) > 1 or cfg.train.schedule_weights:
        metrics["directions"] = {
            direction_name(d): data.group_of(d) for d in model_dirs if data.group_of(d)
        }
        metrics["schedule_weights"] = cfg.train.schedule_weights
    for split in ("val", cfg.eval.split):
        if split in data.splits:
            metrics[split] = evaluate_data(outcome.model, data, split, model_dirs)
    if base is not None:
        metrics["continuation"] = _continuation_report(base, outcome, data, cfg.eval.split)
    eval_split = cfg.eval.split if cfg.eval.split in data.splits else "val"
    routing = _routing(outcome.model, data, eval_split, model_dirs)
    if routing:
        metrics["routing"] = routing
    if dist.main:
        _write_output(out_dir, cfg, outcome, data.stores, metrics, force, base)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.barrier()
    if dist.owns_group:
        torch.distributed.destroy_process_group()
    return AlignResult(
        out_dir,
        metrics,
        outcome.steps,
        outcome.best_val,
        outcome.best_step,
        outcome.stopped_early,
        time.perf_counter() - started,
    )


def _continuation_report(
    base: Continuation, outcome: TrainOutcome, data: AlignData, split: str
) -> dict[str, Any]:
    """Old directions' recall before (the continued connector) and after, on the same data."""
    old = [d for d in base.directions if data.group_of(d) is not None]
    report: dict[str, Any] = {
        "from": base.record(),
        "new_directions": [direction_name(d) for d in outcome.trained],
        "trained_parameters": sum(p.numel() for p in outcome.model.parameters())
        - base.frozen_count(),
        "frozen_parameters": base.frozen_count(),
        "old_parameters_unchanged": base.unchanged(outcome.model),
        "old_recall_split": split,
        "old_recall": {},
    }
    if old and split in data.splits:
        before = evaluate_data(base.connector, data, split, old)
        after = evaluate_data(outcome.model, data, split, old)
        report["old_recall"] = compare_recall(before, after)
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m mmcompose.align.trainer CONFIG -o OUT`` (the torchrun entry point)."""
    parser = argparse.ArgumentParser(prog="python -m mmcompose.align.trainer")
    parser.add_argument("config")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from", dest="continue_from", default=None)
    args = parser.parse_args(argv)
    result = run_align(
        args.config,
        args.out,
        args.force,
        progress=not args.no_progress,
        continue_from=args.continue_from,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary())


if __name__ == "__main__":
    main()
