"""``meshes`` (point): seeded, augmented point clouds sampled from CGAL's and pybullet's
meshes, ``CLOUDS_PER_LABEL`` per label."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.assets.datasets.items import Item, seeded_rng, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.sources import Source, missing, require_dir
from mmcompose.errors import MMComposeError

CGAL_SOURCE = Source("libcgal-demo", "apt")
PYBULLET_SOURCE = Source("pybullet", "pip")
CGAL_DATA_TARBALLS: tuple[Path, ...] = (
    Path("/usr/share/doc/libcgal-dev/data.tar.gz"),
    Path("/usr/share/doc/libcgal-demo/data.tar.gz"),
)
PYBULLET_DATA_DIR: Path | None = None  # None: located from the installed pybullet_data
POINTS = 2048
CLOUDS_PER_LABEL = 12  # split evenly over a label's meshes
# (source, path inside CGAL's data.tar.gz or pybullet_data, label)
MESHES: tuple[tuple[str, str, str], ...] = (
    ("cgal", "data/meshes/cow.off", "cow"),
    ("cgal", "data/meshes/bull.off", "bull"),
    ("cgal", "data/meshes/pig.off", "pig"),
    ("cgal", "data/meshes/elephant.off", "elephant"),
    ("cgal", "data/meshes/camel.off", "camel"),
    ("cgal", "data/meshes/bunny00.off", "rabbit"),
    ("pybullet", "bunny.obj", "rabbit"),
    ("cgal", "data/meshes/bear.off", "bear"),
    ("cgal", "data/meshes/lion.off", "lion"),
    ("cgal", "data/meshes/elk.off", "deer"),
    ("cgal", "data/points_3/kitten.off", "cat"),
    ("cgal", "data/meshes/triceratops.off", "dinosaur"),
    ("cgal", "data/meshes/diplodocus.off", "dinosaur"),
    ("cgal", "data/meshes/ChineseDragon-10kv.off", "dragon"),
    ("cgal", "data/points_3/hippo1.ply", "hippopotamus"),
    ("cgal", "data/points_3/hippo2.ply", "hippopotamus"),
    ("cgal", "data/meshes/armadillo.off", "armadillo"),
    ("cgal", "data/meshes/mushroom.off", "mushroom"),
    ("cgal", "data/meshes/cactus.off", "cactus"),
    ("cgal", "data/meshes/helmet.off", "helmet"),
    ("cgal", "data/meshes/hand.off", "hand"),
    ("cgal", "data/meshes/boeing.off", "airplane"),
    ("cgal", "data/meshes/anchor.off", "anchor"),
    ("cgal", "data/meshes/femur.off", "bone"),
    ("cgal", "data/meshes/pinion.off", "gear"),
    ("cgal", "data/meshes/knot.off", "knot"),
    ("cgal", "data/meshes/man.off", "person"),
    ("cgal", "data/meshes/homer.off", "person"),
    ("pybullet", "duck.obj", "duck"),
    ("pybullet", "objects/mug.obj", "cup"),
    ("pybullet", "teddy2_VHACD_CHs.obj", "teddy"),
    ("pybullet", "soccerball.obj", "ball"),
    ("pybullet", "sphere_smooth.obj", "ball"),
    ("pybullet", "torus/torus_textured.obj", "doughnut"),
    ("pybullet", "lego/lego.obj", "brick"),
    ("pybullet", "racecar/meshes/left_front_wheel.obj", "wheel"),
)


def _cgal_tarball() -> Path:
    for path in CGAL_DATA_TARBALLS:
        if path.is_file():
            return path
    raise missing("CGAL's demo data (data.tar.gz)", CGAL_SOURCE)


def _pybullet_dir() -> Path:
    if PYBULLET_DATA_DIR is not None:
        return require_dir(PYBULLET_DATA_DIR, PYBULLET_SOURCE, "pybullet_data")
    spec = importlib.util.find_spec("pybullet_data")
    if spec is None or not spec.submodule_search_locations:
        raise missing("the pybullet_data meshes", PYBULLET_SOURCE)
    return Path(next(iter(spec.submodule_search_locations)))


def _load_geometry(path: Path) -> np.ndarray | Any:
    """A trimesh mesh with faces, or the (N, 3) vertices of a point set."""
    import trimesh

    geom = trimesh.load(str(path), process=False)
    if isinstance(geom, trimesh.Scene):
        geom = geom.to_geometry()
    if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0 and geom.area > 0:
        return geom
    vertices = np.asarray(geom.vertices, dtype=np.float64)
    if len(vertices) == 0:
        raise MMComposeError(f"mesh file {path} holds no geometry", hint="reinstall its package")
    return vertices


def augment_cloud(geom: Any, rng: np.random.Generator, n: int = POINTS) -> np.ndarray:
    """Sample ``n`` points, centre and scale into the unit sphere, then rotate about z, scale
    each axis by 0.8-1.2 and jitter (sigma 0.01, clipped at 0.03): pose/scale/noise variety
    so a classifier cannot memorise one fixed sampling of the shape."""
    from mmcompose.model.media import sample_points

    if isinstance(geom, np.ndarray):
        pts = geom[rng.choice(len(geom), size=n, replace=len(geom) < n)]
    else:
        pts = sample_points(geom, n, seed=int(rng.integers(2**31)))[:, :3].astype(np.float64)
    pts = pts - pts.mean(axis=0)
    pts /= max(np.linalg.norm(pts, axis=1).max(), 1e-12)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    pts = (pts @ rot.T) * rng.uniform(0.8, 1.2, size=3)
    pts += np.clip(rng.normal(0.0, 0.01, size=pts.shape), -0.03, 0.03)
    return pts.astype(np.float32)


def _mesh_files(out: Path) -> list[tuple[str, Path, str]]:
    """(source path, local file, label) for MESHES; CGAL's tarball is unpacked into ``out``."""
    tarball, bullet = _cgal_tarball(), _pybullet_dir()
    wanted = {p for src, p, _ in MESHES if src == "cgal"}
    scratch = out / "scratch"
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.lstrip("./") in wanted and m.isfile()]
        tar.extractall(scratch, members=members, filter="data")
    files = []
    for src, rel, label in MESHES:
        local = scratch / rel if src == "cgal" else bullet / rel
        if not local.is_file():
            print(f"mmcompose: mesh {src}:{rel} not found, skipping", file=sys.stderr)
            continue
        files.append((f"{src}:{rel}", local, label))
    return files


@register_dataset(
    "meshes",
    "point",
    (CGAL_SOURCE, PYBULLET_SOURCE),
    "each label has 1-3 meshes and poses are split per cloud, so val/test clouds are new "
    "samplings and poses of meshes also seen in train: it measures recognition, not "
    "unseen-shape generalisation",
)
def build_meshes(out: Path, seed: int) -> list[Item]:
    files = _mesh_files(out)
    per_label = Counter(label for _, _, label in files)
    items = []
    for key, local, label in files:
        geom = _load_geometry(local)
        count = math.ceil(CLOUDS_PER_LABEL / per_label[label])
        name = slug(Path(key.split(":", 1)[1]).stem)
        for k in range(count):
            cloud = augment_cloud(geom, seeded_rng(seed, key, k))
            rel = f"points/{label}/{name}-{k:02d}.npy"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(out / rel, cloud)
            caption = f"a point cloud of a {label}"
            items.append(Item(f"meshes/{key}#{k}", rel, "point", label, caption, {"mesh": key}))
    shutil.rmtree(out / "scratch", ignore_errors=True)
    return items
