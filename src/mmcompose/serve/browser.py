"""Driving the demo page from a real headless browser: the browser test and the README's
screenshot command share these steps (start ``mmcompose serve`` in a subprocess, wait until
it answers, upload, ask, read the answer).

The browser is Debian's Chromium (``chromium-headless-shell`` or ``chromium``) driven by
Playwright through ``executable_path``: Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmcompose.errors import ConfigError

CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser")


def find_chromium() -> str:
    """The system Chromium's path; a clear error naming the Debian package when absent."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise ConfigError(
        "no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + ")",
        hint="apt-get install chromium-headless-shell (`make test` installs it)",
    )


@contextlib.contextmanager
def running_server(
    model_dir: str | Path,
    port: int,
    log_path: Path,
    *,
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
    timeout: float = 240.0,
) -> Iterator[str]:
    """``mmcompose serve MODEL_DIR --port PORT`` in a subprocess until the block ends;
    yields the page's URL once it answers. Its output goes to ``log_path``, quoted in the
    error when it exits or does not answer within ``timeout`` seconds. (NiceGUI reads
    pytest's variables as "under test, take the port from NICEGUI_SCREEN_TEST_PORT": they
    are not passed on.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NICEGUI_"))}
    env |= extra_env or {}
    cmd = [sys.executable, "-m", "mmcompose", "serve", str(model_dir), "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*cmd, *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env, text=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mmcompose serve exited with {proc.returncode}:\n{log_path.read_text()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no answer at {url} in {timeout:.0f} s:\n{log_path.read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def synthetic_media(d: Path) -> dict[str, Path]:
    """A PNG, a WAV, a WebM (VP8, which Chromium plays) and a .npy point cloud (a sphere),
    seeded: one upload per modality for the browser test and the tiny-model screenshot."""
    import av
    import numpy as np
    import soundfile as sf
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "image": d / "photo.png",
        "audio": d / "tone.wav",
        "video": d / "clip.webm",
        "point": d / "sphere.npy",
    }
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([xx * 4, yy * 5, 255 - xx * 4], -1) + rng.integers(0, 20, (48, 64, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(files["image"])
    t = np.arange(16000) / 16000
    sf.write(files["audio"], (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    with av.open(str(files["video"]), "w") as c:
        s = c.add_stream("libvpx", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(16):
            frame = np.zeros((32, 32, 3), dtype=np.uint8)
            frame[8:20, i : i + 12] = (255, 200, 0)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    v = rng.standard_normal((600, 3))
    np.save(files["point"], (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32))
    return files


def upload(page: Any, modality: str, path: Path) -> None:
    """Choose a file in a modality's upload slot (it uploads at once)."""
    page.get_by_test_id(f"upload-{modality}").locator("input[type=file]").set_input_files(str(path))


def wait_for_upload(page: Any, modality: str, timeout_ms: float = 60_000) -> None:
    """Until the slot shows its preview (the server decoded the file and accepted it)."""
    page.get_by_test_id(f"preview-{modality}").wait_for(timeout=timeout_ms)


def question_text(page: Any) -> str:
    return page.get_by_test_id("question").input_value()  # Quasar puts the id on the textarea


def ask(page: Any, question: str, turn: int, timeout_ms: float = 120_000) -> str:
    """Type ``question`` below the placeholders the uploads put there, press Send, and
    return the answer of chat turn ``turn`` (1, 2, ...) once it is complete."""
    box = page.get_by_test_id("question")
    lead = "".join(line + "\n" for line in box.input_value().splitlines() if _is_ph(line))
    box.fill(lead + question)
    page.get_by_test_id("send").click()
    answer = page.locator(f'[data-testid="answer-{turn}"].mmc-done')
    answer.wait_for(timeout=timeout_ms)
    return answer.inner_text()


def _is_ph(line: str) -> bool:
    s = line.strip()
    return s.startswith("<") and s.endswith(">") and s[1:-1] in ("image", "audio", "video", "point")


__all__ = [
    "ask",
    "find_chromium",
    "question_text",
    "running_server",
    "synthetic_media",
    "upload",
    "wait_for_upload",
]
