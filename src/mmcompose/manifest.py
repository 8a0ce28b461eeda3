"""Item manifests: JSON lines, one item per line (``id``, ``path``, ``modality``, ``label``,
``split``, optional ``caption``), as the prepared datasets write them and ``eval``, ``index``,
``train`` and ``bench build-mcub`` read them.

Every row is checked once here, on reading, so a row without a field a command needs is named
by file and line before any model is loaded, instead of a ``KeyError`` mid-way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcompose.errors import MMComposeError
from mmcompose.io import load_jsonl

FIELDS: tuple[str, ...] = ("id", "path", "modality", "label", "split")
# What scoring or training on a row needs: its name, its file and kind, and the right answer.
LABELLED: tuple[str, ...] = ("id", "path", "modality", "label")


def check_row(rec: Mapping[str, Any], where: str, required: Sequence[str] = LABELLED) -> None:
    """Raise unless every ``required`` field is a non-empty string (an ``id`` may be a number)."""
    missing = [
        k
        for k in required
        if not (
            (isinstance(rec.get(k), str) and rec[k])
            or (k == "id" and isinstance(rec.get(k), int) and not isinstance(rec[k], bool))
        )
    ]
    if missing:
        raise MMComposeError(
            f"{where} lacks {', '.join(missing)}",
            hint="every manifest row needs string fields " + ", ".join(required),
        )


def read_manifest(
    path: str | os.PathLike[str], split: str | None = None, required: Sequence[str] = LABELLED
) -> list[dict[str, Any]]:
    """The rows of a manifest (of one ``split`` if given), each checked for ``required``.

    Every row is checked, whatever the split, so a damaged manifest fails the same way for
    every command."""
    path = Path(path)
    rows = []
    for n, rec in load_jsonl(path, "manifest", error=MMComposeError):
        check_row(rec, f"{path}:{n}", required)
        rows.append(rec)
    if split:
        rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise MMComposeError(
            f"{path} has no items" + (f" in split {split!r}" if split else ""),
            hint="check the file and --split" if split else "give a manifest with items",
        )
    return rows


__all__ = ["FIELDS", "LABELLED", "check_row", "read_manifest"]
