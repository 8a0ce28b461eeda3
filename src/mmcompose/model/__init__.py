"""The composed multimodal LLM: config, towers, placeholder splicing, routed LoRA, I/O.

Names are imported lazily so that light submodules (``media``, ``config``) load without
importing transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterSpec": "config",
    "LoRAConfig": "config",
    "MMConfig": "config",
    "MMERConfig": "config",
    "ModuleSpec": "config",
    "TowerConfig": "config",
    "ENCODERS": "encoders",
    "Encoder": "encoders",
    "register_encoder": "encoders",
    "PROJECTORS": "projectors",
    "register_projector": "projectors",
    "MMComposeForCausalLM": "modeling",
    "MMOutput": "modeling",
    "MMProcessor": "processor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mmcompose.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mmcompose.model' has no attribute {name!r}")
