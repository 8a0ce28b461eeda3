"""``spoken`` (audio): every concept's word spoken by espeak-ng in several voices, speeds and
pitches."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmcompose.assets.datasets.concepts import CONCEPTS
from mmcompose.assets.datasets.items import Item, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import read_audio, write_wav
from mmcompose.assets.datasets.sources import Source, missing
from mmcompose.errors import MMComposeError

ESPEAK_SOURCE = Source("espeak-ng", "apt")
ESPEAK = "espeak-ng"
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
SPOKEN_TEXT: dict[str, str] = {"teddy": "teddy bear"}  # what espeak says where the label is short


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
    key = f"{slug(label)}-{slug(voice)}-s{speed}-p{pitch}"
    raw = out / "raw" / f"{key}.wav"
    raw.parent.mkdir(parents=True, exist_ok=True)
    _speak(text, voice, speed, pitch, raw)
    rel = f"audio/{slug(label)}/{key}.wav"
    write_wav(read_audio(raw, max_seconds=10.0), out / rel)
    raw.unlink()
    extra = {"voice": voice, "speed": speed, "pitch": pitch, "text": text}
    return Item(f"spoken/{key}", rel, "audio", label, f"the spoken word {text}", extra)


@register_dataset("spoken", "audio", (ESPEAK_SOURCE,))
def build_spoken(out: Path, seed: int) -> list[Item]:
    if shutil.which(ESPEAK) is None:
        raise missing(f"the {ESPEAK} program", ESPEAK_SOURCE)
    jobs = [(label, *v) for label in sorted(CONCEPTS) for v in SPOKEN_VOICES]
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))  # espeak is a subprocess: threads suffice
    with ThreadPoolExecutor(workers) as pool:
        items = list(pool.map(lambda job: _spoken_one(out, *job), jobs))
    shutil.rmtree(out / "raw", ignore_errors=True)
    return items
