"""What each command imports before it answers (issue 18, startup): ``inspect`` and the early
refusals of every command (a missing or malformed file, a bad option) run without torch,
transformers or the media stack, which take seconds to import. These tests look at
``sys.modules`` in a fresh interpreter, not at the clock: speed is measured in
benchmarks/startup.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "av", "soundfile", "trimesh", "PIL", "scipy")

# Runs ``python -m mmcompose ARGS`` in this interpreter and prints, last, which heavy modules
# it imported; the command's own exit status is passed on.
_WRAPPER = """
import json, runpy, sys
heavy = json.loads(sys.argv[1])
sys.argv = ["mmcompose", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("mmcompose", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
print("IMPORTED " + json.dumps([m for m in heavy if m in sys.modules]))
sys.exit(code)
"""


def imported(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the command in a fresh interpreter; its result and the heavy modules it imported."""
    r = subprocess.run(
        [sys.executable, "-c", _WRAPPER, json.dumps(HEAVY), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert last.startswith("IMPORTED "), r.stdout + r.stderr
    return r, json.loads(last.removeprefix("IMPORTED "))


def test_a_command_that_loads_a_model_imports_torch(tiny_model_dir: Path):
    """The check can fail: generating loads the model, and the wrapper sees torch come in."""
    r, mods = imported("generate", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr
    assert "torch" in mods and "transformers" in mods


def test_inspect_reads_headers_only(tiny_model_dir: Path):
    r, mods = imported("inspect", str(tiny_model_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout[: r.stdout.rindex("IMPORTED ")])
    assert info["num_tensors"] > 0 and info["total_params"] > 0
    assert mods == []


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("startup")
    (d / "bad.yaml").write_text("merge_method: linear\nmodels: [\n")
    # parse as YAML but fail the schema: validating them must not import the methods' torch
    (d / "unknown.yaml").write_text(
        f"merge_method: linear\nmodels:\n  - model: {d}\n  - model: {d}\nbogus: 1\n"
    )
    (d / "density.yaml").write_text(
        f"merge_method: ties\nbase_model: {d}\nmodels:\n  - model: {d}\n"
        "    parameters: {weight: 1.0, density: 2.0}\n"
    )
    (d / "exists").mkdir()
    (d / "m.jsonl").write_text(
        json.dumps(
            {
                "id": "0",
                "path": str(d / "a.png"),
                "modality": "image",
                "label": "cow",
                "split": "test",
            }
        )
        + "\n"
    )
    return {
        "dir": d,
        "missing": d / "missing.yaml",
        "bad": d / "bad.yaml",
        "unknown": d / "unknown.yaml",
        "density": d / "density.yaml",
        "out": d / "out",
    }


# (command line with {dir}, {missing}, {bad}, {out}, {model} filled in, words of the error)
REFUSALS = [
    ("compose {missing} -o {out}", "not found"),
    ("compose {bad} -o {out}", "not valid YAML"),
    ("compose {unknown} -o {out}", "bogus"),
    ("compose {density} -o {out}", "density"),
    ("compose {bad} -o {out} --device gpu", "unknown device"),
    ("compose {bad} -o {out} --grid 0,1", "needs --search"),
    ("train {missing} -o {out}", "not found"),
    ("train {bad} -o {out}", "not valid YAML"),
    ("align {missing} -o {out}", "not found"),
    ("align {bad} -o {out}", "not valid YAML"),
    ("eval {model} --task nope", "unknown task"),
    ("eval {model} --task mcub --data {dir}/missing.json", "not found"),
    ("eval {model} --data {dir}/missing.jsonl", "not found"),
    ("eval {dir}/nomodel --data {dir}/m.jsonl", "does not exist"),
    ("eval {model} --data {dir}/m.jsonl --mode nope", "unknown mode"),
    ("generate {dir}/nomodel --prompt hi", "does not exist"),
    ("generate {model} --prompt hi --device gpu", "unknown device"),
    ("check {dir}/nomodel --against {model}", "does not exist"),
    ("check {model} --against {dir}/nomodel", "has no config.json"),
    ("index --model {dir}/nomodel --data {dir}/m.jsonl --store {out}", "not a trained alignment"),
    ("index --model {model} --data {dir}/m.jsonl --store {dir}/exists", "already exists"),
    ("search --store {dir} --text hi", "not made by `mmcompose index`"),
    ("bench build-mcub {dir}/missing.jsonl -o {out}", "not found"),
    ("assets prepare --only nope", "unknown asset"),
    ("quickstart -o {dir}/exists", "already exists"),
]


@pytest.mark.parametrize(("line", "needle"), REFUSALS, ids=[c[0] for c in REFUSALS])
def test_early_refusals_import_no_torch(files, tiny_model_dir: Path, line: str, needle: str):
    args = line.format(**{k: str(v) for k, v in files.items()}, model=tiny_model_dir).split()
    r, mods = imported(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in " ".join(r.stderr.split()), r.stderr
    assert mods == [], f"{line} imported {mods} before refusing"
    assert not files["out"].exists()
