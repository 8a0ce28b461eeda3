"""Projectors from encoder tokens to the LLM's embedding space, registered by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from mmcompose.errors import ConfigError
from mmcompose.model.config import ModuleSpec
from mmcompose.registry import Registry


class ProjectorParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ProjectorBuilder = Callable[[int, int, BaseModel], nn.Module]
PROJECTORS: Registry[tuple[type[ProjectorParams], ProjectorBuilder]] = Registry(
    "projector", plugins=("mmcompose.compose.importers",)
)


def register_projector(name: str, params: type[ProjectorParams] = ProjectorParams):
    """``@register_projector("name", Params)`` on a builder ``(d_in, d_out, params) -> Module``.

    The module maps (n, N, d_in) -> (n, N', d_out); it may set ``num_tokens`` when N' is fixed.
    """

    def deco(fn: ProjectorBuilder) -> ProjectorBuilder:
        PROJECTORS.register(name)((params, fn))
        return fn

    return deco


def build_projector(spec: ModuleSpec, d_in: int, d_out: int) -> nn.Module:
    params_cls, fn = PROJECTORS.get(spec.name)
    try:
        params = params_cls(**spec.params)
    except ValidationError as e:
        raise ConfigError(f"invalid parameters for projector {spec.name!r}: {e}") from None
    return fn(d_in, d_out, params)


@register_projector("linear")
def linear(d_in: int, d_out: int, params: ProjectorParams) -> nn.Module:
    return nn.Linear(d_in, d_out)


class MLPParams(ProjectorParams):
    depth: int = Field(default=2, ge=1)


@register_projector("mlp2x_gelu", MLPParams)
def mlp_gelu(d_in: int, d_out: int, params: MLPParams) -> nn.Module:
    """LLaVA-1.5's projector: Linear(d_in, d) - GELU - Linear(d, d)."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(params.depth - 1):
        layers += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*layers)


class QFormerParams(ProjectorParams):
    num_queries: int = Field(default=32, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_heads: int = Field(default=4, gt=0)
    width: int | None = Field(default=None, gt=0)


class _QFormerLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_s = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_f = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        kv = self.norm_kv(kv)
        q = q + self.cross(self.norm_q(q), kv, kv, need_weights=False)[0]
        s = self.norm_s(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.ffn(self.norm_f(q))


class QFormer(nn.Module):
    """Learned queries that cross-attend to the encoder tokens: a fixed number of outputs
    whatever the input length (the reference's audio projector)."""

    def __init__(self, d_in: int, d_out: int, params: QFormerParams) -> None:
        super().__init__()
        width = params.width or d_in
        if width % params.num_heads:
            raise ConfigError(f"qformer: width {width} is not divisible by num_heads")
        self.num_tokens = params.num_queries
        self.queries = nn.Parameter(torch.randn(params.num_queries, width) * 0.02)
        self.input = nn.Linear(d_in, width) if width != d_in else nn.Identity()
        self.layers = nn.ModuleList(
            _QFormerLayer(width, params.num_heads) for _ in range(params.num_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:  # (n, N, d_in) -> (n, Q, d_out)
        kv = self.input(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, kv)
        return self.out(self.norm(q))


@register_projector("qformer", QFormerParams)
def qformer(d_in: int, d_out: int, params: QFormerParams) -> nn.Module:
    return QFormer(d_in, d_out, params)
