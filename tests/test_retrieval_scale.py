"""Retrieval at scale: deletes and updates on every backend, compaction, the recall tuner, the
connector binding, `mmcompose index --update / --target-recall`, `mmcompose delete`, and
data-parallel extraction under torchrun (merged stores equal the single-process ones)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmcompose.errors import ConfigError
from mmcompose.retrieval import (
    ConnectorMismatchError,
    RetrievalError,
    UnknownIdError,
    create_store,
    open_store,
)
from mmcompose.retrieval.tuning import exact_topk, smallest_reaching, write_tuned
from mmcompose.testing import float_tol

DIM = 16
_MODULES = {"faiss": ("faiss",), "lancedb": ("lancedb",), "milvus": ("pymilvus", "milvus_lite")}
SMALL = {"ivfpq": {"nlist": 8, "m": 4, "nbits": 4, "nprobe": 8}}
BACKENDS = [("faiss", "flat"), ("faiss", "hnsw"), ("lancedb", "flat"), ("milvus", "hnsw")]


def _need(backend: str) -> None:
    if any(importlib.util.find_spec(m) is None for m in _MODULES[backend]):
        pytest.skip(f"{backend} is not installed (pip install 'mmcompose[retrieval]')")


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((8, dim)) * 3
    return (c[rng.integers(0, 8, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def ids_of(n: int, start: int = 0) -> list[str]:
    return [f"v{i}" for i in range(start, start + n)]


def make(tmp_path: Path, backend: str, index: str, dim: int = DIM, **kw: Any) -> Any:
    _need(backend)
    return create_store(
        tmp_path / f"{backend}-{index}", dim, backend=backend, index=index,
        index_params={**SMALL.get(index, {}), **kw.pop("index_params", {})}, model_id="A", **kw,
    )  # fmt: skip


def top1(store: Any, q: np.ndarray) -> list[Any]:
    return store.search(q, k=1).ids[:, 0].tolist()


@pytest.fixture(autouse=True)
def _close_stores(close_stores: None) -> None:
    """Every store a test opens is closed after it (conftest.close_stores)."""


# ---------------------------------------------------------------- deletes and updates


@pytest.mark.parametrize(("backend", "index"), BACKENDS)
def test_delete_update_upsert(tmp_path: Path, backend: str, index: str) -> None:
    x = clustered(400, 0)
    store = make(tmp_path, backend, index)
    store.add(ids_of(400), x, [{"n": i} for i in range(400)])
    assert top1(store, x[:3]) == ["v0", "v1", "v2"]

    assert store.delete(["v1", "v2"]) == 2
    assert len(store) == 398
    hits = store.search(x[1:3], k=5).ids
    assert "v1" not in hits and "v2" not in hits  # hidden from every search at once

    new = np.eye(DIM, dtype=np.float32)[:2]  # two new directions
    store.update(["v5", "v6"], new, [{"n": -5}, {"n": -6}])
    res = store.search(new, k=1)
    assert res.ids[:, 0].tolist() == ["v5", "v6"] and res.metadata[0][0] == {"n": -5}
    assert len(store) == 398  # replaced, not added
    assert top1(store, x[5]) != ["v5"]  # the old vector is gone with it

    assert store.upsert(["v7", "w1"], clustered(2, 2)) == (1, 1)
    assert len(store) == 399
    store.add(["v1"], x[1])  # a deleted id can be added again
    store.close()

    again = open_store(store.path, verify=True)
    assert len(again) == 400
    assert top1(again, x[1]) == ["v1"] and top1(again, new) == ["v5", "v6"]
    assert "v2" not in again.search(x[2], k=5).ids
    again.compact()
    assert again.tombstones == 0 and len(again) == 400
    assert top1(again, new) == ["v5", "v6"] and top1(again, x[3]) == ["v3"]


@pytest.mark.parametrize(("backend", "index"), [("faiss", "hnsw"), ("lancedb", "flat"), ("milvus", "flat")])  # fmt: skip
def test_unknown_id_changes_nothing(tmp_path: Path, backend: str, index: str) -> None:
    store = make(tmp_path, backend, index)
    store.add(ids_of(50), clustered(50, 3))
    header = (store.path / "store.json").read_bytes()
    with pytest.raises(UnknownIdError, match=r"cannot delete id 'nope' \(and 1 more\).*nothing"):
        store.delete(["v1", "nope", "gone"])
    with pytest.raises(UnknownIdError, match="cannot update id 'nope'"):
        store.update(["v2", "nope"], clustered(2, 4))
    assert (store.path / "store.json").read_bytes() == header
    assert len(store) == 50 and top1(store, clustered(50, 3)[1]) == ["v1"]


@pytest.mark.parametrize(
    ("backend", "step"),
    [("faiss", "data_written"), ("lancedb", "delete_written"), ("milvus", "dead_deleted")],
)
def test_crash_mid_delete_keeps_a_whole_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, step: str
) -> None:
    """Before the header commit the delete never happened; after it (Milvus: while the dead
    rows are purged) it happened whole, and the next write finishes the purge."""
    x = clustered(60, 5)
    store = make(tmp_path, backend, "flat")
    store.add(ids_of(60), x)
    module = importlib.import_module(f"mmcompose.retrieval.{backend}_store")

    def crash(at: str) -> None:
        if at == step:
            raise KeyboardInterrupt(at)

    monkeypatch.setattr(module, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        store.delete(["v3", "v4"])
    monkeypatch.undo()
    store.close()
    reopened = open_store(store.path, verify=True)
    committed = step == "dead_deleted"
    assert len(reopened) == (58 if committed else 60)
    assert (top1(reopened, x[3]) == ["v3"]) is not committed
    reopened.add(["new"], x[3] + 5.0)  # still writable
    assert len(open_store(store.path, verify=True)) == len(reopened)


def test_faiss_tombstones_compact_automatically(tmp_path: Path) -> None:
    x = clustered(100, 6)
    store = make(tmp_path, "faiss", "hnsw")
    store.add(ids_of(100), x)
    store.delete(ids_of(20))
    assert store.tombstones == 20 and len(store.ids) == 100  # deletes rewrite only the rows
    store.delete(ids_of(10, 20))  # 30 of 100 rows dead: past COMPACT_RATIO
    assert store.tombstones == 0 and store.index.ntotal == 70 and len(store) == 70
    assert top1(store, x[50:53]) == ["v50", "v51", "v52"]
    names = sorted(p.name for p in store.path.iterdir() if not p.name.startswith("."))
    assert len(names) == 3  # one index file, one rows file, the header


def test_faiss_ivfpq_delete_update_and_compaction(tmp_path: Path) -> None:
    """Compressed codes: ids are checked over a full-width search (nprobe = nlist), not by
    nearest neighbours; compaction keeps the codes, so the answers do not change."""
    x, q = clustered(300, 7), clustered(5, 8)
    store = make(tmp_path, "faiss", "ivfpq")
    store.add(ids_of(300), x, [{"n": i} for i in range(300)])
    store.delete(ids_of(40, 100))
    store.update(["v0"], clustered(1, 9), [{"n": -1}])
    every = store.search(q[0], k=300)
    found = [i for i in every.ids[0] if i is not None]
    assert len(store) == 260 and len(found) == 260 and found.count("v0") == 1
    assert not set(ids_of(40, 100)) & set(found)
    assert every.metadata[0][found.index("v0")] == {"n": -1}
    before = store.search(q, k=8)
    store.compact()
    after = store.search(q, k=8)
    assert store.tombstones == 0 and store.index.ntotal == 260 and len(store) == 260
    assert (before.ids == after.ids).all()  # same quantiser, same codes: same answers
    np.testing.assert_array_equal(before.scores, after.scores)


def test_milvus_by_uri_keeps_only_the_header_in_the_folder(tmp_path: Path) -> None:
    """The server code path (``uri=``; here a Milvus Lite file elsewhere, as a server URI is
    not reachable in tests): the collection lives at the URI, the folder holds the header."""
    _need("milvus")
    x = clustered(30, 14)
    store = create_store(tmp_path / "s", DIM, backend="milvus", index="hnsw",
                         uri=str(tmp_path / "server.db"), collection="gallery")  # fmt: skip
    store.add(ids_of(30), x)
    store.delete(["v0"])
    store.update(["v1"], x[2])
    store.close()
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.name[0] != ".") == ["store.json"]
    again = open_store(tmp_path / "s", verify=True)
    assert again.header.state["uri"] == str(tmp_path / "server.db") and len(again) == 29
    assert (
        set(again.search(x[2], k=2).ids[0]) == {"v1", "v2"}
        and "v0" not in again.search(x[0], k=5).ids
    )


# ---------------------------------------------------------------- the recall tuner


def test_exact_topk_matches_faiss_flat() -> None:
    import faiss

    x, q = clustered(5000, 9), clustered(20, 10)
    for metric, index in (("ip", faiss.IndexFlatIP(DIM)), ("l2", faiss.IndexFlatL2(DIM))):
        index.add(x)
        dist, ref = index.search(q, 7)
        pos, score = exact_topk(x, q, 7, metric)
        assert (pos == ref).mean() > 0.99  # ties may swap
        want = dist if metric == "ip" else -dist
        mag = float((x**2).sum(1).max() + (q**2).sum(1).max())
        np.testing.assert_allclose(score, want, atol=float_tol(np.float32, mag, n_terms=DIM))


def test_smallest_reaching_is_minimal() -> None:
    curve = {v: min(1.0, v / 100) for v in range(1, 400)}
    seen: list[int] = []

    def measure(v: int) -> float:
        seen.append(v)
        return curve[v]

    assert smallest_reaching(measure, 0.95, 1, 399)[:2] == (95, 0.95)
    assert len(seen) == len(set(seen)) < 20  # doubling then bisection, nothing measured twice
    assert smallest_reaching(lambda v: 0.5, 0.95, 1, 64)[:2] == (64, 0.5)  # out of reach: hi


def _independent_recall(store: Any, x: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Recall@k of the store's own search on stored rows, own row excluded, by numpy."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn[rows] @ xn.T
    sims[np.arange(len(rows)), rows] = -np.inf
    truth = np.argsort(-sims, axis=1)[:, :k]
    found = store.search(x[rows], k=k + 1).ids
    ids = np.array(ids_of(len(x)), dtype=object)
    hits = [
        len(set([f for f in row if f != ids[r]][:k]) & set(ids[t]))
        for row, r, t in zip(found, rows, truth, strict=True)
    ]
    return sum(hits) / (k * len(rows))


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
def test_tuned_ef_search_reaches_the_target_and_is_recorded(tmp_path: Path, backend: str) -> None:
    """Random data in 24 dims and a thin graph: efSearch matters (FAISS; Milvus Lite searches
    a segment this small exactly), and the tuner finds the smallest that reaches the target."""
    x = np.random.default_rng(11).standard_normal((3000, 24)).astype(np.float32)
    store = make(tmp_path, backend, "hnsw", dim=24, index_params={"M": 4, "ef_construction": 16})
    store.add(ids_of(3000), x)
    report = store.tune_recall(0.9, sample=300, seed=3)
    assert report.recall >= 0.9 and report.param == "ef_search"
    if backend == "faiss":
        below = dict(report.trials).get(report.value - 1)
        assert below is not None and below < 0.9  # the smallest value that reaches the target
    store.close()
    reopened = open_store(store.path)
    assert reopened.header.index_params["ef_search"] == report.value
    assert reopened.header.tuning["recall"] == pytest.approx(report.recall)
    rows = np.sort(np.random.default_rng(3).choice(3000, 300, replace=False))
    assert _independent_recall(reopened, x, rows, 10) >= 0.9  # later searches use it


def test_write_tuned_holds_queries_back_then_stores_them(tmp_path: Path) -> None:
    """What `index --target-recall` does: a tenth of the rows are the tuner's never-stored
    queries, stored after the tuning; the chosen efSearch reaches the target on them."""
    x = np.random.default_rng(15).standard_normal((3000, 24)).astype(np.float32)
    store = make(tmp_path, "faiss", "hnsw", dim=24, index_params={"M": 4, "ef_construction": 16})
    report = write_tuned(store, ids_of(3000), x, None, 0.9, sample=300)
    assert len(store) == 3000 and report.queries == "held-out"
    assert report.recall >= 0.9 and report.sample == 300 and report.count == 2700
    assert dict(report.trials)[report.value - 1] < 0.9
    assert store.header.tuning["queries"] == "held-out"
    assert top1(store, x[:5]) == ids_of(5)  # every row is stored in the end


def test_tuned_nprobe_and_out_of_reach(tmp_path: Path) -> None:
    """IVF-PQ: nprobe from 1 to nlist; PQ's compression caps recall below 1."""
    x = np.random.default_rng(12).standard_normal((2000, DIM)).astype(np.float32)
    store = make(tmp_path, "faiss", "ivfpq", index_params={"nlist": 32, "m": 8, "nbits": 6})
    store.add(ids_of(2000), x)
    with pytest.raises(RetrievalError, match="keeps only compressed codes"):
        store.tune_recall(0.5)
    with pytest.raises(RetrievalError, match=r"out of reach: the best is 0\.\d+ at nprobe=32"):
        store.tune_recall(1.0, vectors=x, ids=ids_of(2000), sample=200)
    assert store.header.tuning is None  # a refused tuning records nothing
    rep = store.tune_recall(0.5, vectors=x, ids=ids_of(2000), sample=200)
    assert rep.recall >= 0.5 and rep.value > 1 and dict(rep.trials)[rep.value - 1] < 0.5
    assert store.index.nprobe == rep.value == open_store(store.path).index.nprobe


@pytest.mark.parametrize("bad", [0, -0.5, 1.01, float("nan"), True, "0.9"])
def test_tune_target_outside_0_1(tmp_path: Path, bad: Any) -> None:
    store = make(tmp_path, "faiss", "hnsw")
    store.add(ids_of(20), clustered(20, 13))
    with pytest.raises(ConfigError, match=r"target recall must be in \(0, 1\]"):
        store.tune_recall(bad)
    assert store.header.tuning is None


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two (untrained) connectors and a manifest of 12 images (two of them the same file)."""
    from PIL import Image

    from mmcompose.testing import save_tiny_aligned_model

    d = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        f = d / f"{min(i, 10)}.png"
        if not f.exists():
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f)
        rows.append({"id": f"i{i}", "path": str(f), "modality": "image", "label": f"l{i % 3}",
                     "caption": f"c{i % 3}", "split": "test" if i < 8 else "train"})  # fmt: skip
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "a": save_tiny_aligned_model(d / "model-a"),
        "b": save_tiny_aligned_model(d / "model-b", seed=1),
        "manifest": d / "m.jsonl",
    }


def _index(g: dict[str, Path], store: Path, *extra: str, model: str = "a") -> list[str]:
    return ["index", "--model", str(g[model]), "--data", str(g["manifest"]), "--store", str(store),
            *extra]  # fmt: skip


def _refused(r: Any, *words: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr
    text = " ".join(r.stderr.split())  # the console wraps long lines
    for w in words:
        assert w in text, r.stderr


def test_index_target_recall_is_recorded_and_bad_values_refused(run, gallery, tmp_path):
    store = tmp_path / "s"
    for bad in ("0", "1.5", "-1", "nan"):
        r = run(*_index(gallery, store, "--index", "hnsw", "--target-recall", bad))
        _refused(r, "target recall must be in (0, 1]")
        assert not store.exists() and not list(tmp_path.iterdir())  # nothing half-written
    _refused(run(*_index(gallery, store, "--target-recall", "0.9")), "flat index is exact")
    _refused(run(*_index(gallery, store, "--uri", "http://h:19530")), "--uri names a Milvus server")
    assert not store.exists()
    r = run(*_index(gallery, store, "--index", "hnsw", "--target-recall", "0.95"))
    assert r.returncode == 0 and "tuned ef_search=" in r.stdout, r.stderr
    header = json.loads((store / "store.json").read_text())
    assert header["tuning"]["target"] == 0.95 and header["tuning"]["recall"] >= 0.95
    assert header["index_params"]["ef_search"] == header["tuning"]["value"]
    r = run(*_index(gallery, store, "--update", "--target-recall", "0.95"))
    assert r.returncode == 0 and "updated 12, added 0" in r.stdout and "tuned" in r.stdout, r.stderr
    _refused(run(*_index(gallery, tmp_path / "absent", "--update")), "no vector store")


def test_update_delete_and_connector_binding(run, gallery, tmp_path):
    store = tmp_path / "s"
    assert run(*_index(gallery, store, "--split", "test")).returncode == 0
    link = json.loads((store / "mmcompose_index.json").read_text())
    assert set(link) >= {"model_fingerprint", "config_fingerprint", "gallery"}

    r = run(*_index(gallery, store, "--update"))  # 8 stored, 4 new
    assert r.returncode == 0 and "updated 8, added 4" in r.stdout, r.stdout + r.stderr
    assert len(open_store(store)) == 12

    # another connector: refused for searching and for updating, store untouched
    before = (store / "store.json").read_bytes()
    _refused(run("search", "--store", str(store), "--model", str(gallery["b"]), "--text", "c1"),
             "was filled by connector", "--model")  # fmt: skip
    _refused(run(*_index(gallery, store, "--update", model="b")), "another space")
    with pytest.raises(ConnectorMismatchError) as info:
        open_store(store, model_id="someone-else")
    assert isinstance(info.value, ConfigError)
    assert (store / "store.json").read_bytes() == before

    # a delete of an unknown id: named, nothing deleted
    r = run("delete", "--store", str(store), "i1", "nope")
    _refused(r, "cannot delete id 'nope'", "nothing was changed")
    assert (store / "store.json").read_bytes() == before
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("i2\n\ni3\n")
    r = run("delete", "--store", str(store), "i1", "--ids-file", str(ids_file), "--compact")
    assert r.returncode == 0 and "deleted 3 vectors" in r.stdout, r.stderr
    assert len(open_store(store)) == 9
    r = run("search", "--store", str(store), "--text", "c1", "-k", "12", "--json")
    assert r.returncode == 0, r.stderr
    found = {h["id"] for h in json.loads(r.stdout)}
    assert found == {f"i{i}" for i in range(12)} - {"i1", "i2", "i3"}


def test_same_weights_other_encoder_config_is_another_connector(run, gallery, tmp_path):
    import shutil

    store = tmp_path / "s"
    assert run(*_index(gallery, store)).returncode == 0
    other = tmp_path / "model-a2"
    shutil.copytree(gallery["a"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["encoders"]["image"]["params"]["patch_size"] = 16  # other frozen-encoder features
    (other / "config.json").write_text(json.dumps(cfg))
    r = run("search", "--store", str(store), "--model", str(other), "--text", "c1")
    _refused(r, "config differ")


# ---------------------------------------------------------------- torchrun


_TORCHRUN = """
import sys
import torch.distributed as dist
from mmcompose.align.features import main as features
from mmcompose.cli import main as cli
dist.init_process_group("gloo")
features(sys.argv[1].split())
try:
    cli(sys.argv[2].split())
except SystemExit as e:
    assert e.code in (0, None), e.code
dist.destroy_process_group()
"""


def test_torchrun_extraction_and_index_equal_one_process(run, gallery, tmp_path):
    """2 processes (gloo, CPU): the merged feature store and vector store equal those of one."""
    from mmcompose.align.features import FeatureStore
    from mmcompose.align.features import main as features

    enc = '{"image_size":32,"patch_size":8,"width":32}'
    feat_args = f"{gallery['manifest']} --encoder patch_embed --params {enc} --shard-size 3"
    one, two = tmp_path / "one", tmp_path / "two"
    script = tmp_path / "dp.py"
    script.write_text(_TORCHRUN)
    index_two = " ".join(_index(gallery, two / "store"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), f"{feat_args} --root {two}", index_two]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("12 items ->") == 1 and p.stdout.count("stored 12 vectors") == 1

    features(f"{feat_args} --root {one}".split())
    assert run(*_index(gallery, one / "store")).returncode == 0
    (a,) = (FeatureStore(d) for d in one.iterdir() if d.name.startswith("patch_embed"))
    (b,) = (FeatureStore(d) for d in two.iterdir() if d.name.startswith("patch_embed"))
    assert a.index == b.index and len(a.index["shards"]) == 4  # same ids, key, shard layout
    fa, fb = a.features(), b.features()
    np.testing.assert_array_equal(fa.lengths, fb.lengths)
    # fp16 features from two thread counts: a rounding of the float32 encoder at most
    for x, y in ((fa.tokens, fb.tokens), (fa.pooled, fb.pooled)):
        mag = float(np.abs(x).max())
        np.testing.assert_allclose(y, x, rtol=0, atol=float_tol(np.float16, mag))
    sa, sb = open_store(one / "store"), open_store(two / "store")
    assert sa.ids == sb.ids
    va, vb = sa.index.reconstruct_n(0, 12), sb.index.reconstruct_n(0, 12)
    # unit vectors after the patch convolution (3*8*8 terms) and ~4 connector layers
    np.testing.assert_allclose(vb, va, rtol=0, atol=float_tol(np.float32, 1.0, n_terms=192 * 4))
