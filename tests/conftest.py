"""Shared fixtures: tiny random composed models, saved once per test session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """``MMCOMPOSE_TEST_THREADS=N`` runs the suite with N torch threads (and N OpenMP threads
    in the subprocesses it starts), to check that no result depends on the thread count:
    float32 reductions split over threads sum in another order, which the tolerances (see
    ``mmcompose.testing.float_tol``) must absorb."""
    threads = os.environ.get("MMCOMPOSE_TEST_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A decoupled (DAMC-style) tiny model with all four towers, saved to disk."""
    from mmcompose.testing import build_tiny_model

    model, proc = build_tiny_model(strategy="decoupled", seed=0)
    path = tmp_path_factory.mktemp("models") / "tiny-decoupled"
    model.save_pretrained(path, processor=proc)
    return path


@pytest.fixture(scope="session")
def media_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real file per modality (PNG, WAV, MP4, PLY), written with the usual libraries."""
    import av
    import numpy as np
    import soundfile as sf
    import trimesh
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    files = {
        "image": d / "img.png",
        "audio": d / "tone.wav",
        "video": d / "clip.mp4",
        "point": d / "shape.ply",
    }
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(files["image"])
    t = np.arange(22050) / 22050
    sf.write(files["audio"], (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    with av.open(str(files["video"]), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = np.full((32, 32, 3), i * 20, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    trimesh.creation.icosphere(subdivisions=3).export(files["point"])
    return files


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process (fast); returns an object like CompletedProcess."""
    from mmcompose.cli import main

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)

    return _run


@pytest.fixture
def close_stores(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Milvus Lite keeps a server per store folder until closed: close every store opened."""
    import mmcompose.retrieval.base as base

    opened: list[Any] = []
    orig = base.VectorStore.open.__func__

    def tracking_open(cls: Any, *a: Any, **kw: Any) -> Any:
        store = orig(cls, *a, **kw)
        opened.append(store)
        return store

    monkeypatch.setattr(base.VectorStore, "open", classmethod(tracking_open))
    yield
    for s in opened:
        s.close()
