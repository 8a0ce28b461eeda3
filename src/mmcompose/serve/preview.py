"""A point cloud drawn as a 3D scatter (PNG), so a person sees which shape they uploaded.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, safe in the server's
worker threads) into a PNG: a static image needs no WebGL, which headless browsers and
remote desktops often lack.
"""

from __future__ import annotations

import io

import numpy as np

MAX_POINTS = 4096


def point_cloud_png(points: np.ndarray, size_px: int = 320, seed: int = 0) -> bytes:
    """(N, 3) or (N, 6) points (xyz, rgb in [0, 1]) -> PNG bytes; at most ``MAX_POINTS``
    points are drawn (a seeded subset), coloured by their rgb or else by height."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = np.asarray(points, dtype=np.float32)
    if len(pts) > MAX_POINTS:
        keep = np.random.default_rng(seed).choice(len(pts), MAX_POINTS, replace=False)
        pts = pts[np.sort(keep)]
    xyz = pts[:, :3]
    colour = np.clip(pts[:, 3:6], 0, 1) if pts.shape[1] >= 6 else None
    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    ax.scatter(
        xyz[:, 0], xyz[:, 2], xyz[:, 1],  # y up, as meshes are usually stored
        c=colour if colour is not None else xyz[:, 1],
        cmap=None if colour is not None else "viridis",
        s=2, depthshade=True, linewidths=0,
    )  # fmt: skip
    lo, hi = xyz.min(0), xyz.max(0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 or 1.0
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[2] - half, centre[2] + half)
    ax.set_zlim(centre[1] - half, centre[1] + half)
    ax.set_box_aspect((1, 1, 1))
    ax.set_axis_off()
    fig.subplots_adjust(0, 0, 1, 1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


__all__ = ["MAX_POINTS", "point_cloud_png"]
