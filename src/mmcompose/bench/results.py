"""Results in lm-evaluation-harness's layout, so existing tooling reads them."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcompose import __version__
from mmcompose.fs import atomic_file, check_creatable, write_json_atomic


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-eval reports ``*_stderr``."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def task_block(metrics: Mapping[str, Sequence[float]], alias: str) -> dict[str, Any]:
    """{"acc,generate": [0/1 per item]} -> {"acc,generate": m, "acc_stderr,generate": se}."""
    out: dict[str, Any] = {"alias": alias}
    for key, values in metrics.items():
        name, _, filt = key.partition(",")
        m, se = mean_stderr(values)
        out[key] = m
        out[f"{name}_stderr,{filt}"] = se
    return out


def check_results_dir(out_dir: str | Path) -> None:
    """Fail before an evaluation if its results could not be written to ``out_dir``: an
    existing folder gains new timestamped files; a file in the way or no permission fails."""
    check_creatable(Path(out_dir) / "results_<time>.json")


def write_results(
    out_dir: str | Path,
    results: Mapping[str, dict[str, Any]],
    configs: Mapping[str, dict[str, Any]],
    n_samples: Mapping[str, int],
    model_info: Mapping[str, Any],
    samples: Mapping[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Write ``results_<time>.json`` (and ``samples_<task>_<time>.jsonl``) atomically."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H-%M-%S.%f")
    out_dir = Path(out_dir)
    doc = {
        "results": dict(results),
        "group_subtasks": {},
        "configs": dict(configs),
        "versions": dict.fromkeys(results, 1.0),
        "n-shot": dict.fromkeys(results, 0),
        "n-samples": {t: {"original": n, "effective": n} for t, n in n_samples.items()},
        "config": dict(model_info),
        "date": _dt.datetime.now(_dt.UTC).timestamp(),
        "mmcompose_version": __version__,
    }
    path = out_dir / f"results_{stamp}.json"
    for task, rows in (samples or {}).items():
        with atomic_file(out_dir / f"samples_{task}_{stamp}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(path, doc)
    return path
