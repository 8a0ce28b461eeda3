"""What every loader shares: supported extensions, the up-front file check, and the
``on_corrupt`` policy for files that cannot be used (fail with a fixable message, or skip
and report)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from mmcompose.errors import MediaError

PathLike = str | os.PathLike[str]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif")
POINT_CLOUD_EXTENSIONS: tuple[str, ...] = (".npy", ".npz", ".ply", ".off", ".obj", ".stl")


# --------------------------------------------------------------------------- shared checks
def _check_file(path: PathLike, kind: str, supported: Sequence[str]) -> Path:
    """Reject missing, non-file, empty and unsupported paths before any decoder sees them, so
    the error says what is wrong instead of surfacing a decoder's cryptic message."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MediaError(
            f"{kind} file not found: {p}",
            hint="check the path (relative paths resolve against the working directory "
            f"{Path.cwd()})",
        )
    if not p.is_file():
        raise MediaError(
            f"{kind} path is not a file: {p}", hint=f"pass the path of one {kind} file"
        )
    suffix = p.suffix.lower()
    if suffix not in supported:
        raise MediaError(
            f"unsupported {kind} file extension {suffix or '(none)'!r}: {p}",
            hint=f"supported extensions: {', '.join(supported)}; convert the file to one of them",
        )
    if p.stat().st_size == 0:
        raise MediaError(f"{kind} file is empty (0 bytes): {p}", hint="re-create or re-download it")
    return p


# --------------------------------------------------------------------------- unreadable files
OnCorrupt = Literal["fail", "skip"]
"""What a dataset reader does with an input file that cannot be used (missing, empty,
truncated, undecodable): ``fail`` raises its :class:`MediaError` (the default), ``skip``
drops the item and reports it. Never silently replaced by another item or resampled."""

SKIP_HINT = "or skip such files: `on_corrupt: skip` (train config), `--on-corrupt skip` (eval)"


class CorruptFileWarning(UserWarning):
    """Unreadable input files were skipped (``on_corrupt: skip``); the message names each."""


def handle_unreadable(
    path: PathLike, error: MediaError, on_corrupt: OnCorrupt, skipped: dict[str, str]
) -> None:
    """Apply the ``on_corrupt`` policy to one failed file: re-raise ``error`` with the path in
    its message and the skip option in its hint, or record ``path -> reason`` in ``skipped``."""
    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    message = error.message if str(path) in error.message else f"{path}: {error.message}"
    if on_corrupt == "fail":
        hint = f"{error.hint}; {SKIP_HINT}" if error.hint else SKIP_HINT
        raise MediaError(message, hint=hint) from error
    skipped[str(path)] = message


def warn_skipped(skipped: Mapping[str, str], context: str) -> None:
    """One warning with the count and every skipped path (and why); nothing if none."""
    if not skipped:
        return
    lines = "".join(f"\n  {reason}" for reason in skipped.values())
    warnings.warn(
        f"{context}: skipped {len(skipped)} unreadable file(s) (on_corrupt: skip):{lines}",
        CorruptFileWarning,
        stacklevel=2,
    )


def _corrupt(kind: str, p: Path, exc: BaseException, hint: str | None = None) -> MediaError:
    return MediaError(
        f"cannot decode {kind} file {p}: {exc}",
        hint=hint or f"the file is corrupt or not really a {p.suffix.lower()} file; re-export it",
    )
