"""``pointnet_meshes``: the PointNet tokenizer pretrained here, on the ``meshes`` dataset.

No pretrained point-cloud encoder is obtainable offline, and a randomly initialised one has to
be trained jointly with the projector, which rules out the feature cache. So we pretrain the
``pointnet`` tokenizer once (supervised classification of the mesh label with a small head on
pooled tokens, with rotation/scale/jitter augmentation, on the TRAIN split only), store it in
the asset cache like the converted encoders (``encoders/pointnet_meshes/``: ``config.json``,
``model.safetensors``, ``head.safetensors``, manifest with the training figures), and register
``pointnet_meshes``, a ``pointnet`` with the stored architecture that loads those weights.

Deterministic for a seed and thread count; ``mmcompose assets prepare --only pointnet_meshes``
takes about two minutes on a 2-core CPU. Unlike the converted encoders, building the encoder
never prepares it implicitly (that would start minutes of training): a missing asset raises
:class:`MissingAssetError` naming the command.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import model_validator
from torch import Tensor, nn

from mmcompose.assets.cache import (
    MANIFEST_NAME,
    MissingAssetError,
    atomic_dir,
    cache_dir,
    file_sizes,
    prepared_folder_is_complete,
    read_json,
    sha256_file,
    write_json_atomic,
)
from mmcompose.assets.weights import CONFIG_NAME, WEIGHTS_NAME, load_cached_weights, save_weights
from mmcompose.errors import MMComposeError
from mmcompose.model import media
from mmcompose.model.encoders import (
    PointNetEncoder,
    PointNetParams,
    pretrained_weights_enabled,
    register_encoder,
)

__all__ = [
    "POINTNET_MESHES",
    "POINTNET_MESHES_ARCH",
    "PointNetMeshesEncoder",
    "PretrainRecipe",
    "PretrainResult",
    "augment_cloud",
    "linear_probe_accuracy",
    "nearest_centroid_accuracy",
    "pooled_features",
    "prepare_pointnet_meshes",
    "pretrain_point_encoder",
]

POINTNET_MESHES = "pointnet_meshes"
# Bump when the recipe or architecture changes: a cached folder of another format is rebuilt.
POINTNET_MESHES_FORMAT = 1
# The tokenizer configs/train/point.yaml trained jointly before (1024 points, 32 tokens), with
# 16-point groups and 128 channels instead of 32 and 256: about 8x cheaper to pretrain, so 40
# epochs fit in ~2 minutes on a 2-core CPU, and 296 training clouds do not need more capacity.
POINTNET_MESHES_ARCH: dict[str, int] = {
    "num_points": 1024,
    "in_channels": 3,
    "num_groups": 32,
    "group_size": 16,
    "width": 128,
}
HEAD_NAME = "head.safetensors"  # the pretraining head, kept for reference
INSTALL_HINT = f"mmcompose assets prepare --only {POINTNET_MESHES}"


@dataclass(frozen=True)
class PretrainRecipe:
    """Hyperparameters of the supervised pretraining (recorded in the manifest)."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    dropout: float = 0.1  # in the head
    # Augmentation of each training cloud, drawn afresh every epoch: a random turn about the
    # z axis (the dataset's own pose variation is about z), per-axis scale, clipped jitter, and
    # a random subset of ``num_points`` (inference always takes the seed-0 subset).
    scale: tuple[float, float] = (0.8, 1.2)
    jitter_sigma: float = 0.01
    jitter_clip: float = 0.03
    seed: int = 0


class PoolHead(nn.Module):
    """Classifier on max- and mean-pooled tokens; only used to pretrain (stored for reference)."""

    def __init__(self, width: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * width),
            nn.Linear(2 * width, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, num_classes),
        )

    def forward(self, tokens: Tensor) -> Tensor:  # (n, G, w) -> (n, classes)
        return self.mlp(pool_tokens(tokens))


def pool_tokens(tokens: Tensor) -> Tensor:
    """(n, G, w) -> (n, 2w): max over tokens, then mean (the head's and the probe's input)."""
    return torch.cat([tokens.max(dim=1).values, tokens.mean(dim=1)], dim=-1)


def augment_cloud(
    points: np.ndarray, num_points: int, recipe: PretrainRecipe, rng: np.random.Generator
) -> Tensor:
    """One augmented training view (num_points, 3), normalised exactly as inference does."""
    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    xyz = xyz - xyz.mean(axis=0)
    xyz /= max(float(np.linalg.norm(xyz, axis=1).max()), 1e-12)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    xyz = (xyz @ rot.T) * rng.uniform(*recipe.scale, size=3)
    noise = rng.normal(0.0, recipe.jitter_sigma, size=xyz.shape)
    xyz = xyz + np.clip(noise, -recipe.jitter_clip, recipe.jitter_clip)
    return media.normalize_points(xyz, num_points, seed=int(rng.integers(2**31)))


def _inference_batch(clouds: Sequence[np.ndarray], params: PointNetParams) -> Tensor:
    return torch.stack([PointNetEncoder.preprocess(c, params) for c in clouds])


@torch.no_grad()
def pooled_features(
    encoder: PointNetEncoder, clouds: Sequence[np.ndarray], batch_size: int = 64
) -> Tensor:
    """Pooled tokens (n, 2w) of un-augmented clouds, preprocessed as at inference."""
    encoder.eval()
    out = [
        pool_tokens(encoder(_inference_batch(clouds[s : s + batch_size], encoder.params)))
        for s in range(0, len(clouds), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, 2 * encoder.output_dim)


def nearest_centroid_accuracy(
    train: Tensor, train_labels: Sequence[int], test: Tensor, test_labels: Sequence[int]
) -> float:
    """Cosine nearest-class-centroid probe: how separable frozen features are, no training."""
    if len(test_labels) == 0:
        return float("nan")
    y = torch.as_tensor(list(train_labels))
    mu = train.mean(dim=0, keepdim=True)  # centre first, or every cosine is near 1
    tr = nn.functional.normalize(train - mu, dim=-1)
    te = nn.functional.normalize(test - mu, dim=-1)
    classes = sorted(set(y.tolist()))
    centroids = nn.functional.normalize(torch.stack([tr[y == c].mean(0) for c in classes]), dim=-1)
    pred = torch.as_tensor(classes)[(te @ centroids.T).argmax(dim=-1)]
    return float((pred == torch.as_tensor(list(test_labels))).float().mean())


def linear_probe_accuracy(
    train: Tensor,
    train_labels: Sequence[int],
    evaluate: dict[str, tuple[Tensor, Sequence[int]]],
    steps: int = 300,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Logistic regression on standardised frozen features (full batch, seeded): what a
    trained projector could read off the encoder, unlike the head trained along with it."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    y = torch.as_tensor(list(train_labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(train.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    x = (train - mu) / sd
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(probe(x), y).backward()
        opt.step()
    out = {}
    with torch.no_grad():
        for name, (feats, labels) in evaluate.items():
            pred = probe((feats - mu) / sd).argmax(-1)
            hit = (pred == torch.as_tensor(list(labels))).float()
            out[name] = float(hit.mean()) if len(labels) else float("nan")
    return out


def head_accuracy(
    encoder: PointNetEncoder, head: PoolHead, clouds: Sequence[np.ndarray], labels: Sequence[int]
) -> float:
    return pooled_head_accuracy(head, pooled_features(encoder, clouds), labels)


@torch.no_grad()
def pooled_head_accuracy(head: PoolHead, pooled: Tensor, labels: Sequence[int]) -> float:
    """The pretraining head on features already pooled by :func:`pooled_features`."""
    if not labels:
        return float("nan")
    head.eval()
    pred = head.mlp(pooled).argmax(-1)
    return float((pred == torch.as_tensor(list(labels))).float().mean())


@dataclass
class PretrainResult:
    encoder: PointNetEncoder
    head: PoolHead
    log: list[dict[str, float]]  # per epoch: loss, augmented train accuracy, val accuracy
    seconds: float


def pretrain_point_encoder(
    clouds: Sequence[np.ndarray],
    labels: Sequence[int],
    num_classes: int,
    params: PointNetParams,
    recipe: PretrainRecipe = PretrainRecipe(),
    val: tuple[Sequence[np.ndarray], Sequence[int]] | None = None,
    progress: bool = False,
) -> PretrainResult:
    """Train a ``pointnet`` tokenizer + :class:`PoolHead` to classify ``clouds``.

    Deterministic: initialisation and dropout run under a forked global RNG seeded with
    ``recipe.seed``, shuffling and augmentation use their own seeded generators.
    """
    if len(clouds) != len(labels) or not clouds:
        raise MMComposeError("pretraining needs one label per cloud and at least one cloud")
    started = time.perf_counter()
    log: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        encoder = PointNetEncoder(params)
        head = PoolHead(encoder.output_dim, num_classes, recipe.dropout)
        trainable = [*encoder.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
        rng = np.random.default_rng(recipe.seed)
        y_all = torch.as_tensor(list(labels))
        steps_per_epoch = math.ceil(len(clouds) / recipe.batch_size)
        total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
        step = 0
        for epoch in range(recipe.epochs):
            encoder.train()
            head.train()
            order = rng.permutation(len(clouds))
            loss_sum, correct = 0.0, 0
            for s in range(0, len(order), recipe.batch_size):
                idx = order[s : s + recipe.batch_size]
                x = torch.stack(
                    [augment_cloud(clouds[i], params.num_points, recipe, rng) for i in idx]
                )
                y = y_all[idx]
                for g in opt.param_groups:
                    g["lr"] = _lr(step, total, warmup, recipe.lr)
                logits = head(encoder(x))
                loss = nn.functional.cross_entropy(
                    logits, y, label_smoothing=recipe.label_smoothing
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(-1) == y).sum())
            row = {
                "epoch": epoch + 1,
                "loss": round(loss_sum / len(clouds), 4),
                "train_acc_augmented": round(correct / len(clouds), 4),
            }
            if val is not None and len(val[1]):
                row["val_acc"] = round(head_accuracy(encoder, head, *val), 4)
            log.append(row)
            if progress:
                extra = f", val acc {row['val_acc']:.3f}" if "val_acc" in row else ""
                print(
                    f"mmcompose: {POINTNET_MESHES} epoch {epoch + 1}/{recipe.epochs}: loss "
                    f"{row['loss']:.3f}, train acc {row['train_acc_augmented']:.3f}{extra} "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    encoder.eval()
    head.eval()
    return PretrainResult(encoder, head, log, time.perf_counter() - started)


def _lr(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# =========================================================================== the cached asset
def pointnet_meshes_dir() -> Path:
    """Where the pretrained encoder is (or would be) stored; prepares nothing."""
    return cache_dir() / "encoders" / POINTNET_MESHES


def _stale_source(folder: Path) -> Path | None:
    """The training manifest, if it still exists but has changed since (e.g. the dataset was
    re-split: clouds trained on may now be val/test items, so the encoder must be retrained).
    A manifest that is gone does not invalidate the encoder, as a removed package does not."""
    meta = read_json(folder / MANIFEST_NAME)
    source = meta.get("source", {}) if isinstance(meta, dict) else {}
    path = Path(source.get("manifest") or "")
    changed = bool(source.get("manifest")) and path.is_file()
    return path if changed and sha256_file(path) != source.get("manifest_sha256") else None


def _is_complete(folder: Path) -> bool:
    return (
        prepared_folder_is_complete(folder, POINTNET_MESHES, None, POINTNET_MESHES_FORMAT)
        and _stale_source(folder) is None
    )


def _read_rows(manifest: Path) -> list[dict[str, Any]]:
    """Manifest rows; relative paths resolve against the manifest's folder."""
    from mmcompose.bench.classify import read_manifest

    rows = read_manifest(manifest, None)
    for r in rows:
        r["path"] = str(manifest.parent / r["path"])  # an absolute path stays as it is
    return rows


def _read_split(
    rows: Sequence[dict[str, Any]], split: str, index: dict[str, int], params: PointNetParams
) -> tuple[list[np.ndarray], list[int]]:
    chosen = [r for r in rows if r.get("split") == split and r["label"] in index]
    return (
        [PointNetEncoder.load(r["path"], params) for r in chosen],
        [index[r["label"]] for r in chosen],
    )


def prepare_pointnet_meshes(
    force: bool = False,
    progress: bool = True,
    manifest: str | Path | None = None,
    recipe: PretrainRecipe = PretrainRecipe(),
) -> Path:
    """Pretrain ``pointnet_meshes`` on the meshes dataset's train split into the cache once.

    ``manifest``: another point manifest (tests); default: the prepared ``meshes`` dataset
    (prepared first if needed). Returns the folder; a complete one returns at once.
    """
    final = pointnet_meshes_dir()
    if not force and _is_complete(final):
        return final
    started = time.perf_counter()
    if manifest is None:
        from mmcompose.assets.datasets import prepare_datasets

        manifest = prepare_datasets(only=["meshes"], progress=progress)["meshes"] / "manifest.jsonl"
    manifest = Path(manifest).absolute()
    rows = _read_rows(manifest)
    params = PointNetMeshesParams(pretrained=False)
    names = sorted({r["label"] for r in rows if r.get("split") == "train"})
    if not names:
        raise MMComposeError(f"{manifest} has no train split to pretrain {POINTNET_MESHES} on")
    index = {n: i for i, n in enumerate(names)}
    splits = {s: _read_split(rows, s, index, params) for s in ("train", "val", "test")}
    if progress:
        print(
            f"mmcompose: pretraining encoder {POINTNET_MESHES!r} on {len(splits['train'][0])} "
            f"train clouds of {manifest} ({recipe.epochs} epochs, "
            f"{torch.get_num_threads()} threads) into {final}",
            file=sys.stderr,
            flush=True,
        )
    result = pretrain_point_encoder(
        *splits["train"], len(names), params, recipe, val=splits["val"], progress=progress
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        baseline = PointNetEncoder(params)  # the same initialisation, untrained
    acc = _accuracies(result, baseline, splits)
    with atomic_dir(final, overwrite=True) as tmp:
        save_weights(result.encoder.state_dict(), tmp / WEIGHTS_NAME)
        save_weights(result.head.state_dict(), tmp / HEAD_NAME)
        config = {"encoder": "pointnet", "params": POINTNET_MESHES_ARCH, "labels": names}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        write_json_atomic(
            tmp / MANIFEST_NAME,
            _manifest(tmp, manifest, splits, recipe, result, acc, started),
        )
    if progress:
        print(
            f"mmcompose: encoder {POINTNET_MESHES!r} ready ({time.perf_counter() - started:.0f} s;"
            f" accuracy val/test: head {acc['head']['val']:.3f}/{acc['head']['test']:.3f}, "
            f"linear probe {acc['linear_probe']['val']:.3f}/{acc['linear_probe']['test']:.3f})",
            file=sys.stderr,
            flush=True,
        )
    return final


def _accuracies(
    result: PretrainResult,
    baseline: PointNetEncoder,
    splits: dict[str, tuple[list[np.ndarray], list[int]]],
) -> dict[str, dict[str, float]]:
    """The head's accuracy per split, and two probes fitted on train features of the frozen
    encoder (nearest class centroid; linear), for the pretrained and, as the reference point,
    the untrained encoder (same initialisation)."""
    out: dict[str, dict[str, float]] = {}
    for tag, enc in (("", result.encoder), ("_untrained", baseline)):
        feats = {s: (pooled_features(enc, c), y) for s, (c, y) in splits.items()}
        if not tag:  # the head reads the same pooled features
            out["head"] = {
                s: pooled_head_accuracy(result.head, x, y) for s, (x, y) in feats.items()
            }
        train_x, train_y = feats["train"]
        out[f"nearest_centroid{tag}"] = {
            s: nearest_centroid_accuracy(train_x, train_y, x, y) for s, (x, y) in feats.items()
        }
        out[f"linear_probe{tag}"] = linear_probe_accuracy(train_x, train_y, feats)
    return {k: {s: round(a, 4) for s, a in v.items()} for k, v in out.items()}


def _manifest(
    folder: Path,
    source: Path,
    splits: dict[str, tuple[list[np.ndarray], list[int]]],
    recipe: PretrainRecipe,
    result: PretrainResult,
    accuracy: dict[str, dict[str, float]],
    started: float,
) -> dict[str, Any]:
    import mmcompose

    return {
        "format": POINTNET_MESHES_FORMAT,
        "kind": "encoder",
        "name": POINTNET_MESHES,
        "source": {
            "manifest": str(source),
            "manifest_sha256": sha256_file(source),
            "trained_on": "train",
            "counts": {s: len(y) for s, (_, y) in splits.items()},
        },
        "architecture": "PointNetEncoder (pointnet)",
        "params": POINTNET_MESHES_ARCH,
        "num_parameters": sum(p.numel() for p in result.encoder.parameters()),
        "output": f"{POINTNET_MESHES_ARCH['num_groups']} tokens x {POINTNET_MESHES_ARCH['width']}",
        "dtype": "float32",
        "training": {
            **asdict(recipe),
            "objective": "label classification, max+mean pooled tokens -> MLP head",
            "threads": torch.get_num_threads(),
            "seconds": round(result.seconds, 1),
            "log": result.log,
        },
        "accuracy": accuracy,
        "weights": {n: {"sha256": sha256_file(folder / n)} for n in (WEIGHTS_NAME, HEAD_NAME)},
        "files": file_sizes(folder),
        "created_with": {
            "mmcompose": getattr(mmcompose, "__version__", "unknown"),
            "torch": torch.__version__,
        },
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }


class PointNetMeshesParams(PointNetParams):
    """``pointnet``'s parameters fixed to the stored architecture; only ``pretrained`` varies."""

    num_points: int = POINTNET_MESHES_ARCH["num_points"]
    in_channels: int = POINTNET_MESHES_ARCH["in_channels"]
    num_groups: int = POINTNET_MESHES_ARCH["num_groups"]
    group_size: int = POINTNET_MESHES_ARCH["group_size"]
    width: int = POINTNET_MESHES_ARCH["width"]
    pretrained: bool = True

    @model_validator(mode="after")
    def _fixed(self) -> PointNetMeshesParams:
        changed = {
            k: getattr(self, k) for k, v in POINTNET_MESHES_ARCH.items() if getattr(self, k) != v
        }
        if changed:
            raise ValueError(
                f"{POINTNET_MESHES}'s architecture is fixed by its pretrained weights "
                f"({POINTNET_MESHES_ARCH}); got {changed}; use the 'pointnet' encoder for "
                "other sizes"
            )
        return self


@register_encoder(POINTNET_MESHES)
class PointNetMeshesEncoder(PointNetEncoder):
    """The ``pointnet`` tokenizer pretrained on the meshes dataset (32 tokens x 128)."""

    Params = PointNetMeshesParams

    def __init__(self, params: PointNetMeshesParams) -> None:
        super().__init__(params)
        if params.pretrained and pretrained_weights_enabled():
            self._load_cached()

    def _load_cached(self) -> None:
        folder = pointnet_meshes_dir()
        if not _is_complete(folder):
            stale = (folder / MANIFEST_NAME).is_file() and _stale_source(folder)
            why = (
                f"was trained on an earlier version of {stale} (its splits or items changed)"
                if stale
                else f"is not in the asset cache ({folder}); it is trained here, from the "
                "meshes dataset"
            )
            raise MissingAssetError(
                f"the pretrained point encoder {POINTNET_MESHES!r} {why}",
                hint=f"{INSTALL_HINT} (about 2 minutes on a CPU)",
            )
        load_cached_weights(self, folder, hint=f"rebuild the cache: {INSTALL_HINT} --force")
