"""``clips`` (video): segments of the opencv-doc videos, plus pan/zoom clips over the items of
the image datasets (``IMAGE_DATASETS``, prepared first)."""

from __future__ import annotations

import gzip
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.assets.datasets import sources
from mmcompose.assets.datasets.items import Item, hash_int, read_items, seeded_rng, slug
from mmcompose.assets.datasets.prepare import prepare_one
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.sources import OPENCV_SOURCE, require_dir

CLIP_SIZE = 128
CLIP_FRAMES = 12
CLIP_FPS = 8
CLIPS_PER_LABEL = 4  # pan/zoom clips per concept, each over a different image when possible
REAL_SEGMENTS = 6  # clips cut from each real video
REAL_FRAMES = 16
# opencv-doc video (relative to OPENCV_DATA_DIR or OPENCV_HTML_DIR) -> (label, caption)
REAL_VIDEOS: dict[str, tuple[str, str]] = {
    "vtest.avi": ("person", "people walking across a square"),
    "Megamind.avi": ("person", "an animated character talking"),
    "tree.avi": ("tree", "a tree seen through a window"),
    "cup.mp4.gz": ("cup", "a hand turning a cup"),
    "box.mp4.gz": ("box", "hands holding a box"),
}
IMAGE_DATASETS = ("emoji", "openclipart", "photos")


def _write_mp4(frames: Sequence[np.ndarray], path: Path, fps: int) -> None:
    """MPEG-4 part 2: every PyAV build has the encoder, and its output is deterministic."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 600_000
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _trajectory(kind: str, w: int, h: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Start and end crop boxes (l, t, r, b) for a zoom-in, zoom-out or pan over the image."""
    side = min(w, h)
    full = np.array([(w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2])
    frac = rng.uniform(0.5, 0.7)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * side, h / 2 + rng.uniform(-0.1, 0.1) * side
    half = frac * side / 2
    tight = np.array([cx - half, cy - half, cx + half, cy + half])
    if kind == "zoom in":
        return full, _inside(tight, w, h)
    if kind == "zoom out":
        return _inside(tight, w, h), full
    shift = (side - 2 * half) / 2
    offset = np.array([shift, 0.0, shift, 0.0])
    left, right = _inside(tight - offset, w, h), _inside(tight + offset, w, h)
    return (left, right) if rng.random() < 0.5 else (right, left)


def _inside(box: np.ndarray, w: int, h: int) -> np.ndarray:
    """Slide a box (no larger than the image) back inside it."""
    dx = max(0.0, -box[0]) - max(0.0, box[2] - w)
    dy = max(0.0, -box[1]) - max(0.0, box[3] - h)
    return box + np.array([dx, dy, dx, dy])


def pan_zoom_frames(img: Any, kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """CLIP_FRAMES square frames of a moving crop over a white-backed RGB image."""
    from PIL import Image

    from mmcompose.model.media import _to_rgb

    rgb = _to_rgb(img)
    pad = max(rgb.size)  # pad to a square canvas so pans have room on any aspect ratio
    canvas = Image.new("RGB", (pad, pad), (255, 255, 255))
    canvas.paste(rgb, ((pad - rgb.width) // 2, (pad - rgb.height) // 2))
    start, end = _trajectory(kind, pad, pad, rng)
    frames = []
    for t in np.linspace(0.0, 1.0, CLIP_FRAMES):
        box = tuple(float(v) for v in (1 - t) * start + t * end)
        frame = canvas.resize((CLIP_SIZE, CLIP_SIZE), Image.Resampling.BILINEAR, box=box)
        frames.append(np.asarray(frame, dtype=np.uint8))
    return frames


def _video_path(name: str) -> Path | None:
    for root in (sources.OPENCV_DATA_DIR, sources.OPENCV_HTML_DIR):
        if (root / name).is_file():
            return root / name
    return None


def _decode_small(path: Path, scratch: Path, width: int = 160) -> list[np.ndarray]:
    """All frames, scaled to ``width`` (even height); ``.gz`` files are gunzipped to scratch."""
    import av

    if path.suffix == ".gz":
        plain = scratch / path.stem
        plain.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path = plain
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        height = None
        for frame in container.decode(stream):
            if height is None:
                height = 2 * round(frame.height * width / frame.width / 2)
            frames.append(frame.to_ndarray(width=width, height=height, format="rgb24"))
    return frames


def _real_clips(out: Path) -> list[Item]:
    """Short segments of the opencv-doc videos; leading black frames (Megamind) are dropped."""
    items = []
    for name, (label, caption) in REAL_VIDEOS.items():
        path = _video_path(name)
        if path is None:
            print(f"mmcompose: opencv-doc video {name} not found, skipping", file=sys.stderr)
            continue
        frames = _decode_small(path, out / "scratch")
        while frames and frames[0].mean() < 8:
            frames.pop(0)
        segments = min(REAL_SEGMENTS, len(frames) // REAL_FRAMES)
        if segments == 0:
            continue
        length = len(frames) // segments
        stem = slug(name.removesuffix(".gz").rsplit(".", 1)[0])
        for k in range(segments):
            idx = k * length + np.linspace(0, length - 1, REAL_FRAMES).round().astype(int)
            rel = f"videos/{label}/{stem}-{k:02d}.mp4"
            _write_mp4([frames[i] for i in idx], out / rel, fps=10)
            extra = {"source": str(path), "segment": k}
            items.append(Item(f"clips/opencv/{stem}#{k}", rel, "video", label, caption, extra))
    shutil.rmtree(out / "scratch", ignore_errors=True)
    return items


def _pan_zoom_clips(out: Path, seed: int, image_dirs: dict[str, Path]) -> list[Item]:
    from PIL import Image

    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for folder in image_dirs.values():
        for rec in read_items(folder):
            by_label[rec["label"]].append(rec)
    kinds = ("zoom in", "pan", "zoom out")
    items = []
    for label in sorted(by_label):
        recs = sorted(by_label[label], key=lambda r: hash_int(seed, "clip", r["id"]))
        for k in range(CLIPS_PER_LABEL):
            rec, kind = recs[k % len(recs)], kinds[k % len(kinds)]
            with Image.open(rec["path"]) as img:
                img.load()
                frames = pan_zoom_frames(img, kind, seeded_rng(seed, "clip", rec["id"], k))
            rel = f"videos/{label}/panzoom-{slug(rec['id'])}-{k}.mp4"
            _write_mp4(frames, out / rel, fps=CLIP_FPS)
            caption = (
                f"{'a camera panning over' if kind == 'pan' else kind + ' on'} {rec['caption']}"
            )
            extra = {"image": rec["id"], "motion": kind}
            items.append(
                Item(f"clips/panzoom/{rec['id']}#{k}", rel, "video", label, caption, extra)
            )
    return items


@register_dataset(
    "clips",
    "video",
    (OPENCV_SOURCE,),
    "opencv-doc video segments plus pan/zoom clips over the emoji, openclipart and "
    "photos items; clips of one video or image share a split unless it is their "
    "label's only source",
    group_by=("source", "image"),
)
def build_clips(out: Path, seed: int) -> list[Item]:
    require_dir(sources.OPENCV_DATA_DIR, OPENCV_SOURCE, "opencv-doc's sample videos")
    image_dirs = {name: prepare_one(name, False, False, seed) for name in IMAGE_DATASETS}
    return _real_clips(out) + _pan_zoom_clips(out, seed, image_dirs)
