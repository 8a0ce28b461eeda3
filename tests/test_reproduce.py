"""The reproduction: the quickstart's pipeline with four modalities, two seeds, every MCUB-3
subset and the ablations, end to end with stand-in trainers and models (real MCUB sets built
from tiny manifests, real caching, real statistics, real report files); resuming after an
interruption; the docs render; the bad inputs, refused before any work."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmcompose import job_build
from mmcompose import quickstart as qs
from mmcompose import reproduce as rp
from mmcompose.errors import ConfigError, MediaError
from mmcompose.fs import atomic_dir, write_json_atomic
from mmcompose.job_methods import DARE, LABEL_FREE, METHOD_ROWS, MMER, TIES
from mmcompose.job_tasks import Task, subset_sets
from mmcompose.paper_report import column_label, gap_growth, render_markdown, render_section
from mmcompose.pipeline import Cache, run_stages

MODS = ("image", "audio", "video", "point")
LABELS = ["cow", "pig", "cup", "gear", "bell", "drum", "fish", "tree"]
N_ITEMS = 60  # per column; nested 0/1 vectors: a better model is right wherever a worse one is
SKILL = {"single": 0.35, "NaiveMC": 0.6, "DAMC": 0.85, "fixed": 0.7, "naive-search": 0.65}
SKILL |= {"MMER": 0.8, "TIES": 0.65, "DARE": 0.5, "label-free": 0.62}  # the method rows
SUBSET_DAMC = 0.62  # DAMC's lead over NaiveMC is smaller on the subsets: the gap grows


def _embed(texts):
    """A cheap deterministic stand-in for MiniLM (unit vectors from the words' hashes)."""
    out = []
    for t in texts:
        rng = np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
        v = rng.normal(size=16)
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


def _manifests(root: Path) -> dict[str, Path]:
    """One tiny manifest per modality: 8 labels x (test 2, val 2, train 1) touched files."""
    out = {}
    ext = {"image": "png", "audio": "wav", "video": "mp4", "point": "npy"}
    for m in MODS:
        rows = []
        for label in LABELS:
            for split, k in (("test", 2), ("val", 2), ("train", 1)):
                for i in range(k):
                    p = root / m / f"{label}-{split}-{i}.{ext[m]}"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(b"x")
                    rows.append(
                        {
                            "id": f"{m}/{p.stem}",
                            "path": str(p),
                            "modality": m,
                            "label": label,
                            "split": split,
                        }
                    )
        out[m] = root / f"{m}.jsonl"
        out[m].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


class StandIns:
    """The expensive parts replaced: training, composing, loading, scoring. Each records its
    calls; ``fail`` makes the named kind raise once (an interrupted stage)."""

    def __init__(self, root: Path, unreadable: dict[str, str] | None = None) -> None:
        self.root = root
        self.manifests = _manifests(root / "data")
        self.unreadable = unreadable or {}
        self.trained: list[tuple] = []
        self.composed: list[tuple] = []
        self.scored: list[tuple] = []
        self.fail: tuple[str, int] | None = None  # (kind, after this many calls of it)
        self.calls: dict[str, int] = {}

    def _maybe_fail(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.fail is not None and self.fail == (kind, self.calls[kind]):
            self.fail = None
            raise KeyboardInterrupt(f"interrupted in {kind}")

    def prepare(self, job):
        """The job's dataset names, each a tiny manifest of its modality."""
        manifests = {d: self.manifests[m] for m in job.modalities for d in job.datasets[m]}
        keys = {d: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for d, p in manifests.items()}
        return qs.Assets(manifests, keys, dict(self.unreadable))

    @staticmethod
    def build_mcub(assets, split, modalities, path):
        from mmcompose.bench.mcub_build import build_mcub

        manifests = [str(p) for p in assets.manifests.values()]
        build_mcub(
            manifests,
            path,
            split=split,
            modalities=list(modalities),
            per_combination=40,
            force=True,
            embed=_embed,
        )

    @staticmethod
    def _write(path: Path, doc: dict) -> None:
        with atomic_dir(path, overwrite=True) as tmp:  # as the real writers: atomically
            write_json_atomic(tmp / "config.json", doc)

    def train(self, job, cfg, label, path):
        self._maybe_fail("train")
        m, s = cfg.tower.modality, cfg.lora.strategy
        self.trained.append((m, s, cfg.seed))
        self._write(path, {"what": "single", "name": f"{m}-{s}", "seed": cfg.seed, "mods": [m]})

    def _composition(self, what, sources, path):
        self._maybe_fail("compose")
        mods = [s.modalities[0] for s in sources]
        self.composed.append((what, sources[0].seed, tuple(mods)))
        self._write(path, {"what": what, "seed": sources[0].seed, "mods": mods})

    def naive(self, sources, path):
        self._composition("NaiveMC", sources, path)

    def fixed(self, sources, path):
        self._composition("fixed", sources, path)

    def damc(self, job, sources, val, label, path):
        assert Path(val[0]).is_file() and Path(val[1]).is_file()
        decoupled = sources[0].name.endswith("-decoupled")
        self._composition("DAMC" if decoupled else "naive-search", sources, path)

    def method(self, row, sources, path):
        assert all(s.name.endswith("-shared") for s in sources)
        self._composition(row, sources, path)

    def unlabelled(self, job, sources, val, label, path):
        assert Path(val[0]).is_file() and all(s.name.endswith("-shared") for s in sources)
        self._composition("label-free", sources, path)

    @staticmethod
    def load(path):
        return json.loads((path / "config.json").read_text()), None

    def tasks(self, manifests, bench, budget, modalities):
        def run_for(name, set_mods):
            def run(model, _proc, mods, _progress):
                self._maybe_fail("score")
                self.scored.append((model["what"], model["seed"], tuple(model["mods"]), name))
                skill = SKILL[model["what"]] + 0.02 * model["seed"]
                if model["what"] == "DAMC" and set_mods and len(set_mods) < len(modalities):
                    skill = SUBSET_DAMC
                k = round(skill * N_ITEMS)
                v = [1.0] * k + [0.0] * (N_ITEMS - k)
                g = [1.0] * (k - 3) + [0.0] * (N_ITEMS - k + 3)
                per = {"acc,loglikelihood": v, "acc,generate": g}
                return {
                    "acc,loglikelihood": k / N_ITEMS,
                    "acc,generate": (k - 3) / N_ITEMS,
                    "n": N_ITEMS,
                    "per_item": per,
                }

            return run

        out = [
            Task(f"classify_{m}", m, "acc,loglikelihood", [m], run_for(m, None), N_ITEMS)
            for m in modalities
        ]
        out.append(Task("mcub", None, "acc,loglikelihood", ["mcub"], run_for("mcub", None), 4))
        for s in bench.subsets:
            name = "mcub_" + "_".join(s.modalities)
            key = [name, qs.file_digest(s.test[0])]
            out.append(
                Task(
                    name,
                    None,
                    "acc,loglikelihood",
                    key,
                    run_for(name, s.modalities),
                    4,
                    s.modalities,
                )
            )
        return out

    def install(self, monkeypatch) -> StandIns:
        monkeypatch.setattr(qs, "prepare", self.prepare)
        monkeypatch.setattr(qs, "_build_mcub", self.build_mcub)
        monkeypatch.setattr(qs, "_train", self.train)
        monkeypatch.setattr(qs, "_naive", self.naive)
        monkeypatch.setattr(qs, "_fixed", self.fixed)
        monkeypatch.setattr(qs, "_damc", self.damc)
        monkeypatch.setattr(job_build, "compose_method", self.method)
        monkeypatch.setattr(job_build, "compose_unlabelled", self.unlabelled)
        monkeypatch.setattr(qs, "_load", self.load)
        monkeypatch.setattr(qs, "_tasks", self.tasks)
        monkeypatch.setenv("MMCOMPOSE_CACHE", str(self.root / "cache"))
        return self


@pytest.fixture(autouse=True)
def _fewer_bootstrap_replicates(monkeypatch):
    """1,000 replicates (p >= 1/1001) instead of 10,000: the claims here are clear-cut."""
    from mmcompose import paper_report

    monkeypatch.setattr(paper_report, "N_BOOT", 1000)


@pytest.fixture
def standins(tmp_path, monkeypatch) -> StandIns:
    return StandIns(tmp_path).install(monkeypatch)


BUDGET = replace(rp.BUDGETS["smoke"], seeds=(0, 1), subsets=tuple(subset_sets(MODS)))


def _run(out: Path, **kw):
    kw.setdefault("budget", BUDGET)
    return rp.run_reproduction(out, progress=False, log=lambda _: None, **kw)


# ----------------------------------------------------------------------------- end to end
def test_reproduction_end_to_end_has_every_row_column_interval_and_p_value(standins, tmp_path):
    report = _run(tmp_path / "out")
    assert len(standins.trained) == 16 == len(set(standins.trained))  # 2 seeds x 4 x 2
    per_seed = [c for c in standins.composed if c[1] == 0]
    # 5 sets x 2 + 2 ablations + 4 method rows (the whole set only)
    assert len(standins.composed) == 32 and len(per_seed) == 16
    assert ("fixed", 0, MODS) in per_seed and ("naive-search", 1, MODS) in standins.composed
    for what in (MMER, TIES, DARE, "label-free"):
        assert [c[2] for c in per_seed if c[0] == what] == [MODS]
    assert {c[2] for c in per_seed if c[0] == "DAMC"} == {MODS, *subset_sets(MODS)}

    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["rows"] == json.loads(json.dumps(report.doc["rows"]))
    labels = [c["label"] for c in doc["columns"]]
    assert labels == [
        "MCUB-4",
        "MCUB-3 IAV",
        "MCUB-3 IAP",
        "MCUB-3 IVP",
        "MCUB-3 AVP",
        "image (test)",
        "audio (test)",
        "video (test)",
        "point (test)",
    ]
    names = [r["name"] for r in doc["rows"]]
    singles = [f"{m}-{s}" for s in ("shared", "decoupled") for m in MODS]
    assert names == [*singles, "NaiveMC", "DAMC", qs.FIXED, qs.SEARCHED_NAIVE, *METHOD_ROWS]
    rows = {r["name"]: r["cells"] for r in doc["rows"]}
    keys = [c["key"] for c in doc["columns"]]
    for name in ("NaiveMC", "DAMC"):  # every column
        assert all(rows[name][k] is not None for k in keys), name
    for name in (qs.FIXED, qs.SEARCHED_NAIVE):  # the ablations: MCUB-4 only
        assert [k for k in keys if rows[name][k] is not None] == [keys[0]]
    for name in METHOD_ROWS:  # the method rows: MCUB-4 and the test splits, not the subsets
        assert [k for k in keys if rows[name][k] is not None] == [keys[0], *keys[5:]]
    # a single model: its own test split and the MCUB sets that hold its modality
    video = [column_label(k) for k in keys if rows["video-shared"][k] is not None]
    assert video == ["MCUB-4", "MCUB-3 IAV", "MCUB-3 IVP", "MCUB-3 AVP", "video (test)"]
    damc = rows["DAMC"][keys[0]]
    assert damc["per_seed"] == [51 / 60, 52 / 60] and damc["items"] == N_ITEMS
    assert damc["mean"] == pytest.approx(103 / 120, abs=1e-12)
    assert damc["low"] < damc["mean"] < damc["high"] and damc["interval"].startswith("bootstrap")
    assert damc["generate"]["mean"] == pytest.approx(97 / 120, abs=1e-12)

    claims = {c["claim"]: c for c in doc["claims"]}
    assert all(c["p"] is not None and 0 < c["p"] <= 1 for c in doc["claims"])
    for label in labels[:5]:  # each composition vs the best single
        assert claims[f"NaiveMC beats the best single-modality model on {label}"]["holds"]
        assert claims[f"DAMC beats the best single-modality model on {label}"]["holds"]
    assert claims["DAMC beats NaiveMC on MCUB-4"]["holds"]  # 15 of 60 items, both seeds
    for label in labels[1:5]:  # 37 vs 36 and 37 vs 37 items: right way, within noise
        c = claims[f"DAMC beats NaiveMC on {label}"]
        assert c["direction_holds"] and c["verdict"] == f"holds within noise (p = {c['p']:.2g})"
    assert claims[f"DAMC beats {qs.FIXED} on MCUB-4 (the lambda search helps)"]["holds"]
    grows = next(c for c in doc["claims"] if c["claim"].startswith("DAMC's lead"))
    assert grows["holds"] and "+24.2 points" in grows["detail"]
    # each method row against NaiveMC and the best single, paired on MCUB-4's items
    mmer_naive = claims["MMER beats NaiveMC on MCUB-4"]
    assert mmer_naive["holds"] and "80.8 vs 60.8" in mmer_naive["detail"]
    assert claims["DARE beats NaiveMC on MCUB-4"]["verdict"] == "does not hold"
    for row in METHOD_ROWS:
        assert claims[f"{row} beats the best single-modality model on MCUB-4"]["holds"]
    assert claims[f"{LABEL_FREE} beats NaiveMC on MCUB-4"]["direction_holds"]
    assert len(doc["retention"]) == 6 * 4 and all(k["ratio"] > 1 for k in doc["retention"])
    assert {k["composition"] for k in doc["retention"]} == {"NaiveMC", "DAMC", *METHOD_ROWS}

    md = (tmp_path / "out" / "report.md").read_text()
    assert md == render_markdown(doc)
    assert "| **DAMC** | 85.8 [" in md and "**holds**: DAMC beats NaiveMC on MCUB-4" in md
    assert "| **MMER** | 80.8 [" in md and "MMER, TIES and DARE compose the shared" in md
    assert "(grid 0.25, 0.5, 0.75, 1)" in md
    assert "By generation" in md and "| NaiveMC | 1" in md  # the retention table
    assert (tmp_path / "out" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # warm: nothing trained, composed or scored again
    n = (len(standins.trained), len(standins.composed), len(standins.scored))
    _run(tmp_path / "again")
    assert (len(standins.trained), len(standins.composed), len(standins.scored)) == n


@pytest.mark.parametrize("stage", [("train", 5), ("compose", 7), ("score", 40)])
def test_an_interrupted_run_resumes_with_only_what_is_missing(standins, tmp_path, stage):
    full = StandIns(tmp_path / "reference")  # the counts of one uninterrupted run
    with pytest.MonkeyPatch.context() as mp:
        full.install(mp)
        _run(tmp_path / "reference-out")
    standins.fail = stage
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    done = (list(standins.trained), list(standins.composed), list(standins.scored))
    _run(tmp_path / "out")
    again = (standins.trained, standins.composed, standins.scored)
    for before, after, ref in zip(
        done, again, (full.trained, full.composed, full.scored), strict=True
    ):
        assert len(after) == len(ref)  # every artefact once: the cached ones not redone
        assert after[: len(before)] == before and sorted(after) == sorted(ref)
    ref_doc = json.loads((tmp_path / "reference-out" / "results.json").read_text())
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["rows"] == ref_doc["rows"] and doc["claims"] == ref_doc["claims"]


def test_quickstart_budget_runs_the_same_stages_with_its_titles():
    assert [s.title for s in qs.stages(MODS, BUDGET) if s.timed] == [
        "prepare assets",
        "build mini-MCUB and its subsets",
        "train 16 single-modality models (2 seeds)",
        "compose NaiveMC and DAMC (lambda search) for every MCUB set, ablations, MMER, TIES, "
        "DARE, label-free search",
        "evaluate",
    ]
    assert [s.name for s in qs.stages(MODS, BUDGET)] == [s.name for s in qs.stages()]
    assert [s.run for s in qs.stages(MODS, BUDGET)] == [s.run for s in qs.stages()]


# ----------------------------------------------------------------------------- docs render
def _docs(path: Path) -> Path:
    path.write_text(
        f"# Results\n\nbefore\n\n{rp.MARK_BEGIN}\nold figures\n{rp.MARK_END}\n\nafter\n"
    )
    return path


def test_docs_render_is_deterministic_and_replaces_only_the_marked_section(standins, tmp_path, run):
    _run(tmp_path / "out")
    docs = _docs(tmp_path / "results.md")
    r = run("reproduce", "render", str(tmp_path / "out"), "--into", str(docs))
    assert r.returncode == 0, r.stderr
    first = docs.read_text()
    head, rest = first.split(rp.MARK_BEGIN)
    section, tail = rest.split(rp.MARK_END)
    assert head == "# Results\n\nbefore\n\n" and tail == "\n\nafter\n"
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    chart_link = "\n![the table's MCUB columns](img/reproduce-composition.png)\n"
    assert section == "\n" + render_section(doc).rstrip() + "\n" + chart_link
    chart = tmp_path / "img" / "reproduce-composition.png"
    assert chart.read_bytes() == (tmp_path / "out" / "chart.png").read_bytes()
    assert "old figures" not in first and "p = " in section and "MCUB-3 AVP" in section
    rp.render_docs(tmp_path / "out", docs)
    assert docs.read_text() == first  # idempotent: the same run renders the same text

    doc["rows"][-1]["cells"][doc["columns"][0]["key"]]["mean"] = 0.123
    (tmp_path / "out" / "results.json").write_text(json.dumps(doc))
    rp.render_docs(tmp_path / "out", docs)
    changed = docs.read_text()
    assert "12.3 [" in changed and changed.split(rp.MARK_BEGIN)[0] == head


def test_docs_render_refuses_missing_markers_and_foreign_folders(tmp_path, run):
    (tmp_path / "run").mkdir()
    docs = tmp_path / "results.md"
    docs.write_text("no markers\n")
    r = run("reproduce", "render", str(tmp_path / "run"), "--into", str(docs))
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "run" / "results.json").write_text(
        json.dumps({"kind": "mmcompose reproduce composition", "format": 1})
    )
    r = run("reproduce", "render", str(tmp_path / "run"), "--into", str(docs))
    assert r.returncode == 2 and "markers" in r.stderr and docs.read_text() == "no markers\n"
    marked = _docs(docs).read_text()
    r = run("reproduce", "render", str(tmp_path / "run"), "--into", str(docs))
    assert r.returncode == 2 and "is incomplete" in r.stderr and docs.read_text() == marked
    with pytest.raises(ConfigError, match="once each"):
        rp.replace_section(f"{rp.MARK_END}\n{rp.MARK_BEGIN}\n", "x")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--modalities", "image,audio,point", "--subsets", "IAV"], "which has no trained source"),
        (["--subsets", "IAX"], "use each of the letters"),
        (["--subsets", "IAVP"], "a subset has at least 3 modalities and fewer"),
        (["--seeds", ""], "the seed list is empty"),
        (["--seeds", " , "], "the seed list is empty"),
        (["--seeds", "0,0"], "distinct"),
        (["--budget", "huge"], "unknown budget"),
        (["--modalities", "image,audio"], "at least 3 modalities"),
    ],
)
def test_bad_options_fail_before_any_work(standins, tmp_path, run, args, message):
    out = tmp_path / "out"
    r = run("reproduce", "composition", "-o", str(out), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in " ".join(r.stderr.split())
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing ran
    assert standins.trained == []


def test_parse_subsets_and_seeds():
    assert rp.parse_subsets("avp,IAV", MODS) == (
        ("audio", "video", "point"),
        ("image", "audio", "video"),
    )
    assert rp.parse_subsets(None, MODS) == tuple(subset_sets(MODS))
    assert (
        rp.parse_subsets("none", MODS) == ()
        and rp.parse_subsets(None, ("image", "audio", "point")) == ()
    )
    assert rp.parse_seeds("2, 0") == (2, 0) and rp.parse_seeds([1]) == (1,)
    with pytest.raises(ConfigError, match="empty"):
        rp.parse_seeds([])
    with pytest.raises(ConfigError, match="empty"):
        rp.plan("smoke", seeds=())


def _corrupt_video(standins: StandIns) -> str:
    """A test-split video of the tiny data made undecodable (garbage bytes)."""
    path = standins.root / "data" / "video" / "cow-test-0.mp4"
    path.write_bytes(b"\x00\x01garbage" * 50)
    return str(path)


def test_an_unreadable_mcub_video_fails_before_any_work_naming_its_path(tmp_path, monkeypatch, run):
    from mmcompose.job_build import unreadable_videos

    standins = StandIns(tmp_path)
    bad = _corrupt_video(standins)
    standins.unreadable = unreadable_videos([bad], num_frames=4)
    assert list(standins.unreadable) == [bad] and bad in standins.unreadable[bad]
    standins.install(monkeypatch)
    r = run("reproduce", "composition", "-o", str(tmp_path / "out"), "--budget", "smoke")
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "unreadable video" in err and bad in err and "(MCUB item MCUB-" in err
    assert "--on-corrupt skip" in err
    assert standins.trained == [] and not (tmp_path / "out").exists()


def test_on_corrupt_skip_drops_the_items_using_the_video_and_names_it(tmp_path, monkeypatch):
    from mmcompose.job_build import unreadable_videos

    standins = StandIns(tmp_path)
    bad = _corrupt_video(standins)
    standins.unreadable = unreadable_videos([bad], num_frames=4)
    standins.install(monkeypatch)
    job = qs.Job(
        tmp_path / "o",
        replace(BUDGET, seeds=(0,)),
        Cache(tmp_path / "c"),
        "0",
        MODS,
        progress=False,
        log=lambda _: None,
        datasets=rp.DATASETS,
        on_corrupt="skip",
    )
    assets = standins.prepare(job)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench = qs.build_benchmark(job, assets)
    assert any(bad in str(w.message) for w in caught)
    sets = [bench.test, bench.search, *(x for s in bench.subsets for x in (s.test, s.search))]
    for q, a in sets:
        for f in (q, a):
            items = json.loads(f.read_text())
            assert items and not any(bad in json.dumps(it) for it in items)
    assert bench.unreadable == {bad}
    # the skipped file's training rows: the trainer is told to skip (only then)
    cfgs = []
    monkeypatch.setattr(
        qs, "_train", lambda job, cfg, label, path: cfgs.append(cfg) or StandIns._write(path, {})
    )
    qs.train_models(job, assets)
    assert {c.tower.modality for c in cfgs if c.on_corrupt == "skip"} == {"video"}


def test_unreadable_videos_names_missing_empty_and_garbage_files(tmp_path):
    from mmcompose.job_build import check_videos, unreadable_videos

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 20)
    bad = unreadable_videos([str(tmp_path / "gone.mp4"), str(empty), str(junk)], 4)
    assert sorted(bad) == sorted(str(p) for p in (tmp_path / "gone.mp4", empty, junk))
    assert all(p in why for p, why in bad.items())
    with pytest.raises(MediaError, match="3 unreadable video file"):
        check_videos(bad, {}, "fail")
    with pytest.raises(ValueError, match="on_corrupt"):
        check_videos(bad, {}, "ignore")


# ----------------------------------------------------------------------------- pieces
def test_gap_growth_on_known_inputs():
    ones, zeros = np.ones((2, 10)), np.zeros((2, 10))
    half = np.array([[1.0] * 5 + [0.0] * 5] * 2)
    obs, lo, hi, p = gap_growth((ones, zeros), [(half, zeros), (zeros, zeros)], n_boot=2000)
    assert obs == pytest.approx(1.0 - 0.25) and lo <= obs <= hi
    assert p < 0.01
    obs, _, _, p = gap_growth((half, zeros), [(half, zeros)], n_boot=2000)
    assert obs == 0.0 and p == 1.0


def test_evaluate_fills_one_row_per_name_and_seed_from_several_models(standins, tmp_path):
    budget = replace(BUDGET, seeds=(0, 3))
    job = qs.Job(
        tmp_path / "o",
        budget,
        Cache(tmp_path / "c"),
        "0",
        MODS,
        progress=False,
        log=lambda _: None,
        datasets=rp.DATASETS,
    )
    out = run_stages(qs.stages(MODS, budget)[:5], job, log=lambda _: None)
    ev = out["evaluation"]
    assert sorted(ev.by_seed) == [0, 3] and ev.rows is ev.by_seed[0]
    damc = next(r for r in ev.by_seed[3] if r.name == "DAMC")
    assert all(damc.scores[c] is not None for c in ev.columns)  # 5 compositions, one row
    assert damc.scores[ev.columns[4]] == round((SKILL["DAMC"] + 0.06) * N_ITEMS) / N_ITEMS
    assert damc.scores[ev.columns[5]] == round(SUBSET_DAMC * N_ITEMS) / N_ITEMS
    assert set(ev.results) == {r.name for r in ev.rows}  # the first seed's blocks


def test_video_tower_is_efficientnet_per_frame_with_the_pooled_projector():
    import torch

    from mmcompose.model.encoders import build_encoder, no_pretrained_weights
    from mmcompose.model.projectors import build_projector
    from mmcompose.recipe import VIDEO_FRAMES, encoder_assets, tower

    t = tower("video")
    assert encoder_assets("video") == ["efficientnet_lite0"] and VIDEO_FRAMES == 4
    with no_pretrained_weights():
        enc = build_encoder(t.encoder).eval()
    frames = np.random.default_rng(0).integers(0, 255, size=(9, 40, 48, 3), dtype=np.uint8)
    x = enc.preprocess(frames, enc.params)
    assert x.shape == (VIDEO_FRAMES, 3, 224, 224)
    with torch.no_grad():
        tokens = enc(x[None])
    assert tokens.shape == (1, 49 + VIDEO_FRAMES, 1280)
    proj = build_projector(t.projector, 1280, 576)
    assert proj(tokens).shape == (1, 4, 576)
    assert t.projector == tower("image").projector and (t.num_prefix, t.num_suffix) == (2, 2)


# ----------------------------------------------------------------------------- real tiny models
def test_the_pipeline_on_real_tiny_models_composes_searches_and_scores(
    tmp_path, monkeypatch, media_files
):
    """Everything real but the training (a tiny random model per modality and strategy,
    one base LLM): MCUB sets built from manifests of real media files, NaiveMC / DAMC /
    the ablations / MMER, TIES, DARE and the label-free search composed by the real compose
    and lambda searches, every cell scored."""
    from mmcompose.testing import build_tiny_model

    rows = []
    for m in MODS:
        for i, label in enumerate(LABELS):
            for split in ("test", "val", "train"):
                rows.append(
                    {
                        "id": f"{m}/{label}/{split}",
                        "path": str(media_files[m]),
                        "modality": m,
                        "label": label,
                        "split": split,
                        "n": i,
                    }
                )
    manifests = {}
    for m in MODS:
        manifests[m] = tmp_path / f"{m}.jsonl"
        manifests[m].write_text("".join(json.dumps(r) + "\n" for r in rows if r["modality"] == m))

    def prepare(job):
        return qs.Assets(manifests, {m: qs.file_digest(p) for m, p in manifests.items()})

    def train(job, cfg, label, path):
        m, s = cfg.tower.modality, cfg.lora.strategy
        salt = MODS.index(m) * 2 + (s == "decoupled") + 10 * cfg.seed
        model, proc = build_tiny_model(modalities=(m,), strategy=s, seed=0, adapter_seed=salt)
        model.save_pretrained(path, processor=proc)

    def build(assets, split, modalities, path):
        from mmcompose.bench.mcub_build import build_mcub

        build_mcub(
            [str(p) for p in assets.manifests.values()],
            path,
            split=split,
            modalities=list(modalities),
            per_combination=12,
            force=True,
            embed=_embed,
        )

    monkeypatch.setattr(qs, "prepare", prepare)
    monkeypatch.setattr(qs, "_train", train)
    monkeypatch.setattr(qs, "_build_mcub", build)
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / "cache"))
    budget, mods = rp.plan(rp.BUDGETS["smoke"], seeds="0", subsets="IAV,AVP")
    budget = replace(
        budget,
        classify_limit=3,
        mcub_limit=4,
        search_limit=4,
        search_grid=(1.0,),
        unlabelled_grid=(0.5, 1.0),
        generate=False,
        generate_mcub=False,
    )  # generation is scored in test_mcub and aggregated in the end-to-end test
    report = qs.run_job(
        tmp_path / "out",
        budget=budget,
        modalities=mods,
        datasets={m: (m,) for m in MODS},
        progress=False,
        log=lambda _: None,
        tag="reproduce",
    )
    rows_ = {r["name"]: r["cells"] for r in report.doc["rows"]}
    labels = [c["label"] for c in report.doc["columns"]]
    assert labels == ["MCUB-4", "MCUB-3 IAV", "MCUB-3 AVP", *(f"{m} (test)" for m in MODS)]
    keys = [c["key"] for c in report.doc["columns"]]
    assert all(rows_["DAMC"][k]["items"] == (4 if k.startswith("mini") else 3) for k in keys)
    assert rows_[qs.FIXED][keys[0]]["items"] == 4 and "generate" not in rows_[qs.FIXED][keys[0]]
    assert rows_["point-shared"][keys[1]] is None and rows_["point-shared"][keys[2]] is not None
    for c in report.doc["claims"]:
        assert c["p"] is not None and 0 < c["p"] <= 1
    assert (tmp_path / "out" / "lambda_search").is_dir()
    reports = sorted(
        (tmp_path / "cache" / "quickstart" / "compositions").glob("*/composition_report.json")
    )
    assert len(reports) == 3 * 2 + 2 + 4  # NaiveMC, DAMC per set; ablations; method rows
    fixed = next(p for p in reports if p.parent.name.startswith("damc-fixed-"))
    assert "0.25" in fixed.read_text()  # lambda = 1/N with N = 4
    for row in METHOD_ROWS:  # MCUB-4 and every test split, not the subsets
        assert [k for k in keys if rows_[row][k] is not None] == [keys[0], *keys[3:]]
    folders = {p.parent.name.rsplit("-", 1)[0]: p.parent for p in reports}
    mmer = json.loads((folders["mmer"] / "config.json").read_text())
    assert mmer["mmer"]["modalities"] == list(MODS)  # one mask per modality
    dare = json.loads(folders["dare"].joinpath("composition_report.json").read_text())
    assert dare["config"]["merge_method"] == "dare_linear" and dare["config"]["seed"] == 0
    found = json.loads((folders["naivemc-unlabelled"] / "search" / "search.json").read_text())
    assert found["criterion"] == "consistency" and found["n_items"] == 4
    assert found["metric"] == "consistency,loglikelihood" and found["grid"] == [0.5, 1.0]
