"""The packages datasets read from, the error naming the one that is missing, and the
opencv-doc package, which two datasets read (``photos`` its pictures, ``clips`` its videos).

Source paths are module-level so tests can point them at tmp folders with monkeypatch; code
reads them as ``sources.OPENCV_DATA_DIR`` at call time so a patch takes effect.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mmcompose.assets.cache import MissingAssetError

__all__ = [
    "OPENCV_DATA_DIR",
    "OPENCV_HTML_DIR",
    "OPENCV_SOURCE",
    "Source",
    "missing",
    "require_dir",
]


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


def missing(what: str, source: Source) -> MissingAssetError:
    return MissingAssetError(
        f"{what} is missing (it comes from the {source.manager} package {source.package!r})",
        hint=source.install,
    )


def require_dir(path: Path, source: Source, what: str) -> Path:
    if not path.is_dir() or not any(path.iterdir()):
        raise missing(f"{what} ({path})", source)
    return path


OPENCV_SOURCE = Source("opencv-doc", "apt")
OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_HTML_DIR = Path("/usr/share/doc/opencv-doc/opencv4/html")  # box.mp4.gz, cup.mp4.gz
