"""Named stages run in order, and a cache of the artefacts they make.

A job (the quickstart; a reproduction is the same job with another budget) is a list of
:class:`Stage`: a name, a function and the names of the earlier stages whose outputs it takes.
:func:`run_stages` runs them in order, passes outputs along, times and logs each.

What is expensive inside a stage (a trained model, a composition, one evaluation) is a
:class:`Cache` entry ``<root>/<group>/<name>-<key>`` whose key is the digest of everything it
depends on (configs, data manifests, upstream keys, the package version): an unchanged input
finds the entry again, a changed one gets a new entry. A stage that makes several artefacts
(six models) keys each one, so changing one model's recipe retrains only that model. An entry
exists only complete: a failed or interrupted stage leaves nothing under its name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcompose.fs import atomic_dir, read_json, sha256_file, write_json_atomic

__all__ = ["Cache", "Stage", "digest", "file_digest", "run_stages"]

Log = Callable[[str], None]


def digest(*parts: Any) -> str:
    """16 hex digits of sha256 over the parts as sorted-key JSON (paths and other objects by
    ``str``). The format is what existing caches are keyed by: changing it makes them cold."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """A file's identity for a key: by content, so a rebuilt but identical file keeps it."""
    return sha256_file(path)[:16]


@dataclass(frozen=True)
class Stage:
    """One step of a job: ``run(ctx, *outputs of inputs)``; its return value is its output."""

    name: str  # how later stages name its output
    run: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    title: str = ""  # the log line and timings entry (default: name)
    timed: bool = True  # False: not logged or timed (the step that writes the timings out)


def run_stages(
    stages: Sequence[Stage],
    ctx: Any,
    *,
    timings: dict[str, float] | None = None,
    log: Log = print,
    tag: str = "pipeline",
) -> dict[str, Any]:
    """Run ``stages`` in order; returns every stage's output by name. Each stage's seconds go to
    ``timings[title]`` (also when it fails). The wiring is checked before anything runs, so a
    misnamed input fails at once, not after the stages before it."""
    seen: set[str] = set()
    for st in stages:
        missing = [i for i in st.inputs if i not in seen]
        if missing or st.name in seen:
            why = f"inputs {missing} come from no earlier stage" if missing else "a repeated name"
            raise ValueError(f"stage {st.name!r}: {why}")
        seen.add(st.name)
    timings = {} if timings is None else timings
    outputs: dict[str, Any] = {}
    for st in stages:
        args = [outputs[i] for i in st.inputs]
        if not st.timed:
            outputs[st.name] = st.run(ctx, *args)
            continue
        title = st.title or st.name
        log(f"[{tag}] {title} ...")
        t = time.perf_counter()
        try:
            outputs[st.name] = st.run(ctx, *args)
        finally:
            timings[title] = time.perf_counter() - t
        log(f"[{tag}] {title}: {timings[title]:.1f} s")
    return outputs


class Cache:
    """Entries under ``root``: folders ``<group>/<name>-<key>/`` and files
    ``<group>/<name>-<key>.json``. Entries given a ``label`` log whether they were found
    ("cached") or computed, and how long that took. ``hits`` / ``misses`` count lookups."""

    def __init__(self, root: str | Path, log: Log = print) -> None:
        self.root = Path(root)
        self.log = log
        self.hits = 0
        self.misses = 0

    def path(self, group: str, name: str, key: str, suffix: str = "") -> Path:
        return self.root / group / f"{name}-{key}{suffix}"

    def folder(
        self,
        group: str,
        name: str,
        key: str,
        build: Callable[[Path], object],
        *,
        done: str = "config.json",
        in_place: bool = False,
        label: str | None = None,
    ) -> Path:
        """The entry's folder, built by ``build`` unless it holds ``done`` already.

        ``build(tmp)`` fills a temporary sibling renamed into place on success. With
        ``in_place`` it gets the final path and must write it atomically itself (mmcompose's
        writers do: train, compose, build_mcub), for writers that need the final name (the
        trainer resumes from ``<path>.checkpoint``)."""
        path = self.path(group, name, key)
        if (path / done).is_file():
            self._hit(label)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._computing(label):
            if in_place:
                build(path)
            else:
                with atomic_dir(path, overwrite=True) as tmp:
                    build(tmp)
        if not (path / done).is_file():
            raise RuntimeError(f"cache entry {path}: its builder wrote no {done}")
        return path

    def json(
        self,
        group: str,
        name: str,
        key: str,
        compute: Callable[[], Any],
        *,
        label: str | None = None,
    ) -> Any:
        """The entry's JSON value, computed and written atomically unless present (an
        unreadable file counts as absent)."""
        path = self.path(group, name, key, ".json")
        value = read_json(path)
        if value is not None:
            self._hit(label)
            return value
        with self._computing(label):
            value = compute()
            write_json_atomic(path, value)
        return value

    def _hit(self, label: str | None) -> None:
        self.hits += 1
        if label:
            self.log(f"  {label}: cached")

    @contextlib.contextmanager
    def _computing(self, label: str | None) -> Iterator[None]:
        self.misses += 1
        if label:
            self.log(f"  {label} ...")
        t = time.perf_counter()
        yield
        if label:
            self.log(f"  {label}: computed in {time.perf_counter() - t:.1f} s")
