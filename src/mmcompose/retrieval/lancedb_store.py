"""LanceDB backend: persistent columnar storage with per-vector metadata.

Layout: ``store.json`` + ``lance/`` (a LanceDB database with one table ``vectors``: ``id``,
``vector`` (fixed-size float32 list), ``meta`` (JSON text)).

Atomicity comes from Lance itself: every ``table.add`` writes new data files and then commits
a new table version in one manifest write; a writer that fails mid-stream commits nothing
(checked in the tests by feeding a batch stream that raises half way). The header pins the
committed ``table_version``: readers check that version out, so a Lance commit whose header
update never happened (a crash between the two) is invisible, and the next add restores the
pinned version before appending.

Indexes: ``flat`` (exact scan), ``ivf_pq`` and ``hnsw`` (Lance IVF_HNSW_SQ). An ANN index is
built once the table reaches ``min_rows`` rows; rows added later are scanned exactly until
:meth:`LanceDBStore.reindex`.
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


def _after_step(step: str) -> None:
    """Called between the steps of an add; tests replace it, or kill the process here with
    ``MMCOMPOSE_FAULT=lancedb:STEP`` (see :func:`mmcompose.fs.fault_point`)."""
    fault_point("lancedb:" + step)


@backends.register("lancedb")
class LanceDBStore(VectorStore):
    """Vectors, ids and JSON metadata in one Lance table, versioned by Lance."""

    name = "lancedb"
    index_kinds = ("flat", "ivf_pq", "hnsw")
    default_params = {  # noqa: RUF012 - read-only class constant
        "flat": {},
        "ivf_pq": {
            "num_partitions": 256,
            "num_sub_vectors": None,
            "nprobes": 20,
            "min_rows": 10000,
        },
        "hnsw": {"num_partitions": 1, "m": 20, "ef_construction": 300, "min_rows": 10000},
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

    def _add(self, ids: list[str], vectors: np.ndarray, metadata: list[Any]) -> None:
        table = lancedb.connect(self.path / "lance").open_table(TABLE)
        committed = int(self.header.state["table_version"])
        if table.version != committed:
            table.restore(committed)  # drop a commit left by a crash before its header update
        table.add(self._batches(ids, vectors, metadata))
        _after_step("data_written")
        state = {**self.header.state, "table_version": int(table.version)}
        self._commit_header(self.header.count + len(ids), state)
        self.table = table
        self._id_set.update(ids)
        _after_step("header_committed")
        self._maybe_index()

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
        if self.header.index == "ivf_pq":
            builder = builder.nprobes(int(self.header.index_params["nprobes"]))
        try:
            return builder.to_arrow()
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._corrupt(f"search failed reading the table ({_first_line(exc)})") from None


def _dump(meta: dict[str, Any] | None) -> str | None:
    return None if meta is None else json.dumps(meta, ensure_ascii=False)


def _load(text: str | None) -> dict[str, Any] | None:
    return None if text is None else json.loads(text)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
