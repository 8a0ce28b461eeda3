"""Images: load a file upright as RGB, and turn it into the pixel tensor an encoder expects
(CLIP's image processor via transformers, or our operation-for-operation copy; the
ImageNet/CLIP evaluation transform)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from mmcompose.errors import CheckpointError, MediaError
from mmcompose.model.media.common import IMAGE_EXTENSIONS, PathLike, _check_file, _corrupt

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# OpenAI CLIP / LLaVA-style vision towers were trained with these instead.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


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


def _check_image_header(p: Path) -> None:
    """That a frame file is a non-empty image Pillow can identify (no pixels decoded)."""
    _check_file(p, "image", IMAGE_EXTENSIONS)
    try:
        with Image.open(p):
            pass
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _corrupt("image", p, exc) from exc
