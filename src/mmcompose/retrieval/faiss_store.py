"""FAISS backend: the embedded default. Exact ``flat``, graph ``hnsw`` and compressed ``ivfpq``.

Layout of a store folder::

    store.json              header; ``state.generation`` names the committed data files
    index.<gen>.faiss       the FAISS index (row position = insertion order)
    rows.<gen>.json         {"ids": [...], "metadata": [...] | null}, same order

Atomic add (write-ahead copy): the grown index and id map are written in full to the files of
generation ``gen + 1`` and fsynced; then the header is replaced atomically to name ``gen + 1``
(the single commit point); only then are the ``gen`` files deleted. A crash before the header
replace leaves the header naming the untouched ``gen`` files, so nothing stored before is
lost; leftover files of a generation the header does not name are removed by the next add.
The header records each file's size and SHA-256, so a truncated, swapped or damaged data file
is named on open (sizes, counts, FAISS parse errors always; hashes with ``verify=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.fs import fault_point
from mmcompose.retrieval.base import (
    BackendUnavailableError,
    CorruptStoreError,
    RetrievalError,
    SearchResult,
    StoreHeader,
    UntrainedIndexError,
    VectorStore,
    backends,
    result_from_positions,
)

try:
    import faiss
except ImportError:  # pragma: no cover - exercised only without the retrieval extra
    faiss = None

__all__ = ["FaissStore"]

_GEN_FILE = re.compile(r"^(index|rows)\.(\d+)\.(faiss|json)$")


def _after_step(step: str) -> None:
    """Called between the steps of an add; tests replace it, or kill the process here with
    ``MMCOMPOSE_FAULT=faiss:STEP`` (see :func:`mmcompose.fs.fault_point`)."""
    fault_point("faiss:" + step)


def _auto_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` not above ``dim / 8`` (about 8 dims per sub-quantiser)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_record(path: Path) -> dict[str, Any]:
    _fsync(path)
    return {"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}


@backends.register("faiss")
class FaissStore(VectorStore):
    """Vectors in one FAISS index, string ids and metadata in a JSON side file."""

    name = "faiss"
    index_kinds = ("flat", "hnsw", "ivfpq")
    default_params = {  # noqa: RUF012 - read-only class constant
        "flat": {},
        "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 64},
        "ivfpq": {"nlist": 256, "m": None, "nbits": 8, "nprobe": 16, "train_size": 65536},
    }

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _check_available(cls) -> None:
        if faiss is None:
            raise BackendUnavailableError(
                "the faiss backend needs the faiss-cpu package",
                hint="pip install 'mmcompose[retrieval]'",
            )

    @classmethod
    def _init_storage(cls, tmp: Path, header: StoreHeader, **options: Any) -> dict[str, Any]:
        if options:
            raise RetrievalError(f"unknown faiss store option(s): {sorted(options)}")
        if header.index == "ivfpq":
            _resolve_pq(header)
        index = _build_index(header)
        return _write_generation(tmp, 0, index, [], None)

    def _load(self, *, verify: bool) -> None:
        state = self.header.state
        files = state.get("files") if isinstance(state, dict) else None
        if not isinstance(files, dict) or set(files) != {"index", "rows"}:
            raise self._corrupt("header names no data files")
        for rec in files.values():
            self._check_file(rec, verify)
        self.index = self._read_index(self.path / files["index"]["name"])
        self.ids, self.metadata = self._read_rows(self.path / files["rows"]["name"])
        self._id_set = set(self.ids)
        counts = {
            "header": self.header.count,
            "index": int(self.index.ntotal),
            "id map": len(self.ids),
        }
        if len(set(counts.values())) != 1 or (
            self.metadata is not None and len(self.metadata) != len(self.ids)
        ):
            raise self._corrupt(f"row counts disagree: {counts}")
        if self.index.d != self.header.dim:
            raise self._corrupt(f"index dimension {self.index.d} != header {self.header.dim}")
        self.tune()

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"vector store {self.path} is corrupt or half-written: {what}",
            hint="restore it from a backup or rebuild it with `mmcompose index`",
        )

    def _check_file(self, rec: Any, verify: bool) -> None:
        if not isinstance(rec, dict) or not {"name", "size", "sha256"} <= set(rec):
            raise self._corrupt("malformed file record in header")
        path = self.path / str(rec["name"])
        try:  # a writer may delete it right now (then ``open`` retries with the new header)
            size = path.stat().st_size
            if size != rec["size"]:
                raise self._corrupt(
                    f"data file {path.name} has {size} bytes, header says {rec['size']}"
                )
            if verify and _sha256(path) != rec["sha256"]:
                raise self._corrupt(f"data file {path.name} fails its SHA-256 check")
        except FileNotFoundError:
            raise self._corrupt(f"data file {path.name} is missing") from None

    def _read_index(self, path: Path) -> Any:
        try:
            return faiss.read_index(str(path))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise self._corrupt(f"FAISS cannot read {path.name} ({first})") from None

    def _read_rows(self, path: Path) -> tuple[list[str], list[Any] | None]:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            ids, meta = raw["ids"], raw["metadata"]
            if not isinstance(ids, list) or not (meta is None or isinstance(meta, list)):
                raise TypeError("wrong types")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(f"id map {path.name} is unreadable ({exc})") from None
        return ids, meta

    # ------------------------------------------------------------------ search tuning

    def tune(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Set the search-time knobs for this session (default: the header's values)."""
        params = self.header.index_params
        if self.header.index == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or params["ef_search"])
        elif self.header.index == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe or params["nprobe"])

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Train an IVF-PQ index on a sample before the first add (committed atomically)."""
        vecs = self._prepare(vectors, what="training vectors")
        with self._write_lock():
            if self.index.is_trained:
                raise RetrievalError(f"the index of store {self.path} is already trained")
            self._train(vecs)
            self._commit(self.index, self.ids, self.metadata)

    def _train(self, vecs: np.ndarray) -> None:
        p = self.header.index_params
        need = max(int(p["nlist"]), 2 ** int(p["nbits"]))
        if len(vecs) < need:
            raise UntrainedIndexError(
                f"IVF-PQ (nlist={p['nlist']}, nbits={p['nbits']}) needs at least {need} "
                f"training vectors, got {len(vecs)}",
                hint="add a larger first batch, call store.train(sample), or lower nlist",
            )
        limit = int(p.get("train_size") or len(vecs))
        if len(vecs) > limit:  # k-means cost grows with n; a seeded sample trains as well
            rows = np.random.default_rng(0).choice(len(vecs), limit, replace=False)
            vecs = vecs[np.sort(rows)]
        self.index.train(vecs)

    # ------------------------------------------------------------------ add / search

    def _contains_any(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i in self._id_set]

    def _add(self, ids: list[str], vectors: np.ndarray, metadata: list[Any]) -> None:
        try:
            if not self.index.is_trained:
                self._train(vectors)
            self.index.add(vectors)
            new_ids = self.ids + ids
            new_meta = _merge_meta(self.metadata, metadata, len(self.ids))
            self._commit(self.index, new_ids, new_meta)
        except BaseException:
            self._load(verify=False)  # the in-memory index may hold the failed rows: reload
            raise

    def _commit(self, index: Any, ids: list[str], metadata: list[Any] | None) -> None:
        """Write generation ``gen + 1``, switch the header to it, then drop the old files."""
        gen = int(self.header.state["generation"])
        old = self.header.state["files"]
        self._remove_stale(keep=gen)
        state = _write_generation(self.path, gen + 1, index, ids, metadata)
        _after_step("data_written")
        self._commit_header(len(ids), state)
        _after_step("header_committed")
        for rec in old.values():
            (self.path / rec["name"]).unlink(missing_ok=True)
        self.ids, self.metadata = ids, metadata
        self._id_set.update(ids[len(self._id_set) :])

    def _remove_stale(self, keep: int) -> None:
        """Delete data files of generations the header does not name (an earlier crash)."""
        for p in self.path.iterdir():
            m = _GEN_FILE.match(p.name)
            if m and int(m.group(2)) != keep:
                p.unlink(missing_ok=True)

    def _check_searchable(self) -> None:
        if not self.index.is_trained:
            raise UntrainedIndexError(
                f"the IVF-PQ index of store {self.path} is not trained yet",
                hint="add vectors (the first add trains it) or call store.train(sample)",
            )

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        self._check_searchable()
        scores, positions = self.index.search(queries, k)
        return result_from_positions(positions, scores, self.ids, self.metadata)


def _resolve_pq(header: StoreHeader) -> None:
    p = header.index_params
    if p.get("m") is None:
        p["m"] = _auto_pq_m(header.dim)
    if header.dim % int(p["m"]):
        raise RetrievalError(
            f"IVF-PQ m={p['m']} does not divide the dimension {header.dim}",
            hint="choose m among the divisors of the dimension",
        )


def _build_index(header: StoreHeader) -> Any:
    metric = faiss.METRIC_L2 if header.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    p = header.index_params
    if header.index == "flat":
        return faiss.index_factory(header.dim, "Flat", metric)
    if header.index == "hnsw":
        index = faiss.index_factory(header.dim, f"HNSW{int(p['M'])},Flat", metric)
        index.hnsw.efConstruction = int(p["ef_construction"])
        return index
    spec = f"IVF{int(p['nlist'])},PQ{int(p['m'])}x{int(p['nbits'])}"
    return faiss.index_factory(header.dim, spec, metric)


def _write_generation(
    folder: Path, gen: int, index: Any, ids: list[str], metadata: list[Any] | None
) -> dict[str, Any]:
    """Write and fsync one generation's files; return the header state naming them."""
    index_path = folder / f"index.{gen}.faiss"
    rows_path = folder / f"rows.{gen}.json"
    faiss.write_index(index, str(index_path))
    _after_step("index_written")
    with open(rows_path, "w", encoding="utf-8") as fh:
        json.dump({"ids": ids, "metadata": metadata}, fh, ensure_ascii=False)
    return {
        "generation": gen,
        "files": {"index": _file_record(index_path), "rows": _file_record(rows_path)},
    }


def _merge_meta(old: list[Any] | None, new: list[Any], n_old: int) -> list[Any] | None:
    """Keep ``metadata`` null until some row has any (saves a million nulls in the file)."""
    if old is None and all(m is None for m in new):
        return None
    return (old if old is not None else [None] * n_old) + new
