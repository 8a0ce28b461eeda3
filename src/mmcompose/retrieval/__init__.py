"""Vector stores for pre-stored latents: FAISS (embedded default), LanceDB and Milvus.

``create_store(path, dim, backend=..., index=..., model_id=...)`` makes a store folder,
``open_store(path, model_id=...)`` opens any of them by its header; both return a
:class:`VectorStore` with ``add``, ``update``, ``upsert``, ``delete`` and ``compact`` (each
atomic), ``search``, ``tune_recall`` (efSearch / nprobe for a target recall, recorded in the
store), ``len`` and ``info``. Backends are imported lazily, so ``import mmcompose.retrieval``
works without the ``retrieval`` extra.
"""

from __future__ import annotations

from mmcompose.retrieval.base import (
    BackendUnavailableError,
    ConnectorMismatchError,
    CorruptStoreError,
    RetrievalError,
    SearchResult,
    StoreHeader,
    StoreMismatchError,
    UnknownIdError,
    UntrainedIndexError,
    VectorStore,
    backends,
    create_store,
    open_store,
)

__all__ = [
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
