"""File loaders and modality preprocessing: turn a path into an array, and an array into the
tensor an encoder expects.

Loaders fail with a ``MediaError`` that names the path, the problem and what to do, because a
bad file deep inside a dataset should be fixable from the message alone. Everything here is a
pure function of its arguments (randomness comes from explicit seeds) so preprocessing is
reproducible across processes and runs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import soundfile as sf
import torch
import trimesh
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, ValidationError
from scipy.signal import resample_poly
from torch import Tensor

from mmcompose.errors import CheckpointError, MediaError

PathLike = str | os.PathLike[str]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# OpenAI CLIP / LLaVA-style vision towers were trained with these instead.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif")
POINT_CLOUD_EXTENSIONS: tuple[str, ...] = (".npy", ".npz", ".ply", ".off", ".obj", ".stl")
_MESH_EXTENSIONS = (".ply", ".off", ".obj", ".stl")


# --------------------------------------------------------------------------- shared checks
def _check_file(path: PathLike, kind: str, supported: Sequence[str]) -> Path:
    """Reject missing, non-file, empty and unsupported paths before any decoder sees them, so
    the error says what is wrong instead of surfacing a decoder's cryptic message."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MediaError(
            f"{kind} file not found: {p}",
            hint="check the path (relative paths resolve against the working directory "
            f"{Path.cwd()})",
        )
    if not p.is_file():
        raise MediaError(
            f"{kind} path is not a file: {p}", hint=f"pass the path of one {kind} file"
        )
    suffix = p.suffix.lower()
    if suffix not in supported:
        raise MediaError(
            f"unsupported {kind} file extension {suffix or '(none)'!r}: {p}",
            hint=f"supported extensions: {', '.join(supported)}; convert the file to one of them",
        )
    if p.stat().st_size == 0:
        raise MediaError(f"{kind} file is empty (0 bytes): {p}", hint="re-create or re-download it")
    return p


# --------------------------------------------------------------------------- unreadable files
OnCorrupt = Literal["fail", "skip"]
"""What a dataset reader does with an input file that cannot be used (missing, empty,
truncated, undecodable): ``fail`` raises its :class:`MediaError` (the default), ``skip``
drops the item and reports it. Never silently replaced by another item or resampled."""

SKIP_HINT = "or skip such files: `on_corrupt: skip` (train config), `--on-corrupt skip` (eval)"


class CorruptFileWarning(UserWarning):
    """Unreadable input files were skipped (``on_corrupt: skip``); the message names each."""


def handle_unreadable(
    path: PathLike, error: MediaError, on_corrupt: OnCorrupt, skipped: dict[str, str]
) -> None:
    """Apply the ``on_corrupt`` policy to one failed file: re-raise ``error`` with the path in
    its message and the skip option in its hint, or record ``path -> reason`` in ``skipped``."""
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    message = error.message if str(path) in error.message else f"{path}: {error.message}"
    if on_corrupt == "fail":
        hint = f"{error.hint}; {SKIP_HINT}" if error.hint else SKIP_HINT
        raise MediaError(message, hint=hint) from error
    skipped[str(path)] = message


def warn_skipped(skipped: Mapping[str, str], context: str) -> None:
    """One warning with the count and every skipped path (and why); nothing if none."""
    if not skipped:
        return
    lines = "".join(f"\n  {reason}" for reason in skipped.values())
    warnings.warn(
        f"{context}: skipped {len(skipped)} unreadable file(s) (on_corrupt: skip):{lines}",
        CorruptFileWarning,
        stacklevel=2,
    )


def _corrupt(kind: str, p: Path, exc: BaseException, hint: str | None = None) -> MediaError:
    return MediaError(
        f"cannot decode {kind} file {p}: {exc}",
        hint=hint or f"the file is corrupt or not really a {p.suffix.lower()} file; re-export it",
    )


# --------------------------------------------------------------------------- image
def load_image(path: PathLike) -> Image.Image:
    """Load an image as RGB, upright (EXIF orientation applied), transparency flattened on white.

    Encoders expect 3 channels; compositing on white (not dropping alpha) keeps transparent
    regions from turning into whatever colour happened to be stored under alpha=0.
    """
    p = _check_file(path, "image", IMAGE_EXTENSIONS)
    try:
        with Image.open(p) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _corrupt("image", p, exc) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing alpha over white and rescaling 16-bit gray."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # Pillow's own I->L conversion clips at 255, which whites out 16-bit images.
        gray = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- image pixels
#: The image-processor config keys that carry no processing (names, bookkeeping).
_HF_META_KEYS = frozenset(
    {"image_processor_type", "feature_extractor_type", "processor_class", "_processor_class"}
)
_CLIP_PROCESSORS = frozenset(
    {
        "CLIPImageProcessor",
        "CLIPImageProcessorFast",
        "CLIPImageProcessorPil",
        "CLIPFeatureExtractor",
    }
)


class ImageProcessing(BaseModel):
    """How an image becomes pixel values: a CLIP image processor's settings as a checkpoint's
    ``preprocessor_config.json`` states them, plus original LLaVA's pad-to-square.

    ``size``/``crop_size`` None mean the tower's input size (``for_size``), which is what
    CLIP's own processors do at their model's resolution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pad_to_square: bool = False  # LLaVA-1.5 ``image_aspect_ratio: pad`` (expand2square)
    do_resize: bool = True
    size: dict[str, int] | None = None  # {"shortest_edge": n} or {"height": h, "width": w}
    resample: int = 3  # PIL resampling filter; 3 = bicubic
    do_center_crop: bool = True
    crop_size: dict[str, int] | None = None  # {"height": h, "width": w}
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_convert_rgb: bool = True

    def for_size(self, size: int) -> ImageProcessing:
        """Unset sizes filled with ``size`` (shortest edge, square crop)."""
        return self.model_copy(
            update={
                "size": self.size or {"shortest_edge": size},
                "crop_size": self.crop_size or {"height": size, "width": size},
            }
        )

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input."""
        if self.do_center_crop and self.crop_size:
            return self.crop_size["height"], self.crop_size["width"]
        if self.do_resize and self.size and {"height", "width"} <= set(self.size):
            return self.size["height"], self.size["width"]
        return None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], where: str, pad_to_square: bool = False):
        """A transformers CLIP image-processor dict (``preprocessor_config.json``, or the
        ``image_processor`` of a ``processor_config.json``) -> settings. Old-style integer
        sizes are read as transformers reads them for CLIP (shortest edge; square crop); a
        setting this module does not apply is refused rather than ignored."""
        kind = config.get("image_processor_type") or config.get("feature_extractor_type")
        if kind is not None and kind not in _CLIP_PROCESSORS:
            raise CheckpointError(
                f"{where}: image processor {kind!r} is not supported (CLIP's only)",
                hint="mmcompose's clip_vision tower preprocesses as CLIPImageProcessor",
            )
        fields = set(cls.model_fields) - {"pad_to_square"}
        data: dict[str, Any] = {k: v for k, v in config.items() if k in fields and v is not None}
        other = {
            k: v
            for k, v in config.items()
            if k not in fields | _HF_META_KEYS and v not in (None, False)
        }
        if other:
            raise CheckpointError(
                f"{where}: image processor settings mmcompose does not apply: {sorted(other)}",
                hint="nothing is dropped silently; this processor variant is not supported",
            )
        if isinstance(data.get("size"), int):
            data["size"] = {"shortest_edge": data["size"]}
        if isinstance(data.get("crop_size"), int):
            data["crop_size"] = {"height": data["crop_size"], "width": data["crop_size"]}
        try:
            return cls(pad_to_square=pad_to_square, **data)
        except ValidationError as e:
            raise CheckpointError(f"{where}: invalid image processor settings: {e}") from None


def _as_rgb_image(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3:
            raise MediaError(f"expected an image array shaped (H, W, 3), got {img.shape}")
        img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    if img.width == 0 or img.height == 0:
        raise MediaError(f"image has no pixels (size {img.size})")
    return _to_rgb(img)


def expand_to_square(img: Image.Image, mean: Sequence[float]) -> Image.Image:
    """LLaVA's ``expand2square``: paste centred (offset floored) on a square of the mean
    colour (``int(255 * m)``, truncated, as LLaVA computes it)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(x * 255) for x in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def resize_shortest_edge(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size`` and the longer one truncated, as
    transformers (``get_resize_output_image_size``) and torchvision compute it."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of an (H, W, C) array with floored offsets; a smaller image is zero-padded
    (ceil offsets), as transformers' ``center_crop`` does."""
    h, w = arr.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + height, left : left + width]
    nh, nw = max(height, h), max(width, w)
    canvas = np.zeros((nh, nw, *arr.shape[2:]), dtype=arr.dtype)
    ph, pw = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[ph : ph + h, pw : pw + w] = arr
    top, left = (nh - height) // 2, (nw - width) // 2
    return canvas[top : top + height, left : left + width]


def _own_pixels(img: Image.Image, proc: ImageProcessing) -> Tensor:
    """The CLIP image processor's steps (resize, crop, rescale, normalise), operation for
    operation, for when transformers' own is unavailable and for mmcompose's own encoders."""
    if proc.do_resize:
        if not proc.size:
            raise ValueError("image resize needs a size")
        if "shortest_edge" in proc.size:
            w, h = resize_shortest_edge(img.width, img.height, proc.size["shortest_edge"])
        else:
            w, h = proc.size["width"], proc.size["height"]
        img = img.resize((w, h), resample=Image.Resampling(proc.resample))
    arr = np.asarray(img)
    if proc.do_center_crop and proc.crop_size:
        arr = center_crop(arr, proc.crop_size["height"], proc.crop_size["width"])
    x = arr.astype(np.float64) * proc.rescale_factor if proc.do_rescale else arr
    x = np.asarray(x, dtype=np.float32)
    if proc.do_normalize:
        m = np.asarray(proc.image_mean, dtype=np.float32)
        s = np.asarray(proc.image_std, dtype=np.float32)
        x = (x - m) / s
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=16)
def _library_processor(settings_json: str) -> Any:
    """transformers' CLIPImageProcessor with these settings (the backend transformers picks,
    as ``LlavaProcessor.from_pretrained`` would); None when it cannot be had."""
    kwargs = json.loads(settings_json)
    kwargs.pop("pad_to_square")
    try:
        from transformers.utils import logging
    except ImportError:
        return None
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # "falling back to the PIL backend" when torchvision is absent
    try:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(**kwargs)
    except ImportError:  # a backend it needs is missing: our copy of its steps is used
        return None
    finally:
        logging.set_verbosity(level)


def preprocess_image(img: Image.Image | np.ndarray, proc: ImageProcessing) -> Tensor:
    """Image (PIL, or uint8 (H, W, 3)) -> float32 (3, H, W) as the checkpoint's own library
    computes it: LLaVA's pad-to-square if set, then transformers' CLIP image processor (our
    operation-for-operation copy when transformers' is unavailable)."""
    img = _as_rgb_image(img)
    if proc.pad_to_square:
        img = expand_to_square(img, proc.image_mean)
    library = _library_processor(proc.model_dump_json())
    if library is None:
        return _own_pixels(img, proc)
    pixels = library(images=img, return_tensors="np")["pixel_values"][0]
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))


def image_to_tensor(
    img: Image.Image | np.ndarray,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Image (PIL, or uint8 array (H, W, 3)) -> normalised float32 tensor (3, size, size):
    shorter side to ``size`` (bicubic), central square, the CLIP/ImageNet evaluation transform
    with transformers' rounding (so aspect ratio is never distorted)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    proc = ImageProcessing(image_mean=tuple(mean), image_std=tuple(std)).for_size(size)
    return _own_pixels(_as_rgb_image(img), proc)


def sample_frames_to_tensor(
    frames: np.ndarray,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Video frames uint8 (T, H, W, 3) -> (T, 3, size, size), each frame as ``image_to_tensor``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise MediaError(
            f"expected video frames shaped (T, H, W, 3) with T > 0, got {frames.shape}"
        )
    return torch.stack([image_to_tensor(f, size, mean, std) for f in frames])


# --------------------------------------------------------------------------- audio
def _wav_truncation(p: Path) -> tuple[int, int] | None:
    """(declared, present) byte counts of a RIFF WAV's data chunk if it is cut short.

    libsndfile silently returns the partial audio of a truncated WAV (e.g. an interrupted
    download); catching it here avoids training on clips that are quietly too short.
    Streaming writers' placeholder sizes (0 or 0xFFFFFFFF) and RF64 are left to libsndfile.
    """
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, length = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                present = size - pos - 8
                if 0 < length < 0xFFFFFFFF and present < length:
                    return length, present
                return None
            pos += 8 + length + (length & 1)
    return None


def prepare_waveform(
    wave: np.ndarray | Tensor,
    orig_sample_rate: int,
    sample_rate: int = 16000,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Array already in memory -> float32 mono in [-1, 1] at ``sample_rate``.

    The in-memory twin of ``load_audio``: integer PCM is scaled to [-1, 1]; a 2-D array is
    (samples, channels) as soundfile returns it, or (channels, samples) as torchaudio does
    (the axis with at most 8 entries is taken as channels) and is averaged to mono.
    """
    arr = wave.detach().cpu().numpy() if isinstance(wave, Tensor) else np.asarray(wave)
    if orig_sample_rate <= 0 or sample_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sample_rate}, {sample_rate}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        mid = (int(info.max) + int(info.min) + 1) / 2  # 0 for signed PCM, 128 for uint8
        arr = (arr.astype(np.float64) - mid) / (int(info.max) + 1 - mid)
    elif arr.dtype.kind != "f":
        raise MediaError(f"audio array must be numeric PCM, got dtype {arr.dtype}")
    if arr.ndim == 2:
        channels_last = arr.shape[1] <= 8 and arr.shape[0] >= arr.shape[1]
        arr = arr.mean(axis=1 if channels_last else 0, dtype=np.float64)
    elif arr.ndim != 1:
        raise MediaError(f"audio array must be 1-D or 2-D, got shape {arr.shape}")
    if max_seconds is not None:
        arr = arr[: math.ceil(max_seconds * orig_sample_rate)]
    if arr.size == 0:
        raise MediaError("audio contains no samples", hint="check that the clip is not empty")
    if not np.all(np.isfinite(arr)):
        raise MediaError("audio contains NaN or infinite samples")
    if orig_sample_rate != sample_rate:
        g = math.gcd(orig_sample_rate, sample_rate)
        arr = resample_poly(arr, sample_rate // g, orig_sample_rate // g)
    return np.clip(arr, -1.0, 1.0).astype(np.float32)


def load_audio(
    path: PathLike, sample_rate: int = 16000, max_seconds: float | None = None
) -> np.ndarray:
    """Load a wav/flac/ogg/mp3 file as float32 mono in [-1, 1] at ``sample_rate``.

    Resampling is polyphase (``resample_poly`` with the reduced up/down ratio), which is
    anti-aliased and exact for rational ratios like 44.1k -> 16k; only the first
    ``max_seconds`` are read, so long recordings are not decoded in full.
    """
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    p = _check_file(path, "audio", AUDIO_EXTENSIONS)
    if p.suffix.lower() == ".wav" and (cut := _wav_truncation(p)) is not None:
        raise MediaError(
            f"audio file is truncated: {p} (data chunk declares {cut[0]} bytes, "
            f"only {cut[1]} present)",
            hint="re-download or re-export it; to keep the partial audio, re-encode it "
            "(e.g. ffmpeg -i in.wav out.wav)",
        )
    try:
        with sf.SoundFile(p) as f:
            orig_sr = f.samplerate
            n = -1 if max_seconds is None else math.ceil(max_seconds * orig_sr)
            data = f.read(frames=n, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, ValueError) as exc:
        raise _corrupt("audio", p, exc) from exc
    if data.size == 0:
        raise MediaError(f"audio file contains no samples: {p}", hint="the clip is empty")
    try:
        return prepare_waveform(data, orig_sr, sample_rate, max_seconds)
    except MediaError as exc:
        raise MediaError(f"{exc.message}: {p}", hint=exc.hint) from exc


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    mel = hz / f_sp
    log_part = hz >= min_log_hz
    mel[log_part] = min_log_mel + np.log(hz[log_part] / min_log_hz) / logstep
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    hz = mel * f_sp
    log_part = mel >= min_log_mel
    hz[log_part] = min_log_hz * np.exp(logstep * (mel[log_part] - min_log_mel))
    return hz


def mel_filter_bank(
    n_mels: int = 80,
    n_fft: int = 400,
    sample_rate: int = 16000,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters (n_mels, n_fft // 2 + 1), float64.

    Equals ``librosa.filters.mel(sr, n_fft, n_mels)``, which Whisper ships as mel_filters.npz;
    computing it here avoids downloading that file.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_lo, mel_hi = _hz_to_mel(np.array([f_min, f_max]))
    edges = _mel_to_hz(np.linspace(mel_lo, mel_hi, n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per filter


def log_mel_spectrogram(
    wave: np.ndarray | Tensor,
    *,
    n_mels: int = 80,
    n_fft: int = 400,
    hop_length: int = 160,
    sample_rate: int = 16000,
    n_frames: int | None = 3000,
) -> Tensor:
    """Whisper's log-mel features (n_mels, n_frames) float32 from a mono waveform.

    Matches ``WhisperFeatureExtractor``: zero-pad/trim to ``n_frames * hop_length`` samples
    (``None`` keeps the whole clip: len // hop frames), centred STFT with a periodic Hann
    window, drop the last frame, power -> Slaney mel -> log10 (clamped at 1e-10), floor at
    max - 8, then (x + 4) / 4 so values sit roughly in [-1, 1].
    """
    w = wave.detach().cpu().to(torch.float32) if isinstance(wave, Tensor) else None
    if w is None:
        w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    if w.ndim != 1:
        raise MediaError(
            f"log_mel_spectrogram expects a 1-D mono waveform, got shape {tuple(w.shape)}"
        )
    if n_frames is not None:
        target = n_frames * hop_length
        w = (
            w[:target]
            if w.numel() >= target
            else torch.nn.functional.pad(w, (0, target - w.numel()))
        )
    if w.numel() <= n_fft // 2:  # reflect padding in the centred STFT needs more samples
        w = torch.nn.functional.pad(w, (0, n_fft // 2 + 1 - w.numel()))
    window = torch.hann_window(n_fft, periodic=True)
    stft = torch.stft(w, n_fft, hop_length, window=window, center=True, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filter_bank(n_mels, n_fft, sample_rate)).to(torch.float32)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).contiguous()


# --------------------------------------------------------------------------- video
def _frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Centres of ``num_frames`` equal segments of the clip: uniform over the whole clip,
    in order, and repeating frames (in order) when the clip is shorter than ``num_frames``."""
    idx = ((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64)
    return np.minimum(idx, total - 1)


def _estimate_frame_count(container: Any, stream: Any) -> int:
    """Frame count from container metadata (0 if unknown); only a guess that gets verified."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate and stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base * rate)))
    if rate and container.duration:
        return max(1, round(container.duration / av.time_base * float(rate)))
    return 0


# FFmpeg's demuxers report a file cut short only in their log (mov/mp4: "partial file",
# matroska/webm: "Truncating packet", "File ended prematurely") and then end the stream early.
_TRUNCATION_LOGS = ("partial file", "truncating packet", "file ended prematurely")


@contextlib.contextmanager
def _ffmpeg_error_log() -> Iterator[list[str]]:
    """Collect FFmpeg's error-level log lines (PyAV ignores FFmpeg's log by default); the
    list is filled when the block ends. The previous log level is restored."""
    import av.logging

    previous = av.logging.get_level()
    if previous is None or previous < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)
    lines: list[str] = []
    try:
        with av.logging.Capture(local=False) as logs:
            yield lines
    finally:
        av.logging.set_level(previous)
    lines += [str(entry[2]).strip() for entry in logs]


def _decode_pass(p: Path, wanted: np.ndarray | None) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame in order (no seeking: seeks land on keyframes, not exact frames),
    converting only the ``wanted`` indices to RGB; returns them and the true frame count.

    A truncated file fails here: sampling the frames that survive would silently give a
    different clip (the second pass for lying frame counts would spread over fewer frames)."""
    picked: dict[int, np.ndarray] = {}
    wanted_set = set() if wanted is None else {int(i) for i in wanted}
    count, shape = 0, None
    with _ffmpeg_error_log() as log, av.open(str(p)) as container:
        if not container.streams.video:
            raise MediaError(f"video file has no video stream: {p}", hint="is it an audio file?")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted_set:
                if shape is None:
                    shape = (frame.width, frame.height)
                rgb = frame.reformat(width=shape[0], height=shape[1], format="rgb24")
                picked[count] = rgb.to_ndarray()
            count += 1
    cut = [line for line in log if any(t in line.lower() for t in _TRUNCATION_LOGS)]
    if cut:
        raise MediaError(
            f"video file is truncated: {p} (ffmpeg: {cut[0]}; {count} frames decodable)",
            hint="re-download or re-export it",
        )
    return picked, count


def _video_frame_estimate(p: Path) -> int:
    with av.open(str(p)) as container:
        if not container.streams.video:
            raise MediaError(f"video file has no video stream: {p}", hint="is it an audio file?")
        return _estimate_frame_count(container, container.streams.video[0])


# Image files that are a still video (the reference loader reads a ``.jpg`` video as one
# frame); .gif stays a video file (animated).
VIDEO_STILL_EXTENSIONS: tuple[str, ...] = tuple(
    e for e in IMAGE_EXTENSIONS if e not in VIDEO_EXTENSIONS
)


def load_video(path: PathLike, num_frames: int = 8) -> np.ndarray:
    """Sample ``num_frames`` frames uniformly over the whole clip: uint8 (num_frames, H, W, 3).

    A video is one of three things: a video file; a still image (``.jpg``, ``.png``, ...: a
    one-frame clip, so every sampled frame is that image, as the reference reads a ``.jpg``
    video); or a folder of frame images, in name order (numbers compared as numbers:
    ``f2.png`` before ``f10.png``). All three sample with the same rule, so the frame count
    and the choice of frames depend only on the clip's length.

    A file is decoded sequentially. The header's frame count is used when present and checked
    against the frames actually decoded; if it was wrong (or missing), a second pass samples
    with the true count, so sampling is uniform even for files with lying or absent metadata.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if Path(path).expanduser().is_dir():
        return _load_frame_folder(Path(path).expanduser(), num_frames)
    p = _check_file(path, "video", VIDEO_EXTENSIONS + VIDEO_STILL_EXTENSIONS)
    if p.suffix.lower() in VIDEO_STILL_EXTENSIONS:
        return sample_frames(np.asarray(load_image(p)), num_frames)
    try:
        estimate = _video_frame_estimate(p)
        wanted = _frame_indices(estimate, num_frames) if estimate > 0 else None
        picked, total = _decode_pass(p, wanted)
        if total > 0 and total != estimate:
            wanted = _frame_indices(total, num_frames)
            picked, total = _decode_pass(p, wanted)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _corrupt("video", p, exc) from exc
    if total == 0 or wanted is None:
        raise MediaError(f"video file contains no decodable frames: {p}", hint="re-export it")
    return np.stack([picked[int(i)] for i in wanted])


def sample_frames(frames: Any, num_frames: int) -> np.ndarray:
    """Frames in memory, uint8 (T, H, W, 3) of any length T > 0 or one image (H, W, 3) / PIL
    image (a one-frame clip) -> (num_frames, H, W, 3), sampled as :func:`load_video` samples."""
    if isinstance(frames, Image.Image):
        frames = np.asarray(_to_rgb(frames))
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise MediaError(
            f"expected video frames shaped (T, H, W, 3) with T > 0, or one image (H, W, 3), "
            f"got {arr.shape}"
        )
    return arr[_frame_indices(arr.shape[0], num_frames)]


def _natural_key(name: str) -> tuple[tuple[Any, ...], str]:
    """Sort key: digit runs compare as numbers ("f2" < "f10"); ties by the name itself."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(x) if i % 2 else x for i, x in enumerate(parts)), name


def frame_files(folder: Path) -> list[Path]:
    """A frame folder's images in frame order; other files (and hidden ones) are not frames."""
    files = [
        f
        for f in folder.iterdir()
        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
    ]
    return sorted(files, key=lambda f: _natural_key(f.name))


def _load_frame_folder(folder: Path, num_frames: int) -> np.ndarray:
    """Sample a folder of frame images like a clip of that many frames. Every frame file is
    checked (a header read), not only the sampled ones, so whether a bad frame fails does
    not depend on ``num_frames``; frames of another size are resized to the first sampled."""
    files = frame_files(folder)
    if not files:
        raise MediaError(
            f"video folder has no frame images: {folder}",
            hint=f"a frame folder holds one image per frame ({', '.join(IMAGE_EXTENSIONS)}), "
            "named in order (frame_0001.jpg, ...)",
        )
    wanted = _frame_indices(len(files), num_frames)
    sampled = set(wanted.tolist())
    loaded: dict[int, np.ndarray] = {}
    for i, f in enumerate(files):
        try:
            if i in sampled:
                img = load_image(f)
                first = next(iter(loaded.values()), None)
                if first is not None and img.size != (first.shape[1], first.shape[0]):
                    size = (first.shape[1], first.shape[0])
                    img = img.resize(size, Image.Resampling.BICUBIC)
                loaded[i] = np.asarray(img)
            else:
                _check_image_header(f)
        except MediaError as exc:
            raise MediaError(
                f"unreadable frame in video folder {folder}: {exc.message}", hint=exc.hint
            ) from exc
    return np.stack([loaded[int(i)] for i in wanted])


def _check_image_header(p: Path) -> None:
    """That a frame file is a non-empty image Pillow can identify (no pixels decoded)."""
    _check_file(p, "image", IMAGE_EXTENSIONS)
    try:
        with Image.open(p):
            pass
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _corrupt("image", p, exc) from exc


# --------------------------------------------------------------------------- point cloud
def sample_points(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points uniformly over the mesh surface (area-weighted faces, uniform barycentric
    coordinates), float32 (n, 3), or (n, 6) with rgb in [0, 1] when the mesh has vertex or
    face colours. Seeded, so the same mesh and seed always give the same points."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    areas = np.asarray(mesh.area_faces, dtype=np.float64)
    total = areas.sum() if areas.size else 0.0
    if not total > 0:
        raise ValueError("mesh has no surface area to sample from")
    rng = np.random.default_rng(seed)
    faces = rng.choice(len(areas), size=n, p=areas / total)
    u, v = rng.random((2, n))
    flip = u + v > 1.0  # reflect into the triangle instead of rejecting: stays uniform
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    tri = np.asarray(mesh.triangles, dtype=np.float64)[faces]
    xyz = tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + v[:, None] * (tri[:, 2] - tri[:, 0])
    kind = getattr(mesh.visual, "kind", None)
    if kind == "vertex":
        vc = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        corners = vc[np.asarray(mesh.faces)[faces]]  # (n, 3 corners, rgb)
        bary = np.stack([1.0 - u - v, u, v], axis=1)[:, :, None]
        return np.hstack([xyz, (corners * bary).sum(axis=1)]).astype(np.float32)
    if kind == "face":
        fc = np.asarray(mesh.visual.face_colors, dtype=np.float64)[faces, :3] / 255.0
        return np.hstack([xyz, fc]).astype(np.float32)
    return xyz.astype(np.float32)


def _validate_points(arr: Any, p: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iuf" or arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise MediaError(
            f"point array in {p} has shape {arr.shape} and dtype {arr.dtype}",
            hint="expected a numeric array shaped (N, 3) xyz or (N, 6) xyz+rgb",
        )
    if arr.shape[0] == 0:
        raise MediaError(f"point cloud file contains no points: {p}", hint="re-export it")
    pts = arr.astype(np.float32)
    if not np.all(np.isfinite(pts)):
        raise MediaError(f"point cloud contains NaN or infinite values: {p}", hint="clean it")
    if pts.shape[1] == 6:
        if pts[:, 3:].max() > 1.0:  # 0-255 colours
            pts[:, 3:] /= 255.0
        pts[:, 3:] = np.clip(pts[:, 3:], 0.0, 1.0)
    return pts


def _load_npy_points(p: Path) -> np.ndarray:
    loaded = np.load(p, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded
    with loaded:
        keys = list(loaded.keys())
        if "points" in keys:
            return loaded["points"]
        if len(keys) == 1:
            return loaded[keys[0]]
        raise MediaError(
            f"cannot tell which array in {p} holds the points (arrays: {', '.join(keys) or 'none'})",
            hint="store it under the key 'points', or save a single array",
        )


def _off_header_counts(p: Path) -> tuple[int, int] | None:
    """(vertices, faces) declared by an OFF header ("OFF" or its variants, then the counts,
    possibly on the same line, comments allowed); None when the header is not plain."""
    tokens: list[str] = []
    with p.open("rb") as f:
        for raw in f:
            tokens += raw.split(b"#", 1)[0].decode("ascii", "replace").split()
            if len(tokens) >= 3:
                break
    if not tokens or not tokens[0].upper().endswith("OFF"):
        return None
    try:
        return int(tokens[1]), int(tokens[2])
    except (IndexError, ValueError):
        return None


def _check_off_counts(p: Path, geom: Any) -> None:
    """OFF declares its vertex and face counts; trimesh reads a file cut short without a
    word, so compare. (Faces can only grow: trimesh splits polygons into triangles.)"""
    declared = _off_header_counts(p)
    if declared is None:
        return
    vertices = len(getattr(geom, "vertices", ()))
    faces = len(getattr(geom, "faces", ()))
    if vertices < declared[0] or faces < declared[1]:
        raise MediaError(
            f"mesh file is truncated: {p} (header declares {declared[0]} vertices and "
            f"{declared[1]} faces, {vertices} and {faces} present)",
            hint="re-download or re-export it",
        )


def load_point_cloud(path: PathLike, num_samples: int = 8192, seed: int = 0) -> np.ndarray:
    """Load points as float32 (N, 3), or (N, 6) with rgb in [0, 1].

    .npy/.npz hold an (N, 3) or (N, 6) array (0-255 colours are rescaled). .ply/.off/.obj/.stl
    go through trimesh: a point cloud (vertices without faces) returns its vertices and any
    colours; a mesh is sampled uniformly over its surface (``num_samples`` points, ``seed``),
    because its vertices are not a uniform sample of the shape.
    """
    p = _check_file(path, "point cloud", POINT_CLOUD_EXTENSIONS)
    suffix = p.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            return _validate_points(_load_npy_points(p), p)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise _corrupt("point cloud", p, exc) from exc  # .npz is a zip: cut short, BadZip
    try:
        geom = trimesh.load(str(p), file_type=suffix[1:], process=False)
        if isinstance(geom, trimesh.Scene):
            geom = geom.to_geometry() if geom.geometry else None
    except Exception as exc:  # trimesh's parsers raise many unrelated exception types
        raise _corrupt("point cloud", p, exc) from exc
    if suffix == ".off":
        _check_off_counts(p, geom)
    if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0:
        if not geom.area > 0:
            raise MediaError(f"mesh in {p} has no surface area", hint="check the mesh's faces")
        return sample_points(geom, num_samples, seed)
    if isinstance(geom, trimesh.Trimesh | trimesh.PointCloud) and len(geom.vertices) > 0:
        xyz = np.asarray(geom.vertices, dtype=np.float32)
        colors = (
            np.asarray(geom.colors)
            if isinstance(geom, trimesh.PointCloud)
            else np.asarray(geom.visual.vertex_colors)
            if geom.visual.kind == "vertex"
            else None
        )
        if colors is not None and colors.shape[:1] == xyz.shape[:1]:
            xyz = np.hstack([xyz, colors[:, :3].astype(np.float32) / 255.0])  # uint8 RGBA
        return _validate_points(xyz, p)
    raise MediaError(f"point cloud file contains no points: {p}", hint="re-export it")


def normalize_points(points: np.ndarray | Tensor, num_points: int, seed: int = 0) -> Tensor:
    """Centre at the centroid, scale into the unit sphere, and sample exactly ``num_points``
    rows: without replacement when there are enough, otherwise all points plus seeded
    resamples. Normalising on the full cloud keeps the scale independent of the sample."""
    if num_points <= 0:
        raise ValueError(f"num_points must be positive, got {num_points}")
    arr = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise MediaError(f"expected points shaped (N, C>=3), got {arr.shape}")
    if arr.shape[0] == 0:
        raise MediaError("point cloud contains no points")
    pts = arr.astype(np.float64)
    if not np.all(np.isfinite(pts[:, :3])):
        raise MediaError("point cloud contains NaN or infinite coordinates")
    pts[:, :3] -= pts[:, :3].mean(axis=0)
    radius = np.linalg.norm(pts[:, :3], axis=1).max()
    if radius > 0:
        pts[:, :3] /= radius
    rng = np.random.default_rng(seed)
    n = pts.shape[0]
    if n >= num_points:
        idx = rng.choice(n, size=num_points, replace=False)
    else:
        idx = np.concatenate([np.arange(n), rng.choice(n, size=num_points - n, replace=True)])
    return torch.from_numpy(pts[idx].astype(np.float32))
