"""A frozen encoder is in inference mode from construction on: the trainer caches features
before its first model.train() call, and an encoder left in training mode there (BatchNorm's
per-batch statistics, dropout) gives features unlike those at evaluation, while BatchNorm
overwrites its pretrained running statistics."""

from __future__ import annotations

from mmcompose.model.towers import Tower
from mmcompose.testing import tiny_towers


def test_frozen_encoders_start_in_eval_mode_and_stay_there():
    for cfg in tiny_towers(["image", "audio", "video", "point"]):
        assert cfg.freeze_encoder
        tower = Tower(cfg, hidden_size=64)  # a fresh nn.Module is in training mode
        assert tower.training and not tower.encoder.training, cfg.modality
        tower.train()
        assert tower.projector.training and not tower.encoder.training, cfg.modality
