"""`reproduce merge`: runs of single seeds merged give the report one run over all seeds gives."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mmcompose.errors import ConfigError
from mmcompose.paper_report import build_doc
from mmcompose.quickstart import Evaluation
from mmcompose.report import Row
from mmcompose.reproduce_merge import merge_runs

MODS = ("image", "audio", "video", "point")
LETTER = {"image": "I", "audio": "A", "video": "V", "point": "P"}
SETS = ("IAVP", "IAV", "IAP", "IVP", "AVP")


def _rows(seed: int, n: int = 12) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for strategy in ("shared", "decoupled"):
        for m in MODS:
            correct = {}
            for s in SETS:
                if LETTER[m] in s:
                    correct[f"mini-MCUB {s}"] = rng.integers(0, 2, n).astype(float).tolist()
            correct[f"{m} (test)"] = rng.integers(0, 2, n).astype(float).tolist()
            rows.append(Row(name=f"{m}-{strategy}", kind="single", correct=correct))
    for name, p in (("NaiveMC", 0.7), ("DAMC", 0.8)):
        correct = {f"mini-MCUB {s}": (rng.random(n) < p).astype(float).tolist() for s in SETS}
        correct |= {f"{m} (test)": rng.integers(0, 2, n).astype(float).tolist() for m in MODS}
        rows.append(Row(name=name, kind="composed", correct=correct))
    return rows


def _doc(seeds: list[int]) -> dict:
    columns = [f"{m} (test)" for m in MODS] + [f"mini-MCUB {s}" for s in SETS]
    by_seed = {s: _rows(s) for s in seeds}
    ev = Evaluation(columns=columns, rows=by_seed[seeds[0]], results={}, by_seed=by_seed)
    job = SimpleNamespace(modalities=MODS, timings={"evaluate": 10.0 * len(seeds)})
    return build_doc(job, ev, {"budget": {"search_limit": 8, "seeds": seeds}})


def _write(tmp_path, name: str, doc: dict):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(doc))
    return d


def test_merged_seeds_equal_one_run_over_all_seeds(tmp_path):
    runs = [_write(tmp_path, f"seed{s}", _doc([s])) for s in (0, 1, 2)]
    merged = merge_runs(runs, tmp_path / "all").doc
    whole = _doc([0, 1, 2])
    assert merged["seeds"] == [0, 1, 2]
    assert merged["rows"] == whole["rows"]
    assert merged["claims"] == whole["claims"]
    assert merged["retention"] == whole["retention"]
    assert merged["timings_s"] == {"evaluate": 30.0}
    assert merged["setup"]["budget"]["seeds"] == [0, 1, 2]
    assert (tmp_path / "all" / "report.md").is_file()
    assert (tmp_path / "all" / "chart.png").is_file()


def test_merge_refuses_a_seed_twice_and_other_experiments(tmp_path):
    a = _write(tmp_path, "a", _doc([0]))
    b = _write(tmp_path, "b", _doc([0]))
    with pytest.raises(ConfigError, match="seed 0 is in both"):
        merge_runs([a, b], tmp_path / "out")
    other = _doc([1])
    other["rows"] = other["rows"][:-1]
    c = _write(tmp_path, "c", other)
    with pytest.raises(ConfigError, match="differ in their rows"):
        merge_runs([a, c], tmp_path / "out")
    with pytest.raises(ConfigError, match="at least two"):
        merge_runs([a], tmp_path / "out")
    assert not (tmp_path / "out").exists()
