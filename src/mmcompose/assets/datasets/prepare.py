"""The preparation loop: build a dataset into the cache atomically, split it, write its
manifests; reuse a complete folder, and only re-split one prepared under an older split rule.

A dataset folder holds its files, ``manifest.jsonl`` (one record per item) and
``mmcompose_manifest.json`` (the meta), written last, so its presence marks the folder complete.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmcompose.assets.cache import (
    MANIFEST_NAME,
    MissingAssetError,
    atomic_dir,
    read_json,
    write_json_atomic,
)
from mmcompose.assets.datasets.concepts import write_concepts
from mmcompose.assets.datasets.items import FORMAT, ITEMS_NAME, Item, read_items
from mmcompose.assets.datasets.registry import DATASETS, DatasetSpec, dataset_dir
from mmcompose.assets.datasets.splits import SPLIT_VERSION, apply_splits, split_meta
from mmcompose.errors import MMComposeError
from mmcompose.fs import atomic_file

__all__ = ["prepare_datasets", "prepare_one"]


def _is_complete(folder: Path, spec: DatasetSpec, seed: int) -> bool:
    """Meta present (written last), same format and seed, and the item list still there.

    The split version is not checked here: an older split only needs its manifest rewritten
    (:func:`_resplit`), not its files rebuilt.
    """
    meta = read_json(folder / MANIFEST_NAME)
    return (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and meta.get("name") == spec.name
        and meta.get("seed") == seed
        and (folder / ITEMS_NAME).is_file()
    )


def _records(
    name: str, items: list[Item], final: Path, tmp: Path, seed: int
) -> list[dict[str, Any]]:
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise MMComposeError(f"duplicate item id {dup!r} while building a dataset")
    ordered = sorted(items, key=lambda i: i.id)
    records = [
        {
            "id": i.id,
            "path": str(final / i.rel),
            "modality": i.modality,
            "label": i.label,
            "caption": i.caption,
            "split": "",
            **i.extra,
        }
        for i in ordered
    ]
    apply_splits(name, records, {i.id: tmp / i.rel for i in ordered}, seed)
    return records


def _folder_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def _meta(spec: DatasetSpec, records: list[dict[str, Any]], tmp: Path, seed: int) -> dict:
    import mmcompose

    return {
        "format": FORMAT,
        "kind": "dataset",
        "name": spec.name,
        "modality": spec.modality,
        "seed": seed,
        "sources": [
            {"package": s.package, "manager": s.manager, "version": s.version()}
            for s in spec.sources
        ],
        "num_items": len(records),
        **split_meta(records),
        "bytes": _folder_bytes(tmp),
        "note": spec.note,
        "created_with": {"mmcompose": getattr(mmcompose, "__version__", "unknown")},
    }


def _write_items(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _resplit(folder: Path, spec: DatasetSpec, seed: int) -> dict | None:
    """Rewrite a complete dataset's split under the current rule, files untouched (espeak,
    meshes and videos are slow to redo); idempotent. Returns the new meta, or None when a
    listed file is gone (the caller then rebuilds).

    manifest.jsonl is replaced first and the meta (with the new ``split_version``) last, so an
    interruption in between only makes the next call re-split again, to the same result.
    """
    meta = read_json(folder / MANIFEST_NAME)
    records = read_items(folder)
    files = {r["id"]: Path(r["path"]) for r in records}
    if not records or not all(p.is_file() for p in files.values()):
        return None
    apply_splits(spec.name, records, files, seed)
    with atomic_file(folder / ITEMS_NAME) as tmp:
        _write_items(tmp, records)
    meta.update(split_meta(records), bytes=_folder_bytes(folder))
    write_json_atomic(folder / MANIFEST_NAME, meta)
    return meta


def _report(name: str, meta: dict, what: str, seconds: float) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(meta["counts"].items()))
    print(
        f"mmcompose: dataset {name!r} {what}: {meta['num_items']} items ({counts}), "
        f"{len(meta['labels'])} labels, {meta['bytes'] / 1e6:.1f} MB, {seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def prepare_one(name: str, force: bool, progress: bool, seed: int) -> Path:
    """Prepare one dataset (see :func:`prepare_datasets`) and return its folder."""
    spec = DATASETS.get(name)
    final = dataset_dir(name)
    started = time.perf_counter()
    if not force and _is_complete(final, spec, seed):
        if read_json(final / MANIFEST_NAME).get("split_version") == SPLIT_VERSION:
            return final
        meta = _resplit(final, spec, seed)
        if meta is not None:
            if progress:
                _report(name, meta, "re-split", time.perf_counter() - started)
            return final
    if progress:
        print(f"mmcompose: preparing dataset {name!r} into {final}", file=sys.stderr, flush=True)
    with atomic_dir(final, overwrite=True) as tmp:
        items = spec.build(tmp, seed)
        if not items:
            raise MMComposeError(f"dataset {name!r} came out empty: its sources hold no items")
        records = _records(name, items, final, tmp, seed)
        _write_items(tmp / ITEMS_NAME, records)
        meta = _meta(spec, records, tmp, seed)
        meta["prepare_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(tmp / MANIFEST_NAME, meta)
    if progress:
        _report(name, meta, "ready", meta["prepare_seconds"])
    return final


def _combined_hint(errors: dict[str, MissingAssetError]) -> str:
    """One apt-get and one pip line covering every missing package."""
    apt, pip = [], []
    for err in errors.values():
        hint = err.hint or ""
        if hint.startswith("apt-get install -y "):
            apt.extend(hint.removeprefix("apt-get install -y ").split())
        elif hint.startswith("pip install "):
            pip.extend(hint.removeprefix("pip install ").split())
    lines = []
    if apt:
        lines.append("apt-get install -y " + " ".join(dict.fromkeys(apt)))
    if pip:
        lines.append("pip install " + " ".join(dict.fromkeys(pip)))
    return " && ".join(lines)


def prepare_datasets(
    only: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Path]:
    """Prepare the named datasets (all by default) and return {name: folder}.

    Idempotent: a complete folder with the same seed is returned at once. ``force`` rebuilds.
    Installs nothing: datasets whose sources are missing are skipped while the others are
    prepared, then one :class:`MissingAssetError` names every missing package.
    """
    names = DATASETS.names() if only is None else list(dict.fromkeys(only))
    for name in names:
        DATASETS.get(name)
    done: dict[str, Path] = {}
    errors: dict[str, MissingAssetError] = {}
    for name in names:
        try:
            done[name] = prepare_one(name, force and name not in done, progress, seed)
        except MissingAssetError as exc:
            errors[name] = exc
    if done:
        write_concepts(seed)
    if errors:
        detail = "; ".join(f"{n}: {e.message}" for n, e in errors.items())
        raise MissingAssetError(
            f"{len(errors)} dataset(s) could not be prepared ({detail})",
            hint=_combined_hint(errors),
        )
    return done
