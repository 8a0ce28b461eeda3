"""Train/val/test splits: stratified per label, near-duplicates kept in one split; pure
functions of the records, the file bytes and the seed, so every machine splits alike."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcompose.assets.cache import sha256_file
from mmcompose.assets.datasets.items import hash_int
from mmcompose.assets.datasets.registry import DATASETS

__all__ = [
    "HELD_OUT_PERCENT",
    "SPLIT_RULE",
    "SPLIT_VERSION",
    "apply_splits",
    "assign_splits",
    "split_groups",
    "split_meta",
    "split_quota",
]

SPLIT_VERSION = 2  # 1: per-item hash 80/10/10; 2: per-label stratified, groups kept together
HELD_OUT_PERCENT = 15  # per label, each of test and val (see split_quota)


def split_quota(n: int) -> tuple[int, int]:
    """(test, val) item counts for a label with ``n`` items.

    Test: ceil(15%), at least 1, and 2 from 6 items on, so labels of 6-13 items (8 spoken
    voices, 12 mesh poses, most openclipart labels) hold out 2: mini-MCUB's distinct input tuples
    are products of these counts. Val: as many, fewer where train would drop below half.
    n == 2: one test item (a val item too would leave none for training); n == 1: train only,
    since a closed-set classifier must have seen every label it is tested on.
    """
    if n < 2:
        return 0, 0
    if n == 2:
        return 1, 0
    test = max(2 if n >= 6 else 1, -(-n * HELD_OUT_PERCENT // 100))
    val = max(1, min(test, n - test - -(-n // 2)))
    return test, val


def assign_splits(items: Sequence[Sequence[str]], seed: int = 0) -> dict[str, str]:
    """id -> split for ``(id, label)`` or ``(id, label, group)`` tuples; pure and order-free.

    Stratified per label, so every concept with enough items has held-out items in every
    dataset (mini-MCUB needs concepts held out in 3-4 modalities at once), and every held-out
    label keeps train items. A group (default: the item alone) never straddles splits. Within a
    label, groups in order of sha256(seed, group) go to test while they fit its
    :func:`split_quota`, then to val, else train; if groups are too big to fit, a label with two
    or more train groups still moves its smallest one to an empty test (then val) split.
    """
    labels: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for item_id, label, *group in items:
        labels[label][group[0] if group else item_id].append(item_id)
    splits: dict[str, str] = {}
    for groups in labels.values():
        test, val = split_quota(sum(len(ids) for ids in groups.values()))
        quota = {"test": test, "val": val}
        filled = dict.fromkeys(quota, 0)
        where: dict[str, str] = {}
        for key in sorted(groups, key=lambda g: (hash_int("split", seed, g), g)):
            size = len(groups[key])
            where[key] = next((s for s in quota if filled[s] + size <= quota[s]), "train")
            if where[key] != "train":
                filled[where[key]] += size
        for split, want in quota.items():
            in_train = [g for g in where if where[g] == "train"]
            if want and not filled[split] and len(in_train) >= 2:
                key = min(in_train, key=lambda g: len(groups[g]))  # ties: first in hash order
                where[key] = split
                filled[split] += len(groups[key])
        for key, ids in groups.items():
            splits.update(dict.fromkeys(ids, where[key]))
    return splits


def split_groups(
    name: str, records: Sequence[Mapping[str, Any]], files: Mapping[str, Path]
) -> dict[str, str]:
    """id -> group (its smallest member id, stable across machines) for :func:`assign_splits`.

    Byte-identical files always share a group: openclipart files one drawing under several
    folders, and a copy in test of a train image measures memory. Items sharing a source field
    (the dataset's ``group_by``) share a group unless it is their label's only source; then
    they are split like a mesh's poses (a new motion of a seen image), else the label would have
    no held-out clip. Mesh poses are never grouped: most labels have one mesh. ``files`` maps
    each id to its file as it is on disk now.
    """
    parent = {rec["id"]: rec["id"] for rec in records}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(ids: Iterable[str]) -> None:
        ids = sorted(ids)
        for other in ids[1:]:
            a, b = root(ids[0]), root(other)
            parent[max(a, b)] = min(a, b)

    by_key: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for rec in records:
        by_key[("sha256", sha256_file(files[rec["id"]]))].append(rec["id"])
    fields = DATASETS.get(name).group_by if name in DATASETS else ()
    sources: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        key = next((str(rec[f]) for f in fields if rec.get(f) is not None), rec["id"])
        sources[rec["label"]][key].append(rec["id"])
    for label, groups in sources.items():
        if len(groups) > 1:
            for key, ids in groups.items():
                by_key[("source", label, key)].extend(ids)
    for ids in by_key.values():
        join(ids)
    return {item_id: root(item_id) for item_id in parent}


def apply_splits(
    name: str, records: list[dict[str, Any]], files: Mapping[str, Path], seed: int
) -> None:
    """Set every record's ``split`` in place: a pure function of the records and file bytes,
    so a fresh build and a re-split of an old cache give the same manifest."""
    groups = split_groups(name, records, files)
    splits = assign_splits([(r["id"], r["label"], groups[r["id"]]) for r in records], seed)
    for rec in records:
        rec["split"] = splits[rec["id"]]


SPLIT_RULE = (
    f"per label, groups (byte-identical files; clips of one source video or image) in "
    f"sha256(seed, group) order: ceil({HELD_OUT_PERCENT}%) of the label's items to test, as "
    f"many to val (fewer if train would drop below half), the rest train; 2 items: 1 train + "
    f"1 test; 1 item: train"
)


def split_meta(records: list[dict[str, Any]]) -> dict[str, Any]:
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        labels[rec["label"]][rec["split"]] += 1
    return {
        "split_version": SPLIT_VERSION,
        "split_rule": SPLIT_RULE,
        "counts": dict(Counter(r["split"] for r in records)),
        "labels": {k: dict(v) for k, v in sorted(labels.items())},
    }
