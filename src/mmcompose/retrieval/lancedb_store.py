"""LanceDB backend: persistent columnar storage with per-vector metadata.

Layout: ``store.json`` + ``lance/`` (a LanceDB database with one table ``vectors``: ``id``,
``vector`` (fixed-size float32 list), ``meta`` (JSON text)).

Atomicity comes from Lance itself: every ``table.add`` writes new data files and then commits
a new table version in one manifest write; a writer that fails mid-stream commits nothing
(checked in the tests by feeding a batch stream that raises half way). The header pins the
committed ``table_version``: readers check that version out, so a Lance commit whose header
update never happened (a crash between the two) is invisible, and the next add restores the
pinned version before appending.

Deletes and updates are Lance's own: a delete writes deletion files and commits a version, an
update or upsert is one ``merge_insert`` on ``id`` (old rows deleted and new ones written in
one commit), so both are atomic the same way as an add; a delete of many ids may take several
Lance commits, of which readers see none until the header names the last.

Indexes: ``flat`` (exact scan), ``ivf_pq`` and ``hnsw`` (Lance IVF_HNSW_SQ). An ANN index is
built once the table reaches ``min_rows`` rows; rows added later are scanned exactly until
:meth:`LanceDBStore.reindex`. ``nprobes`` (IVF-PQ) and ``ef_search`` (HNSW; None = Lance's
default) are the knobs :meth:`~mmcompose.retrieval.base.VectorStore.tune_recall` sets.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
    VectorStore,
    backends,
    result_from_positions,
)

try:
    import lancedb
    import pyarrow as pa
except ImportError:  # pragma: no cover - exercised only without the retrieval extra
    lancedb = None

__all__ = ["LanceDBStore"]

TABLE = "vectors"
_INDEX_TYPES = {"ivf_pq": "IVF_PQ", "hnsw": "IVF_HNSW_SQ"}
_BATCH = 65536
_DELETE_CHUNK = 1000  # ids per Lance delete predicate


def _after_step(step: str) -> None:
    """Called between the steps of an add; tests replace it, or kill the process here with
    ``MMCOMPOSE_FAULT=lancedb:STEP`` (see :func:`mmcompose.fs.fault_point`)."""
    fault_point("lancedb:" + step)


@backends.register("lancedb")
class LanceDBStore(VectorStore):
    """Vectors, ids and JSON metadata in one Lance table, versioned by Lance."""

    name = "lancedb"
    index_kinds = ("flat", "ivf_pq", "hnsw")
    knobs = {"ivf_pq": "nprobes", "hnsw": "ef_search"}  # noqa: RUF012 - read-only constant
    default_params = {  # noqa: RUF012 - read-only class constant
        "flat": {},
        "ivf_pq": {
            "num_partitions": 256,
            "num_sub_vectors": None,
            "nprobes": 20,
            "min_rows": 10000,
        },
        "hnsw": {
            "num_partitions": 1,
            "m": 20,
            "ef_construction": 300,
            "ef_search": None,
            "min_rows": 10000,
        },
    }

    @classmethod
    def _check_available(cls) -> None:
        if lancedb is None:
            raise BackendUnavailableError(
                "the lancedb backend needs the lancedb and pyarrow packages",
                hint="pip install 'mmcompose[retrieval]'",
            )

    @classmethod
    def _schema(cls, dim: int) -> Any:
        return pa.schema(
            [
                pa.field("id", pa.string(), nullable=False),
                pa.field("vector", pa.list_(pa.float32(), dim)),
                pa.field("meta", pa.string()),
            ]
        )

    @classmethod
    def _init_storage(cls, tmp: Path, header: StoreHeader, **options: Any) -> dict[str, Any]:
        if options:
            raise RetrievalError(f"unknown lancedb store option(s): {sorted(options)}")
        table = lancedb.connect(tmp / "lance").create_table(TABLE, schema=cls._schema(header.dim))
        return {"table_version": int(table.version), "indexed": False}

    # ------------------------------------------------------------------ open

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"vector store {self.path} is corrupt or half-written: {what}",
            hint="restore it from a backup or rebuild it with `mmcompose index`",
        )

    def _load(self, *, verify: bool) -> None:
        version = self.header.state.get("table_version")
        if not isinstance(version, int):
            raise self._corrupt("header names no table version")
        try:
            self.table = lancedb.connect(self.path / "lance").open_table(TABLE)
            if self.table.version != version:
                self.table.checkout(version)  # ignore a commit the header never acknowledged
            count = self.table.count_rows()
            ids = self.table.to_arrow().column("id") if verify else self._id_column(count)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._corrupt(f"Lance cannot read table {TABLE!r} ({_first_line(exc)})") from None
        if count != self.header.count:
            raise self._corrupt(f"table has {count} rows, header says {self.header.count}")
        self._id_set = set(ids.to_pylist())

    def _id_column(self, count: int) -> Any:
        if count == 0:
            return pa.array([], type=pa.string())
        return self.table.search().select(["id"]).limit(count).to_arrow().column("id")

    # ------------------------------------------------------------------ add

    def _contains_any(self, ids: list[str]) -> list[str]:
        return [i for i in ids if i in self._id_set]

    def _writable_table(self) -> Any:
        table = lancedb.connect(self.path / "lance").open_table(TABLE)
        committed = int(self.header.state["table_version"])
        if table.version != committed:
            table.restore(committed)  # drop a commit left by a crash before its header update
        return table

    def _write(
        self, ids: list[str], vectors: np.ndarray, metadata: list[Any], replaced: list[str]
    ) -> None:
        table = self._writable_table()
        batches = self._batches(ids, vectors, metadata)
        if replaced:  # old rows deleted and new ones written in one Lance commit
            merge = table.merge_insert("id").when_matched_update_all()
            merge.when_not_matched_insert_all().execute(batches)
        else:
            table.add(batches)
        _after_step("data_written")
        state = {**self.header.state, "table_version": int(table.version)}
        self._commit_header(self.header.count + len(ids) - len(replaced), state)
        self.table = table
        self._id_set.update(ids)
        _after_step("header_committed")
        self._maybe_index()

    def _delete(self, ids: list[str]) -> None:
        table = self._writable_table()
        for start in range(0, len(ids), _DELETE_CHUNK):
            quoted = ", ".join(_sql_string(i) for i in ids[start : start + _DELETE_CHUNK])
            table.delete(f"id IN ({quoted})")
            _after_step("delete_written")
        state = {**self.header.state, "table_version": int(table.version)}
        self._commit_header(self.header.count - len(ids), state)
        self.table = table
        self._id_set.difference_update(ids)

    # ------------------------------------------------------------------ tuning

    def _knob_range(self, k: int) -> tuple[int, int]:
        if self.header.index == "hnsw":
            return k + 1, max(k + 1, min(4096, len(self)))
        return 1, int(self.header.index_params["num_partitions"])

    def _set_knob(self, value: int | None) -> None:
        self._knob = value

    def _live_vectors(self) -> tuple[list[str], np.ndarray]:
        data = self.table.to_arrow().select(["id", "vector"])
        flat = data.column("vector").combine_chunks().flatten().to_numpy()
        return data.column("id").to_pylist(), flat.reshape(len(data), self.header.dim)

    def _batches(self, ids: list[str], vectors: np.ndarray, metadata: list[Any]) -> Any:
        """A lazy Arrow stream, so a large add never holds a second full copy in memory."""
        schema = self._schema(self.header.dim)

        def gen() -> Iterator[Any]:
            for start in range(0, len(ids), _BATCH):
                stop = start + _BATCH
                flat = pa.array(vectors[start:stop].ravel(), type=pa.float32())
                yield pa.RecordBatch.from_arrays(
                    [
                        pa.array(ids[start:stop], type=pa.string()),
                        pa.FixedSizeListArray.from_arrays(flat, self.header.dim),
                        pa.array([_dump(m) for m in metadata[start:stop]], type=pa.string()),
                    ],
                    schema=schema,
                )
                _after_step("batch_written")

        return pa.RecordBatchReader.from_batches(schema, gen())

    def _maybe_index(self) -> None:
        p = self.header.index_params
        if self.header.index == "flat" or self.header.state.get("indexed"):
            return
        if len(self) >= int(p["min_rows"]):
            self._reindex()

    def reindex(self) -> None:
        """(Re)build the ANN index over all rows; a no-op for ``flat`` stores."""
        if self.header.index != "flat":
            with self._write_lock():
                self._reindex()

    def _reindex(self) -> None:
        p = self.header.index_params
        kwargs: dict[str, Any] = {
            "metric": "l2" if self.header.metric == "l2" else "dot",
            "vector_column_name": "vector",
            "index_type": _INDEX_TYPES[self.header.index],
            "num_partitions": int(p["num_partitions"]),
            "replace": True,
        }
        if self.header.index == "ivf_pq" and p.get("num_sub_vectors"):
            kwargs["num_sub_vectors"] = int(p["num_sub_vectors"])
        if self.header.index == "hnsw":
            kwargs.update(m=int(p["m"]), ef_construction=int(p["ef_construction"]))
        table = lancedb.connect(self.path / "lance").open_table(TABLE)
        table.create_index(**kwargs)
        state = {**self.header.state, "table_version": int(table.version), "indexed": True}
        self._commit_header(len(self), state)
        self.table = table

    # ------------------------------------------------------------------ search

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        metric = "l2" if self.header.metric == "l2" else "dot"
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), np.nan, dtype=np.float32)
        found_ids: list[str] = []
        found_meta: list[Any] = []
        for i, q in enumerate(queries):
            rows = self._query(q, k, metric)
            n = rows.num_rows
            dist = rows.column("_distance").to_numpy()
            scores[i, :n] = dist if metric == "l2" else 1.0 - dist  # Lance "dot" is 1 - <q, x>
            positions[i, :n] = np.arange(len(found_ids), len(found_ids) + n)
            found_ids.extend(rows.column("id").to_pylist())
            found_meta.extend(_load(m) for m in rows.column("meta").to_pylist())
        return result_from_positions(positions, scores, found_ids, found_meta)

    def _query(self, q: np.ndarray, k: int, metric: str) -> Any:
        builder = (
            self.table.search(q, vector_column_name="vector")
            .distance_type(metric)
            .select(["id", "meta", "_distance"])
            .limit(k)
        )
        knob = getattr(self, "_knob", None) or self.header.index_params.get(
            self.knobs.get(self.header.index, ""), None
        )
        if self.header.index == "ivf_pq":
            builder = builder.nprobes(int(knob))
        elif self.header.index == "hnsw" and knob:
            builder = builder.ef(int(knob))
        try:
            return builder.to_arrow()
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._corrupt(f"search failed reading the table ({_first_line(exc)})") from None


def _sql_string(value: str) -> str:
    """A SQL string literal (Lance's predicates): quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


def _dump(meta: dict[str, Any] | None) -> str | None:
    return None if meta is None else json.dumps(meta, ensure_ascii=False)


def _load(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
