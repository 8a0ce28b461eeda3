"""The alignment benchmark: the captions dataset, ASIF and FuseMix on tiny tensors, CLIP_benchmark
recall with several captions per image, and ``reproduce alignment`` end to end on a tiny
synthetic budget (resume, report, docs section, CLI errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from mmcompose.align import baselines as bl
from mmcompose.align import recall as rc
from mmcompose.align import reproduce as rp
from mmcompose.align import reproduce_report as rr
from mmcompose.assets import datasets as ds
from mmcompose.assets.datasets import captions as cap
from mmcompose.errors import ConfigError
from mmcompose.testing import assert_float_close


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small ops on a shared CPU: more threads only spin (and make the tests slow)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- ASIF
def _orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q.float()


def test_relative_representation_keeps_top_k_to_the_power_p() -> None:
    x = torch.tensor([[1.0, 0.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    rel = bl.relative_representation(x, anchors, k=2, p=2.0)
    expected = torch.tensor([[1.0, 0.0, 0.5, 0.0]])  # cos 1 and 1/sqrt2, squared; rest dropped
    assert_float_close(rel, expected / expected.norm())
    # k larger than the anchors: all kept, a negative similarity counts as 0
    rel_all = bl.relative_representation(x, anchors, k=10, p=1.0)
    assert rel_all[0, 3] == 0 and (rel_all[0, :3] >= 0).all()


def test_asif_recovers_a_permutation_through_paired_anchors_only() -> None:
    g = torch.Generator().manual_seed(0)
    anchors_a = torch.randn(60, 8, generator=g)
    rot = _orthogonal(8, 1)
    # space B: a rotation of A, embedded in 11 dimensions with an offset (centring removes it)
    to_b = lambda z: torch.cat([z @ rot, torch.zeros(len(z), 3)], 1) + 0.7  # noqa: E731
    queries = torch.randn(25, 8, generator=g)
    perm = torch.randperm(25, generator=g)
    gallery = to_b(queries)[perm]
    cfg = bl.ASIFConfig(k=60, p=1.0)
    sim = bl.asif_similarity(queries, gallery, anchors_a, to_b(anchors_a), cfg)
    inverse = torch.argsort(perm)
    assert torch.equal(sim.argmax(dim=1), inverse)
    assert_float_close(sim.max(dim=1).values, torch.ones(25))
    # unpaired anchors (shuffled): the structure is lost, so is the permutation
    shuffled = to_b(anchors_a)[torch.randperm(60, generator=g)]
    lost = bl.asif_similarity(queries, gallery, anchors_a, shuffled, cfg).argmax(dim=1)
    assert (lost == inverse).float().mean() < 0.5
    with pytest.raises(ValueError, match="anchors"):
        bl.asif_similarity(queries, gallery, anchors_a, shuffled[:10], cfg)


# --------------------------------------------------------------------------- FuseMix
def test_mixup_mixes_both_modalities_with_one_lambda_and_pairing() -> None:
    x = torch.arange(8.0).reshape(4, 2)
    y = 10 * torch.arange(4.0)[:, None]
    mx, my = bl.mixup(x, y, 0.25, np.array([[0, 1], [3, 2]]))
    assert_float_close(mx, torch.tensor([[1.5, 2.5], [4.5, 5.5]]))
    assert_float_close(my, torch.tensor([[7.5], [22.5]]))
    lam, pairs = bl.sample_mixup(7, 1.0, np.random.default_rng(3))
    lam2, pairs2 = bl.sample_mixup(7, 1.0, np.random.default_rng(3))
    assert lam == lam2 and np.array_equal(pairs, pairs2)
    assert pairs.shape == (3, 2) and len(set(pairs.ravel())) == 6  # each row used at most once
    assert 0 < lam < 1
    assert bl.sample_mixup(7, 1.0, np.random.default_rng(4))[0] != lam
    assert bl.sample_mixup(4, 0.0, np.random.default_rng(0))[0] == 1.0  # alpha 0: no mixing


def test_mixup_groups_pair_rows_only_when_both_sources_match() -> None:
    keys = np.array([0, 0, 1, 1])
    same = bl.mixup_groups(keys, np.array([[0, 2], [1, 3]]))
    assert same[0] == same[1]
    swapped = bl.mixup_groups(keys, np.array([[0, 2], [3, 1]]))
    assert swapped[0] != swapped[1]


def _paired(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)
    return z @ torch.randn(6, 12, generator=g), z @ torch.randn(6, 9, generator=g)


def test_fit_fusemix_is_seeded_and_aligns_paired_latents() -> None:
    x, y = _paired(64, 0)
    keys = np.arange(64)
    short = bl.FuseMixConfig(proj_dim=16, steps=4, batch_size=32, warmup_steps=2)
    a, b = (bl.fit_fusemix(x, y, keys, short, seed=1) for _ in range(2))
    c = bl.fit_fusemix(x, y, keys, short, seed=2)
    sa, sb, sc = (f.model.state_dict() for f in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    cfg = bl.FuseMixConfig(proj_dim=16, steps=120, batch_size=32, warmup_steps=10, lr=3e-3,
                           dropout=0.0)  # fmt: skip
    fit = bl.fit_fusemix(x, y, keys, cfg, seed=1)

    def r1(model: bl.FuseMixAdapters) -> float:
        sim = model.embed("a", x) @ model.embed("b", y).T
        return rc.recall(rc.hits_at_k(sim, keys, keys))["R@1"]

    assert r1(fit.model) > max(50.0, 5 * r1(a.model))  # chance: 1.6%; 4 steps: near chance
    assert np.mean(fit.losses[-10:]) < np.mean(fit.losses[:10])


# --------------------------------------------------------------------------- recall
def _clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> torch.Tensor:
    """CLIP_benchmark's ``recall_at_k`` (zeroshot_retrieval.py), then ``> 0`` per query as it
    does: a hit when any positive is among the top-k indices."""
    nb_true = scores.shape[1]
    topk = torch.topk(scores, k, dim=1)[1]
    onehot = torch.nn.functional.one_hot(topk, num_classes=nb_true)
    tp = (onehot * positive.view(positive.shape[0], 1, nb_true)).sum(dim=(1, 2))
    return (tp / positive.sum(dim=1) > 0).float()


def test_recall_with_several_captions_on_a_hand_made_matrix() -> None:
    # 2 images, 2 captions each (caption keys = their image)
    img_keys, cap_keys = np.array([0, 1]), np.array([0, 0, 1, 1])
    i2t = torch.tensor(
        [
            [0.2, 0.5, 0.9, 0.1],  # image 0: its best caption (0.5) is 2nd
            [0.0, 0.3, 0.8, 0.1],  # image 1: its caption 2 is 1st
        ]
    )
    hits = rc.hits_at_k(i2t, img_keys, cap_keys, ks=(1, 2))
    assert hits.tolist() == [[0, 1], [1, 1]]
    t2i = i2t.T  # caption -> image: a hit only for the caption's own image
    # caption 2 scores image 0 above its own; caption 3 ties (0.1, 0.1): counts as a hit
    assert rc.hits_at_k(t2i, cap_keys, img_keys, ks=(1,))[:, 0].tolist() == [1, 1, 0, 1]
    assert rc.recall(hits, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}
    with pytest.raises(ValueError, match="no relevant"):
        rc.hits_at_k(i2t, np.array([0, 7]), cap_keys)


def test_recall_matches_clip_benchmark_formula_on_random_scores() -> None:
    g = torch.Generator().manual_seed(5)
    img_keys = np.arange(30)
    cap_keys = np.repeat(img_keys, 3)
    scores = torch.randn(30, 90, generator=g)
    positive = torch.as_tensor(img_keys[:, None] == cap_keys[None, :])
    for direction in ("i2t", "t2i"):
        s, qk, gk, pos = (
            (scores, img_keys, cap_keys, positive)
            if direction == "i2t"
            else (scores.T, cap_keys, img_keys, positive.T)
        )
        ours = rc.hits_at_k(s, qk, gk, ks=(1, 5, 10))
        for j, k in enumerate((1, 5, 10)):
            assert np.array_equal(ours[:, j], _clip_benchmark_recall(s, pos, k).numpy()), k


def test_summarize_and_compare_give_intervals_over_queries_and_seeds() -> None:
    rng = np.random.default_rng(0)
    a = (rng.random((3, 200, 3)) < 0.6).astype(np.uint8)
    b = (rng.random((3, 200, 3)) < 0.4).astype(np.uint8)
    s = rc.summarize(a, n_boot=500)["R@1"]
    assert s["mean"] == pytest.approx(a[..., 0].mean() * 100)
    assert s["low"] < s["mean"] < s["high"]
    assert s["per_seed"] == pytest.approx(list(a[..., 0].mean(axis=1) * 100))
    assert s["seed_low"] < s["mean"] < s["seed_high"]
    diff = rc.compare(a, b, n_boot=500)
    assert diff["difference"] == pytest.approx((a[..., 0].mean() - b[..., 0].mean()) * 100)
    assert diff["low"] > 0 and diff["p"] < 0.01
    same = rc.compare(a, a, n_boot=200)
    assert same["difference"] == 0 and same["p"] == 1.0 and same["mcnemar_p_seed0"] == 1.0


# --------------------------------------------------------------------------- dataset
def test_clipart_titles_drop_artists_numbers_and_icon_codes() -> None:
    assert cap.clipart_title("full_moon_dan_gerhards_01") == "full moon"
    assert cap.clipart_title("antilope_architetto_fran_01") == "antilope"  # truncated artist
    assert cap.clipart_title("BandeMarquageSecurite") == "bande marquage securite"
    assert cap.clipart_title("apple_bw") == "apple black and white"
    assert cap.clipart_title("ganson") == "ganson"  # never the whole name
    assert cap.clipart_title("70a001") is None
    assert cap.with_article("apple") == "an apple" and cap.with_article("the moon") == "the moon"


def _png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


@pytest.fixture
def caption_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not ds.emoji.EMOJI_FONT.is_file():
        pytest.skip("fonts-noto-color-emoji absent: apt-get install -y fonts-noto-color-emoji")
    root = tmp_path / "openclipart"
    _png(root / "animals/mammals/angry_monkey_benji_park_01.png", (1, 2, 3))
    _png(root / "animals/mammals/cow_01.png", (4, 5, 6))
    _png(root / "animals/birds/cow_02.png", (7, 8, 9))  # same title as cow_01: dropped
    _png(root / "food/fruit/red_apple.png", (10, 11, 12))
    _png(root / "food/desserts/cake.png", (10, 11, 12))  # byte copy of red_apple: dropped
    _png(root / "computer/icons/70a001.png", (13, 14, 15))  # no name: dropped
    _png(root / "special/gradients/blue_gradient.png", (16, 17, 18))  # skipped folder
    for i in range(6):
        _png(root / f"shapes/stars/star_{'abcdef'[i]}.png", (20 + i, 0, 0))
    monkeypatch.setattr(ds.openclipart, "OPENCLIPART_DIR", root)
    monkeypatch.setattr(cap, "CLIPART_PER_FOLDER", 4)
    monkeypatch.setattr(cap, "EMOJI_BLOCKS", ((0x1F600, 0x1F60F, "emoticons"),))
    monkeypatch.setattr(ds.sources, "OPENCV_DATA_DIR", tmp_path / "no-opencv")
    return root


def test_captions_dataset_is_deterministic_with_unique_captions(
    caption_sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = []
    for run in ("a", "b"):
        monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / f"cache-{run}"))
        folder = ds.prepare_datasets(only=["captions"], progress=False)["captions"]
        manifests.append((folder / ds.ITEMS_NAME).read_text().replace(str(folder), "<root>"))
    assert manifests[0] == manifests[1]
    recs = [json.loads(line) for line in manifests[0].splitlines()]
    by_source: dict[str, list[dict]] = {}
    for r in recs:
        by_source.setdefault(r["source"], []).append(r)
        assert len(r["captions"]) == cap.CAPTIONS_PER_IMAGE and r["captions"][0] == r["caption"]
        assert all(r["caption"] in c for c in r["captions"])  # every caption names the image
    assert len(by_source["emoji"]) == 16  # U+1F600..U+1F60F all render
    assert {"grinning face", "smiling face with sunglasses"} & {r["caption"] for r in recs}
    titles = [r["caption"] for r in by_source["openclipart"]]
    assert sorted(t for t in titles if not t.startswith("star")) == [
        "angry monkey",  # artist stripped
        "cake",  # food/desserts comes first; its byte copy food/fruit/red_apple is dropped
        "cow",  # once: the second drawing of that name is dropped
    ]
    assert len([t for t in titles if t.startswith("star")]) == 4  # the per-folder cap
    all_caps = [c for r in recs for c in r["captions"]]
    assert len(all_caps) == len(set(all_caps))
    assert {r["split"] for r in recs} <= {"train", "val", "test"}


@pytest.mark.real
def test_prepared_captions_set_has_1000_test_queries() -> None:
    folder = ds.dataset_dir("captions")
    if not (folder / ds.ITEMS_NAME).is_file():
        pytest.skip("captions not prepared: mmcompose assets prepare --only captions")
    recs = ds.read_items(folder)
    test = [r for r in recs if r["split"] == "test"]
    assert sum(len(r["captions"]) for r in test) >= 1000
    assert len(test) >= 300


# --------------------------------------------------------------------------- pipeline
TINY = rp.AlignBudget(
    seeds=(0, 1),
    tasks=("image-text",),
    hidden=16,
    num_experts=4,
    top_k=2,
    steps={"image-text": 12},
    batch_size=32,
    warmup_steps=2,
    eval_every=6,
    fusemix_steps=12,
    asif_k=(8, 32),
    asif_p=(1.0, 4.0),
    n_boot=100,
)


def _tiny_task() -> rp.TaskData:
    return rp.synthetic_task(items={"train": 48, "val": 16, "test": 16}, captions=2, seed=3)


def test_matched_mlp_has_the_moe_parameter_count() -> None:
    data = _tiny_task()
    moe = rp.count_connector_parameters("moe", TINY.hidden, data, TINY)
    h = rp.matched_mlp_hidden(data, TINY)
    mlp = rp.count_connector_parameters("mlp", h, data, TINY)
    assert h > TINY.hidden
    assert abs(mlp - moe) / moe < 0.05
    assert abs(rp.count_connector_parameters("mlp", h + 1, data, TINY) - moe) >= abs(mlp - moe)


def test_pool_grid_averages_cells_and_keeps_the_mean() -> None:
    tokens = np.arange(49, dtype=np.float32).reshape(1, 49, 1).repeat(2, axis=2)
    pooled_tokens, lengths, mean = rp.pool_grid(tokens, np.array([49]), 3)
    assert pooled_tokens.shape == (1, 9, 2) and lengths.tolist() == [9]
    assert float(mean[0, 0]) == pytest.approx(24.0)
    assert float(pooled_tokens[0, 4, 0]) == pytest.approx(24.0, abs=0.1)  # the centre cell
    same, _, _ = rp.pool_grid(tokens, np.array([49]), None)
    assert same.shape == tokens.shape


def test_reproduce_alignment_end_to_end_resumes_and_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _tiny_task()
    out = tmp_path / "run"
    calls = []
    real_unit = rp.run_unit

    class Stop(Exception):
        pass

    def flaky(variant: str, d: rp.TaskData, seed: int, b: rp.AlignBudget) -> tuple:
        calls.append((variant, seed))
        if len(calls) == 5 and stop:
            raise Stop  # an interruption after 4 finished units
        return real_unit(variant, d, seed, b)

    monkeypatch.setattr(rp, "run_unit", flaky)
    stop = True
    with pytest.raises(Stop):
        rp.run_ablation([data], TINY, out, log=lambda s: None)
    assert not out.exists() and len(list((tmp_path / "run.work").iterdir())) == 4
    calls.clear()
    stop = False
    run = rp.run_ablation([data], TINY, out, log=lambda s: None)
    assert len(calls) == len(rp.VARIANTS) * 2 - 4  # the 4 finished units were reused
    assert not (tmp_path / "run.work").exists()
    doc = json.loads((out / "results.json").read_text())
    assert doc == json.loads(json.dumps(run.doc, default=str))
    assert [r["variant"] for r in doc["rows"]] == list(rp.VARIANTS)
    for r in doc["rows"]:
        assert set(r["cells"]) == {"image->text", "text->image"}
        c = r["cells"]["text->image"]["R@1"]
        assert c["low"] <= c["mean"] <= c["high"] and len(c["per_seed"]) == 2
        assert r["queries"] == {"image->text": 16, "text->image": 32}
    mlp = next(r for r in doc["rows"] if r["variant"] == "mlp_alt")
    moe = next(r for r in doc["rows"] if r["variant"] == "moe_alt")
    assert abs(mlp["params"] - moe["params"]) / moe["params"] < 0.05
    assert {t["b"] for t in doc["tests"]} == set(rp.VARIANTS) - {"moe_alt"}
    assert {c["b"] for c in doc["claims"]} == set(rp.VARIANTS) - {"moe_alt"}
    hits = load_file(str(out / "hits.safetensors"))
    assert hits["image-text/synthetic/asif/text->image"].shape == (2, 32, 3)
    # the two seeds of ASIF are identical (no training), of FuseMix not necessarily
    asif = hits["image-text/synthetic/asif/image->text"]
    assert np.array_equal(asif[0], asif[1])
    assert (out / "chart.png").stat().st_size > 1000 and "MoE + joint" in (
        out / "report.md"
    ).read_text()

    md = tmp_path / "results.md"
    md.write_text(
        f"# R\n\nbefore\n\n{rr.ALIGN_MARK_BEGIN}\nOLD-TEXT\n{rr.ALIGN_MARK_END}\n\nafter\n"
    )
    rr.render_alignment_docs(out, md)
    text = md.read_text()
    assert text.startswith("# R\n\nbefore\n\n") and text.endswith(f"{rr.ALIGN_MARK_END}\n\nafter\n")
    assert (
        "OLD-TEXT" not in text
        and "![R@1 per variant" in text
        and "img/alignment-recall.png" in text
    )
    assert (tmp_path / "img" / "alignment-recall.png").stat().st_size > 1000
    bad = tmp_path / "nomarkers.md"
    bad.write_text("no markers\n")
    with pytest.raises(ConfigError, match="markers"):
        rr.render_alignment_docs(out, bad)
    assert bad.read_text() == "no markers\n"
    with pytest.raises(ConfigError, match="not found"):
        rr.render_alignment_docs(tmp_path / "nowhere", md)


def test_cli_refuses_bad_options_before_any_work(tmp_path: Path, run) -> None:
    r = run("reproduce", "alignment", "-o", str(tmp_path / "x"), "--budget", "big")
    assert r.returncode == 2 and "unknown budget" in r.stderr
    r = run("reproduce", "alignment", "-o", str(tmp_path / "x"), "--seeds", "1,1")
    assert r.returncode == 2 and "distinct" in r.stderr
    (tmp_path / "exists").mkdir()
    r = run("reproduce", "alignment", "-o", str(tmp_path / "exists"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("reproduce", "render-alignment", str(tmp_path / "exists"))
    assert r.returncode == 2 and "not found" in r.stderr
    with pytest.raises(ConfigError, match="unknown budget"):
        rp.plan("big")
