"""The atomic-output primitives: nothing half-written at an output path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmcompose import fs
from mmcompose.fs import (
    BusyError,
    OutputExistsError,
    atomic_dir,
    atomic_path,
    exclusive,
    read_json,
    sha256_file,
    write_json_atomic,
)


def _siblings(folder: Path) -> list[str]:
    """Everything next to ``folder`` except itself: leftovers of temporary/old copies."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


# --- atomic_dir ------------------------------------------------------------------------------


def test_atomic_dir_success(tmp_path: Path) -> None:
    final = tmp_path / "out" / "model"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        assert not final.exists()
        (tmp / "w.bin").write_bytes(b"abc")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
    assert (final / "w.bin").read_bytes() == b"abc"
    assert (final / "sub" / "x.txt").read_text() == "x"
    assert _siblings(final) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_error_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    final = tmp_path / "model"
    with pytest.raises(type(exc)), atomic_dir(final) as tmp:
        (tmp / "half.bin").write_bytes(b"half")
        raise exc
    assert not final.exists()
    assert _siblings(final) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_error_keeps_old(tmp_path: Path, exc: BaseException) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(type(exc)), atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
        raise exc
    assert sorted(p.name for p in final.iterdir()) == ["old.bin"]
    assert (final / "old.bin").read_bytes() == b"old"
    assert _siblings(final) == []


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "two-renames"])
def test_atomic_dir_replaces_existing_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: bool
) -> None:
    if not swap:  # force the portable fallback (rename old away, new in, delete old)
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
        assert (final / "old.bin").exists()  # untouched while the body runs
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert _siblings(final) == []


def test_atomic_dir_replaces_a_file(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.write_text("stale file")
    with pytest.raises(OutputExistsError, match="already exists"), atomic_dir(final):
        pass
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert final.is_dir() and (final / "a").read_text() == "a"
    assert _siblings(final) == []


def _appear(final: Path, kind: str) -> None:
    """Another process's output appearing at ``final`` while ours is being built."""
    if kind == "file":
        final.write_text("theirs")
    else:
        final.mkdir()
        if kind == "dir":
            (final / "theirs.bin").write_text("theirs")


@pytest.mark.parametrize(
    ("kind", "noreplace"),
    [("dir", True), ("empty-dir", True), ("file", True), ("dir", False), ("file", False)],
)
def test_atomic_dir_never_replaces_what_appeared_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, noreplace: bool
) -> None:
    """Two runs into one path: the second one's rename fails loudly; the first result stays."""
    if not noreplace:  # no renameat2: the portable fallback (link for files, checked rename)
        monkeypatch.setattr(fs, "_renameat2_fn", lambda: None)
    final = tmp_path / "model"
    with pytest.raises(OutputExistsError, match="appeared") as e, atomic_dir(final) as tmp:
        (tmp / "ours.bin").write_text("ours")
        _appear(final, kind)
    assert "--force" in e.value.hint
    if kind == "file":
        assert final.read_text() == "theirs"
    else:
        assert [p.name for p in final.iterdir()] == (["theirs.bin"] if kind == "dir" else [])
    assert _siblings(final) == []


def test_rename_noreplace_fallback_for_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fs, "_renameat2_fn", lambda: None)
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        fs._rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "a" and (tmp_path / "b").read_text() == "b"
    fs._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


def test_atomic_path_lets_the_body_create_the_folder(tmp_path: Path) -> None:
    final = tmp_path / "store"
    with pytest.raises(RuntimeError), atomic_path(final) as staging:
        assert not staging.exists() and staging.parent == final.parent
        staging.mkdir()
        (staging / "half").write_text("half")
        raise RuntimeError("boom")
    assert not final.exists() and _siblings(final) == []
    with atomic_path(final) as staging:
        staging.mkdir()
        (staging / "data").write_text("whole")
    assert (final / "data").read_text() == "whole" and _siblings(final) == []


# --- one writer at a time ----------------------------------------------------------------------

_HOLD = """
import sys
from mmcompose.fs import exclusive
with exclusive(sys.argv[1], what="model"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _holder(path: Path) -> subprocess.Popen[str]:
    """Another process holding the lock on ``path`` until its stdin gets a line."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_exclusive_refuses_a_second_writer_and_names_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(BusyError, match=f"pid {holder.pid}") as e, exclusive(out):
            pass
        assert str(out) in e.value.message and e.value.hint
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert _siblings(out) == []  # the lock file goes with its holder
    with exclusive(out):  # free again
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())


def test_exclusive_waits_for_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    got = threading.Event()

    def second() -> None:
        with exclusive(out, wait=True):
            got.set()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.5)
    assert not got.is_set()  # blocked while the other process holds it
    holder.communicate("\n", timeout=30)
    t.join(timeout=30)
    assert got.is_set() and _siblings(out) == []


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with exclusive(out):  # the kernel dropped the lock with the process
        pass


def test_a_second_quickstart_on_one_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run
) -> None:
    """Two quickstarts would write the same cached models: the second is refused at once."""
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / "cache"))
    holder = _holder(tmp_path / "cache" / "quickstart")  # what a running quickstart holds
    try:
        r = run("quickstart", "-o", str(tmp_path / "report"))
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
        assert "quickstart cache" in r.stderr and "Traceback" not in r.stderr
    finally:
        holder.communicate("\n", timeout=30)
    assert not (tmp_path / "report").exists()


# --- fault injection ---------------------------------------------------------------------------

_POINTS = """
from pathlib import Path
from mmcompose import fs
fs.fault_point("p")
print("after 1", flush=True)
fs.fault_point("p")
print("after 2", flush=True)
Path("read.txt").write_text("r")
Path("read.txt").read_text()
print("read", flush=True)
Path("x.txt").write_text("x")
print("wrote", flush=True)
"""


@pytest.mark.parametrize(
    ("fault", "lines", "killed"),
    [
        (None, ["after 1", "after 2", "read", "wrote"], False),
        ("p", [], True),
        ("p#2", ["after 1"], True),
        ("open:x.txt", ["after 1", "after 2", "read"], True),
        ("other", ["after 1", "after 2", "read", "wrote"], False),
    ],
)
def test_fault_point_kills_exactly_where_named(
    tmp_path: Path, fault: str | None, lines: list[str], killed: bool
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MMCOMPOSE_FAULT"}
    if fault:
        env["MMCOMPOSE_FAULT"] = fault
    r = subprocess.run(
        [sys.executable, "-c", _POINTS], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert r.stdout.splitlines() == lines
    assert r.returncode == (-signal.SIGKILL if killed else 0), r.stderr
    assert (tmp_path / "x.txt").exists() != killed


# --- JSON and hashing ------------------------------------------------------------------------


def test_write_json_atomic_roundtrip_and_failure_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "m" / "manifest.json"
    write_json_atomic(path, {"a": 1, "p": Path("/x/y"), "s": "é"})
    assert read_json(path) == {"a": 1, "p": "/x/y", "s": "é"}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert read_json(path)["a"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json"]
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "broken.json").write_text("{not json")
    assert read_json(tmp_path / "broken.json") is None


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(tmp_path / "f", chunk=2) == expected
