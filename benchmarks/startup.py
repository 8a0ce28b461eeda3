"""Startup of the ``mmcompose`` commands (issue 18): how long ``python -m mmcompose ...`` takes
in a fresh interpreter, from start to exit, for ``--help``, ``inspect`` on a tiny model and
each command's early refusal (a missing or malformed file, a bad option). Goal: under 1 s.

Each case runs ``--repeats`` times, the cases interleaved (so a change in the machine's load
hits every case alike); the median is reported. ``--before SRC`` runs every case a second time
from another checkout's ``src`` folder (via PYTHONPATH), side by side in the same rounds, e.g.::

    mkdir -p /tmp/before && git archive HEAD src | tar -x -C /tmp/before
    python benchmarks/startup.py --before /tmp/before/src --out benchmarks/startup.json

One extra run per case with ``-X importtime`` records which heavy modules it imported and the
cumulative import time of the largest. The reference rows time ``python -c pass`` (the
interpreter) and ``python -c "import torch"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "av", "soundfile", "trimesh", "PIL", "scipy")

# (name, arguments after ``python -m mmcompose``, expected exit code); {d} is the scratch
# folder, {model} the tiny model.
CASES: list[tuple[str, str, int]] = [
    ("--help", "--help", 0),
    ("inspect MODEL", "inspect {model}", 0),
    ("compose missing.yaml", "compose {d}/missing.yaml -o {d}/out", 2),
    ("compose bad.yaml (syntax)", "compose {d}/bad.yaml -o {d}/out", 2),
    ("compose unknown key", "compose {d}/unknown.yaml -o {d}/out", 2),
    ("compose --device gpu", "compose {d}/bad.yaml -o {d}/out --device gpu", 2),
    ("train missing.yaml", "train {d}/missing.yaml -o {d}/out", 2),
    ("train bad.yaml (syntax)", "train {d}/bad.yaml -o {d}/out", 2),
    ("train unknown key", "train {d}/unknown.yaml -o {d}/out", 2),
    ("align missing.yaml", "align {d}/missing.yaml -o {d}/out", 2),
    ("eval --task nope", "eval {model} --task nope", 2),
    ("eval mcub missing data", "eval {model} --task mcub --data {d}/missing.json", 2),
    ("eval missing model", "eval {d}/nomodel --data {d}/m.jsonl", 2),
    ("generate missing model", "generate {d}/nomodel --prompt hi", 2),
    ("check missing source", "check {model} --against {d}/nomodel", 2),
    ("index --model missing", "index --model {d}/nomodel --data {d}/m.jsonl --store {d}/st", 2),
    ("search store not an index", "search --store {d} --text hi", 2),
    ("bench build-mcub missing", "bench build-mcub {d}/missing.jsonl -o {d}/out", 2),
    ("assets prepare --only nope", "assets prepare --only nope", 2),
]
REFERENCE = [
    ("python -c pass", ["-c", "pass"]),
    ("python -c 'import torch'", ["-c", "import torch"]),
]


def scratch(d: Path) -> Path:
    """The files the cases refer to, and a tiny model (two towers) in ``d``."""
    from mmcompose.testing import build_tiny_model

    (d / "bad.yaml").write_text("merge_method: linear\nmodels: [\n")
    (d / "unknown.yaml").write_text("merge_method: linear\nmodels: []\ncolour: red\n")
    row = {
        "id": "0",
        "path": str(d / "a.png"),
        "modality": "image",
        "label": "cow",
        "split": "test",
    }
    (d / "m.jsonl").write_text(json.dumps(row) + "\n")
    model, proc = build_tiny_model(("image", "audio"), strategy="decoupled", seed=0)
    return model.save_pretrained(d / "tiny", processor=proc)


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t, r.returncode


def imports(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Heavy top-level modules the command imported -> their cumulative import time (s)."""
    r = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, capture_output=True,
                       text=True)  # fmt: skip
    found: dict[str, float] = {}
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", line)
        if m and m.group(2) in HEAVY:
            found[m.group(2)] = max(found.get(m.group(2), 0.0), int(m.group(1)) / 1e6)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--before", type=Path, help="another checkout's src folder, run alongside")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/startup.json"))
    ap.add_argument("--from-json", type=Path, help="print a run's table (markdown), run nothing")
    args = ap.parse_args()
    if args.from_json:
        print(markdown(json.loads(args.from_json.read_text())))
        return

    base_env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base_env.pop("PYTHONPATH", None)
    variants = {"after": base_env}
    if args.before is not None:
        variants = {"before": base_env | {"PYTHONPATH": str(args.before.resolve())}, **variants}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = scratch(d)
        runs = [
            (name, [sys.executable, "-m", "mmcompose", *line.format(d=d, model=model).split()], rc)
            for name, line, rc in CASES
        ] + [(name, [sys.executable, *a], 0) for name, a in REFERENCE]
        times: dict[tuple[str, str], list[float]] = {}
        wrong: dict[tuple[str, str], int] = {}  # an exit code other than the expected one
        for _ in range(args.repeats):
            for name, argv, want in runs:
                for variant, env in variants.items():
                    if variant == "before" and name in dict(REFERENCE):
                        continue
                    dt, rc = run_once(argv, env)
                    if rc != want:
                        wrong[(name, variant)] = rc
                    times.setdefault((name, variant), []).append(dt)
        rows = []
        for name, argv, _ in runs:
            row: dict[str, object] = {"case": name}
            for variant, env in variants.items():
                if (name, variant) not in times:
                    continue
                ts = times[(name, variant)]
                row[variant] = {
                    "median_s": round(statistics.median(ts), 3),
                    "min_s": round(min(ts), 3),
                    "imports": {k: round(v, 3) for k, v in imports(argv, env).items()},
                }
                if (name, variant) in wrong:  # timed, but not the check it was meant to time
                    row[variant]["unexpected_exit_code"] = wrong[(name, variant)]
            rows.append(row)
    result = {
        "command": " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]]),
        "repeats": args.repeats,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def _cell(g: dict | None) -> str:
    if g is None:
        return ""
    bad = g.get("unexpected_exit_code")
    return f"{g['median_s']:.2f}" + (f" (exit {bad})" if bad is not None else "")


def markdown(result: dict) -> str:
    """The table for docs/benchmarks.md: medians, and the heavy modules each side imported."""
    sides = [v for v in ("before", "after") if any(v in r for r in result["rows"])]
    head = ["case", *(f"{v} (s)" for v in sides), *(f"heavy imports {v}" for v in sides)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        got = [r.get(v) for v in sides]
        cells = [r["case"], *(_cell(g) for g in got)]
        cells += [", ".join(g["imports"]) or "none" if g else "" for g in got]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
