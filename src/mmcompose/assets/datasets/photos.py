"""``photos`` (image): the named sample photos of opencv-doc and scikit-image."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.assets.datasets import sources
from mmcompose.assets.datasets.items import Item, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import save_png
from mmcompose.assets.datasets.sources import OPENCV_SOURCE, Source, missing, require_dir

SKIMAGE_SOURCE = Source("scikit-image", "pip")
# opencv-doc file -> (label, caption)
OPENCV_PHOTOS: dict[str, tuple[str, str]] = {
    "apple.jpg": ("apple", "a photo of an apple"),
    "orange.jpg": ("orange", "a photo of an orange"),
    "baboon.jpg": ("monkey", "a photo of a baboon's face"),
    "butterfly.jpg": ("butterfly", "a photo of a butterfly"),
    "HappyFish.jpg": ("fish", "a photo of a fish"),
    "chicky_512.png": ("bird", "a photo of a chick"),
    "messi5.jpg": ("person", "a photo of a football player with a ball"),
    "basketball1.png": ("ball", "a photo of a basketball"),
    "box.png": ("box", "a photo of a box"),
    "home.jpg": ("house", "a photo of a house"),
    "Blender_Suzanne1.jpg": ("monkey", "a rendering of a monkey head"),
}
# skimage.data function -> (label, caption); only images bundled with the package (no download)
SKIMAGE_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("person", "a photo of an astronaut"),
    "chelsea": ("cat", "a photo of a cat"),
    "coffee": ("cup", "a photo of a cup of coffee"),
    "rocket": ("rocket", "a photo of a rocket"),
    "horse": ("horse", "a silhouette of a horse"),
    "camera": ("camera", "a photo of a man with a camera"),
    "brick": ("brick", "a photo of a brick wall"),
    "clock": ("clock", "a photo of a clock"),
}


def _skimage_images() -> Iterable[tuple[str, Any]]:
    """(name, RGB PIL image) for the bundled skimage samples; nothing if skimage is absent."""
    if importlib.util.find_spec("skimage") is None:
        return
    from PIL import Image
    from skimage import data

    for name in SKIMAGE_PHOTOS:
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception as exc:  # a sample that needs a download, or a renamed one
            print(f"mmcompose: skipping skimage.data.{name}: {exc}", file=sys.stderr)
            continue
        if arr.dtype == bool:
            arr = np.where(arr, 0, 255).astype(np.uint8)  # horse: black shape on white
        yield name, Image.fromarray(arr.astype(np.uint8)).convert("RGB")


@register_dataset("photos", "image", (OPENCV_SOURCE, SKIMAGE_SOURCE))
def build_photos(out: Path, seed: int) -> list[Item]:
    from PIL import Image

    root = require_dir(sources.OPENCV_DATA_DIR, OPENCV_SOURCE, "opencv-doc's sample data")
    items = []
    for name, (label, caption) in OPENCV_PHOTOS.items():
        if not (root / name).is_file():
            continue
        with Image.open(root / name) as img:
            rel = f"images/opencv-{slug(Path(name).stem)}.png"
            save_png(img.convert("RGB"), out / rel)
        items.append(Item(f"photos/opencv/{name}", rel, "image", label, caption))
    for name, img in _skimage_images():
        label, caption = SKIMAGE_PHOTOS[name]
        rel = f"images/skimage-{name}.png"
        save_png(img, out / rel)
        items.append(Item(f"photos/skimage/{name}", rel, "image", label, caption))
    if not items:
        raise missing(f"the named photos in {root}", OPENCV_SOURCE)
    return items
