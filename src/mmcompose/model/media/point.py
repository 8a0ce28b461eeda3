"""Point clouds: arrays and meshes (sampled over the surface) as float32 points, and the
centre/scale/sample normalisation encoders expect."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh
from torch import Tensor

from mmcompose.errors import MediaError
from mmcompose.model.media.common import POINT_CLOUD_EXTENSIONS, PathLike, _check_file, _corrupt

_MESH_EXTENSIONS = (".ply", ".off", ".obj", ".stl")


# --------------------------------------------------------------------------- point cloud
def sample_points(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points uniformly over the mesh surface (area-weighted faces, uniform barycentric
    coordinates), float32 (n, 3), or (n, 6) with rgb in [0, 1] when the mesh has vertex or
    face colours. Seeded, so the same mesh and seed always give the same points."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    areas = np.asarray(mesh.area_faces, dtype=np.float64)
    total = areas.sum() if areas.size else 0.0
    if not total > 0:
        raise ValueError("mesh has no surface area to sample from")
    rng = np.random.default_rng(seed)
    faces = rng.choice(len(areas), size=n, p=areas / total)
    u, v = rng.random((2, n))
    flip = u + v > 1.0  # reflect into the triangle instead of rejecting: stays uniform
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    tri = np.asarray(mesh.triangles, dtype=np.float64)[faces]
    xyz = tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + v[:, None] * (tri[:, 2] - tri[:, 0])
    kind = getattr(mesh.visual, "kind", None)
    if kind == "vertex":
        vc = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        corners = vc[np.asarray(mesh.faces)[faces]]  # (n, 3 corners, rgb)
        bary = np.stack([1.0 - u - v, u, v], axis=1)[:, :, None]
        return np.hstack([xyz, (corners * bary).sum(axis=1)]).astype(np.float32)
    if kind == "face":
        fc = np.asarray(mesh.visual.face_colors, dtype=np.float64)[faces, :3] / 255.0
        return np.hstack([xyz, fc]).astype(np.float32)
    return xyz.astype(np.float32)


def _validate_points(arr: Any, p: Path) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iuf" or arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise MediaError(
            f"point array in {p} has shape {arr.shape} and dtype {arr.dtype}",
            hint="expected a numeric array shaped (N, 3) xyz or (N, 6) xyz+rgb",
        )
    if arr.shape[0] == 0:
        raise MediaError(f"point cloud file contains no points: {p}", hint="re-export it")
    pts = arr.astype(np.float32)
    if not np.all(np.isfinite(pts)):
        raise MediaError(f"point cloud contains NaN or infinite values: {p}", hint="clean it")
    if pts.shape[1] == 6:
        if pts[:, 3:].max() > 1.0:  # 0-255 colours
            pts[:, 3:] /= 255.0
        pts[:, 3:] = np.clip(pts[:, 3:], 0.0, 1.0)
    return pts


def _load_npy_points(p: Path) -> np.ndarray:
    loaded = np.load(p, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded
    with loaded:
        keys = list(loaded.keys())
        if "points" in keys:
            return loaded["points"]
        if len(keys) == 1:
            return loaded[keys[0]]
        raise MediaError(
            f"cannot tell which array in {p} holds the points (arrays: {', '.join(keys) or 'none'})",
            hint="store it under the key 'points', or save a single array",
        )


def _off_header_counts(p: Path) -> tuple[int, int] | None:
    """(vertices, faces) declared by an OFF header ("OFF" or its variants, then the counts,
    possibly on the same line, comments allowed); None when the header is not plain."""
    tokens: list[str] = []
    with p.open("rb") as f:
        for raw in f:
            tokens += raw.split(b"#", 1)[0].decode("ascii", "replace").split()
            if len(tokens) >= 3:
                break
    if not tokens or not tokens[0].upper().endswith("OFF"):
        return None
    try:
        return int(tokens[1]), int(tokens[2])
    except (IndexError, ValueError):
        return None


def _check_off_counts(p: Path, geom: Any) -> None:
    """OFF declares its vertex and face counts; trimesh reads a file cut short without a
    word, so compare. (Faces can only grow: trimesh splits polygons into triangles.)"""
    declared = _off_header_counts(p)
    if declared is None:
        return
    vertices = len(getattr(geom, "vertices", ()))
    faces = len(getattr(geom, "faces", ()))
    if vertices < declared[0] or faces < declared[1]:
        raise MediaError(
            f"mesh file is truncated: {p} (header declares {declared[0]} vertices and "
            f"{declared[1]} faces, {vertices} and {faces} present)",
            hint="re-download or re-export it",
        )


def load_point_cloud(path: PathLike, num_samples: int = 8192, seed: int = 0) -> np.ndarray:
    """Load points as float32 (N, 3), or (N, 6) with rgb in [0, 1].

    .npy/.npz hold an (N, 3) or (N, 6) array (0-255 colours are rescaled). .ply/.off/.obj/.stl
    go through trimesh: a point cloud (vertices without faces) returns its vertices and any
    colours; a mesh is sampled uniformly over its surface (``num_samples`` points, ``seed``),
    because its vertices are not a uniform sample of the shape.
    """
    p = _check_file(path, "point cloud", POINT_CLOUD_EXTENSIONS)
    suffix = p.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            return _validate_points(_load_npy_points(p), p)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise _corrupt("point cloud", p, exc) from exc  # .npz is a zip: cut short, BadZip
    try:
        geom = trimesh.load(str(p), file_type=suffix[1:], process=False)
        if isinstance(geom, trimesh.Scene):
            geom = geom.to_geometry() if geom.geometry else None
    except Exception as exc:  # trimesh's parsers raise many unrelated exception types
        raise _corrupt("point cloud", p, exc) from exc
    if suffix == ".off":
        _check_off_counts(p, geom)
    if isinstance(geom, trimesh.Trimesh) and len(geom.faces) > 0:
        if not geom.area > 0:
            raise MediaError(f"mesh in {p} has no surface area", hint="check the mesh's faces")
        return sample_points(geom, num_samples, seed)
    if isinstance(geom, trimesh.Trimesh | trimesh.PointCloud) and len(geom.vertices) > 0:
        xyz = np.asarray(geom.vertices, dtype=np.float32)
        colors = (
            np.asarray(geom.colors)
            if isinstance(geom, trimesh.PointCloud)
            else np.asarray(geom.visual.vertex_colors)
            if geom.visual.kind == "vertex"
            else None
        )
        if colors is not None and colors.shape[:1] == xyz.shape[:1]:
            xyz = np.hstack([xyz, colors[:, :3].astype(np.float32) / 255.0])  # uint8 RGBA
        return _validate_points(xyz, p)
    raise MediaError(f"point cloud file contains no points: {p}", hint="re-export it")


def normalize_points(points: np.ndarray | Tensor, num_points: int, seed: int = 0) -> Tensor:
    """Centre at the centroid, scale into the unit sphere, and sample exactly ``num_points``
    rows: without replacement when there are enough, otherwise all points plus seeded
    resamples. Normalising on the full cloud keeps the scale independent of the sample."""
    if num_points <= 0:
        raise ValueError(f"num_points must be positive, got {num_points}")
    arr = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise MediaError(f"expected points shaped (N, C>=3), got {arr.shape}")
    if arr.shape[0] == 0:
        raise MediaError("point cloud contains no points")
    pts = arr.astype(np.float64)
    if not np.all(np.isfinite(pts[:, :3])):
        raise MediaError("point cloud contains NaN or infinite coordinates")
    pts[:, :3] -= pts[:, :3].mean(axis=0)
    radius = np.linalg.norm(pts[:, :3], axis=1).max()
    if radius > 0:
        pts[:, :3] /= radius
    rng = np.random.default_rng(seed)
    n = pts.shape[0]
    if n >= num_points:
        idx = rng.choice(n, size=num_points, replace=False)
    else:
        idx = np.concatenate([np.arange(n), rng.choice(n, size=num_points - n, replace=True)])
    return torch.from_numpy(pts[idx].astype(np.float32))
