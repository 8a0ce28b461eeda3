"""Alt-MoE: align frozen unimodal encoders with one multi-directional MoE connector.

- :mod:`~mmcompose.align.features`: feature stores (frozen encoders run once, fp16 memmaps).
- :mod:`~mmcompose.align.moe`: the connector and its ``mlp`` / ``linear`` baselines (pure).
- :mod:`~mmcompose.align.losses`: InfoNCE, Smooth-L1, cross-rank gather (pure).
- :mod:`~mmcompose.align.trainer`: ``run_align(config, out_dir)``, alternating optimisation.
- :mod:`~mmcompose.align.evaluate`: Recall@K and ``AlignedModel`` (embed queries / gallery).
"""

from __future__ import annotations

from mmcompose.align.evaluate import AlignedModel, evaluate_split, recall_at_k
from mmcompose.align.features import EncoderRef, FeatureStore, build_feature_store
from mmcompose.align.moe import AltMoEConnector, ConnectorConfig
from mmcompose.align.trainer import AlignConfig, AlignResult, load_align_config, run_align

__all__ = [
    "AlignConfig",
    "AlignResult",
    "AlignedModel",
    "AltMoEConnector",
    "ConnectorConfig",
    "EncoderRef",
    "FeatureStore",
    "build_feature_store",
    "evaluate_split",
    "load_align_config",
    "recall_at_k",
    "run_align",
]
