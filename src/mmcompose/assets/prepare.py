"""``mmcompose assets prepare``: every asset that can be prepared, by name, in an order that
respects their dependencies (the point encoder is trained on the meshes dataset)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence

from mmcompose.errors import UnknownNameError


def preparers(force: bool = False) -> dict[str, Callable[[], object]]:
    """Asset name -> a function preparing it (a prepared asset returns at once). Each
    preparer's module is imported when it runs: the encoders' pull in torch and the media
    stack (seconds), which checking the names does without."""
    from mmcompose.assets.datasets import DATASETS, prepare_datasets

    def lazy(module: str, fn: str) -> Callable[[], object]:
        return lambda: getattr(importlib.import_module(f"mmcompose.assets.{module}"), fn)(
            force=force
        )

    return (
        {
            "base_llm": lazy("llm", "prepare_base_llm"),
            "efficientnet_lite0": lazy("encoders", "prepare_efficientnet_lite0"),
            "whisper_tiny_en": lazy("encoders", "prepare_whisper_tiny_en"),
        }
        | {name: (lambda n=name: prepare_datasets(only=[n], force=force)[n]) for name in DATASETS}
        # Trained here on the meshes dataset (about 2 minutes), so after the datasets.
        | {"pointnet_meshes": lazy("point_encoder", "prepare_pointnet_meshes")}
    )


def prepare_assets(
    only: Sequence[str] | None = None, force: bool = False
) -> Iterator[tuple[str, object]]:
    """Prepare ``only`` these assets (default: all), yielding (name, result) as each is done;
    every name is checked before the first is prepared."""
    table = preparers(force)
    names = list(only or table)
    for name in names:
        if name not in table:
            raise UnknownNameError(
                f"unknown asset {name!r}", hint=f"choose from {', '.join(table)}"
            )
    for name in names:
        yield name, table[name]()


__all__ = ["prepare_assets", "preparers"]
