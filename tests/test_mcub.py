"""MCUB: reader, option and letter parsing, both scorings on a tiny model, CLI errors, and
data-parallel evaluation under torchrun (2 CPU processes = 1 process, item by item)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcompose.bench.distributed import DataParallel, interleave
from mmcompose.bench.mcub import (
    MCUBItem,
    MCUBResult,
    check_inputs,
    evaluate_mcub,
    load_mcub,
    parse_letter,
    restrict_modalities,
)
from mmcompose.errors import MMComposeError
from mmcompose.testing import build_tiny_model, llm_tol
from mmcompose.train.data import DataError

OPTIONS = [("cow", "horse", "sheep", "pig"), ("drum", "bell", "piano", "guitar")]
GOLD = ["B", "A", "D", "C", "B"]


def question(mods: tuple[str, ...], k: int = 0, options: tuple[str, ...] | None = None) -> str:
    opts = options or OPTIONS[k % 2]
    lines = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts))
    return (
        "".join(f"<{m}>\n" for m in mods)
        + f"Which attribute do these inputs have in common?\n{lines}\n"
        + "Answer with the option's letter from the given choices directly."
    )


def write_mcub(
    folder: Path,
    media: dict[str, Path],
    n: int = 5,
    mods: tuple[str, ...] = ("image", "audio", "point"),
    gold: list[str | None] | None = None,
) -> tuple[Path, Path]:
    """Questions + answers files in the reference format; ``vision`` key, relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    key = {"image": "vision"}
    rel = {m: os.path.relpath(media[m], folder) for m in mods}
    gold = gold or GOLD[:n]
    qs = [
        {
            "id": f"q{i}",
            "conversations": [
                {"from": "human", "value": question(mods, i)},
                {"from": "gpt", "value": None},
            ],
            "modal_inputs": {key.get(m, m): rel[m] if i % 2 else [rel[m]] for m in mods},
        }
        for i in range(n)
    ]
    ans = json.loads(json.dumps(qs))
    for a, g in zip(ans, gold, strict=True):
        a["conversations"][-1]["value"] = g
    (folder / "q.json").write_text(json.dumps(qs))
    (folder / "a.json").write_text(json.dumps(ans))
    return folder / "q.json", folder / "a.json"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(strategy="decoupled", seed=0)


# ----------------------------------------------------------------------------- reader
def test_reader_reference_format(tmp_path, media_files):
    q, a = write_mcub(tmp_path / "d", media_files)
    items = load_mcub(q, a)
    assert [it.id for it in items] == ["q0", "q1", "q2", "q3", "q4"]
    assert [it.answer for it in items] == GOLD
    it = items[1]
    assert it.options == {"A": "drum", "B": "bell", "C": "piano", "D": "guitar"}
    assert set(it.modal_inputs) == {"image", "audio", "point"}  # "vision" read as image
    assert it.modal_inputs["image"] == [str(media_files["image"].resolve())]
    assert it.modalities == ["image", "audio", "point"]
    assert [m["role"] for m in it.messages()] == ["user"]  # the null answer turn is dropped
    # Without an answers file: questions only -> no gold; an answers-format file alone works.
    assert all(x.answer is None for x in load_mcub(q))
    assert [x.answer for x in load_mcub(a)] == GOLD


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "A. cow\nB. horse\nC. sheep\nD. pig",
            {"A": "cow", "B": "horse", "C": "sheep", "D": "pig"},
        ),
        (
            "  A) a red car  \nB: tea\n C. sea lion\nD.pig",
            {"A": "a red car", "B": "tea", "C": "sea lion", "D": "pig"},
        ),
    ],
)
def test_option_parsing(tmp_path, media_files, lines, expected):
    q, _ = write_mcub(tmp_path, media_files, n=1, mods=("image",))
    data = json.loads(q.read_text())
    data[0]["conversations"][0]["value"] = f"<image>\nWhat is common?\n{lines}\nAnswer."
    q.write_text(json.dumps(data))
    assert load_mcub(q)[0].options == expected


OPTS = {"A": "horse", "B": "dog", "C": "cow", "D": "sea lion"}


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("b", "B"),
        ("**D**", "D"),
        ("B) dog", "B"),
        ("The answer is B", "B"),
        ("Answer: B", "B"),
        ("the correct answer is (C).", "C"),
        ("The answer is B, not C", "B"),
        ("I pick D", "D"),
        ("A cow.", "C"),  # the article "A", then the option text
        ("It is a dog", "B"),
        ("a sea lion", "D"),  # names "sea lion", not the "lion" inside it
        ("horse or dog", None),
        ("Bees", None),
        ("I do not know", None),
        ("", None),
    ],
)
def test_parse_letter(text, letter):
    assert parse_letter(text, OPTS) == letter


def test_restrict_modalities(tmp_path, media_files):
    q, a = write_mcub(tmp_path, media_files, n=2, mods=("image", "audio", "video", "point"))
    data = json.loads(q.read_text())
    data[0]["conversations"][0]["value"] = data[0]["conversations"][0]["value"].replace(
        "<video>\n", "video: <video>\n"
    )
    q.write_text(json.dumps(data))
    items = load_mcub(q, a)
    sub = restrict_modalities(items, ["vision", "audio"])
    for it, orig in zip(sub, items, strict=True):
        assert set(it.modal_inputs) == {"image", "audio"}
        text = it.conversations[0]["value"]
        assert text.startswith("<image>\n<audio>\nWhich attribute") and "point" not in text
        assert it.options == orig.options and it.answer == orig.answer
        assert "<video>" in orig.conversations[0]["value"]  # the input is not changed
    assert [it.modalities for it in restrict_modalities(items, ["point"])] == [["point"]] * 2


def test_a_video_may_be_a_frame_folder_or_a_still(tmp_path, media_files):
    from PIL import Image

    frames = tmp_path / "d" / "frames"
    frames.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(frames / f"{i}.png")
    for video in (frames, media_files["image"]):  # a frame folder; a still image
        q, a = write_mcub(tmp_path / "d", {**media_files, "video": video}, mods=("video",))
        items = load_mcub(q, a)
        assert items[0].modal_inputs["video"] == [str(Path(video).resolve())]
        check_inputs(items, ["video"])  # found: no error
    q, a = write_mcub(tmp_path / "d", {**media_files, "video": frames / "gone"}, mods=("video",))
    with pytest.raises(MMComposeError, match="media file"):
        check_inputs(load_mcub(q, a), ["video"])


def _shared_answers(folder: Path, a: Path, extra: list[dict] | None = None) -> Path:
    """An answers file shared by several sets, as the reference's MCUB-answer.json: this
    set's answers among those of another set (MCUB-4 ids ``m4-*``, gold letters only)."""
    ours = json.loads(a.read_text())
    other = [{**x, "id": f"m4-{i}"} for i, x in enumerate(ours[:3])]
    path = folder / "MCUB-answer.json"
    path.write_text(
        json.dumps([other[0], *ours[:2], other[1], *ours[2:], other[2], *(extra or [])])
    )
    return path


def test_shared_answers_file_ignores_other_sets(tmp_path, media_files, caplog):
    q, a = write_mcub(tmp_path / "d", media_files)
    shared = _shared_answers(tmp_path, a)
    with caplog.at_level("WARNING", logger="mmcompose.bench.mcub"):
        items = load_mcub(q, shared)
    assert [it.answer for it in items] == GOLD
    assert f"{shared}: answers to 3 id(s) of other sets ignored; 5 question(s) answered" in (
        caplog.text
    )
    caplog.clear()
    load_mcub(q, a)  # the set's own answers file: nothing ignored, nothing logged
    assert "ignored" not in caplog.text
    # the same answer twice is harmless; two different answers to one question are not
    again = json.loads(a.read_text())[0]
    assert [it.answer for it in load_mcub(q, _shared_answers(tmp_path, a, [again]))] == GOLD
    changed = {
        **again,
        "conversations": [*again["conversations"][:-1], {"from": "gpt", "value": "D"}],
    }
    with pytest.raises(DataError, match=r"answered twice, differently: q0"):
        load_mcub(q, _shared_answers(tmp_path, a, [changed]))


def test_shared_answers_file_must_answer_every_question(tmp_path, media_files):
    q, a = write_mcub(tmp_path / "d", media_files)
    ours = json.loads(a.read_text())
    a.write_text(json.dumps([x for x in ours if x["id"] != "q3"]))
    with pytest.raises(DataError, match=r"1 question id\(s\) have no answer \(e\.g\. q3\)"):
        load_mcub(q, _shared_answers(tmp_path, a))


# ----------------------------------------------------------------------------- scoring
def option_logprobs_by_forward(
    model, proc, item: MCUBItem, continuation: str = "end_of_turn"
) -> dict[str, float]:
    """Each option scored on its own with one plain forward pass over prompt + answer:
    ``end_of_turn`` scores option + end of turn after the prompt; ``lm_eval`` scores the
    option alone, the prompt's trailing whitespace moved in front of it and the whole text
    tokenised at once (lm-eval's ``_encode_pair``)."""
    msgs = item.messages()
    prompt = proc.render_chat(msgs, add_generation_prompt=True)
    modal = {m: proc.preprocess(m, v) for m, v in item.modal_inputs.items()}
    out = {}
    for letter, text in item.options.items():
        if continuation == "lm_eval":
            ctx = proc.tokenize(prompt.rstrip())
            cont = proc.tokenize(prompt + text)[len(ctx) :]
            ids = torch.tensor([ctx + cont])
            out[letter] = _last_tokens_logprob(model, ids, cont, modal)
            continue
        full = proc.render_chat([*msgs, {"role": "assistant", "content": text}], False)
        answer = full[len(prompt) :]  # scored up to and including the end-of-turn token
        answer = answer[: answer.index("<|im_end|>") + len("<|im_end|>")]
        cont = proc.tokenize(answer, add_special_tokens=False)
        ids = torch.tensor([proc.tokenize(prompt) + cont])
        out[letter] = _last_tokens_logprob(model, ids, cont, modal)
    return out


def _last_tokens_logprob(model, ids, cont, modal) -> float:
    """Summed log-probability of the last ``len(cont)`` tokens of ``ids`` (= ``cont``)."""
    logits = model(ids, modal_inputs=modal).logits[0]  # over the spliced sequence
    logp = logits[-len(cont) - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


@pytest.mark.parametrize("continuation", ["lm_eval", "end_of_turn"])
def test_loglikelihood_scoring_matches_plain_forward(tmp_path, media_files, tiny, continuation):
    model, proc = tiny
    items = load_mcub(*write_mcub(tmp_path, media_files, n=3))
    r = evaluate_mcub(
        model,
        proc,
        items,
        ("loglikelihood",),
        batch_size=2,
        progress=False,
        continuation=continuation,
    )
    assert set(r.correct) == {"acc,loglikelihood", "acc_norm,loglikelihood"} and r.n == 3
    for s, it in zip(r.samples, items, strict=True):
        ref = option_logprobs_by_forward(model, proc, it, continuation)
        got = s["option_logprobs"]
        # packed vs one forward per option: float32 rounding through the tiny LLM at the
        # scores' size (a misplaced query or mask moves a score by O(0.1..1))
        tol = llm_tol(model.config.text_config, max(map(abs, ref.values())))
        assert got == pytest.approx(ref, abs=tol)
        assert s["prediction"]["loglikelihood"] == max(ref, key=ref.get)
        # acc_norm as lm-eval defines it: divided by the option's length in characters
        norm = {k: v / s["option_chars"][k] for k, v in ref.items()}
        assert s["prediction"]["loglikelihood_norm"] == max(norm, key=norm.get)
        assert s["option_chars"]["A"] == len(it.options["A"])
    for key, pred in (
        ("acc,loglikelihood", "loglikelihood"),
        ("acc_norm,loglikelihood", "loglikelihood_norm"),
    ):
        want = [
            float(s["prediction"][pred] == it.answer)
            for s, it in zip(r.samples, items, strict=True)
        ]
        assert r.correct[key] == want
    assert r.accuracy() == sum(r.correct["acc,loglikelihood"]) / 3


def test_generate_scoring_batched_as_single(tmp_path, media_files, tiny):
    model, proc = tiny
    items = load_mcub(*write_mcub(tmp_path, media_files, n=3))
    batched = evaluate_mcub(model, proc, items, ("generate",), batch_size=3, progress=False)
    single = evaluate_mcub(model, proc, items, ("generate",), batch_size=1, progress=False)
    assert [s["generation"] for s in batched.samples] == [s["generation"] for s in single.samples]
    for s, it in zip(batched.samples, items, strict=True):
        assert s["prediction"]["generate"] == parse_letter(s["generation"], it.options)
    assert set(batched.correct) == {"acc,generate"}


def test_accuracy_over_gold_items_with_missing_prediction(tmp_path, media_files, tiny, monkeypatch):
    """Generations are fixed: an unparsable one counts as wrong, an item without gold is not
    counted, and n is the number of gold items (the reference divides by predictions)."""
    model, proc = tiny
    items = load_mcub(*write_mcub(tmp_path, media_files, n=4, gold=["B", "B", "C", None]))
    texts = ["The answer is B", "no idea", "(C) sheep", "B"]
    eos = proc.tokenizer.eos_token_id

    def fake_generate(input_ids, *args, **kwargs):
        rows = [proc.tokenizer(t)["input_ids"] + [eos] for t in texts[: len(input_ids)]]
        width = max(map(len, rows))
        return torch.tensor([r + [eos] * (width - len(r)) for r in rows])

    monkeypatch.setattr(model, "generate", fake_generate)
    r = evaluate_mcub(model, proc, items, ("generate",), batch_size=4, progress=False)
    assert [s["generation"] for s in r.samples] == texts
    assert [s["prediction"]["generate"] for s in r.samples] == ["B", None, "C", "B"]
    assert r.n == 3 and r.correct["acc,generate"] == [1.0, 0.0, 1.0]
    assert r.accuracy("acc,generate") == 2 / 3  # sum([1.0, 0.0, 1.0]) / 3: the same division
    assert r.samples[3]["gold"] is None and r.samples[3]["correct"] == {}


def test_sharded_runs_merge_to_the_single_run(tmp_path, media_files, tiny):
    model, proc = tiny
    items = load_mcub(*write_mcub(tmp_path, media_files, n=5))
    full = evaluate_mcub(model, proc, items, ("loglikelihood",), progress=False)
    parts = [
        evaluate_mcub(
            model, proc, DataParallel(r, 2).take(items), ("loglikelihood",), progress=False
        )
        for r in range(2)
    ]
    merged = MCUBResult.merge(parts)
    assert [s["id"] for s in merged.samples] == [it.id for it in items]
    assert merged.correct == full.correct and merged.n == 5
    assert interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert interleave([[0], [1], []]) == [0, 1]


def test_model_without_a_modality(tmp_path, media_files):
    model, proc = build_tiny_model(("image", "audio"), strategy="shared")
    items = load_mcub(*write_mcub(tmp_path, media_files, n=1))
    with pytest.raises(MMComposeError, match="no point tower") as e:
        evaluate_mcub(model, proc, items, progress=False)
    assert "--modalities image,audio" in e.value.hint
    r = evaluate_mcub(model, proc, restrict_modalities(items, ["image", "audio"]), progress=False)
    assert r.n == 1


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def image_only_dir(tmp_path_factory):
    model, proc = build_tiny_model(("image",), strategy="shared")
    path = tmp_path_factory.mktemp("models") / "image-only"
    model.save_pretrained(path, processor=proc)
    return path


def test_cli_mcub_results_layout(run, tiny_model_dir, media_files, tmp_path):
    q, a = write_mcub(tmp_path / "d", media_files)
    r = run(
        "eval", str(tiny_model_dir), "--task", "mcub", "--data", str(q), "--answers", str(a),
        "--modalities", "image,audio", "--limit", "4", "--batch-size", "3", "-o",
        str(tmp_path / "out"), "--log-samples",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "mcub_image_audio" in r.stdout and "acc_norm,loglikelihood" in r.stdout
    (res,) = (tmp_path / "out").glob("results_*.json")
    doc = json.loads(res.read_text())
    block = doc["results"]["mcub_image_audio"]
    cfg = doc["configs"]["mcub_image_audio"]
    assert cfg["modalities"] == ["image", "audio"] and cfg["dataset_path"] == str(q)
    assert cfg["output_type"] == ["generate_until", "multiple_choice"]
    assert cfg["continuation"] == "lm_eval"  # lm-evaluation-harness's scoring by default
    assert doc["n-samples"]["mcub_image_audio"] == {"original": 4, "effective": 4}
    (samples_file,) = (tmp_path / "out").glob("samples_mcub_image_audio_*.jsonl")
    samples = [json.loads(x) for x in samples_file.read_text().splitlines()]
    assert [s["id"] for s in samples] == ["q0", "q1", "q2", "q3"]
    assert set(samples[0]) >= {"id", "gold", "prediction", "generation", "option_logprobs"}
    for key in ("acc,generate", "acc,loglikelihood", "acc_norm,loglikelihood"):
        # k / 4 is exact in binary floating point
        assert block[key] == sum(s["correct"][key] for s in samples) / 4
        assert key.replace(",", "_stderr,") in block


def test_cli_accepts_a_shared_answers_file(run, tiny_model_dir, media_files, tmp_path):
    q, a = write_mcub(tmp_path / "d", media_files)
    shared = _shared_answers(tmp_path, a)
    args = ["eval", str(tiny_model_dir), "--task", "mcub", "--data", str(q), "--mode"]
    r = run(*args, "loglikelihood", "--answers", str(shared))
    assert r.returncode == 0, r.stderr
    own = run(*args, "loglikelihood", "--answers", str(a))
    assert r.stdout == own.stdout  # the same scores as with the set's own answers file


BAD = {
    "malformed JSON": (lambda d: d["q"].write_text("[{"), "is not valid JSON"),
    "answer ids": (
        lambda d: d["a"].write_text(
            json.dumps([{**x, "id": f"x{i}"} for i, x in enumerate(json.loads(d["a"].read_text()))])
        ),
        "question id(s) have no answer (e.g. q0, q1, q2, ...)",
    ),
    "3 options": (
        lambda d: _edit(d["q"], lambda t: t.replace("\\nD. pig", "")),
        "has options A, B, C; MCUB items have 4",
    ),
    "missing media": (
        lambda d: _edit(d["q"], lambda t: t.replace("shape.ply", "gone.ply")),
        "media file(s) not found",
    ),
    "gold not an option": (lambda d: _edit(d["a"], lambda t: t.replace('"B"', '"E"')), "'E'"),
    "malformed modal_inputs": (
        lambda d: _edit(d["q"], lambda t: t.replace('"audio": [', '"audio": [3, ')),
        "malformed 'modal_inputs'",
    ),
    "placeholder count": (
        lambda d: _edit(d["q"], lambda t: t.replace("<audio>\\n", "", 1)),
        "0 <audio> placeholder(s) but 1 audio input",
    ),
}


def _edit(path: Path, fn) -> None:
    path.write_text(fn(path.read_text()))


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_exits_2(run, tiny_model_dir, media_files, tmp_path, case):
    q, a = write_mcub(tmp_path / "d", media_files)
    breaker, needle = BAD[case]
    breaker({"q": q, "a": a})
    r = run("eval", str(tiny_model_dir), "--task", "mcub", "--data", str(q), "--answers", str(a))
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in " ".join(r.stderr.split()) and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--modalities", "smell"], "unknown modality 'smell'"),
        (["--mode", "guess"], "unknown mode 'guess'"),
        (["--continuation", "eot"], "unknown continuation 'eot'"),
        (["--answers", "{q}"], "holds no gold answers"),
        (["--answers", "{missing}"], "not found"),
        (["--model", "{image_only}"], "its modalities: image"),
    ],
)
def test_cli_usage_errors_exit_2(
    run, tiny_model_dir, image_only_dir, media_files, tmp_path, extra, needle
):
    q, a = write_mcub(tmp_path / "d", media_files)
    subs = {"q": str(q), "missing": str(tmp_path / "none.json"), "image_only": str(image_only_dir)}
    extra = [x.format(**subs) for x in extra]
    model = str(tiny_model_dir)
    if extra[0] == "--model":
        model, extra = extra[1], []
    args = ["eval", model, "--task", "mcub", "--data", str(q)]
    if "--answers" not in extra:
        args += ["--answers", str(a)]
    r = run(*args, *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    if needle.startswith("its modalities"):
        assert "--modalities image" in r.stderr


# ----------------------------------------------------------------------------- torchrun
TWO_COMMANDS = """
import sys
import torch.distributed as dist
from mmcompose.cli import main

dist.init_process_group("gloo")  # one group for both commands (each would otherwise own one)
for args in ({classify!r}, {mcub!r}):
    try:
        main(args)
    except SystemExit as e:
        if e.code:
            raise
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(run, tiny_model_dir, media_files, tmp_path):
    """classify and mcub under torchrun with 2 CPU processes (gloo): one results file, written
    by rank 0, with the same per-item results as the single-process run."""
    from PIL import Image

    q, a = write_mcub(tmp_path / "d", media_files)
    rows = []
    for i, label in enumerate(["cow", "horse", "cow", "sheep", "horse"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (50 * i, 20, 200 - 30 * i)).save(p)
        rows.append({"id": str(i), "path": str(p), "modality": "image", "label": label})
        rows[-1]["split"] = "test"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(task: str, out: Path) -> list[str]:
        common = ["eval", str(tiny_model_dir), "-o", str(out), "--log-samples"]
        if task == "classify":
            return [*common, "--task", "classify", "--data", str(manifest)]
        return [
            *common,
            "--task",
            "mcub",
            "--data",
            str(q),
            "--answers",
            str(a),
            "--batch-size",
            "2",
        ]

    for task in ("classify", "mcub"):
        r = run(*args(task, tmp_path / "one" / task))
        assert r.returncode == 0, r.stderr
    script = tmp_path / "two.py"
    script.write_text(
        TWO_COMMANDS.format(
            classify=args("classify", tmp_path / "two" / "classify"),
            mcub=args("mcub", tmp_path / "two" / "mcub"),
        )
    )
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for task in ("classify", "mcub"):
        (one_res,) = (tmp_path / "one" / task).glob("results_*.json")
        (two_res,) = (tmp_path / "two" / task).glob("results_*.json")  # rank 0 alone writes
        d1, d2 = json.loads(one_res.read_text()), json.loads(two_res.read_text())
        assert d2["config"]["world_size"] == 2
        assert d1["results"] == d2["results"] and d1["n-samples"] == d2["n-samples"]
        (s1,) = (tmp_path / "one" / task).glob("samples_*.jsonl")
        (s2,) = (tmp_path / "two" / task).glob("samples_*.jsonl")
        one = [json.loads(x) for x in s1.read_text().splitlines()]
        two_s = [json.loads(x) for x in s2.read_text().splitlines()]
        assert len(one) == 5 and [s["id"] for s in one] == [s["id"] for s in two_s]
        text_config = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]
        for x, y in zip(one, two_s, strict=True):
            lp1, lp2 = x.pop("option_logprobs", {}), y.pop("option_logprobs", {})
            # other batches per rank: float32 rounding through the tiny LLM at the scores' size
            tol = llm_tol(text_config, max(map(abs, lp2.values()), default=0.0))
            assert lp1 == pytest.approx(lp2, abs=tol)
            assert x == y
