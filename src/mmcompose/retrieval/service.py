"""Cross-modal retrieval with a trained Alt-MoE connector: index once, search in real time.

``index_manifest`` embeds a manifest's items (or their captions) with the frozen encoder and
one connector pass into a vector store; the store folder also records which connector made the
vectors, so ``search`` embeds a query the same way and refuses a store made by another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.errors import ConfigError
from mmcompose.fs import read_json, sha256_file, write_json_atomic
from mmcompose.retrieval.base import create_store, open_store

LINK = "mmcompose_index.json"


def model_fingerprint(model_dir: Path) -> str:
    return sha256_file(Path(model_dir) / "model.safetensors")[:16]


def _rows(manifest: Path, split: str | None) -> list[dict[str, Any]]:
    from mmcompose.bench.classify import read_manifest

    return read_manifest(manifest, split)


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
) -> int:
    """Embed the items of ``manifest`` (``gallery="text"``: their captions) into a new store."""
    from mmcompose.align.evaluate import AlignedModel

    model_dir, store_dir = Path(model_dir), Path(store_dir)
    model = AlignedModel.load(model_dir)
    rows = _rows(Path(manifest), split)
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
    store = create_store(store_dir, vecs.shape[1], backend=backend, index=index, model_id=fp)
    meta = [{k: r.get(k) for k in ("label", "caption", "path", "modality")} for r in rows]
    if modality == "text":  # the same caption may come from many items: one vector each
        meta = [m | {"text": t} for m, t in zip(meta, items, strict=True)]
    store.add([str(r["id"]) for r in rows], vecs, metadata=meta)
    write_json_atomic(
        store_dir / LINK,
        {"model_dir": str(model_dir.absolute()), "model_fingerprint": fp, "gallery": modality},
    )
    store.close()
    return len(rows)


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    metadata: dict[str, Any] | None


def search(store_dir: str | Path, modality: str, query: Any, k: int = 10) -> list[Hit]:
    """Embed one query (text, or a file path) and return the ``k`` nearest stored items."""
    from mmcompose.align.evaluate import AlignedModel

    store_dir = Path(store_dir)
    link = read_json(store_dir / LINK)
    if not isinstance(link, dict):
        raise ConfigError(
            f"{store_dir} was not made by `mmcompose index` (no {LINK})",
            hint="build it with: mmcompose index --model OUT --data MANIFEST --store DIR",
        )
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


__all__ = ["Hit", "index_manifest", "search"]
