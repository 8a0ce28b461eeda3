"""Vector stores: correctness against numpy, ANN recall, persistence, atomic adds, bad inputs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmcompose.errors import MMComposeError, UnknownNameError
from mmcompose.retrieval import (
    CorruptStoreError,
    RetrievalError,
    StoreMismatchError,
    UntrainedIndexError,
    create_store,
    open_store,
)
from mmcompose.testing import float_tol

DIM = 32
_MISSING = {
    "faiss": "faiss-cpu is not installed (pip install 'mmcompose[retrieval]')",
    "lancedb": "lancedb is not installed (pip install 'mmcompose[retrieval]')",
    "milvus": "pymilvus + milvus-lite are not installed (pip install pymilvus milvus-lite)",
}
_MODULES = {"faiss": ("faiss",), "lancedb": ("lancedb",), "milvus": ("pymilvus", "milvus_lite")}


def _need(backend: str) -> None:
    if any(importlib.util.find_spec(m) is None for m in _MODULES[backend]):
        pytest.skip(_MISSING[backend])


EXACT = [("faiss", "flat"), ("lancedb", "flat"), ("milvus", "flat")]
ALL = [*EXACT, ("faiss", "hnsw"), ("faiss", "ivfpq"), ("lancedb", "ivf_pq"), ("milvus", "hnsw")]
SMALL_PARAMS: dict[str, dict[str, Any]] = {
    "ivfpq": {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 8},
    "ivf_pq": {"num_partitions": 8, "num_sub_vectors": 8, "nprobes": 8, "min_rows": 1000},
}


def clustered(n: int, seed: int, centers: int = 20) -> np.ndarray:
    """Gaussian clusters: like real embeddings, unlike uniform noise where ANN is hopeless."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, DIM)).astype(np.float32) * 3
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(sims, top, axis=1)


def make(tmp_path: Path, backend: str, index: str, **kw: Any) -> Any:
    _need(backend)
    params = SMALL_PARAMS.get(index, {})
    return create_store(
        tmp_path / f"{backend}-{index}", DIM, backend=backend, index=index,
        index_params=params, model_id="conn-A", **kw,
    )  # fmt: skip


def ids_of(n: int, start: int = 0) -> list[str]:
    return [f"v{i}" for i in range(start, start + n)]


@pytest.fixture(autouse=True)
def _close_stores(close_stores: None) -> None:
    """Every store a test opens is closed after it (conftest.close_stores)."""


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize(("backend", "index"), EXACT)
def test_exact_search_matches_numpy(tmp_path: Path, backend: str, index: str) -> None:
    x, q = clustered(1500, 0), clustered(20, 1)
    store = make(tmp_path, backend, index)
    store.add(ids_of(1000), x[:1000], [{"n": i} for i in range(1000)])
    store.add(ids_of(500, 1000), x[1000:])  # second add: ids keep insertion order
    ids, scores, meta = store.search(q, k=10)
    top, sims = exact_topk(x, q, 10)
    assert ids.shape == (20, 10) and len(store) == 1500
    assert (ids == np.array(ids_of(1500), dtype=object)[top]).mean() > 0.99  # ties may swap
    # cosine scores <= 1 from each backend's float32 kernels: rounding of 32-term sums
    np.testing.assert_allclose(scores, sims, atol=float_tol(np.float32, 1.0, n_terms=DIM))
    pos = int(top[0, 0])
    assert meta[0][0] == ({"n": pos} if pos < 1000 else None)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_other_metrics(tmp_path: Path, metric: str) -> None:
    _need("faiss")
    x, q = clustered(500, 2), clustered(5, 3)
    store = create_store(tmp_path / "s", DIM, metric=metric)
    store.add(ids_of(500), x)
    _, scores, _ = store.search(q, k=5)
    ref = q @ x.T if metric == "ip" else ((q[:, None] - x[None]) ** 2).sum(-1)
    best = np.sort(ref, axis=1)[:, ::-1][:, :5] if metric == "ip" else np.sort(ref, axis=1)[:, :5]
    # faiss sums 32 terms in float32, l2 as |x|^2 + |q|^2 - 2 x.q: rounding at the size of
    # the squared norms (~900 here); a wrong metric is off by O(100)
    mag = float((x**2).sum(1).max() + (q**2).sum(1).max())
    np.testing.assert_allclose(scores, best, rtol=0, atol=float_tol(np.float32, mag, n_terms=DIM))


@pytest.mark.parametrize(
    ("backend", "index", "floor"),
    [("faiss", "hnsw", 0.9), ("faiss", "ivfpq", 0.4), ("lancedb", "ivf_pq", 0.4), ("milvus", "hnsw", 0.9)],
)  # fmt: skip
def test_ann_recall_at_10(tmp_path: Path, backend: str, index: str, floor: float) -> None:
    x, q = clustered(4000, 4), clustered(50, 5)
    store = make(tmp_path, backend, index)
    store.add(ids_of(4000), x)
    ids, _, _ = store.search(q, k=10)
    top, _ = exact_topk(x, q, 10)
    truth = np.array(ids_of(4000), dtype=object)[top]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall >= floor, f"{backend}/{index} recall@10 {recall:.3f} < {floor}"


@pytest.mark.parametrize(("backend", "index"), ALL)
def test_persistence_and_empty_store(tmp_path: Path, backend: str, index: str) -> None:
    x, q = clustered(1200, 6), clustered(3, 7)
    store = make(tmp_path, backend, index)
    if index not in ("ivfpq",):  # an untrained IVF-PQ refuses search (own test)
        ids, scores, meta = store.search(q, k=5)
        assert ids.shape == (3, 0) and scores.shape == (3, 0) and meta == [[], [], []]
    store.add(ids_of(1200), x)
    before = store.search(q, k=5)
    store.close()
    again = open_store(store.path, model_id="conn-A", verify=True)
    assert len(again) == 1200 and again.info()["model_id"] == "conn-A"
    after = again.search(q, k=5)
    assert (before.ids == after.ids).all()
    # reopened stores may search with other kernels (Milvus: a sealed, indexed segment
    # instead of a growing one): float32 rounding of cosine scores <= 1, 32 terms
    tol = float_tol(np.float32, 1.0, n_terms=DIM)
    np.testing.assert_allclose(before.scores, after.scores, atol=tol)


# ---------------------------------------------------------------- atomic add


CRASH_POINTS = [
    ("faiss", "flat", "index_written"),
    ("faiss", "hnsw", "data_written"),
    ("faiss", "ivfpq", "data_written"),
    ("lancedb", "flat", "batch_written"),  # inside Lance's own write: its commit never happens
    ("lancedb", "flat", "data_written"),  # Lance committed, our header did not: ignored
    ("milvus", "flat", "batch_written"),
    ("milvus", "flat", "data_written"),
]


@pytest.mark.parametrize(("backend", "index", "step"), CRASH_POINTS)
def test_crash_mid_add_keeps_previous_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, index: str, step: str
) -> None:
    x, q = clustered(1500, 8), clustered(4, 9)
    store = make(tmp_path, backend, index)
    store.add(ids_of(1000), x[:1000])
    before = store.search(q, k=10)
    module = importlib.import_module(f"mmcompose.retrieval.{backend}_store")

    def crash(at: str) -> None:
        if at == step:
            raise KeyboardInterrupt(f"injected crash at {at}")

    monkeypatch.setattr(module, "_after_step", crash)
    # Lance re-raises an exception from inside its write as a RuntimeError
    with pytest.raises((KeyboardInterrupt, RuntimeError), match="injected crash"):
        store.add(ids_of(500, 1000), x[1000:])
    monkeypatch.undo()
    store.close()

    reopened = open_store(store.path, verify=True)
    assert len(reopened) == 1000
    after = reopened.search(q, k=10)
    assert (before.ids == after.ids).all()
    # the store is still writable, and the rows of the crashed add can be added again
    reopened.add(ids_of(500, 1000), x[1000:])
    reopened.close()
    final = open_store(store.path, verify=True)
    assert len(final) == 1500
    assert final.search(x[1400], k=1).ids[0, 0] == "v1400"


def test_faiss_crash_after_commit_is_the_new_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmcompose.retrieval.faiss_store as fs

    store = make(tmp_path, "faiss", "flat")
    store.add(ids_of(10), clustered(10, 10))

    def crash(at: str) -> None:
        if at == "header_committed":
            raise KeyboardInterrupt(at)

    monkeypatch.setattr(fs, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        store.add(ids_of(5, 10), clustered(5, 11))
    monkeypatch.undo()
    assert len(open_store(store.path, verify=True)) == 15
    store.add(ids_of(1, 15), clustered(1, 12))  # the next add removes the stale files
    names = sorted(p.name for p in store.path.iterdir() if not p.name.startswith("."))
    assert names == ["index.3.faiss", "rows.3.json", "store.json"]


# ---------------------------------------------------------------- one writer, many readers

_WRITER = """
import sys, time
import numpy as np
from mmcompose.retrieval import open_store
path, tag, seed, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = open_store(path)
x = np.random.default_rng(seed).standard_normal((batches * 5, 32)).astype(np.float32)
for b in range(batches):
    store.add([f"{tag}{b * 5 + i}" for i in range(5)], x[b * 5 : b * 5 + 5])
    time.sleep(0.005)
store.close()
"""


def _writer(path: Path, tag: str, seed: int, batches: int) -> subprocess.Popen[str]:
    """Another process adding ``batches`` x 5 vectors (ids ``tag0``...) to the store."""
    args = [sys.executable, "-c", _WRITER, str(path), tag, str(seed), str(batches)]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)


def _written(seed: int, batches: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batches * 5, DIM)).astype(np.float32)


@pytest.mark.parametrize("backend", ["faiss", "lancedb"])  # Milvus Lite: one process per file
def test_two_processes_adding_to_one_store_lose_nothing(tmp_path: Path, backend: str) -> None:
    store = make(tmp_path, backend, "flat")
    store.close()
    procs = [_writer(store.path, tag, seed, 8) for tag, seed in (("a", 1), ("b", 2))]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    final = open_store(store.path, verify=True)
    assert len(final) == 80
    for tag, seed in (("a", 1), ("b", 2)):  # every vector is there, under its own id
        hits = final.search(_written(seed, 8), k=1).ids[:, 0]
        assert hits.tolist() == [f"{tag}{i}" for i in range(40)]


def test_readers_keep_working_while_a_writer_adds(tmp_path: Path) -> None:
    store = make(tmp_path, "faiss", "flat")
    first = clustered(5, 30)
    store.add(ids_of(5), first)
    writer = _writer(store.path, "w", 3, 60)
    seen: list[int] = []
    previous: list[str] = []
    while writer.poll() is None or len(seen) < 3:
        reader = open_store(store.path)  # never "corrupt" while the writer swaps generations
        n = len(reader)
        assert reader.search(first[2], k=1).ids[0, 0] == "v2"
        assert reader.ids[: len(previous)] == previous  # only ever appended to
        previous = list(reader.ids)
        seen.append(n)
        reader.close()
    assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
    assert seen == sorted(seen) and len(set(seen)) > 1  # it did read while rows arrived
    assert seen[-1] == 5 + 300


# ---------------------------------------------------------------- mmcompose index


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An (untrained) aligned model and a manifest of 18 images, 12 of them in ``test``."""
    from PIL import Image

    from mmcompose.testing import save_tiny_aligned_model

    d = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(18):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        split = "test" if i < 12 else "train"
        rows.append({"id": f"i{i}", "path": str(d / f"{i}.png"), "modality": "image",
                     "label": f"l{i % 3}", "caption": f"c{i % 3}", "split": split})  # fmt: skip
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny_aligned_model(d / "model"), d / "m.jsonl"


def _index_args(gallery: tuple[Path, Path], store: Path, *extra: str) -> list[str]:
    model, manifest = gallery
    return ["index", "--model", str(model), "--data", str(manifest), "--store", str(store), *extra]


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


def test_index_twice_into_one_store_is_refused_and_force_replaces(run, gallery, tmp_path):
    store = tmp_path / "store"
    assert run(*_index_args(gallery, store)).returncode == 0
    r = run(*_index_args(gallery, store, "--split", "test"))
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert len(open_store(store)) == 18  # the first run's vectors, untouched
    r = run(*_index_args(gallery, store, "--split", "test", "--force"))
    assert r.returncode == 0 and "stored 12 vectors" in r.stdout, r.stderr
    assert len(open_store(store)) == 12 and _leftovers(store) == []


@pytest.mark.parametrize(
    ("when", "message"), [("embedding", "already exists"), ("writing", "appeared")]
)
def test_index_never_replaces_a_store_that_appeared_meanwhile(
    gallery, tmp_path, monkeypatch, when, message
):
    """A store made by someone else during the work (which the early check cannot see) is
    kept: checked again before writing, and the final rename never replaces it."""
    import mmcompose.retrieval.service as service
    from mmcompose.align.evaluate import AlignedModel
    from mmcompose.fs import OutputExistsError

    store = tmp_path / "store"

    def another_writer() -> None:
        other = create_store(store, 32, model_id="theirs")
        other.add(["theirs"], clustered(1, 40)[:, :32])
        other.close()

    if when == "embedding":
        embed = AlignedModel.embed_gallery
        hook = (
            AlignedModel,
            "embed_gallery",
            lambda *a, **kw: (another_writer(), embed(*a, **kw))[1],
        )
    else:
        create = service.create_store
        hook = (service, "create_store", lambda *a, **kw: (another_writer(), create(*a, **kw))[1])
    monkeypatch.setattr(*hook)
    with pytest.raises(OutputExistsError, match=message):
        service.index_manifest(*gallery, store)
    kept = open_store(store)
    assert len(kept) == 1 and kept.header.model_id == "theirs" and _leftovers(store) == []


def test_index_while_another_index_runs_is_refused(run, gallery, tmp_path):
    store = tmp_path / "store"
    hold = "import sys; from mmcompose.fs import exclusive\n"
    hold += "with exclusive(sys.argv[1]):\n    print('held', flush=True); sys.stdin.readline()"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        r = run(*_index_args(gallery, store))
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
        assert not store.exists()
    finally:
        holder.communicate("\n", timeout=30)


def test_failed_index_leaves_no_store(run, gallery, tmp_path):
    store = tmp_path / "store"
    r = run(*_index_args(gallery, store, "--index", "ivfpq"))
    assert r.returncode == 2 and "training vectors" in r.stderr and "Traceback" not in r.stderr
    assert not store.exists() and _leftovers(store) == []
    assert run(*_index_args(gallery, store)).returncode == 0  # and a rerun is not refused


@pytest.mark.parametrize("link", ["{}", '{"model_dir": 3, "gallery": "image"}', "[]"])
def test_search_on_a_damaged_link_is_a_clear_error(run, gallery, tmp_path, link):
    store = tmp_path / "store"
    assert run(*_index_args(gallery, store)).returncode == 0
    (store / "mmcompose_index.json").write_text(link)
    r = run("search", "--store", str(store), "--text", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1
    assert "mmcompose_index.json" in r.stderr and "index" in r.stderr


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("backend", "index"), EXACT)
def test_dimension_and_model_mismatch(tmp_path: Path, backend: str, index: str) -> None:
    store = make(tmp_path, backend, index)
    store.add(ids_of(50), clustered(50, 13))
    with pytest.raises(StoreMismatchError, match=r"dimension 33.*32-dimensional"):
        store.search(np.ones((1, DIM + 1), np.float32), k=3)
    with pytest.raises(StoreMismatchError, match="dimension"):
        store.add(["x"], np.ones((1, DIM - 1), np.float32))
    store.close()
    with pytest.raises(StoreMismatchError, match=r"model 'conn-A'.*model 'conn-B'"):
        open_store(store.path, model_id="conn-B")
    assert len(open_store(store.path, model_id="conn-A")) == 50


@pytest.mark.parametrize(("backend", "index"), EXACT)
def test_corrupt_header_is_named(tmp_path: Path, backend: str, index: str) -> None:
    store = make(tmp_path, backend, index)
    store.add(ids_of(20), clustered(20, 14))
    store.close()
    header_path = store.path / "store.json"
    good = json.loads(header_path.read_text())

    header_path.write_text(json.dumps({**good, "count": 25}))
    with pytest.raises(CorruptStoreError, match="half-written"):
        open_store(store.path)
    header_path.write_text('{"backend": "faiss", "dim": ')
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        open_store(store.path)
    header_path.unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        open_store(store.path)


def test_faiss_damaged_data_files(tmp_path: Path) -> None:
    store = make(tmp_path, "faiss", "flat")
    store.add(ids_of(100), clustered(100, 15))
    index_file = next(store.path.glob("index.*.faiss"))
    data = bytearray(index_file.read_bytes())
    data[-5] ^= 0xFF  # same size, one vector byte changed: only the checksum sees it
    index_file.write_bytes(bytes(data))
    assert len(open_store(store.path)) == 100
    with pytest.raises(CorruptStoreError, match="SHA-256"):
        open_store(store.path, verify=True)
    index_file.write_bytes(bytes(data[: len(data) // 2]))  # half-written
    with pytest.raises(CorruptStoreError, match="bytes, header says"):
        open_store(store.path)
    index_file.unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        open_store(store.path)


def test_lancedb_missing_table_data(tmp_path: Path) -> None:
    import shutil

    store = make(tmp_path, "lancedb", "flat")
    store.add(ids_of(100), clustered(100, 16))
    shutil.rmtree(store.path / "lance" / "vectors.lance" / "_versions")
    with pytest.raises(CorruptStoreError, match="half-written"):
        open_store(store.path)


def test_ivfpq_training(tmp_path: Path) -> None:
    store = make(tmp_path, "faiss", "ivfpq")
    with pytest.raises(UntrainedIndexError, match="not trained"):
        store.search(clustered(1, 17), k=3)
    with pytest.raises(UntrainedIndexError, match="at least 64 training vectors"):
        store.add(ids_of(40), clustered(40, 18))
    assert len(open_store(store.path)) == 0
    store.train(clustered(1000, 19))
    store.add(ids_of(5), clustered(5, 20))  # small adds are fine once trained
    reopened = open_store(store.path)
    assert len(reopened) == 5 and reopened.is_trained


def test_other_bad_inputs(tmp_path: Path) -> None:
    store = make(tmp_path, "faiss", "flat")
    store.add(ids_of(3), clustered(3, 21))
    with pytest.raises(RetrievalError, match="already in store"):
        store.add(["v1"], clustered(1, 22))
    with pytest.raises(RetrievalError, match="all-zero"):
        store.add(["z"], np.zeros((1, DIM), np.float32))
    with pytest.raises(RetrievalError, match="NaN"):
        store.search(np.full((1, DIM), np.nan, np.float32), k=1)
    with pytest.raises(RetrievalError, match="2 ids for 1 vectors"):
        store.add(["a", "b"], clustered(1, 23))
    assert len(store) == 3
    with pytest.raises(UnknownNameError, match="vector-store backend"):
        create_store(tmp_path / "x", DIM, backend="nope")
    with pytest.raises(RetrievalError, match="no index"):
        create_store(tmp_path / "y", DIM, index="ivf_pq")
    with pytest.raises(MMComposeError, match="no vector store"):
        open_store(tmp_path / "absent")
    schema_store = create_store(tmp_path / "z", DIM, metadata_schema={"caption": "str"})
    with pytest.raises(RetrievalError, match="not of type str"):
        schema_store.add(["a"], clustered(1, 24), [{"caption": 3}])
