"""``emoji`` (image): the vocabulary's emoji rendered from the Noto colour emoji font."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from mmcompose.assets.datasets.concepts import CONCEPTS
from mmcompose.assets.datasets.items import Item, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import save_png
from mmcompose.assets.datasets.sources import Source, missing

EMOJI_SOURCE = Source("fonts-noto-color-emoji", "apt")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
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


@register_dataset("emoji", "image", (EMOJI_SOURCE,))
def build_emoji(out: Path, seed: int) -> list[Item]:
    from PIL import Image, ImageDraw, ImageFont

    if not EMOJI_FONT.is_file():
        raise missing(f"the emoji font {EMOJI_FONT}", EMOJI_SOURCE)
    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_SIZE)
    items = []
    for label, char, name in _emoji_chars():
        img = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
        ImageDraw.Draw(img).text((0, 0), char, font=font, embedded_color=True)
        box = img.getbbox()
        if box is None:  # the font lacks this glyph
            continue
        rel = f"images/{slug(name)}.png"
        save_png(img.crop(box), out / rel)
        items.append(Item(f"emoji/{slug(name)}", rel, "image", label, name))
    return items
