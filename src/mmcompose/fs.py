"""Atomic outputs: nothing half-written ever appears at an output path.

Every folder or file the project produces is built under a temporary sibling name and renamed
into place only once complete, so a crash, an exception or Ctrl-C never leaves a truncated
model folder where a reader would take it for a finished one, and never damages the previous
output. A final rename never replaces something that appeared while the work ran (unless
replacing was asked for), and :func:`exclusive` keeps a second writer of one path out.

``MMCOMPOSE_FAULT`` (tests only) names a point at which the process kills itself with SIGKILL,
see :func:`fault_point`; unset, the points cost one comparison.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcompose.errors import MMComposeError

__all__ = [
    "BusyError",
    "OutputExistsError",
    "atomic_dir",
    "atomic_file",
    "atomic_path",
    "exclusive",
    "fault_point",
    "read_json",
    "sha256_file",
    "write_json_atomic",
]


class OutputExistsError(MMComposeError):
    """The output path exists and overwriting was not asked for."""


class BusyError(MMComposeError):
    """Another process is writing the same path (it holds the lock)."""


# ----------------------------------------------------------------------------- fault injection
_FAULT = os.environ.get("MMCOMPOSE_FAULT") or None
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here if ``MMCOMPOSE_FAULT`` names this point.

    For the kill -9 tests: ``MMCOMPOSE_FAULT=NAME`` kills the first time the code passes
    ``fault_point(NAME)``, ``NAME#N`` the N-th time. ``open:FILE`` kills when the process opens
    a file named FILE for writing. Points: ``begin:``/``commit:``/``committed:`` + the final
    name in :func:`atomic_dir` (temporary made / before / after the final rename), ``replace:``
    + name in the atomic file writers, ``checkpoint:tensors`` and the vector stores' add steps.
    """
    if _FAULT is None:
        return
    point, _, nth = _FAULT.partition("#")
    if name != point:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_on_open(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or len(args) < 3:
        return
    path, flags = args[0], args[2]
    writes = isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
    if writes and isinstance(path, (str, bytes, os.PathLike)):
        fault_point("open:" + os.path.basename(os.fsdecode(path)))


if _FAULT is not None and _FAULT.startswith("open:"):  # an audit hook only when asked for
    sys.addaudithook(_fault_on_open)


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


_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)


@functools.cache
def _renameat2_fn() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the platform or filesystem lacks it, OSError otherwise."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or filesystem cannot do it, so the caller falls back to the
    two-rename dance. With the swap, readers of ``b`` never see it missing.
    """
    try:
        return _renameat2(a, b, _RENAME_EXCHANGE)
    except FileNotFoundError:
        return False


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError, and nothing moved, if ``dst`` exists.

    Atomic with ``RENAME_NOREPLACE``. Elsewhere: a file is hard-linked (which refuses an
    existing name) then unlinked; a folder is renamed after a check, and a rename onto a
    non-empty folder or a file fails anyway, so only an empty folder made in that instant
    could be replaced.
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):  # EEXIST raises FileExistsError
        return
    if src.is_dir() and not src.is_symlink():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise
        return
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``final``; replace what is there only if ``overwrite``.

    Without ``overwrite`` the rename refuses an existing ``final`` (OutputExistsError), also
    one that another process wrote while this one worked: its result is never lost. With it:
    swap atomically where the OS can; else rename the old one away, the new one in, and only
    then delete the old one -- restoring the old one if the second rename fails, so a failed
    replace never loses the previous good copy.
    """
    try:
        _rename_noreplace(tmp, final)
        return
    except FileExistsError:
        if not overwrite:
            raise OutputExistsError(
                f"output path {final} appeared while this command was running (another "
                "process wrote it); it was left as it is",
                hint="choose another path, or pass --force to replace it",
            ) from None
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
    check_creatable(path)


def check_creatable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`MMComposeError` if ``path`` (or its temporary sibling) cannot be created:
    an ancestor is a file, or the nearest existing folder is not writable. Checked before long
    work, so a bad ``-o`` fails at once instead of after the work, at the final rename."""
    parent = Path(os.path.abspath(path)).parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise MMComposeError(
            f"cannot create {path}: {parent} is a file, not a folder",
            hint="choose an output path inside a folder",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MMComposeError(
            f"cannot write in {parent} to create {path} (permission denied)",
            hint="choose an output path in a folder you can write to",
        )


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an unused sibling path of ``final`` for the body to create (a folder whose maker
    insists on creating it, such as a vector store); on success rename it into place.

    An existing ``final`` is refused (:class:`OutputExistsError`) unless ``overwrite``, before
    the body and again by the final rename, which never replaces a ``final`` that appeared
    meanwhile. On any exception (KeyboardInterrupt included) what the body made is removed and
    an existing ``final`` is left untouched. With ``overwrite`` an existing ``final`` is
    replaced only after the body succeeded (concurrent writers: last wins, each complete).
    A process killed with SIGKILL can leave a ``.<name>.tmp-*`` sibling behind; it is never
    mistaken for ``final``.
    """
    final = Path(final)
    refuse_existing(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        fault_point(f"commit:{final.name}")
        _commit(tmp, final, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    fault_point(f"committed:{final.name}")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``final``; on success rename it into place.

    As :func:`atomic_path` (refusal, no-replace final rename, cleanup on errors), with the
    folder made before the body runs.
    """
    with atomic_path(final, overwrite) as tmp:
        tmp.mkdir()  # not mkdtemp: that forces mode 0700, this honours the umask like any folder
        fault_point(f"begin:{Path(final).name}")
        yield tmp


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; ``os.replace`` it over ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(final, "tmp")
    try:
        yield tmp
        fault_point(f"replace:{final.name}")
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
        fault_point(f"replace:{path.name}")
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


# ----------------------------------------------------------------------------- one writer
def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def exclusive(
    path: str | os.PathLike[str], *, wait: bool = False, what: str = "output", enabled: bool = True
) -> Iterator[None]:
    """Hold the one-writer lock of ``path`` for the block (``path`` need not exist).

    An advisory ``flock`` on the hidden sibling ``.<name>.lock``, which names the holder's pid.
    A second process either waits (``wait``) or gets :class:`BusyError` naming the holder. The
    kernel drops a lock when its process dies, kill -9 included, so no lock outlives a crash.
    The lock file is deleted on release; an acquirer that finds its file deleted or replaced
    meanwhile retries on the new one, so deleting never lets two holders in. Not reentrant: a
    process that takes the lock of one path twice refuses (or waits for) itself. ``enabled``
    False does nothing (ranks other than 0 of a distributed run, which rank 0 speaks for).
    """
    if not enabled:
        yield
        return
    lock = _lock_file(Path(path))
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MMComposeError(
            f"cannot create {lock.parent} for the {what} {path}: {exc.strerror}",
            hint="choose a path in a folder you can write to",
        ) from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise MMComposeError(
                f"cannot write the lock file {lock} for the {what} {path}: {exc.strerror}",
                hint="choose a path in a folder you can write to",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(
                f"another mmcompose process (pid {holder}) is writing the {what} {path}",
                hint="wait for it to finish, or use another path",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited for deleted this file: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # still holding the lock: nobody else owns this file
        os.close(fd)  # releases the lock
