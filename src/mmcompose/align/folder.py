"""A trained alignment folder (``config.json`` of kind ``alt-moe`` + ``model.safetensors``),
recognised without torch, so ``mmcompose index`` and ``search`` refuse a wrong folder at once
instead of after the 1-3 s that importing the connector's code takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcompose.errors import CheckpointError
from mmcompose.fs import read_json

WEIGHTS = "model.safetensors"


def read_alignment(out_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """``(config, weights path)`` of the alignment at ``out_dir``, or a :class:`CheckpointError`
    saying it is none (the weights are read later, by ``AlignedModel.load``)."""
    out_dir = Path(out_dir)
    meta = read_json(out_dir / "config.json")
    weights = out_dir / WEIGHTS
    if not isinstance(meta, dict) or meta.get("kind") != "alt-moe" or not weights.is_file():
        raise CheckpointError(
            f"{out_dir} is not a trained alignment (config.json + {WEIGHTS})",
            hint="train one with: mmcompose align CONFIG.yaml -o OUT_DIR",
        )
    return meta, weights


__all__ = ["read_alignment"]
