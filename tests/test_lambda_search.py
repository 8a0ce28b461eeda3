"""DAMC's adaptive coefficients: the pure search (fake scorers with known optima), in-memory
re-weighting against compositions written to disk, ``compose --search`` end to end on tiny
models with an MCUB-format validation file, and the refusals."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mmcompose.compose.config import parse_compose_config
from mmcompose.compose.executor import REPORT_NAME, compose
from mmcompose.compose.search import (
    SEARCH_DIR,
    InMemoryComposition,
    InvalidWeights,
    SearchResult,
    parse_grid,
    run_search,
    search_coefficients,
    start_weights,
    with_weights,
    write_search_report,
)
from mmcompose.errors import ConfigError, MergeError
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.model.processor import MMProcessor
from mmcompose.testing import (
    compose_config,
    float64_model,
    float_tol,
    save_tiny_single,
    tiny_inputs,
    to_float64,
)

GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MODS = ("image", "audio")
PROMPT = "image: <image>\naudio: <audio>\nwhat do they share?"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- pure search


def _quadratic(target):
    """A separable concave score, maximal exactly at ``target`` (on the grid)."""
    return lambda w: -sum((x - t) ** 2 for x, t in zip(w, target, strict=True))


def test_coordinate_finds_separable_optimum():
    target = (0.25, 1.25, 0.75)
    res = run_search(_quadratic(target), 3, GRID, method="coordinate")
    assert res.best_weights == target and res.best_accuracy == 0.0
    first = res.candidates[0]
    assert first.weights == (1 / 3,) * 3 and first.pass_ == 0 and first.swept is None
    # one pass reaches it, the second confirms nothing moves, then it stops
    assert res.passes == 2
    assert {c.pass_ for c in res.candidates} == {0, 1, 2}
    # the current point is revisited in every sweep but scored once
    scored = [c.weights for c in res.candidates if not c.cached]
    assert len(scored) == len(set(scored))
    assert any(c.cached for c in res.candidates)


def test_coordinate_passes_and_local_optimality():
    """A coupled score needs more than one pass; the result is optimal along every axis."""

    def f(w):
        return -((w[0] - w[1]) ** 2) * 4 - (w[0] + w[1] - 2.0) ** 2

    res = run_search(f, 2, GRID, method="coordinate", start=(0.0, 0.0))
    assert res.passes >= 2
    best = res.best_weights
    for m in range(2):
        for v in GRID:
            w = list(best)
            w[m] = v
            assert f(tuple(w)) <= f(best)
    assert res.passes <= 3
    one = run_search(f, 2, GRID, method="coordinate", start=(0.0, 0.0), max_passes=1)
    assert one.passes == 1 and {c.pass_ for c in one.candidates} == {0, 1}
    assert f(one.best_weights) < f(best)  # one sweep stops short of the coupled optimum


def test_grid_finds_global_optimum_of_coupled_score():
    def f(w):
        return -((w[0] * w[1] - 0.5625) ** 2) - 0.01 * (w[0] - 0.75) ** 2

    res = run_search(f, 2, GRID, method="grid")
    assert len(res.candidates) == len(GRID) ** 2
    expected = max(itertools.product(GRID, repeat=2), key=f)
    assert res.best_weights == expected == (0.75, 0.75)


def test_search_is_deterministic():
    def f(w):
        return round(sum(w) % 1.0, 6)  # many ties

    for method in ("grid", "coordinate"):
        a = run_search(f, 2, GRID, method=method)
        b = run_search(f, 2, GRID, method=method)
        assert [(c.weights, c.accuracy, c.cached) for c in a.candidates] == [
            (c.weights, c.accuracy, c.cached) for c in b.candidates
        ]
        assert a.best.index == b.best.index


def test_ties_go_to_the_start_then_the_earlier_candidate():
    flat = run_search(lambda w: 0.5, 2, GRID, method="coordinate", start=(0.5, 1.0))
    assert flat.best.index == 0 and flat.best_weights == (0.5, 1.0) and flat.passes == 1
    grid = run_search(lambda w: 0.5, 2, GRID, method="grid", start=(0.75, 0.25))
    assert grid.best_weights == (0.75, 0.25)
    # start off the grid: the nearest grid point, the earlier one among equally near
    grid = run_search(lambda w: 0.5, 2, GRID, method="grid", start=(0.6, 0.6))
    assert grid.best_weights == (0.5, 0.5)

    def step(w):  # 1 from w0 >= 0.5 on: the first such grid value wins
        return float(w[0] >= 0.5)

    res = run_search(step, 2, GRID, method="coordinate", start=(0.0, 0.25))
    assert res.best_weights == (0.5, 0.25)
    # a later grid value equal to the incumbent does not move it
    res = run_search(step, 2, (1.0, 0.5, 0.75), method="coordinate", start=(0.0, 0.0))
    assert res.best_weights == (1.0, 0.0)


def test_invalid_weights_are_recorded_never_chosen():
    def f(w):
        if sum(w) == 0:
            raise InvalidWeights("weights sum to zero")
        return -abs(sum(w) - 0.01)  # would prefer the zero vector

    res = run_search(f, 2, (0.0, 0.25), method="grid")
    bad = [c for c in res.candidates if c.error]
    assert [c.weights for c in bad] == [(0.0, 0.0)] and bad[0].accuracy is None
    assert res.best.error is None and sum(res.best_weights) > 0
    with pytest.raises(MergeError, match="no candidate weights could be scored"):
        run_search(f, 2, (0.0,), method="grid")
    # other errors end the search at once
    with pytest.raises(ZeroDivisionError):
        run_search(lambda w: 1 / 0, 2, GRID)


def test_grid_size_and_grid_values_are_checked():
    with pytest.raises(ConfigError, match="1296 candidates") as e:
        run_search(lambda w: 0.0, 4, GRID, method="grid")
    assert "coordinate" in e.value.hint
    assert parse_grid("0, 0.5,1,0.5") == (0.0, 0.5, 1.0)
    assert parse_grid([1, 0]) == (1.0, 0.0)
    for bad, match in [("0,x", "not a number"), ("nan", "not finite"), ("1,inf", "not finite"),
                       ("", "not a number"), ([], "empty")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            parse_grid(bad)
    with pytest.raises(ConfigError, match="search method"):
        run_search(lambda w: 0.0, 2, GRID, method="random")  # type: ignore[arg-type]


def _check_report(folder: Path, res: SearchResult) -> dict:
    assert (folder / "search.png").read_bytes()[:8] == PNG_MAGIC
    md = (folder / "search.md").read_text()
    assert "| # | pass | swept |" in md and "**best**" in md
    assert md.count("\n| ") == len(res.candidates) + 1  # header + one row per candidate
    data = json.loads((folder / "search.json").read_text())
    assert len(data["candidates"]) == len(res.candidates)
    assert list(data["best"]["weights"].values()) == list(res.best_weights)
    return data


@pytest.mark.parametrize(("method", "n"), [("coordinate", 3), ("grid", 2), ("grid", 3)])
def test_report_files(tmp_path, method, n):
    res = run_search(_quadratic((0.5,) * n), n, (0.0, 0.5, 1.0), method=method)
    files = write_search_report(res, tmp_path / "rep")
    assert sorted(p.name for p in files.values()) == ["search.json", "search.md", "search.png"]
    data = _check_report(tmp_path / "rep", res)
    assert data["method"] == method and data["sources"] == [f"source {i}" for i in range(n)]
    with pytest.raises(Exception, match="exists"):
        write_search_report(res, tmp_path / "rep")
    write_search_report(res, tmp_path / "rep", force=True)


# ---------------------------------------------------------------- config helpers


def test_start_and_with_weights(tmp_path):
    paths = [str(tmp_path / n) for n in ("a", "b", "c")]
    cfg = parse_compose_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": paths[0],
            "models": [
                {"model": paths[0]},
                {"model": paths[1], "parameters": {"weight": 0.3}},
                {"model": paths[2], "parameters": {"weight": 0.9}},
            ],
        }
    )
    assert start_weights(cfg) == (0.3, 0.9)  # the base listed among the models is not merged
    new = with_weights(cfg, [1.25, 0.0])
    assert [e.parameters.get("weight") for e in new.models] == [None, 1.25, 0.0]
    assert start_weights(new) == (1.25, 0.0)
    cond = parse_compose_config(
        {
            "merge_method": "linear",
            "models": [{"model": p} for p in paths],
            "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
        }
    )
    assert start_weights(cond) == (1 / 3,) * 3
    with pytest.raises(ConfigError, match="2 weights for 3"):
        with_weights(cond, [1.0, 1.0])


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("single")
    return {
        s: [save_tiny_single(d, m, s, 20 + k) for k, m in enumerate(MODS)]
        for s in ("shared", "decoupled")
    }


def _cfg(paths, method="task_arithmetic", weights=None, **extra) -> dict:
    return compose_config(paths, method, weights, **extra)


def _yaml(folder: Path, name: str, cfg: dict) -> Path:
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _logits(model: MMComposeForCausalLM, proc: MMProcessor) -> torch.Tensor:
    raw = tiny_inputs(3)
    batch = proc(PROMPT, {m: [raw[m]] for m in MODS})
    if model.language_model.dtype == torch.float64:
        batch = to_float64(batch)
    with torch.no_grad():
        return model(**batch, padding_side="left").logits


CASES = {
    "damc-task_arithmetic": ("decoupled", {"parameters": {"lambda": 0.5}}),
    "damc-linear-normalized": ("decoupled", {}),
    "naivemc-folded": ("shared", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_in_memory_equals_composition_on_disk(tmp_path, sources, case):
    """Logits of the re-weighted in-memory model == those of the model composed to disk with
    the same weights (through the method's own coefficients: lambda, normalize, folding)."""
    strategy, extra = CASES[case]
    method = "linear" if "linear" in case else "task_arithmetic"
    paths = sources[strategy]
    cfg = parse_compose_config(_cfg(paths, method, **extra))
    mem = InMemoryComposition(cfg, tmp_path / "mem", [1.0, 1.0])
    assert mem.model.config.lora.adapters["text"].rank == 8  # two rank-4 sources, concatenated
    float64_model(mem.model)  # forward in float64 (apply() still writes the float32 values)
    start = _logits(mem.model, mem.processor)
    for weights in ([0.3, 1.25], [1.0, 0.0]):
        mem.apply(weights)
        out = tmp_path / f"disk-{weights[0]}"
        compose(with_weights(cfg, weights), out, progress=False)
        disk = float64_model(MMComposeForCausalLM.from_pretrained(out))
        expected = _logits(disk, MMProcessor.from_pretrained(out))
        got = _logits(mem.model, mem.processor)
        # DAMC: both hold B = concat_factors(...) of the same float32 factors, so the same
        # weights and kernels: bit-exact. NaiveMC folds dW into W on disk, rounding each
        # weight once to float32 (the float64 forward adds none): float32 eps of the logits,
        # sqrt(hidden) terms per row. A wrong coefficient moves logits by O(1).
        hidden = disk.language_model.config.hidden_size
        mag = float(expected.abs().max())
        tol = 0.0 if strategy == "decoupled" else float_tol(torch.float32, mag, n_terms=hidden)
        torch.testing.assert_close(got, expected, atol=tol, rtol=0)
        assert not torch.allclose(got, start, atol=1e-3)  # the weights do change the model
    mem.apply([1.0, 1.0])
    # Bit-exact: apply() rebuilds B with the composition's own concat_factors on the same data
    torch.testing.assert_close(_logits(mem.model, mem.processor), start, atol=0, rtol=0)


def test_linear_zero_sum_is_an_invalid_candidate(tmp_path, sources):
    cfg = parse_compose_config(_cfg(sources["decoupled"], "linear"))
    mem = InMemoryComposition(cfg, tmp_path / "mem", [1.0, 1.0])
    with pytest.raises(InvalidWeights, match="sum to zero"):
        mem.apply([0.0, 0.0])
    assert any("ratios" in n for n in mem.notes)


def test_unsearchable_compositions_are_refused(tmp_path, sources):
    cfg = parse_compose_config(_cfg(sources["decoupled"], "ties", [1.0, 1.0]))
    with pytest.raises(ConfigError, match="cannot be re-weighted") as e:
        search_coefficients(cfg, scorer=lambda m, p: 0.0, progress=False)
    assert "task_arithmetic" in e.value.hint


def test_search_api_with_a_scorer_prefers_the_better_source(tmp_path, sources):
    """A scorer that rewards closeness to source 0's text adapter: the search must find
    lambda = (1, 0) (scoring the real in-memory model, not the weights)."""
    paths = sources["decoupled"]

    def last_logits(model, proc):  # a text + image prompt: the image source's text adapter
        raw = tiny_inputs(3)
        batch = proc("image: <image>\nwhat is it?", {"image": [raw["image"]]})
        with torch.no_grad():
            return model(**batch, padding_side="left").logits[..., -1, :]

    ref = last_logits(
        MMComposeForCausalLM.from_pretrained(paths[0]), MMProcessor.from_pretrained(paths[0])
    )

    def scorer(model, proc):
        return -float((last_logits(model, proc) - ref).abs().mean())

    cfg = parse_compose_config(_cfg(paths))  # damc without weights: the search supplies them
    res = search_coefficients(cfg, scorer=scorer, grid="0,0.5,1", method="grid", progress=False)
    assert res.best_weights == (1.0, 0.0)
    assert res.metric == "score" and res.n_items is None
    assert res.sources == [p.name for p in paths]
    assert all(c.seconds > 0 for c in res.candidates)


# ---------------------------------------------------------------- compose --search


OPTIONS = "A. dog\nB. piano\nC. water\nD. fire"


def _mcub(folder: Path, media: dict[str, Path], n: int = 3, gold: bool = True) -> Path:
    items = [
        {
            "id": f"q{i}",
            "conversations": [
                {
                    "from": "human",
                    "value": f"image: <image>\naudio: <audio>\nWhat do they share?\n{OPTIONS}",
                },
                {"from": "gpt", "value": "ABCD"[i % 4] if gold else None},
            ],
            "modal_inputs": {"vision": [str(media["image"])], "audio": [str(media["audio"])]},
        }
        for i in range(n)
    ]
    path = folder / ("val.json" if gold else "val-questions.json")
    path.write_text(json.dumps(items))
    return path


def test_compose_search_end_to_end(tmp_path, sources, media_files, run):
    val = _mcub(tmp_path, media_files)
    cfg = _yaml(tmp_path, "damc", _cfg(sources["decoupled"]))  # no weights given
    out = tmp_path / "out"
    r = run("compose", str(cfg), "-o", str(out), "--search", str(val), "--grid", "0,0.5,1")
    assert r.returncode == 0, r.stderr
    assert "search (coordinate, acc,loglikelihood): best" in r.stdout
    data = _check_report(out / SEARCH_DIR, _result_of(out))
    # the report lists what the command scored (the printed count), not a reconstruction
    scored = int(re.search(r"after (\d+) candidates", r.stdout)[1])
    assert scored == sum(not c["cached"] for c in data["candidates"]) >= 1 + 2 * 2
    assert data["n_items"] == 3 and data["mode"] == "loglikelihood"
    assert all(0 <= c["accuracy"] <= 1 for c in data["candidates"])
    report = json.loads((out / REPORT_NAME).read_text())
    weights = [m["parameters"]["weight"] for m in report["config"]["models"]]
    assert weights == list(data["best"]["weights"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    model = MMComposeForCausalLM.from_pretrained(out)
    assert model.modalities == list(MODS)


def _result_of(out: Path) -> SearchResult:
    """Just enough of a SearchResult to check the report files against."""
    data = json.loads((out / SEARCH_DIR / "search.json").read_text())
    from mmcompose.compose.search import Candidate

    cands = [
        Candidate(c["index"], tuple(c["weights"].values()), c["accuracy"], c["seconds"])
        for c in data["candidates"]
    ]
    best = cands[data["best"]["index"]]
    return SearchResult(data["method"], tuple(data["grid"]), tuple(data["start"].values()),
                        cands, best)  # fmt: skip


def test_compose_search_grid_generate_naivemc_with_answers_file(
    tmp_path, sources, media_files, run
):
    questions = _mcub(tmp_path, media_files, n=2, gold=False)
    answers = _mcub(tmp_path, media_files, n=2, gold=True)
    cfg = _yaml(tmp_path, "naive", _cfg(sources["shared"]))
    out = tmp_path / "out"
    r = run("compose", str(cfg), "-o", str(out), "--search", str(questions),
            "--search-answers", str(answers), "--grid", "0.5,1", "--search-method", "grid",
            "--search-mode", "generate")  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads((out / SEARCH_DIR / "search.json").read_text())
    assert data["method"] == "grid" and data["metric"] == "acc,generate"
    assert len(data["candidates"]) == 4
    model = MMComposeForCausalLM.from_pretrained(out)
    assert model.config.lora is None  # naivemc folded as usual in the final output
    # questions without gold answers and no answers file: refused
    r = run("compose", str(cfg), "-o", str(tmp_path / "o2"), "--search", str(questions))
    assert r.returncode == 2 and "gold answer" in r.stderr


def _refused(r, out: Path, match: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert match in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_cli_errors(tmp_path, sources, media_files, run):
    out = tmp_path / "out"
    val = _mcub(tmp_path, media_files, n=1)
    good = _yaml(tmp_path, "good", _cfg(sources["decoupled"]))
    compose_ = ("compose", str(good), "-o", str(out))
    _refused(run(*compose_, "--search", str(tmp_path / "nope.json")), out, "not found")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    _refused(run(*compose_, "--search", str(bad)), out, "not valid JSON")
    _refused(run(*compose_, "--search", str(val), "--grid", "0,x"), out, "not a number")
    _refused(run(*compose_, "--search", str(val), "--search-mode", "vibes"), out, "search mode")
    _refused(run(*compose_, "--search", str(val), "--search-method", "grid", "--grid",
                 ",".join(str(i) for i in range(30))), out, "more than 500")  # fmt: skip
    _refused(run(*compose_, "--grid", "0,1"), out, "needs --search")
    _refused(run(*compose_, "--search-passes", "1"), out, "needs --search")
    _refused(run(*compose_, "--search", str(val), "--dry-run"), out, "--dry-run")
    ties = _yaml(tmp_path, "ties", _cfg(sources["decoupled"], "ties", [1.0, 1.0]))
    r = run("compose", str(ties), "-o", str(out), "--search", str(val))
    _refused(r, out, "cannot be re-weighted")
    assert "task_arithmetic" in r.stderr
    # the spec: under damc a missing lambda is refused, not a silent 1
    _refused(run(*compose_), out, "no weight (lambda)")
    # an existing output is refused before any search runs
    out.mkdir()
    r = run(*compose_, "--search", str(val))
    assert r.returncode == 2 and "already exists" in r.stderr and not list(out.iterdir())


def test_failure_mid_search_leaves_nothing(tmp_path, sources):
    from mmcompose.compose.search import compose_with_search

    calls = []

    def scorer(model, proc):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 0.5

    out = tmp_path / "out"
    cfg = parse_compose_config(_cfg(sources["decoupled"]))
    with pytest.raises(KeyboardInterrupt):
        compose_with_search(cfg, out, scorer=scorer, progress=False)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []  # no output, no temporary model
