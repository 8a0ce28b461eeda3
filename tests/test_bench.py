"""Evaluation: answer parsing, results layout, classification on a tiny model."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from mmcompose.bench.classify import classify, generation_correct, normalize, read_manifest
from mmcompose.bench.results import mean_stderr, task_block, write_results
from mmcompose.errors import MMComposeError
from mmcompose.testing import build_tiny_model, float_tol


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
    # 3/4 is exact; se takes a few float64 roundings over 4 terms
    assert m == 0.75 and math.isclose(se, math.sqrt(0.25 / 4), rel_tol=float_tol(np.float64, 1, 4))
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


# ----------------------------------------------------------------------------- lm-eval rules
def test_encode_pair_moves_trailing_whitespace_and_splits_the_whole():
    from mmcompose.bench.multiple_choice import encode_pair

    def words(text: str) -> list[str]:  # a toy tokenizer: a space sticks to the next word
        return re.findall(r"\s*\S+|\s+", text)

    assert encode_pair(words, "the option is ", "cow") == (["the", " option", " is"], [" cow"])
    assert encode_pair(words, "Answer:", " cow") == (["Answer:"], [" cow"])
    assert encode_pair(words, "a\n\n", "b") == (["a"], ["\n\nb"])
    with pytest.raises(ValueError, match="empty"):
        encode_pair(words, "", "cow")


def test_choose_is_argmax_and_argmax_per_character():
    from mmcompose.bench.multiple_choice import choose

    # -6 over "cowboy" (6 chars) = -1 per char beats -4 over "cow" (3): acc_norm differs
    assert choose([-4.0, -6.0, -9.0], ["cow", "cowboy", "horse"]) == (0, 1)
    assert choose([-2.0, -2.0], ["ab", "cd"]) == (0, 0)  # ties: the first, as np.argmax
    with pytest.raises(ValueError):
        choose([-1.0], ["a", "b"])


def test_classify_loglikelihood_as_lm_eval(tmp_path):
    """The label continuations are scored as lm-eval scores them: the prompt's trailing
    whitespace moved into each label, the text tokenised whole, acc_norm per character;
    ``end_of_turn`` scores label + end of turn after the prompt as generation sees it."""
    import torch

    from mmcompose.bench.multiple_choice import answer_continuations
    from mmcompose.errors import ConfigError
    from mmcompose.train.data import QUESTIONS

    model, proc = build_tiny_model(("image",), strategy="shared", seed=0)
    labels = ["cow", "cowboy", "a horse", "bird"]
    rows = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(p)
        rows.append({"id": str(i), "path": str(p), "modality": "image", "label": labels[i]})
    user = f"<image>\n{QUESTIONS['image'][0]}"
    prompt = proc.format_prompt(user)
    assert prompt != prompt.rstrip()  # ChatML's generation prompt ends in "\n": it moves

    def reference(x, continuation):
        out = []
        if continuation == "lm_eval":
            ctx = proc.tokenize(prompt.rstrip())
            conts = [proc.tokenize(prompt + lab)[len(ctx) :] for lab in labels]
        else:
            ctx = proc.tokenize(prompt)
            msgs = [{"role": "user", "content": user}]
            conts = [
                proc.tokenize(c, add_special_tokens=False)
                for c in answer_continuations(proc, msgs, labels)
            ]
        for cont in conts:
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont]), modal_inputs={"image": x}).logits[0]
            logp = logits[-len(cont) - 1 : -1].float().log_softmax(-1)
            out.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
        return out

    for continuation in ("lm_eval", "end_of_turn"):
        r = classify(
            model, proc, rows, labels, ("loglikelihood",), progress=False,
            continuation=continuation,
        )  # fmt: skip
        assert set(r.correct) == {"acc,loglikelihood", "acc_norm,loglikelihood"}
        for s, row in zip(r.samples, rows, strict=True):
            ref = reference(proc.preprocess("image", [row["path"]]), continuation)
            norm = [v / len(lab) for v, lab in zip(ref, labels, strict=True)]
            assert s["loglikelihood_choice"] == labels[ref.index(max(ref))]
            assert s["loglikelihood_norm_choice"] == labels[norm.index(max(norm))]
        want = [float(s["loglikelihood_norm_choice"] == row["label"]) for s, row in zip(r.samples, rows, strict=True)]  # fmt: skip
        assert r.correct["acc_norm,loglikelihood"] == want
    with pytest.raises(ConfigError, match="unknown continuation"):
        classify(model, proc, rows, labels, ("loglikelihood",), continuation="eot")
