"""The dataset registry: each source module registers its builder with
``@register_dataset(name, modality, sources)``.

Registration order is preparation order (and the order ``mmcompose bench build-mcub`` reads
the datasets in): the package ``__init__`` imports the source modules in that order, and a
dataset made from others (``clips``, from the image datasets) comes after them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcompose.assets.cache import cache_dir
from mmcompose.assets.datasets.items import Item
from mmcompose.assets.datasets.sources import Source
from mmcompose.registry import Registry

__all__ = ["DATASETS", "DatasetSpec", "dataset_dir", "datasets_root", "register_dataset"]

Builder = Callable[[Path, int], list[Item]]
"""``build(out, seed)``: write a dataset's files under ``out``, return its items."""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its modality, how to build it, and the packages it reads.

    ``group_by``: record fields naming the source an item was derived from; items sharing one
    are near-duplicates (segments of one video, pan/zoom clips over one image) kept in one
    split (see :func:`~mmcompose.assets.datasets.splits.split_groups`).
    """

    name: str
    modality: str
    build: Builder
    sources: tuple[Source, ...]
    note: str = ""
    group_by: tuple[str, ...] = ()


class DatasetRegistry(Registry[DatasetSpec]):
    """A :class:`~mmcompose.registry.Registry` listing names in registration order, not sorted:
    that order is the preparation order (see the module docstring)."""

    def names(self) -> list[str]:
        self._load_plugins()
        return list(self._items)


DATASETS = DatasetRegistry("dataset")


def register_dataset(
    name: str,
    modality: str,
    sources: Sequence[Source],
    note: str = "",
    group_by: tuple[str, ...] = (),
) -> Callable[[Builder], Builder]:
    """Function decorator: ``@register_dataset("emoji", "image", (EMOJI_SOURCE,))`` on a
    builder makes the dataset preparable by name."""

    def deco(build: Builder) -> Builder:
        DATASETS.register(name)(DatasetSpec(name, modality, build, tuple(sources), note, group_by))
        return build

    return deco


def datasets_root() -> Path:
    """``cache_dir()/datasets``: one folder per dataset, plus the concept table."""
    return cache_dir() / "datasets"


def dataset_dir(name: str) -> Path:
    """Where dataset ``name`` is (or would be) prepared; does not prepare it."""
    DATASETS.get(name)
    return datasets_root() / name
