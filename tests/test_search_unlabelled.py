"""The label-free lambda search (AdaMMS's generation consistency): the pure search on plain
functions with known plateaus, reading unlabelled inputs (MCUB without gold letters, folders
and lists of media files), ``compose --search-unlabelled`` end to end on tiny models checked
against compositions written to disk, and every refusal (exit 2, nothing written)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from mmcompose.compose.config import parse_compose_config
from mmcompose.compose.consistency import agreement, axis_consistency, run_consistency_search
from mmcompose.compose.executor import REPORT_NAME, compose
from mmcompose.compose.reweight import with_weights
from mmcompose.compose.search_loop import InvalidWeights
from mmcompose.compose.search_unlabelled import (
    drop_unreadable,
    load_unlabelled,
    responder,
    search_unlabelled,
)
from mmcompose.errors import ConfigError, MediaError, MergeError
from mmcompose.model.media import CorruptFileWarning
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.model.processor import MMProcessor
from mmcompose.testing import compose_config, save_tiny_single

GRID = (0.25, 0.5, 0.75, 1.0)
MODS = ("image", "audio")


# ---------------------------------------------------------------- pure search
def _plateau(center: dict[int, tuple[float, float]], n_items: int = 12):
    """Answers that stay put while each lambda is inside its [lo, hi] plateau and change
    with every step outside it (one answer flips per 0.25 of distance, per source)."""

    def respond(w):
        out = list(range(n_items))
        k = 0
        for m, (lo, hi) in center.items():
            dist = max(lo - w[m], 0.0, w[m] - hi)
            for _ in range(round(dist / 0.25)):
                out[k % n_items] = (m, round(w[m], 4))  # depends on the value: no agreement
                k += 1
        return out

    return respond


def test_agreement_and_axis_consistency():
    assert agreement(["A", "B", None], ["A", "C", None]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="different inputs"):
        agreement(["A"], ["A", "B"])
    a, b, c = ["A", "A"], ["A", "B"], ["B", "B"]
    assert axis_consistency([a, b, c]) == [0.5, 0.5, 0.5]  # ends: one neighbour each
    assert axis_consistency([a, a, b]) == [1.0, 0.75, 0.5]
    # an invalid point is skipped: its neighbours compare across it
    assert axis_consistency([a, None, a]) == [1.0, None, 1.0]
    assert axis_consistency([a, None, None]) == [None, None, None]  # nothing to compare with


def test_coordinate_moves_each_lambda_onto_its_plateau():
    respond = _plateau({0: (0.75, 1.0), 1: (0.25, 0.25)})
    res = run_consistency_search(respond, 2, GRID, method="coordinate", start=(0.25, 1.0))
    assert res.best_weights == (1.0, 0.25) and res.criterion == "consistency"
    assert res.passes == 2  # the second pass changes nothing
    # inside a sweep: on the plateau's far end (one neighbour, identical answers) 1.0
    first = [c for c in res.candidates if c.pass_ == 1 and c.swept == 0]
    assert [c.weights[0] for c in first] == list(GRID) and first[-1].accuracy == 1.0
    assert all(c.accuracy is not None and 0 <= c.accuracy <= 1 for c in res.candidates)
    scored = [c.weights for c in res.candidates if not c.cached]
    assert len(scored) == len(set(scored)) and any(c.cached for c in res.candidates)
    assert res.best.weights == res.best_weights and res.best.pass_ == res.passes
    one = run_consistency_search(respond, 2, GRID, start=(0.25, 1.0), max_passes=1)
    assert one.passes == 1 and one.best_weights == (1.0, 0.25)


def test_grid_scores_every_point_by_its_neighbours_on_every_axis():
    respond = _plateau({0: (0.5, 0.5), 1: (1.0, 1.0)})
    res = run_consistency_search(respond, 2, GRID, method="grid")
    assert len(res.candidates) == 16 and res.best_weights == (0.5, 1.0)
    assert res.best_accuracy == max(c.accuracy for c in res.candidates)


def test_ties_keep_the_current_value_then_the_nearest():
    flat = run_consistency_search(lambda w: ["x"] * 3, 2, GRID, start=(0.5, 0.75))
    assert flat.best_weights == (0.5, 0.75) and flat.passes == 1
    off = run_consistency_search(lambda w: ["x"] * 3, 2, GRID, start=(0.6, 0.9))
    assert off.best_weights == (0.5, 1.0)  # the nearest grid values
    grid = run_consistency_search(lambda w: ["x"], 2, GRID, method="grid", start=(0.7, 0.3))
    assert grid.best_weights == (0.75, 0.25)


def test_invalid_weights_are_recorded_and_never_chosen():
    def respond(w):
        if w[0] == 0.5:
            raise InvalidWeights("refused by the method")
        return ["x", "y"] if w[0] < 0.5 else ["x", "z"]

    res = run_consistency_search(respond, 1, GRID, start=(1.0,))
    bad = [c for c in res.candidates if c.error]
    assert [c.weights for c in bad] == [(0.5,)] and bad[0].accuracy is None
    assert res.best_weights == (1.0,)  # 0.75 and 1.0 agree; 0.25 compares with 0.75
    with pytest.raises(MergeError, match="no candidate weights"):
        run_consistency_search(lambda w: (_ for _ in ()).throw(InvalidWeights("no")), 1, GRID)
    with pytest.raises(ZeroDivisionError):  # any other error ends the search
        run_consistency_search(lambda w: [1 / 0], 1, GRID)


def test_the_grid_needs_neighbours_and_is_checked():
    with pytest.raises(ConfigError, match="has one"):
        run_consistency_search(lambda w: ["x"], 2, (1.0,))
    with pytest.raises(ConfigError, match="1296 candidates"):
        run_consistency_search(lambda w: ["x"], 4, (0, 0.2, 0.4, 0.6, 0.8, 1), method="grid")
    with pytest.raises(ConfigError, match="search method"):
        run_consistency_search(lambda w: ["x"], 2, GRID, method="random")  # type: ignore[arg-type]


def test_the_search_is_deterministic():
    respond = _plateau({0: (0.5, 0.75), 1: (0.25, 0.5)})
    for method in ("grid", "coordinate"):
        a = run_consistency_search(respond, 2, GRID, method=method)
        b = run_consistency_search(respond, 2, GRID, method=method)
        assert [(c.weights, c.accuracy) for c in a.candidates] == [
            (c.weights, c.accuracy) for c in b.candidates
        ]


# ---------------------------------------------------------------- inputs
def _varied_media(folder: Path, media: dict[str, Path], n: int) -> list[dict[str, Path]]:
    """``n`` different images and sounds (random pixels, tones of other pitches)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        img, wav = folder / f"img{i}.png", folder / f"tone{i}.wav"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
        t = np.arange(16000) / 16000
        sf.write(wav, (0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t)).astype(np.float32), 16000)
        out.append({"image": img, "audio": wav})
    return out


def _mcub(folder: Path, media: dict[str, Path], n: int = 4, gold: bool = False) -> Path:
    words = ["dog", "piano", "water", "fire", "cup", "bell"]
    files = _varied_media(folder, media, n)
    items = []
    for i in range(n):
        opts = "\n".join(f"{k}. {words[(i + j) % len(words)]}" for j, k in enumerate("ABCD"))
        items.append(
            {
                "id": f"q{i}",
                "conversations": [
                    {
                        "from": "human",
                        "value": f"image: <image>\naudio: <audio>\nWhat do they share?\n{opts}",
                    },
                    {"from": "gpt", "value": "ABCD"[i % 4] if gold else None},
                ],
                "modal_inputs": {
                    "vision": [str(files[i]["image"])],
                    "audio": [str(files[i]["audio"])],
                },
            }
        )
    path = folder / ("val.json" if gold else "questions.json")
    path.write_text(json.dumps(items))
    return path


def _media_folder(folder: Path, media: dict[str, Path]) -> Path:
    d = folder / "inputs"
    (d / "nested").mkdir(parents=True)
    for k in range(2):
        (d / f"img{k}.png").write_bytes(media["image"].read_bytes())
    (d / "nested" / "tone.wav").write_bytes(media["audio"].read_bytes())
    (d / "notes.txt").write_text("not media")
    return d


def test_inputs_from_a_folder_a_list_a_json_list_and_mcub(tmp_path, media_files):
    d = _media_folder(tmp_path, media_files)
    got = load_unlabelled(d)
    assert got.kind == "media" and [m for _, m in got.files] == ["image", "image", "audio"]
    assert str(d / "notes.txt") in got.skipped and got.modalities == ["image", "audio"]
    listing = tmp_path / "inputs.txt"
    listing.write_text("# unlabelled\ninputs/img0.png\n\n" + str(d / "nested/tone.wav") + "\n")
    assert load_unlabelled(listing).files == ((str(d / "img0.png"), "image"),
                                              (str(d / "nested/tone.wav"), "audio"))  # fmt: skip
    as_json = tmp_path / "paths.json"
    as_json.write_text(json.dumps(["inputs/img1.png"]))
    assert load_unlabelled(as_json).files == ((str(d / "img1.png"), "image"),)
    assert load_unlabelled(d / "img0.png").files == ((str(d / "img0.png"), "image"),)
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a")
    assert load_unlabelled(gif).files[0][1] == "image"  # .gif is an image first
    mcub = load_unlabelled(_mcub(tmp_path, media_files, gold=True))
    assert mcub.kind == "mcub" and len(mcub) == 4
    assert all(it.answer is None for it in mcub.items)  # gold letters are never read
    assert "4 unlabelled MCUB items" in mcub.describe()


@pytest.mark.parametrize("case", ["missing", "empty-folder", "no-media", "empty-list", "[]"])
def test_inputs_without_anything_to_search_on_are_refused(tmp_path, case):
    path = tmp_path / "in"
    if case == "empty-folder":
        path.mkdir()
    elif case == "no-media":
        path.mkdir()
        (path / "readme.md").write_text("x")
    elif case == "empty-list":
        path = tmp_path / "in.txt"
        path.write_text("# nothing\n\n")
    elif case == "[]":
        path = tmp_path / "in.json"
        path.write_text("[]")
    match = "not found" if case == "missing" else "(no media files|empty list)"
    with pytest.raises(ConfigError, match=match):
        load_unlabelled(path)


def test_unreadable_files_are_dropped_and_named_none_left_is_refused(tmp_path, media_files):
    d = _media_folder(tmp_path, media_files)
    (d / "img1.png").write_bytes(b"\x89PNG garbage" * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = drop_unreadable(load_unlabelled(d))
    assert [p for p, _ in got.files] == [str(d / "img0.png"), str(d / "nested" / "tone.wav")]
    assert any(
        issubclass(w.category, CorruptFileWarning) and str(d / "img1.png") in str(w.message)
        for w in caught
    )
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage" * 20)
    (bad / "y.wav").write_bytes(b"RIFF" + b"\x00" * 40)
    with pytest.raises(MediaError, match="no readable inputs") as e:
        drop_unreadable(load_unlabelled(bad))
    assert str(bad / "x.png") in e.value.message and str(bad / "y.wav") in e.value.message


# ---------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("single")
    return [save_tiny_single(d, m, "shared", 40 + k) for k, m in enumerate(MODS)]


def _yaml(folder: Path, cfg: dict) -> Path:
    path = folder / "naive.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _on_disk(tmp_path: Path, cfg, inputs, mode: str, weights) -> list:
    """The responses of the composition written to disk with ``weights``."""
    out = tmp_path / "disk" / "-".join(map(str, weights))
    compose(with_weights(cfg, weights), out, progress=False)
    model = MMComposeForCausalLM.from_pretrained(out)
    return responder(inputs, mode)(model, MMProcessor.from_pretrained(out))


@pytest.mark.parametrize("kind", ["mcub", "media"])
def test_compose_search_unlabelled_end_to_end_equals_the_search_over_disk_compositions(
    tmp_path, shared, media_files, run, kind
):
    """The CLI's choice, candidate by candidate, is the consistency search over the answers
    of models composed to disk with each candidate's weights."""
    src = _mcub(tmp_path, media_files) if kind == "mcub" else _media_folder(tmp_path, media_files)
    mode = "loglikelihood" if kind == "mcub" else "generate"
    cfg_dict = compose_config(shared, "task_arithmetic")
    out = tmp_path / "out"
    grid = "0,4"
    r = run("compose", str(_yaml(tmp_path, cfg_dict)), "-o", str(out), "--search-unlabelled",
            str(src), "--grid", grid, "--search-method", "grid")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"search (grid, consistency,{mode}): best" in r.stdout
    data = json.loads((out / "search" / "search.json").read_text())
    assert data["criterion"] == "consistency" and data["metric"] == f"consistency,{mode}"
    assert data["n_items"] == (4 if kind == "mcub" else 3) and len(data["candidates"]) == 4
    assert (out / "search" / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "| consistency | seconds |" in (out / "search" / "search.md").read_text()
    report = json.loads((out / REPORT_NAME).read_text())
    chosen = [m["parameters"]["weight"] for m in report["config"]["models"]]
    assert chosen == list(data["best"]["weights"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left

    cfg = parse_compose_config(cfg_dict)
    inputs = load_unlabelled(src)
    answers = {}

    def respond(w):
        answers[w] = _on_disk(tmp_path, cfg, inputs, mode, w)
        return answers[w]

    ref = run_consistency_search(respond, 2, (0.0, 4.0), method="grid", start=(0.5, 0.5))
    got = [(tuple(c["weights"].values()), c["accuracy"]) for c in data["candidates"]]
    assert got == [(c.weights, c.accuracy) for c in ref.candidates]
    assert tuple(chosen) == ref.best_weights
    assert len({json.dumps(a) for a in answers.values()}) > 1  # the weights change answers


def test_search_unlabelled_api_with_a_responder_and_coordinate(tmp_path, shared):
    """A responder of the real in-memory model (its image logits' argmax per prompt)."""
    import torch

    from mmcompose.testing import tiny_inputs

    def respond(model, proc):
        outs = []
        for seed in range(4):
            batch = proc("<image>\nwhat is it?", {"image": [tiny_inputs(seed)["image"]]})
            with torch.no_grad():
                logits = model(**batch, padding_side="left").logits[0, -1]
            outs.append(int(logits.argmax()))
        return outs

    cfg = parse_compose_config(compose_config(shared, "task_arithmetic"))
    res = search_unlabelled(cfg, respond=respond, grid=(0.0, 1.0, 2.0), progress=False,
                            workdir=tmp_path)  # fmt: skip
    assert res.metric == "consistency" and res.n_items is None and res.passes >= 1
    assert len(res.best_weights) == 2 and all(w in (0.0, 1.0, 2.0) for w in res.best_weights)
    assert not list(tmp_path.iterdir())  # the temporary composition is gone


def test_mcub_answers_by_generation_are_letters_or_the_text_itself(tmp_path, media_files):
    from mmcompose.testing import build_tiny_model

    model, proc = build_tiny_model(MODS, "shared", seed=0, adapter_seed=3)
    inputs = load_unlabelled(_mcub(tmp_path, media_files))
    by_gen = responder(inputs, "generate", max_new_tokens=4)(model, proc)
    by_ll = responder(inputs, "loglikelihood")(model, proc)
    assert len(by_gen) == len(by_ll) == 4 and set(by_ll) <= set("ABCD")
    assert all(a in "ABCD" or a.startswith("text: ") for a in by_gen)  # type: ignore[union-attr]
    assert by_gen == responder(inputs, "generate", max_new_tokens=4)(model, proc)  # greedy


def _refused(r, out: Path, match: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert match in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, shared, media_files, run):
    out = tmp_path / "out"
    cfg = _yaml(tmp_path, compose_config(shared, "task_arithmetic"))
    base = ("compose", str(cfg), "-o", str(out))
    flag = "--search-unlabelled"
    _refused(run(*base, flag, str(tmp_path / "nope")), out, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(run(*base, flag, str(empty)), out, "no media files in folder")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png" * 10)
    (corrupt / "b.wav").write_bytes(b"")
    r = run(*base, flag, str(corrupt))
    _refused(r, out, "no readable inputs")
    assert str(corrupt / "a.png") in r.stderr and str(corrupt / "b.wav") in r.stderr
    points = tmp_path / "points"
    points.mkdir()
    (points / "shape.ply").write_bytes(media_files["point"].read_bytes())
    _refused(run(*base, flag, str(points)), out, "has none of these")
    val = _mcub(tmp_path, media_files, gold=True)
    _refused(run(*base, flag, str(val), "--search", str(val)), out, "both given")
    _refused(run(*base, flag, str(val), "--search-answers", str(val)), out, "--search-answers")
    _refused(run(*base, flag, str(val), "--grid", "1"), out, "has one")
    _refused(run(*base, flag, str(val), "--dry-run"), out, "--dry-run")
    ties = _yaml(tmp_path, compose_config(shared, "ties", [1.0, 1.0]))
    _refused(
        run("compose", str(ties), "-o", str(out), flag, str(val)), out, "cannot be re-weighted"
    )
