"""The atomic-output primitives: nothing half-written at an output path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcompose import fs
from mmcompose.fs import OutputExistsError, atomic_dir, read_json, sha256_file, write_json_atomic


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
