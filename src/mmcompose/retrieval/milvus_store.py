"""Milvus backend: Milvus Lite in a local file by default; the same client code reaches a
Milvus server or cluster when the store is created with ``uri="http://host:19530"``.

Layout: ``store.json`` + ``milvus.db`` (Milvus Lite) or, with a server URI, only the header
(the vectors live in the server's collection named in the header).

Milvus has no multi-batch transaction, so atomicity is done here with generations: every row
carries the ``gen`` of the write that made it, the header names the last committed generation,
and every search filters ``gen <= committed``. A write inserts its rows with ``gen + 1``,
flushes, then replaces the header (the commit point). Rows of a crashed write stay invisible
and are deleted by the next write. Milvus Lite (3.x) has FLAT and HNSW but not IVF_PQ; an
``ivfpq`` store therefore needs a server URI and is refused locally.

Deletes and updates. A row's primary key is a version key ``"<gen>:<id>"`` (the user's id is
the ``id`` field), so an update inserts the new version beside the old one. The header's
``dead`` list names the row versions a committed delete or update removed; searches also
filter them out, so the header replace is again the only commit point. Right after it the
dead rows are deleted from Milvus and the list is emptied (the next write finishes that if a
crash came between). Stores of format 1 (primary key = id) can still delete, not update.
"""

from __future__ import annotations

import contextlib
import os
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
    from pymilvus import DataType, MilvusClient
except ImportError:  # pragma: no cover - exercised only without the retrieval extra
    MilvusClient = None

__all__ = ["MilvusStore"]

LITE_FILE = "milvus.db"
_BATCH = 5000
_ID_CHUNK = 1000
_INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivfpq": "IVF_PQ"}
_MILVUS_ERRORS: tuple[type[BaseException], ...] = (Exception,)  # pymilvus raises many kinds
LAYOUT = 2  # 2: pk = "<gen>:<id>" + an id field; 1 (older stores): pk = id


def _after_step(step: str) -> None:
    """Called between the steps of an add; tests replace it, or kill the process here with
    ``MMCOMPOSE_FAULT=milvus:STEP`` (see :func:`mmcompose.fs.fault_point`)."""
    fault_point("milvus:" + step)


_lite_refs: dict[str, int] = {}


def _lite_acquire(uri: str) -> None:
    if uri.endswith(".db"):
        key = str(Path(uri).resolve())
        _lite_refs[key] = _lite_refs.get(key, 0) + 1


def _lite_release(uri: str) -> None:
    """Stop the in-process Milvus Lite server of ``uri`` when its last store closes.

    Milvus Lite keeps one server (and a lock on the data folder) per path until the process
    exits; a store that is renamed into place or reopened elsewhere needs it gone.
    """
    if not uri.endswith(".db"):
        return
    key = str(Path(uri).resolve())
    _lite_refs[key] = _lite_refs.get(key, 1) - 1
    if _lite_refs[key] <= 0:
        _lite_refs.pop(key, None)
        with contextlib.suppress(Exception):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(key)


def _lite_available() -> bool:
    try:
        import milvus_lite  # noqa: F401
    except ImportError:
        return False
    return True


@backends.register("milvus")
class MilvusStore(VectorStore):
    """Rows ``(pk, vector, gen, meta JSON)`` in one Milvus collection."""

    name = "milvus"
    index_kinds = ("flat", "hnsw", "ivfpq")
    knobs = {"hnsw": "ef_search", "ivfpq": "nprobe"}  # noqa: RUF012 - read-only class constant
    default_params = {  # noqa: RUF012 - read-only class constant
        "flat": {},
        "hnsw": {"M": 32, "ef_construction": 200, "ef_search": 64},
        "ivfpq": {"nlist": 256, "m": 48, "nbits": 8, "nprobe": 16},
    }

    @classmethod
    def _check_available(cls) -> None:
        if MilvusClient is None:
            raise BackendUnavailableError(
                "the milvus backend needs the pymilvus package",
                hint="pip install 'mmcompose[retrieval]' milvus-lite",
            )

    # ------------------------------------------------------------------ connection

    @staticmethod
    def _connect(uri: str, token: str | None = None) -> Any:
        if uri.endswith(".db") and not _lite_available():
            raise BackendUnavailableError(
                "a local Milvus store needs Milvus Lite, which is not installed or not "
                "available on this platform",
                hint="pip install milvus-lite (Linux/macOS), or create the store with "
                "uri='http://HOST:19530' to use a Milvus server",
            )
        try:
            # a server's credentials never go into the header: the token comes from the caller
            # or from MMCOMPOSE_MILVUS_TOKEN ("user:password" or an API key)
            token = token or os.environ.get("MMCOMPOSE_MILVUS_TOKEN", "")
            client = MilvusClient(uri=uri, token=token)
        except _MILVUS_ERRORS as exc:
            raise BackendUnavailableError(
                f"cannot reach Milvus at {uri} ({type(exc).__name__}: {exc})",
                hint="for a local store: is another process using it? Milvus Lite allows one",
            ) from None
        _lite_acquire(uri)
        return client

    def _uri(self) -> str:
        return self.header.state.get("uri") or str(self.path / LITE_FILE)

    @classmethod
    def _metric(cls, header: StoreHeader) -> str:
        return "L2" if header.metric == "l2" else "IP"

    @classmethod
    def _init_storage(cls, tmp: Path, header: StoreHeader, **options: Any) -> dict[str, Any]:
        uri = options.pop("uri", None)  # None: Milvus Lite in the store folder
        collection = options.pop("collection", "mmcompose_vectors")
        token = options.pop("token", None)
        if options:
            raise RetrievalError(f"unknown milvus store option(s): {sorted(options)}")
        if uri is None and header.index == "ivfpq":
            raise RetrievalError(
                "Milvus Lite has no IVF-PQ index",
                hint="use index='hnsw' or 'flat' locally, or uri='http://HOST:19530' for IVF-PQ",
            )
        target = uri or str(tmp / LITE_FILE)
        client = cls._connect(target, token)
        try:
            if client.has_collection(collection):
                raise RetrievalError(f"Milvus at {uri} already has a collection {collection!r}")
            client.create_collection(
                collection,
                schema=cls._schema(client, header),
                index_params=cls._index(client, header),
            )
        finally:
            client.close()
            _lite_release(target)
        return {"uri": uri, "collection": collection, "generation": 0, "layout": LAYOUT, "dead": []}

    @classmethod
    def _schema(cls, client: Any, header: StoreHeader) -> Any:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=1100)
        schema.add_field("id", DataType.VARCHAR, max_length=1024)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=header.dim)
        schema.add_field("gen", DataType.INT64)
        schema.add_field("meta", DataType.JSON, nullable=True)
        return schema

    @classmethod
    def _index(cls, client: Any, header: StoreHeader) -> Any:
        p = header.index_params
        params: dict[str, Any] = {}
        if header.index == "hnsw":
            params = {"M": int(p["M"]), "efConstruction": int(p["ef_construction"])}
        elif header.index == "ivfpq":
            params = {"nlist": int(p["nlist"]), "m": int(p["m"]), "nbits": int(p["nbits"])}
        index = client.prepare_index_params()
        index.add_index(
            field_name="vector",
            index_type=_INDEX_TYPES[header.index],
            metric_type=cls._metric(header),
            params=params,
        )
        return index

    # ------------------------------------------------------------------ open / close

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(
            f"vector store {self.path} is corrupt or half-written: {what}",
            hint="restore it from a backup or rebuild it with `mmcompose index`",
        )

    @property
    def _layout(self) -> int:
        return int(self.header.state.get("layout", 1))

    @property
    def _id_field(self) -> str:
        return "id" if self._layout >= 2 else "pk"

    def _visible(self) -> str:
        """The filter of committed, live rows."""
        expr = f"gen <= {int(self.header.state['generation'])}"
        dead = self.header.state.get("dead") or []
        return expr + (f" and pk not in {_list(dead)}" if dead else "")

    def _load(self, *, verify: bool) -> None:
        state = self.header.state
        if not isinstance(state.get("generation"), int) or not state.get("collection"):
            raise self._corrupt("header names no collection/generation")
        if not isinstance(state.get("dead", []), list):
            raise self._corrupt("header's dead-row list is not a list")
        uri = self._uri()
        if not state.get("uri") and not Path(uri).exists():
            raise self._corrupt(f"Milvus Lite file {LITE_FILE} is missing")
        self.close()
        self.client = self._connect(uri, None)
        try:
            ok = self.client.has_collection(state["collection"])
            if ok:
                self.client.load_collection(state["collection"])
            count = self._count(self._visible()) if ok else -1
        except _MILVUS_ERRORS as exc:
            raise self._corrupt(f"Milvus cannot read the collection ({exc})") from None
        if not ok:
            raise self._corrupt(f"collection {state['collection']!r} is missing")
        if count != self.header.count:
            raise self._corrupt(f"collection has {count} committed rows, header says {len(self)}")

    def _count(self, expr: str) -> int:
        rows = self.client.query(
            self.header.state["collection"], filter=expr, output_fields=["count(*)"]
        )
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            with contextlib.suppress(*_MILVUS_ERRORS):
                client.close()
            _lite_release(self._uri())
            self.client = None

    # ------------------------------------------------------------------ add

    def _versions(self, ids: list[str]) -> dict[str, str]:
        """Live id -> primary key of its row version."""
        idf = self._id_field
        found: dict[str, str] = {}
        for start in range(0, len(ids), _ID_CHUNK):
            rows = self.client.query(
                self.header.state["collection"],
                filter=f"{self._visible()} and {idf} in {_list(ids[start : start + _ID_CHUNK])}",
                output_fields=["pk", idf],
            )
            found.update((r[idf], r["pk"]) for r in rows)
        return found

    def _contains_any(self, ids: list[str]) -> list[str]:
        found = self._versions(ids)
        return [i for i in ids if i in found]

    def _cleanup(self) -> None:
        """Before a write: drop rows of a write that crashed, and finish a crashed purge."""
        coll = self.header.state["collection"]
        self.client.delete(coll, filter=f"gen > {int(self.header.state['generation'])}")
        self._purge_dead()

    def _purge_dead(self) -> None:
        """Delete the (already invisible) dead row versions, then empty the list."""
        dead = self.header.state.get("dead") or []
        if not dead:
            return
        coll = self.header.state["collection"]
        for start in range(0, len(dead), _ID_CHUNK):
            self.client.delete(coll, ids=dead[start : start + _ID_CHUNK])
        self.client.flush(coll)
        _after_step("dead_deleted")
        self._commit_header(len(self), {**self.header.state, "dead": []})

    def _write(
        self, ids: list[str], vectors: np.ndarray, metadata: list[Any], replaced: list[str]
    ) -> None:
        if replaced and self._layout < 2:
            raise RetrievalError(
                f"store {self.path} was made by an older mmcompose (one row per id): its rows "
                "cannot be replaced in place",
                hint="delete the ids and add them again, or rebuild the store",
            )
        coll = self.header.state["collection"]
        g = int(self.header.state["generation"])
        self._cleanup()
        old = self._versions(replaced)
        for start in range(0, len(ids), _BATCH):
            rows = [
                {**self._key(pk, g + 1), "vector": vec.tolist(), "gen": g + 1, "meta": meta}
                for pk, vec, meta in zip(
                    ids[start : start + _BATCH],
                    vectors[start : start + _BATCH],
                    metadata[start : start + _BATCH],
                    strict=True,
                )
            ]
            self.client.insert(coll, rows)
            _after_step("batch_written")
        self.client.flush(coll)
        _after_step("data_written")
        state = {**self.header.state, "generation": g + 1, "dead": [old[i] for i in replaced]}
        self._commit_header(len(self) + len(ids) - len(replaced), state)
        _after_step("header_committed")
        self._purge_dead()

    def _key(self, id_: str, gen: int) -> dict[str, str]:
        return {"pk": f"{gen}:{id_}", "id": id_} if self._layout >= 2 else {"pk": id_}

    def _delete(self, ids: list[str]) -> None:
        self._cleanup()
        pks = self._versions(ids)
        state = {**self.header.state, "dead": [pks[i] for i in ids]}
        self._commit_header(len(self) - len(ids), state)
        _after_step("header_committed")
        self._purge_dead()

    # ------------------------------------------------------------------ tuning

    def _knob_range(self, k: int) -> tuple[int, int]:
        if self.header.index == "hnsw":
            return k + 1, max(k + 1, min(4096, len(self)))
        return 1, int(self.header.index_params["nlist"])

    def _set_knob(self, value: int | None) -> None:
        self._knob = value

    def _live_vectors(self) -> tuple[list[str], np.ndarray]:
        idf = self._id_field
        it = self.client.query_iterator(
            self.header.state["collection"],
            batch_size=4096,
            filter=self._visible(),
            output_fields=[idf, "vector"],
        )
        ids: list[str] = []
        vecs: list[Any] = []
        try:
            while rows := it.next():
                ids.extend(r[idf] for r in rows)
                vecs.extend(r["vector"] for r in rows)
        finally:
            it.close()
        return ids, np.asarray(vecs, dtype=np.float32).reshape(len(ids), self.header.dim)

    # ------------------------------------------------------------------ search

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        p = self.header.index_params
        knob = getattr(self, "_knob", None)
        params: dict[str, Any] = {}
        if self.header.index == "hnsw":
            params = {"ef": max(int(knob or p["ef_search"]), k)}
        elif self.header.index == "ivfpq":
            params = {"nprobe": int(knob or p["nprobe"])}
        idf = self._id_field
        hits = self.client.search(
            self.header.state["collection"],
            data=queries.tolist(),
            limit=k,
            filter=self._visible(),
            output_fields=["meta", idf] if idf != "pk" else ["meta"],
            search_params={"metric_type": self._metric(self.header), "params": params},
        )
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), np.nan, dtype=np.float32)
        found_ids: list[str] = []
        found_meta: list[Any] = []
        for i, row in enumerate(hits):
            for j, hit in enumerate(row[:k]):
                positions[i, j] = len(found_ids)
                scores[i, j] = hit["distance"]
                entity = hit.get("entity", {})
                found_ids.append(entity[idf] if idf != "pk" else hit["pk"])
                found_meta.append(entity.get("meta"))
        return result_from_positions(positions, scores, found_ids, found_meta)


def _list(values: list[str]) -> str:
    """A Milvus expression list of string literals (JSON quoting: quotes and backslashes)."""
    import json

    return json.dumps(list(values), ensure_ascii=False)
