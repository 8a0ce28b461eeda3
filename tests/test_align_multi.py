"""Alt-MoE across many modalities: the direction schedule, groups of paired data (several
datasets each paired with text, media pairs through a shared key), adding a modality to a
trained connector, routing diagnostics and the load-balancing loss, and the bad inputs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmcompose.align.config import AlignConfig
from mmcompose.align.data import KeyedSplit, _synthetic, pair_batch
from mmcompose.align.diagnostics import gate_logits, merge_stats, plot_routing, routing_stats
from mmcompose.align.features import ModalityFeatures
from mmcompose.align.moe import STREAMS, AltMoEConnector, ConnectorConfig
from mmcompose.align.schedule import (
    direction_schedule,
    parse_direction,
    resolve_weights,
    steps_before,
    weighted_cycle,
)
from mmcompose.align.trainer import run_align, train_connector
from mmcompose.errors import ConfigError
from mmcompose.testing import float_tol


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids oversubscribing a small/shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# =========================================================================== schedule (pure)
def test_unit_weights_are_the_reference_round_robin() -> None:
    d = [("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")]
    for period in (1, 3):
        got = [direction_schedule(i, d, "alternating", period, (1,) * 4)[0] for i in range(40)]
        assert got == [d[(i // period) % 4] for i in range(40)]
        assert got == [direction_schedule(i, d, "alternating", period)[0] for i in range(40)]
    assert direction_schedule(7, d, "joint", 1, (3, 1, 1, 1)) == d


@pytest.mark.parametrize("weights", [(2, 1, 1), (5, 1, 1), (3, 2), (1, 4, 2, 1), (7,)])
def test_weighted_cycle_counts_and_spreads(weights: tuple[int, ...]) -> None:
    cycle = weighted_cycle(weights)
    assert len(cycle) == sum(weights)
    assert [cycle.count(i) for i in range(len(weights))] == list(weights)
    # smooth: over any window of the repeated cycle, each index is within one turn of its share
    twice = cycle + cycle
    total = sum(weights)
    for start, width in itertools.product(range(total), range(1, total + 1)):
        window = twice[start : start + width]
        for i, w in enumerate(weights):
            assert abs(window.count(i) - width * w / total) < 2, (start, width, i)


def test_weighted_cycle_known_sequences() -> None:
    assert weighted_cycle((5, 1, 1)) == (0, 0, 1, 0, 2, 0, 0)  # nginx's documented order
    assert weighted_cycle((2, 1, 1)) == (0, 1, 2, 0)
    with pytest.raises(ValueError, match="positive"):
        weighted_cycle((1, 0))


@pytest.mark.parametrize("schedule", ["alternating", "joint"])
def test_steps_before_matches_brute_force(schedule: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 5))
        weights = tuple(int(w) for w in rng.integers(1, 4, size=n)) if rng.random() < 0.7 else None
        period = int(rng.integers(1, 4))
        members = {i for i in range(n) if rng.random() < 0.5}
        dirs = [(f"m{i}", "t") for i in range(n)]
        for step in range(0, 60, 7):
            brute = sum(
                any(dirs.index(d) in members for d in direction_schedule(t, dirs, schedule, period, weights))
                for t in range(step)
            )  # fmt: skip
            assert steps_before(step, members, n, schedule, period, weights) == brute


def test_weights_resolution_and_direction_names() -> None:
    dirs = [("image", "text"), ("text", "image"), ("audio", "text")]
    assert resolve_weights(None, dirs) is None
    assert resolve_weights({"audio->text": 3}, dirs) == (1, 1, 3)
    with pytest.raises(ValueError, match=r"image->audio.*trains image->text"):
        resolve_weights({"image->audio": 2}, dirs)
    assert parse_direction("image->text") == ("image", "text")
    for bad in ("image-text", "a->a", "->b", "a->b->c"):
        with pytest.raises(ValueError, match="not a direction"):
            parse_direction(bad)


def test_schedule_weights_validated_in_the_config() -> None:
    with pytest.raises(ValueError, match="positive integers"):
        AlignConfig.model_validate({"train": {"schedule_weights": {"a->b": 0}}})
    with pytest.raises(ValueError, match="not a direction"):
        AlignConfig.model_validate({"train": {"schedule_weights": {"a-b": 1}}})
    with pytest.raises(ValueError):
        AlignConfig.model_validate({"train": {"schedule_weights": {"a->b": 1.5}}})


# =========================================================================== synthetic, 3 modalities
def _synthetic_cfg(dims: dict[str, int], **train: object) -> dict:
    return {
        "seed": 0,
        "data": {
            "kind": "synthetic",
            "synthetic": {
                "dims": dims,
                "rank": 8,
                "noise": 0.3,
                "independent": True,
                "sizes": {"train": 192, "val": 64, "test": 64},
            },
        },
        "connector": {"hidden": 32, "num_experts": 4, "top_k": 2, "dropout": 0.0},
        "train": {
            "max_steps": 60,
            "batch_size": 32,
            "eval_every": 20,
            "warmup_steps": 5,
            "lr": 3e-3,
            "checkpoint_every": 1000,
            "num_threads": 1,
            **train,
        },
    }


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_independent_synthetic_streams_keep_old_modalities() -> None:
    """Adding a modality to independent synthetic data leaves the others' latents as they were
    (what a continuation compares); the shared stream (the default) redraws them."""
    base = {"dims": {"a": 6, "b": 5}, "rank": 4, "sizes": {"train": 8, "test": 4}}
    for independent, same in ((True, True), (False, False)):
        cfg = AlignConfig.model_validate(
            {"data": {"kind": "synthetic", "synthetic": {**base, "independent": independent}}}
        ).data.synthetic
        more = cfg.model_copy(update={"dims": {**cfg.dims, "c": 3}})
        one, two = _synthetic(cfg, 0), _synthetic(more, 0)
        for split in ("train", "test"):
            equal = np.array_equal(one[split].features["b"].tokens, two[split].features["b"].tokens)
            assert equal is same


def test_weighted_schedule_trains_each_direction_its_share(monkeypatch, tmp_path: Path) -> None:
    """Three modalities, six directions, one shared pool; a direction with weight 3 takes 3 of
    every 8 turns (the loop's own calls counted), and every direction's heads move."""
    import mmcompose.align.trainer as trainer

    cfg = AlignConfig.model_validate(
        _synthetic_cfg({"a": 10, "b": 8, "c": 6}, max_steps=16, schedule_weights={"a->b": 3})
    )
    splits = _synthetic(cfg.data.synthetic, cfg.seed)
    trained: list[str] = []
    real = trainer._direction_loss

    def spy(model, group, direction, *args, **kwargs):
        trained.append(f"{direction[0]}->{direction[1]}")
        return real(model, group, direction, *args, **kwargs)

    monkeypatch.setattr(trainer, "_direction_loss", spy)
    outcome = train_connector(cfg, splits, progress=False)
    names = [f"{s}->{t}" for s, t in outcome.model.directions]
    assert names == ["a->b", "a->c", "b->a", "b->c", "c->a", "c->b"]
    assert trained[:8] == ["a->b", "a->c", "b->a", "a->b", "b->c", "c->a", "c->b", "a->b"]
    assert {n: trained.count(n) for n in names} == {
        "a->b": 6, "a->c": 2, "b->a": 2, "b->c": 2, "c->a": 2, "c->b": 2
    }  # fmt: skip
    torch.manual_seed(cfg.seed)
    fresh = trainer.build_connector(cfg, splits["train"])  # the same initialisation
    for d in outcome.model.directions:
        pairs = zip(
            outcome.model.direction_parameters(d), fresh.direction_parameters(d), strict=True
        )
        assert all(not torch.equal(p, q) for p, q in pairs), d


# =========================================================================== manifests: groups
LABELS = {
    "cow": ((220, 30, 30), 220),
    "bird": ((30, 30, 220), 330),
    "frog": ((30, 200, 30), 495),
    "sun": ((230, 220, 30), 740),
    "plum": ((140, 30, 160), 1110),
    "sea": ((30, 200, 210), 1660),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two datasets sharing six concepts: coloured squares (image) and tones (audio), each
    record captioned; 5 train, 1 val, 2 test items per concept and modality."""
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    rows: dict[str, list[dict]] = {"images": [], "sounds": []}
    t = np.arange(4000) / 16000
    for label, (colour, freq) in LABELS.items():
        for i in range(8):
            split = "train" if i < 5 else ("val" if i == 5 else "test")
            px = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(d / f"{label}{i}.png")
            rows["images"].append({"id": f"img/{label}{i}", "path": str(d / f"{label}{i}.png"),
                                   "modality": "image", "label": label, "split": split,
                                   "caption": f"a drawing of a {label}"})  # fmt: skip
            f = freq * (1 + 0.02 * rng.normal())
            wave = 0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.normal(size=t.shape)
            sf.write(d / f"{label}{i}.wav", wave.astype(np.float32), 16000)
            rows["sounds"].append({"id": f"aud/{label}{i}", "path": str(d / f"{label}{i}.wav"),
                                   "modality": "audio", "label": label, "split": split,
                                   "caption": f"the sound of a {label}"})  # fmt: skip
    for name, recs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


MODALITY = {"images": "image", "sounds": "audio"}
ENCODERS = {
    "image": {"name": "patch_embed", "params": {"image_size": 16, "patch_size": 8, "width": 24}},
    "audio": {"name": "mel_conv", "params": {"n_frames": 25, "width": 20, "num_tokens": 4}},
    "text": {"name": "minilm"},
}


def _manifest_cfg(media: Path, datasets: list[str], **extra: object) -> dict:
    raw = {
        "seed": 0,
        "data": {"kind": "manifest", "datasets": [str(media / f"{n}.jsonl") for n in datasets]},
        "encoders": {m: ENCODERS[m] for m in ["text", *(MODALITY[n] for n in datasets)]},
        "feature_root": str(media / "features"),
        "connector": {"hidden": 32, "num_experts": 4, "top_k": 2, "dropout": 0.0},
        "train": {
            "max_steps": 60,
            "batch_size": 16,
            "eval_every": 20,
            "warmup_steps": 5,
            "lr": 3e-3,
            "num_threads": 1,
            "patience": 100,
        },
    }
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="module")
def image_text(media: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image <-> text connector trained on the images only (the one to add audio to)."""
    d = tmp_path_factory.mktemp("image_text")
    cfg = _write(d / "c.yaml", _manifest_cfg(media, ["images"], train={"max_steps": 40}))
    run_align(cfg, d / "out", progress=False)
    return d / "out"


def test_many_modalities_one_connector(media: Path, tmp_path: Path) -> None:
    """Images and sounds, each paired with its captions, and image <-> audio through the shared
    concept label: six directions in one run over one expert pool, each far above chance, with
    the routing figures written."""
    raw = _manifest_cfg(
        media, ["images", "sounds"], eval={"figures": True}, train={"max_steps": 100}
    )
    result = run_align(_write(tmp_path / "c.yaml", raw), tmp_path / "out", progress=False)
    m = result.metrics
    assert m["directions"] == {
        "audio->image": "audio+image", "audio->text": "audio+text",
        "image->audio": "audio+image", "image->text": "image+text",
        "text->audio": "audio+text", "text->image": "image+text",
    }  # fmt: skip
    test = m["test"]["cl"]
    assert set(test) == set(m["directions"])
    # 6 concepts: R@1 chance 1/6 (text gallery) or 2/12 (media gallery)
    assert test["image->audio"]["queries"] == 12 and test["image->audio"]["gallery"] == 12
    assert test["text->image"]["queries"] == 6 and test["image->text"]["gallery"] == 6
    for name, r in test.items():
        assert r["R@1"] >= 50.0, (name, r)
    routing = m["routing"]
    assert set(routing["directions"]) == set(m["directions"])
    for per in routing["directions"].values():
        assert per["reg"]["tokens"] == per["cl"]["tokens"] > 0  # both streams, same tokens
        both = [r + c for r, c in zip(per["reg"]["counts"], per["cl"]["counts"], strict=True)]
        assert per["all"]["counts"] == both
    png = tmp_path / "out" / "routing.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "config.json", "model.safetensors", "metrics.json", "routing.png"
    }  # fmt: skip
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["connector"]["modalities"] == {"audio": 20, "image": 24, "text": 384}
    assert set(meta["feature_stores"]) == {"audio", "image", "text"}
    from mmcompose.align.evaluate import AlignedModel

    model = AlignedModel.load(tmp_path / "out")
    q = model.embed_query("audio", np.ones((2, 4, 20), np.float32), target="image")
    assert q.shape == (2, 32)


def test_key_paired_batches_pair_same_key_items() -> None:
    rng = np.random.default_rng(0)
    feats = {m: ModalityFeatures.from_token_list(list(rng.normal(size=(n, 1, 3)).astype(np.float32)))
             for m, n in (("a", 7), ("b", 5))}  # fmt: skip
    keys = {"a": np.array([0, 1, 1, 2, 3, 9, 2]), "b": np.array([1, 0, 2, 1, 3])}
    group = KeyedSplit(feats, keys)
    assert group.eligible("a", "b").tolist() == [0, 1, 2, 3, 4, 6]  # key 9 has no partner
    rows = np.arange(6)
    seen = set()
    for step in range(20):
        src, tgt, k = pair_batch(group, ("a", "b"), rows, seed=0, step=step)
        assert (keys["a"][src] == keys["b"][tgt]).all() and (k == keys["a"][src]).all()
        seen.add(tuple(tgt))
        again = pair_batch(group, ("a", "b"), rows, seed=0, step=step)[1]
        assert (again == tgt).all()  # a pure function of (seed, step)
    partners_of_1 = {t[1] for t in seen} | {t[2] for t in seen}
    assert partners_of_1 == {0, 3}  # both items of key 1 get drawn over the steps


# =========================================================================== continuation
def test_adding_audio_to_an_image_text_connector(media: Path, image_text: Path, tmp_path: Path):
    """Continue from the image <-> text connector with the sounds added: only the audio input
    projection and the four new directions train; every old tensor stays bit-identical, so the
    old directions' recall is exactly what it was (inside its 95% interval)."""
    raw = _manifest_cfg(media, ["images", "sounds"])
    raw["connector"] = {"dropout": 0.0}  # architecture inherited from the connector
    cfg = _write(tmp_path / "c.yaml", raw)
    result = run_align(cfg, tmp_path / "out", progress=False, continue_from=image_text)
    cont = result.metrics["continuation"]
    assert cont["new_directions"] == ["audio->image", "audio->text", "image->audio", "text->audio"]
    assert cont["old_parameters_unchanged"] is True
    old = load_file(str(image_text / "model.safetensors"))
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in old.items():
        mine = new[k][: len(v)] if k == "dir_emb" else new[k]
        torch.testing.assert_close(mine, v, rtol=0, atol=0)  # frozen: bit-identical
    assert "in_proj.audio.0.weight" in new and "in_proj.audio.0.weight" not in old
    assert cont["frozen_parameters"] == sum(v.numel() for v in old.values())
    for space in ("cl", "reg"):
        for name in ("image->text", "text->image"):
            r = cont["old_recall"][space][name]
            assert r["within_ci"] and r["before"] == r["after"]  # the old connector, same data
            lo, hi = r["ci95"]["R@1"]
            assert lo <= r["after"]["R@1"] <= hi
    for name in cont["new_directions"]:
        assert result.metrics["test"]["cl"][name]["R@1"] >= 50.0, name  # chance 1/6
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["continued_from"]["directions"] == ["image->text", "text->image"]
    assert set(meta["encoders"]) == {"image", "audio", "text"}
    assert "continued from" in result.summary()


def test_continuation_on_synthetic_data(tmp_path: Path) -> None:
    base = run_align(_write(tmp_path / "a.yaml", _synthetic_cfg({"a": 12, "b": 10})),
                     tmp_path / "ab", progress=False)  # fmt: skip
    raw = _synthetic_cfg({"a": 12, "b": 10, "c": 8}, max_steps=120)  # 30 turns per new one
    res = run_align(_write(tmp_path / "b.yaml", raw), tmp_path / "abc", progress=False,
                    continue_from=tmp_path / "ab")  # fmt: skip
    cont = res.metrics["continuation"]
    assert cont["new_directions"] == ["a->c", "b->c", "c->a", "c->b"]
    for space in ("cl", "reg"):
        for name in ("a->b", "b->a"):
            assert cont["old_recall"][space][name]["after"] == base.metrics["test"][space][name]
    for name in cont["new_directions"]:
        assert res.metrics["test"]["cl"][name]["R@1"] > 15.0, name  # chance 1/64 = 1.6 %


def test_interrupted_continuation_resumes_to_the_same_weights(ab_connector: Path, tmp_path):
    """A continuation checkpoints only its own state (old tensors frozen, old direction rows
    held): killed and rerun, it ends bit-identical to an uninterrupted one."""
    raw = _synthetic_cfg({"a": 12, "b": 10, "c": 8}, max_steps=14, eval_every=7)
    raw["train"]["checkpoint_every"] = 5
    cfg = _write(tmp_path / "c.yaml", raw)
    run_align(cfg, tmp_path / "full", progress=False, continue_from=ab_connector)

    def stop(step: int) -> None:
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_align(cfg, tmp_path / "part", progress=False, continue_from=ab_connector, on_step=stop)
    seen: list[int] = []
    res = run_align(
        cfg, tmp_path / "part", progress=False, continue_from=ab_connector, on_step=seen.append
    )
    assert seen[0] == 6 and res.metrics["continuation"]["old_parameters_unchanged"]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # same steps, same state


# =========================================================================== diagnostics
def test_routing_stats_on_known_routing() -> None:
    """Tokens routed by hand: one-hot logits of size 10 pick expert [0, 0, 1, 1, 1, 2] (k=1)."""
    chosen = torch.tensor([0, 0, 1, 1, 1, 2])
    logits = torch.zeros(6, 4).scatter(1, chosen[:, None], 10.0)
    s = routing_stats(logits, k=1)
    assert s["counts"] == [2, 3, 1, 0] and s["dead"] == [3] and s["tokens"] == 6
    assert s["load"] == pytest.approx([2 / 6, 3 / 6, 1 / 6, 0.0], abs=float_tol(np.float64, 1.0))
    # every token: softmax of [10, 0, 0, 0] -> p = e^10 / (e^10 + 3), q = 1 / (e^10 + 3)
    p, q = math.exp(10) / (math.exp(10) + 3), 1 / (math.exp(10) + 3)
    h = -(p * math.log(p) + 3 * q * math.log(q))
    tol = float_tol(np.float64, 10.0, n_terms=4 * 6)  # float64 log-softmax and a mean of 6
    assert s["router_entropy"] == pytest.approx(h, abs=tol)
    assert s["router_entropy_norm"] == pytest.approx(h / math.log(4), abs=tol)
    load = np.array([2, 3, 1]) / 6
    assert s["load_entropy_norm"] == pytest.approx(-(load * np.log(load)).sum() / math.log(4))
    assert s["max_load"] == pytest.approx(0.5)
    uniform = routing_stats(torch.zeros(8, 4), k=2)  # ties: every token's gate is uniform
    assert uniform["router_entropy_norm"] == pytest.approx(1.0, abs=float_tol(np.float64, 1.0, 8))
    assert sum(uniform["counts"]) == 16  # k slots per token


def test_merge_stats_equals_stats_of_the_union() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(30, 5), torch.randn(11, 5) * 3
    merged = merge_stats([routing_stats(a, 2), routing_stats(b, 2)])
    whole = routing_stats(torch.cat([a, b]), 2)
    assert merged["counts"] == whole["counts"] and merged["dead"] == whole["dead"]
    assert merged["load"] == whole["load"]  # the same integer counts over the same total
    tol = float_tol(np.float64, math.log(5), n_terms=41 * 5)
    assert merged["router_entropy"] == pytest.approx(whole["router_entropy"], abs=tol)
    assert merged["load_entropy_norm"] == pytest.approx(whole["load_entropy_norm"], abs=tol)


def test_gate_logits_split_the_streams_and_skip_padding() -> None:
    torch.manual_seed(0)
    cfg = ConnectorConfig(hidden=8, num_experts=3, top_k=1, dropout=0.0,
                          modalities={"a": 5, "b": 4}, directions=(("a", "b"), ("b", "a")))  # fmt: skip
    model = AltMoEConnector(cfg)
    tokens = [np.random.default_rng(i).normal(size=(n, 5)).astype(np.float32)
              for i, n in enumerate((3, 1, 2))]  # fmt: skip
    feats = ModalityFeatures.from_token_list(tokens, dtype=np.float32)
    got = gate_logits(model, ("a", "b"), feats, batch_size=2)
    valid = torch.cat([torch.as_tensor(t) for t in tokens])  # 6 valid tokens, padding dropped
    with torch.no_grad():
        x = model.in_proj["a"](valid) + model.dir_emb[0]
        for j, stream in enumerate(STREAMS):
            want = model.mixer.gate(x + model.task_emb[j])
            assert got[stream].shape == (6, 3)
            # the same linear maps on the same rows, batched otherwise: float32 rounding
            tol = float_tol(torch.float32, float(want.abs().max()) + 1, n_terms=8 + 5)
            torch.testing.assert_close(got[stream], want, rtol=0, atol=tol)


def test_plot_routing_writes_a_png(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stats = {s: routing_stats(torch.randn(20, 4), 2) for s in STREAMS}
    report = {"num_experts": 4, "top_k": 2,
              "directions": {"a->b": {**stats, "all": merge_stats(list(stats.values()))}}}  # fmt: skip
    plot_routing(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_load_balancing_loss_evens_out_the_load() -> None:
    """Top-1 routing over 4 experts collapses onto two without the Switch loss; with
    ``balance_weight`` the load spreads (measured over the test pass's routing)."""
    from mmcompose.align.diagnostics import routing_report

    out = {}
    for weight in (0.0, 0.05):
        raw = _synthetic_cfg({"a": 12, "b": 10}, max_steps=30, eval_every=30, balance_weight=weight)
        raw["connector"] = {"hidden": 16, "num_experts": 4, "top_k": 1, "dropout": 0.0}
        raw["data"]["synthetic"]["sizes"] = {"train": 128, "val": 32, "test": 64}
        cfg = AlignConfig.model_validate(raw)
        splits = _synthetic(cfg.data.synthetic, cfg.seed)
        model = train_connector(cfg, splits, progress=False).model
        sources = {d: splits["test"].features[d[0]] for d in model.directions}
        out[weight] = routing_report(model, sources)["overall"]
    plain, balanced = out[0.0], out[0.05]
    assert balanced["load_entropy_norm"] > plain["load_entropy_norm"] + 0.1, (plain, balanced)
    assert balanced["max_load"] < plain["max_load"]


# =========================================================================== bad input (CLI)
def _refused(r, words: list[str], out: Path) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr, r.stderr
    flat = " ".join(r.stderr.split())
    for w in words:
        assert w in flat, (w, r.stderr)
    assert not out.exists() and not out.with_name(out.name + ".ckpt").exists()
    assert not out.with_name(f".{out.name}.lock").exists()


@pytest.fixture(scope="module")
def ab_connector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ab")
    raw = _synthetic_cfg({"a": 12, "b": 10}, max_steps=4, eval_every=2)
    run_align(_write(d / "c.yaml", raw), d / "out", progress=False)
    return d / "out"


def test_bad_direction_without_features_synthetic(run, tmp_path: Path) -> None:
    raw = _synthetic_cfg({"a": 12, "b": 10})
    raw["directions"] = [["a", "b"], ["a", "c"]]
    out = tmp_path / "out"
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out))
    _refused(r, ["direction a->c", "modality 'c' has no features", "data.synthetic.dims"], out)


def test_bad_direction_without_features_manifest(run, media: Path, tmp_path: Path) -> None:
    """A direction naming audio when the datasets hold images only: refused from the manifests
    alone, before any encoder runs (no feature store is written)."""
    raw = _manifest_cfg(media, ["images"], directions=[["audio", "text"], ["text", "image"]])
    raw["feature_root"] = str(tmp_path / "features")
    out = tmp_path / "out"
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out))
    _refused(r, ["direction audio->text", "modality 'audio' has no features", "image, text"], out)
    assert not (tmp_path / "features").exists()


def test_bad_media_pair_without_cross_key(run, media: Path, tmp_path: Path) -> None:
    raw = _manifest_cfg(media, ["images", "sounds"], directions=[["image", "audio"]])
    raw["data"]["cross_key"] = None
    raw["feature_root"] = str(tmp_path / "features")
    out = tmp_path / "out"
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out))
    _refused(r, ["direction image->audio", "no paired data", "cross_key"], out)
    assert not (tmp_path / "features").exists()


def test_bad_continuation_old_dimension_changed(run, ab_connector: Path, tmp_path: Path) -> None:
    raw = _synthetic_cfg({"a": 12, "b": 11, "c": 8})
    out = tmp_path / "out"
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out),
            "--from", str(ab_connector))  # fmt: skip
    _refused(r, ["modality 'b' has features of width 11", "trained with width 10"], out)


def test_bad_continuation_old_encoder_changed(run, media: Path, image_text: Path, tmp_path):
    """A changed text encoder would change the text features' meaning (and here the width):
    refused before any feature is computed."""
    raw = _manifest_cfg(media, ["images", "sounds"])
    raw["connector"] = {}
    raw["encoders"]["text"] = {"name": "minilm", "params": {"max_length": 16}}
    raw["feature_root"] = str(tmp_path / "features")
    out = tmp_path / "out"
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out),
            "--from", str(image_text))  # fmt: skip
    _refused(r, ["encoders.text", "was trained with"], out)
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"connector": {"hidden": 64}}, ["connector.hidden is 64", "has 32"]),
        ({}, ["nothing to add", "a->b, b->a"]),
        ({"train": {"schedule_weights": {"a->b": 2}}}, ["a->b, which this run does not train"]),
    ],
)
def test_bad_continuation_other(run, ab_connector: Path, tmp_path: Path, change, words) -> None:
    dims = {"a": 12, "b": 10} if not change else {"a": 12, "b": 10, "c": 8}
    raw = _synthetic_cfg(dims)
    for k, v in change.items():
        raw[k] = {**raw[k], **v}
    out = tmp_path / "out"
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out),
            "--from", str(ab_connector))  # fmt: skip
    _refused(r, words, out)


def test_bad_continuation_source_is_no_alignment(run, tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    out = tmp_path / "out"
    cfg = _write(tmp_path / "c.yaml", _synthetic_cfg({"a": 12, "b": 10}))
    r = run("align", str(cfg), "-o", str(out), "--from", str(tmp_path / "nothing"))
    _refused(r, ["is not a trained alignment"], out)


def test_bad_schedule_weights(run, tmp_path: Path) -> None:
    out = tmp_path / "out"
    raw = _synthetic_cfg({"a": 12, "b": 10}, schedule_weights={"a->c": 2})
    r = run("align", str(_write(tmp_path / "c.yaml", raw)), "-o", str(out))
    _refused(r, ["a->c, which this run does not train", "a->b, b->a"], out)
    raw = _synthetic_cfg({"a": 12, "b": 10}, schedule_weights={"a->b": 0})
    r = run("align", str(_write(tmp_path / "d.yaml", raw)), "-o", str(out))
    _refused(r, ["positive integers"], out)


def test_config_error_is_a_config_error() -> None:
    """The synthetic direction check is a ConfigError for Python callers too."""
    from mmcompose.align.data import resolve_directions, synthetic_layout

    cfg = AlignConfig.model_validate(_synthetic_cfg({"a": 3, "b": 2}))
    with pytest.raises(ConfigError, match="'z' has no features"):
        resolve_directions([("a", "z")], synthetic_layout(cfg.data.synthetic))
