"""The pretrained point encoder ``pointnet_meshes`` (mmcompose.assets.point_encoder).

Fast tests pretrain on a few synthetic clouds (spheres, cubes, discs) in seconds; the
``real`` test checks the figures of the cache prepared by
``mmcompose assets prepare --only pointnet_meshes``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcompose.assets import point_encoder as P
from mmcompose.assets.cache import MANIFEST_NAME, MissingAssetError
from mmcompose.assets.encoders import encoder_asset_dir, prepare_encoders
from mmcompose.errors import ConfigError
from mmcompose.model.config import ModuleSpec
from mmcompose.model.encoders import (
    PointNetEncoder,
    PointNetParams,
    build_encoder,
    no_pretrained_weights,
)
from mmcompose.testing import float_tol

SHAPES = ("sphere", "cube", "disc")


def _cloud(shape: str, rng: np.random.Generator, n: int = 160) -> np.ndarray:
    """A surface sample of a unit shape, randomly turned about z (as the meshes dataset is)."""
    if shape == "sphere":
        pts = rng.normal(size=(n, 3))
        pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    elif shape == "cube":
        pts = rng.uniform(-1, 1, size=(n, 3))
        axis = rng.integers(0, 3, size=n)
        pts[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    else:  # a flat disc in the xy plane
        r, t = np.sqrt(rng.uniform(0, 1, n)), rng.uniform(0, 2 * np.pi, n)
        pts = np.stack([r * np.cos(t), r * np.sin(t), rng.normal(0, 0.01, n)], axis=1)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    return (pts @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T).astype(np.float32)


def _dataset(per_class: int, seed: int, n: int = 160) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    clouds, labels = [], []
    for _ in range(per_class):
        for label, shape in enumerate(SHAPES):
            clouds.append(_cloud(shape, rng, n))
            labels.append(label)
    return clouds, labels


TINY = PointNetParams(num_points=64, num_groups=8, group_size=8, width=16)
RECIPE = P.PretrainRecipe(epochs=20, batch_size=10, lr=1e-2, warmup_epochs=1)


def test_pretraining_is_deterministic_and_beats_init() -> None:
    train, val = _dataset(10, seed=0), _dataset(8, seed=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = P.pretrain_point_encoder(*train, len(SHAPES), TINY, RECIPE, val=val)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    b = P.pretrain_point_encoder(*train, len(SHAPES), TINY, RECIPE, val=val)
    assert a.log == b.log and len(a.log) == RECIPE.epochs
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # The untrained model (the same seeded initialisation) is at chance; training is not.
    untrained = P.pretrain_point_encoder(
        *train, len(SHAPES), TINY, P.PretrainRecipe(epochs=0), val=val
    )
    acc0 = P.head_accuracy(untrained.encoder, untrained.head, *val)
    acc = P.head_accuracy(a.encoder, a.head, *val)
    assert acc >= 0.8 and acc0 <= 0.5, (acc0, acc)
    # A linear probe on the frozen pooled features reads the shape off too.
    n = len(train[0])
    feats = P.pooled_features(a.encoder, train[0] + val[0])
    probe = P.linear_probe_accuracy(feats[:n], train[1], {"val": (feats[n:], val[1])})
    assert probe["val"] >= 0.8


def test_augmentation_turns_about_z_and_normalises() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 3)) * [1.0, 2.0, 3.0]
    plain = P.PretrainRecipe(scale=(1.0, 1.0), jitter_sigma=0.0)
    out = P.augment_cloud(pts, 200, plain, np.random.default_rng(5)).numpy().astype(np.float64)
    ref = PointNetEncoder.preprocess(pts, PointNetParams(num_points=200)).numpy()
    assert out.shape == (200, 3)
    tol = float_tol(np.float32, 1.0, n_terms=3)  # float32 rotations/norms of 3-vectors <= 1
    assert np.isclose(np.linalg.norm(out, axis=1).max(), 1.0, atol=tol)
    # A turn about z keeps each point's height and distance from the z axis.
    np.testing.assert_allclose(np.sort(out[:, 2]), np.sort(ref[:, 2]), atol=tol)
    np.testing.assert_allclose(
        np.sort(np.hypot(out[:, 0], out[:, 1])), np.sort(np.hypot(ref[:, 0], ref[:, 1])), atol=tol
    )
    # the turn moves x by O(0.1), far above rounding
    assert not np.allclose(np.sort(out[:, 0]), np.sort(ref[:, 0]), atol=1e-3)
    again = P.augment_cloud(pts, 200, plain, np.random.default_rng(5)).numpy()
    assert np.array_equal(again, out.astype(np.float32))  # same seed, same ops: exact


def test_architecture_is_fixed_and_missing_asset_names_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="fixed by its pretrained weights"):
        build_encoder(ModuleSpec(name="pointnet_meshes", params={"width": 64}))
    with pytest.raises(MissingAssetError) as info:
        build_encoder(ModuleSpec(name="pointnet_meshes"))
    assert "mmcompose assets prepare --only pointnet_meshes" in str(info.value)
    assert "pointnet_meshes" in info.value.message
    # Loading a saved model overwrites encoder weights anyway: no cache needed then.
    with no_pretrained_weights():
        enc = build_encoder(ModuleSpec(name="pointnet_meshes"))
    assert (enc.num_tokens, enc.output_dim) == (32, 128)
    fresh = build_encoder(ModuleSpec(name="pointnet_meshes", params={"pretrained": False}))
    assert fresh and (fresh.num_tokens, fresh.output_dim) == (32, 128)


@pytest.fixture
def mesh_manifest(tmp_path: Path) -> Path:
    """A meshes-like manifest: three shapes, train/val/test clouds saved as .npy."""
    rng = np.random.default_rng(0)
    rows = []
    for split, count in (("train", 3), ("val", 1), ("test", 1)):
        for k in range(count):
            for shape in SHAPES:
                rel = f"points/{shape}-{split}-{k}.npy"
                (tmp_path / "points").mkdir(exist_ok=True)
                np.save(tmp_path / rel, _cloud(shape, rng, n=1100))
                rows.append(
                    {"id": rel, "path": rel, "modality": "point", "label": shape, "split": split}
                )
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_prepare_saves_loads_and_is_idempotent(
    mesh_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / "cache"))
    recipe = P.PretrainRecipe(epochs=1, batch_size=9)
    folder = P.prepare_pointnet_meshes(progress=False, manifest=mesh_manifest, recipe=recipe)
    assert (
        folder
        == encoder_asset_dir("pointnet_meshes")
        == tmp_path / "cache/encoders/pointnet_meshes"
    )
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "head.safetensors"}
    assert manifest["source"]["counts"] == {"train": 9, "val": 3, "test": 3}
    assert manifest["training"]["epochs"] == 1 and len(manifest["training"]["log"]) == 1
    for probe in ("head", "nearest_centroid", "linear_probe", "nearest_centroid_untrained"):
        assert set(manifest["accuracy"][probe]) == {"train", "val", "test"}
    config = json.loads((folder / "config.json").read_text())
    assert config["labels"] == sorted(SHAPES) and config["params"] == P.POINTNET_MESHES_ARCH

    stamp = (folder / MANIFEST_NAME).stat().st_mtime_ns
    assert prepare_encoders(["pointnet_meshes"], progress=False) == {"pointnet_meshes": folder}
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns == stamp  # not retrained

    from safetensors.torch import load_file

    enc = build_encoder(ModuleSpec(name="pointnet_meshes"))
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == enc.state_dict().keys()
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in saved.items())
    x = enc.preprocess(enc.load(tmp_path / "points/cube-test-0.npy", enc.params), enc.params)
    assert enc(x[None]).shape == (1, 32, 128)

    # Re-splitting the dataset may put trained-on clouds into val/test: retrain, do not load.
    rows = mesh_manifest.read_text().splitlines()
    mesh_manifest.write_text("\n".join(rows[::-1]) + "\n")
    with pytest.raises(MissingAssetError, match="earlier version of"):
        build_encoder(ModuleSpec(name="pointnet_meshes"))
    P.prepare_pointnet_meshes(progress=False, manifest=mesh_manifest, recipe=recipe)
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns != stamp
    build_encoder(ModuleSpec(name="pointnet_meshes"))

    (folder / "model.safetensors").write_bytes(b"short")  # a damaged cache is not trusted
    with pytest.raises(MissingAssetError, match="not in the asset cache"):
        build_encoder(ModuleSpec(name="pointnet_meshes"))


@pytest.mark.real
def test_real_prepared_encoder_figures() -> None:
    folder = encoder_asset_dir("pointnet_meshes")
    if not (folder / MANIFEST_NAME).is_file():
        pytest.skip("prepare it first: mmcompose assets prepare --only pointnet_meshes")
    acc = json.loads((folder / MANIFEST_NAME).read_text())["accuracy"]
    assert acc["head"]["val"] >= 0.7
    assert acc["linear_probe"]["val"] > acc["linear_probe_untrained"]["val"]
