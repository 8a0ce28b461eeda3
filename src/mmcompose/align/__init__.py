"""Alt-MoE: align frozen unimodal encoders with one multi-directional MoE connector.

- :mod:`~mmcompose.align.features`: feature stores (frozen encoders run once, fp16 memmaps).
- :mod:`~mmcompose.align.moe`: the connector and its ``mlp`` / ``linear`` baselines (pure).
- :mod:`~mmcompose.align.losses`: InfoNCE, Smooth-L1, cross-rank gather (pure).
- :mod:`~mmcompose.align.trainer`: ``run_align(config, out_dir)``, alternating optimisation.
- :mod:`~mmcompose.align.config`: the config schema (``AlignConfig``) and its YAML loader.
- :mod:`~mmcompose.align.data`: groups of paired latents (several modalities, cross keys).
- :mod:`~mmcompose.align.schedule`: the direction schedule, weighted round-robin (pure).
- :mod:`~mmcompose.align.continuation`: adding a modality to a trained connector.
- :mod:`~mmcompose.align.diagnostics`: expert load, router entropy, dead experts (pure).
- :mod:`~mmcompose.align.evaluate`: Recall@K and ``AlignedModel`` (embed queries / gallery).
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy: ``python -m mmcompose.align.trainer`` (the torchrun entry) must not find the module
# already imported by its package, and importing the package stays cheap.
_EXPORTS = {
    "AlignedModel": "evaluate",
    "evaluate_split": "evaluate",
    "recall_at_k": "evaluate",
    "EncoderRef": "features",
    "FeatureStore": "features",
    "build_feature_store": "features",
    "AltMoEConnector": "moe",
    "ConnectorConfig": "moe",
    "AlignConfig": "trainer",
    "AlignData": "data",
    "AlignResult": "trainer",
    "load_align_data": "data",
    "routing_report": "diagnostics",
    "load_align_config": "trainer",
    "run_align": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mmcompose.align.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mmcompose.align' has no attribute {name!r}")


__all__ = [
    "AlignConfig",
    "AlignData",
    "AlignResult",
    "AlignedModel",
    "AltMoEConnector",
    "ConnectorConfig",
    "EncoderRef",
    "FeatureStore",
    "build_feature_store",
    "evaluate_split",
    "load_align_config",
    "load_align_data",
    "recall_at_k",
    "routing_report",
    "run_align",
]
