"""kill -9 at any point: every writing command, killed mid-flight, leaves nothing or a whole result.

Each command runs as a real subprocess (``python -m mmcompose ...``) on tiny inputs and is killed
with SIGKILL at named points (``MMCOMPOSE_FAULT``, see :func:`mmcompose.fs.fault_point`) or from
outside: early (it holds its lock and has begun, or its temporary output was just made),
mid-way (a file half-way through the output, a checkpoint being replaced, rows written but not
committed) and during the final rename. After every kill the output path holds nothing (or,
for a store that was being added to, every vector it held before); a rerun then finishes, and
its result equals an uninterrupted run's bit for bit (every command here is deterministic).
While a run holds its lock, the same command into the same output is refused.

The uninterrupted reference runs and the refused second writers run in this process through
the CLI entry point (torch and transformers are imported once, not once more per run; a lock
keeps them one at a time, as they share torch's global RNG). The chains run two at a time (the
suite's machines have two cores); each test waits for its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mmcompose.checkpoint import load_checkpoint

# One thread per process: the chains run side by side, and results must not depend on how a
# BLAS splits its work between a reference run and a rerun.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "MMCOMPOSE_FAULT"},
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _env(fault: str | None) -> dict[str, str]:
    return ENV | ({"MMCOMPOSE_FAULT": fault} if fault else {})


def cli(*args: object, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mmcompose", *map(str, args)]
    return subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=300)


def start(*args: object) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mmcompose", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"{r.args}: exit {r.returncode}\n{r.stderr[-3000:]}"


def kill_at(fault: str, out: Path, *args: object) -> None:
    """Run until the named point, where the process kills itself; nothing may be at ``out``."""
    r = cli(*args, fault=fault)
    assert r.returncode == -signal.SIGKILL, f"{fault} not reached: exit {r.returncode}\n{r.stderr}"
    assert not out.exists(), f"killed at {fault}, yet {out} exists"


_INPROC = threading.Lock()


@contextlib.contextmanager
def in_process() -> Iterator[None]:
    """One chain at a time in this process, on one thread like the subprocesses."""
    with _INPROC:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def inproc(*args: object) -> tuple[int, str]:
    """Run the CLI in this process; returns the exit code and what it printed to stderr."""
    from mmcompose.cli import main

    err = io.StringIO()
    with in_process(), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return code, err.getvalue()


def kill_while_holding_the_lock(out: Path, *args: object) -> None:
    """Early: stop a run once it holds the lock on ``out``; the same command is refused
    meanwhile (one writer at a time); then SIGKILL the first. Nothing is at ``out``."""
    first = start(*args)
    lock, deadline = out.with_name(f".{out.name}.lock"), time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if lock.read_text().strip() == str(first.pid):  # written once the lock is held
                break
        time.sleep(0.02)
    assert first.poll() is None, first.stderr.read() if first.stderr else ""
    os.kill(first.pid, signal.SIGSTOP)
    try:
        code, err = inproc(*args)
        assert code == 2 and f"pid {first.pid}" in err and "Traceback" not in err, err
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert not out.exists()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {
        f"{f.name}/{k}": v
        for f in sorted(folder.glob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k


# ----------------------------------------------------------------------------- the chains
def compose_chain(d: Path) -> None:
    from mmcompose.testing import compose_config, save_tiny_single

    with in_process():
        sources = [
            save_tiny_single(d, m, "decoupled", i + 1) for i, m in enumerate(("image", "audio"))
        ]
    cfg = d / "damc.yaml"
    cfg.write_text(yaml.safe_dump(compose_config(sources, weights=[0.6, 0.4], composition="damc")))
    assert inproc("compose", cfg, "-o", d / "ref")[0] == 0
    out = d / "out"
    # shards written, config.json not yet / before the rename (mcub is killed early too)
    for fault in ("open:config.json", "commit:out"):
        kill_at(fault, out, "compose", cfg, "-o", out)
    ok(cli("compose", cfg, "-o", out))
    assert_bitwise_equal(tensors(d / "ref"), tensors(out))
    assert (out / "config.json").read_text() == (d / "ref" / "config.json").read_text()


def train_chain(d: Path) -> None:
    from mmcompose.testing import save_tiny_base_llm

    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = ["red", "blue", "green"][i % 3]
        color = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}[label]
        pixels = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i}.png")
        rows.append({"id": f"i{i}", "path": str(d / f"{i}.png"), "modality": "image",
                     "label": label, "caption": f"a {label} square", "split": "train"})  # fmt: skip
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = d / "train.yaml"
    with in_process():
        llm = save_tiny_base_llm(d / "llm")
    cfg.write_text(yaml.safe_dump({
        "base_llm": str(llm),
        "data": "data.jsonl",
        "tower": {
            "modality": "image",
            "encoder": {"name": "patch_embed", "params": {"image_size": 32, "patch_size": 8, "width": 32}},
            "projector": {"name": "mlp2x_gelu"},
            "num_prefix": 1,
        },
        "lora": {"strategy": "decoupled", "rank": 4, "alpha": 8, "dropout": 0.1},  # RNG in play
        "stage1": {"epochs": 1, "lr": 3e-3, "batch_size": 6},  # 2 steps
        "stage2": {"epochs": 1.5, "lr": 1e-2, "batch_size": 6},  # 3 steps
        "checkpoint_every": 1,  # checkpoints: s1 step 1, end of s1, s2 steps 1 and 2
        "feature_cache": str(d / "cache"),
    }))  # fmt: skip
    ref, out, ckpt = d / "ref", d / "out", d / "out.checkpoint"
    assert inproc("train", cfg, "-o", ref)[0] == 0
    kill_while_holding_the_lock(out, "train", cfg, "-o", out)
    assert not ckpt.exists()
    kill_at("checkpoint:tensors#3", out, "train", cfg, "-o", out)  # writing checkpoint 3
    assert _progress(ckpt) == (2, 0)  # the previous checkpoint, whole (align: its rename too)
    kill_at("commit:out", out, "train", cfg, "-o", out)  # resumed, finished, not yet renamed
    assert _progress(ckpt) == (2, 2)
    ok(cli("train", cfg, "-o", out))  # resumes from stage 2 step 2
    assert not ckpt.exists()
    assert_bitwise_equal(tensors(ref), tensors(out))
    assert (out / "train_log.jsonl").read_text() == (ref / "train_log.jsonl").read_text()


def _progress(ckpt: Path) -> tuple[int, int]:
    saved = load_checkpoint(ckpt)
    assert saved is not None
    return saved[1]["stage"], saved[1]["step"]


def align_chain(d: Path) -> None:
    cfg = d / "align.yaml"
    cfg.write_text(yaml.safe_dump({
        "seed": 0,
        "data": {"kind": "synthetic", "synthetic": {
            "dims": {"a": 12, "b": 10}, "rank": 8, "sizes": {"train": 64, "val": 32, "test": 32}}},
        "connector": {"hidden": 16, "num_experts": 2, "top_k": 1, "dropout": 0.1},
        "train": {"max_steps": 30, "batch_size": 16, "eval_every": 10, "warmup_steps": 3,
                  "checkpoint_every": 5, "num_threads": 1},
    }))  # fmt: skip
    ref, out, ckpt = d / "ref", d / "out", d / "out.ckpt"
    assert inproc("align", cfg, "-o", ref)[0] == 0
    kill_while_holding_the_lock(out, "align", cfg, "-o", out)
    kill_at("checkpoint:tensors#3", out, "align", cfg, "-o", out)  # writing the step-15 one
    assert load_checkpoint(ckpt)[1]["state"]["step"] == 10
    kill_at("commit:out.ckpt#2", out, "align", cfg, "-o", out)  # resumed; renaming step 20
    assert load_checkpoint(ckpt)[1]["state"]["step"] == 15
    kill_at("commit:out", out, "align", cfg, "-o", out)
    assert load_checkpoint(ckpt)[1]["state"]["step"] == 30
    ok(cli("align", cfg, "-o", out))
    assert not ckpt.exists()
    assert_bitwise_equal(tensors(ref), tensors(out))
    history = [json.loads((p / "metrics.json").read_text())["history"] for p in (ref, out)]
    assert history[0] == history[1] and len(history[0]) == 3


def index_chain(d: Path) -> None:
    from mmcompose.retrieval import open_store
    from mmcompose.testing import save_tiny_aligned_model

    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append({"id": f"i{i}", "path": str(d / f"{i}.png"), "modality": "image", "label": "x"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with in_process():
        model = save_tiny_aligned_model(d / "model")

    def args(store: Path) -> list[object]:
        return ["index", "--model", model, "--data", d / "m.jsonl", "--store", store]

    ref, out = d / "ref", d / "store"
    assert inproc(*args(ref))[0] == 0
    kill_while_holding_the_lock(out, *args(out))
    # the new store's link being written (this used to leave a store that search and a rerun
    # both refused) / the final rename. Adds killed mid-way: store_add_chain.
    for fault in ("replace:mmcompose_index.json", "commit:store"):
        kill_at(fault, out, *args(out))
    ok(cli(*args(out)))
    a, b = open_store(ref, verify=True), open_store(out, verify=True)
    assert a.ids == b.ids and a.metadata == b.metadata and len(b) == 18
    va, vb = (s.index.reconstruct_n(0, len(s)) for s in (a, b))
    assert va.tobytes() == vb.tobytes()
    assert json.loads((out / "mmcompose_index.json").read_text())["gallery"] == "image"


def mcub_chain(d: Path) -> None:
    from test_mcub_build import write_manifests

    words = ["cow", "horse", "sheep", "pig", "car", "truck", "bus", "apple", "pear", "guitar"]
    manifests = write_manifests(d / "data", concepts=words)

    def args(out: Path) -> list[object]:
        return ["bench", "build-mcub", "-m", *manifests, "-o", out, "--top-k", "3",
                "--per-combination", "40"]  # fmt: skip

    assert inproc(*args(d / "ref"))[0] == 0
    out = d / "out"
    # temporary folder just made / sets written, items.jsonl not yet / before the rename
    for fault in ("begin:out", "open:items.jsonl", "commit:out"):
        kill_at(fault, out, *args(out))
    ok(cli(*args(out)))
    names = sorted(p.name for p in (d / "ref").iterdir())
    assert names == sorted(p.name for p in out.iterdir()) and "MCUB-4.json" in names
    for name in names:
        assert (out / name).read_bytes() == (d / "ref" / name).read_bytes(), name


_ADD = """
import sys
import numpy as np
from mmcompose.retrieval import open_store
store = open_store(sys.argv[1])
x = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
store.add([f"new{i}" for i in range(20)], x)
"""


def store_add_chain(d: Path) -> None:
    """Adds to an existing store, killed at every step: the old vectors all stay findable."""
    from mmcompose.retrieval import create_store, open_store

    old = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)

    def add(path: Path, fault: str | None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", _ADD, str(path)]
        return subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=120)

    for backend, faults in (
        # the next generation's index file / all its files written; the header being replaced;
        # the header replaced (committed), old files not yet deleted
        ("faiss", ["index_written", "data_written", "replace:store.json", "header_committed"]),
        ("lancedb", ["batch_written", "data_written"]),  # inside Lance's write / after it
    ):
        path = d / backend
        with in_process():
            store = create_store(path, 16, backend=backend)
            store.add([f"old{i}" for i in range(50)], old)
            store.close()
        for fault in faults:
            point = fault if ":" in fault else f"{backend}:{fault}"
            r = add(path, point)
            assert r.returncode == -signal.SIGKILL, f"{point}: exit {r.returncode}\n{r.stderr}"
            with in_process():
                reopened = open_store(path, verify=True)
                committed = fault == "header_committed"  # killed after the commit point
                assert len(reopened) == 50 + 20 * committed, point
                hits = reopened.search(old, k=1).ids[:, 0]
                assert hits.tolist() == [f"old{i}" for i in range(50)], point
                reopened.close()
    r = add(d / "faiss", None)  # the killed-after-commit add is there, once
    assert r.returncode == 1 and "already in store" in r.stderr, r.stderr


CHAINS: dict[str, Callable[[Path], None]] = {  # the longest first: the two workers end together
    "train": train_chain,
    "compose": compose_chain,
    "index": index_chain,
    "align": align_chain,
    "mcub": mcub_chain,
    "store_add": store_add_chain,
}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[None]]]:
    """Start every chain at once on two workers; each test waits for (and re-raises) its own."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(f, tmp_path_factory.mktemp(n)) for n, f in CHAINS.items()}
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.mark.parametrize("name", list(CHAINS))
def test_kill_9_leaves_nothing_or_a_whole_result(chains: dict[str, Future[None]], name: str):
    chains[name].result(timeout=600)
