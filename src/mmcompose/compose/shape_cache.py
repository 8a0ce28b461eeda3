"""The tensor shapes a model config implies, remembered per config on disk.

Why: ``compose`` checks every output tensor against the shapes its config.json implies before
it reads a weight (a source whose config contradicts its weights is named up front), and
those shapes come from building the model on the meta device, which imports transformers'
model code: 5-6 s of a 1 GB merge that otherwise streams in about as long. The shapes are a
pure function of the config and of the code that builds the model, so they are kept under
``$MMCOMPOSE_CACHE/shapes/`` keyed by a hash of both: the config's JSON, the versions of
mmcompose, transformers and torch, and the size and mtime of every file of ``mmcompose.model``
(an edited checkout does not reuse shapes its old code implied). A damaged entry is
recomputed; the cache can be deleted at any time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from mmcompose.model.config import MMConfig

__all__ = ["expected_shapes_cached", "shape_cache_key"]

_FORMAT = 1


def _code_stamp() -> list[object]:
    from importlib import metadata

    import mmcompose.model as model_pkg

    versions: list[object] = []
    for dist in ("mmcompose", "transformers", "torch"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            versions.append(None)
    folder = Path(model_pkg.__file__).parent
    for f in sorted(folder.rglob("*.py")):
        st = f.stat()
        versions.append([f.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns])
    return versions


def shape_cache_key(config: MMConfig) -> str:
    """The hash naming ``config``'s entry: its JSON and the code that builds the model."""
    blob = json.dumps([_FORMAT, config.to_json(), _code_stamp()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read(path: Path) -> dict[str, tuple[int, ...]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): tuple(int(d) for d in v) for k, v in data["shapes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or damaged: recomputed


def expected_shapes_cached(config: MMConfig) -> dict[str, tuple[int, ...]]:
    """``mmcompose.model.modeling.expected_shapes(config)``, from the cache when it holds it."""
    from mmcompose.assets.cache import cache_dir
    from mmcompose.fs import write_json_atomic

    path = cache_dir() / "shapes" / f"{shape_cache_key(config)}.json"
    shapes = _read(path)
    if shapes is not None:
        return shapes
    from mmcompose.model.modeling import expected_shapes

    shapes = expected_shapes(config)
    with contextlib.suppress(OSError):  # a read-only cache costs the next run the same time
        write_json_atomic(path, {"shapes": {k: list(v) for k, v in shapes.items()}}, indent=0)
    return shapes
