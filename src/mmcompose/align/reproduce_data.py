"""The alignment reproduction's data: each task's frozen features, paired row by row per split
(:mod:`mmcompose.align.reproduce` runs the variants on them).

Image-text: one row per caption of the ``captions`` set; the key of a row is its image, and the
image side is de-duplicated (one gallery entry / query per image), which is CLIP_benchmark's
multi-caption retrieval. Audio-text: one row per clip of ``spoken`` + ``sounds`` with its text
(the spoken word, else the caption); the key is the text, and the text side is de-duplicated.
Feature stores are computed once and found again by content
(:func:`~mmcompose.align.features.build_feature_store`); captions are encoded shortest first,
which cuts the padding the text encoders compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AUDIO_ENCODER",
    "IMAGE_ENCODER",
    "TASKS",
    "TEXT_ENCODERS",
    "TaskData",
    "load_task",
    "pool_grid",
    "subsample",
    "synthetic_task",
]

# task -> (non-text modality, datasets)
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "image-text": ("image", ("captions",)),
    "audio-text": ("audio", ("spoken", "sounds")),
}
TEXT_ENCODERS = ("smollm2", "minilm")
IMAGE_ENCODER = {"name": "efficientnet_lite0"}
AUDIO_ENCODER = {"name": "whisper_tiny_en", "params": {"seconds": 2.0, "pool": 5}}


@dataclass
class TaskData:
    """One task's paired rows per split, with one text encoder's features.

    Rows are pairs (an image and one of its captions; a clip and its text); ``keys`` say which
    rows are the same item on the side that repeats (``dedupe``: that side's rows with one key
    are one input, kept once as query or gallery item)."""

    task: str
    modality: str
    text_encoder: str
    splits: dict[str, Any]  # split -> mmcompose.align.evaluate.PairedSplit
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def directions(self) -> list[tuple[str, str]]:
        return [(self.modality, "text"), ("text", self.modality)]

    def fingerprint(self) -> str:
        from mmcompose.pipeline import digest

        return digest(self.task, self.text_encoder, self.info.get("data_key"))


def pool_grid(tokens: np.ndarray, lengths: np.ndarray, grid: int | None) -> tuple[np.ndarray, ...]:
    """(n, T, d) grid tokens (T a square) -> (n, grid^2, d) by average pooling, the (n,) lengths
    and the (n, d) mean; ``grid`` None or a non-square T keeps the tokens."""
    import torch
    from torch.nn import functional as F

    t = tokens.shape[1]
    side = round(t**0.5)
    pooled = np.asarray(tokens, dtype=np.float32).mean(axis=1)
    if grid is None or side * side != t or bool((np.asarray(lengths) != t).any()) or grid >= side:
        return np.asarray(tokens), np.asarray(lengths), pooled.astype(np.float16)
    x = torch.as_tensor(np.asarray(tokens, dtype=np.float32))
    x = x.reshape(len(x), side, side, -1).permute(0, 3, 1, 2)
    y = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)
    n = grid * grid
    return y.numpy().astype(np.float16), np.full(len(x), n, np.int32), pooled.astype(np.float16)


def _split_rows(splits: Sequence[str]) -> dict[str, np.ndarray]:
    out: dict[str, list[int]] = {}
    for i, s in enumerate(splits):
        out.setdefault(s, []).append(i)
    return {s: np.asarray(v, dtype=np.int64) for s, v in out.items()}


def _paired_splits(
    media: Any, text: Any, keys: np.ndarray, splits: Sequence[str], modality: str, dedupe: str
) -> dict[str, Any]:
    from mmcompose.align.evaluate import PairedSplit

    full = PairedSplit({modality: media, "text": text}, keys, [], frozenset({dedupe}))
    return {s: full.take(rows) for s, rows in _split_rows(splits).items()}


def _counts(data: dict[str, Any], modality: str) -> dict[str, dict[str, int]]:
    """Per split: pairs, distinct items (image/clip) and distinct texts."""
    return {
        s: {
            "pairs": len(d),
            modality: len(d.side_rows(modality)),
            "texts": len(d.side_rows("text")),
        }
        for s, d in data.items()
    }


def _records(names: Sequence[str], progress: bool) -> list[dict[str, Any]]:
    from mmcompose.assets.datasets import prepare_datasets, read_items

    folders = prepare_datasets(list(names), progress=progress)
    return [rec for name in names for rec in read_items(folders[name])]


def subsample(records: list[dict[str, Any]], limits: dict[str, int]) -> list[dict[str, Any]]:
    """At most ``limits[split]`` records of each split, the first in sha256 order of their id
    (the same pick on every machine and run); order otherwise kept."""
    from mmcompose.assets.datasets.items import hash_int

    kept: set[str] = set()
    for split, limit in limits.items():
        ids = sorted((r["id"] for r in records if r.get("split") == split),
                     key=lambda i: (hash_int("align-bench", i), i))  # fmt: skip
        kept.update(ids[limit:])
    return [r for r in records if r["id"] not in kept]


def load_task(
    task: str,
    text_encoder: str,
    image_grid: int | None = 3,
    *,
    max_items: dict[str, int] | None = None,
    feature_root: str | Path | None = None,
    progress: bool = True,
) -> TaskData:
    """Prepare the task's datasets, compute (or reuse) its feature stores, pair the rows.

    ``max_items``: at most that many items (images, clips) of a split, a seeded pick
    (:func:`subsample`); the encoders run on the kept items only. Encoding uses one torch
    thread: on a shared, oversubscribed CPU more threads only spin."""
    import torch

    from mmcompose.align.features import EncoderRef, ModalityFeatures, build_feature_store

    torch.set_num_threads(1)
    modality, names = TASKS[task]
    records = subsample(_records(names, progress), max_items or {})
    media_ref = EncoderRef(**(IMAGE_ENCODER if modality == "image" else AUDIO_ENCODER))
    text_ref = EncoderRef(name=text_encoder, batch_size=32)
    media_store = build_feature_store(
        media_ref, [r["id"] for r in records], [r["path"] for r in records], feature_root,
        progress=progress,
    )  # fmt: skip
    feats = media_store.features()
    grid = image_grid if modality == "image" else None
    tokens, lengths, pooled = pool_grid(np.asarray(feats.tokens), np.asarray(feats.lengths), grid)
    media_items = ModalityFeatures(tokens, lengths, pooled)
    if modality == "image":
        # one row per caption; the key is the image: CLIP_benchmark's multi-caption retrieval
        pairs = [(i, f"{r['id']}#{j}", c) for i, r in enumerate(records)
                 for j, c in enumerate(r.get("captions") or [r["caption"]])]  # fmt: skip
        media_rows = np.array([i for i, _, _ in pairs], dtype=np.int64)
        keys = media_rows.copy()
        dedupe = modality
    else:
        texts = [str(r.get("text") or r["caption"]) for r in records]
        pairs = [(i, r["id"], t) for i, (r, t) in enumerate(zip(records, texts, strict=True))]
        media_rows = np.arange(len(records), dtype=np.int64)
        key_of = {t: k for k, t in enumerate(sorted(set(texts)))}
        keys = np.array([key_of[t] for t in texts], dtype=np.int64)
        dedupe = "text"
    # encode short texts together (less padding); the store maps ids back to rows
    order = sorted(range(len(pairs)), key=lambda n: (len(pairs[n][2]), pairs[n][1]))
    text_store = build_feature_store(
        text_ref, [pairs[n][1] for n in order], [pairs[n][2] for n in order], feature_root,
        progress=progress,
    )  # fmt: skip
    text_feats = text_store.features().take(text_store.rows([p[1] for p in pairs]))
    splits = [records[i]["split"] for i, _, _ in pairs]
    data = _paired_splits(media_items.take(media_rows), text_feats, keys, splits, modality, dedupe)
    counts = _counts(data, modality)
    info = {
        "datasets": list(names),
        "encoders": {modality: media_ref.model_dump(), "text": text_ref.model_dump()},
        "stores": {modality: str(media_store.path), "text": str(text_store.path)},
        "dims": {modality: media_items.dim, "text": text_feats.dim},
        "tokens": {modality: int(tokens.shape[1]), "text": int(text_feats.tokens.shape[1])},
        "counts": counts,
        "data_key": [media_store.key, text_store.key, grid],
        "max_items": max_items or {},
    }
    return TaskData(task, modality, text_encoder, data, info)


def synthetic_task(
    task: str = "image-text",
    *,
    items: dict[str, int] | None = None,
    captions: int = 3,
    dims: tuple[int, int] = (24, 16),
    tokens: tuple[int, int] = (4, 3),
    rank: int = 8,
    noise: float = 0.3,
    seed: int = 0,
) -> TaskData:
    """Paired latents through a hidden linear map, several captions per item (tests, smoke):
    item z ~ N(0, I_rank); its tokens z W_m + noise; caption j of it z W_t + its own noise."""
    from mmcompose.align.features import ModalityFeatures

    modality = TASKS[task][0]
    rng = np.random.default_rng(seed)
    items = items or {"train": 96, "val": 32, "test": 32}
    w_m = rng.normal(size=(rank, dims[0])) / rank**0.5
    w_t = rng.normal(size=(rank, dims[1])) / rank**0.5
    z = rng.normal(size=(sum(items.values()), rank))
    split_of = [s for s, n in items.items() for _ in range(n)]
    media = [(zi @ w_m) + noise * rng.normal(size=(tokens[0], dims[0])) for zi in z]
    rows = [(i, j) for i in range(len(z)) for j in range(captions)]
    text = [(z[i] @ w_t) + noise * rng.normal(size=(tokens[1], dims[1])) for i, _ in rows]
    media_rows = np.array([i for i, _ in rows])
    media_f = ModalityFeatures.from_token_list([m.astype(np.float32) for m in media])
    text_f = ModalityFeatures.from_token_list([t.astype(np.float32) for t in text])
    data = _paired_splits(
        media_f.take(media_rows), text_f, media_rows.copy(), [split_of[i] for i, _ in rows],
        modality, modality,
    )  # fmt: skip
    info = {
        "datasets": ["synthetic"],
        "dims": {modality: dims[0], "text": dims[1]},
        "counts": _counts(data, modality),
        "data_key": ["synthetic", seed, items, captions, dims, tokens, rank, noise],
    }
    return TaskData(task, modality, "synthetic", data, info)
