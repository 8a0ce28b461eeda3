"""Training a single-modality MLLM on a base LLM: stage 1 (projector), stage 2 (+ LoRA).

Runs as one process or under torchrun (gloo on CPU, nccl on GPU). Data parallelism keeps the
*global* batch fixed: each rank takes a contiguous slice of it, sums its token losses, divides
by the global number of label tokens, and gradients are summed across ranks, so N processes
give the same model as one process with the same global batch (up to float summation order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mmcompose.checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from mmcompose.errors import CheckpointError, ConfigError, MMComposeError
from mmcompose.fs import atomic_dir, exclusive, refuse_existing
from mmcompose.model.config import AdapterSpec, LoRAConfig
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.model.processor import MMProcessor
from mmcompose.model.splice import IGNORE_INDEX
from mmcompose.train.config import (  # noqa: F401 (re-exported)
    LoRASettings,
    StageConfig,
    TrainConfig,
    load_train_config,
)
from mmcompose.train.data import Example, drop_unreadable, encode_example, load_conversations
from mmcompose.train.features import FeatureCache


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    seconds: float
    final_loss: float
    peak_rss_mb: float


# ----------------------------------------------------------------------------- distributed
def _dist_setup(device: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- batches
def _collate(
    examples: list[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return ids, mask, labels


def _batches(n: int, batch: int, epochs: float, seed: int) -> Iterator[list[int]]:
    """Global batches of example indices over ``epochs`` (fractional allowed), reshuffled per epoch."""
    total = math.ceil(n * epochs / batch)
    order: list[int] = []
    epoch = 0
    for _ in range(total):
        while len(order) < batch:
            g = torch.Generator().manual_seed(seed + epoch)
            order += torch.randperm(n, generator=g).tolist()
            epoch += 1
        yield order[:batch]
        order = order[batch:]


def _lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- the loop
def _trainables(model: MMComposeForCausalLM, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1: projector and prefix/suffix tokens (and an unfrozen encoder). Stage 2: those
    plus the LoRA adapters."""
    frozen = {m for m, t in model.towers.items() if t.cfg.freeze_encoder}
    params = []
    for name, p in model.named_parameters():
        train = name.startswith("towers.") and not (
            ".encoder." in name and name.split(".")[1] in frozen
        )
        train |= stage == 2 and ".lora." in name
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def _resolve_llm(name: str, base: Path) -> Path:
    p = Path(name) if Path(name).is_absolute() else base / name
    if p.is_dir():
        return p
    from mmcompose.assets.llm import BASE_LLMS, prepare_base_llm

    if name in BASE_LLMS:
        return prepare_base_llm(name)
    raise ConfigError(
        f"base_llm {name!r} is neither a folder nor a known base LLM",
        hint=f"known: {', '.join(BASE_LLMS)}",
    )


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    config_dir: Path = Path("."),
    force: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train and write the model folder at ``out_dir``; resumable from ``<out_dir>.checkpoint``.

    One training per output: a second one started meanwhile is refused (a lock on ``out_dir``
    held by rank 0), so two never write one checkpoint."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    rank, world = _dist_setup(config.device)
    with exclusive(out_dir, what="training output", enabled=rank == 0):
        return _train(config, out_dir, config_dir, force, progress, rank, world, started)


def _train(
    config: TrainConfig,
    out_dir: Path,
    config_dir: Path,
    force: bool,
    progress: bool,
    rank: int,
    world: int,
    started: float,
) -> TrainResult:
    from transformers import AutoTokenizer

    ckpt = Path(f"{out_dir}.checkpoint")
    digest = _config_digest(config)
    saved = _read_checkpoint(ckpt, digest)  # before any work: a bad checkpoint fails now
    _seed_all(config.seed)
    llm_dir = _resolve_llm(config.base_llm, config_dir)
    m = config.tower.modality
    names = ["text"] + ([m] if config.lora.strategy == "decoupled" else [])
    lora = LoRAConfig(
        strategy=config.lora.strategy,
        adapters={n: AdapterSpec(rank=config.lora.rank, alpha=config.lora.alpha) for n in names},
        dropout=config.lora.dropout,
    )
    model = MMComposeForCausalLM.from_base_llm(llm_dir, [config.tower], lora).to(config.device)
    processor = MMProcessor.from_config(
        model.config,
        AutoTokenizer.from_pretrained(str(llm_dir)),
        system_prompt=config.system_prompt,
    )
    cache_root = Path(config.feature_cache) if config.feature_cache else _default_cache()
    features = FeatureCache(cache_root, model.towers[m], processor)

    stages = [(1, config.stage1), (2, config.stage2)]
    datasets = {}
    for idx, st in stages:
        records = _records(st.data or config.data, config_dir, config.split, idx, config.seed)
        datasets[idx] = [encode_example(processor, r, config.max_length) for r in records]
    items = sorted({p for ex in (*datasets[1], *datasets[2]) for p in ex.inputs.get(m, [])})
    frozen = config.tower.freeze_encoder  # only a frozen encoder's outputs can be cached
    # Every file is read here, before training: a bad one fails or is skipped (on_corrupt).
    skipped: dict[str, str] = {}
    if rank == 0 and frozen:
        skipped = features.build(items, progress=progress, on_corrupt=config.on_corrupt)
    elif not frozen:
        skipped = processor.find_unreadable(m, items, config.on_corrupt)
    if world > 1:
        dist.barrier()
    if frozen and rank > 0:  # rank 0 has cached every readable file
        skipped = {i: f"{i}: unreadable" for i in items if not features.has(i)}
    if skipped:
        datasets = drop_unreadable(datasets, m, skipped, warn=rank == 0)

    resuming = saved is not None  # a resumed run has its initialised tower
    init_note: dict = {}
    if config.init_from and not resuming:
        init_note = _init_tower_from(model, m, Path(config.init_from), config_dir)
    elif config.projector_init == "lstsq" and not resuming:
        init_note = _anchor_projector(
            model, processor, features, datasets[2], m, frozen, config.init_ridge
        )
    state = _apply_checkpoint(saved, ckpt, model) if saved is not None else {}
    log: list[dict] = state.get("log", [])
    if init_note:
        log.append({"stage": 0, **init_note})
    pad = processor.tokenizer.pad_token_id or 0
    step_global = 0
    loss_value = float("nan")
    for idx, st in stages:
        data = datasets[idx]
        batches = list(_batches(len(data), st.batch_size, st.epochs, config.seed + 1000 * idx))
        if not batches:
            continue
        params = _trainables(model, idx)
        opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
        start = 0
        if state.get("stage") == idx:
            if "optimizer" in state:
                opt.load_state_dict(state["optimizer"])
            start = state["step"]
        elif state.get("stage", 0) > idx:
            continue
        warmup = int(st.warmup_ratio * len(batches))
        model.train()
        bar = tqdm(
            total=len(batches),
            initial=start,
            desc=f"stage {idx}",
            disable=not progress or rank != 0,
        )
        for step in range(start, len(batches)):
            glob = batches[step]
            per = math.ceil(len(glob) / world)
            mine = [data[i] for i in glob[rank * per : (rank + 1) * per]]
            n_tokens = sum(sum(1 for x in data[i].labels[1:] if x != IGNORE_INDEX) for i in glob)
            for g in opt.param_groups:
                g["lr"] = _lr(step, len(batches), warmup, st.lr)
            opt.zero_grad(set_to_none=False)
            loss_sum = torch.zeros(())
            if mine:
                ids, mask, labels = _collate(mine, pad)
                paths = [p for ex in mine for p in ex.inputs.get(m, [])]
                feats = {m: features.get(paths)} if paths and frozen else None
                raw = {m: processor.preprocess(m, paths)} if paths and not frozen else None
                out = model(
                    ids, mask, raw, modal_features=feats, labels=labels, loss_reduction="sum"
                )
                (out.loss / n_tokens).backward()
                loss_sum = out.loss.detach()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _all_sum(p.grad, world)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            loss_value = float(_all_sum(loss_sum.clone(), world)) / n_tokens
            log.append(
                {
                    "stage": idx,
                    "step": step + 1,
                    "loss": loss_value,
                    "lr": opt.param_groups[0]["lr"],
                }
            )
            bar.set_postfix(loss=f"{loss_value:.4f}")
            bar.update(1)
            step_global += 1
            if rank == 0 and (step + 1) % config.checkpoint_every == 0 and step + 1 < len(batches):
                _save_checkpoint(ckpt, model, opt, idx, step + 1, log, digest)
        bar.close()
        if rank == 0 and idx == 1:
            _save_checkpoint(ckpt, model, None, 2, 0, log, digest)
        state = {}
    model.eval()
    if rank == 0:
        with atomic_dir(out_dir, overwrite=force) as tmp:
            model.write_to(tmp, processor)
            (tmp / "train_config.json").write_text(config.model_dump_json(indent=2))
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
            from mmcompose.model.card import write_card

            write_card(tmp, name=out_dir.name)  # README.md: the model card
        _remove_checkpoint(ckpt)
    if world > 1:
        dist.barrier()
    return TrainResult(
        out_dir, step_global, time.perf_counter() - started, loss_value, _peak_rss_mb()
    )


def _init_tower_from(model: MMComposeForCausalLM, modality: str, path: Path, base: Path) -> dict:
    """Copy the trainable tower weights (not the encoder) of a trained model folder."""
    from mmcompose.io import load_state_dict

    path = path if path.is_absolute() else base / path
    prefix = f"towers.{modality}."
    try:
        state = load_state_dict(path)
    except (OSError, ValueError, MMComposeError) as e:
        raise ConfigError(f"init_from {path}: cannot read its weights: {e}") from None
    own = model.state_dict()
    take = {
        k: v for k, v in state.items() if k.startswith(prefix) and ".encoder." not in k and k in own
    }
    if not take:
        raise ConfigError(
            f"init_from {path} holds no {modality} tower weights",
            hint="point it at a model trained for the same modality",
        )
    _load_matching(
        model,
        take,
        f"init_from {path} holds weights of another tower setup",
        hint="use the same tower settings (encoder, projector, prefix/suffix) as that run",
    )
    return {"init_from": str(path), "tensors": len(take)}


def _anchor_projector(
    model: MMComposeForCausalLM,
    processor: MMProcessor,
    features: FeatureCache,
    examples: list[Example],
    modality: str,
    frozen: bool,
    ridge: float,
) -> dict:
    """Closed-form init of the projector's output layer (TrainConfig.projector_init)."""
    from mmcompose.train.anchor import answer_targets, fit_output_layer

    tower = model.towers[modality]
    special = set(processor.tokenizer.all_special_ids)
    paths, answers = [], []
    for ex in examples:
        ans = []
        for t in ex.labels:
            if t == IGNORE_INDEX:
                continue
            if t in special:
                break
            ans.append(t)
        if len(ex.inputs.get(modality, [])) == 1 and ans:
            paths.append(ex.inputs[modality][0])
            answers.append(ans)
    if not paths:
        return {}
    device = model.device  # cached features and preprocessed inputs come on the CPU
    with torch.no_grad():
        if frozen:
            feats = features.get(paths).to(device)
        else:
            feats = torch.cat(
                [
                    tower.encode(processor.preprocess(modality, paths[i : i + 32]).to(device))
                    for i in range(0, len(paths), 32)
                ]
            )
        n_out = tower.projector(feats[:1]).shape[1]
    embed = model.language_model.get_input_embeddings().weight.detach()
    newline = embed[processor.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]]
    targets = answer_targets(embed, answers, n_out, pad=newline)
    residual = fit_output_layer(tower.projector, feats.float(), targets, ridge)
    # Zero prefix/suffix vectors cost the frozen LLM half its reading of the block (9/19 vs
    # 18/19 with newlines, benchmarks/anchor_probe.py). Stages 1 and 2 then learn them.
    with torch.no_grad():
        for affix in (tower.prefix, tower.suffix):
            if affix is not None:
                affix.copy_(newline.expand_as(affix))
    return {"projector_init": "lstsq", "examples": len(paths), "relative_residual": residual}


def _records(data: str | list[str], base: Path, split: str, stage: int, seed: int) -> list[dict]:
    """Conversation records from a conversation JSON or from manifests (see TrainConfig.data)."""
    from mmcompose.bench.classify import read_manifest
    from mmcompose.train.data import conversations_from_manifest

    paths = [data] if isinstance(data, str) else list(data)
    records: list[dict] = []
    for p in paths:
        if p.startswith("dataset:"):
            from mmcompose.assets.datasets import prepare_datasets

            name = p.split(":", 1)[1]
            p = str(prepare_datasets(only=[name], progress=False)[name] / "manifest.jsonl")
        path = Path(p) if Path(p).is_absolute() else base / p
        if path.suffix == ".jsonl":
            rows = read_manifest(path, split)
            style = "caption" if stage == 1 else "label"
            records += conversations_from_manifest(rows, style, seed=seed + stage)
        else:
            records += load_conversations(path)
    return records


def _default_cache() -> Path:
    from mmcompose.assets.cache import cache_dir

    return cache_dir()


def _trainable_state(model: MMComposeForCausalLM) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if (n.startswith("towers.") and ".encoder." not in n) or ".lora." in n
    }


# Settings that do not change what a run computes: a resume may change them.
_RESUMABLE_CHANGES = {"feature_cache", "checkpoint_every", "device"}


def _config_digest(config: TrainConfig) -> str:
    """What a checkpoint must have been trained with for a resume to continue it."""
    data = config.model_dump(mode="json", exclude=_RESUMABLE_CHANGES)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(
    ckpt: Path, model, opt, stage: int, step: int, log: list[dict], digest: str
) -> None:
    """Trainable weights, optimizer moments and the RNG state (safetensors) + JSON."""
    tensors = {f"params/{n}": t for n, t in _trainable_state(model).items()}
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"stage": stage, "step": step, "log": log, "config_digest": digest, "optimizer": None}
    if opt is not None:
        opt_tensors, meta["optimizer"] = optimizer_to_flat(opt.state_dict(), "optimizer")
        tensors.update(opt_tensors)
    save_checkpoint(ckpt, tensors, meta)


def _load_matching(
    model: MMComposeForCausalLM, state: dict[str, torch.Tensor], problem: str, hint: str
) -> None:
    """Load ``state`` (non-strict), refusing a tensor this config does not build as it is."""
    own = model.state_dict()
    for name, t in state.items():
        if name not in own or own[name].shape != t.shape:
            got = tuple(own[name].shape) if name in own else "no such parameter"
            raise ConfigError(
                f"{problem}: {name} is {tuple(t.shape)} there, {got} in this config", hint=hint
            )
    model.load_state_dict(state, strict=False)


def _read_checkpoint(ckpt: Path, digest: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The checkpoint at ``ckpt`` (None: none there), refusing one of another config."""
    saved = load_checkpoint(ckpt)
    if saved is None:
        return None
    tensors, meta = saved
    ok = (
        meta.get("stage") in (1, 2)
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("log"), list)
        and "rng/torch" in tensors
    )
    if not ok:
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged: it lacks the stage, step, log or RNG state",
            hint=f"delete {ckpt} to start over",
        )
    if meta.get("config_digest") != digest:
        raise ConfigError(
            f"the checkpoint {ckpt} was written by a run with another config",
            hint=f"train with the config it came from, or delete {ckpt} to start over",
        )
    return saved


def _apply_checkpoint(
    saved: tuple[dict[str, torch.Tensor], dict], ckpt: Path, model: MMComposeForCausalLM
) -> dict:
    """Load the checkpoint's weights and RNG state; return stage, step, log (and optimizer)."""
    tensors, meta = saved
    params = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("params/")}
    _load_matching(
        model,
        params,
        f"the checkpoint {ckpt} was written by another model setup",
        hint=f"train with the config it came from, or delete {ckpt} to start over",
    )
    torch.set_rng_state(tensors["rng/torch"])
    state = {"stage": meta["stage"], "step": meta["step"], "log": meta["log"]}
    if meta.get("optimizer") is not None:
        state["optimizer"] = optimizer_from_flat(tensors, meta["optimizer"], "optimizer")
    return state


def _remove_checkpoint(ckpt: Path) -> None:
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
