"""Pretrained modality encoders, and preparing them all at once.

Three pretrained encoders register themselves by name (``@register_encoder``) in their own
modules; importing this one registers them all (it is the plugin ``mmcompose.model.encoders``
loads for an unknown encoder name):

- ``efficientnet_lite0`` (image, :mod:`mmcompose.assets.efficientnet`) and ``whisper_tiny_en``
  (audio, :mod:`mmcompose.assets.whisper`), converted from weights inside pip packages
  (:mod:`mmcompose.assets.converted`);
- ``pointnet_meshes`` (point, :mod:`mmcompose.assets.point_encoder`), trained here on the
  ``meshes`` dataset.

Each builds without its source (random weights, same architecture), because a composed
checkpoint stores encoder weights in its own state dict. With ``Params(pretrained=True)`` (the
default) the weights come from the asset cache, which ``prepare_*`` fills once: saved as
safetensors with a manifest (:mod:`mmcompose.assets.weights`), idempotently.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from mmcompose.assets.cache import MissingAssetError
from mmcompose.assets.converted import (
    ENCODER_ASSETS,
    EncoderAsset,
    encoder_asset_dir,
    is_prepared,
)
from mmcompose.assets.efficientnet import (
    EfficientNetLite0,
    EfficientNetLite0Encoder,
    SamePadConv2d,
    convert_efficientnet_lite0_state_dict,
    prepare_efficientnet_lite0,
)
from mmcompose.assets.point_encoder import prepare_pointnet_meshes
from mmcompose.assets.whisper import (
    WhisperTinyEnEncoder,
    prepare_whisper_tiny_en,
    read_ctranslate2_model,
    whisper_state_dict_from_ctranslate2,
)
from mmcompose.errors import UnknownNameError
from mmcompose.model.encoders import no_pretrained_weights

__all__ = [
    "ENCODER_ASSETS",
    "EfficientNetLite0",
    "EfficientNetLite0Encoder",
    "EncoderAsset",
    "SamePadConv2d",
    "WhisperTinyEnEncoder",
    "convert_efficientnet_lite0_state_dict",
    "encoder_asset_dir",
    "no_pretrained_weights",
    "prepare_efficientnet_lite0",
    "prepare_encoders",
    "prepare_whisper_tiny_en",
    "read_ctranslate2_model",
    "whisper_state_dict_from_ctranslate2",
]

PREPARERS: dict[str, Callable[..., Path]] = {
    "efficientnet_lite0": prepare_efficientnet_lite0,
    "whisper_tiny_en": prepare_whisper_tiny_en,
}


def prepare_encoders(
    names: list[str] | None = None, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Prepare the pretrained encoders (the converted ones by default; ``pointnet_meshes``,
    trained here in minutes, only when named); a prepared one returns at once.

    Every missing package is named in one error, so a user installs them in one go.
    """
    preparers = PREPARERS | {"pointnet_meshes": prepare_pointnet_meshes}
    chosen = list(PREPARERS) if names is None else names
    for name in chosen:
        if name not in preparers:
            raise UnknownNameError(
                f"unknown encoder asset {name!r}", hint=f"choose one of: {', '.join(preparers)}"
            )
    missing = [
        ENCODER_ASSETS[n]
        for n in chosen
        if n in ENCODER_ASSETS
        and (force or not is_prepared(encoder_asset_dir(n), ENCODER_ASSETS[n]))
        and importlib.util.find_spec(ENCODER_ASSETS[n].module) is None
    ]
    if missing:
        raise MissingAssetError(
            "encoder weights missing: "
            + ", ".join(f"{a.name} (package {a.distribution})" for a in missing),
            hint=" && ".join(a.install_hint for a in missing),
        )
    return {n: preparers[n](force=force, progress=progress) for n in chosen}
