"""lmms-eval (0.7.3, from PyPI) runs mmcompose models and MCUB (issue 17).

lmms-eval's own command line runs on a tiny random composed model through the ``mmcompose``
plugin (found by its ``lmms_eval.models`` entry point) and the bundled MCUB tasks
(``--include_path``), on a mini-MCUB built by ``build_mcub`` from real media files: MCUB-4 in
the reference format (``vision`` key, relative paths, the shared ``MCUB-answer.json``) and
MCUB-3-IAV as ``build-mcub`` writes it (absolute paths, its ``.answers.json``). ``mmcompose
eval --task mcub`` scores the same files; accuracies, per-item choices and generations must be
identical and option log-likelihoods equal up to float32 rounding (:func:`llm_tol`). A model
without video and point towers asked for MCUB-4 must get one message and exit 2, no traceback.
Both lmms-eval runs start together (most of their time is lmms-eval's own start-up). The
plugin's request handling (media forms, is_greedy, multi-round) is checked in-process on
lmms-eval's own ``Instance`` objects.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval", reason="make test installs lmms-eval (--no-deps)")

from lmms_eval.api.instance import Instance

from mmcompose.bench.mcub_build import build_mcub
from mmcompose.errors import ConfigError, PlaceholderError
from mmcompose.integrations import LMMS_EVAL_TASKS
from mmcompose.integrations.lmms_eval_media import (
    Audio,
    classify,
    messages_from_context,
    place_inputs,
)
from mmcompose.integrations.lmms_eval_model import MMComposeLMMS
from mmcompose.model.modeling import ScoreRequest
from mmcompose.testing import build_tiny_model, llm_tol

pytestmark = pytest.mark.slow
CONCEPTS = ["dog", "cat", "cow", "horse", "bird", "car"]
PER = {"image": 2, "audio": 1, "video": 1, "point": 1}  # test items per concept
RUN_TIMEOUT = 900


def _media(root: Path, rng: np.random.Generator) -> list[Path]:
    """Manifests of real, distinct files (PNG, 16 kHz PCM WAV, MPEG-4, .npy points)."""
    import av
    import soundfile as sf
    from PIL import Image

    manifests = []
    for modality, per in PER.items():
        rows = []
        for concept in CONCEPTS:
            for k in range(per):
                f = root / modality / f"{concept}{k}"
                f.parent.mkdir(parents=True, exist_ok=True)
                if modality == "image":
                    f = f.with_suffix(".png")
                    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(f)
                elif modality == "audio":
                    f = f.with_suffix(".wav")
                    wave = (rng.standard_normal(16000) * 0.1).astype(np.float32)
                    sf.write(f, wave, 16000, subtype="PCM_16")
                elif modality == "video":
                    f = f.with_suffix(".mp4")
                    with av.open(str(f), "w") as c:
                        s = c.add_stream("mpeg4", rate=8)
                        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
                        for _ in range(6):
                            frame = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                                c.mux(p)
                        for p in s.encode():
                            c.mux(p)
                else:
                    f = f.with_suffix(".npy")
                    np.save(f, rng.standard_normal((300, 3)).astype(np.float32))
                rows.append(
                    {
                        "id": f"{modality}/{concept}/{k}",
                        "path": str(f),
                        "modality": modality,
                        "label": concept,
                        "split": "test",
                    }
                )
        path = root / f"{modality}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifests.append(path)
    return manifests


def _circle(texts: list[str]) -> np.ndarray:
    a = np.array([2 * math.pi * CONCEPTS.index(t) / len(CONCEPTS) for t in texts])
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _reference_format(built: Path, folder: Path) -> None:
    """MCUB-4 as the reference ships it: ``vision`` key, paths relative to the file, gold
    letters in one MCUB-answer.json shared with another set (whose ids are ignored)."""

    def convert(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for it in items:
            it["modal_inputs"] = {
                {"image": "vision"}.get(m, m): [os.path.relpath(p, folder) for p in ps]
                for m, ps in it["modal_inputs"].items()
            }
        return items

    (folder / "MCUB-4.json").write_text(
        json.dumps(convert(json.loads((built / "MCUB-4.json").read_text())))
    )
    shared = convert(json.loads((built / "MCUB-4.answers.json").read_text()))
    shared += json.loads((built / "MCUB-3-IAV.answers.json").read_text())
    (folder / "MCUB-answer.json").write_text(json.dumps(shared))
    for name in ("MCUB-3-IAV.json", "MCUB-3-IAV.answers.json"):
        (folder / name).write_text((built / name).read_text())


def _lmms_eval(model: Path, tasks: str, out: Path, sets: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(out / "hf"),  # lmms-eval's dataset and request caches stay in tmp
        "MMCOMPOSE_MCUB_DIR": str(sets),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        str(Path(sys.executable).with_name("lmms-eval")),
        "--model", "mmcompose",
        "--model_args", f"pretrained={model}",
        "--include_path", str(LMMS_EVAL_TASKS),
        "--tasks", tasks,
        "--batch_size", "4",
        "--output_path", str(out / "results"),
        "--log_samples",
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=out, env=env, stdout=log.open("w"), stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both lmms-eval runs (started at once) and ``mmcompose eval`` on the same sets."""
    root = tmp_path_factory.mktemp("lmms")
    rng = np.random.default_rng(0)
    model, proc = build_tiny_model(strategy="decoupled", seed=0)
    model.save_pretrained(root / "model", processor=proc)
    partial, pproc = build_tiny_model(("image", "audio"), strategy="decoupled", seed=0)
    partial.save_pretrained(root / "model-ia", processor=pproc)
    build_mcub(_media(root / "media", rng), root / "built", per_combination=8, embed=_circle)
    sets = root / "sets"
    sets.mkdir()
    _reference_format(root / "built", sets)

    (root / "good").mkdir()
    (root / "bad").mkdir()
    good = _lmms_eval(
        root / "model", "mcub_4,mcub_4_gen,mcub_3_iav", root / "good", sets, root / "good.log"
    )
    bad = _lmms_eval(root / "model-ia", "mcub_4", root / "bad", sets, root / "bad.log")
    try:
        ours = {
            name: _mmcompose_eval(root, sets / f"{name}.json") for name in ("MCUB-4", "MCUB-3-IAV")
        }
        _, good_err = good.communicate(timeout=RUN_TIMEOUT)
        _, bad_err = bad.communicate(timeout=RUN_TIMEOUT)
    finally:
        for p in (good, bad):
            if p.poll() is None:
                p.kill()
    assert good.returncode == 0, good_err[-3000:] + (root / "good.log").read_text()[-3000:]
    return {
        "ours": ours,
        "lmms": {
            t: _samples(root / "good" / "results", t)
            for t in ("mcub_4", "mcub_4_gen", "mcub_3_iav")
        },
        "results": _results(root / "good" / "results"),
        "bad": (bad.returncode, (root / "bad.log").read_text(), bad_err),
        "text_config": model.config.text_config,
    }


def _mmcompose_eval(root: Path, questions: Path) -> dict[str, Any]:
    """``mmcompose eval --task mcub`` (the CLI, in-process): results block and samples."""
    from mmcompose.cli import main

    out = root / "ours" / questions.stem
    args = ["eval", str(root / "model"), "--task", "mcub", "--data", str(questions)]
    args += ["--batch-size", "4", "--log-samples", "-o", str(out)]
    if questions.stem == "MCUB-4":
        args += ["--answers", str(questions.with_name("MCUB-answer.json"))]
    else:
        args += ["--answers", str(questions.with_name(f"{questions.stem}.answers.json"))]
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), f"mmcompose eval exited {e.code}"
    (res,) = out.glob("results_*.json")
    (samples,) = out.glob("samples_*.jsonl")
    block = next(iter(json.loads(res.read_text())["results"].values()))
    return {
        "block": block,
        "samples": [json.loads(line) for line in samples.read_text().splitlines()],
    }


def _samples(folder: Path, task: str) -> list[dict[str, Any]]:
    (path,) = folder.glob(f"*/*_samples_{task}.jsonl")
    return sorted(
        (json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"]
    )


def _results(folder: Path) -> dict[str, Any]:
    (path,) = folder.glob("*/*_results.json")
    return json.loads(path.read_text())["results"]


# ----------------------------------------------------------------------------- lmms-eval CLI
@pytest.mark.parametrize(("name", "task"), [("MCUB-4", "mcub_4"), ("MCUB-3-IAV", "mcub_3_iav")])
def test_option_loglikelihood_matches_mmcompose_eval(runs, name, task):
    ours, theirs = runs["ours"][name], runs["lmms"][task]
    gold = [s for s in ours["samples"] if s["gold"] is not None]
    assert len(theirs) == len(gold) >= 4
    letters = "ABCD"
    for s, t in zip(gold, theirs, strict=True):
        assert (
            letters[t["target"] if isinstance(t["target"], int) else int(t["target"])] == s["gold"]
        )
        nll = torch.tensor([float(r[0]) for r in t["filtered_resps"]], dtype=torch.float64)
        ll = torch.tensor(list(s["option_logprobs"].values()), dtype=torch.float64)
        tol = llm_tol(runs["text_config"], float(ll.abs().max()))
        torch.testing.assert_close(-nll, ll, atol=tol, rtol=0.0, msg=f"item {s['id']}")
        chars = torch.tensor(list(s["option_chars"].values()), dtype=torch.float64)
        assert letters[int(nll.argmin())] == s["prediction"]["loglikelihood"]
        assert letters[int((nll / chars).argmin())] == s["prediction"]["loglikelihood_norm"]
        assert t["acc"] == s["correct"]["acc,loglikelihood"]
        assert t["acc_norm"] == s["correct"]["acc_norm,loglikelihood"]
    block = runs["results"][task]
    assert block["acc,none"] == pytest.approx(ours["block"]["acc,loglikelihood"], abs=1e-12)
    assert block["acc_norm,none"] == pytest.approx(
        ours["block"]["acc_norm,loglikelihood"], abs=1e-12
    )
    # the random model's choices are not all one letter: the comparison can tell models apart
    assert len({s["prediction"]["loglikelihood"] for s in gold}) > 1


def test_generation_matches_mmcompose_eval(runs):
    ours, theirs = runs["ours"]["MCUB-4"], runs["lmms"]["mcub_4_gen"]
    gold = [s for s in ours["samples"] if s["gold"] is not None]
    texts = [t["filtered_resps"] for t in theirs]
    texts = [x[0] if isinstance(x, list) else x for x in texts]
    assert texts == [s["generation"] for s in gold]
    assert [t["acc"] for t in theirs] == [s["correct"]["acc,generate"] for s in gold]
    assert runs["results"]["mcub_4_gen"]["acc,none"] == pytest.approx(
        ours["block"]["acc,generate"], abs=1e-12
    )


def test_missing_modality_is_one_message_and_exit_2(runs):
    code, out, err = runs["bad"]
    assert code == 2, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    assert (
        "error: task 'mcub_4' gives video, point input(s), but this model has no video or " in err
    )
    assert "(its modalities: image, audio)" in err and "hint:" in err


# ----------------------------------------------------------------------------- in-process
@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> MMComposeLMMS:
    model, proc = build_tiny_model(strategy="decoupled", seed=1)
    path = tmp_path_factory.mktemp("plugin") / "model"
    model.save_pretrained(path, processor=proc)
    lm = MMComposeLMMS(pretrained=str(path), batch_size=2)
    return lm


def _instance(kind: str, args: tuple[Any, ...], doc_id: int = 0, idx: int = 0) -> Instance:
    return Instance(kind, args, idx, {"task": "t", "doc_id": doc_id, "repeats": 1, "split": "test"})


def test_media_forms_preprocess_as_their_files(plugin, media_files, tmp_path):
    """A PIL image, a 22.05 kHz waveform dict and a point array give the tensors their files
    give (the waveform resampled as the file loader resamples)."""
    import soundfile as sf

    from mmcompose.model.media import load_image

    wave, rate = sf.read(media_files["audio"], dtype="float32")
    pts = tmp_path / "p.npy"
    np.save(pts, np.random.default_rng(0).standard_normal((300, 3)).astype(np.float32))
    objects = [
        load_image(media_files["image"]),
        {"array": wave, "sampling_rate": rate},
        str(media_files["video"]),
        np.load(pts),
    ]
    files = [
        str(media_files["image"]),
        str(media_files["audio"]),
        str(media_files["video"]),
        str(pts),
    ]
    text_o, from_objects = plugin._prompt("what is shown?", [classify(v) for v in objects])
    text_f, from_files = plugin._prompt("what is shown?", [classify(v) for v in files])
    assert text_o == text_f
    assert text_o.count("<image>\n<audio>\n<video>\n<point>\nwhat is shown?") == 1
    for m in ("image", "audio", "video", "point"):
        a = plugin.processor.preprocess(m, from_objects[m])
        b = plugin.processor.preprocess(m, from_files[m])
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0.0, msg=m)


def test_loglikelihood_greedy_flag_and_multi_round(plugin, media_files):
    image = str(media_files["image"])
    plugin.task_dict = {"t": {"test": [{"img": image}, {"img": image}]}}

    def visuals(doc: dict[str, Any]) -> list[str]:
        return [doc["img"]]

    gen = {"max_new_tokens": 4, "do_sample": False, "until": []}
    first = plugin.generate_until(
        [_instance("generate_until", ("describe.", gen, visuals, 0, "t", "test"))]
    )[0]
    text, items = plugin._prompt("describe.", [classify(image)])
    batch = plugin.processor(text, items, chat=False)
    ids = plugin.model.generate(
        **batch, max_new_tokens=4, eos_token_id=plugin.eos, pad_token_id=plugin.eos[0]
    )[0].tolist()
    upto = next((k for k, i in enumerate(ids) if i in plugin.eos), len(ids))
    assert first == plugin.processor.decode(ids[:upto])
    # is_greedy: a continuation is greedy iff greedy decoding from its context (the prompt
    # less its trailing whitespace, as lm-eval splits the pair) produces it.
    reqs = [
        _instance("loglikelihood", ("describe.", c, visuals, d, "t", "test"), d, i)
        for i, (c, d) in enumerate([("dog", 0), ("a cat", 0), ("cow", 1)])
    ]
    got = [r.text for r in plugin.loglikelihood(reqs)]
    (req0, ctx0), (req1, _) = (
        plugin._score_request(reqs, [0, 1]),
        plugin._score_request(reqs, [2]),
    )
    scored = plugin.model.score_requests([req0, req1])
    assert [nll for nll, _ in got] == pytest.approx((-torch.cat(scored)).tolist(), abs=1e-6)
    ctx_long, req_long = (
        ctx0 + ctx0[-3:],
        ScoreRequest(torch.tensor(ctx0 + ctx0[-3:]), [[1]], req0.modal_inputs),
    )
    for ctx, req in ((ctx0, req0), (ctx_long, req_long)):
        g = plugin.model.generate(
            torch.tensor([ctx]), None, req.modal_inputs, max_new_tokens=3, eos_token_id=[-1]
        )[0].tolist()
        other = (g[1] + 1) % len(plugin.processor.tokenizer)
        conts = [g[:2], [g[0], other], g[:3]]
        alone = plugin._greedy([(ScoreRequest(req.input_ids, conts, req.modal_inputs), ctx)])
        assert alone == [[True, False, True]]
    # two contexts of different lengths in one left-padded batch: the same flags
    both = plugin._greedy([(req0, ctx0), (req_long, ctx_long)])
    assert both[0] == [is_greedy for _, is_greedy in got[:2]]
    assert both == plugin._greedy([(req0, ctx0)]) + plugin._greedy([(req_long, ctx_long)])

    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["img"]], "and now?", False, previous_output, {"round": round_idx}

    r = _instance(
        "generate_until_multi_round",
        ("describe.", gen, visuals, doc_to_text, 1, "t", "test"),
        doc_id=1,
    )
    (answers,) = plugin.generate_until_multi_round([r])
    again = plugin.generate_until(
        [_instance("generate_until", ("and now?", gen, visuals, 1, "t", "test"))]
    )[0]
    assert answers == [first, again]
    assert calls == [(1, [first], None), (2, [first, again], {"round": 1})]


def test_missing_modality_outside_the_cli_raises(tmp_path, media_files):
    model, proc = build_tiny_model(("audio",), strategy="decoupled", seed=0)
    model.save_pretrained(tmp_path / "m", processor=proc)
    lm = MMComposeLMMS(pretrained=str(tmp_path / "m"))
    lm.task_dict = {"t": {"test": [{}]}}
    req = _instance(
        "generate_until", ("hi", {}, lambda d: [str(media_files["image"])], 0, "t", "test")
    )
    with pytest.raises(ConfigError, match="no image tower"):
        lm.generate_until([req])
    with pytest.raises(ConfigError, match="invalid mmcompose model arguments"):
        MMComposeLMMS(pretrained=str(tmp_path / "m"), batch_size="auto")


def test_context_and_placeholders():
    conv = json.dumps(
        [
            {"from": "human", "value": "<image> hi"},
            {"from": "gpt", "value": "yo"},
            {"from": "human", "value": "more"},
        ]
    )
    assert messages_from_context(conv) == [
        {"role": "user", "content": "<image> hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "more"},
    ]
    assert messages_from_context("[1, 2]") == [{"role": "user", "content": "[1, 2]"}]
    audio = classify({"array": np.zeros(8, np.float32), "sampling_rate": 8000})
    assert audio.modality == "audio" and isinstance(audio.item, Audio)
    frames = classify(np.zeros((2, 4, 4, 3), np.uint8))
    placed = place_inputs([{"role": "user", "content": "q"}], [audio, frames])
    assert placed[0]["content"] == "<audio>\n<video>\nq"
    with pytest.raises(PlaceholderError, match="1 <audio> for 2 audio"):
        place_inputs([{"role": "user", "content": "<audio> q"}], [audio, audio])
