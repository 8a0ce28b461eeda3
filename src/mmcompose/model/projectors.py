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
    """``input_dim``: the encoder output size the projector is written for (optional). The input
    size always comes from the tower's encoder, so it cannot disagree by construction; stating
    it makes a config that pairs the projector with another encoder fail when the model is
    built (before any data is read) instead of training on a projector of a silent new size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_dim: int | None = Field(default=None, gt=0)


ProjectorBuilder = Callable[[int, int, BaseModel], nn.Module]
# Modules that register more projectors (heavier ones, needing transformers), loaded on demand.
PROJECTORS: Registry[tuple[type[ProjectorParams], ProjectorBuilder]] = Registry(
    "projector", plugins=("mmcompose.model.blip2_qformer",)
)


def register_projector(name: str, params: type[ProjectorParams] = ProjectorParams):
    """``@register_projector("name", Params)`` on a builder ``(d_in, d_out, params) -> Module``.

    The module maps (n, N, d_in) -> (n, N', d_out); it may set ``num_tokens`` when N' is fixed.
    """

    def deco(fn: ProjectorBuilder) -> ProjectorBuilder:
        PROJECTORS.register(name)((params, fn))
        return fn

    return deco


def build_projector(
    spec: ModuleSpec, d_in: int, d_out: int, source: str = "its encoder"
) -> nn.Module:
    """``source`` names what produces the ``d_in``-sized input, for the error messages."""
    params_cls, fn = PROJECTORS.get(spec.name)
    try:
        params = params_cls(**spec.params)
    except ValidationError as e:
        raise ConfigError(f"invalid parameters for projector {spec.name!r}: {e}") from None
    if params.input_dim is not None and params.input_dim != d_in:
        raise ConfigError(
            f"projector {spec.name!r} is configured for input_dim {params.input_dim}, but "
            f"{source} outputs {d_in}-dim tokens",
            hint=f"set the projector's input_dim to {d_in} (or drop it), or use an encoder "
            f"whose output size is {params.input_dim}",
        )
    try:
        return fn(d_in, d_out, params)
    except ConfigError as e:
        raise ConfigError(f"{e.message} (input: {source}, {d_in}-dim)", hint=e.hint) from None


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


class PooledParams(ProjectorParams):
    num_tokens: int = Field(default=4, gt=0)
    hidden: int | None = Field(default=None, gt=0)  # None: one linear layer


class Pooled(nn.Module):
    """Mean-pool the encoder tokens, then map to a fixed number of LLM tokens.

    A compact block (4 tokens instead of 49 image patches or 100 audio frames) for the
    named-object tasks of our small models: sequences get 3-10x shorter, which is what CPU
    training time scales with. The input is layer-normalised (no affine), so encoders with
    very different feature scales start on an equal footing and the output starts near the
    size of text embeddings."""

    def __init__(self, d_in: int, d_out: int, params: PooledParams) -> None:
        super().__init__()
        self.num_tokens, self.d_out = params.num_tokens, d_out
        self.norm = nn.LayerNorm(d_in, elementwise_affine=False)
        layers: list[nn.Module] = []
        width = d_in
        if params.hidden:
            layers += [nn.Linear(d_in, params.hidden), nn.GELU()]
            width = params.hidden
        layers.append(nn.Linear(width, params.num_tokens * d_out))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mlp(self.norm(x).mean(dim=1))
        return h.view(x.shape[0], self.num_tokens, self.d_out)


@register_projector("pooled", PooledParams)
def pooled(d_in: int, d_out: int, params: PooledParams) -> nn.Module:
    return Pooled(d_in, d_out, params)


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
            origin = "its width" if params.width else "the input size (no width given)"
            raise ConfigError(
                f"qformer: {origin} {width} is not divisible by num_heads {params.num_heads}",
                hint="choose num_heads dividing the width, or set width",
            )
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
