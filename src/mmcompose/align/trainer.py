"""Training the Alt-MoE connector: data, the alternating loop, checkpoints, output (the
config schema is :mod:`mmcompose.align.config`, re-exported here).

``run_align(config.yaml, OUT_DIR)`` is the whole command: load the YAML config, build (or
reuse) the feature stores, train, early-stop on validation recall, evaluate the test split and
write ``OUT_DIR`` (config.json, model.safetensors, metrics.json) atomically.

Schedule. ``alternating`` (the reference): step i trains direction ``(i // period) mod D``
only; the shared MoE is updated every step, a direction's own heads only on its turns.
``joint`` (baseline): every step averages the losses of all D directions (so it spends D
forward/backward passes per step; both schedules take the same number of optimizer steps).

Data-parallel under torchrun: rank r takes slice r of each global batch; the contrastive
features are gathered with gradient (``gather_with_grad``) so every rank's negatives are the
whole global batch, and gradients are averaged over ranks by one all-reduce per step. We do
that rather than wrap the module in ``DistributedDataParallel`` because alternating steps
leave different heads unused each step, which DDP handles only with
``find_unused_parameters`` and by zero-filling their gradients (AdamW would then decay and
move heads that the single-process run leaves alone). The result equals one process running
the global batch.

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
    SPLITS,
    AlignConfig,
    DataConfig,
    SyntheticData,
    TrainConfig,
    load_align_config,
)
from mmcompose.align.evaluate import PairedSplit, evaluate_split, mean_r1
from mmcompose.align.features import (
    ModalityFeatures,
    build_feature_store,
)
from mmcompose.align.losses import gather_with_grad, info_nce, regression_loss, step_loss
from mmcompose.align.moe import AltMoEConnector, ConnectorConfig
from mmcompose.checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.fs import atomic_dir, exclusive, refuse_existing, write_json_atomic
from mmcompose.io import load_jsonl

__all__ = [
    "AlignConfig",
    "AlignResult",
    "DataConfig",
    "SyntheticData",
    "TrainConfig",
    "batch_rows",
    "direction_schedule",
    "learning_rate",
    "load_align_config",
    "load_data",
    "run_align",
    "train_connector",
]


# =========================================================================== data
def _synthetic(cfg: SyntheticData, seed: int) -> dict[str, PairedSplit]:
    rng = np.random.default_rng(seed)
    maps = {m: rng.normal(size=(cfg.rank, d)) / math.sqrt(cfg.rank) for m, d in cfg.dims.items()}
    splits: dict[str, PairedSplit] = {}
    start = 0
    for split, n in cfg.sizes.items():
        z = rng.normal(size=(n, cfg.rank))
        feats = {}
        for m, w in maps.items():
            t = cfg.tokens.get(m, 4)
            tokens = (z @ w)[:, None, :] + cfg.noise * rng.normal(size=(n, t, w.shape[1]))
            feats[m] = ModalityFeatures.from_token_list(list(tokens.astype(np.float32)))
        ids = [f"{split}/{i}" for i in range(n)]
        splits[split] = PairedSplit(feats, np.arange(start, start + n), ids)
        start += n
    return splits


def _manifest_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".jsonl" or path.is_file():
        return path
    from mmcompose.assets.cache import cache_dir

    manifest = cache_dir() / "datasets" / name / "manifest.jsonl"
    if not manifest.is_file():
        from mmcompose.assets.datasets import prepare_datasets

        prepare_datasets([name])
    return manifest


def _read_records(datasets: list[str]) -> list[dict[str, Any]]:
    records = []
    for name in datasets:
        records += [rec for _, rec in load_jsonl(_manifest_path(name), "manifest")]
    return records


def load_data(
    cfg: AlignConfig, progress: bool = True
) -> tuple[dict[str, PairedSplit], dict[str, str]]:
    """Splits of row-aligned features, and {modality: feature store path} (empty if synthetic)."""
    if cfg.data.kind == "synthetic":
        return _synthetic(cfg.data.synthetic, cfg.seed), {}
    records = _read_records(cfg.data.datasets)
    key_field = cfg.data.match_key or cfg.data.text_field
    media = sorted({r["modality"] for r in records})
    if len(media) != 1:
        raise ConfigError(f"one non-text modality per config, the datasets hold {media}")
    modality = media[0]
    for m in (modality, "text"):
        if m not in cfg.encoders:
            raise ConfigError(f"no encoder configured for modality {m!r} (encoders.{m})")
    missing = [r["id"] for r in records if not r.get(cfg.data.text_field) or key_field not in r]
    if missing:
        raise ConfigError(
            f"{len(missing)} records lack {cfg.data.text_field!r} or {key_field!r}, e.g. {missing[0]}"
        )
    ids = [r["id"] for r in records]
    root = cfg.feature_root
    stores = {
        modality: build_feature_store(
            cfg.encoders[modality], ids, [r["path"] for r in records], root, progress=progress
        ),
        "text": build_feature_store(
            cfg.encoders["text"],
            ids,
            [r[cfg.data.text_field] for r in records],
            root,
            progress=progress,
        ),
    }
    all_feats = {m: s.features() for m, s in stores.items()}
    key_of = {k: i for i, k in enumerate(sorted({str(r[key_field]) for r in records}))}
    keys = np.array([key_of[str(r[key_field])] for r in records])
    full = PairedSplit(all_feats, keys, ids, frozenset({"text"}))
    splits = {}
    for split in SPLITS:
        rows = np.array(
            [i for i, r in enumerate(records) if r.get("split") == split], dtype=np.int64
        )
        if len(rows):
            splits[split] = full.take(rows)
    if "train" not in splits:
        raise ConfigError("the datasets have no train split")
    return splits, {m: str(s.path) for m, s in stores.items()}


# =========================================================================== schedule (pure)
def direction_schedule(
    step: int, directions: list[tuple[str, str]], schedule: str, period: int = 1
) -> list[tuple[str, str]]:
    """Directions trained at ``step``: one, in turn (alternating), or all (joint)."""
    if schedule == "joint":
        return list(directions)
    return [directions[(step // period) % len(directions)]]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_rows(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Global batch of ``step``: epoch-wise permutations keyed by (seed, epoch), drop-last.

    A pure function of the step, so resuming needs no sampler state."""
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
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
    """Decay matrices only; biases, norms and the direction/task embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith("_emb") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _directions(cfg: AlignConfig, modalities: list[str]) -> list[tuple[str, str]]:
    if cfg.directions is not None:
        return [tuple(d) for d in cfg.directions]  # type: ignore[misc]
    return [(a, b) for a in modalities for b in modalities if a != b]


def build_connector(cfg: AlignConfig, train: PairedSplit) -> AltMoEConnector:
    modalities = sorted(train.features)
    connector_cfg = cfg.connector.model_copy(
        update={
            "modalities": {m: train.features[m].dim for m in modalities},
            "directions": tuple(_directions(cfg, modalities)),
        }
    )
    try:
        connector_cfg = ConnectorConfig.model_validate(connector_cfg.model_dump())
    except ValidationError as exc:
        raise ConfigError(f"invalid connector/directions: {exc}") from None
    return AltMoEConnector(connector_cfg)


def _train_step(
    model: AltMoEConnector,
    train: PairedSplit,
    directions: list[tuple[str, str]],
    rows: np.ndarray,
    local: np.ndarray,
    cfg: TrainConfig,
) -> float:
    groups = torch.as_tensor(train.keys[rows])
    total = torch.zeros(())
    for src, tgt in directions:
        tokens, mask = train.features[src].batch(local)
        target = torch.as_tensor(np.asarray(train.features[tgt].pooled[local]), dtype=torch.float32)
        out = model((src, tgt), tokens, mask)
        queries = gather_with_grad(out.cl)
        keys = gather_with_grad(model.target_cl((src, tgt), target))
        l_cl = info_nce(queries, keys, cfg.temperature, groups)
        l_reg = regression_loss(out.reg, target)
        loss = step_loss(l_cl, l_reg, cfg.cl_weight, cfg.reg_weight)
        total = total + (loss + cfg.balance_weight * out.aux_loss) / len(directions)
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


def train_connector(
    cfg: AlignConfig,
    splits: dict[str, PairedSplit],
    checkpoint_dir: Path | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainOutcome:
    """The training loop (features already in memory); returns the best-on-validation model."""
    dist = _init_distributed()
    tc = cfg.train
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    train = splits["train"]
    val = splits.get("val")
    batch = min(tc.batch_size, len(train))
    if batch % dist.world:
        raise ConfigError(f"batch_size {batch} is not divisible by the {dist.world} ranks")
    torch.manual_seed(cfg.seed)
    model = build_connector(cfg, train)
    directions = list(model.directions)
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
    saved = load_checkpoint(ckpt) if ckpt is not None else None
    if saved is not None and saved[1].get("fingerprint") == fingerprint:
        state = _restore(saved, ckpt, model, optimizer)
    elif saved is not None and dist.main:
        print(f"mmcompose: {ckpt} is from another config; starting over", file=sys.stderr)

    def evaluate_val() -> float:
        split = val if val is not None and len(val) else train
        return mean_r1(evaluate_split(model, split, directions, (cfg.eval.space,))[cfg.eval.space])

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
        rows = batch_rows(len(train), batch, step, cfg.seed)
        per_rank = batch // dist.world
        local = rows[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        active = direction_schedule(step, directions, tc.schedule, tc.period)
        loss = _train_step(model, train, active, rows, local, tc)
        _average_gradients(model, dist.world)
        nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
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
        model, state["step"], state["best_val"], state["best_step"], stopped, state["history"]
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
        return "\n".join(lines)


def _write_output(
    out_dir: Path,
    cfg: AlignConfig,
    outcome: TrainOutcome,
    stores: dict[str, str],
    metrics: dict[str, Any],
    force: bool,
) -> None:
    from safetensors.torch import save_file

    import mmcompose

    meta = {
        "format": 1,
        "kind": "alt-moe",
        "connector": outcome.model.cfg.model_dump(mode="json"),
        "encoders": {m: r.model_dump(mode="json") for m, r in cfg.encoders.items()},
        "feature_stores": stores,
        "space": cfg.eval.space,
        "text_field": cfg.data.text_field,
        "align_config": cfg.model_dump(mode="json"),
        "created_with": {
            "mmcompose": getattr(mmcompose, "__version__", "unknown"),
            "torch": torch.__version__,
        },
    }
    with atomic_dir(out_dir, overwrite=force) as tmp:
        state = {k: v.detach().contiguous() for k, v in outcome.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "config.json", meta)


def run_align(
    config_path: str | Path,
    out_dir: str | Path,
    force: bool = False,
    *,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> AlignResult:
    """``mmcompose align CONFIG.yaml -o OUT_DIR``: train, evaluate, write OUT_DIR atomically.

    An existing OUT_DIR is refused unless ``force``. An interrupted run leaves
    ``<OUT_DIR>.ckpt/``; running the same config again resumes from it (``resume=False``
    starts over)."""
    started = time.perf_counter()
    cfg = load_align_config(config_path)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    dist = _init_distributed()
    with exclusive(out_dir, what="alignment output", enabled=dist.main):
        return _run_align(cfg, out_dir, force, progress, resume, on_step, dist, started)


def _run_align(
    cfg: AlignConfig,
    out_dir: Path,
    force: bool,
    progress: bool,
    resume: bool,
    on_step: Callable[[int], None] | None,
    dist: _Dist,
    started: float,
) -> AlignResult:
    ckpt_dir = out_dir.with_name(out_dir.name + ".ckpt")
    if not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if not dist.main:
        dist.barrier()  # rank 0 builds the feature stores first; the others then reuse them
    splits, stores = load_data(cfg, progress=progress and dist.main)
    if dist.main:
        dist.barrier()
    outcome = train_connector(cfg, splits, ckpt_dir, progress=progress, on_step=on_step)
    directions = list(outcome.model.directions)
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
    for split in ("val", cfg.eval.split):
        if split in splits:
            metrics[split] = evaluate_split(outcome.model, splits[split], directions)
    if dist.main:
        _write_output(out_dir, cfg, outcome, stores, metrics, force)
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


def main(argv: list[str] | None = None) -> None:
    """``python -m mmcompose.align.trainer CONFIG -o OUT`` (the torchrun entry point)."""
    parser = argparse.ArgumentParser(prog="python -m mmcompose.align.trainer")
    parser.add_argument("config")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run_align(args.config, args.out, args.force, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary())


if __name__ == "__main__":
    main()
