"""Modality encoders, registered by name with ``@register_encoder``.

An encoder maps a batch of preprocessed inputs to tokens ``(n, num_tokens, output_dim)``.
It also knows how to load and preprocess one raw input (``load``/``preprocess``), so the
processor needs only the encoder's name and parameters, never its weights.

The built-in encoders here are small and randomly initialised (tests, laptops); pretrained
ones live in ``mmcompose.assets`` and register themselves the same way: EfficientNet-Lite0 and
Whisper (converted from packages) and ``pointnet_meshes`` (``pointnet`` pretrained by us).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from mmcompose.errors import ConfigError
from mmcompose.model import media
from mmcompose.model.config import ModuleSpec
from mmcompose.registry import Registry

_SKIP_PRETRAINED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mmcompose_skip_pretrained", default=False
)


@contextlib.contextmanager
def no_pretrained_weights() -> Iterator[None]:
    """Build encoders with random weights even when their params say ``pretrained=True``.

    For loaders that overwrite every encoder weight from a checkpoint right after building,
    so a saved model loads without the asset cache and without reading weights twice."""
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


def pretrained_weights_enabled() -> bool:
    """Pretrained encoders load their cached weights only when this is True."""
    return not _SKIP_PRETRAINED.get()


class EncoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Encoder(nn.Module):
    """Base class. Subclasses set ``modality``, a ``Params`` model, ``output_dim``, ``num_tokens``."""

    modality: ClassVar[str]
    Params: ClassVar[type[EncoderParams]] = EncoderParams
    output_dim: int
    num_tokens: int

    def __init__(self, params: EncoderParams) -> None:
        super().__init__()
        self.params = params

    @classmethod
    def load(cls, path: str | Path, params: EncoderParams) -> Any:
        """Read one input file into the object ``preprocess`` expects."""
        loader = _LOADERS[cls.modality]
        return loader(path, params)

    @classmethod
    def preprocess(cls, item: Any, params: EncoderParams) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# Modules that register more encoders (pretrained ones, CLIP, the importers' stand-in), loaded
# on demand.
ENCODER_PLUGINS = (
    "mmcompose.assets.encoders",
    "mmcompose.assets.point_encoder",
    "mmcompose.model.clip",
    "mmcompose.model.unavailable",
)
ENCODERS: Registry[type[Encoder]] = Registry("encoder", plugins=ENCODER_PLUGINS)


def register_encoder(name: str):
    """Class decorator: ``@register_encoder("name")`` makes an encoder buildable by name."""
    return ENCODERS.register(name)


def encoder_params(spec: ModuleSpec) -> EncoderParams:
    cls = ENCODERS.get(spec.name)
    try:
        return cls.Params(**spec.params)
    except ValidationError as e:
        raise ConfigError(f"invalid parameters for encoder {spec.name!r}: {e}") from None


def build_encoder(spec: ModuleSpec) -> Encoder:
    return ENCODERS.get(spec.name)(encoder_params(spec))


def _load_image(path: str | Path, params: Any) -> Any:
    return media.load_image(path)


def _load_audio(path: str | Path, params: Any) -> Any:
    return media.load_audio(path, sample_rate=getattr(params, "sample_rate", 16000))


def _load_video(path: str | Path, params: Any) -> Any:
    return media.load_video(path, num_frames=getattr(params, "num_frames", 8))


def _load_point(path: str | Path, params: Any) -> Any:
    return media.load_point_cloud(path)


_LOADERS = {"image": _load_image, "audio": _load_audio, "video": _load_video, "point": _load_point}


# --------------------------------------------------------------------------- image
class PatchEmbedParams(EncoderParams):
    image_size: int = Field(default=32, gt=0)
    patch_size: int = Field(default=8, gt=0)
    width: int = Field(default=32, gt=0)
    mean: tuple[float, float, float] = media.IMAGENET_MEAN
    std: tuple[float, float, float] = media.IMAGENET_STD


@register_encoder("patch_embed")
class PatchEmbedEncoder(Encoder):
    """ViT-style patch embedding (conv stem + position embedding + LayerNorm)."""

    modality = "image"
    Params = PatchEmbedParams

    def __init__(self, params: PatchEmbedParams) -> None:
        super().__init__(params)
        if params.image_size % params.patch_size:
            raise ConfigError("patch_embed: image_size must be a multiple of patch_size")
        self.output_dim = params.width
        self.num_tokens = (params.image_size // params.patch_size) ** 2
        self.proj = nn.Conv2d(3, params.width, params.patch_size, stride=params.patch_size)
        self.pos = nn.Parameter(torch.randn(self.num_tokens, params.width) * 0.02)
        self.norm = nn.LayerNorm(params.width)

    @classmethod
    def preprocess(cls, item: Any, params: PatchEmbedParams) -> Tensor:
        return media.image_to_tensor(item, params.image_size, params.mean, params.std)

    def forward(self, x: Tensor) -> Tensor:  # (n, 3, S, S) -> (n, N, width)
        h = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(h + self.pos)


# --------------------------------------------------------------------------- audio
class MelConvParams(EncoderParams):
    sample_rate: int = 16000
    n_mels: int = Field(default=80, gt=0)
    n_frames: int = Field(default=300, gt=0)  # 100 frames per second
    width: int = Field(default=32, gt=0)
    num_tokens: int = Field(default=8, gt=0)


@register_encoder("mel_conv")
class MelConvEncoder(Encoder):
    """Whisper-style log-mel front end + two 1-D convolutions, pooled to a fixed token count."""

    modality = "audio"
    Params = MelConvParams

    def __init__(self, params: MelConvParams) -> None:
        super().__init__(params)
        self.output_dim, self.num_tokens = params.width, params.num_tokens
        self.conv1 = nn.Conv1d(params.n_mels, params.width, 3, padding=1)
        self.conv2 = nn.Conv1d(params.width, params.width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool1d(params.num_tokens)
        self.norm = nn.LayerNorm(params.width)

    @classmethod
    def preprocess(cls, item: Any, params: MelConvParams) -> Tensor:
        wave = np.asarray(item, dtype=np.float32)
        return media.log_mel_spectrogram(
            wave, n_mels=params.n_mels, sample_rate=params.sample_rate, n_frames=params.n_frames
        )

    def forward(self, x: Tensor) -> Tensor:  # (n, n_mels, frames) -> (n, tokens, width)
        h = nn.functional.gelu(self.conv1(x))
        h = nn.functional.gelu(self.conv2(h))
        return self.norm(self.pool(h).transpose(1, 2))


# --------------------------------------------------------------------------- point cloud
class PointNetParams(EncoderParams):
    num_points: int = Field(default=256, gt=0)
    in_channels: int = Field(default=3, ge=3)
    num_groups: int = Field(default=16, gt=0)
    group_size: int = Field(default=16, gt=0)
    width: int = Field(default=64, gt=0)


def farthest_point_sample(xyz: Tensor, k: int) -> Tensor:
    """Indices (n, k) of k farthest-point-sampled centres, deterministic (starts at point 0)."""
    n, p, _ = xyz.shape
    idx = torch.zeros(n, k, dtype=torch.long, device=xyz.device)
    dist = torch.full((n, p), float("inf"), device=xyz.device)
    far = torch.zeros(n, dtype=torch.long, device=xyz.device)
    rows = torch.arange(n, device=xyz.device)
    for i in range(k):
        idx[:, i] = far
        d = ((xyz - xyz[rows, far].unsqueeze(1)) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.argmax(-1)
    return idx


@register_encoder("pointnet")
class PointNetEncoder(Encoder):
    """Point-BERT-style tokeniser: FPS centres, kNN groups, a shared PointNet per group."""

    modality = "point"
    Params = PointNetParams

    def __init__(self, params: PointNetParams) -> None:
        super().__init__(params)
        if params.group_size > params.num_points or params.num_groups > params.num_points:
            raise ConfigError("pointnet: num_groups and group_size must not exceed num_points")
        w = params.width
        self.output_dim, self.num_tokens = w, params.num_groups
        self.local = nn.Sequential(
            nn.Linear(params.in_channels, w), nn.GELU(), nn.Linear(w, w), nn.GELU()
        )
        self.local_out = nn.Linear(2 * w, w)
        self.pos = nn.Sequential(nn.Linear(3, w), nn.GELU(), nn.Linear(w, w))
        self.norm = nn.LayerNorm(w)

    @classmethod
    def preprocess(cls, item: Any, params: PointNetParams) -> Tensor:
        pts = np.asarray(item, dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] < params.in_channels:
            raise ConfigError(
                f"pointnet expects points of shape (N, >={params.in_channels}), got {pts.shape}"
            )
        return media.normalize_points(pts[:, : params.in_channels], params.num_points)

    def forward(self, x: Tensor) -> Tensor:  # (n, P, C) -> (n, G, width)
        p = self.params
        xyz = x[..., :3]
        centres_idx = farthest_point_sample(xyz, p.num_groups)  # (n, G)
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        centres = xyz[rows, centres_idx]  # (n, G, 3)
        knn = torch.cdist(centres, xyz).topk(p.group_size, largest=False).indices  # (n, G, K)
        groups = x[rows.unsqueeze(2), knn]  # (n, G, K, C)
        rel = torch.cat([groups[..., :3] - centres.unsqueeze(2), groups[..., 3:]], dim=-1)
        h = self.local(rel)  # (n, G, K, w)
        g = h.max(dim=2, keepdim=True).values.expand_as(h)
        h = self.local_out(torch.cat([h, g], dim=-1)).max(dim=2).values  # (n, G, w)
        return self.norm(h + self.pos(centres))


# --------------------------------------------------------------------------- video
class VideoFramesParams(EncoderParams):
    frame_encoder: ModuleSpec = ModuleSpec(name="patch_embed")
    num_frames: int = Field(default=4, gt=0)


@register_encoder("video_frames")
class VideoFramesEncoder(Encoder):
    """An image encoder over sampled frames with temporal pooling (Video-ChatGPT style):
    spatial tokens averaged over time, followed by one token per frame (spatial mean)."""

    modality = "video"
    Params = VideoFramesParams

    def __init__(self, params: VideoFramesParams) -> None:
        super().__init__(params)
        self.frame_encoder = build_encoder(params.frame_encoder)
        if self.frame_encoder.modality != "image":
            raise ConfigError("video_frames: frame_encoder must be an image encoder")
        self.output_dim = self.frame_encoder.output_dim
        self.num_tokens = self.frame_encoder.num_tokens + params.num_frames

    @classmethod
    def preprocess(cls, item: Any, params: VideoFramesParams) -> Tensor:
        """Frames (T, H, W, 3) of any length, or one image (a one-frame clip), sampled to
        ``num_frames`` the way :func:`media.load_video` samples a file or frame folder."""
        frames = media.sample_frames(item, params.num_frames)
        inner = ENCODERS.get(params.frame_encoder.name)
        inner_params = encoder_params(params.frame_encoder)
        from PIL import Image

        return torch.stack([inner.preprocess(Image.fromarray(f), inner_params) for f in frames])

    def forward(self, x: Tensor) -> Tensor:  # (n, T, 3, S, S) -> (n, N + T, d)
        n, t = x.shape[:2]
        tok = self.frame_encoder(x.flatten(0, 1)).unflatten(0, (n, t))  # (n, T, N, d)
        return torch.cat([tok.mean(dim=1), tok.mean(dim=2)], dim=1)
