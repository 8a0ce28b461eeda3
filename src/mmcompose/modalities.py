"""The modalities mmcompose knows, their placeholders, and aliases from reference data."""

from __future__ import annotations

from mmcompose.errors import UnknownNameError

MODALITIES: tuple[str, ...] = ("image", "audio", "video", "point")
# The reference ModelCompose data names images "vision"; LLaVA data uses "image".
ALIASES: dict[str, str] = {"vision": "image", "pointcloud": "point", "point_cloud": "point"}


def canonical_modality(name: str) -> str:
    """Map a modality name (or a known alias) to its canonical name, or fail clearly."""
    key = ALIASES.get(name, name)
    if key not in MODALITIES:
        raise UnknownNameError(
            f"unknown modality {name!r}",
            hint=f"use one of {', '.join(MODALITIES)} (aliases: {', '.join(ALIASES)})",
        )
    return key


def placeholder(modality: str) -> str:
    return f"<{canonical_modality(modality)}>"
