"""Stages and the cache: a stage's entry is found again while its key is unchanged, computed
anew when an input changes, and never left half-written by a failure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mmcompose.fs import atomic_dir
from mmcompose.pipeline import Cache, Stage, digest, file_digest, run_stages


def test_digest_is_order_free_json_and_stable():
    a = digest({"x": 1, "y": [1, 2]}, "v")
    assert a == digest({"y": [1, 2], "x": 1}, "v")  # key order does not matter
    assert a != digest({"x": 1, "y": [2, 1]}, "v") and a != digest({"x": 1, "y": [1, 2]}, "w")
    assert digest(Path("/a/b")) == digest("/a/b")
    expected = hashlib.sha256(json.dumps("naive").encode()).hexdigest()[:16]
    assert digest("naive") == expected and len(a) == 16


def test_file_digest_is_by_content(tmp_path):
    (tmp_path / "a").write_text("same")
    (tmp_path / "b").write_text("same")
    assert file_digest(tmp_path / "a") == file_digest(tmp_path / "b")
    assert file_digest(tmp_path / "a") == hashlib.sha256(b"same").hexdigest()[:16]


def test_stages_run_in_order_and_pass_outputs_along():
    logs: list[str] = []
    timings: dict[str, float] = {}
    stages = [
        Stage("a", lambda ctx: ctx + 1, title="first"),
        Stage("b", lambda ctx, a: a * 10, ("a",)),
        Stage("c", lambda ctx, a, b: (a, b), ("a", "b"), timed=False),
    ]
    out = run_stages(stages, 1, timings=timings, log=logs.append, tag="t")
    assert out == {"a": 2, "b": 20, "c": (2, 20)}
    assert list(timings) == ["first", "b"] and all(v >= 0 for v in timings.values())
    assert logs[0] == "[t] first ..." and logs[1].startswith("[t] first: ")
    assert len(logs) == 4  # the untimed stage logs nothing


def test_wiring_is_checked_before_anything_runs():
    ran = []
    first = Stage("a", lambda ctx: ran.append("a"))
    with pytest.raises(ValueError, match=r"'b'.*come from no earlier stage"):
        run_stages([first, Stage("b", lambda ctx, x: x, ("x",))], None, log=lambda _: None)
    with pytest.raises(ValueError, match="repeated name"):
        run_stages([first, first], None, log=lambda _: None)
    assert ran == []


def test_a_failing_stage_is_timed_and_stops_the_run():
    ran, timings = [], {}

    def boom(ctx):
        raise KeyError("x")

    stages = [Stage("a", boom), Stage("b", lambda ctx: ran.append("b"))]
    with pytest.raises(KeyError):
        run_stages(stages, None, timings=timings, log=lambda _: None)
    assert list(timings) == ["a"] and ran == []


def _doubling_pipeline(cache: Cache, counter: list[int]) -> list[Stage]:
    """A two-stage job: the second stage's entry is keyed by the first stage's output."""

    def compute(x: int) -> dict:
        counter.append(x)
        return {"double": 2 * x}

    def double(ctx: int, x: int) -> int:
        return cache.json("doubles", "x", digest(x), lambda: compute(x), label="double")["double"]

    return [Stage("x", lambda ctx: ctx), Stage("double", double, ("x",))]


def test_a_stage_is_skipped_while_its_key_is_unchanged_and_recomputed_when_an_input_changes(
    tmp_path,
):
    counter: list[int] = []
    logs: list[str] = []
    cache = Cache(tmp_path, log=logs.append)
    stages = _doubling_pipeline(cache, counter)
    quiet = {"log": lambda _: None}
    assert run_stages(stages, 3, **quiet)["double"] == 6
    assert run_stages(stages, 3, **quiet)["double"] == 6
    assert counter == [3] and (cache.hits, cache.misses) == (1, 1)
    assert logs[0] == "  double ..." and logs[1].startswith("  double: computed in ")
    assert logs[2] == "  double: cached"
    assert run_stages(stages, 4, **quiet)["double"] == 8  # another input: another entry
    assert counter == [3, 4]
    assert run_stages(stages, 3, **quiet)["double"] == 6 and counter == [3, 4]  # still there
    assert sorted(p.name for p in (tmp_path / "doubles").iterdir()) == sorted(
        [f"x-{digest(3)}.json", f"x-{digest(4)}.json"]
    )


def test_a_failed_json_entry_leaves_nothing_and_a_truncated_one_counts_as_absent(tmp_path):
    cache = Cache(tmp_path, log=lambda _: None)

    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.json("g", "n", "k", boom)
    assert not (tmp_path / "g").exists() or list((tmp_path / "g").iterdir()) == []
    path = cache.path("g", "n", "k", ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"half": ')  # e.g. written by a tool that was killed
    assert cache.json("g", "n", "k", lambda: {"whole": 1}) == {"whole": 1}
    assert json.loads(path.read_text()) == {"whole": 1}


def test_folder_entries_are_built_once_and_atomically(tmp_path):
    cache = Cache(tmp_path, log=lambda _: None)
    built = []

    def build(folder: Path) -> None:
        built.append(folder)
        (folder / "part.bin").write_bytes(b"1")
        (folder / "config.json").write_text("{}")

    path = cache.folder("models", "m", "k1", build)
    assert path == tmp_path / "models" / "m-k1" and (path / "part.bin").read_bytes() == b"1"
    assert built[0] != path  # written under a temporary name, renamed when complete
    assert cache.folder("models", "m", "k1", build) == path and len(built) == 1

    def half(folder: Path) -> None:
        (folder / "part.bin").write_bytes(b"1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.folder("models", "m", "k2", half)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m-k1"]


def test_in_place_builders_get_the_final_path_and_must_finish_it(tmp_path):
    cache = Cache(tmp_path, log=lambda _: None)

    def writer(folder: Path) -> None:  # as train / compose / build_mcub write
        with atomic_dir(folder, overwrite=True) as tmp:
            (tmp / "set.json").write_text("[]")

    path = cache.folder("mcub", "test", "k", writer, done="set.json", in_place=True)
    assert (path / "set.json").is_file()

    def forgetful(folder: Path) -> None:
        folder.mkdir()

    with pytest.raises(RuntimeError, match=r"wrote no config\.json"):
        cache.folder("mcub", "val", "k", forgetful, in_place=True)
