"""Atomic outputs: nothing half-written ever appears at an output path.

Every folder or file the project produces is built under a temporary sibling name and renamed
into place only once complete, so a crash, an exception or Ctrl-C never leaves a truncated
model folder where a reader would take it for a finished one, and never damages the previous
output.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcompose.errors import MMComposeError

__all__ = [
    "OutputExistsError",
    "atomic_dir",
    "atomic_file",
    "read_json",
    "sha256_file",
    "write_json_atomic",
]


class OutputExistsError(MMComposeError):
    """The output path exists and overwriting was not asked for."""


def _sibling(final: Path, tag: str) -> Path:
    """A hidden, unique name next to ``final`` (same filesystem, so renames stay atomic)."""
    return final.with_name(f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    """Delete a file, a symlink or a folder tree; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or filesystem cannot do it, so the caller falls back to the
    two-rename dance. With the swap, readers of ``b`` never see it missing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (
        errno.EINVAL,
        errno.ENOSYS,
        errno.ENOTSUP,
        errno.EOPNOTSUPP,
        errno.EXDEV,
        errno.ENOENT,
    ):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _commit(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``, replacing whatever is there only now, at the end.

    Order: try a plain rename (nothing there); else swap atomically where the OS can; else rename
    the old one away, the new one in, and only then delete the old one -- restoring the old one
    if the second rename fails, so a failed replace never loses the previous good copy.
    """
    if not os.path.lexists(final):
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:  # someone else created it meanwhile: replace it below
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
    if _exchange(tmp, final):
        _remove(tmp)  # ``tmp`` now holds the old content
        return
    old = _sibling(final, "old")
    try:
        os.rename(final, old)
    except FileNotFoundError:  # it vanished meanwhile
        os.rename(tmp, final)
        return
    try:
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, final)
        raise
    _remove(old)


def refuse_existing(path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists and may not be replaced; commands
    call it before long work, and :func:`atomic_dir` again before writing."""
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(
            f"output path {path} already exists", hint="choose another path or pass --force"
        )


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success rename it into place.

    An existing ``final`` is refused (:class:`OutputExistsError`) unless ``overwrite``.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and an existing
    ``final`` is left untouched. An existing ``final`` is replaced only after the body succeeded.
    Concurrent writers are last-writer-wins, each result complete. A process killed with SIGKILL
    can leave a ``.<name>.tmp-*`` folder behind; it is never mistaken for ``final``.
    """
    final = Path(final)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    tmp.mkdir()  # not mkdtemp: that forces mode 0700, this honours the umask like any folder
    try:
        yield tmp
        _commit(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; ``os.replace`` it over ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temporary file, fsync and ``os.replace``.

    Readers see either the previous file or the complete new one, never a truncated manifest.
    ``Path`` values are written as strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n"
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The parsed JSON at ``path``, or None if it is missing or unreadable (treated as absent)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large weight files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
