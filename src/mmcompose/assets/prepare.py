"""``mmcompose assets prepare``: every asset that can be prepared, by name, in an order that
respects their dependencies (the point encoder is trained on the meshes dataset)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from mmcompose.errors import UnknownNameError


def preparers(force: bool = False) -> dict[str, Callable[[], object]]:
    """Asset name -> a function preparing it (a prepared asset returns at once)."""
    from mmcompose.assets.datasets import DATASETS, prepare_datasets
    from mmcompose.assets.encoders import prepare_efficientnet_lite0, prepare_whisper_tiny_en
    from mmcompose.assets.llm import prepare_base_llm
    from mmcompose.assets.point_encoder import prepare_pointnet_meshes

    return (
        {
            "base_llm": lambda: prepare_base_llm(force=force),
            "efficientnet_lite0": lambda: prepare_efficientnet_lite0(force=force),
            "whisper_tiny_en": lambda: prepare_whisper_tiny_en(force=force),
        }
        | {name: (lambda n=name: prepare_datasets(only=[n], force=force)[n]) for name in DATASETS}
        # Trained here on the meshes dataset (about 2 minutes), so after the datasets.
        | {"pointnet_meshes": lambda: prepare_pointnet_meshes(force=force)}
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
