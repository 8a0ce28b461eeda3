"""The CLI on a tiny model saved by a fixture: output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmcompose", *args], capture_output=True, text=True, timeout=300
    )


def test_inspect_tables_and_json(run, tiny_model_dir):
    r = run("inspect", str(tiny_model_dir))
    assert r.returncode == 0, r.stderr
    for word in ("patch_embed", "mel_conv", "pointnet", "video_frames", "decoupled", "Total"):
        assert word in r.stdout
    info = json.loads(run("inspect", str(tiny_model_dir), "--json").stdout)
    assert [t["modality"] for t in info["towers"]] == ["image", "audio", "video", "point"]
    assert {a["name"]: a["used_by"] for a in info["lora"]["adapters"]} == {
        "text": ["text"],
        "image": ["image"],
        "audio": ["audio"],
        "video": ["video"],
        "point": ["point"],
    }
    # Counts from the safetensors headers agree with the loaded model.
    from mmcompose.model import MMComposeForCausalLM

    model = MMComposeForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert info["total_params"] == n


def test_generate_with_every_modality(run, tiny_model_dir, media_files):
    args = [
        "generate",
        str(tiny_model_dir),
        "--prompt",
        "<image> <audio> <video> <point> What do these share?",
        "--max-new-tokens",
        "5",
    ]
    for m, f in media_files.items():
        args += [f"--{m}", str(f)]
    r = run(*args, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert 1 <= len(res["tokens"]) <= 5
    again = run(*args, "--json")
    assert json.loads(again.stdout) == res  # greedy: same output


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--prompt", "<image> <image>", "--image", "{image}"], "2 <image> placeholder"),
        (["--prompt", "no placeholder", "--audio", "{audio}"], "0 <audio> placeholder"),
        (["--prompt", "<image>", "--image", "{missing}"], "not found"),
        (["--prompt", "<image>", "--image", "{notimage}"], "notimage.png"),
    ],
)
def test_generate_bad_input_exits_2_without_traceback(
    run, tiny_model_dir, media_files, tmp_path, extra, needle
):
    bad = tmp_path / "notimage.png"
    bad.write_text("this is not a png")
    subs = {k: str(v) for k, v in media_files.items()} | {
        "missing": str(tmp_path / "missing.png"),
        "notimage": str(bad),
    }
    r = run("generate", str(tiny_model_dir), *[a.format(**subs) for a in extra])
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_entry_point_exits_2_without_traceback(tmp_path):
    """The installed entry point, as a user runs it: one error line, a hint, exit code 2."""
    r = run_subprocess("inspect", str(tmp_path))
    assert r.returncode == 2
    assert "no config.json" in r.stderr and "Traceback" not in r.stderr


def test_compose_command(run, tmp_path):
    from mmcompose.model import MMComposeForCausalLM
    from mmcompose.testing import build_tiny_model

    for i, m in enumerate(("image", "audio")):
        model, proc = build_tiny_model((m,), strategy="decoupled", seed=0, adapter_seed=i + 1)
        model.save_pretrained(tmp_path / m, processor=proc)
    cfg = tmp_path / "damc.yaml"
    cfg.write_text(
        "merge_method: linear\ncomposition: damc\nmodels:\n"
        "  - model: image\n    parameters: {weight: 0.6}\n"
        "  - model: audio\n    parameters: {weight: 0.4}\n"
    )
    out = tmp_path / "out"
    r = run("compose", str(cfg), "-o", str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "image" in r.stdout and not out.exists()
    r = run("compose", str(cfg), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert MMComposeForCausalLM.from_pretrained(out).modalities == ["image", "audio"]
    r = run("compose", str(cfg), "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    cfg.write_text(cfg.read_text().replace("parameters: {weight: 0.4}", "parameters: {}"))
    r = run("compose", str(cfg), "-o", str(tmp_path / "out2"))
    assert r.returncode == 2 and "weight" in r.stderr and not (tmp_path / "out2").exists()
