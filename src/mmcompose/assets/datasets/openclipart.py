"""``openclipart`` (image): openclipart drawings, labelled from their folders and file-name
words, at most ``CLIPART_PER_LABEL`` per label."""

from __future__ import annotations

import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from mmcompose.assets.datasets.concepts import CONCEPTS
from mmcompose.assets.datasets.items import Item, hash_int, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import save_png
from mmcompose.assets.datasets.sources import Source, require_dir

OPENCLIPART_SOURCE = Source("openclipart-png", "apt")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
CLIPART_PER_LABEL = 16
CLIPART_TOP_DIRS = (
    "animals",
    "food",
    "plants",
    "transportation",
    "recreation",
    "tools",
    "buildings",
    "electronics",
    "unsorted",
)
# Folder -> label; the most specific folder wins. Files whose name matches a keyword below get
# that keyword's label instead (a duck in animals/birds is a duck).
CLIPART_DIR_LABELS: dict[str, str] = {
    "animals/birds": "bird",
    "animals/birds/penguin": "penguin",
    "animals/fish": "fish",
    "animals/dinosaurs": "dinosaur",
    "animals/mammals/bears": "bear",
    "animals/mammals/dogs": "dog",
    "animals/mammals/horses": "horse",
    "animals/mammals/housecats": "cat",
    "plants/flowers": "flower",
    "plants/trees": "tree",
    "plants/trees/evergreen": "tree",
    "buildings/homes": "house",
}
# label -> file-name words (English, and the Italian of the many "architetto" drawings).
CLIPART_KEYWORDS: dict[str, tuple[str, ...]] = {
    "cow": ("cow", "cows", "vacca", "mucca", "mucche"),
    "bull": ("bull", "toro", "toros"),
    "pig": ("pig", "porcinet", "maiale"),
    "elephant": ("elephant", "elefante", "elefantone"),
    "camel": ("camel", "cammello"),
    "rabbit": ("bunny", "rabbit", "coniglio"),
    "bear": ("bear", "orso", "ours"),
    "lion": ("lion", "leone"),
    "deer": ("deer", "fawn", "cervo"),
    "cat": ("cat", "kitten", "gatto", "gattina", "gatti"),
    "dog": ("dog", "puppy", "beagle", "bulldog", "cane"),
    "horse": ("horse", "cavallo"),
    "monkey": ("monkey", "baboon", "orangutan", "scimmia"),
    "tiger": ("tiger", "tigre"),
    "sheep": ("sheep", "pecora", "pecorella", "agnellini", "ram"),
    "duck": ("duck", "anatra", "papera"),
    "penguin": ("penguin", "pinguino"),
    "butterfly": ("butterfly", "farfalla", "farfalle"),
    "bee": ("bee", "abeille", "ape"),
    "spider": ("spider", "ragno", "ragnetto"),
    "snail": ("snail", "lumaca"),
    "dinosaur": ("dino", "dinosaur", "dinosauro", "dinosauri"),
    "dragon": ("dragon",),
    "armadillo": ("armadillo",),
    "mushroom": ("mushroom", "champignon"),
    "cactus": ("cactus",),
    "apple": ("apple", "apples", "applf"),
    "orange": ("orange",),
    "banana": ("banana", "bananas"),
    "grapes": ("grape", "grapes"),
    "lemon": ("lemon"),
    "cherry": ("cherry", "cherries"),
    "strawberry": ("strawberry", "strawberries"),
    "pear": ("pear",),
    "pizza": ("pizza",),
    "cake": ("cake", "gateau"),
    "doughnut": ("donut", "doughnut"),
    "cup": ("mug", "teacup", "cup", "cuppa", "tazza", "kubek"),
    "car": ("car", "redcar", "sportcar", "auto", "autos", "chevrolet", "hummer"),
    "bus": ("bus",),
    "truck": ("truck", "lorry"),
    "bicycle": ("bicycle", "bike", "bicicletta"),
    "boat": ("boat", "sailboat", "trawler"),
    "airplane": ("airplane", "aircraft", "plane"),
    "rocket": ("rocket",),
    "anchor": ("anchor",),
    "knot": ("knot",),
    "guitar": ("guitar",),
    "violin": ("violin", "cello"),
    "trumpet": ("trumpet", "tromba"),
    "piano": ("piano",),
    "drum": ("drum", "drums", "africandrum", "djambf", "derbouk"),
    "bell": ("bell", "campana"),
    "phone": ("phone", "telephone", "cellular"),
    "camera": ("camera", "camcorder", "fotografica"),
    "clock": ("clock", "orologio"),
    "ball": ("ball", "soccer", "football", "basketball", "baseball", "pallone"),
    "teddy": ("teddy",),
    "gear": ("cog", "gear", "engrenagem", "dentata"),
    "helmet": ("helmet", "casco"),
    "brick": ("brick", "mattone"),
    "wheel": ("wheel", "ruota"),
    "house": ("house", "home", "casa"),
    "tree": ("tree", "palmtree"),
    "flower": ("flower", "flowers", "fiore", "tulips", "daisy", "rose", "rosa"),
    "box": ("box", "scatolone"),
}
CLIPART_STOP_WORDS = frozenset(
    (
        *("juice", "lane", "route", "symbol", "sign", "signs", "flag", "logo", "icon"),
        *("silhouet", "orca", "whale", "dolphin", "crawfish", "amibe", "kallisti", "paesaggio"),
    )
)
CLIPART_MAX_PIXELS = 4_000_000  # a few openclipart PNGs are 170 Mpx: seconds each to decode


def _clipart_label(rel_parts: Sequence[str]) -> str | None:
    """Label from the file name's words, else from the deepest labelled folder, else None."""
    words = re.findall(r"[a-z]+", Path(rel_parts[-1]).stem.lower())
    if CLIPART_STOP_WORDS.intersection(words):
        return None
    for label, keys in CLIPART_KEYWORDS.items():
        if any(w in keys for w in words):
            return label
    folders = rel_parts[:-1]
    for depth in range(len(folders), 0, -1):
        label = CLIPART_DIR_LABELS.get("/".join(folders[:depth]))
        if label is not None:
            return label
    return None


def _clipart_item(path: Path, root: Path, label: str, out: Path) -> Item | None:
    """Shrunk copy of one drawing, or None for an unreadable or oversized file."""
    from PIL import Image

    rel_src = path.relative_to(root).as_posix()
    try:
        with warnings.catch_warnings():  # the oversized files warn on open; we skip them
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # lazy: only the header is read until load()
        with img:
            if img.width * img.height > CLIPART_MAX_PIXELS:
                return None
            img.load()
            rel = f"images/{label}/{slug(path.stem)}-{hash_int(rel_src) % 10**6}.png"
            save_png(img.convert("RGBA"), out / rel)
    except (OSError, ValueError) as exc:
        print(f"mmcompose: skipping unreadable {path}: {exc}", file=sys.stderr)
        return None
    return Item(f"openclipart/{rel_src}", rel, "image", label, f"a drawing of a {label}")


@register_dataset(
    "openclipart",
    "image",
    (OPENCLIPART_SOURCE,),
    f"labels from folders and file-name words; at most {CLIPART_PER_LABEL} per label",
)
def build_openclipart(out: Path, seed: int) -> list[Item]:
    root = require_dir(OPENCLIPART_DIR, OPENCLIPART_SOURCE, "the openclipart PNGs")
    by_label: dict[str, list[Path]] = defaultdict(list)
    for top in CLIPART_TOP_DIRS:
        for path in sorted((root / top).rglob("*.png")):
            label = _clipart_label(path.relative_to(root).parts)
            if label is not None and label in CONCEPTS:
                by_label[label].append(path)
    items = []
    for label in sorted(by_label):
        # A seeded pick spreads the cap over artists instead of taking alphabetical runs.
        paths = sorted(by_label[label], key=lambda p: hash_int(seed, p.relative_to(root)))
        kept = 0
        for path in paths:
            if kept == CLIPART_PER_LABEL:
                break
            item = _clipart_item(path, root, label, out)
            if item is not None:
                items.append(item)
                kept += 1
    return items
