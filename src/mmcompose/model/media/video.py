"""Video: a video file, a still image or a folder of frame images, sampled to a fixed
number of frames with one uniform rule."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from mmcompose.errors import MediaError
from mmcompose.model.media.common import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    PathLike,
    _check_file,
    _corrupt,
)
from mmcompose.model.media.image import _check_image_header, _to_rgb, load_image


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
