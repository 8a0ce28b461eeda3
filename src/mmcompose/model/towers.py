"""A modality tower: frozen encoder -> trainable projector, wrapped in learned prefix/suffix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcompose.errors import ConfigError
from mmcompose.model.config import TowerConfig
from mmcompose.model.encoders import build_encoder
from mmcompose.model.projectors import build_projector


class Tower(nn.Module):
    def __init__(self, cfg: TowerConfig, hidden_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg.encoder)
        if self.encoder.modality != cfg.modality:
            raise ConfigError(
                f"encoder {cfg.encoder.name!r} takes {self.encoder.modality} input, "
                f"but the tower is for {cfg.modality}",
                hint="pick an encoder of the tower's modality",
            )
        self.projector = build_projector(
            cfg.projector,
            self.encoder.output_dim,
            hidden_size,
            source=f"the {cfg.modality} encoder {cfg.encoder.name!r}",
        )
        # Zero-initialised, as in DAMC: the block starts out as plain projected features.
        self.prefix = (
            nn.Parameter(torch.zeros(cfg.num_prefix, hidden_size)) if cfg.num_prefix else None
        )
        self.suffix = (
            nn.Parameter(torch.zeros(cfg.num_suffix, hidden_size)) if cfg.num_suffix else None
        )
        if cfg.freeze_encoder:
            # Inference behaviour from the start, not only after model.train(): a feature
            # cache built before that call would otherwise see per-batch BatchNorm statistics
            # and overwrite the pretrained running ones.
            self.encoder.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if self.cfg.freeze_encoder:
            self.encoder.eval()  # frozen encoders keep inference behaviour (dropout, BN stats)
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Raw preprocessed inputs (n, ...) -> encoder tokens (n, N, d_enc)."""
        if self.cfg.freeze_encoder:
            from mmcompose.model import encode_memo

            memo = encode_memo.active()
            with torch.no_grad():
                if memo is None:
                    return self.encoder(x)
                key = memo.fingerprint_of(self.cfg.encoder.model_dump_json, self.encoder)
                return memo.encode(key, x, self.encoder)
        return self.encoder(x)

    def project(self, features: Tensor) -> Tensor:
        """Encoder tokens (n, N, d_enc) -> LLM block (n, prefix + N' + suffix, d)."""
        h = self.projector(features)
        n = h.shape[0]
        parts = []
        if self.prefix is not None:
            parts.append(self.prefix.to(h.dtype).expand(n, -1, -1))
        parts.append(h)
        if self.suffix is not None:
            parts.append(self.suffix.to(h.dtype).expand(n, -1, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else h

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.encode(x))
