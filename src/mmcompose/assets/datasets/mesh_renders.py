"""``mesh_clips`` (video) and ``mesh_views`` (image): the ``meshes`` dataset's CGAL and pybullet
meshes rendered by a small numpy point-splatting rasteriser, so that the mesh concepts (cow,
armadillo, gear, ...) exist as moving video and as images, not only as point clouds.

Why: the image datasets hold one emoji (train only) or none for several mesh concepts (bone,
cactus, doughnut, helmet, hippopotamus, teddy, wheel, armadillo), and the pan/zoom ``clips``
move a flat picture; MCUB-4 needs every concept held out in all four modalities, and a video
model should see real 3-D motion.

How a clip is made (:func:`orbit_frames`): the mesh surface is sampled once per mesh
(``SURFACE_POINTS`` area-weighted points with interpolated normals and, for the textured
pybullet meshes, texture colours; CGAL's raw point sets get PCA normals and small tangent
discs), stood upright (``UP_AXIS``) and scaled into the unit sphere. Each clip then draws its
own camera path from its seed: an orbit of 90-180 degrees in azimuth, a change of elevation,
a dolly in or out, a drift of the aim point, and a key light that turns on its own, over a
sky/ground backdrop whose horizon follows the camera's pitch; an untextured mesh gets a random
colour per clip, so colour does not name the concept. Frames are rendered at twice the size
and box-filtered (anti-aliasing), then written as MPEG-4 part 2 (deterministic output).
Views (:func:`view_image`) are single frames of the same renderer from a random camera.

The rasteriser (:func:`render`) projects the points with a pinhole camera, splats each over
2x2 pixels and keeps the nearest per pixel (a z-buffer on a packed depth+index key, so no sort
order can differ between CPUs), closes the gaps through which the back of the surface would
show, then shades the winners: ambient + Lambert + Blinn-Phong, normals turned towards the
camera (CGAL meshes are not all consistently oriented). It is pure numpy, needs no GPU or
display, and its output is a function of the mesh, the seed and the item index only. Splats
rather than triangles: the meshes range from 900 to 75k faces, mostly under a pixel each at
this size, and one vectorised pass over points costs the same for all of them.
"""

from __future__ import annotations

import colorsys
import math
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.assets.datasets import meshes
from mmcompose.assets.datasets.clips import _write_mp4
from mmcompose.assets.datasets.items import Item, seeded_rng, slug
from mmcompose.assets.datasets.registry import register_dataset
from mmcompose.assets.datasets.render import save_png

__all__ = [
    "Camera",
    "Surface",
    "mesh_surface",
    "orbit_cameras",
    "orbit_frames",
    "render",
    "view_image",
]

CLIP_SIZE = 96
CLIP_FRAMES = 16
CLIP_FPS = 8
CLIPS_PER_LABEL = 8  # split evenly over a label's meshes: 2 test + 2 val + 4 train per label
VIEW_SIZE = 128
VIEWS_PER_LABEL = 8
SURFACE_POINTS = 96_000  # with _close_holes, no see-through pixels at 192 px (96 supersampled)
VIEW_POINTS = SURFACE_POINTS * VIEW_SIZE**2 // CLIP_SIZE**2  # the same density per pixel
SUPERSAMPLE = 2
FOV_DEGREES = 45.0
ONE_SIDED = 0.25  # a point set whose mean normal is this long (sideways) is a one-sided scan
# Meshes whose "up" is not +y (path as in meshes.MESHES -> the axis that points up).
UP_AXIS: dict[str, str] = {
    "data/meshes/pig.off": "-y",
    "data/meshes/man.off": "+z",
    "data/meshes/mushroom.off": "-z",
    "objects/mug.obj": "+z",
}
_UP_ROTATIONS: dict[str, np.ndarray] = {  # rotation taking that axis to +y
    "+y": np.eye(3),
    "-y": np.diag([1.0, -1.0, -1.0]),
    "+z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "-z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    "+x": np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    "-x": np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
}


# --------------------------------------------------------------------------- surface
@dataclass(frozen=True)
class Surface:
    """A sampled surface: (N, 3) points in the unit sphere, unit normals, and (N, 3) colours in
    [0, 1] from the mesh's texture, or None (the renderer then paints one colour).

    ``facing``: for a one-sided scan (CGAL's hippo point sets), the azimuth its normals face on
    average; cameras stay on that side, since the back of such a scan is empty.
    """

    points: np.ndarray
    normals: np.ndarray
    colours: np.ndarray | None
    facing: float | None = None


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _texture_colours(geom: Any, faces: np.ndarray, bary: np.ndarray) -> np.ndarray | None:
    """Per-point texture colours of a textured mesh (nearest texel), else None."""
    visual = geom.visual
    uv = getattr(visual, "uv", None)
    image = getattr(getattr(visual, "material", None), "image", None)
    if getattr(visual, "kind", None) != "texture" or uv is None or image is None:
        return None
    tex = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    h, w = tex.shape[:2]
    st = np.einsum("nc,ncd->nd", bary, np.asarray(uv, dtype=np.float64)[geom.faces[faces]])
    col = np.floor(np.mod(st[:, 0], 1.0) * w).astype(np.int64) % w
    row = np.floor(np.mod(1.0 - st[:, 1], 1.0) * h).astype(np.int64) % h
    return tex[row, col]


def _mesh_samples(
    geom: Any, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Area-weighted points, normals and texture colours (or None). Normals: the vertex
    normals interpolated on a face whose corner normals all lie within 30 degrees of its own
    (a finely tessellated smooth surface), else the face normal, so a brick keeps flat sides."""
    import trimesh

    pts, faces = trimesh.sample.sample_surface(geom, n, seed=int(rng.integers(2**31)))
    bary = trimesh.triangles.points_to_barycentric(geom.triangles[faces], pts)
    face_n = np.asarray(geom.face_normals)
    corners = np.asarray(geom.vertex_normals)[geom.faces]  # (F, 3 corners, 3)
    smooth_face = np.einsum("fcd,fd->fc", corners, face_n).min(axis=1) > math.cos(math.pi / 6)
    smooth = _unit(np.einsum("nc,ncd->nd", bary, corners[faces]))
    normals = np.where(smooth_face[faces][:, None], smooth, face_n[faces])
    return pts, normals, _texture_colours(geom, faces, bary)


def _point_set_samples(
    xyz: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, None]:
    """Surfels for a raw point set: PCA normals over 12 neighbours (turned outwards), and ``n``
    points on tangent discs reaching the 6th neighbour, which closes the gaps of a scan."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(xyz).query(xyz, k=12)
    nb = xyz[idx] - xyz[idx].mean(axis=1, keepdims=True)
    _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", nb, nb))
    normals = vecs[:, :, 0]
    outward = np.sum(normals * (xyz - xyz.mean(axis=0)), axis=1) < 0
    normals[outward] *= -1.0
    base = rng.choice(len(xyz), size=n)
    helper = np.where(np.abs(normals[base, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = _unit(np.cross(normals[base], helper))
    t2 = np.cross(normals[base], t1)
    radius = dist[base, 6] * np.sqrt(rng.random(n))
    angle = rng.uniform(0.0, 2.0 * math.pi, n)
    offset = radius[:, None] * (np.cos(angle)[:, None] * t1 + np.sin(angle)[:, None] * t2)
    return xyz[base] + offset, normals[base], None


def mesh_surface(
    geom: Any, rng: np.random.Generator, up: str = "+y", n: int = SURFACE_POINTS
) -> Surface:
    """Sample a mesh (trimesh) or point set ((N, 3) array), stand it up (``up`` names the axis
    that points up) and centre its bounding box in the unit sphere."""
    if isinstance(geom, np.ndarray):
        pts, normals, colours = _point_set_samples(np.asarray(geom, dtype=np.float64), n, rng)
    else:
        pts, normals, colours = _mesh_samples(geom, n, rng)
    rot = _UP_ROTATIONS[up]
    pts = np.einsum("nj,ij->ni", np.asarray(pts, dtype=np.float64), rot)  # einsum: no BLAS
    normals = np.einsum("nj,ij->ni", np.asarray(normals, dtype=np.float64), rot)
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2.0
    pts /= max(float(np.linalg.norm(pts, axis=1).max()), 1e-12)
    normals = _unit(normals)
    mean = normals.mean(axis=0)
    one_sided = isinstance(geom, np.ndarray) and math.hypot(mean[0], mean[2]) > ONE_SIDED
    facing = math.atan2(mean[0], mean[2]) if one_sided else None
    f32 = np.float32
    tex = None if colours is None else colours.astype(f32)
    return Surface(pts.astype(f32), normals.astype(f32), tex, facing)


# --------------------------------------------------------------------------- camera
@dataclass(frozen=True)
class Camera:
    """A pinhole camera on a sphere around ``target`` (y up); angles in radians. ``light`` is
    the key light's direction in world space (towards the light)."""

    azimuth: float
    elevation: float
    distance: float
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    light: tuple[float, float, float] = (0.5, 0.8, 0.6)

    def basis(self) -> tuple[np.ndarray, np.ndarray]:
        """(eye position, 3x3 rows right/up/forward)."""
        ca, sa = math.cos(self.azimuth), math.sin(self.azimuth)
        ce, se = math.cos(self.elevation), math.sin(self.elevation)
        target = np.asarray(self.target, dtype=np.float64)
        eye = target + self.distance * np.array([ce * sa, se, ce * ca])
        forward = _unit(target - eye)
        right = _unit(np.cross(forward, [0.0, 1.0, 0.0]))
        return eye, np.stack([right, np.cross(right, forward), forward])


def _backdrop(size: int, camera: Camera, sky: np.ndarray, ground: np.ndarray) -> np.ndarray:
    """(size, size, 3) sky over ground, horizon where the camera's pitch puts it (soft edge)."""
    focal = 0.5 / math.tan(math.radians(FOV_DEGREES) / 2.0)
    horizon = 0.5 - math.tan(camera.elevation) * focal  # looking down: horizon above centre
    rows = (np.arange(size) + 0.5) / size
    mix = np.clip((rows - horizon) / 0.08 + 0.5, 0.0, 1.0)[:, None]
    shade = (1.0 - 0.25 * np.abs(rows - horizon))[:, None]  # darker away from the horizon
    column = ((1.0 - mix) * sky + mix * ground) * shade
    return np.broadcast_to(column[:, None, :], (size, size, 3)).copy()


def _dot(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise ``v . w`` for (N, 3) ``v`` and one 3-vector ``w``, as explicit products: no
    BLAS kernel choice can change a pixel, and it beats a sum over a length-3 axis."""
    w = np.asarray(w, dtype=v.dtype)
    return v[:, 0] * w[0] + v[:, 1] * w[1] + v[:, 2] * w[2]


def render(
    surface: Surface,
    camera: Camera,
    colour: tuple[float, float, float],
    background: np.ndarray,
    size: int,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """One (size, size, 3) uint8 frame; ``background`` is (size * supersample)^2 x 3 in [0, 1].

    Points are splatted over 2x2 pixels at ``size * supersample``; each pixel keeps its nearest
    point (:func:`_zbuffer`), see-through pixels are closed (:func:`_close_holes`), the winners
    are shaded (:func:`_shade`) and the image is box-filtered down to ``size``.
    """
    full = size * supersample
    eye, (right, up, forward) = camera.basis()
    rel = surface.points - eye.astype(np.float32)
    depth = _dot(rel, forward)
    front = depth > 1e-3
    scale = np.float32(0.5 / math.tan(math.radians(FOV_DEGREES) / 2.0) * full)
    inv = scale / np.where(front, depth, np.float32(1.0))
    ix = np.floor(_dot(rel, right) * inv + np.float32(full / 2 - 0.5)).astype(np.int64)
    iy = np.floor(np.float32(full / 2 - 0.5) - _dot(rel, up) * inv).astype(np.int64)
    winner = _close_holes(_zbuffer(ix, iy, depth, front, full), depth).ravel()
    hit = winner >= 0
    img = np.array(background, dtype=np.float32).reshape(full * full, 3)
    img[hit] = _shade(surface, winner[hit], forward, camera, colour)
    img = img.reshape(full, full, 3)
    blocks = [
        img[i::supersample, j::supersample] for i in range(supersample) for j in range(supersample)
    ]
    img = sum(blocks[1:], blocks[0]) * np.float32(255.0 / len(blocks))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


_INDEX_BITS = 20  # a surface holds fewer than 2**20 points


def _zbuffer(
    ix: np.ndarray, iy: np.ndarray, depth: np.ndarray, front: np.ndarray, full: int
) -> np.ndarray:
    """(full, full) index of the nearest point splatted on each pixel (2x2 splats), -1 where
    none. The key packs depth (fixed point, 2**-24 units) above the point index, so the minimum
    is unique and needs no sort whose tie order could differ between CPUs."""
    n = len(depth)
    if n >= 1 << _INDEX_BITS:
        raise ValueError(f"at most {(1 << _INDEX_BITS) - 1} points, got {n}")
    fixed = np.round(np.clip(depth.astype(np.float64), 0.0, 255.0) * (1 << 24)).astype(np.int64)
    key = (fixed << _INDEX_BITS) | np.arange(n, dtype=np.int64)
    empty = np.iinfo(np.int64).max
    best = np.full(full * full, empty, dtype=np.int64)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        x, y = ix + dx, iy + dy
        ok = front & (x >= 0) & (x < full) & (y >= 0) & (y < full)
        np.minimum.at(best, y[ok] * full + x[ok], key[ok])
    winner = np.where(best == empty, -1, best & ((1 << _INDEX_BITS) - 1))
    return winner.reshape(full, full)


def _close_holes(
    winner: np.ndarray, depth: np.ndarray, gap: float = 0.1, passes: int = 2
) -> np.ndarray:
    """Give a pixel its nearest neighbour's point where 5+ of its 8 neighbours are nearer by
    ``gap`` (unit-sphere units): a gap in the front surface showing the back or the backdrop.
    An edge pixel has at most 3-4 such neighbours, so silhouettes barely grow; a second pass
    closes the gaps two pixels wide (a unit sphere filling the frame: 10% of its pixels
    see through before, 0.03% after)."""
    h, w = winner.shape
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for _ in range(passes):
        d = np.where(winner >= 0, depth[np.maximum(winner, 0)], np.float32(np.inf))
        pad_d = np.pad(d, 1, constant_values=np.inf)
        near_d = np.stack([pad_d[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in shifts])
        holes = np.flatnonzero(np.count_nonzero(near_d < d - np.float32(gap), axis=0) >= 5)
        if not len(holes):
            break
        ys, xs = np.divmod(holes, w)
        pick = np.argmin(near_d.reshape(len(shifts), -1)[:, holes], axis=0)  # first on ties
        offset = np.asarray(shifts)[pick]
        pad_w = np.pad(winner, 1, constant_values=-1)
        winner = winner.copy()
        winner.flat[holes] = pad_w[1 + ys + offset[:, 0], 1 + xs + offset[:, 1]]
    return winner


def _shade(
    surface: Surface,
    idx: np.ndarray,
    forward: np.ndarray,
    camera: Camera,
    colour: tuple[float, float, float],
) -> np.ndarray:
    """Colours of points ``idx``: 0.3 ambient + 0.7 Lambert + 0.25 Blinn-Phong (exponent 24),
    the view direction taken as the camera axis (45 degree field: close enough), normals turned
    towards the camera."""
    normal = surface.normals[idx]
    view = -forward
    light = _unit(np.asarray(camera.light, dtype=np.float64))
    side = np.where(_dot(normal, view) < 0, np.float32(-1.0), np.float32(1.0))
    lambert = np.clip(side * _dot(normal, light), 0.0, None)
    spec = np.clip(side * _dot(normal, _unit(light + view)), 0.0, None) ** 24
    albedo = surface.colours[idx] if surface.colours is not None else np.asarray(colour)
    lit = albedo * (0.3 + 0.7 * lambert)[:, None] + 0.25 * spec[:, None]
    return np.clip(lit, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- items
def _palette(rng: np.random.Generator) -> tuple[tuple[float, float, float], np.ndarray, np.ndarray]:
    """(object colour, sky, ground): a saturated random hue; pale sky and a darker ground."""
    colour = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.35, 0.8), rng.uniform(0.65, 0.95))
    sky = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.85, 1)))
    ground = np.array(
        colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.55))
    )
    return colour, sky, ground


def _light(azimuth: float, elevation: float) -> tuple[float, float, float]:
    ce = math.cos(elevation)
    return (ce * math.sin(azimuth), math.sin(elevation), ce * math.cos(azimuth))


def orbit_cameras(
    rng: np.random.Generator, frames: int = CLIP_FRAMES, facing: float | None = None
) -> list[Camera]:
    """A seeded camera path (see the module docstring), eased in and out; around a one-sided
    scan (``facing``), a 30-60 degree arc on its scanned side."""
    if facing is None:
        az0 = rng.uniform(0.0, 2.0 * math.pi)
        sweep = rng.uniform(math.pi / 2, math.pi) * rng.choice([-1.0, 1.0])
    else:
        sweep = math.radians(rng.uniform(30.0, 60.0)) * rng.choice([-1.0, 1.0])
        az0 = facing + rng.uniform(-0.2, 0.2) - sweep / 2
    el0 = math.radians(rng.uniform(-5.0, 40.0))
    el1 = float(np.clip(el0 + math.radians(rng.uniform(-25.0, 25.0)), -0.2, 0.95))
    d0 = rng.uniform(2.6, 3.3)
    d1 = d0 * rng.uniform(0.8, 1.2)
    t0, t1 = rng.uniform(-0.12, 0.12, size=3), rng.uniform(-0.12, 0.12, size=3)
    la0 = az0 + rng.uniform(-math.pi / 2, math.pi / 2)
    la1 = la0 + rng.uniform(-math.pi / 2, math.pi / 2)
    lel = math.radians(rng.uniform(20.0, 70.0))
    cams = []
    for t in 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, frames)):
        target = (1.0 - t) * t0 + t * t1
        cams.append(
            Camera(
                azimuth=az0 + t * sweep,
                elevation=(1.0 - t) * el0 + t * el1,
                distance=(1.0 - t) * d0 + t * d1,
                target=(float(target[0]), float(target[1]), float(target[2])),
                light=_light((1.0 - t) * la0 + t * la1, lel),
            )
        )
    return cams


def orbit_frames(
    surface: Surface, rng: np.random.Generator, frames: int = CLIP_FRAMES, size: int = CLIP_SIZE
) -> list[np.ndarray]:
    """A clip of ``frames`` (size, size, 3) uint8 frames of one seeded camera path."""
    colour, sky, ground = _palette(rng)
    full = size * SUPERSAMPLE
    return [
        render(surface, cam, colour, _backdrop(full, cam, sky, ground), size)
        for cam in orbit_cameras(rng, frames, surface.facing)
    ]


def view_image(surface: Surface, rng: np.random.Generator, size: int = VIEW_SIZE) -> np.ndarray:
    """One still from a random camera, colour and light."""
    colour, sky, ground = _palette(rng)
    spread = (0.0, 2.0 * math.pi) if surface.facing is None else (-0.6, 0.6)
    cam = Camera(
        azimuth=(surface.facing or 0.0) + rng.uniform(*spread),
        elevation=math.radians(rng.uniform(-5.0, 40.0)),
        distance=rng.uniform(2.6, 3.3),
        light=_light(rng.uniform(0.0, 2.0 * math.pi), math.radians(rng.uniform(20.0, 70.0))),
    )
    return render(surface, cam, colour, _backdrop(size * SUPERSAMPLE, cam, sky, ground), size)


def _rendered_items(
    out: Path,
    seed: int,
    per_label: int,
    points: int,
    make: Callable[[Surface, np.random.Generator, Path], str],
) -> list[tuple[str, str, int, str]]:
    """Render ``per_label`` items per label, spread over the label's meshes (like the point
    clouds), from ``points`` surface samples per mesh: (mesh key, label, index, rel path) per
    item. ``make`` writes one item and returns its path relative to ``out``."""
    files = meshes._mesh_files(out)
    count = Counter(label for _, _, label in files)
    made = []
    try:
        for key, local, label in files:
            rel_src = key.split(":", 1)[1]
            surface = mesh_surface(
                meshes._load_geometry(local),
                seeded_rng(seed, "surface", key),
                up=UP_AXIS.get(rel_src, "+y"),
                n=points,
            )
            stem = f"{label}/{slug(Path(rel_src).stem)}"
            for k in range(math.ceil(per_label / count[label])):
                rel = make(surface, seeded_rng(seed, "render", key, k), Path(f"{stem}-{k:02d}"))
                made.append((key, label, k, rel))
    finally:
        shutil.rmtree(out / "scratch", ignore_errors=True)
    return made


NOTE = (
    "renderings of the meshes dataset's meshes by a numpy point-splatting rasteriser, with a "
    "seeded camera, colour and light per item; items of one mesh are split per item (most "
    "labels have one mesh), so val/test items are new views of meshes also seen in train: "
    "recognition, not unseen-shape generalisation"
)


@register_dataset(
    "mesh_clips", "video", (meshes.CGAL_SOURCE, meshes.PYBULLET_SOURCE), "orbiting-camera " + NOTE
)
def build_mesh_clips(out: Path, seed: int) -> list[Item]:
    def make(surface: Surface, rng: np.random.Generator, stem: Path) -> str:
        rel = f"videos/{stem}.mp4"
        _write_mp4(orbit_frames(surface, rng, CLIP_FRAMES), out / rel, fps=CLIP_FPS)
        return rel

    return [
        Item(
            f"mesh_clips/{key}#{k}",
            rel,
            "video",
            label,
            f"a video of a {label}, the camera circling around it",
            {"mesh": key, "motion": "orbit"},
        )
        for key, label, k, rel in _rendered_items(out, seed, CLIPS_PER_LABEL, SURFACE_POINTS, make)
    ]


@register_dataset(
    "mesh_views", "image", (meshes.CGAL_SOURCE, meshes.PYBULLET_SOURCE), "still " + NOTE
)
def build_mesh_views(out: Path, seed: int) -> list[Item]:
    from PIL import Image

    def make(surface: Surface, rng: np.random.Generator, stem: Path) -> str:
        rel = f"images/{stem}.png"
        save_png(Image.fromarray(view_image(surface, rng)), out / rel)
        return rel

    return [
        Item(
            f"mesh_views/{key}#{k}", rel, "image", label, f"a rendering of a {label}", {"mesh": key}
        )
        for key, label, k, rel in _rendered_items(out, seed, VIEWS_PER_LABEL, VIEW_POINTS, make)
    ]
