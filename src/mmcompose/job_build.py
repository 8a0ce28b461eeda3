"""What the composition job's stages build, one function per artefact: an MCUB split, a
search set, the check of the video files, a trained model, a composition, a loaded model.

Each builder writes its output folder the way :meth:`mmcompose.pipeline.Cache.folder`
expects (atomically, complete or not at all); the stages in :mod:`mmcompose.quickstart`
decide what to build and under which key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcompose.quickstart import Job, Model

__all__ = [
    "build_mcub_split",
    "check_videos",
    "compose_fixed",
    "compose_method",
    "compose_naive",
    "compose_searched",
    "compose_unlabelled",
    "file_stamp",
    "first_items",
    "load_model",
    "manifest_paths",
    "readable_copies",
    "train_model",
    "unreadable_videos",
    "video_files",
]


def build_mcub_split(
    manifests: dict[str, Path], split: str, modalities: Sequence[str], path: Path
) -> None:
    """Every MCUB set of ``modalities`` (the whole set and each subset of 3 or more) of one
    split, from the job's manifests."""
    from mmcompose.bench.mcub_build import build_mcub

    build_mcub(
        [str(p) for p in manifests.values()],
        path,
        split=split,
        modalities=list(modalities),
        force=True,
    )


def first_items(files: tuple[Path, Path], limit: int, folder: Path) -> None:
    """The first ``limit`` items of a set (the builder shuffles by seed) as their own files."""
    from mmcompose.fs import write_json_atomic

    for f in files:
        write_json_atomic(folder / f.name, json.loads(f.read_text())[:limit])


# ----------------------------------------------------------------------------- video files
def video_files(manifests: dict[str, Path]) -> list[str]:
    """Every video file the job's manifests name (train, val and test), sorted."""
    from mmcompose.manifest import read_manifest

    return sorted(
        {
            str(r["path"])
            for p in manifests.values()
            for r in read_manifest(p)
            if r["modality"] == "video"
        }
    )


def file_stamp(paths: Sequence[str]) -> list[list[Any]]:
    """(path, size, mtime) per file, so a re-made file gets checked again ("missing": gone)."""
    out: list[list[Any]] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([p, "missing"])
    return out


def unreadable_videos(paths: Sequence[str], num_frames: int) -> dict[str, str]:
    """path -> why, for each video that the video tower's loader cannot read (every frame
    it samples decoded), so a bad clip fails before any training instead of hours later."""
    from mmcompose.errors import MediaError
    from mmcompose.model.media import load_video

    bad: dict[str, str] = {}
    for p in paths:
        try:
            load_video(p, num_frames=num_frames)
        except MediaError as e:
            bad[p] = e.message if p in e.message else f"{p}: {e.message}"
    return bad


def check_videos(
    unreadable: dict[str, str],
    sets: dict[str, tuple[Path, Path]],
    on_corrupt: str,
) -> dict[str, list[str]]:
    """The MCUB items (set name -> ids) that use an unreadable video. ``on_corrupt="fail"``
    raises one error naming each file and the first items using it; ``"skip"`` returns them
    for :func:`readable_copies` to drop (and warns, naming each file)."""
    from mmcompose.bench.mcub import load_mcub
    from mmcompose.errors import MediaError
    from mmcompose.model.media import SKIP_HINT, warn_skipped

    if on_corrupt not in ("fail", "skip"):
        raise ValueError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    if not unreadable:
        return {}
    hits: dict[str, list[str]] = {}
    users: dict[str, list[str]] = {p: [] for p in unreadable}
    for name, (q, a) in sets.items():
        for it in load_mcub(q, a):
            bad = [p for p in it.modal_inputs.get("video", []) if p in unreadable]
            if bad:
                hits.setdefault(name, []).append(it.id)
                for p in bad:
                    users[p].append(it.id)
    if on_corrupt == "fail":
        lines = []
        for p, why in sorted(unreadable.items()):
            used = users[p]
            where = f" (MCUB item {', '.join(used[:3])}{' ...' if len(used) > 3 else ''})"
            lines.append(why + (where if used else " (in a dataset manifest)"))
        raise MediaError(
            f"{len(unreadable)} unreadable video file(s): "
            + "; ".join(lines[:5])
            + (f"; and {len(lines) - 5} more" if len(lines) > 5 else ""),
            hint="re-prepare the dataset (mmcompose assets prepare --force) or "
            + SKIP_HINT.replace("`on_corrupt: skip` (train config)", "--on-corrupt skip"),
        )
    warn_skipped(unreadable, f"MCUB ({sum(map(len, hits.values()))} items dropped)")
    return hits


def readable_copies(
    files: dict[tuple[str, tuple[str, ...]], tuple[Path, Path]],
    drop: dict[str, list[str]],
    folder: Path,
) -> None:
    """Each set of ``files`` ((split, modalities) -> questions, answers) without the items
    ``drop`` names ("split/set name" -> ids), as ``folder/<split>/<file name>``."""
    from mmcompose.bench.mcub_build import set_name
    from mmcompose.fs import write_json_atomic

    for (split, mods), pair in files.items():
        ids = set(drop.get(f"{split}/{set_name(mods)}", []))
        (folder / split).mkdir(exist_ok=True)
        for f in pair:
            items = [it for it in json.loads(f.read_text()) if it["id"] not in ids]
            text = json.dumps(items, indent=1, ensure_ascii=False) + "\n"
            (folder / split / f.name).write_text(text)
    write_json_atomic(folder / "done.json", {"dropped": drop})


def manifest_paths(manifests: dict[str, Path], names: Sequence[str]) -> list[str]:
    """The files of the named datasets' manifests."""
    from mmcompose.manifest import read_manifest

    return [str(r["path"]) for d in names for r in read_manifest(manifests[d])]


# ----------------------------------------------------------------------------- models
def train_model(job: Job, cfg: Any, label: str, path: Path) -> None:
    from mmcompose.train.trainer import train

    r = train(cfg, path, force=True, progress=job.progress)
    job.log(f"  {label}: {r.steps} steps, loss {r.final_loss:.3f}")


def compose_naive(sources: Sequence[Model], path: Path) -> None:
    """NaiveMC: the sources' LoRA deltas averaged (``linear``, weight 1 each, normalised)."""
    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.executor import compose

    cfg = ComposeConfig.model_validate(
        {
            "merge_method": "linear",
            "models": [{"model": str(s.path), "parameters": {"weight": 1.0}} for s in sources],
        }
    )
    compose(cfg, path, force=True, progress=False)


def compose_fixed(sources: Sequence[Model], path: Path) -> None:
    """The ablation without the search: task arithmetic with lambda = 1/N for every source
    (the search's starting point)."""
    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.executor import compose

    w = 1.0 / len(sources)
    cfg = ComposeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "models": [{"model": str(s.path), "parameters": {"weight": w}} for s in sources],
        }
    )
    compose(cfg, path, force=True, progress=False)


def _compose_by_search(
    job: Job,
    sources: Sequence[Model],
    label: str,
    path: Path,
    search: Any,
    grid: Any,
    score: str,
) -> None:
    """Task arithmetic over ``sources`` with the lambdas ``search`` picks (one coordinate
    sweep per pass, log-likelihood scoring), logged with the best ``score``."""
    from mmcompose.compose.config import ComposeConfig

    cfg = ComposeConfig.model_validate(
        {"merge_method": "task_arithmetic", "models": [{"model": str(s.path)} for s in sources]}
    )
    result, _ = search(
        cfg,
        path,
        force=True,
        progress=job.progress,
        grid=grid,
        method="coordinate",
        max_passes=job.budget.search_passes,
        mode="loglikelihood",
    )
    weights = zip((s.modalities[0] for s in sources), result.best_weights, strict=True)
    job.log(
        f"  {label} lambdas "
        + ", ".join(f"{m}={w:g}" for m, w in weights)
        + f" ({score} {result.best_accuracy:.3f})"
    )


def compose_searched(
    job: Job, sources: Sequence[Model], val: tuple[Path, Path], label: str, path: Path
) -> None:
    """Task arithmetic with the lambdas searched on ``val`` (DAMC on decoupled sources; the
    NaiveMC-with-search ablation on shared ones)."""
    from mmcompose.compose.search import compose_with_search

    def search(cfg: Any, out: Path, **kw: Any) -> Any:
        return compose_with_search(cfg, out, *val, **kw)

    _compose_by_search(job, sources, label, path, search, job.budget.search_grid, "val acc")


def compose_method(row: str, sources: Sequence[Model], path: Path) -> None:
    """One of the method rows (MMER, TIES, DARE) over the shared sources, as
    :func:`mmcompose.job_methods.method_config` sets it."""
    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.executor import compose
    from mmcompose.job_methods import method_config

    cfg = ComposeConfig.model_validate(method_config(row, [s.path for s in sources]))
    compose(cfg, path, force=True, progress=False)


def compose_unlabelled(
    job: Job, sources: Sequence[Model], val: tuple[Path, Path], label: str, path: Path
) -> None:
    """Task arithmetic with the lambdas chosen without labels (AdaMMS's generation
    consistency) on the questions of ``val``; its answers file is never read."""
    from mmcompose.compose.search_unlabelled import compose_with_unlabelled_search

    def search(cfg: Any, out: Path, **kw: Any) -> Any:
        return compose_with_unlabelled_search(cfg, out, val[0], **kw)

    grid = job.budget.unlabelled_grid
    _compose_by_search(job, sources, label, path, search, grid, "val consistency")


def load_model(path: Path) -> tuple[Any, Any]:
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    model = MMComposeForCausalLM.from_pretrained(path).fold_for_inference()
    return model, MMProcessor.from_pretrained(path)
