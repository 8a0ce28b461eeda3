"""The quickstart's pure parts: the claims check, the report and chart, the eval subsets, the
cache keys, the stage wiring, and the evaluation stage's caching (with stand-in models).
(The whole job runs on real assets in `make quickstart`; its figures are in docs/results.md.)"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest

from mmcompose import quickstart as qs
from mmcompose.fs import atomic_dir, write_json_atomic
from mmcompose.pipeline import Cache, run_stages
from mmcompose.quickstart import (
    MODALITIES,
    Budget,
    QuickstartReport,
    Row,
    _subset,
    render_markdown,
    train_config,
)
from mmcompose.report import N_BOOT, check_claims, render_chart

COLS = [*(f"{m} (test)" for m in MODALITIES), "mini-MCUB IAP"]


N_ITEMS = 200  # per column: DAMC 95% vs NaiveMC 90% is 10 discordant items, McNemar p = 0.002


def _items(score: float | None) -> list[float] | None:
    """Nested 0/1 vectors (the first round(score * n) items right), so a better model is
    right wherever a worse one is: discordant items all favour it."""
    if score is None:
        return None
    k = round(score * N_ITEMS)
    return [1.0] * k + [0.0] * (N_ITEMS - k)


def _rows(naive: float, damc: float, keep: float, per_item: bool = True) -> list[Row]:
    rows = []
    for s in ("shared", "decoupled"):
        for i, m in enumerate(MODALITIES):
            scores = dict.fromkeys(COLS)
            scores[COLS[i]] = 0.8
            scores[COLS[-1]] = 0.5 + 0.1 * i
            rows.append(Row(f"{m}-{s}", "single", scores))
    for name, mcub in (("NaiveMC", naive), ("DAMC", damc)):
        scores = {c: 0.8 * keep for c in COLS[:-1]} | {COLS[-1]: mcub}
        rows.append(Row(name, "composed", scores))
    for r in rows:
        if per_item:
            r.correct = {c: v for c, v in ((c, _items(x)) for c, x in r.scores.items()) if v}
    return rows


@pytest.mark.parametrize(
    ("naive", "damc", "keep", "expected"),
    [
        (0.9, 0.95, 1.0, [True, True, True, True, True]),
        (0.6, 0.65, 0.9, [False, False, True, False, False]),
        (0.9, 0.85, 0.96, [True, True, False, True, True]),
    ],
)
def test_claims_follow_the_numbers(naive, damc, keep, expected):
    claims = check_claims(_rows(naive, damc, keep), COLS, MODALITIES)
    assert [c.ok for c in claims] == expected
    assert "vs best single point-" in claims[0].detail  # the best single model on MCUB is named


def test_report_and_chart(tmp_path):
    report = QuickstartReport(tmp_path, _rows(0.9, 0.95, 1.0), {"total": 12.0}, columns=COLS)
    report.rows[0].stderr[COLS[0]] = 0.05
    report.rows[0].scores[f"{COLS[0]} gen"] = 0.7
    report.claims = check_claims(report.rows, COLS, MODALITIES)
    md = render_markdown(report)
    assert "| image-shared | 80.0 ± 5.0 (70.0) | — | — | 50.0 |" in md
    assert md.count("holds:") == 5
    render_chart(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_claims_hold_only_where_the_paired_test_says_so():
    from mmcompose.bench.stats import mcnemar_exact

    clear = check_claims(_rows(0.9, 0.95, 1.0), COLS, MODALITIES)
    assert [c.verdict for c in clear] == ["holds"] * 5 and all(c.significant for c in clear)
    # DAMC vs NaiveMC: 190 vs 180 nested items = 10 discordant, all DAMC's: p = 2 / 2**10
    assert clear[2].p == 2 * 0.5**10 == mcnemar_exact(_items(0.95), _items(0.9)).p
    # beating every single model: the largest p over them (the best single's here)
    assert clear[0].p == mcnemar_exact(_items(0.9), _items(0.7)).p

    # right direction, too few discordant items: within noise, with the p-value
    close = check_claims(_rows(0.72, 0.725, 0.96), COLS, MODALITIES)
    assert [c.ok for c in close] == [True] * 5 and not any(c.significant for c in close)
    assert close[0].verdict == "holds within noise (p = 0.12)"  # 144 vs 140: 4 items, p = 1/8
    assert close[2].verdict == "holds within noise (p = 1)"  # one discordant item
    assert close[3].p is not None and close[3].p > 0.05  # 96% kept: not clearly above 95%
    assert "image 96% [" in close[3].detail

    wrong = check_claims(_rows(0.6, 0.65, 0.9), COLS, MODALITIES)
    assert wrong[0].verdict == "does not hold" and wrong[0].p is not None
    untested = check_claims(_rows(0.9, 0.95, 1.0, per_item=False), COLS, MODALITIES)
    assert {c.verdict for c in untested} == {"untested (no per-item results)"}
    assert all(c.p is None for c in untested)

    report = QuickstartReport(Path("unused"), _rows(0.72, 0.725, 0.96), {}, columns=COLS)
    report.claims = close
    md = render_markdown(report)
    assert "- holds within noise (p = 1): DAMC >= NaiveMC on mini-MCUB (72.5 vs 72.0; " in md
    assert "exact McNemar p = 1)" in md


def test_cli_prints_each_claim_with_its_p_value(run, tmp_path, monkeypatch):
    report = QuickstartReport(tmp_path, _rows(0.72, 0.95, 1.0), {"total": 1.0}, columns=COLS)
    report.claims = check_claims(report.rows, COLS, MODALITIES)
    monkeypatch.setattr(qs, "run_quickstart", lambda *a, **k: report)
    r = run("quickstart", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "holds within noise (p = 0.12): NaiveMC beats every single-modality model" in out
    assert "holds: DAMC beats every single-modality model on mini-MCUB" in out
    assert "exact McNemar vs each single model, largest p = 1.8e-15" in out  # 2 / 2**50


def test_subset_is_deterministic_and_spread():
    rows = [{"id": i} for i in range(100)]
    sub = _subset(rows, 10)
    assert [r["id"] for r in sub] == list(range(0, 100, 10))
    assert _subset(rows[:5], 10) == rows[:5]


def test_train_configs_differ_only_in_strategy():
    a = train_config("audio", "shared", Budget(), ["m.jsonl"])
    b = train_config("audio", "decoupled", Budget(), ["m.jsonl"])
    da, db = a.model_dump(), b.model_dump()
    assert da.pop("lora")["strategy"] == "shared" and db.pop("lora")["strategy"] == "decoupled"
    assert da == db
    assert a.projector_init == "lstsq" and a.system_prompt == ""


# ----------------------------------------------------------------------------- cache keys
def test_keys_keep_the_existing_cache_warm():
    """Pinned digests of the layout before the pipeline refactor: a change here makes every
    existing quickstart cache cold (retrain, recompose, re-evaluate), so it must be meant."""
    assert qs.naive_key(["a" * 16, "b" * 16], "0.1.0") == "6f1c7517a4596a56"
    assert qs.mcub_key({"spoken": "1" * 16, "emoji": "0" * 16}, "0.1.0") == "b8f1803447cb6de5"


def test_a_recipe_change_rekeys_only_its_model():
    base = Budget()
    longer_image = Budget(stage2_epochs=(("image", 1.0), ("audio", 0.5), ("point", 1.0)))

    def key(m: str, budget: Budget, data: str = "d" * 16) -> str:
        return qs.model_key(train_config(m, "shared", budget, [f"{m}.jsonl"]), [data], "0.1.0")

    assert key("image", longer_image) != key("image", base)
    assert key("audio", longer_image) == key("audio", base)  # the audio model stays cached
    assert key("audio", base, data="e" * 16) != key("audio", base)  # its data changed
    search = "s" * 16
    damc = qs.damc_key(["k"], base, search, "0.1.0")
    assert qs.damc_key(["k"], Budget(search_grid=(0.5,)), search, "0.1.0") != damc
    assert qs.damc_key(["k"], base, "t" * 16, "0.1.0") != damc  # another validation set
    assert qs.damc_key(["k"], Budget(classify_limit=None), search, "0.1.0") == damc
    assert qs.eval_key(["t"], ("image",)) != qs.eval_key(["t"], MODALITIES)


# ----------------------------------------------------------------------------- the stages
def test_stage_list_is_wired_to_the_stage_functions():
    st = qs.stages()
    assert [s.name for s in st] == [
        "assets",
        "benchmark",
        "singles",
        "composed",
        "evaluation",
        "report",
    ]
    for s in st:  # each function takes the job and exactly the outputs it is wired to
        assert len(inspect.signature(s.run).parameters) == 1 + len(s.inputs), s.name
    # the timing names of docs/results.md and earlier reports
    assert [s.title for s in st if s.timed] == [
        "prepare assets",
        "build mini-MCUB",
        "train 6 single-modality models",
        "compose NaiveMC and DAMC (lambda search)",
        "evaluate",
    ]
    seen = []
    stub = [replace(s, run=lambda _job, *a, n=s.name: seen.append((n, a)) or n) for s in st]
    out = run_stages(stub, None, log=lambda _: None)
    assert out["report"] == "report"
    assert dict(seen)["evaluation"] == ("assets", "benchmark", "singles", "composed")


def _stand_in_tasks(calls: list, block: dict | None = None):
    """Tasks with the quickstart's columns whose run records its call instead of scoring and
    returns ``block`` (default: counts only)."""
    block = block or {"acc,loglikelihood": 0.5, "acc_stderr,loglikelihood": 0.1, "n": 4}

    def tasks(_manifests, _mcub, _budget, modalities):
        def run_for(name: str):
            def run(model, _proc, mods, _progress):
                calls.append((model, name, tuple(mods)))
                return dict(block)

            return run

        out = [qs.Task(f"classify_{m}", m, "acc,loglikelihood", [m], run_for(m), 4)
               for m in modalities]  # fmt: skip
        return [*out, qs.Task("mcub", None, "acc,loglikelihood", ["mcub"], run_for("mcub"), 4)]

    return tasks


def _stand_in_models(tmp_path) -> tuple[dict, dict]:
    """The six single models and two compositions, by name, with made-up keys."""
    singles = {
        f"{m}-{s}": qs.Model(f"{m}-{s}", "single", tmp_path / f"{m}-{s}", f"k-{m}-{s}", (m,))
        for m in MODALITIES
        for s in qs.STRATEGIES
    }
    composed = {
        n: qs.Model(n, "composed", tmp_path / n, f"k-{n}", MODALITIES) for n in ("NaiveMC", "DAMC")
    }
    return singles, composed


def test_evaluate_caches_each_cell_under_its_model(tmp_path, monkeypatch):
    calls, loads, logs = [], [], []
    monkeypatch.setattr(qs, "_tasks", _stand_in_tasks(calls))
    monkeypatch.setattr(qs, "_load", lambda path: (loads.append(path.name) or path.name, None))
    job = qs.Job(tmp_path / "out", Budget(), Cache(tmp_path / "cache"), "0", log=logs.append)
    singles, composed = _stand_in_models(tmp_path)
    assets = qs.Assets({}, {})
    bench = qs.Benchmark(*[(tmp_path / "q.json", tmp_path / "a.json")] * 3)

    ev = qs.evaluate(job, assets, bench, singles, composed)
    assert ev.columns == COLS
    assert [r.name for r in ev.rows] == [
        *(f"{m}-shared" for m in MODALITIES),
        *(f"{m}-decoupled" for m in MODALITIES),
        "NaiveMC",
        "DAMC",
    ]
    assert ev.rows[1].scores == {COLS[0]: None, COLS[1]: 0.5, COLS[2]: None, COLS[3]: 0.5}
    assert ev.rows[1].stderr == {COLS[1]: 0.1, COLS[3]: 0.1}
    # a single model answers MCUB with its own modality only; each model is loaded once
    assert ("audio-shared", "mcub", ("audio",)) in calls
    assert ("DAMC", "mcub", MODALITIES) in calls
    assert len(calls) == 6 * 2 + 2 * 4 and sorted(loads) == sorted([*singles, *composed])

    singles["audio-shared"] = replace(singles["audio-shared"], key="k-retrained")
    again = qs.evaluate(job, assets, bench, singles, composed)
    assert [r.scores for r in again.rows] == [r.scores for r in ev.rows]
    assert calls[20:] == [
        ("audio-shared", "audio", ("audio",)),
        ("audio-shared", "mcub", ("audio",)),
    ]
    assert loads.count("audio-shared") == 2 and len(loads) == 9  # nothing else reloaded
    assert job.cache.hits == 18

    (tmp_path / "DAMC" / "search").mkdir(parents=True)
    (tmp_path / "DAMC" / "search" / "search.md").write_text("lambdas\n")
    out = qs.report(job, assets, bench, composed, again)
    assert out.rows is again.rows and out.timings["total"] > 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["columns"] == COLS and len(doc["claims"]) == 5
    assert (tmp_path / "out" / "lambda_search" / "search.md").read_text() == "lambdas\n"
    assert (tmp_path / "out" / "results" / "NaiveMC").is_dir()


def test_evaluate_keeps_per_item_results_and_rescores_entries_without_them(tmp_path, monkeypatch):
    calls: list = []
    v = [1.0, 0.0, 1.0, 1.0]
    block = {"acc,loglikelihood": 0.75, "n": 4, "per_item": {"acc,loglikelihood": v}}
    monkeypatch.setattr(qs, "_tasks", _stand_in_tasks(calls, block))
    monkeypatch.setattr(qs, "_load", lambda path: (path.name, None))
    job = qs.Job(tmp_path / "out", Budget(), Cache(tmp_path / "cache"), "0", log=lambda _: None)
    singles, composed = _stand_in_models(tmp_path)
    # an entry from before per-item results were kept: counts only
    old = job.cache.path("evals", "k-DAMC", qs.eval_key(["mcub"], MODALITIES), ".json")
    write_json_atomic(old, {"acc,loglikelihood": 0.5, "n": 4})
    args = (job, qs.Assets({}, {}), qs.Benchmark(*[(tmp_path / "q.json",) * 2] * 3))

    ev = qs.evaluate(*args, singles, composed)
    assert ("DAMC", "mcub", MODALITIES) in calls and len(calls) == 6 * 2 + 2 * 4  # rescored
    assert json.loads(old.read_text())["per_item"] == {"acc,loglikelihood": [1.0, 0.0, 1.0, 1.0]}
    damc = ev.rows[-1]
    assert damc.scores[COLS[-1]] == 0.75 and damc.correct[COLS[-1]] == [1.0, 0.0, 1.0, 1.0]
    assert set(ev.rows[0].correct) == {COLS[0], COLS[-1]}  # image-shared: its cells only
    claims = check_claims(ev.rows, ev.columns, MODALITIES)
    # every model right on the same items: no evidence of an ordering; 100% retained in every
    # bootstrap replicate but those that draw only the wrong item (no ratio: (1/4)^4 of them)
    assert [c.p for c in claims[:3]] == [1.0] * 3
    assert all(c.significant and c.p > 1 / (N_BOOT + 1) for c in claims[3:])

    calls.clear()
    again = qs.evaluate(*args, singles, composed)
    assert calls == [] and [r.correct for r in again.rows] == [r.correct for r in ev.rows]


def test_benchmark_stage_builds_each_split_once_and_cuts_the_search_set(tmp_path, monkeypatch):
    builds = []

    def stand_in_build(_assets, split, _mods, path):  # writes as build_mcub does: atomically
        builds.append(split)
        with atomic_dir(path, overwrite=True) as tmp:
            for suffix in (".json", ".answers.json"):
                items = [{"id": f"{split}{i}", "s": suffix} for i in range(40)]
                write_json_atomic(tmp / f"MCUB-3-IAP{suffix}", items)

    monkeypatch.setattr(qs, "_build_mcub", stand_in_build)
    job = qs.Job(tmp_path / "out", Budget(), Cache(tmp_path / "cache"), "0", log=lambda _: None)
    assets = qs.Assets({}, {"emoji": "e" * 16})
    bench = qs.build_benchmark(job, assets)
    assert builds == ["test", "val"]
    assert bench.test[0].parent.name == f"test-{qs.mcub_key(assets.data_key, '0')}"
    q, a = (json.loads(p.read_text()) for p in bench.search)
    assert [x["id"] for x in q] == [f"val{i}" for i in range(24)] and a[0]["s"] == ".answers.json"
    # the search set's bytes are what the DAMC key digests: written as before the refactor
    assert bench.search[0].read_text() == json.dumps(q, indent=2, ensure_ascii=False) + "\n"
    assert qs.build_benchmark(job, assets) == bench and builds == ["test", "val"]
    wider = replace(job, budget=Budget(search_limit=30))
    assert len(json.loads(qs.build_benchmark(wider, assets).search[0].read_text())) == 30
    assert builds == ["test", "val"]  # a new search set, the same mini-MCUB


# ----------------------------------------------------------------------------- one job, budgets
def test_the_default_budget_is_the_quickstart_and_a_seed_rekeys_only_its_models():
    """The reproduction's generalisation (seeds, subsets, video) leaves the quickstart's
    configs, keys and stage list as they were; another seed is another model."""
    base = train_config("image", "decoupled", Budget(), ["m.jsonl"])
    assert base == train_config("image", "decoupled", Budget(), ["m.jsonl"], 0, "fail")
    assert base.seed == 0 and base.on_corrupt == "fail"
    assert [s.title for s in qs.stages(MODALITIES, Budget())] == [s.title for s in qs.stages()]
    data = {"e": "0" * 16}
    assert qs.mcub_key(data, "0.1.0", MODALITIES) == qs.mcub_key(data, "0.1.0")
    four = ("image", "audio", "video", "point")
    assert qs.mcub_key(data, "0.1.0", four) != qs.mcub_key(data, "0.1.0")

    def key(seed: int, m: str = "audio") -> str:
        cfg = train_config(m, "shared", Budget(), [f"{m}.jsonl"], seed)
        return qs.model_key(cfg, ["d" * 16], "0.1.0")

    assert key(1) != key(0) and key(1) == key(1)
    video = train_config("video", "shared", Budget(), ["v.jsonl"])
    assert video.stage2.epochs == 0.75 and video.tower.encoder.name == "video_frames"
    fixed = qs.ablation_key("fixed", ["k"], Budget(), "s" * 16, "0.1.0")
    assert fixed == qs.ablation_key("fixed", ["k"], Budget(search_grid=(1.0,)), "", "0.1.0")
    searched = qs.ablation_key("naive-search", ["k"], Budget(), "s" * 16, "0.1.0")
    assert searched != qs.damc_key(["k"], Budget(), "s" * 16, "0.1.0")  # not DAMC's entry


def test_which_model_fills_which_cell():
    from mmcompose.job_tasks import Task, takes

    four = ("image", "audio", "video", "point")
    run = lambda *a: {}  # noqa: E731
    cls = Task("classify_video", "video", "acc,loglikelihood", [], run, 1)
    mcub4 = Task("mcub", None, "acc,loglikelihood", [], run, 1)
    iav = Task("mcub_iav", None, "acc,loglikelihood", [], run, 1, ("image", "audio", "video"))

    def model(kind, mods, classify=True):
        return qs.Model("m", kind, Path("m"), "k", mods, classify=classify)

    video, point = model("single", ("video",)), model("single", ("point",))
    assert [takes(video, t, four) for t in (cls, mcub4, iav)] == [True, True, True]
    assert [takes(point, t, four) for t in (cls, mcub4, iav)] == [False, True, False]
    whole, sub = model("composed", four), model("composed", ("image", "audio", "video"))
    assert [takes(whole, t, four) for t in (cls, mcub4, iav)] == [True, True, False]
    assert [takes(sub, t, four) for t in (cls, mcub4, iav)] == [False, False, True]
    ablation = model("composed", four, classify=False)
    assert [takes(ablation, t, four) for t in (cls, mcub4, iav)] == [False, True, False]
