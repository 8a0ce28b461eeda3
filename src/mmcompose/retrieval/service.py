"""Cross-modal retrieval with a trained Alt-MoE connector: index once, search in real time.

``index_manifest`` embeds a manifest's items (or their captions) with the frozen encoder and
one connector pass into a vector store; the store folder also records which connector made the
vectors, so ``search`` embeds a query the same way and refuses a store made by another model.

The store is built whole under a temporary sibling name (data, index, ``mmcompose_index.json``)
and renamed into place last, by a rename that never replaces a store that appeared meanwhile:
a failure or a kill leaves no store behind, and two runs into one path never lose vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.errors import ConfigError
from mmcompose.fs import (
    atomic_path,
    exclusive,
    read_json,
    refuse_existing,
    sha256_file,
    write_json_atomic,
)
from mmcompose.retrieval.base import create_store, open_store

LINK = "mmcompose_index.json"


def model_fingerprint(model_dir: Path) -> str:
    return sha256_file(Path(model_dir) / "model.safetensors")[:16]


def _rows(manifest: Path, split: str | None) -> list[dict[str, Any]]:
    from mmcompose.manifest import read_manifest

    return read_manifest(manifest, split, required=("id", "path", "modality"))


def index_manifest(
    model_dir: str | Path,
    manifest: str | Path,
    store_dir: str | Path,
    *,
    gallery: str | None = None,
    text_field: str = "caption",
    split: str | None = None,
    backend: str = "faiss",
    index: str = "flat",
    batch_size: int = 256,
    force: bool = False,
) -> int:
    """Embed the items of ``manifest`` (``gallery="text"``: their captions) into a new store;
    ``force`` replaces an existing one (only once the new one is complete). A second run into
    the same path while one works is refused (a lock on the path)."""
    from mmcompose.align.folder import read_alignment

    model_dir, store_dir = Path(model_dir), Path(store_dir)
    refuse_existing(store_dir, force)  # before the work
    read_alignment(model_dir)
    with exclusive(store_dir, what="vector store"):
        rows = _rows(Path(manifest), split)
        from mmcompose.align.evaluate import AlignedModel  # torch: after the cheap checks

        model = AlignedModel.load(model_dir)
        modality = gallery or rows[0]["modality"]
        if modality == "text":
            items: list[Any] = [str(r.get(text_field) or r["label"]) for r in rows]
        else:
            items = [r["path"] for r in rows]
        vecs = np.concatenate(
            [
                model.embed_gallery(modality, items[s : s + batch_size])
                for s in range(0, len(items), batch_size)
            ]
        )
        fp = model_fingerprint(model_dir)
        meta = [{k: r.get(k) for k in ("label", "caption", "path", "modality")} for r in rows]
        if modality == "text":  # the same caption may come from many items: one vector each
            meta = [m | {"text": t} for m, t in zip(meta, items, strict=True)]
        with atomic_path(store_dir, overwrite=force) as staging:
            store = create_store(staging, vecs.shape[1], backend=backend, index=index, model_id=fp)
            try:
                store.add([str(r["id"]) for r in rows], vecs, metadata=meta)
            finally:
                store.close()  # before the rename (Milvus Lite serves a folder by its path)
            link = {"model_dir": str(model_dir.absolute()), "model_fingerprint": fp}
            write_json_atomic(staging / LINK, {**link, "gallery": modality})
    return len(rows)


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    metadata: dict[str, Any] | None


def search(store_dir: str | Path, modality: str, query: Any, k: int = 10) -> list[Hit]:
    """Embed one query (text, or a file path) and return the ``k`` nearest stored items."""
    from mmcompose.align.folder import read_alignment

    store_dir = Path(store_dir)
    link = read_json(store_dir / LINK)
    if not isinstance(link, dict):
        raise ConfigError(
            f"{store_dir} was not made by `mmcompose index` (no {LINK})",
            hint="build it with: mmcompose index --model OUT --data MANIFEST --store DIR",
        )
    bad = [k for k in ("model_dir", "gallery") if not isinstance(link.get(k), str)]
    if bad:
        raise ConfigError(
            f"{store_dir / LINK} is damaged: it lacks {' and '.join(bad)}",
            hint=f"rebuild the store: mmcompose index --model OUT --data MANIFEST "
            f"--store {store_dir} --force",
        )
    read_alignment(link["model_dir"])
    from mmcompose.align.evaluate import AlignedModel  # torch: after the cheap checks

    model = AlignedModel.load(link["model_dir"])
    store = open_store(store_dir, model_id=model_fingerprint(Path(link["model_dir"])))
    q = model.embed_query(modality, [query], target=link["gallery"])
    res = store.search(q, k)
    store.close()
    ids, scores, metas = res
    return [
        Hit(i + 1, str(x), float(s), m)
        for i, (x, s, m) in enumerate(
            zip(ids[0], scores[0], (metas or [[None] * len(ids[0])])[0], strict=True)
        )
        if x is not None
    ]


def one_query(**given: str | Path | None) -> tuple[str, str]:
    """The (modality, query) of the one query option given, e.g. ``one_query(text=None,
    image=path)``; none or several is an error, so a search always has exactly one query."""
    chosen = {m: v for m, v in given.items() if v is not None}
    if len(chosen) != 1:
        flags = ", ".join(f"--{m}" for m in given)
        raise ConfigError(
            f"give exactly one of {flags}"
            + (f" (got {', '.join(f'--{m}' for m in chosen)})" if chosen else ""),
            hint="one search embeds one query; run search once per query",
        )
    ((modality, query),) = chosen.items()
    return modality, str(query)


__all__ = ["Hit", "index_manifest", "one_query", "search"]
