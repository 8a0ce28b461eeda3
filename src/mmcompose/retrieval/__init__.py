"""Vector stores for pre-stored latents: FAISS (embedded default), LanceDB and Milvus.

``create_store(path, dim, backend=..., index=..., model_id=...)`` makes a store folder,
``open_store(path, model_id=...)`` opens any of them by its header; both return a
:class:`VectorStore` with ``add`` (atomic), ``search``, ``len`` and ``info``. Backends are
imported lazily, so ``import mmcompose.retrieval`` works without the ``retrieval`` extra.
"""

from __future__ import annotations

from mmcompose.retrieval.base import (
    BackendUnavailableError,
    CorruptStoreError,
    RetrievalError,
    SearchResult,
    StoreHeader,
    StoreMismatchError,
    UntrainedIndexError,
    VectorStore,
    backends,
    create_store,
    open_store,
)

__all__ = [
    "BackendUnavailableError",
    "CorruptStoreError",
    "RetrievalError",
    "SearchResult",
    "StoreHeader",
    "StoreMismatchError",
    "UntrainedIndexError",
    "VectorStore",
    "backends",
    "create_store",
    "open_store",
]
