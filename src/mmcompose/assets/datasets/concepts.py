"""The concept vocabulary shared by every dataset, and the table of which concepts each
prepared dataset holds.

The vocabulary is shared on purpose: the same concept (cow) appears as an emoji, a spoken
word, a mesh and a video, which the cross-modal benchmark needs.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from mmcompose.assets.cache import MANIFEST_NAME, write_json_atomic
from mmcompose.assets.datasets.items import FORMAT, ITEMS_NAME, read_items
from mmcompose.assets.datasets.registry import DATASETS, datasets_root

__all__ = ["CONCEPTS", "CONCEPTS_NAME", "concept_table", "write_concepts"]

CONCEPTS_NAME = "concepts.json"

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


def concept_table(root: str | os.PathLike[str] | None = None) -> dict[str, dict[str, int]]:
    """label -> {modality: item count} over every prepared dataset under ``root``.

    ``root`` defaults to :func:`datasets_root`. The cross-modal benchmark draws its
    questions from the concepts present in several modalities.
    """
    base = Path(root) if root is not None else datasets_root()
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for name in DATASETS:
        spec, folder = DATASETS.get(name), base / name
        if not (folder / MANIFEST_NAME).is_file() or not (folder / ITEMS_NAME).is_file():
            continue
        for rec in read_items(folder):
            table[rec["label"]][rec.get("modality", spec.modality)] += 1
    return {label: dict(sorted(c.items())) for label, c in sorted(table.items())}


def write_concepts(seed: int) -> None:
    """Save :func:`concept_table` with the concepts found in 3+ modalities."""
    table = concept_table()
    multi = sorted(label for label, mods in table.items() if len(mods) >= 3)
    write_json_atomic(
        datasets_root() / CONCEPTS_NAME,
        {"format": FORMAT, "seed": seed, "concepts_in_3_plus_modalities": multi, "table": table},
    )
