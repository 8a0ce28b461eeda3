"""``captions`` (image): an image-caption retrieval set with several captions per image, built
from the emoji font, the openclipart drawings and the named sample photos.

Why a dataset of its own: the ``emoji`` / ``openclipart`` datasets keep only the concept
vocabulary (~600 images, one caption shared by every drawing of a label), where one test query
is worth 2 points. Here every image that has a usable name is kept (all colour emoji with a
Unicode name, up to ``CLIPART_PER_FOLDER`` drawings per openclipart folder, the photos), and
each gets ``CAPTIONS_PER_IMAGE`` captions made from its name and its category, as COCO has 5
per image. Every caption contains the image's name, and names are unique across the dataset
(an image whose name is already taken is dropped), so no two images share a caption and the
strict CLIP_benchmark ground truth (a caption's own image) is well posed.

Records: one per image; ``caption`` is the first caption (so ``mmcompose align`` can use the
set as is), ``captions`` all of them; ``label`` is the source and category (``emoji:emoticons``,
``openclipart:animals``, ``photos``), which the stratified split holds out per label.

Openclipart names are file names such as ``full_moon_dan_gerhards_01.png`` (title, artist,
truncated to 24 characters): ``clipart_title`` strips the trailing artist (a prefix of one of
``CLIPART_ARTISTS``, which the truncation may cut mid-word), numbers and camel case.
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
import warnings
from collections import defaultdict
from pathlib import Path

from mmcompose.assets.datasets import emoji, openclipart, photos, sources
from mmcompose.assets.datasets.items import Item, hash_int, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import save_png
from mmcompose.assets.datasets.sources import OPENCV_SOURCE, missing

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "CLIPART_PER_FOLDER",
    "EMOJI_BLOCKS",
    "build_captions",
    "clipart_captions",
    "clipart_title",
    "emoji_captions",
    "with_article",
]

CAPTIONS_PER_IMAGE = 3
CLIPART_PER_FOLDER = 10  # a seeded pick per leaf folder: stars and icon themes would dominate
CLIPART_SKIP_TOPS = ("special",)  # gradients and fill patterns: no nameable content
# Unicode blocks holding the colour emoji (single code points; skin tones and ZWJ sequences
# are left out), with the category phrase used in captions.
EMOJI_BLOCKS: tuple[tuple[int, int, str], ...] = (
    (0x2600, 0x26FF, "miscellaneous symbols"),
    (0x2700, 0x27BF, "dingbats"),
    (0x1F300, 0x1F5FF, "symbols and pictographs"),
    (0x1F600, 0x1F64F, "emoticons"),
    (0x1F680, 0x1F6FF, "transport and map symbols"),
    (0x1F900, 0x1F9FF, "supplemental symbols and pictographs"),
    (0x1FA70, 0x1FAFF, "extended pictographs"),
)
# The most frequent openclipart artists (their names end the file names, often truncated).
CLIPART_ARTISTS: tuple[str, ...] = (
    *("architetto francesco rollandin", "benji park", "susan park", "nicu buculei"),
    *("gerald g", "jon phillips", "jarno vasamaa", "peterm", "linda kim", "juliane krug"),
    *("enrique meza c", "jean victor balin", "sergio luiz araujo", "dan gerhards"),
    *("frederic moser", "matt todd", "dave pena", "mauro olivo", "matthew gates"),
    *("anthony liekens", "aj ashton", "toh yen cheng", "fudriot omic ch", "roman bertle"),
    *("patricia fidi", "lumen design studio", "leif lodahl", "guillaume boitel"),
    *("christoph brill", "charles mccolm", "anton yu", "jakob chaosi", "joel montes de oca"),
    *("jonathan dietrich", "nathan eady", "ganson", "mimooh", "jonadab", "snuatautisticido"),
    *("nurbldoff rl", "yves guillou", "frouke", "johnny automatic", "orlando karam"),
    *("utrescu", "astrid graeber", "alejandro tejada", "marcelo caiafa", "andreas nilsson"),
    *("richard torkar", "costea bogdan", "romus", "uliphant", "jaime", "orbu"),
)
_WORD_MAP = {"bw": "black and white"}


def with_article(phrase: str) -> str:
    """``"apple"`` -> ``"an apple"``; phrases starting with a digit or an article are kept."""
    first = phrase.split(" ", 1)[0]
    if first in ("a", "an", "the") or phrase[:1].isdigit():
        return phrase
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def emoji_captions(name: str, block: str) -> list[str]:
    """Captions of one emoji from its lower-case Unicode name and block phrase."""
    return [
        name,
        f"an emoji of {with_article(name)}",
        f"{with_article(name)} emoji from the {block} block",
    ][:CAPTIONS_PER_IMAGE]


def clipart_title(stem: str) -> str | None:
    """A drawing's title from its file name (artist, numbers and camel case removed), or
    None when fewer than 3 letters of real words remain (``70a001``: an icon set's number)."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    words = re.findall(r"[a-z]+|\d+", spaced.lower())
    while words and words[-1].isdigit():
        words.pop()
    for start in range(1, len(words)):
        tail = " ".join(words[start:])
        if len(tail) >= 3 and any(a.startswith(tail) for a in CLIPART_ARTISTS):
            words = words[:start]
            break
    while words and words[-1].isdigit():
        words.pop()
    words = [_WORD_MAP.get(w, w) for w in words]
    if sum(len(w) for w in words if w.isalpha() and len(w) >= 3) < 3:
        return None
    return " ".join(words)


def clipart_category(folders: tuple[str, ...]) -> str:
    """``("animals", "mammals")`` -> ``"mammals (animals)"``; one folder: itself."""
    parts = [re.sub(r"[_\-]+", " ", f).strip() for f in folders]
    return parts[0] if len(parts) == 1 else f"{parts[-1]} ({parts[0]})"


def clipart_captions(title: str, category: str) -> list[str]:
    return [
        title,
        f"a drawing of {with_article(title)}",
        f"{title}, clip art of {category}",
    ][:CAPTIONS_PER_IMAGE]


def _photo_captions(caption: str, label: str, name: str) -> list[str]:
    words = " ".join(re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()))
    return [caption, f"{words}, a sample picture of {with_article(label)}", f"{label}: {caption}"][
        :CAPTIONS_PER_IMAGE
    ]


class _Taken:
    """First captions already used: a second image with the same name is dropped."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.digests: set[str] = set()

    def claim(self, name: str, digest: str | None = None) -> bool:
        if name in self.names or (digest is not None and digest in self.digests):
            return False
        self.names.add(name)
        if digest is not None:
            self.digests.add(digest)
        return True


def _item(key: str, rel: str, label: str, captions: list[str], source: str, cat: str) -> Item:
    extra = {"captions": captions, "source": source, "category": cat}
    return Item(f"captions/{key}", rel, "image", label, captions[0], extra)


def _emoji_items(out: Path, taken: _Taken) -> list[Item]:
    from PIL import Image, ImageDraw, ImageFont

    if not emoji.EMOJI_FONT.is_file():
        raise missing(f"the emoji font {emoji.EMOJI_FONT}", emoji.EMOJI_SOURCE)
    font = ImageFont.truetype(str(emoji.EMOJI_FONT), emoji.EMOJI_SIZE)
    items = []
    for lo, hi, block in EMOJI_BLOCKS:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "").lower()
            if not name:
                continue
            img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(img).text((0, 0), chr(cp), font=font, embedded_color=True)
            box = img.getbbox()
            if box is None or not taken.claim(name):  # no glyph in the font, or a name clash
                continue
            rel = f"images/emoji/{slug(name)}.png"
            save_png(img.crop(box), out / rel)
            caps = emoji_captions(name, block)
            items.append(_item(f"emoji/{slug(name)}", rel, f"emoji:{block}", caps, "emoji", block))
    return items


def _photo_items(out: Path, taken: _Taken) -> list[Item]:
    from PIL import Image

    items = []
    root = sources.OPENCV_DATA_DIR
    for name, (label, caption) in photos.OPENCV_PHOTOS.items():
        if not (root / name).is_file() or not taken.claim(caption):
            continue
        with Image.open(root / name) as img:
            rel = f"images/photos/opencv-{slug(Path(name).stem)}.png"
            save_png(img.convert("RGB"), out / rel)
        caps = _photo_captions(caption, label, Path(name).stem)
        items.append(_item(f"photos/opencv/{name}", rel, "photos", caps, "photos", label))
    for name, img in photos._skimage_images():
        label, caption = photos.SKIMAGE_PHOTOS[name]
        if not taken.claim(caption):
            continue
        rel = f"images/photos/skimage-{name}.png"
        save_png(img, out / rel)
        caps = _photo_captions(caption, label, name)
        items.append(_item(f"photos/skimage/{name}", rel, "photos", caps, "photos", label))
    return items


def _clipart_items(out: Path, seed: int, taken: _Taken) -> list[Item]:
    from PIL import Image

    root = openclipart.OPENCLIPART_DIR
    if not root.is_dir() or not any(root.iterdir()):
        raise missing(f"the openclipart PNGs ({root})", openclipart.OPENCLIPART_SOURCE)
    by_folder: dict[tuple[str, ...], list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.png")):
        parts = path.relative_to(root).parts
        if len(parts) > 1 and parts[0] not in CLIPART_SKIP_TOPS:
            by_folder[parts[:-1]].append(path)
    items = []
    for folders in sorted(by_folder):
        paths = sorted(by_folder[folders], key=lambda p: hash_int(seed, p.relative_to(root)))
        kept = 0
        for path in paths:
            if kept == CLIPART_PER_FOLDER:
                break
            title = clipart_title(path.stem)
            if title is None or title in taken.names:
                continue
            rel_src = path.relative_to(root).as_posix()
            try:
                data = path.read_bytes()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(path)
                with img:
                    if img.width * img.height > openclipart.CLIPART_MAX_PIXELS:
                        continue
                    img.load()
                    if not taken.claim(title, hashlib.sha256(data).hexdigest()):
                        continue  # a byte-identical copy under another folder
                    rel = f"images/openclipart/{slug(rel_src.removesuffix('.png'))}.png"
                    save_png(img.convert("RGBA"), out / rel)
            except (OSError, ValueError) as exc:
                print(f"mmcompose: skipping unreadable {path}: {exc}", file=sys.stderr)
                continue
            category = clipart_category(folders)
            caps = clipart_captions(title, category)
            label = f"openclipart:{folders[0]}"
            items.append(_item(f"openclipart/{rel_src}", rel, label, caps, "openclipart", category))
            kept += 1
    return items


@register_dataset(
    "captions",
    "image",
    (emoji.EMOJI_SOURCE, openclipart.OPENCLIPART_SOURCE, OPENCV_SOURCE, photos.SKIMAGE_SOURCE),
    f"image-caption retrieval: {CAPTIONS_PER_IMAGE} captions per image from names and "
    f"categories (record field 'captions'); all named colour emoji, at most "
    f"{CLIPART_PER_FOLDER} drawings per openclipart folder, the sample photos; names unique",
)
def build_captions(out: Path, seed: int) -> list[Item]:
    taken = _Taken()
    # Order decides who keeps a name shared by two sources: emoji, then photos, then drawings.
    items = _emoji_items(out, taken)
    if sources.OPENCV_DATA_DIR.is_dir():
        items += _photo_items(out, taken)
    return items + _clipart_items(out, seed, taken)
