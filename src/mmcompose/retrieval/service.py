"""Cross-modal retrieval with a trained Alt-MoE connector: index once, search in real time.

``index_manifest`` embeds a manifest's items (or their captions) with the frozen encoder and
one connector pass into a vector store; the store records which connector made the vectors
(the weights' fingerprint in the header, the weights and config digests in
``mmcompose_index.json``), so ``search`` embeds a query the same way and refuses another
connector with a :class:`~mmcompose.retrieval.base.ConnectorMismatchError` (a ConfigError).

A new store is built whole under a temporary sibling name (data, index, recall tuning,
``mmcompose_index.json``) and renamed into place last, by a rename that never replaces a store
that appeared meanwhile: a failure or a kill leaves no store behind, and two runs into one path
never lose vectors. ``update=True`` upserts into an existing store instead (one atomic commit).

Under torchrun (``WORLD_SIZE > 1``) every rank embeds a contiguous slice of the items; the
slices are gathered to rank 0 over gloo (plain tensors) and stored in one store, so N
processes write the store one process writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
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
from mmcompose.retrieval.base import (
    ConnectorMismatchError,
    StoreHeader,
    VectorStore,
    create_store,
    open_store,
)
from mmcompose.retrieval.tuning import write_tuned

LINK = "mmcompose_index.json"


def model_fingerprint(model_dir: Path) -> str:
    """The store header's ``model_id``: the connector weights' SHA-256 prefix."""
    return sha256_file(Path(model_dir) / "model.safetensors")[:16]


def config_fingerprint(meta: dict[str, Any]) -> str:
    """What else decides the vectors: the connector's shape, the frozen encoders, the space."""
    keep = {k: meta.get(k) for k in ("connector", "encoders", "space")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _rows(manifest: Path, split: str | None) -> list[dict[str, Any]]:
    from mmcompose.manifest import read_manifest

    return read_manifest(manifest, split, required=("id", "path", "modality"))


@dataclass
class IndexResult:
    """What ``index_manifest`` did; ``main`` is False on the other ranks of a torchrun job."""

    count: int
    updated: int = 0
    added: int = 0
    store_size: int = 0
    tuning: dict[str, Any] | None = None
    main: bool = True

    def summary(self, store: Path) -> str:
        if self.updated or self.added != self.count:
            head = f"updated {self.updated}, added {self.added} vectors in {store}"
        else:
            head = f"stored {self.count} vectors in {store}"
        lines = [head + (f" ({self.store_size} in all)" if self.store_size != self.count else "")]
        if self.tuning:
            t = self.tuning
            lines.append(
                f"tuned {t['param']}={t['value']}: recall@{t['k']} {t['recall']:.4f} >= "
                f"{t['target']} on {t['sample']} {t.get('queries', 'stored')} queries "
                "(exact search as reference)"
            )
        return "\n".join(lines)


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
    update: bool = False,
    target_recall: float | None = None,
    uri: str | None = None,
) -> IndexResult:
    """Embed the items of ``manifest`` (``gallery="text"``: their captions) into a new store;
    ``force`` replaces an existing one (only once the new one is complete); ``update`` adds
    them to an existing store made by the same connector, replacing the ids it holds.
    ``target_recall`` tunes the index's search knob on a sample (recorded in the store).
    ``uri`` (milvus): a Milvus server instead of Milvus Lite in the folder. A second run into
    the same path while one works is refused (a lock on the path)."""
    from mmcompose.align.folder import read_alignment
    from mmcompose.bench.distributed import data_parallel
    from mmcompose.retrieval.tuning import check_target

    model_dir, store_dir = Path(model_dir), Path(store_dir)
    if target_recall is not None:
        check_target(target_recall)
    link: dict[str, Any] | None = None
    if update:
        if force:
            raise ConfigError("--update adds to a store, --force replaces it: choose one")
        link = _read_link(store_dir)
        header = StoreHeader.read(store_dir)
        backend, index = header.backend, header.index
        if target_recall is not None:
            _check_tunable(header, update=True)
    else:
        refuse_existing(store_dir, force)  # before the work
        _check_options(backend, index, target_recall, uri)
    meta, _ = read_alignment(model_dir)
    fp, cfg_fp = model_fingerprint(model_dir), config_fingerprint(meta)
    if link is not None:
        _check_binding(store_dir, link, fp, cfg_fp, model_dir)
    rows = _rows(Path(manifest), split)
    with data_parallel() as dp, exclusive(store_dir, what="vector store", enabled=dp.main):
        from mmcompose.align.evaluate import AlignedModel  # torch: after the cheap checks

        model = AlignedModel.load(model_dir)
        modality = gallery or (link or {}).get("gallery") or rows[0]["modality"]
        if link is not None and modality != link.get("gallery"):
            raise ConfigError(
                f"store {store_dir} holds {link.get('gallery')} vectors, not {modality}",
                hint=f"--update a store with --gallery {link.get('gallery')}, or make a new one",
            )
        if modality == "text":
            items: list[Any] = [str(r.get(text_field) or r["label"]) for r in rows]
        else:
            items = [r["path"] for r in rows]
        lo, hi = _slice(len(items), dp.rank, dp.world)
        done: dict[str, Any] = {}

        def embed() -> None:  # every rank its slice; an error on one is raised on all
            part = [
                model.embed_gallery(modality, items[s : min(s + batch_size, hi)])
                for s in range(lo, hi, batch_size)
            ]
            done["vecs"] = np.concatenate(part) if part else None

        dp.run(embed)
        vecs = _gather_rows(done["vecs"], len(items), dp)
        ids = [str(r["id"]) for r in rows]
        metas = [{k: r.get(k) for k in ("label", "caption", "path", "modality")} for r in rows]
        if modality == "text":  # the same caption may come from many items: one vector each
            metas = [m | {"text": t} for m, t in zip(metas, items, strict=True)]

        def store() -> None:  # rank 0 writes; the others learn of its failure
            if not dp.main:
                done["result"] = IndexResult(len(rows), main=False)
            elif update:
                done["result"] = _upsert(store_dir, ids, vecs, metas, fp, target_recall)
            else:
                new_link = {
                    "model_dir": str(model_dir.absolute()),
                    "model_fingerprint": fp,
                    "config_fingerprint": cfg_fp,
                    "gallery": modality,
                }
                done["result"] = _create(
                    store_dir, ids, vecs, metas, new_link, backend, index, force, target_recall,
                    uri,
                )  # fmt: skip

        dp.run(store)
        result: IndexResult = done["result"]
        return result


def _slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def _gather_rows(part: np.ndarray | None, n: int, dp: Any) -> np.ndarray | None:
    """Rank 0: the ranks' contiguous row slices in order, (n, D); other ranks: None.

    Plain float32 tensors over the process group (padded to one shape), nothing pickled."""
    if dp.world == 1:
        return part
    import torch
    import torch.distributed as dist

    width = torch.tensor([0 if part is None else part.shape[1]], dtype=torch.int64)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    rows = max(hi - lo for lo, hi in (_slice(n, r, dp.world) for r in range(dp.world)))
    mine = torch.zeros((rows, int(width)), dtype=torch.float32)
    if part is not None:
        mine[: len(part)] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
    bufs = [torch.zeros_like(mine) for _ in range(dp.world)] if dp.main else None
    dist.gather(mine, bufs, dst=0)
    if not dp.main:
        return None
    assert bufs is not None
    pieces = []
    for r, buf in enumerate(bufs):
        lo, hi = _slice(n, r, dp.world)
        pieces.append(buf[: hi - lo].numpy())
    return np.concatenate(pieces)


def _check_options(backend: str, index: str, target_recall: float | None, uri: str | None) -> None:
    if uri is not None and backend != "milvus":
        raise ConfigError(
            f"--uri names a Milvus server; backend {backend!r} keeps its data in the store folder",
            hint="use --backend milvus --uri http://HOST:19530, or drop --uri",
        )
    if target_recall is not None and index == "flat":
        raise ConfigError(
            "--target-recall tunes an approximate index; a flat index is exact (recall 1)",
            hint="add --index hnsw (or ivfpq), or drop --target-recall",
        )


def _check_tunable(header: StoreHeader, *, update: bool) -> None:
    if header.index == "flat":
        _check_options(header.backend, "flat", 1.0, None)
    if update and header.backend == "faiss" and header.index == "ivfpq":
        raise ConfigError(
            "--update --target-recall cannot tune an IVF-PQ store: it keeps only compressed "
            "codes, and exact search needs every stored vector",
            hint="rebuild the store with --force --target-recall, or update without tuning",
        )


def _create(
    store_dir: Path,
    ids: list[str],
    vecs: np.ndarray | None,
    metas: list[dict[str, Any]],
    link: dict[str, Any],
    backend: str,
    index: str,
    force: bool,
    target_recall: float | None,
    uri: str | None,
) -> IndexResult:
    assert vecs is not None
    options = {"uri": uri} if uri is not None else {}
    tuning = None
    with atomic_path(store_dir, overwrite=force) as staging:
        store = create_store(
            staging, vecs.shape[1], backend=backend, index=index, model_id=link["model_fingerprint"],
            **options,
        )  # fmt: skip
        try:
            if target_recall is None:
                store.add(ids, vecs, metadata=metas)
            else:  # held-out queries from the vectors still in memory: exact reference
                tuning = write_tuned(store, ids, vecs, metas, target_recall).record()
        finally:
            store.close()  # before the rename (Milvus Lite serves a folder by its path)
        write_json_atomic(staging / LINK, link)
    return IndexResult(len(ids), added=len(ids), store_size=len(ids), tuning=tuning)


def _upsert(
    store_dir: Path,
    ids: list[str],
    vecs: np.ndarray | None,
    metas: list[dict[str, Any]],
    fp: str,
    target_recall: float | None,
) -> IndexResult:
    assert vecs is not None
    store = open_store(store_dir, model_id=fp)
    try:
        if target_recall is None:
            updated, added = store.upsert(ids, vecs, metas)
            return IndexResult(len(ids), updated, added, len(store))
        # the new vectors are not stored yet: tune with them as queries, then write them in
        # one commit, so a target out of reach leaves the store as it was
        report = store.tune_recall(target_recall, queries=vecs)
        updated, added = store.upsert(ids, vecs, metas)
        return IndexResult(len(ids), updated, added, len(store), report.record())
    finally:
        store.close()


def _read_link(store_dir: Path) -> dict[str, Any]:
    link = read_json(store_dir / LINK)
    if not isinstance(link, dict):
        if not store_dir.exists():
            raise ConfigError(
                f"no vector store at {store_dir}",
                hint="create it first: mmcompose index --model OUT --data MANIFEST --store DIR",
            )
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
    return link


def _check_binding(
    store_dir: Path, link: dict[str, Any], fp: str, cfg_fp: str, model_dir: Path
) -> None:
    """Refuse a connector other than the one that filled the store (weights or config)."""
    theirs = {"weights": link.get("model_fingerprint"), "config": link.get("config_fingerprint")}
    ours = {"weights": fp, "config": cfg_fp}
    differ = [k for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
    if differ:
        raise ConnectorMismatchError(
            f"store {store_dir} was filled by connector {theirs['weights']} "
            f"({link['model_dir']}); {model_dir} is connector {fp} "
            f"({' and '.join(differ)} differ): its vectors live in another space",
            hint="search with the store's connector (--model), or index the gallery again "
            "with this one into a new store",
        )


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    metadata: dict[str, Any] | None


def search(
    store_dir: str | Path,
    modality: str,
    query: Any,
    k: int = 10,
    *,
    model_dir: str | Path | None = None,
) -> list[Hit]:
    """Embed one query (text, or a file path) and return the ``k`` nearest stored items.

    ``model_dir``: the connector to embed with (default: the one recorded in the store); any
    other connector than the store's is refused before the search."""
    from mmcompose.align.folder import read_alignment

    store_dir = Path(store_dir)
    link = _read_link(store_dir)
    model_dir = Path(model_dir or link["model_dir"])
    meta, _ = read_alignment(model_dir)
    fp = model_fingerprint(model_dir)
    _check_binding(store_dir, link, fp, config_fingerprint(meta), model_dir)
    from mmcompose.align.evaluate import AlignedModel  # torch: after the cheap checks

    model = AlignedModel.load(model_dir)
    store = open_store(store_dir, model_id=fp)
    try:
        q = model.embed_query(modality, [query], target=link["gallery"])
        ids, scores, metas = store.search(q, k)
    finally:
        store.close()
    return [
        Hit(i + 1, str(x), float(s), m)
        for i, (x, s, m) in enumerate(
            zip(ids[0], scores[0], (metas or [[None] * len(ids[0])])[0], strict=True)
        )
        if x is not None
    ]


def delete_ids(store_dir: str | Path, ids: Sequence[str], *, compact: bool = False) -> int:
    """Delete ``ids`` from a store (all or none: an unknown id changes nothing); ``compact``
    drops the tombstones now. Returns how many were deleted."""
    if not ids and not compact:
        raise ConfigError("no ids to delete", hint="give ids as arguments or --ids-file FILE")
    store: VectorStore = open_store(store_dir)
    try:
        n = store.delete(list(ids))
        if compact:
            store.compact()
        return n
    finally:
        store.close()


def read_ids_file(path: str | Path) -> list[str]:
    """One id per line (blank lines skipped); a missing file is a ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read ids file {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


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


__all__ = [
    "Hit",
    "IndexResult",
    "config_fingerprint",
    "delete_ids",
    "index_manifest",
    "model_fingerprint",
    "one_query",
    "read_ids_file",
    "search",
]
