"""The vector-store interface shared by every backend, the store header, and the backend registry.

A store is a folder. Its ``store.json`` header names the backend, the vector dimension, the
metric, the index and its parameters, the model id (fingerprint of the connector whose vectors
it holds), the committed (live) row count, the last recall tuning and the format version. The
header is what makes bad inputs clear errors: a query of the wrong width, a store built by
another model, a folder whose data does not match what the header promised (a crash, a half
copy, tampering).

Every change (add, update, upsert, delete, compact, a recorded tuning) is checked whole before
anything is written, and takes effect in one atomic header replace, so a bad id or a crash
leaves the previous state. Backends without a real delete (FAISS) keep tombstones and compact
when they pass a quarter of the rows.
"""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmcompose.errors import ConfigError, MMComposeError
from mmcompose.fs import atomic_dir, exclusive, read_json, write_json_atomic
from mmcompose.registry import Registry

__all__ = [
    "COMPACT_RATIO",
    "FORMAT_VERSION",
    "HEADER_NAME",
    "METRICS",
    "BackendUnavailableError",
    "ConnectorMismatchError",
    "CorruptStoreError",
    "RetrievalError",
    "SearchResult",
    "StoreHeader",
    "StoreMismatchError",
    "UnknownIdError",
    "UntrainedIndexError",
    "VectorStore",
    "backends",
    "create_store",
    "open_store",
]

HEADER_NAME = "store.json"
FORMAT_VERSION = 2  # 2: tombstones (FAISS), versioned rows (Milvus), recall tuning
COMPACT_RATIO = 0.25  # tombstones above this share of the rows trigger a compaction
_OPEN_ATTEMPTS = 5  # a writer committing while a reader opens: reread the new header
METRICS = ("cosine", "ip", "l2")
_SCHEMA_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "json": (object,),
}


class RetrievalError(MMComposeError):
    """A vector-store operation cannot be carried out."""


class StoreMismatchError(RetrievalError):
    """Vectors or a query do not fit the store: other dimension, other model, other metric."""


class CorruptStoreError(RetrievalError):
    """The store folder is damaged or half-written: its data disagrees with its header."""


class ConnectorMismatchError(StoreMismatchError, ConfigError):
    """A store is searched or extended with a connector other than the one that filled it."""


class UnknownIdError(RetrievalError):
    """A delete or update names ids the store does not hold."""


class UntrainedIndexError(RetrievalError):
    """A trained index (IVF-PQ) was searched or filled before it was trained."""


class BackendUnavailableError(RetrievalError):
    """The backend's package is missing or cannot run on this machine."""


backends: Registry[type[VectorStore]] = Registry(
    "vector-store backend",
    plugins=(
        "mmcompose.retrieval.faiss_store",
        "mmcompose.retrieval.lancedb_store",
        "mmcompose.retrieval.milvus_store",
    ),
)


@dataclass
class StoreHeader:
    """What ``store.json`` holds; ``state`` is backend-private (file names, generation, ...)."""

    backend: str
    dim: int
    metric: str = "cosine"
    index: str = "flat"
    index_params: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    metadata_schema: dict[str, str] | None = None
    count: int = 0
    version: int = FORMAT_VERSION
    state: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] | None = None  # the last ``tune_recall``: knob, value, recall, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> StoreHeader:
        """Parse ``path/store.json``; anything missing or malformed is a CorruptStoreError."""
        if not path.is_dir():
            raise RetrievalError(
                f"no vector store at {path}", hint="create one with `mmcompose index`"
            )
        raw = read_json(path / HEADER_NAME)
        if not isinstance(raw, dict):
            raise CorruptStoreError(
                f"vector store {path}: header {HEADER_NAME} is missing or not valid JSON",
                hint="the store was half-written or damaged; rebuild it",
            )
        try:
            header = cls(**raw)
            ok = (
                isinstance(header.backend, str)
                and isinstance(header.dim, int)
                and header.dim > 0
                and header.metric in METRICS
                and isinstance(header.count, int)
                and header.count >= 0
                and isinstance(header.version, int)
            )
        except TypeError as exc:
            raise CorruptStoreError(
                f"vector store {path}: header {HEADER_NAME} has unexpected fields ({exc})",
                hint="the store was damaged or written by another tool; rebuild it",
            ) from None
        if not ok:
            raise CorruptStoreError(
                f"vector store {path}: header {HEADER_NAME} has invalid values",
                hint="the store was damaged; rebuild it",
            )
        if header.version > FORMAT_VERSION:
            raise RetrievalError(
                f"vector store {path} has format version {header.version}; this mmcompose "
                f"reads up to {FORMAT_VERSION}",
                hint="upgrade mmcompose",
            )
        return header

    def write(self, path: Path) -> None:
        write_json_atomic(path / HEADER_NAME, self.to_json())


@dataclass
class SearchResult:
    """``ids[i, j]`` / ``scores[i, j]`` / ``metadata[i][j]``: the j-th hit of query i, best first.

    Rows are ``min(k, len(store))`` wide. An approximate index may find fewer than that for a
    query; the missing tail is ``None`` ids, ``nan`` scores and ``None`` metadata. Scores are
    similarities (higher is better) for ``cosine``/``ip`` and squared distances (lower is
    better) for ``l2``.
    """

    ids: np.ndarray
    scores: np.ndarray
    metadata: list[list[dict[str, Any] | None]]

    def __iter__(self) -> Iterator[Any]:  # allows ``ids, scores, meta = store.search(...)``
        return iter((self.ids, self.scores, self.metadata))


class VectorStore(ABC):
    """A folder of vectors with string ids and optional per-vector metadata.

    Subclasses implement the ``_``-prefixed hooks; this class does the checks every backend
    shares (shapes, dimension, finite values, normalisation for cosine, duplicate ids, metadata
    schema), so the bad-input errors are the same whichever backend holds the vectors.
    """

    name: ClassVar[str]
    index_kinds: ClassVar[tuple[str, ...]]
    default_params: ClassVar[dict[str, dict[str, Any]]] = {}
    knobs: ClassVar[dict[str, str]] = {}  # index kind -> its search-time recall parameter

    def __init__(self, path: Path, header: StoreHeader) -> None:
        self.path = path
        self.header = header

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        dim: int,
        metric: str = "cosine",
        index: str = "flat",
        *,
        index_params: Mapping[str, Any] | None = None,
        metadata_schema: Mapping[str, str] | None = None,
        model_id: str | None = None,
        overwrite: bool = False,
        **backend_options: Any,
    ) -> VectorStore:
        """Make a new, empty store folder (built aside and renamed in, so never half-made)."""
        cls._check_available()
        header = cls._new_header(dim, metric, index, index_params, metadata_schema, model_id)
        final = Path(path)
        with atomic_dir(final, overwrite=overwrite) as tmp:
            header.state = cls._init_storage(tmp, header, **backend_options)
            header.write(tmp)
        return cls.open(final)

    @classmethod
    def _new_header(
        cls,
        dim: int,
        metric: str,
        index: str,
        index_params: Mapping[str, Any] | None,
        metadata_schema: Mapping[str, str] | None,
        model_id: str | None,
    ) -> StoreHeader:
        if not isinstance(dim, int) or dim <= 0:
            raise RetrievalError(f"vector dimension must be a positive integer, got {dim!r}")
        if metric not in METRICS:
            raise RetrievalError(
                f"unknown metric {metric!r}", hint=f"choose one of: {', '.join(METRICS)}"
            )
        if index not in cls.index_kinds:
            raise RetrievalError(
                f"backend {cls.name!r} has no index {index!r}",
                hint=f"choose one of: {', '.join(cls.index_kinds)}",
            )
        params = {**cls.default_params.get(index, {}), **dict(index_params or {})}
        unknown = set(params) - set(cls.default_params.get(index, {}))
        if unknown:
            known = ", ".join(sorted(cls.default_params.get(index, {}))) or "(none)"
            raise RetrievalError(
                f"unknown parameter(s) {sorted(unknown)} for index {index!r}",
                hint=f"known: {known}",
            )
        schema = dict(metadata_schema) if metadata_schema else None
        for key, kind in (schema or {}).items():
            if kind not in _SCHEMA_TYPES:
                raise RetrievalError(
                    f"metadata field {key!r} has unknown type {kind!r}",
                    hint=f"choose one of: {', '.join(_SCHEMA_TYPES)}",
                )
        return StoreHeader(
            backend=cls.name,
            dim=dim,
            metric=metric,
            index=index,
            index_params=params,
            model_id=model_id,
            metadata_schema=schema,
        )

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = False) -> VectorStore:
        """Open an existing store, checking that its data matches its header.

        ``verify`` also re-hashes data files where the backend keeps checksums (slow on
        large stores; sizes and counts are always checked).
        """
        cls._check_available()
        path = Path(path)
        for attempt in range(_OPEN_ATTEMPTS):
            header = StoreHeader.read(path)
            if header.backend != cls.name:
                raise StoreMismatchError(
                    f"store {path} was made by backend {header.backend!r}, not {cls.name!r}",
                    hint="open it with mmcompose.retrieval.open_store(path)",
                )
            store = cls(path, header)
            try:
                store._load(verify=verify)
                return store
            except CorruptStoreError:
                # Readers take no lock: a writer may have committed and deleted the files this
                # header named. Only data that disagrees with the current header is corrupt.
                store.close()
                if attempt + 1 == _OPEN_ATTEMPTS or StoreHeader.read(path) == header:
                    raise
        raise AssertionError("unreachable")

    @classmethod  # noqa: B027 - optional hook
    def _check_available(cls) -> None:
        """Raise BackendUnavailableError when the backend's package cannot be used."""

    # ------------------------------------------------------------------ public API

    def add(
        self,
        ids: Sequence[str | int],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Append vectors; all of them or none (a crash mid-add keeps the previous rows)."""
        str_ids = self._check_ids(ids)
        vecs = self._prepare(vectors, what="vectors")
        if len(str_ids) != len(vecs):
            raise RetrievalError(f"{len(str_ids)} ids for {len(vecs)} vectors")
        meta = self._check_metadata(metadata, len(vecs))
        if not len(vecs):
            return
        with self._write_lock():
            self._check_new_ids(str_ids)
            self._write(str_ids, vecs, meta, [])
            self._maybe_compact()

    def update(
        self,
        ids: Sequence[str | int],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Replace the vectors (and metadata) of stored ids; an unknown id changes nothing."""
        str_ids, vecs, meta = self._checked_rows(ids, vectors, metadata)
        if not str_ids:
            return
        with self._write_lock():
            self._check_known(str_ids, "update")
            self._write(str_ids, vecs, meta, str_ids)
            self._maybe_compact()

    def upsert(
        self,
        ids: Sequence[str | int],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> tuple[int, int]:
        """Replace the stored ids among ``ids`` and add the others, in one commit.

        Returns ``(updated, added)``."""
        str_ids, vecs, meta = self._checked_rows(ids, vectors, metadata)
        if not str_ids:
            return 0, 0
        with self._write_lock():
            replaced = self._contains_any(str_ids)
            self._write(str_ids, vecs, meta, replaced)
            self._maybe_compact()
        return len(replaced), len(str_ids) - len(replaced)

    def delete(self, ids: Sequence[str | int]) -> int:
        """Remove stored ids (all of them or, if one is unknown, none); returns how many."""
        str_ids = self._check_ids(ids)
        if not str_ids:
            return 0
        with self._write_lock():
            self._check_known(str_ids, "delete")
            self._delete(str_ids)
            self._maybe_compact()
        return len(str_ids)

    def compact(self) -> None:
        """Drop tombstones now (rebuilding the index where the backend needs it)."""
        with self._write_lock():
            if self.tombstones:
                self._compact()

    @property
    def tombstones(self) -> int:
        """Rows deleted or replaced but still in the index (hidden from every search)."""
        return 0

    def _checked_rows(
        self,
        ids: Sequence[str | int],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None,
    ) -> tuple[list[str], np.ndarray, list[dict[str, Any] | None]]:
        str_ids = self._check_ids(ids)
        vecs = self._prepare(vectors, what="vectors")
        if len(str_ids) != len(vecs):
            raise RetrievalError(f"{len(str_ids)} ids for {len(vecs)} vectors")
        return str_ids, vecs, self._check_metadata(metadata, len(vecs))

    def _check_known(self, ids: list[str], action: str) -> None:
        known = set(self._contains_any(ids))
        unknown = [i for i in ids if i not in known]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UnknownIdError(
                f"cannot {action} id {unknown[0]!r}{more}: not in store {self.path}; "
                "nothing was changed",
                hint="check the ids (`mmcompose search --json` prints stored ids)",
            )

    def _maybe_compact(self) -> None:
        slots = len(self) + self.tombstones
        if self.tombstones and self.tombstones > COMPACT_RATIO * slots:
            self._compact()

    # ------------------------------------------------------------------ recall tuning

    def tune_recall(
        self,
        target: float,
        *,
        k: int = 10,
        sample: int = 1000,
        seed: int = 0,
        vectors: np.ndarray | None = None,
        ids: Sequence[str | int] | None = None,
        queries: np.ndarray | None = None,
        record: bool = True,
    ) -> Any:
        """Pick the smallest search knob (HNSW efSearch, IVF nprobe) whose recall@k on a
        sample of queries reaches ``target``, against exact search; record it in the header
        (later searches use it) unless ``record=False``.

        ``queries``: vectors never stored (best: see :func:`tuning.write_tuned`); without
        them, stored vectors are the queries (optimistic for HNSW). ``vectors``/``ids``: the
        stored rows, if the caller still has them (an IVF-PQ store keeps only compressed
        codes, so it needs them). Returns a ``TuneReport``."""
        from mmcompose.retrieval import tuning

        tuning.check_target(target)
        if not isinstance(k, int) or k <= 0:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        param = self.knobs.get(self.header.index)
        if param is None:
            raise RetrievalError(
                f"a {self.header.index!r} index of backend {self.name!r} has no recall knob "
                "to tune" + (" (flat search is exact)" if self.header.index == "flat" else ""),
                hint="tune an approximate index: hnsw or ivfpq",
            )
        if vectors is None:
            live_ids, corpus = self._live_vectors()
        else:
            if ids is None:
                raise RetrievalError("tune_recall(vectors=...) needs the ids of those vectors")
            live_ids = self._check_ids(ids)
            corpus = self._prepare(vectors, what="vectors")
            if len(live_ids) != len(corpus) or len(corpus) != len(self):
                raise RetrievalError(
                    f"tune_recall got {len(corpus)} vectors / {len(live_ids)} ids for a store "
                    f"of {len(self)}; pass all stored rows"
                )
        lo, hi = self._knob_range(k)
        if queries is not None:
            queries = self._prepare(queries, what="queries")
        try:
            report = tuning.tune(
                lambda q, kk, v: self._knob_search(q, kk, v),
                live_ids,
                corpus,
                self.header.metric,
                param,
                target,
                lo,
                hi,
                k=k,
                sample=sample,
                seed=seed,
                queries=queries,
            )
        finally:
            self._set_knob(None)
        if record:
            with self._write_lock():
                params = {**self.header.index_params, param: report.value}
                self.header = StoreHeader(
                    **{
                        **self.header.to_json(),
                        "index_params": params,
                        "tuning": report.record(),
                        "version": FORMAT_VERSION,
                    }
                )
                self.header.write(self.path)
            self._set_knob(None)
        return report

    def _knob_search(self, queries: np.ndarray, k: int, value: int) -> np.ndarray:
        self._set_knob(value)
        return self._search(queries, k).ids

    def _knob_range(self, k: int) -> tuple[int, int]:
        """The values the tuner may try: efSearch from k+1, nprobe from 1 to the lists."""
        raise RetrievalError(f"backend {self.name!r} cannot tune {self.header.index!r}")

    def _set_knob(self, value: int | None) -> None:  # noqa: B027 - optional hook
        """Search with ``value`` for the tuned knob this session (None: the header's)."""

    def _live_vectors(self) -> tuple[list[str], np.ndarray]:
        """Every live (id, vector), as the exact reference for tuning."""
        raise RetrievalError(
            f"store {self.path} cannot return its vectors",
            hint="pass the stored vectors: store.tune_recall(target, vectors=V, ids=IDS)",
        )

    def search(self, queries: np.ndarray, k: int = 10) -> SearchResult:
        """The ``k`` best stored vectors for each query row (a 1-D query is one row)."""
        if not isinstance(k, int) or k <= 0:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        q = self._prepare(queries, what="query")
        width = min(k, len(self))
        if width == 0 or len(q) == 0:
            self._check_searchable()
            return _empty_result(len(q), width)
        return self._search(q, width)

    def __len__(self) -> int:
        return self.header.count

    def info(self) -> dict[str, Any]:
        """The header plus the path: what ``mmcompose search`` prints about a store."""
        out = self.header.to_json()
        out.pop("state", None)
        return {"path": str(self.path), **out}

    def check_model(self, model_id: str | None) -> None:
        """Refuse queries from a connector other than the one that filled the store."""
        if model_id is None or self.header.model_id is None:
            return
        if model_id != self.header.model_id:
            raise ConnectorMismatchError(
                f"store {self.path} holds vectors of model {self.header.model_id!r}, "
                f"but the query comes from model {model_id!r}",
                hint="index the gallery again with this model, or query with the store's model",
            )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release backend resources (connections); the default has none."""

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ backend hooks

    @classmethod
    @abstractmethod
    def _init_storage(cls, tmp: Path, header: StoreHeader, **options: Any) -> dict[str, Any]:
        """Create the empty backend data inside ``tmp``; return the header's ``state``."""

    @abstractmethod
    def _load(self, *, verify: bool) -> None:
        """Open the data and raise CorruptStoreError if it disagrees with the header."""

    @abstractmethod
    def _write(
        self, ids: list[str], vectors: np.ndarray, metadata: list[Any], replaced: list[str]
    ) -> None:
        """Store the rows atomically; the stored ``replaced`` ids (a subset of ``ids``) lose
        their old rows in the same commit (the header replace is the commit point)."""

    @abstractmethod
    def _delete(self, ids: list[str]) -> None:
        """Remove stored ids atomically (all known, checked by the caller)."""

    def _compact(self) -> None:  # noqa: B027 - optional hook
        """Drop tombstones (backends that keep them)."""

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Search a non-empty store; ``k <= len(self)``."""

    @abstractmethod
    def _contains_any(self, ids: list[str]) -> list[str]:
        """The subset of ``ids`` stored (live), in the order of ``ids``."""

    def _check_searchable(self) -> None:  # noqa: B027 - optional hook
        """Raise if the index cannot be searched at all (e.g. untrained)."""

    # ------------------------------------------------------------------ shared checks

    def _prepare(self, array: Any, *, what: str) -> np.ndarray:
        """2-D float32, right width, finite; L2-normalised rows for cosine."""
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise RetrievalError(f"{what} must be a 2-D array (n, dim), got shape {arr.shape}")
        if arr.shape[1] != self.header.dim:
            raise StoreMismatchError(
                f"{what} have dimension {arr.shape[1]}, but store {self.path} holds "
                f"{self.header.dim}-dimensional vectors (model {self.header.model_id!r})",
                hint="embed with the model that built the store, or build a new store",
            )
        if not np.isfinite(arr).all():
            raise RetrievalError(f"{what} contain NaN or infinite values")
        if self.header.metric == "cosine":
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            if (norms == 0).any():
                raise RetrievalError(f"{what} contain an all-zero row; cosine is undefined")
            arr = arr / norms
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _check_ids(self, ids: Sequence[str | int]) -> list[str]:
        str_ids = [str(i) for i in ids]
        if any(not s for s in str_ids):
            raise RetrievalError("ids must be non-empty")
        if len(set(str_ids)) != len(str_ids):
            raise RetrievalError("duplicate ids within one add")
        return str_ids

    def _check_new_ids(self, ids: list[str]) -> None:
        clash = self._contains_any(ids)
        if clash:
            raise RetrievalError(
                f"{len(clash)} id(s) already in store {self.path}, e.g. {clash[0]!r}",
                hint="ids are unique; use new ids or build a new store",
            )

    def _check_metadata(
        self, metadata: Sequence[Mapping[str, Any] | None] | None, n: int
    ) -> list[dict[str, Any] | None]:
        if metadata is None:
            rows: list[dict[str, Any] | None] = [None] * n
        else:
            rows = [None if m is None else dict(m) for m in metadata]
        if len(rows) != n:
            raise RetrievalError(f"{len(rows)} metadata entries for {n} vectors")
        schema = self.header.metadata_schema
        if schema:
            for row in rows:
                _check_row(row or {}, schema)
        return rows

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """One writer at a time per store folder: a second one waits (:func:`fs.exclusive`)."""
        with exclusive(self.path / HEADER_NAME, wait=True, what="vector store"):
            # another process may have committed since we opened: reread the header
            fresh = StoreHeader.read(self.path)
            if fresh != self.header:
                self.header = fresh
                self._load(verify=False)
            yield

    def _commit_header(self, count: int, state: dict[str, Any]) -> None:
        """Write the new header in one atomic replace: the point where a change takes effect."""
        header = StoreHeader(
            **{**self.header.to_json(), "count": count, "state": state, "version": FORMAT_VERSION}
        )
        header.write(self.path)
        self.header = header


def _check_row(row: Mapping[str, Any], schema: Mapping[str, str]) -> None:
    extra = set(row) - set(schema)
    if extra:
        raise RetrievalError(f"metadata keys {sorted(extra)} are not in the store's schema")
    for key, kind in schema.items():
        value = row.get(key)
        if value is None:
            continue
        ok = isinstance(value, _SCHEMA_TYPES[kind]) and not (
            kind in ("int", "float") and isinstance(value, bool)
        )
        if kind == "float" and ok and not math.isfinite(float(value)):
            ok = False
        if not ok:
            raise RetrievalError(f"metadata {key!r}={value!r} is not of type {kind}")


def _empty_result(nq: int, width: int) -> SearchResult:
    return SearchResult(
        ids=np.full((nq, width), None, dtype=object),
        scores=np.full((nq, width), np.nan, dtype=np.float32),
        metadata=[[None] * width for _ in range(nq)],
    )


def result_from_positions(
    positions: np.ndarray,
    scores: np.ndarray,
    ids: Sequence[str],
    metadata: Sequence[dict[str, Any] | None] | None,
) -> SearchResult:
    """Map row positions (``-1`` = no hit) to ids and metadata."""
    out = _empty_result(*positions.shape)
    out.scores[:] = scores
    for i, row in enumerate(positions):
        for j, pos in enumerate(row):
            if pos < 0:
                out.scores[i, j] = np.nan
                continue
            out.ids[i, j] = ids[pos]
            out.metadata[i][j] = metadata[pos] if metadata is not None else None
    return out


def create_store(
    path: str | os.PathLike[str],
    dim: int,
    *,
    backend: str = "faiss",
    metric: str = "cosine",
    index: str = "flat",
    **kwargs: Any,
) -> VectorStore:
    """Create a store with the named backend (``faiss``, ``lancedb`` or ``milvus``)."""
    return backends.get(backend).create(path, dim, metric, index, **kwargs)


def open_store(
    path: str | os.PathLike[str], *, model_id: str | None = None, verify: bool = False
) -> VectorStore:
    """Open any store by reading its header; ``model_id`` must match the store's, if given."""
    header = StoreHeader.read(Path(path))
    store = backends.get(header.backend).open(path, verify=verify)
    store.check_model(model_id)
    return store
