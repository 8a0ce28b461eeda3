"""Item media: PNG images shrunk to a common size, 16 kHz mono audio read and written as WAV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MAX_IMAGE_SIDE", "SAMPLE_RATE", "read_audio", "save_png", "write_wav"]

SAMPLE_RATE = 16000
MAX_IMAGE_SIDE = 256  # encoders take 224 px; keeps openclipart's 131 MB down to a few MB


def save_png(img: Any, path: Path, max_side: int = MAX_IMAGE_SIDE) -> None:
    """Shrink (never enlarge) to ``max_side`` and save as PNG (``optimize`` would cost 60 ms
    per image for a few percent of size)."""
    from PIL import Image

    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_wav(wave: np.ndarray, path: Path) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")


def read_audio(path: Path, max_seconds: float) -> np.ndarray:
    """16 kHz mono float32; .oga (freedesktop) is Ogg too but not in ``load_audio``'s list."""
    import soundfile as sf

    from mmcompose.model.media import AUDIO_EXTENSIONS, load_audio, prepare_waveform

    if path.suffix.lower() in AUDIO_EXTENSIONS:
        return load_audio(path, SAMPLE_RATE, max_seconds)
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return prepare_waveform(data, rate, SAMPLE_RATE, max_seconds)
