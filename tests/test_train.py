"""Training a single-modality MLLM on a tiny base LLM: loss, resume, data parallelism."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmcompose.checkpoint import save_checkpoint
from mmcompose.errors import MMComposeError
from mmcompose.model import MMComposeForCausalLM
from mmcompose.model.splice import IGNORE_INDEX
from mmcompose.testing import plant_bad_checkpoint, save_tiny_base_llm, tiny_tokenizer
from mmcompose.train import trainer as trainer_mod
from mmcompose.train.data import conversations_from_manifest, encode_example, load_conversations
from mmcompose.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train")
    llm = save_tiny_base_llm(d / "llm")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = ["red", "blue", "green"][i % 3]
        color = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}[label]
        arr = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        p = d / f"img{i}.png"
        Image.fromarray(arr).save(p)
        rows.append(
            {
                "id": f"i{i}",
                "path": str(p),
                "modality": "image",
                "label": label,
                "caption": f"a {label} square",
            }
        )
    (d / "data.json").write_text(json.dumps(conversations_from_manifest(rows, "label", seed=0)))
    (d / "caps.json").write_text(json.dumps(conversations_from_manifest(rows, "caption", seed=0)))
    cfg = {
        "base_llm": str(llm),
        "data": "data.json",
        "tower": {
            "modality": "image",
            "encoder": {
                "name": "patch_embed",
                "params": {"image_size": 32, "patch_size": 8, "width": 32},
            },
            "projector": {"name": "mlp2x_gelu"},
            "num_prefix": 2,
            "num_suffix": 2,
        },
        "lora": {"strategy": "decoupled", "rank": 4, "alpha": 8, "dropout": 0.1},
        "stage1": {"epochs": 1, "lr": 3e-3, "batch_size": 6, "data": "caps.json"},
        "stage2": {"epochs": 4, "lr": 1e-2, "batch_size": 6},
        "checkpoint_every": 2,
        "feature_cache": str(d / "cache"),
    }
    (d / "train.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": d, "config": d / "train.yaml"}


def _cfg(setup) -> TrainConfig:
    return TrainConfig.model_validate(yaml.safe_load(setup["config"].read_text()))


def test_labels_cover_only_answers():
    from mmcompose.model.processor import MMProcessor

    proc = MMProcessor(tiny_tokenizer(), {"image": {"name": "patch_embed"}})
    rec = {
        "id": "x",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat?"},
            {"from": "gpt", "value": "a dog"},
            {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    ex = encode_example(proc, rec)
    labelled = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE_INDEX]
    text = proc.tokenizer.decode(labelled)
    assert text == "a dog<|im_end|>\nyes<|im_end|>\n"
    assert ex.input_ids.count(-200) == 1


def test_bad_data_file(tmp_path):
    (tmp_path / "d.json").write_text('{"not": "a list"}')
    with pytest.raises(MMComposeError, match="JSON list"):
        load_conversations(tmp_path / "d.json")
    (tmp_path / "e.json").write_text('[{"conversations": [{"from": "robot", "value": "x"}]}]')
    with pytest.raises(MMComposeError, match="robot"):
        load_conversations(tmp_path / "e.json")


def test_train_lowers_loss_and_writes_a_model(setup):
    cfg = _cfg(setup)
    out = setup["dir"] / "out"
    r = train(cfg, out, config_dir=setup["dir"], progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    s2 = [x["loss"] for x in log if x["stage"] == 2]
    assert len(log) == r.steps == 4 + 16
    assert np.mean(s2[-3:]) < 0.7 * np.mean(s2[:3])
    model = MMComposeForCausalLM.from_pretrained(out)
    assert model.config.lora.strategy == "decoupled" and model.modalities == ["image"]
    assert not Path(f"{out}.checkpoint").exists()
    # The base LLM stayed frozen; LoRA and projector moved.
    base = MMComposeForCausalLM.from_base_llm(setup["dir"] / "llm")
    w = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], base.state_dict()[w])
    assert (
        model.state_dict()["language_model.model.layers.0.mlp.up_proj.lora.image.lora_B"]
        .abs()
        .sum()
        > 0
    )
    # Rerun on cached features gives the same model (seeded).
    out2 = setup["dir"] / "out2"
    train(cfg, out2, config_dir=setup["dir"], progress=False)
    a, b = model.state_dict(), MMComposeForCausalLM.from_pretrained(out2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_run_resumes_to_the_same_model(setup, monkeypatch):
    cfg = _cfg(setup)
    ref = setup["dir"] / "out"  # from the previous test (module scope keeps it)
    if not ref.exists():
        train(cfg, ref, config_dir=setup["dir"], progress=False)
    out = setup["dir"] / "resumed"
    calls = {"n": 0}
    real = trainer_mod._lr

    def flaky(step, total, warmup, peak):
        calls["n"] += 1
        if calls["n"] == 8:  # stage 2's 4th step, after stage 1's checkpoints: resume mid-stage
            raise KeyboardInterrupt
        return real(step, total, warmup, peak)

    monkeypatch.setattr(trainer_mod, "_lr", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, config_dir=setup["dir"], progress=False)
    assert not out.exists() and Path(f"{out}.checkpoint").is_dir()
    monkeypatch.setattr(trainer_mod, "_lr", real)
    train(cfg, out, config_dir=setup["dir"], progress=False)
    a = MMComposeForCausalLM.from_pretrained(ref).state_dict()
    b = MMComposeForCausalLM.from_pretrained(out).state_dict()
    for k in a:
        # Bit-exact by construction: the resumed run restores weights, optimizer and RNG
        # state exactly and redoes the same steps with the same kernels on the same data.
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.slow
def test_two_processes_equal_one(setup, tmp_path):
    """torchrun with 2 CPU processes (gloo) = 1 process with the same global batch."""
    raw = yaml.safe_load(setup["config"].read_text())
    raw["lora"]["dropout"] = 0.0  # dropout masks differ per rank by design
    raw["base_llm"] = str(setup["dir"] / "llm")
    raw["data"] = str(setup["dir"] / "data.json")
    raw["stage1"]["data"] = str(setup["dir"] / "caps.json")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "mmcompose", "train", str(cfg_path), "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "mmcompose",
            "train",
            str(cfg_path),
            "-o",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # Same losses step by step, and the same weights up to float summation order (which Adam
    # amplifies a little over the run; a wrong reduction differs by orders of magnitude more).
    la = [
        json.loads(x)["loss"]
        for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()
    ]
    lb = [
        json.loads(x)["loss"]
        for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(la) == len(lb) == 20
    # The first loss comes before any update: the two runs differ only in how the batch's
    # loss is reduced (float32 rounding, ~1e-7 relative per addition).
    np.testing.assert_allclose(la[0], lb[0], rtol=1e-5)
    # Later losses also carry the weights' drift, which Adam lets grow to the fraction of an
    # update allowed below (measured here up to 1.03e-4 relative by step 16, and it depends on
    # the machine's summation order). A wrong data split or no gradient sync changes per-step
    # losses by whole percents: a tenth of one percent keeps a tenfold margin on that side.
    np.testing.assert_allclose(la, lb, rtol=1e-3)
    a = MMComposeForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    b = MMComposeForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    # Adam normalises every update to about lr, so a summation-order difference in a gradient
    # changes a weight by a small fraction of one update; allow a tenth of one (of the larger
    # stage-2 lr) over the run, while a missing sync or wrong split moves weights by whole
    # updates (lr per step, 20 steps).
    atol = 0.1 * max(raw["stage1"]["lr"], raw["stage2"]["lr"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)
    # Training happened: the zero-initialised text-adapter B matrices all moved. (In the last
    # layer, the image adapter's q/o/MLP outputs reach no later token, so those stay exactly 0.)
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B") and ".lora.text." in k)
    last = "language_model.model.layers.1"
    assert a[f"{last}.self_attn.v_proj.lora.image.lora_B"].abs().sum() > 0
    assert a[f"{last}.mlp.up_proj.lora.image.lora_B"].abs().sum() == 0


# ----------------------------------------------------------------------------- bad input
def _truncated(path: Path) -> Path:
    """A copy of ``path`` cut to half its bytes, as an interrupted download leaves it."""
    bad = path.with_name(f"cut-{path.name}")
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _media_set(d: Path, modality: str) -> tuple[list[Path], Path]:
    """Six readable files of one modality and one truncated one (PNG, WAV, PLY)."""
    import soundfile as sf
    import trimesh

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(6):
        if modality == "image":
            p = d / f"g{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
        elif modality == "audio":
            p = d / f"g{i}.wav"
            sf.write(
                p, (0.3 * np.sin(np.arange(8000) * (0.05 + 0.02 * i))).astype(np.float32), 16000
            )
        else:
            p = d / f"g{i}.npy"
            np.save(p, rng.normal(size=(100, 3)).astype(np.float32))
        good.append(p)
    if modality == "point":
        trimesh.creation.icosphere(subdivisions=2).export(d / "mesh.ply")
        return good, _truncated(d / "mesh.ply")
    return good, _truncated(good[0])


ENCODERS_BY_MODALITY = {
    "image": {"name": "patch_embed", "params": {"image_size": 32, "patch_size": 8, "width": 16}},
    "audio": {"name": "mel_conv", "params": {"n_frames": 50, "width": 16, "num_tokens": 4}},
    "point": {"name": "pointnet", "params": {"num_points": 64, "num_groups": 4, "group_size": 8}},
}


@pytest.mark.parametrize(
    ("modality", "frozen"), [("image", True), ("audio", True), ("point", False)]
)
def test_corrupt_file_fails_or_is_skipped(setup, tmp_path, modality, frozen):
    """A truncated file fails before training (default), naming it, or with on_corrupt: skip
    its example is dropped with a warning naming it; it is never replaced by another item."""
    from mmcompose.errors import MediaError
    from mmcompose.model.media import CorruptFileWarning

    good, bad = _media_set(tmp_path / "media", modality)
    rows = [
        {"id": p.stem, "path": str(p), "modality": modality, "label": "thing", "split": "train"}
        for p in [*good, bad]
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "base_llm": str(setup["dir"] / "llm"),
        "data": "m.jsonl",
        "tower": {
            "modality": modality,
            "encoder": ENCODERS_BY_MODALITY[modality],
            "projector": {"name": "linear"},
            "freeze_encoder": frozen,
        },
        "stage1": {"epochs": 1, "batch_size": 4},
        "stage2": {"epochs": 1, "batch_size": 4},
        "feature_cache": str(tmp_path / "cache"),
    }
    out = tmp_path / "out"
    with pytest.raises(MediaError) as info:
        train(TrainConfig.model_validate(raw), out, config_dir=tmp_path, progress=False)
    assert str(bad) in info.value.message and "on_corrupt: skip" in (info.value.hint or "")
    assert not out.exists() and not Path(f"{out}.checkpoint").exists()  # nothing trained

    cfg = TrainConfig.model_validate({**raw, "on_corrupt": "skip"})
    with pytest.warns(CorruptFileWarning) as caught:
        r = train(cfg, out, config_dir=tmp_path, progress=False)
    (warning,) = [w for w in caught if issubclass(w.category, CorruptFileWarning)]
    text = str(warning.message)
    assert "skipped 1 unreadable file" in text and str(bad) in text and "2 of 14" in text
    assert r.steps == 2 + 2  # 6 readable examples per stage, batches of 4
    if frozen:  # the readable files are cached; the bad one is not (a fixed file is retried)
        assert len(list((tmp_path / "cache" / "features").rglob("*.safetensors"))) == 6


def test_feature_cache_build_on_corrupt(setup, tmp_path):
    from mmcompose.errors import MediaError
    from mmcompose.model.processor import MMProcessor
    from mmcompose.model.towers import Tower
    from mmcompose.train.features import FeatureCache

    good, bad = _media_set(tmp_path / "media", "image")
    cfg = TrainConfig.model_validate(
        {
            "base_llm": "x",
            "data": "x",
            "tower": {
                "modality": "image",
                "encoder": ENCODERS_BY_MODALITY["image"],
                "projector": {"name": "linear"},
            },
        }
    )
    tower = Tower(cfg.tower, 8)
    cache = FeatureCache(
        tmp_path / "c", tower, MMProcessor(tiny_tokenizer(), {"image": cfg.tower.encoder})
    )
    bad = bad.rename(bad.with_name("g3-cut.png"))  # encoded in sorted order: g0 g1 | g2 g3-cut
    items = [str(p) for p in [*good[:3], bad, *good[3:]]]
    with pytest.raises(MediaError, match=r"g3-cut\.png"):
        cache.build(items, batch_size=2, progress=False)
    # Chunks before the bad file stay cached, so a rerun resumes; the failing chunk is not.
    assert [cache.has(i) for i in items] == [True, True, False, False, False, False, False]
    skipped = cache.build(items, batch_size=2, progress=False, on_corrupt="skip")
    assert list(skipped) == [str(bad)] and "truncated" in skipped[str(bad)]
    assert [cache.has(i) for i in items] == [True, True, True, False, True, True, True]
    gone = str(tmp_path / "media" / "gone.png")  # a missing file is reported the same way
    assert "not found" in cache.build([*items, gone], progress=False, on_corrupt="skip")[gone]


def test_projector_input_size_mismatch_fails_before_any_data_is_read(setup, tmp_path, run):
    cfg = yaml.safe_load(setup["config"].read_text())
    cfg["base_llm"] = str(setup["dir"] / "llm")
    cfg["data"] = str(tmp_path / "never-read.json")  # reading it would fail differently
    cfg["stage1"].pop("data")
    cfg["feature_cache"] = str(tmp_path / "cache")
    cfg["tower"]["projector"] = {"name": "mlp2x_gelu", "params": {"input_dim": 1280}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run("train", str(path), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "input_dim 1280" in r.stderr and "'patch_embed' outputs 32-dim" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    # The same with a Q-Former whose heads do not divide the encoder's width.
    cfg["tower"]["projector"] = {"name": "qformer", "params": {"num_heads": 5}}
    path.write_text(yaml.safe_dump(cfg))
    r = run("train", str(path), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not divisible by num_heads 5" in r.stderr and "patch_embed" in r.stderr


def test_eval_on_corrupt(tiny_model_dir, tmp_path, run):
    from mmcompose.model.media import CorruptFileWarning

    good, bad = _media_set(tmp_path / "media", "image")
    rows = [
        {"id": p.stem, "path": str(p), "modality": "image", "label": lab, "split": "test"}
        for p, lab in zip([*good[:3], bad], ["cat", "dog", "cat", "dog"], strict=True)
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", str(tiny_model_dir), "--data", str(manifest), "--mode", "loglikelihood"]
    r = run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    text = " ".join(r.stderr.split())  # rich wraps long lines
    assert "cut-g0.png: image file is truncated" in text and "--on-corrupt skip" in text
    with pytest.warns(CorruptFileWarning, match="skipped 1 unreadable file"):
        r = run(*args, "--on-corrupt", "skip", "-o", str(tmp_path / "res"))
    assert r.returncode == 0, r.stderr
    (res,) = (tmp_path / "res").rglob("results_*.json")
    doc = json.loads(res.read_text())
    assert doc["n-samples"]["classify_image"]["effective"] == 3
    assert doc["configs"]["classify_image"]["skipped_unreadable"] == [str(bad)]
    assert run(*args, "--on-corrupt", "maybe").returncode == 2


def test_resume_with_a_changed_tower_fails_clearly(setup, tmp_path):
    """A checkpoint left by a run with another tower size is refused with a ConfigError
    naming the tensor, not a shape traceback; nothing is trained or deleted."""
    from mmcompose.errors import ConfigError

    cfg = _cfg(setup)
    out = tmp_path / "out"
    ckpt = Path(f"{out}.checkpoint")
    proj = "towers.image.projector.0.weight"
    save_checkpoint(  # the trainer's own format, with this config's digest
        ckpt,
        {f"params/{proj}": torch.zeros(3, 3), "rng/torch": torch.get_rng_state()},
        {
            "stage": 1,
            "step": 1,
            "log": [],
            "optimizer": None,
            "config_digest": trainer_mod._config_digest(cfg),
        },
    )
    with pytest.raises(ConfigError, match="another model setup") as e:
        train(cfg, out, config_dir=setup["dir"], progress=False)
    assert proj in e.value.message and str(ckpt) in e.value.hint
    assert (ckpt / "state.safetensors").is_file() and not out.exists()


@pytest.mark.parametrize("case", ["state.pt", "tensors", "json"])
def test_resume_never_unpickles_a_planted_checkpoint(setup, tmp_path, run, case):
    """A pickle where a resume looks (the old state.pt, or in place of the new files) is
    refused with one clear error before any work; its code never runs."""
    from mmcompose.errors import CheckpointError

    out, marker = tmp_path / "out", tmp_path / "pwned"
    ckpt = Path(f"{out}.checkpoint")
    planted = plant_bad_checkpoint(ckpt, case, marker)
    with pytest.raises(CheckpointError, match="delete") as e:
        train(_cfg(setup), out, config_dir=setup["dir"], progress=False)
    assert str(ckpt) in e.value.message and planted.name in e.value.message
    r = run("train", str(setup["config"]), "-o", str(out))
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert "Traceback" not in r.stderr and planted.name in r.stderr
    assert not marker.exists() and not out.exists() and planted.is_file()
    # The payload is live: the old loader (a full unpickle) would have run it.
    torch.load(io.BytesIO(planted.read_bytes()), weights_only=False)["params"].close()
    assert marker.exists()


def test_checkpoint_is_safetensors_and_json_and_restores_exactly(setup, tmp_path):
    """Weights, AdamW moments (integer parameter keys), betas and the RNG state survive."""
    from mmcompose.checkpoint import LEGACY_NAMES, load_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt = tmp_path / "c.checkpoint"
    log = [{"stage": 1, "step": 1, "loss": 0.1 + 0.2, "lr": 1e-3 / 3}]  # not short decimals
    trainer_mod._save_checkpoint(ckpt, _Wrap(model), opt, 1, 1, log, "digest")
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "state.safetensors"]
    assert not any((ckpt / n).exists() for n in LEGACY_NAMES)
    tensors, meta = load_checkpoint(ckpt)
    assert meta["log"] == log and meta["config_digest"] == "digest"
    assert torch.equal(tensors["rng/torch"], torch.get_rng_state())
    state = trainer_mod._apply_checkpoint((tensors, meta), ckpt, _Wrap(torch.nn.Linear(3, 2)))
    again = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    again.load_state_dict(state["optimizer"])
    a, b = opt.state_dict(), again.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, slots in a["state"].items():
        assert all(torch.equal(v, b["state"][pid][k]) for k, v in slots.items())


class _Wrap(torch.nn.Module):
    """A module whose parameters are named like a tower's, so the trainer checkpoints them."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.towers = torch.nn.ModuleDict({"image": inner})
