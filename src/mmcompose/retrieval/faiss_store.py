"""FAISS backend: the embedded default. Exact ``flat``, graph ``hnsw`` and compressed ``ivfpq``.

Layout of a store folder::

    store.json              header; ``state.files`` names the committed data files
    index.<gen>.faiss       the FAISS index (row position = insertion order)
    rows.<gen>.json         {"ids": [...], "metadata": [...] | null, "deleted": [positions]}

Atomic add (write-ahead copy): the grown index and id map are written in full to the files of
generation ``gen + 1`` and fsynced; then the header is replaced atomically to name ``gen + 1``
(the single commit point); only then are the ``gen`` files deleted. A crash before the header
replace leaves the header naming the untouched ``gen`` files, so nothing stored before is
lost; leftover files of a generation the header does not name are removed by the next add.
The header records each file's size and SHA-256, so a truncated, swapped or damaged data file
is named on open (sizes, counts, FAISS parse errors always; hashes with ``verify=True``).

Deletes and updates (FAISS HNSW has no real delete): a deleted row's position goes into the
``deleted`` list (a tombstone) and every search skips it through a FAISS ID selector; an
update tombstones the old row and appends the new one under the same id. A delete rewrites
only the rows file (the index file of the previous generation stays named in the header).
Compaction (:meth:`VectorStore.compact`, or automatic past
:data:`~mmcompose.retrieval.base.COMPACT_RATIO` tombstones) rebuilds the index from the live
rows: Flat and HNSW from their exact stored vectors (an HNSW rebuild costs a build), IVF-PQ by
copying the live codes into the same trained quantiser (no re-encoding, same scores).
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
    knobs = {"hnsw": "ef_search", "ivfpq": "nprobe"}  # noqa: RUF012 - read-only class constant
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
        return _write_generation(tmp, 0, index, [], None, [])

    def _load(self, *, verify: bool) -> None:
        state = self.header.state
        files = state.get("files") if isinstance(state, dict) else None
        if not isinstance(files, dict) or set(files) != {"index", "rows"}:
            raise self._corrupt("header names no data files")
        for rec in files.values():
            self._check_file(rec, verify)
        self.index = self._read_index(self.path / files["index"]["name"])
        self.ids, self.metadata, self.deleted = self._read_rows(self.path / files["rows"]["name"])
        counts = {
            "header (live + deleted)": self.header.count + len(self.deleted),
            "index": int(self.index.ntotal),
            "id map": len(self.ids),
        }
        if len(set(counts.values())) != 1 or (
            self.metadata is not None and len(self.metadata) != len(self.ids)
        ):
            raise self._corrupt(f"row counts disagree: {counts}")
        if self.deleted and (
            self.deleted[0] < 0
            or self.deleted[-1] >= len(self.ids)
            or len(set(self.deleted)) != len(self.deleted)
        ):
            raise self._corrupt("the deleted-row list names rows the index does not hold")
        if self.index.d != self.header.dim:
            raise self._corrupt(f"index dimension {self.index.d} != header {self.header.dim}")
        self._index_positions()
        self.tune()

    def _index_positions(self) -> None:
        """``_pos``: live id -> row position (an id's live row is its latest: updates append),
        and the ID selector that hides the deleted rows from searches."""
        self._pos = dict(zip(self.ids, range(len(self.ids)), strict=True))
        for p in self.deleted:
            if self._pos.get(self.ids[p]) == p:
                del self._pos[self.ids[p]]
        if self.deleted:
            live = np.ones(len(self.ids), dtype=bool)
            live[self.deleted] = False
            self._bitmap = np.packbits(live, bitorder="little")  # the selector reads this
            self._selector: Any = faiss.IDSelectorBitmap(len(live), faiss.swig_ptr(self._bitmap))
        else:
            self._bitmap, self._selector = None, None

    @property
    def tombstones(self) -> int:
        return len(self.deleted)

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

    def _read_rows(self, path: Path) -> tuple[list[str], list[Any] | None, list[int]]:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            ids, meta, deleted = raw["ids"], raw["metadata"], raw.get("deleted", [])
            if not isinstance(ids, list) or not (meta is None or isinstance(meta, list)):
                raise TypeError("wrong types")
            if not isinstance(deleted, list) or not all(type(p) is int for p in deleted):
                raise TypeError("deleted rows are not a list of positions")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(f"id map {path.name} is unreadable ({exc})") from None
        return ids, meta, sorted(deleted)

    # ------------------------------------------------------------------ search tuning

    def tune(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Set the search-time knobs for this session (default: the header's values, which
        :meth:`tune_recall` records)."""
        params = self.header.index_params
        if self.header.index == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or params["ef_search"])
        elif self.header.index == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe or params["nprobe"])

    def _set_knob(self, value: int | None) -> None:
        self.tune(**({self.knobs[self.header.index]: value} if value else {}))

    def _knob_range(self, k: int) -> tuple[int, int]:
        if self.header.index == "hnsw":
            return k + 1, max(k + 1, min(4096, len(self)))
        return 1, int(self.header.index_params["nlist"])

    def _live_vectors(self) -> tuple[list[str], np.ndarray]:
        if self.header.index == "ivfpq":
            raise RetrievalError(
                f"the IVF-PQ store {self.path} keeps only compressed codes, not the vectors "
                "that exact search needs",
                hint="pass the stored vectors: store.tune_recall(target, vectors=V, ids=IDS)",
            )
        live = self._live_positions()
        vecs = self.index.reconstruct_n(0, int(self.index.ntotal))[live]
        return [self.ids[p] for p in live], vecs

    def _live_positions(self) -> np.ndarray:
        live = np.ones(len(self.ids), dtype=bool)
        live[self.deleted] = False
        return np.flatnonzero(live)

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
            self._commit(self.index, self.ids, self.metadata, self.deleted)

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
        return [i for i in ids if i in self._pos]

    def _write(
        self, ids: list[str], vectors: np.ndarray, metadata: list[Any], replaced: list[str]
    ) -> None:
        try:
            if not self.index.is_trained:
                self._train(vectors)
            old_rows = [self._pos[i] for i in replaced]
            self.index.add(vectors)
            new_ids = self.ids + ids
            new_meta = _merge_meta(self.metadata, metadata, len(self.ids))
            self._commit(self.index, new_ids, new_meta, sorted(self.deleted + old_rows))
        except BaseException:
            self._load(verify=False)  # the in-memory index may hold the failed rows: reload
            raise

    def _delete(self, ids: list[str]) -> None:
        rows = [self._pos[i] for i in ids]
        try:
            self._commit(None, self.ids, self.metadata, sorted(self.deleted + rows))
        except BaseException:
            self._load(verify=False)
            raise

    def _compact(self) -> None:
        live = self._live_positions()
        try:
            if self.header.index == "ivfpq":
                index = _compact_ivf(self.index, live, len(self.ids))
            else:
                vecs = self.index.reconstruct_n(0, int(self.index.ntotal))[live]
                index = _build_index(self.header)
                index.add(vecs)
            ids = [self.ids[p] for p in live]
            meta = None if self.metadata is None else [self.metadata[p] for p in live]
            self._commit(index, ids, meta, [])
        except BaseException:
            self._load(verify=False)
            raise
        self.tune()

    def _commit(
        self, index: Any | None, ids: list[str], metadata: list[Any] | None, deleted: list[int]
    ) -> None:
        """Write generation ``gen + 1`` (the index file only if ``index`` is given, else the
        current one stays named), switch the header to it, then drop the old files."""
        gen = int(self.header.state["generation"])
        old = self.header.state["files"]
        self._remove_stale()
        state = _write_generation(self.path, gen + 1, index, ids, metadata, deleted)
        if index is None:
            state["files"]["index"] = old["index"]
        _after_step("data_written")
        self._commit_header(len(ids) - len(deleted), state)
        _after_step("header_committed")
        named = {rec["name"] for rec in state["files"].values()}
        for rec in old.values():
            if rec["name"] not in named:
                (self.path / rec["name"]).unlink(missing_ok=True)
        if index is not None:
            self.index = index
        self.ids, self.metadata, self.deleted = ids, metadata, deleted
        self._index_positions()

    def _remove_stale(self) -> None:
        """Delete data files the header does not name (left by an earlier crash)."""
        named = {rec["name"] for rec in self.header.state["files"].values()}
        for p in self.path.iterdir():
            if _GEN_FILE.match(p.name) and p.name not in named:
                p.unlink(missing_ok=True)

    def _check_searchable(self) -> None:
        if not self.index.is_trained:
            raise UntrainedIndexError(
                f"the IVF-PQ index of store {self.path} is not trained yet",
                hint="add vectors (the first add trains it) or call store.train(sample)",
            )

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        self._check_searchable()
        if self._selector is None:
            scores, positions = self.index.search(queries, k)
        else:
            scores, positions = self.index.search(queries, k, params=self._search_params())
        return result_from_positions(positions, scores, self.ids, self.metadata)

    def _search_params(self) -> Any:
        """Search parameters that skip the tombstones and keep this session's knob."""
        if self.header.index == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = int(self.index.hnsw.efSearch)
        elif self.header.index == "ivfpq":
            params = faiss.SearchParametersIVF()
            params.nprobe = int(faiss.extract_index_ivf(self.index).nprobe)
        else:
            params = faiss.SearchParameters()
        params.sel = self._selector
        return params


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


def _compact_ivf(index: Any, live: np.ndarray, slots: int) -> Any:
    """A copy of a trained IVF index holding only the ``live`` rows, renumbered in order:
    the same quantiser and the same codes, so every remaining row scores as before."""
    new_pos = np.full(slots, -1, dtype=np.int64)
    new_pos[live] = np.arange(len(live))
    out = faiss.clone_index(index)
    out.reset()
    src, dst = faiss.extract_index_ivf(index).invlists, faiss.extract_index_ivf(out).invlists
    size = src.code_size
    for lst in range(src.nlist):
        n = src.list_size(lst)
        if not n:
            continue
        rows = faiss.rev_swig_ptr(src.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(src.get_codes(lst), n * size).copy().reshape(n, size)
        keep = new_pos[rows] >= 0
        if keep.any():
            ids, kept = new_pos[rows[keep]], np.ascontiguousarray(codes[keep])
            dst.add_entries(lst, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(kept))
    out.ntotal = len(live)
    return out


def _write_generation(
    folder: Path,
    gen: int,
    index: Any | None,
    ids: list[str],
    metadata: list[Any] | None,
    deleted: list[int],
) -> dict[str, Any]:
    """Write and fsync one generation's files (the index only if given); return the header
    state naming them."""
    files: dict[str, Any] = {}
    if index is not None:
        index_path = folder / f"index.{gen}.faiss"
        faiss.write_index(index, str(index_path))
        _after_step("index_written")
        files["index"] = _file_record(index_path)
    rows_path = folder / f"rows.{gen}.json"
    with open(rows_path, "w", encoding="utf-8") as fh:
        json.dump({"ids": ids, "metadata": metadata, "deleted": deleted}, fh, ensure_ascii=False)
    files["rows"] = _file_record(rows_path)
    return {"generation": gen, "files": files}


def _merge_meta(old: list[Any] | None, new: list[Any], n_old: int) -> list[Any] | None:
    """Keep ``metadata`` null until some row has any (saves a million nulls in the file)."""
    if old is None and all(m is None for m in new):
        return None
    return (old if old is not None else [None] * n_old) + new
