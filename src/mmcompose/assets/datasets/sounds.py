"""``sounds`` (audio): the lmms samples, freedesktop and alsa sounds that a rule of
``SOUND_LABELS`` labels, cut to ``SOUND_MAX_SECONDS``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mmcompose.assets.datasets.items import Item, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import read_audio, write_wav
from mmcompose.assets.datasets.sources import Source, require_dir

LMMS_SOURCE = Source("lmms-common", "apt")
FREEDESKTOP_SOURCE = Source("sound-theme-freedesktop", "apt")
ALSA_SOURCE = Source("alsa-utils", "apt")
LMMS_SAMPLES_DIR = Path("/usr/share/lmms/samples")
FREEDESKTOP_SOUNDS_DIR = Path("/usr/share/sounds/freedesktop/stereo")
ALSA_SOUNDS_DIR = Path("/usr/share/sounds/alsa")
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
        require_dir(root, source, what)
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in (".wav", ".ogg", ".oga", ".flac") and path.is_file():
                files.append((f"{tag}/{path.relative_to(root).as_posix()}", path))
    return files


def sound_label(key: str) -> str | None:
    """The documented label of a sound file (``"lmms/drums/kick01.ogg"`` -> ``"drum"``)."""
    low = key.lower()
    return next((label for rx, label in SOUND_LABELS if re.search(rx, low)), None)


@register_dataset(
    "sounds",
    "audio",
    (LMMS_SOURCE, FREEDESKTOP_SOURCE, ALSA_SOURCE),
    f"first {SOUND_MAX_SECONDS:g} s of each sound; labels from SOUND_LABELS",
)
def build_sounds(out: Path, seed: int) -> list[Item]:
    from mmcompose.errors import MediaError

    items = []
    for key, path in _sound_files():
        label = sound_label(key)
        if label is None:
            continue
        try:
            wave = read_audio(path, SOUND_MAX_SECONDS)
        except MediaError as exc:
            print(f"mmcompose: skipping {path}: {exc}", file=sys.stderr)
            continue
        rel = f"audio/{label}/{slug(key)}.wav"
        write_wav(wave, out / rel)
        caption = SOUND_CAPTIONS.get(label, f"the sound of a {label}")
        items.append(Item(f"sounds/{key}", rel, "audio", label, caption, {"source": str(path)}))
    return items
