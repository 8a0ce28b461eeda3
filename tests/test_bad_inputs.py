"""Bad inputs a new user gives the CLI (issue 12): each is refused with exit code 2, one error
line with a hint, no traceback, no progress bar before the refusal, and nothing written at the
output path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

MODS = ("image", "audio")


def refused(r, needle: str, out: Path | None = None) -> None:
    """Exit 2, one ``error:`` line naming ``needle``, a hint, no traceback or progress bar."""
    text = " ".join(r.stderr.split())  # rich wraps long lines
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("error:") == 1 and "hint:" in r.stderr, r.stderr
    assert needle in text, r.stderr
    assert "it/s" not in r.stderr and "%|" not in r.stderr, r.stderr  # no bar before the check
    if out is not None:
        assert not os.path.lexists(out)
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------- compose
@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """Two single-modality DAMC sources and a composition config over them."""
    from mmcompose.testing import save_tiny_single

    paths = {m: save_tiny_single(tmp_path, m, "decoupled", i + 1) for i, m in enumerate(MODS)}
    cfg = {
        "merge_method": "linear",
        "composition": "damc",
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths.values()],
    }
    (tmp_path / "damc.yaml").write_text(yaml.safe_dump(cfg))
    return {**paths, "config": tmp_path / "damc.yaml", "out": tmp_path / "out"}


def _compose(run, s: dict[str, Path], *extra: str):
    return run("compose", str(s["config"]), "-o", str(s["out"]), *extra)


def test_compose_tower_width_contradicting_weights(run, sources):
    """The config says width 48, the carried weights are 32 wide: the output could never load."""
    _edit_json(
        sources["image"] / "config.json",
        lambda c: c | {"towers": [c["towers"][0] | {"encoder": {**c["towers"][0]["encoder"],
                       "params": {**c["towers"][0]["encoder"]["params"], "width": 48}}}]},
    )  # fmt: skip
    refused(_compose(run, sources), "towers.image.", sources["out"])
    r = _compose(run, sources, "--dry-run")  # found at plan time, before any tensor is read
    refused(r, "does not match its config.json", sources["out"])


@pytest.mark.parametrize(
    ("content", "needle"),
    [("[1, 2]", "must hold a JSON object"), ("{not json", "is not valid JSON")],
)
def test_compose_source_config_not_an_object(run, sources, content, needle):
    (sources["image"] / "config.json").write_text(content)
    refused(_compose(run, sources), needle, sources["out"])


def test_compose_source_config_missing_keys(run, sources):
    _edit_json(sources["image"] / "config.json", lambda c: {"model_type": "mmcompose"})
    refused(_compose(run, sources), "text_config", sources["out"])


def test_compose_processor_config_not_json(run, sources):
    (sources["image"] / "processor_config.json").write_text("{oops")
    refused(_compose(run, sources), "processor_config.json is not valid JSON", sources["out"])


def test_compose_invalid_yaml(run, sources):
    sources["config"].write_text("models: [\n")
    refused(_compose(run, sources), "is not valid YAML", sources["out"])


@pytest.mark.parametrize("kind", ["directory", "symlink loop"])
def test_compose_config_path_not_a_file(run, sources, kind):
    cfg = sources["config"]
    cfg.unlink()
    if kind == "directory":
        cfg.mkdir()
    else:
        cfg.symlink_to(cfg)
    refused(_compose(run, sources), str(cfg), sources["out"])


def test_compose_output_below_a_file(run, sources, tmp_path):
    f = tmp_path / "FILE"
    f.write_text("x")
    r = run("compose", str(sources["config"]), "-o", str(f / "sub"))
    refused(r, "is a file")
    assert f.read_text() == "x"


def test_compose_output_in_unwritable_folder(run, sources, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = run("compose", str(sources["config"]), "-o", str(locked / "out"))
        if os.access(locked, os.W_OK):  # root: permissions do not bite, the compose succeeds
            assert r.returncode == 0, r.stderr
        else:
            refused(r, "cannot write", locked / "out")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_compose_bad_device(run, sources, device):
    refused(_compose(run, sources, "--device", device), f"device {device!r}", sources["out"])


def test_compose_search_options_need_search(run, sources):
    refused(_compose(run, sources, "--grid", "0,1"), "--grid needs --search", sources["out"])


# ----------------------------------------------------------------------------- eval
@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    from PIL import Image

    rows = []
    for i, label in enumerate(["cow", "horse", "cow"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (60 * i, 20, 100)).save(p)
        rows.append({"id": str(i), "path": str(p), "modality": "image", "label": label})
        rows[-1]["split"] = "test"
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _eval(run, model: Path, data: Path, *extra: str):
    return run("eval", str(model), "--data", str(data), "--mode", "loglikelihood", *extra)


def test_eval_nan_weights(run, model_copy, manifest, tmp_path):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    state = load_file(str(f))
    name = next(k for k in state if k.startswith("towers.image.projector"))
    state[name][0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt", "mmcompose": "1"})
    out = tmp_path / "res"
    refused(_eval(run, model_copy, manifest, "-o", str(out)), "NaN", out)


def test_eval_processor_config_not_json(run, model_copy, manifest):
    (model_copy / "processor_config.json").write_text("{oops")
    refused(_eval(run, model_copy, manifest), "processor_config.json is not valid JSON")


def test_eval_corrupt_tokenizer(run, model_copy, manifest):
    (model_copy / "tokenizer.json").write_text('{"version": "1.0"}')
    refused(_eval(run, model_copy, manifest), "cannot load a tokenizer")


def test_eval_heads_not_dividing_hidden_size(run, model_copy, manifest):
    _edit_json(
        model_copy / "config.json",
        lambda c: c | {"text_config": c["text_config"] | {"num_attention_heads": 5}},
    )
    refused(_eval(run, model_copy, manifest), "not a multiple of the number of attention heads")


def test_eval_weights_contradict_config(run, model_copy, manifest):
    _edit_json(
        model_copy / "config.json",
        lambda c: c | {"text_config": c["text_config"] | {"intermediate_size": 96}},
    )
    refused(_eval(run, model_copy, manifest), "shape")


@pytest.mark.parametrize(("content", "needle"), [("{oops", "not valid JSON"), ("[3]", "object")])
def test_eval_model_config_not_json(run, model_copy, manifest, content, needle):
    (model_copy / "config.json").write_text(content)
    refused(_eval(run, model_copy, manifest), needle)


@pytest.mark.parametrize("kind", ["directory", "symlink loop"])
@pytest.mark.parametrize("task", ["classify", "mcub"])
def test_eval_data_not_a_file(run, tiny_model_dir, tmp_path, kind, task):
    data = tmp_path / "data"
    if kind == "directory":
        data.mkdir()
    else:
        data.symlink_to(data)
    refused(_eval(run, tiny_model_dir, data, "--task", task), str(data))


def test_eval_manifest_row_without_path(run, tiny_model_dir, manifest):
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    del rows[1]["path"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(_eval(run, tiny_model_dir, manifest), ":2 lacks path")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
        (b"[1, 2]\n", ":1 is not a JSON object"),
        (b"{}\n", ":1 lacks id, path, modality, label"),
    ],
)
def test_eval_manifest_not_jsonl_objects(run, tiny_model_dir, tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    refused(_eval(run, tiny_model_dir, bad), needle)


def test_eval_truncated_npz_point_cloud(run, tiny_model_dir, tmp_path):
    pts = tmp_path / "p.npz"
    np.savez_compressed(pts, points=np.random.default_rng(0).standard_normal((300, 3)))
    _truncate(pts)
    row = {"id": "0", "path": str(pts), "modality": "point", "label": "cow", "split": "test"}
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(row) + "\n")
    refused(_eval(run, tiny_model_dir, m), "p.npz")


def test_eval_output_is_a_file_is_found_before_the_work(run, tiny_model_dir, manifest, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    refused(_eval(run, tiny_model_dir, manifest, "-o", str(f)), "not a folder")
    assert f.read_text() == "keep me"


def _mcub(tmp_path: Path, media_files: dict[str, Path]) -> Path:
    q = tmp_path / "q.json"
    rec = {
        "id": "q0",
        "conversations": [
            {"from": "human", "value": "<image>\nwhich?\nA. a\nB. b\nC. c\nD. d"},
            {"from": "gpt", "value": "A"},
        ],
        "modal_inputs": {"image": [str(media_files["image"])]},
    }
    q.write_text(json.dumps([rec]))
    return q


def test_eval_mcub_turns_not_objects(run, tiny_model_dir, media_files, tmp_path):
    q = _mcub(tmp_path, media_files)
    _edit_json(q, lambda recs: [recs[0] | {"conversations": ["human", "gpt"]}])
    refused(_eval(run, tiny_model_dir, q, "--task", "mcub"), "turn 0 is not an object")


def test_eval_mcub_not_json(run, tiny_model_dir, tmp_path):
    q = tmp_path / "q.json"
    q.write_text("[{")
    refused(_eval(run, tiny_model_dir, q, "--task", "mcub"), "is not valid JSON")


# ----------------------------------------------------------------------------- inspect, generate
def test_inspect_truncated_shard(run, tmp_path):
    from mmcompose.testing import build_tiny_model

    model, proc = build_tiny_model(("image",), strategy="decoupled")
    path = model.save_pretrained(tmp_path / "m", processor=proc, max_shard_size="200KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    _truncate(shards[1])
    refused(run("inspect", str(path)), shards[1].name)


@pytest.mark.parametrize("device", ["gpu", "cuda:-1"])
def test_generate_bad_device(run, tiny_model_dir, device):
    r = run("generate", str(tiny_model_dir), "--prompt", "hello", "--device", device)
    refused(r, f"device {device!r}")


def test_device_names():
    import torch

    from mmcompose.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == torch.device("cuda", 0)
    else:
        from mmcompose.errors import ConfigError

        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_search_needs_exactly_one_query(run, tmp_path):
    refused(run("search", "--store", str(tmp_path), "--text", "a", "--image", "b.png"), "exactly")
    refused(run("search", "--store", str(tmp_path)), "exactly one of --text")


# ----------------------------------------------------------------------------- train
@pytest.fixture
def train_setup(tmp_path: Path) -> dict[str, Path]:
    from mmcompose.testing import save_tiny_base_llm

    llm = save_tiny_base_llm(tmp_path / "llm")
    cfg = {
        "base_llm": str(llm),
        "data": "data.json",
        "tower": {
            "modality": "image",
            "encoder": {"name": "patch_embed", "params": {"image_size": 32, "patch_size": 8}},
            "projector": {"name": "mlp2x_gelu"},
        },
        "stage1": {"epochs": 0},
        "stage2": {"epochs": 1, "batch_size": 2},
    }
    (tmp_path / "data.json").write_text("[]")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    return {"llm": llm, "config": tmp_path / "t.yaml", "out": tmp_path / "out"}


def test_train_truncated_base_llm(run, train_setup):
    weights = train_setup["llm"] / "model.safetensors"
    _truncate(weights)
    r = run("train", str(train_setup["config"]), "-o", str(train_setup["out"]))
    refused(r, "model.safetensors", train_setup["out"])


@pytest.mark.parametrize("kind", ["directory", "symlink loop"])
def test_train_config_not_a_file(run, tmp_path, kind):
    cfg = tmp_path / "c.yaml"
    if kind == "directory":
        cfg.mkdir()
    else:
        cfg.symlink_to(cfg)
    refused(run("train", str(cfg), "-o", str(tmp_path / "out")), str(cfg), tmp_path / "out")


# ----------------------------------------------------------------------------- index, bench
@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic alignment (two feature modalities a, b)."""
    from mmcompose.align.trainer import run_align

    d = tmp_path_factory.mktemp("align")
    cfg = {
        "seed": 0,
        "data": {
            "kind": "synthetic",
            "synthetic": {
                "dims": {"a": 6, "b": 5},
                "rank": 4,
                "sizes": {"train": 32, "val": 16, "test": 16},
            },
        },
        "connector": {"hidden": 8, "num_experts": 2, "top_k": 1},
        "train": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "num_threads": 1},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_align(d / "c.yaml", d / "out", progress=False)
    return d / "out"


def test_index_truncated_alignment_weights(run, aligned, manifest, tmp_path):
    model = tmp_path / "aligned"
    shutil.copytree(aligned, model)
    _truncate(model / "model.safetensors")
    store = tmp_path / "store"
    r = run("index", "--model", str(model), "--data", str(manifest), "--store", str(store))
    refused(r, "model.safetensors", store)


def test_index_manifest_row_without_path(run, aligned, manifest, tmp_path):
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    del rows[0]["path"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    r = run("index", "--model", str(aligned), "--data", str(manifest), "--store", str(store))
    refused(r, ":1 lacks path", store)


def test_build_mcub_manifest_line_not_an_object(run, tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text("[1, 2]\n")
    out = tmp_path / "mcub"
    refused(run("bench", "build-mcub", str(m), "-o", str(out)), ":1 is not a JSON object", out)


# ----------------------------------------------------------------------------- the CLI module
def test_cli_imports_no_torch():
    """``mmcompose --help`` and every refusal of arguments stay fast: the CLI module imports
    its commands' code only inside the commands."""
    import subprocess
    import sys

    code = "import sys, mmcompose.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
