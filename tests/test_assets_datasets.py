"""Dataset preparation: splits, manifests, idempotency and missing-source errors on tiny
synthetic sources (fast), plus ``real`` tests on the Debian/PyPI sources when installed."""

from __future__ import annotations

import json
import math
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
    monkeypatch.setattr(ds.openclipart, "OPENCLIPART_DIR", root)
    return root


def _records(folder: Path) -> list[dict]:
    return ds.read_items(folder)


# --------------------------------------------------------------------------- splits
def test_split_quota_holds_out_a_share_of_every_label() -> None:
    table = {n: ds.split_quota(n) for n in range(1, 41)}
    assert [table[n] for n in range(1, 9)] == [
        (0, 0), (1, 0), (1, 1), (1, 1), (1, 1), (2, 1), (2, 1), (2, 2)
    ]  # fmt: skip
    assert table[12] == (2, 2) and table[16] == (3, 3) and table[40] == (6, 6)
    for n, (test, val) in table.items():
        assert n - test - val >= 1  # every held-out label keeps training items
        if n >= 3:
            assert test >= 1 and val >= 1 and val <= test
        if n >= 4:
            assert n - test - val >= n / 2  # training is not starved
        if 6 <= n <= 13:
            assert test == 2
        if n >= 20:
            # a count rounded to an integer (and nudged for the rules above): <= 1/n off
            assert abs(test / n - ds.HELD_OUT_PERCENT / 100) < 0.05


def _labelled(sizes: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label}/{k}", label) for label, n in sizes.items() for k in range(n)]


def test_assign_splits_is_stratified_deterministic_and_order_free() -> None:
    sizes = {f"label{n}": n for n in range(1, 41)}
    pairs = _labelled(sizes)
    splits = ds.assign_splits(pairs, seed=0)
    assert set(splits) == {i for i, _ in pairs}  # every item in exactly one split
    assert ds.assign_splits(list(reversed(pairs)), seed=0) == splits
    assert ds.assign_splits(pairs, seed=0) == splits
    other = ds.assign_splits(pairs, seed=1)
    assert other != splits  # the seed picks which items ...
    for label, n in sizes.items():
        counts = Counter(splits[i] for i, lab in pairs if lab == label)
        test, val = ds.split_quota(n)
        assert counts == Counter({"train": n - test - val, "val": val, "test": test}) - Counter()
        assert Counter(other[i] for i, lab in pairs if lab == label) == counts  # ... not how many
    assert splits["label1/0"] == "train"  # a lone item trains


def test_assign_splits_keeps_groups_together() -> None:
    def triples(groups: dict[str, list[int]]) -> list[tuple[str, str, str]]:
        return [(f"{lab}/{g}/{k}", lab, f"{lab}/{g}") for lab, sizes in groups.items()
                for g, n in enumerate(sizes) for k in range(n)]  # fmt: skip

    items = triples({
        "singles": [1] * 12,  # plain items: the per-label quota exactly
        "video": [6, 6, 1, 1, 1, 1],  # two long videos and four images, as person's clips
        "pairs": [2, 2],  # too big for a quota of 1: one whole group is held out
        "one": [5],  # a single group stays in train
        "mixed": [3, 1, 1, 1, 1, 1, 1, 1],
    })  # fmt: skip
    splits = ds.assign_splits(items, seed=0)
    assert ds.assign_splits(list(reversed(items)), seed=0) == splits
    by_group: dict[str, set[str]] = {}
    for item_id, _, group in items:
        by_group.setdefault(group, set()).add(splits[item_id])
    assert all(len(s) == 1 for s in by_group.values())  # no group straddles two splits

    def counts(label: str) -> Counter[str]:
        return Counter(splits[i] for i, lab, _ in items if lab == label)

    assert counts("singles") == {"train": 8, "val": 2, "test": 2}
    assert counts("video") == {"train": 12, "val": 1, "test": 3}  # the videos stay whole
    assert counts("pairs") == {"train": 2, "test": 2}
    assert counts("one") == {"train": 5}
    assert counts("mixed") == {"train": 6, "val": 2, "test": 2}
    for label in ("singles", "video", "pairs", "one", "mixed"):
        assert counts(label)["train"] > 0  # every held-out label is also trained on


def test_split_groups_join_identical_files_and_clips_of_one_source(tmp_path: Path) -> None:
    def rec(item_id: str, label: str, content: bytes, **extra: str) -> dict:
        (tmp_path / item_id).write_bytes(content)
        return {"id": item_id, "label": label, **extra}

    images = [rec("a1", "apple", b"same"), rec("a2", "apple", b"same"), rec("a3", "apple", b"x"),
              rec("p1", "pear", b"same")]  # fmt: skip
    files = {r["id"]: tmp_path / r["id"] for r in images}
    groups = ds.split_groups("openclipart", images, files)
    assert groups["a1"] == groups["a2"] == "a1" and groups["a3"] == "a3"
    clips = [
        rec("c1", "cup", b"1", source="/v/cup.mp4", segment="0"),
        rec("c2", "cup", b"2", source="/v/cup.mp4", segment="1"),
        rec("c3", "cup", b"3", image="emoji/cup"),
        rec("c4", "cup", b"4", image="emoji/cup"),
        rec("c5", "cup", b"5", image="openclipart/mug"),
        rec("b1", "bone", b"6", image="emoji/bone"),  # bone's only source: split per clip
        rec("b2", "bone", b"7", image="emoji/bone"),
    ]
    files = {r["id"]: tmp_path / r["id"] for r in clips}
    groups = ds.split_groups("clips", clips, files)
    assert groups["c1"] == groups["c2"] and groups["c3"] == groups["c4"]
    assert len({groups[c] for c in ("c1", "c3", "c5")}) == 3
    assert groups["b1"] != groups["b2"]
    poses = [rec(f"m{k}", "cow", bytes([k]), mesh="cgal:cow.off") for k in range(3)]
    files = {r["id"]: tmp_path / r["id"] for r in poses}
    assert len(set(ds.split_groups("meshes", poses, files).values())) == 3  # poses split


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


def _forbid_rebuild(monkeypatch: pytest.MonkeyPatch, name: str) -> ds.DatasetSpec:
    """Make building dataset ``name`` fail loudly; returns the real spec (to restore)."""

    def boom(out: Path, seed: int) -> list:
        raise AssertionError("rebuilt a complete dataset")

    spec = ds.DATASETS.get(name)
    monkeypatch.setitem(
        ds.DATASETS._items, name, ds.DatasetSpec(spec.name, spec.modality, boom, spec.sources)
    )
    return spec


def test_prepare_is_idempotent_and_force_rebuilds(
    cache: Path, clipart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"]
    before = (folder / ds.ITEMS_NAME).read_bytes()

    spec = _forbid_rebuild(monkeypatch, "openclipart")
    assert ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"] == folder
    with pytest.raises(AssertionError, match="rebuilt"):  # a new seed is a new dataset
        ds.prepare_datasets(only=["openclipart"], progress=False, seed=1)
    monkeypatch.setitem(ds.DATASETS._items, "openclipart", spec)
    shutil.rmtree(folder / "images")  # damage it: force must rebuild from the sources
    ds.prepare_datasets(only=["openclipart"], force=True, progress=False)
    assert (folder / ds.ITEMS_NAME).read_bytes() == before  # deterministic rebuild
    assert all(Path(r["path"]).is_file() for r in _records(folder))


def test_old_split_is_rewritten_without_rebuilding(
    cache: Path, clipart: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for k in range(8):  # 8 apples, two of them the same drawing filed twice
        _png(clipart / f"food/fruit/apple_{k}.png", (200, 10 * k, 0))
    _png(clipart / "food/apple_3.png", (200, 30, 0))
    folder = ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"]
    fresh = (folder / ds.ITEMS_NAME).read_bytes()
    recs = _records(folder)
    apples = Counter(r["split"] for r in recs if r["label"] == "apple")
    assert apples == {"train": 6, "val": 2, "test": 2}  # 10 apples: 2 + 2 held out
    twins = {r["split"] for r in recs if Path(r["id"]).name == "apple_3.png"}
    assert len(twins) == 1  # the identical pair shares one split

    # An older cache: the per-item hash split, no split_version in the meta.
    meta = json.loads((folder / MANIFEST_NAME).read_text())
    meta.pop("split_version")
    (folder / MANIFEST_NAME).write_text(json.dumps(meta))
    old = [{**r, "split": "test" if i % 3 else "train"} for i, r in enumerate(recs)]
    (folder / ds.ITEMS_NAME).write_text("".join(json.dumps(r) + "\n" for r in old))
    mtimes = {r["path"]: Path(r["path"]).stat().st_mtime_ns for r in recs}

    spec = _forbid_rebuild(monkeypatch, "openclipart")
    ds.prepare_datasets(only=["openclipart"])
    assert "re-split" in capsys.readouterr().err
    assert (folder / ds.ITEMS_NAME).read_bytes() == fresh  # as a fresh build splits it
    assert {p: Path(p).stat().st_mtime_ns for p in mtimes} == mtimes  # files untouched
    meta = json.loads((folder / MANIFEST_NAME).read_text())
    assert meta["split_version"] == ds.SPLIT_VERSION and meta["labels"]["apple"] == apples
    stamp = (folder / ds.ITEMS_NAME).stat().st_mtime_ns
    ds.prepare_datasets(only=["openclipart"])  # idempotent: nothing rewritten
    assert (folder / ds.ITEMS_NAME).stat().st_mtime_ns == stamp
    assert "re-split" not in capsys.readouterr().err

    meta.pop("split_version")  # an older split with a file gone: rebuilt from the sources
    (folder / MANIFEST_NAME).write_text(json.dumps(meta))
    Path(recs[0]["path"]).unlink()
    with pytest.raises(AssertionError, match="rebuilt"):
        ds.prepare_datasets(only=["openclipart"], progress=False)
    monkeypatch.setitem(ds.DATASETS._items, "openclipart", spec)
    ds.prepare_datasets(only=["openclipart"], progress=False)
    assert (folder / ds.ITEMS_NAME).read_bytes() == fresh


def test_failed_build_leaves_previous_dataset_intact(
    cache: Path, clipart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ds.prepare_datasets(only=["openclipart"], progress=False)["openclipart"]
    monkeypatch.setattr(ds.openclipart, "OPENCLIPART_DIR", clipart / "gone")
    with pytest.raises(MissingAssetError):
        ds.prepare_datasets(only=["openclipart"], force=True, progress=False)
    assert len(_records(folder)) == 4 and (folder / MANIFEST_NAME).is_file()


# --------------------------------------------------------------------------- missing sources
def test_missing_sources_name_the_packages(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds.openclipart, "OPENCLIPART_DIR", tmp_path / "none")
    monkeypatch.setattr(ds.sounds, "LMMS_SAMPLES_DIR", tmp_path / "none")
    with pytest.raises(MissingAssetError) as err:
        ds.prepare_datasets(only=["openclipart", "sounds"], progress=False)
    assert err.value.hint == "apt-get install -y openclipart-png lmms-common"
    assert "openclipart" in err.value.message and "sounds" in err.value.message


def test_missing_pybullet_names_pip_and_missing_emoji_font_names_apt(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ds.meshes, "CGAL_DATA_TARBALLS", (tmp_path / "data.tar.gz",))
    with pytest.raises(MissingAssetError, match="libcgal-demo") as err:
        ds.prepare_datasets(only=["meshes"], progress=False)
    assert err.value.hint == "apt-get install -y libcgal-demo"
    _cgal_tarball(tmp_path / "data.tar.gz")
    monkeypatch.setattr(ds.meshes, "PYBULLET_DATA_DIR", tmp_path / "no-pybullet")
    with pytest.raises(MissingAssetError) as err:
        ds.prepare_datasets(only=["meshes"], progress=False)
    assert err.value.hint == "pip install pybullet"
    monkeypatch.setattr(ds.emoji, "EMOJI_FONT", tmp_path / "NotoColorEmoji.ttf")
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
        monkeypatch.setattr(ds.sounds, name, path)
    monkeypatch.setattr(ds.sounds, "ALSA_SOUNDS_DIR", alsa)
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
    monkeypatch.setattr(ds.meshes, "CGAL_DATA_TARBALLS", (tmp_path / "data.tar.gz",))
    monkeypatch.setattr(ds.meshes, "PYBULLET_DATA_DIR", bullet)
    monkeypatch.setattr(
        ds.meshes,
        "MESHES",
        (("cgal", "data/meshes/cow.off", "cow"), ("pybullet", "duck.obj", "duck")),
    )
    folder = ds.prepare_datasets(only=["meshes"], progress=False)["meshes"]
    recs = _records(folder)
    assert Counter(r["label"] for r in recs) == {"cow": 12, "duck": 12}
    clouds = [load_point_cloud(r["path"]) for r in recs if r["label"] == "cow"]
    assert all(c.shape == (ds.meshes.POINTS, 3) and np.isfinite(c).all() for c in clouds)
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
    monkeypatch.setattr(ds.sources, "OPENCV_DATA_DIR", opencv)
    monkeypatch.setattr(ds.sources, "OPENCV_HTML_DIR", tmp_path / "none")
    monkeypatch.setattr(ds.photos, "SKIMAGE_PHOTOS", {})
    monkeypatch.setattr(ds.clips, "IMAGE_DATASETS", ("openclipart", "photos"))
    folder = ds.prepare_datasets(only=["clips"], progress=False)["clips"]
    recs = _records(folder)
    real = [r for r in recs if r["id"].startswith("clips/opencv/")]
    assert [r["label"] for r in real] == ["tree", "tree"]  # 40 frames: two 16-frame segments
    pan = Counter(r["label"] for r in recs if r["id"].startswith("clips/panzoom/"))
    assert pan == {lab: ds.clips.CLIPS_PER_LABEL for lab in ("apple", "bird", "cow", "duck")}
    for r in recs:
        frames = load_video(r["path"], num_frames=4)
        assert frames.shape[0] == 4 and frames.dtype == np.uint8
    zoom = next(r for r in recs if r.get("motion") == "zoom in" and r["label"] == "apple")
    first, last = load_video(zoom["path"], num_frames=ds.clips.CLIP_FRAMES)[[0, -1]]
    assert first.mean() > last.mean() + 20  # zooming in on a red photo: less white border
    assert (cache / "datasets/photos" / MANIFEST_NAME).is_file()  # dependency prepared
    apple: dict[str, set[str]] = {}  # two images, two clips each
    for r in recs:
        if r["label"] == "apple" and "image" in r:
            apple.setdefault(r["image"], set()).add(r["split"])
    assert sorted(apple.values(), key=sorted) == [{"test"}, {"train"}]  # one split per image
    birds = Counter(r["split"] for r in recs if r["label"] == "bird")  # one image: per clip
    assert birds == {"train": 2, "val": 1, "test": 1}


# --------------------------------------------------------------------------- mesh renders
def test_render_projects_a_sphere_onto_its_disc_front_side_only() -> None:
    """Pinhole projection, z-buffer and hole closing on known geometry: a unit sphere seen from
    distance 3 covers a disc of radius tan(asin(1/3)) / tan(fov / 2) half-widths (plus the 2x2
    splats' half-width, 1 pixel), and every pixel inside shows the front hemisphere (red), none
    the back (blue) through a gap."""
    import trimesh

    mr = ds.mesh_renders
    sphere = trimesh.creation.icosphere(subdivisions=4)
    surface = mr.mesh_surface(sphere, np.random.default_rng(0))
    front = surface.points[:, 2] > 0  # the camera sits on +z (azimuth 0)
    colours = np.where(front[:, None], [[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]).astype(np.float32)
    surface = mr.Surface(surface.points, surface.normals, colours)
    full = mr.CLIP_SIZE * mr.SUPERSAMPLE  # the resolution clips are rasterised at
    cam = mr.Camera(azimuth=0.0, elevation=0.0, distance=3.0, light=(0.0, 0.0, 1.0))
    img = mr.render(surface, cam, (1.0, 1.0, 1.0), np.zeros((full, full, 3)), full, 1)
    radius = full / 2 * math.tan(math.asin(1 / 3)) / math.tan(math.radians(mr.FOV_DEGREES) / 2)
    covered = img.max(axis=2) > 0
    assert abs(covered.sum() - math.pi * (radius + 1) ** 2) < math.pi * radius  # half a ring
    yy, xx = np.mgrid[:full, :full] + 0.5
    inside = np.hypot(xx - full / 2, yy - full / 2) < radius - 2
    red, blue = img[..., 0].astype(int), img[..., 2].astype(int)
    assert covered[inside].all()
    assert (blue[inside] > red[inside]).mean() < 0.005  # see-through pixels: under 0.5%


def _mesh_render_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An L of two boxes (cow: no symmetry, so an orbit must change its picture), an
    icosphere (duck) and a one-sided scan (hippopotamus, a half-sphere point set like CGAL's
    hippo scans) as the meshes dataset's sources, rendered from fewer points and frames."""
    import trimesh

    src = tmp_path / "render-src"
    (src / "data/meshes").mkdir(parents=True)
    (src / "data/points_3").mkdir()
    foot = trimesh.creation.box((1.0, 0.4, 0.5), trimesh.transformations.translation_matrix(
        (0.5, -0.8, 0.0)))  # fmt: skip
    ell = trimesh.util.concatenate([trimesh.creation.box((1.0, 2.0, 0.5)), foot])
    ell.export(src / "data/meshes/cow.off")
    half = trimesh.creation.icosphere(subdivisions=3).vertices
    trimesh.PointCloud(half[half[:, 2] > 0.05]).export(src / "data/points_3/hippo1.ply")
    with tarfile.open(tmp_path / "render.tar.gz", "w:gz") as tar:
        tar.add(src / "data", arcname="data")
    (tmp_path / "bullet").mkdir()
    trimesh.creation.icosphere(subdivisions=2).export(tmp_path / "bullet/duck.obj")
    monkeypatch.setattr(ds.meshes, "CGAL_DATA_TARBALLS", (tmp_path / "render.tar.gz",))
    monkeypatch.setattr(ds.meshes, "PYBULLET_DATA_DIR", tmp_path / "bullet")
    meshes = (("cgal", "data/meshes/cow.off", "cow"), ("pybullet", "duck.obj", "duck"),
              ("cgal", "data/points_3/hippo1.ply", "hippopotamus"))  # fmt: skip
    monkeypatch.setattr(ds.meshes, "MESHES", meshes)
    for name, value in (("CLIP_FRAMES", 8), ("SURFACE_POINTS", 24_000), ("VIEW_POINTS", 24_000)):
        monkeypatch.setattr(ds.mesh_renders, name, value)


def _relative_records(folder: Path) -> list[dict]:
    return [{**r, "path": str(Path(r["path"]).relative_to(folder))} for r in _records(folder)]


def test_mesh_renders_are_deterministic_move_and_split_every_concept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mesh_render_sources(tmp_path, monkeypatch)
    built = {}
    for run in ("a", "b"):  # two preparations into two caches
        monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / f"cache-{run}"))
        built[run] = ds.prepare_datasets(only=["mesh_clips", "mesh_views"], progress=False)
    for name, per_label in (("mesh_clips", ds.mesh_renders.CLIPS_PER_LABEL),
                            ("mesh_views", ds.mesh_renders.VIEWS_PER_LABEL)):  # fmt: skip
        a, b = built["a"][name], built["b"][name]
        recs = _relative_records(a)
        assert recs == _relative_records(b)
        assert not (a / "scratch").exists()
        assert Counter(r["label"] for r in recs) == dict.fromkeys(
            ("cow", "duck", "hippopotamus"), per_label
        )
        splits = {lab: Counter(r["split"] for r in recs if r["label"] == lab) for lab in ("cow",)}
        assert splits == {"cow": {"train": 4, "val": 2, "test": 2}}  # split_quota(8)
        assert all({r["split"] for r in recs if r["label"] == lab} == {"train", "val", "test"}
                   for lab in ("cow", "duck", "hippopotamus"))  # fmt: skip
    hippo = ds.mesh_renders.mesh_surface(
        ds.meshes._load_geometry(tmp_path / "render-src/data/points_3/hippo1.ply"),
        np.random.default_rng(0),
    )
    assert hippo.facing is not None and abs(hippo.facing) < 0.1  # the scan faces +z
    motion = []
    for rec in _records(built["a"]["mesh_clips"]):
        frames = load_video(rec["path"], num_frames=8)
        again = load_video(built["b"]["mesh_clips"] / rec["path"].split("/mesh_clips/")[1], 8)
        assert frames.shape == (8, ds.mesh_renders.CLIP_SIZE, ds.mesh_renders.CLIP_SIZE, 3)
        assert np.array_equal(frames, again)
        if rec["label"] == "cow":
            motion.append(np.abs(frames[0].astype(int) - frames[-1]).mean())
    # a 90-180 degree orbit around an asymmetric shape changes the picture (mean absolute
    # change in grey levels; a still scene encodes to identical frames, 0)
    assert min(motion) > 4.0 and np.median(motion) > 15.0
    view = next(r for r in _records(built["a"]["mesh_views"]) if r["label"] == "cow")
    assert load_image(view["path"]).size == (ds.mesh_renders.VIEW_SIZE,) * 2


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
    found = {label for label, _, _ in ds.emoji._emoji_chars()}
    assert len(found) >= 0.9 * sum(1 for v in ds.CONCEPTS.values() if v)
    assert len(names) == len(set(names))
    assert set(ds.openclipart.CLIPART_KEYWORDS) <= set(ds.CONCEPTS)
    assert {label for _, _, label in ds.meshes.MESHES} <= set(ds.CONCEPTS)


# --------------------------------------------------------------------------- real sources
def _require_real() -> None:
    checks = {
        "fonts-noto-color-emoji": ds.emoji.EMOJI_FONT.is_file(),
        "openclipart-png": ds.openclipart.OPENCLIPART_DIR.is_dir(),
        "opencv-doc": ds.sources.OPENCV_DATA_DIR.is_dir(),
        "espeak-ng": shutil.which(ds.spoken.ESPEAK) is not None,
        "lmms-common": ds.sounds.LMMS_SAMPLES_DIR.is_dir(),
        "sound-theme-freedesktop": ds.sounds.FREEDESKTOP_SOUNDS_DIR.is_dir(),
        "alsa-utils": ds.sounds.ALSA_SOUNDS_DIR.is_dir(),
        "libcgal-demo": any(p.is_file() for p in ds.meshes.CGAL_DATA_TARBALLS),
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
    # 3 of 8 voices: keeps it ~1 min
    mp.setattr(ds.spoken, "SPOKEN_VOICES", ds.spoken.SPOKEN_VOICES[:3])
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
               "meshes": 300, "clips": 250, "mesh_clips": 240, "mesh_views": 240}  # fmt: skip
    for name, least in minimum.items():
        meta = json.loads((root / name / MANIFEST_NAME).read_text())
        recs = ds.read_items(root / name)
        assert meta["num_items"] == len(recs) >= least, name
        train = {r["label"] for r in recs if r["split"] == "train"}
        assert {r["label"] for r in recs} == train, name
        groups = ds.split_groups(name, recs, {r["id"]: Path(r["path"]) for r in recs})
        split_of_group: dict[str, set[str]] = {}
        for r in recs:
            split_of_group.setdefault(groups[r["id"]], set()).add(r["split"])
        assert all(len(s) == 1 for s in split_of_group.values()), name
        assert meta["split_version"] == ds.SPLIT_VERSION
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
        "mesh_clips": lambda p: load_video(p, num_frames=4).shape,
        "mesh_views": lambda p: load_image(p).size,
    }
    for name, load in loaders.items():
        recs = ds.read_items(root / name)
        for rec in recs[:: max(1, len(recs) // 3)]:
            assert min(load(rec["path"])) > 0, rec["path"]
    spoken = ds.read_items(root / "spoken")
    cow = next(r for r in spoken if r["label"] == "cow")
    assert 0.2 < len(load_audio(cow["path"])) / ds.SAMPLE_RATE < 3.0
    assert cow["caption"] == "the spoken word cow"
