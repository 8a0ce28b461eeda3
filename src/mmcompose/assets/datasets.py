"""Real, offline datasets for every modality, prepared once into the asset cache.

Dataset hubs are unreachable here, so the data comes from Debian and PyPI packages (see
``shared/ASSETS.md``): emoji rendered from the Noto font, openclipart drawings, opencv/skimage
photos, words spoken by espeak-ng, lmms/freedesktop/alsa sounds, CGAL and pybullet meshes, and
opencv videos plus pan/zoom clips over the images. Every dataset lands in
``cache_dir()/datasets/<name>/`` as copies/renderings (self-contained: uninstalling the source
package keeps it usable), with

- ``manifest.jsonl``: one record per item (id, absolute path, modality, label, caption, split);
- ``mmcompose_manifest.json``: the dataset meta (sources with versions, counts per split and
  label, seed, split version), written last, so its presence marks the folder complete.

Splits are stratified per label (:func:`assign_splits`), so a concept is held out in every
modality at once, as the cross-modal benchmark needs. A folder prepared under an older split
rule only gets its manifest rewritten (:func:`_resplit`); the media are not rendered again.

The concept vocabulary (:data:`CONCEPTS`) is shared by all datasets on purpose: the same concept
(cow) appears as an emoji, a spoken word, a mesh and a video, which the cross-modal benchmark
needs. Nothing is installed here: a missing source raises :class:`MissingAssetError` whose hint
is the exact ``apt-get``/``pip`` command.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.assets.cache import (
    MANIFEST_NAME,
    MissingAssetError,
    atomic_dir,
    cache_dir,
    read_json,
    sha256_file,
    write_json_atomic,
)
from mmcompose.errors import MMComposeError, UnknownNameError
from mmcompose.fs import atomic_file

__all__ = [
    "CONCEPTS",
    "DATASETS",
    "ITEMS_NAME",
    "Item",
    "assign_splits",
    "concept_table",
    "dataset_dir",
    "prepare_datasets",
    "read_items",
    "split_groups",
    "split_quota",
]

FORMAT = 1  # the files; a new split rule bumps SPLIT_VERSION only (manifest rewritten)
SPLIT_VERSION = 2  # 1: per-item hash 80/10/10; 2: per-label stratified, groups kept together
ITEMS_NAME = "manifest.jsonl"
CONCEPTS_NAME = "concepts.json"
SAMPLE_RATE = 16000
MAX_IMAGE_SIDE = 256  # encoders take 224 px; keeps openclipart's 131 MB down to a few MB
HELD_OUT_PERCENT = 15  # per label, each of test and val (see split_quota)

# --------------------------------------------------------------------------- sources
# Module-level so tests can point them at tmp folders with monkeypatch.
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_HTML_DIR = Path("/usr/share/doc/opencv-doc/opencv4/html")  # box.mp4.gz, cup.mp4.gz
LMMS_SAMPLES_DIR = Path("/usr/share/lmms/samples")
FREEDESKTOP_SOUNDS_DIR = Path("/usr/share/sounds/freedesktop/stereo")
ALSA_SOUNDS_DIR = Path("/usr/share/sounds/alsa")
CGAL_DATA_TARBALLS: tuple[Path, ...] = (
    Path("/usr/share/doc/libcgal-dev/data.tar.gz"),
    Path("/usr/share/doc/libcgal-demo/data.tar.gz"),
)
ESPEAK = "espeak-ng"
PYBULLET_DATA_DIR: Path | None = None  # None: located from the installed pybullet_data


@dataclass(frozen=True)
class Source:
    """A system or pip package a dataset reads from, and the command that installs it."""

    package: str
    manager: str  # "apt" or "pip"

    @property
    def install(self) -> str:
        return (
            f"apt-get install -y {self.package}"
            if self.manager == "apt"
            else f"pip install {self.package}"
        )

    def version(self) -> str:
        """Installed version (recorded in the meta so a dataset says what it was built from)."""
        if self.manager == "pip":
            try:
                return importlib.metadata.version(self.package)
            except importlib.metadata.PackageNotFoundError:
                return "not installed"
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", self.package],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            return "unknown"
        return out.stdout.strip() or "not installed"


def _missing(what: str, source: Source) -> MissingAssetError:
    return MissingAssetError(
        f"{what} is missing (it comes from the {source.manager} package {source.package!r})",
        hint=source.install,
    )


def _require_dir(path: Path, source: Source, what: str) -> Path:
    if not path.is_dir() or not any(path.iterdir()):
        raise _missing(f"{what} ({path})", source)
    return path


# --------------------------------------------------------------------------- vocabulary
# concept -> Unicode names of its emoji. Every concept is spoken and gets pan/zoom clips; the
# mesh concepts add point clouds. Chosen so that most concepts exist in 3+ modalities.
CONCEPTS: dict[str, tuple[str, ...]] = {
    # animals with meshes
    "cow": ("COW FACE", "COW"),
    "bull": ("OX", "WATER BUFFALO"),
    "pig": ("PIG FACE", "PIG"),
    "elephant": ("ELEPHANT",),
    "camel": ("DROMEDARY CAMEL", "BACTRIAN CAMEL"),
    "rabbit": ("RABBIT FACE", "RABBIT"),
    "bear": ("BEAR FACE",),
    "lion": ("LION FACE",),
    "deer": ("DEER",),
    "cat": ("CAT FACE", "CAT"),
    "dinosaur": ("SAUROPOD", "T-REX"),
    "dragon": ("DRAGON", "DRAGON FACE"),
    "hippopotamus": ("HIPPOPOTAMUS",),
    "duck": ("DUCK",),
    "armadillo": (),
    # objects with meshes
    "mushroom": ("MUSHROOM",),
    "cactus": ("CACTUS",),
    "helmet": ("RESCUE WORKER\u2019S HELMET", "MILITARY HELMET"),
    "hand": ("RAISED HAND", "RAISED HAND WITH FINGERS SPLAYED", "WAVING HAND SIGN"),
    "cup": ("TEACUP WITHOUT HANDLE", "HOT BEVERAGE"),
    "teddy": ("TEDDY BEAR",),
    "ball": ("SOCCER BALL", "BASKETBALL AND HOOP", "VOLLEYBALL"),
    "airplane": ("AIRPLANE", "SMALL AIRPLANE"),
    "anchor": ("ANCHOR",),
    "bone": ("BONE",),
    "gear": ("GEAR",),
    "knot": ("KNOT",),
    "doughnut": ("DOUGHNUT",),
    "brick": ("BRICK",),
    "wheel": ("WHEEL",),
    "person": ("STANDING PERSON", "PEDESTRIAN"),
    # image/audio/video concepts
    "dog": ("DOG FACE", "DOG", "POODLE"),
    "horse": ("HORSE FACE", "HORSE"),
    "monkey": ("MONKEY FACE", "MONKEY"),
    "tiger": ("TIGER FACE", "TIGER"),
    "sheep": ("SHEEP", "RAM"),
    "bird": ("BIRD", "DOVE OF PEACE", "PARROT", "EAGLE"),
    "penguin": ("PENGUIN",),
    "fish": ("FISH", "TROPICAL FISH", "BLOWFISH"),
    "butterfly": ("BUTTERFLY",),
    "bee": ("HONEYBEE",),
    "spider": ("SPIDER",),
    "snail": ("SNAIL",),
    "apple": ("RED APPLE", "GREEN APPLE"),
    "orange": ("TANGERINE",),
    "banana": ("BANANA",),
    "grapes": ("GRAPES",),
    "lemon": ("LEMON",),
    "cherry": ("CHERRIES",),
    "strawberry": ("STRAWBERRY",),
    "pear": ("PEAR",),
    "pizza": ("SLICE OF PIZZA",),
    "cake": ("SHORTCAKE", "BIRTHDAY CAKE"),
    "car": ("AUTOMOBILE", "RACING CAR"),
    "bus": ("BUS", "ONCOMING BUS"),
    "truck": ("DELIVERY TRUCK", "ARTICULATED LORRY"),
    "bicycle": ("BICYCLE",),
    "boat": ("SAILBOAT", "SPEEDBOAT", "ROWBOAT"),
    "rocket": ("ROCKET",),
    "house": ("HOUSE BUILDING", "HOUSE WITH GARDEN"),
    "tree": ("DECIDUOUS TREE", "EVERGREEN TREE", "PALM TREE"),
    "flower": ("TULIP", "CHERRY BLOSSOM", "HIBISCUS", "SUNFLOWER", "ROSE"),
    "guitar": ("GUITAR",),
    "violin": ("VIOLIN",),
    "trumpet": ("TRUMPET",),
    "piano": ("MUSICAL KEYBOARD",),
    "drum": ("DRUM WITH DRUMSTICKS",),
    "bell": ("BELL",),
    "phone": ("BLACK TELEPHONE", "MOBILE PHONE"),
    "camera": ("CAMERA",),
    "clock": ("ALARM CLOCK", "MANTELPIECE CLOCK"),
    "clap": ("CLAPPING HANDS SIGN",),
    "box": ("PACKAGE",),
}
SPOKEN_TEXT: dict[str, str] = {"teddy": "teddy bear"}  # what espeak says where the label is short


# --------------------------------------------------------------------------- items and splits
@dataclass
class Item:
    """One dataset record while it is being built; ``rel`` is relative to the dataset folder."""

    id: str
    rel: str
    modality: str
    label: str
    caption: str
    extra: dict[str, Any] = field(default_factory=dict)


def _hash_int(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_quota(n: int) -> tuple[int, int]:
    """(test, val) item counts for a label with ``n`` items.

    Test: ceil(15%), at least 1, and 2 from 6 items on, so labels of 6-13 items (8 spoken
    voices, 12 mesh poses, most openclipart labels) hold out 2: mini-MCUB's distinct input tuples
    are products of these counts. Val: as many, fewer where train would drop below half.
    n == 2: one test item (a val item too would leave none for training); n == 1: train only,
    since a closed-set classifier must have seen every label it is tested on.
    """
    if n < 2:
        return 0, 0
    if n == 2:
        return 1, 0
    test = max(2 if n >= 6 else 1, -(-n * HELD_OUT_PERCENT // 100))
    val = max(1, min(test, n - test - -(-n // 2)))
    return test, val


def assign_splits(items: Sequence[Sequence[str]], seed: int = 0) -> dict[str, str]:
    """id -> split for ``(id, label)`` or ``(id, label, group)`` tuples; pure and order-free.

    Stratified per label, so every concept with enough items has held-out items in every
    dataset (mini-MCUB needs concepts held out in 3-4 modalities at once), and every held-out
    label keeps train items. A group (default: the item alone) never straddles splits. Within a
    label, groups in order of sha256(seed, group) go to test while they fit its
    :func:`split_quota`, then to val, else train; if groups are too big to fit, a label with two
    or more train groups still moves its smallest one to an empty test (then val) split.
    """
    labels: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for item_id, label, *group in items:
        labels[label][group[0] if group else item_id].append(item_id)
    splits: dict[str, str] = {}
    for groups in labels.values():
        test, val = split_quota(sum(len(ids) for ids in groups.values()))
        quota = {"test": test, "val": val}
        filled = dict.fromkeys(quota, 0)
        where: dict[str, str] = {}
        for key in sorted(groups, key=lambda g: (_hash_int("split", seed, g), g)):
            size = len(groups[key])
            where[key] = next((s for s in quota if filled[s] + size <= quota[s]), "train")
            if where[key] != "train":
                filled[where[key]] += size
        for split, want in quota.items():
            in_train = [g for g in where if where[g] == "train"]
            if want and not filled[split] and len(in_train) >= 2:
                key = min(in_train, key=lambda g: len(groups[g]))  # ties: first in hash order
                where[key] = split
                filled[split] += len(groups[key])
        for key, ids in groups.items():
            splits.update(dict.fromkeys(ids, where[key]))
    return splits


# Record fields naming the source an item was derived from, per dataset: items sharing one are
# near-duplicates (segments of one video, pan/zoom clips over one image) kept in one split.
SPLIT_SOURCE_FIELDS: dict[str, tuple[str, ...]] = {"clips": ("source", "image")}


def split_groups(
    name: str, records: Sequence[Mapping[str, Any]], files: Mapping[str, Path]
) -> dict[str, str]:
    """id -> group (its smallest member id, stable across machines) for :func:`assign_splits`.

    Byte-identical files always share a group: openclipart files one drawing under several
    folders, and a copy in test of a train image measures memory. Items sharing a source field
    (:data:`SPLIT_SOURCE_FIELDS`) share a group unless it is their label's only source; then
    they are split like a mesh's poses (a new motion of a seen image), else the label would have
    no held-out clip. Mesh poses are never grouped: most labels have one mesh. ``files`` maps
    each id to its file as it is on disk now.
    """
    parent = {rec["id"]: rec["id"] for rec in records}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def join(ids: Iterable[str]) -> None:
        ids = sorted(ids)
        for other in ids[1:]:
            a, b = root(ids[0]), root(other)
            parent[max(a, b)] = min(a, b)

    by_key: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for rec in records:
        by_key[("sha256", sha256_file(files[rec["id"]]))].append(rec["id"])
    fields = SPLIT_SOURCE_FIELDS.get(name, ())
    sources: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        key = next((str(rec[f]) for f in fields if rec.get(f) is not None), rec["id"])
        sources[rec["label"]][key].append(rec["id"])
    for label, groups in sources.items():
        if len(groups) > 1:
            for key, ids in groups.items():
                by_key[("source", label, key)].extend(ids)
    for ids in by_key.values():
        join(ids)
    return {item_id: root(item_id) for item_id in parent}


# --------------------------------------------------------------------------- small helpers
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(_hash_int(seed, *parts))


def _save_png(img: Any, path: Path, max_side: int = MAX_IMAGE_SIDE) -> None:
    """Shrink (never enlarge) to ``max_side`` and save as PNG (``optimize`` would cost 60 ms
    per image for a few percent of size)."""
    from PIL import Image

    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _write_wav(wave: np.ndarray, path: Path) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")


def _read_audio(path: Path, max_seconds: float) -> np.ndarray:
    """16 kHz mono float32; .oga (freedesktop) is Ogg too but not in ``load_audio``'s list."""
    import soundfile as sf

    from mmcompose.model.media import AUDIO_EXTENSIONS, load_audio, prepare_waveform

    if path.suffix.lower() in AUDIO_EXTENSIONS:
        return load_audio(path, SAMPLE_RATE, max_seconds)
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return prepare_waveform(data, rate, SAMPLE_RATE, max_seconds)


# --------------------------------------------------------------------------- image: emoji
EMOJI_SOURCE = Source("fonts-noto-color-emoji", "apt")
EMOJI_SIZE = 109  # the only size the Noto colour bitmaps come in


def _emoji_chars() -> list[tuple[str, str, str]]:
    """(label, character, lower-case Unicode name) for every emoji of the vocabulary."""
    out = []
    for label, names in CONCEPTS.items():
        for name in names:
            try:
                out.append((label, unicodedata.lookup(name), name.lower().replace("\u2019", "'")))
            except KeyError:  # a name newer than Python's Unicode database: skip it
                continue
    return out


def _build_emoji(out: Path, seed: int) -> list[Item]:
    from PIL import Image, ImageDraw, ImageFont

    if not EMOJI_FONT.is_file():
        raise _missing(f"the emoji font {EMOJI_FONT}", EMOJI_SOURCE)
    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_SIZE)
    items = []
    for label, char, name in _emoji_chars():
        img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(img).text((0, 0), char, font=font, embedded_color=True)
        box = img.getbbox()
        if box is None:  # the font lacks this glyph
            continue
        rel = f"images/{_slug(name)}.png"
        _save_png(img.crop(box), out / rel)
        items.append(Item(f"emoji/{_slug(name)}", rel, "image", label, name))
    return items


# --------------------------------------------------------------------------- image: openclipart
OPENCLIPART_SOURCE = Source("openclipart-png", "apt")
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
            rel = f"images/{label}/{_slug(path.stem)}-{_hash_int(rel_src) % 10**6}.png"
            _save_png(img.convert("RGBA"), out / rel)
    except (OSError, ValueError) as exc:
        print(f"mmcompose: skipping unreadable {path}: {exc}", file=sys.stderr)
        return None
    return Item(f"openclipart/{rel_src}", rel, "image", label, f"a drawing of a {label}")


def _build_openclipart(out: Path, seed: int) -> list[Item]:
    root = _require_dir(OPENCLIPART_DIR, OPENCLIPART_SOURCE, "the openclipart PNGs")
    by_label: dict[str, list[Path]] = defaultdict(list)
    for top in CLIPART_TOP_DIRS:
        for path in sorted((root / top).rglob("*.png")):
            label = _clipart_label(path.relative_to(root).parts)
            if label is not None and label in CONCEPTS:
                by_label[label].append(path)
    items = []
    for label in sorted(by_label):
        # A seeded pick spreads the cap over artists instead of taking alphabetical runs.
        paths = sorted(by_label[label], key=lambda p: _hash_int(seed, p.relative_to(root)))
        kept = 0
        for path in paths:
            if kept == CLIPART_PER_LABEL:
                break
            item = _clipart_item(path, root, label, out)
            if item is not None:
                items.append(item)
                kept += 1
    return items


# --------------------------------------------------------------------------- image: photos
OPENCV_SOURCE = Source("opencv-doc", "apt")
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


def _build_photos(out: Path, seed: int) -> list[Item]:
    from PIL import Image

    root = _require_dir(OPENCV_DATA_DIR, OPENCV_SOURCE, "opencv-doc's sample data")
    items = []
    for name, (label, caption) in OPENCV_PHOTOS.items():
        if not (root / name).is_file():
            continue
        with Image.open(root / name) as img:
            rel = f"images/opencv-{_slug(Path(name).stem)}.png"
            _save_png(img.convert("RGB"), out / rel)
        items.append(Item(f"photos/opencv/{name}", rel, "image", label, caption))
    for name, img in _skimage_images():
        label, caption = SKIMAGE_PHOTOS[name]
        rel = f"images/skimage-{name}.png"
        _save_png(img, out / rel)
        items.append(Item(f"photos/skimage/{name}", rel, "image", label, caption))
    if not items:
        raise _missing(f"the named photos in {root}", OPENCV_SOURCE)
    return items


# --------------------------------------------------------------------------- audio: spoken
ESPEAK_SOURCE = Source("espeak-ng", "apt")
# (voice, words per minute, pitch 0-99): accents x male/female variants x speeds x pitches
SPOKEN_VOICES: tuple[tuple[str, int, int], ...] = (
    ("en-us", 140, 50),
    ("en-us+f3", 165, 60),
    ("en-gb", 120, 40),
    ("en-gb+f2", 150, 70),
    ("en-gb-scotland", 175, 45),
    ("en-029+f4", 130, 55),
    ("en-us-nyc+m3", 185, 35),
    ("en-gb-x-rp+m5", 110, 62),
)


def _speak(text: str, voice: str, speed: int, pitch: int, wav: Path) -> None:
    cmd = [ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wav.is_file():
        raise MMComposeError(
            f"espeak-ng failed for {text!r} ({voice}): {result.stderr.strip()}",
            hint="check `espeak-ng --voices=en` lists the voice",
        )


def _spoken_one(out: Path, label: str, voice: str, speed: int, pitch: int) -> Item:
    text = SPOKEN_TEXT.get(label, label)
    key = f"{_slug(label)}-{_slug(voice)}-s{speed}-p{pitch}"
    raw = out / "raw" / f"{key}.wav"
    raw.parent.mkdir(parents=True, exist_ok=True)
    _speak(text, voice, speed, pitch, raw)
    rel = f"audio/{_slug(label)}/{key}.wav"
    _write_wav(_read_audio(raw, max_seconds=10.0), out / rel)
    raw.unlink()
    extra = {"voice": voice, "speed": speed, "pitch": pitch, "text": text}
    return Item(f"spoken/{key}", rel, "audio", label, f"the spoken word {text}", extra)


def _build_spoken(out: Path, seed: int) -> list[Item]:
    if shutil.which(ESPEAK) is None:
        raise _missing(f"the {ESPEAK} program", ESPEAK_SOURCE)
    jobs = [(label, *v) for label in sorted(CONCEPTS) for v in SPOKEN_VOICES]
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))  # espeak is a subprocess: threads suffice
    with ThreadPoolExecutor(workers) as pool:
        items = list(pool.map(lambda job: _spoken_one(out, *job), jobs))
    shutil.rmtree(out / "raw", ignore_errors=True)
    return items


# --------------------------------------------------------------------------- audio: sounds
LMMS_SOURCE = Source("lmms-common", "apt")
FREEDESKTOP_SOURCE = Source("sound-theme-freedesktop", "apt")
ALSA_SOURCE = Source("alsa-utils", "apt")
SOUND_MAX_SECONDS = 4.0
# (regex on "<source>/<path>", label): first match wins; unmatched files (synth waveforms,
# abstract effects, .ds drumsynth patches that are not audio) are left out.
SOUND_LABELS: tuple[tuple[str, str], ...] = (
    (r"^lmms/drums/(kick|bassdrum|tom)", "drum"),
    (r"^lmms/drums/snare", "snare"),
    (r"^lmms/drums/(hihat|crash|ride)", "cymbal"),
    (r"^lmms/drums/clap", "clap"),
    (r"^lmms/drums/shaker", "shaker"),
    (r"^lmms/beats/", "drum"),
    (r"^lmms/(instruments|latin)/.*guitar", "guitar"),
    (r"^lmms/instruments/(violin|cello)", "violin"),
    (r"^lmms/(instruments|latin)/(trumpet|latin_brass)", "trumpet"),
    (r"^lmms/instruments/(e_)?piano|^lmms/instruments/harpsichord", "piano"),
    (r"^lmms/instruments/(church_|e_)organ", "organ"),
    (r"^lmms/instruments/flute", "flute"),
    (r"^lmms/(basses|bassloops)/|^lmms/instruments/bassslap", "bass"),
    (r"^lmms/misc/applause", "clap"),
    (r"^lmms/misc/(dong|metalish_dong)|^lmms/stringsnpads/bell|^lmms/effects/wind_chimes", "bell"),
    (r"^lmms/misc/metronome", "clock"),
    (r"^lmms/stringsnpads/(strings|orion|heaven|space_strings)", "strings"),
    (r"^lmms/stringsnpads/(chorus|rave_choir)", "choir"),
    (r"^lmms/effects/explode", "explosion"),
    (r"^freedesktop/bell", "bell"),
    (r"^freedesktop/phone-", "phone"),
    (r"^freedesktop/alarm-clock", "clock"),
    (r"^freedesktop/camera-shutter", "camera"),
    (r"^freedesktop/(message|dialog|complete|service|device|suspend|trash)", "alert"),
    (r"^freedesktop/audio-channel-", "person"),  # a human voice naming the speaker
    (r"^alsa/(front|rear|side)_", "person"),  # ditto ("Front Center", ...)
)
SOUND_CAPTIONS: dict[str, str] = {
    "person": "a person speaking",
    "clock": "the ticking or ringing of a clock",
    "phone": "a telephone ringing",
    "camera": "a camera shutter",
    "alert": "a computer notification sound",
    "explosion": "an explosion",
}


def _sound_files() -> list[tuple[str, Path]]:
    """(key "<source>/<relative path>", file) for every sound source; missing ones raise."""
    roots = (
        ("lmms", LMMS_SAMPLES_DIR, LMMS_SOURCE, "the lmms samples"),
        ("freedesktop", FREEDESKTOP_SOUNDS_DIR, FREEDESKTOP_SOURCE, "the freedesktop sounds"),
        ("alsa", ALSA_SOUNDS_DIR, ALSA_SOURCE, "the alsa test sounds"),
    )
    files = []
    for tag, root, source, what in roots:
        _require_dir(root, source, what)
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in (".wav", ".ogg", ".oga", ".flac") and path.is_file():
                files.append((f"{tag}/{path.relative_to(root).as_posix()}", path))
    return files


def sound_label(key: str) -> str | None:
    """The documented label of a sound file (``"lmms/drums/kick01.ogg"`` -> ``"drum"``)."""
    low = key.lower()
    return next((label for rx, label in SOUND_LABELS if re.search(rx, low)), None)


def _build_sounds(out: Path, seed: int) -> list[Item]:
    from mmcompose.errors import MediaError

    items = []
    for key, path in _sound_files():
        label = sound_label(key)
        if label is None:
            continue
        try:
            wave = _read_audio(path, SOUND_MAX_SECONDS)
        except MediaError as exc:
            print(f"mmcompose: skipping {path}: {exc}", file=sys.stderr)
            continue
        rel = f"audio/{label}/{_slug(key)}.wav"
        _write_wav(wave, out / rel)
        caption = SOUND_CAPTIONS.get(label, f"the sound of a {label}")
        items.append(Item(f"sounds/{key}", rel, "audio", label, caption, {"source": str(path)}))
    return items


# --------------------------------------------------------------------------- point: meshes
CGAL_SOURCE = Source("libcgal-demo", "apt")
PYBULLET_SOURCE = Source("pybullet", "pip")
POINTS = 2048
CLOUDS_PER_LABEL = 12  # split evenly over a label's meshes
# (source, path inside CGAL's data.tar.gz or pybullet_data, label)
MESHES: tuple[tuple[str, str, str], ...] = (
    ("cgal", "data/meshes/cow.off", "cow"),
    ("cgal", "data/meshes/bull.off", "bull"),
    ("cgal", "data/meshes/pig.off", "pig"),
    ("cgal", "data/meshes/elephant.off", "elephant"),
    ("cgal", "data/meshes/camel.off", "camel"),
    ("cgal", "data/meshes/bunny00.off", "rabbit"),
    ("pybullet", "bunny.obj", "rabbit"),
    ("cgal", "data/meshes/bear.off", "bear"),
    ("cgal", "data/meshes/lion.off", "lion"),
    ("cgal", "data/meshes/elk.off", "deer"),
    ("cgal", "data/points_3/kitten.off", "cat"),
    ("cgal", "data/meshes/triceratops.off", "dinosaur"),
    ("cgal", "data/meshes/diplodocus.off", "dinosaur"),
    ("cgal", "data/meshes/ChineseDragon-10kv.off", "dragon"),
    ("cgal", "data/points_3/hippo1.ply", "hippopotamus"),
    ("cgal", "data/points_3/hippo2.ply", "hippopotamus"),
    ("cgal", "data/meshes/armadillo.off", "armadillo"),
    ("cgal", "data/meshes/mushroom.off", "mushroom"),
    ("cgal", "data/meshes/cactus.off", "cactus"),
    ("cgal", "data/meshes/helmet.off", "helmet"),
    ("cgal", "data/meshes/hand.off", "hand"),
    ("cgal", "data/meshes/boeing.off", "airplane"),
    ("cgal", "data/meshes/anchor.off", "anchor"),
    ("cgal", "data/meshes/femur.off", "bone"),
    ("cgal", "data/meshes/pinion.off", "gear"),
    ("cgal", "data/meshes/knot.off", "knot"),
    ("cgal", "data/meshes/man.off", "person"),
    ("cgal", "data/meshes/homer.off", "person"),
    ("pybullet", "duck.obj", "duck"),
    ("pybullet", "objects/mug.obj", "cup"),
    ("pybullet", "teddy2_VHACD_CHs.obj", "teddy"),
    ("pybullet", "soccerball.obj", "ball"),
    ("pybullet", "sphere_smooth.obj", "ball"),
    ("pybullet", "torus/torus_textured.obj", "doughnut"),
    ("pybullet", "lego/lego.obj", "brick"),
    ("pybullet", "racecar/meshes/left_front_wheel.obj", "wheel"),
)


def _cgal_tarball() -> Path:
    for path in CGAL_DATA_TARBALLS:
        if path.is_file():
            return path
    raise _missing("CGAL's demo data (data.tar.gz)", CGAL_SOURCE)


def _pybullet_dir() -> Path:
    if PYBULLET_DATA_DIR is not None:
        return _require_dir(PYBULLET_DATA_DIR, PYBULLET_SOURCE, "pybullet_data")
    spec = importlib.util.find_spec("pybullet_data")
    if spec is None or not spec.submodule_search_locations:
        raise _missing("the pybullet_data meshes", PYBULLET_SOURCE)
    return Path(next(iter(spec.submodule_search_locations)))


def _load_geometry(path: Path) -> np.ndarray | Any:
    """A trimesh mesh with faces, or the (N, 3) vertices of a point set."""
    import trimesh

    geom = trimesh.load(str(path), process=False)
    if isinstance(geom, trimesh.Scene):
        geom = geom.to_geometry()
    if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0 and geom.area > 0:
        return geom
    vertices = np.asarray(geom.vertices, dtype=np.float64)
    if len(vertices) == 0:
        raise MMComposeError(f"mesh file {path} holds no geometry", hint="reinstall its package")
    return vertices


def augment_cloud(geom: Any, rng: np.random.Generator, n: int = POINTS) -> np.ndarray:
    """Sample ``n`` points, centre and scale into the unit sphere, then rotate about z, scale
    each axis by 0.8-1.2 and jitter (sigma 0.01, clipped at 0.03): pose/scale/noise variety
    so a classifier cannot memorise one fixed sampling of the shape."""
    from mmcompose.model.media import sample_points

    if isinstance(geom, np.ndarray):
        pts = geom[rng.choice(len(geom), size=n, replace=len(geom) < n)]
    else:
        pts = sample_points(geom, n, seed=int(rng.integers(2**31)))[:, :3].astype(np.float64)
    pts = pts - pts.mean(axis=0)
    pts /= max(np.linalg.norm(pts, axis=1).max(), 1e-12)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    pts = (pts @ rot.T) * rng.uniform(0.8, 1.2, size=3)
    pts += np.clip(rng.normal(0.0, 0.01, size=pts.shape), -0.03, 0.03)
    return pts.astype(np.float32)


def _mesh_files(out: Path) -> list[tuple[str, Path, str]]:
    """(source path, local file, label) for MESHES; CGAL's tarball is unpacked into ``out``."""
    tarball, bullet = _cgal_tarball(), _pybullet_dir()
    wanted = {p for src, p, _ in MESHES if src == "cgal"}
    scratch = out / "scratch"
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.lstrip("./") in wanted and m.isfile()]
        tar.extractall(scratch, members=members, filter="data")
    files = []
    for src, rel, label in MESHES:
        local = scratch / rel if src == "cgal" else bullet / rel
        if not local.is_file():
            print(f"mmcompose: mesh {src}:{rel} not found, skipping", file=sys.stderr)
            continue
        files.append((f"{src}:{rel}", local, label))
    return files


def _build_meshes(out: Path, seed: int) -> list[Item]:
    files = _mesh_files(out)
    per_label = Counter(label for _, _, label in files)
    items = []
    for key, local, label in files:
        geom = _load_geometry(local)
        count = math.ceil(CLOUDS_PER_LABEL / per_label[label])
        name = _slug(Path(key.split(":", 1)[1]).stem)
        for k in range(count):
            cloud = augment_cloud(geom, _rng(seed, key, k))
            rel = f"points/{label}/{name}-{k:02d}.npy"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / rel, cloud)
            caption = f"a point cloud of a {label}"
            items.append(Item(f"meshes/{key}#{k}", rel, "point", label, caption, {"mesh": key}))
    shutil.rmtree(out / "scratch", ignore_errors=True)
    return items


# --------------------------------------------------------------------------- video: clips
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
    for root in (OPENCV_DATA_DIR, OPENCV_HTML_DIR):
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
        stem = _slug(name.removesuffix(".gz").rsplit(".", 1)[0])
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
        recs = sorted(by_label[label], key=lambda r: _hash_int(seed, "clip", r["id"]))
        for k in range(CLIPS_PER_LABEL):
            rec, kind = recs[k % len(recs)], kinds[k % len(kinds)]
            with Image.open(rec["path"]) as img:
                img.load()
                frames = pan_zoom_frames(img, kind, _rng(seed, "clip", rec["id"], k))
            rel = f"videos/{label}/panzoom-{_slug(rec['id'])}-{k}.mp4"
            _write_mp4(frames, out / rel, fps=CLIP_FPS)
            caption = (
                f"{'a camera panning over' if kind == 'pan' else kind + ' on'} {rec['caption']}"
            )
            extra = {"image": rec["id"], "motion": kind}
            items.append(
                Item(f"clips/panzoom/{rec['id']}#{k}", rel, "video", label, caption, extra)
            )
    return items


def _build_clips(out: Path, seed: int) -> list[Item]:
    _require_dir(OPENCV_DATA_DIR, OPENCV_SOURCE, "opencv-doc's sample videos")
    image_dirs = {name: _prepare_one(name, False, False, seed) for name in IMAGE_DATASETS}
    return _real_clips(out) + _pan_zoom_clips(out, seed, image_dirs)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its modality, how to build it, and the packages it reads."""

    name: str
    modality: str
    build: Callable[[Path, int], list[Item]]
    sources: tuple[Source, ...]
    note: str = ""


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("emoji", "image", _build_emoji, (EMOJI_SOURCE,)),
        DatasetSpec(
            "openclipart",
            "image",
            _build_openclipart,
            (OPENCLIPART_SOURCE,),
            f"labels from folders and file-name words; at most {CLIPART_PER_LABEL} per label",
        ),
        DatasetSpec("photos", "image", _build_photos, (OPENCV_SOURCE, SKIMAGE_SOURCE)),
        DatasetSpec("spoken", "audio", _build_spoken, (ESPEAK_SOURCE,)),
        DatasetSpec(
            "sounds",
            "audio",
            _build_sounds,
            (LMMS_SOURCE, FREEDESKTOP_SOURCE, ALSA_SOURCE),
            f"first {SOUND_MAX_SECONDS:g} s of each sound; labels from SOUND_LABELS",
        ),
        DatasetSpec(
            "meshes",
            "point",
            _build_meshes,
            (CGAL_SOURCE, PYBULLET_SOURCE),
            "each label has 1-3 meshes and poses are split per cloud, so val/test clouds are new "
            "samplings and poses of meshes also seen in train: it measures recognition, not "
            "unseen-shape generalisation",
        ),
        DatasetSpec(
            "clips",
            "video",
            _build_clips,
            (OPENCV_SOURCE,),
            "opencv-doc video segments plus pan/zoom clips over the emoji, openclipart and "
            "photos items; clips of one video or image share a split unless it is their "
            "label's only source",
        ),
    )
}


def dataset_dir(name: str) -> Path:
    """Where dataset ``name`` is (or would be) prepared; does not prepare it."""
    _spec(name)
    return cache_dir() / "datasets" / name


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown dataset {name!r}", hint=f"choose from: {', '.join(DATASETS)}"
        ) from None


def read_items(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a prepared dataset's ``manifest.jsonl``."""
    with open(Path(folder) / ITEMS_NAME, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _is_complete(folder: Path, spec: DatasetSpec, seed: int) -> bool:
    """Meta present (written last), same format and seed, and the item list still there.

    The split version is not checked here: an older split only needs its manifest rewritten
    (:func:`_resplit`), not its files rebuilt.
    """
    meta = read_json(folder / MANIFEST_NAME)
    return (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and meta.get("name") == spec.name
        and meta.get("seed") == seed
        and (folder / ITEMS_NAME).is_file()
    )


def _apply_splits(
    name: str, records: list[dict[str, Any]], files: Mapping[str, Path], seed: int
) -> None:
    """Set every record's ``split`` in place: a pure function of the records and file bytes,
    so a fresh build and a re-split of an old cache give the same manifest."""
    groups = split_groups(name, records, files)
    splits = assign_splits([(r["id"], r["label"], groups[r["id"]]) for r in records], seed)
    for rec in records:
        rec["split"] = splits[rec["id"]]


def _records(
    name: str, items: list[Item], final: Path, tmp: Path, seed: int
) -> list[dict[str, Any]]:
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise MMComposeError(f"duplicate item id {dup!r} while building a dataset")
    ordered = sorted(items, key=lambda i: i.id)
    records = [
        {
            "id": i.id,
            "path": str(final / i.rel),
            "modality": i.modality,
            "label": i.label,
            "caption": i.caption,
            "split": "",
            **i.extra,
        }
        for i in ordered
    ]
    _apply_splits(name, records, {i.id: tmp / i.rel for i in ordered}, seed)
    return records


SPLIT_RULE = (
    f"per label, groups (byte-identical files; clips of one source video or image) in "
    f"sha256(seed, group) order: ceil({HELD_OUT_PERCENT}%) of the label's items to test, as "
    f"many to val (fewer if train would drop below half), the rest train; 2 items: 1 train + "
    f"1 test; 1 item: train"
)


def _split_meta(records: list[dict[str, Any]]) -> dict[str, Any]:
    labels: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        labels[rec["label"]][rec["split"]] += 1
    return {
        "split_version": SPLIT_VERSION,
        "split_rule": SPLIT_RULE,
        "counts": dict(Counter(r["split"] for r in records)),
        "labels": {k: dict(v) for k, v in sorted(labels.items())},
    }


def _folder_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def _meta(spec: DatasetSpec, records: list[dict[str, Any]], tmp: Path, seed: int) -> dict:
    import mmcompose

    return {
        "format": FORMAT,
        "kind": "dataset",
        "name": spec.name,
        "modality": spec.modality,
        "seed": seed,
        "sources": [
            {"package": s.package, "manager": s.manager, "version": s.version()}
            for s in spec.sources
        ],
        "num_items": len(records),
        **_split_meta(records),
        "bytes": _folder_bytes(tmp),
        "note": spec.note,
        "created_with": {"mmcompose": getattr(mmcompose, "__version__", "unknown")},
    }


def _write_items(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _resplit(folder: Path, spec: DatasetSpec, seed: int) -> dict | None:
    """Rewrite a complete dataset's split under the current rule, files untouched (espeak,
    meshes and videos are slow to redo); idempotent. Returns the new meta, or None when a
    listed file is gone (the caller then rebuilds).

    manifest.jsonl is replaced first and the meta (with the new ``split_version``) last, so an
    interruption in between only makes the next call re-split again, to the same result.
    """
    meta = read_json(folder / MANIFEST_NAME)
    records = read_items(folder)
    files = {r["id"]: Path(r["path"]) for r in records}
    if not records or not all(p.is_file() for p in files.values()):
        return None
    _apply_splits(spec.name, records, files, seed)
    with atomic_file(folder / ITEMS_NAME) as tmp:
        _write_items(tmp, records)
    meta.update(_split_meta(records), bytes=_folder_bytes(folder))
    write_json_atomic(folder / MANIFEST_NAME, meta)
    return meta


def _report(name: str, meta: dict, what: str, seconds: float) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(meta["counts"].items()))
    print(
        f"mmcompose: dataset {name!r} {what}: {meta['num_items']} items ({counts}), "
        f"{len(meta['labels'])} labels, {meta['bytes'] / 1e6:.1f} MB, {seconds:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _prepare_one(name: str, force: bool, progress: bool, seed: int) -> Path:
    spec = _spec(name)
    final = dataset_dir(name)
    started = time.perf_counter()
    if not force and _is_complete(final, spec, seed):
        if read_json(final / MANIFEST_NAME).get("split_version") == SPLIT_VERSION:
            return final
        meta = _resplit(final, spec, seed)
        if meta is not None:
            if progress:
                _report(name, meta, "re-split", time.perf_counter() - started)
            return final
    if progress:
        print(f"mmcompose: preparing dataset {name!r} into {final}", file=sys.stderr, flush=True)
    with atomic_dir(final, overwrite=True) as tmp:
        items = spec.build(tmp, seed)
        if not items:
            raise MMComposeError(f"dataset {name!r} came out empty: its sources hold no items")
        records = _records(name, items, final, tmp, seed)
        _write_items(tmp / ITEMS_NAME, records)
        meta = _meta(spec, records, tmp, seed)
        meta["prepare_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(tmp / MANIFEST_NAME, meta)
    if progress:
        _report(name, meta, "ready", meta["prepare_seconds"])
    return final


def concept_table(root: str | os.PathLike[str] | None = None) -> dict[str, dict[str, int]]:
    """label -> {modality: item count} over every prepared dataset under ``root``.

    ``root`` defaults to ``cache_dir()/datasets``. The cross-modal benchmark draws its
    questions from the concepts present in several modalities.
    """
    base = Path(root) if root is not None else cache_dir() / "datasets"
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for name, spec in DATASETS.items():
        folder = base / name
        if not (folder / MANIFEST_NAME).is_file() or not (folder / ITEMS_NAME).is_file():
            continue
        for rec in read_items(folder):
            table[rec["label"]][rec.get("modality", spec.modality)] += 1
    return {label: dict(sorted(c.items())) for label, c in sorted(table.items())}


def _write_concepts(seed: int) -> None:
    table = concept_table()
    multi = sorted(label for label, mods in table.items() if len(mods) >= 3)
    write_json_atomic(
        cache_dir() / "datasets" / CONCEPTS_NAME,
        {"format": FORMAT, "seed": seed, "concepts_in_3_plus_modalities": multi, "table": table},
    )


def _combined_hint(errors: dict[str, MissingAssetError]) -> str:
    """One apt-get and one pip line covering every missing package."""
    apt, pip = [], []
    for err in errors.values():
        hint = err.hint or ""
        if hint.startswith("apt-get install -y "):
            apt.extend(hint.removeprefix("apt-get install -y ").split())
        elif hint.startswith("pip install "):
            pip.extend(hint.removeprefix("pip install ").split())
    lines = []
    if apt:
        lines.append("apt-get install -y " + " ".join(dict.fromkeys(apt)))
    if pip:
        lines.append("pip install " + " ".join(dict.fromkeys(pip)))
    return " && ".join(lines)


def prepare_datasets(
    only: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Path]:
    """Prepare the named datasets (all by default) and return {name: folder}.

    Idempotent: a complete folder with the same seed is returned at once. ``force`` rebuilds.
    Installs nothing: datasets whose sources are missing are skipped while the others are
    prepared, then one :class:`MissingAssetError` names every missing package.
    """
    names = list(DATASETS) if only is None else list(dict.fromkeys(only))
    for name in names:
        _spec(name)
    done: dict[str, Path] = {}
    errors: dict[str, MissingAssetError] = {}
    for name in names:
        try:
            done[name] = _prepare_one(name, force and name not in done, progress, seed)
        except MissingAssetError as exc:
            errors[name] = exc
    if done:
        _write_concepts(seed)
    if errors:
        detail = "; ".join(f"{n}: {e.message}" for n, e in errors.items())
        raise MissingAssetError(
            f"{len(errors)} dataset(s) could not be prepared ({detail})",
            hint=_combined_hint(errors),
        )
    return done
