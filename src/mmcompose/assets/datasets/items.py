"""A dataset item while it is built, the records of a prepared ``manifest.jsonl``, and the
seeded hashing every dataset uses to pick, name and split items reproducibly."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "ITEMS_NAME", "Item", "hash_int", "read_items", "seeded_rng", "slug"]

FORMAT = 1  # the files; a new split rule bumps SPLIT_VERSION only (manifest rewritten)
ITEMS_NAME = "manifest.jsonl"


@dataclass
class Item:
    """One dataset record while it is being built; ``rel`` is relative to the dataset folder."""

    id: str
    rel: str
    modality: str
    label: str
    caption: str
    extra: dict[str, Any] = field(default_factory=dict)


def hash_int(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts: a seeded order that is the same everywhere."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def slug(text: str) -> str:
    """Lower-case ASCII letters and digits joined by ``-``: item ids and file names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def seeded_rng(seed: int, *parts: object) -> np.random.Generator:
    """A generator of its own per item, so one item's randomness does not depend on others."""
    return np.random.default_rng(hash_int(seed, *parts))


def read_items(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a prepared dataset's ``manifest.jsonl``."""
    with open(Path(folder) / ITEMS_NAME, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
