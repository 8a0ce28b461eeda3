"""Evaluation: answer parsing, results layout, classification on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from mmcompose.bench.classify import classify, generation_correct, normalize, read_manifest
from mmcompose.bench.results import mean_stderr, task_block, write_results
from mmcompose.errors import MMComposeError
from mmcompose.testing import build_tiny_model


@pytest.mark.parametrize(
    ("pred", "label", "ok"),
    [
        ("cow", "cow", True),
        ("A cow.", "cow", True),
        ("cow, grazing", "cow", True),
        ("cowboy", "cow", False),
        ("the teddy bear", "teddy bear", True),
        ("dog", "cow", False),
    ],
)
def test_generation_parsing(pred, label, ok):
    assert generation_correct(pred, label) is ok
    assert normalize("  The  Cow!! ") == "cow"


def test_stderr_and_layout(tmp_path):
    m, se = mean_stderr([1, 0, 1, 1])
    assert m == 0.75 and math.isclose(se, math.sqrt(0.25 / 4))
    block = task_block({"acc,generate": [1, 0, 1, 1]}, "t")
    assert block["acc,generate"] == 0.75 and "acc_stderr,generate" in block
    path = write_results(
        tmp_path, {"t": block}, {"t": {"task": "t"}}, {"t": 4}, {"model": "x"}, {"t": [{"id": 1}]}
    )
    doc = json.loads(path.read_text())
    assert set(doc) >= {"results", "configs", "versions", "n-samples", "config", "date"}
    assert doc["n-samples"]["t"] == {"original": 4, "effective": 4}
    assert len(list(tmp_path.glob("samples_t_*.jsonl"))) == 1


def test_classify_tiny_model(tmp_path):
    model, proc = build_tiny_model(("image",), strategy="shared", seed=0)
    rows = []
    for i, lab in enumerate(["red", "blue", "red"]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(p)
        rows.append(
            {"id": str(i), "path": str(p), "modality": "image", "label": lab, "split": "test"}
        )
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = read_manifest(tmp_path / "m.jsonl", "test")
    r = classify(model, proc, rows, progress=False)
    assert r.labels == ["blue", "red"] and len(r.correct["acc,loglikelihood"]) == 3
    # The log-likelihood choice is the argmax of the per-label scores.
    for s, row in zip(r.samples, rows, strict=True):
        assert s["loglikelihood_choice"] in r.labels
        assert r.correct["acc,loglikelihood"][int(row["id"])] == float(
            s["loglikelihood_choice"] == row["label"]
        )
    with pytest.raises(MMComposeError, match="no items in split 'val'"):
        read_manifest(tmp_path / "m.jsonl", "val")
    audio_only, aproc = build_tiny_model(("audio",), strategy="shared")
    with pytest.raises(MMComposeError, match="no image tower"):
        classify(audio_only, aproc, rows, progress=False)
