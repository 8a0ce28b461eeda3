"""The ``blip2_qformer`` projector: Video-LLaMA's audio Q-Former, as ModelCompose uses it.

A BLIP-2 Q-Former (transformers' ``Blip2QFormerModel``) of learned queries over the encoder
tokens, with names that the ModelCompose importer maps the reference's weights onto. Not the
small ``qformer`` projector of :mod:`mmcompose.model.projectors`, which is ours and pre-norm.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from mmcompose.model.projectors import ProjectorParams, register_projector


class Blip2QFormerParams(ProjectorParams):
    num_queries: int = Field(default=32, gt=0)
    num_layers: int = Field(default=2, gt=0)
    width: int = Field(default=768, gt=0)
    num_heads: int = Field(default=12, gt=0)
    intermediate_size: int = Field(default=3072, gt=0)
    num_positions: int = Field(default=0, ge=0)  # >0: learned positions added to the input
    layer_norm_eps: float = 1e-12


class Blip2QFormerProjector(nn.Module):
    """The reference's audio projector (Video-LLaMA's audio Q-Former): positions added to the
    encoder tokens, a BLIP-2 Q-Former of learned queries, then Linear(width, d)."""

    def __init__(self, d_in: int, d_out: int, p: Blip2QFormerParams) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        cfg = Blip2QFormerConfig(
            hidden_size=p.width,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            intermediate_size=p.intermediate_size,
            encoder_hidden_size=d_in,
            cross_attention_frequency=1,
            layer_norm_eps=p.layer_norm_eps,
        )
        self.num_tokens = p.num_queries
        self.qformer = Blip2QFormerModel(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, p.num_queries, p.width))
        self.position_embedding = nn.Embedding(p.num_positions, d_in) if p.num_positions else None
        self.proj = nn.Linear(p.width, d_out)

    def forward(self, x: Tensor) -> Tensor:  # (n, N, d_in) -> (n, Q, d_out)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(x.shape[1], device=x.device))
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        h = self.qformer(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        return self.proj(h)


@register_projector("blip2_qformer", Blip2QFormerParams)
def blip2_qformer(d_in: int, d_out: int, params: Blip2QFormerParams) -> nn.Module:
    return Blip2QFormerProjector(d_in, d_out, params)
