"""The search report: ``search.json`` (every candidate), ``search.md`` (the table) and
``search.png`` (accuracy against lambda), written as one folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mmcompose.compose.search_loop import SearchResult, fmt_num, fmt_vec

SEARCH_DIR = "search"  # the report's folder inside the composed model


def write_search_report(
    result: SearchResult, folder: str | Path, *, force: bool = False
) -> dict[str, Path]:
    """``folder/search.json`` (every candidate), ``search.md`` (the table), ``search.png``
    (the curve), written atomically as one folder."""
    from mmcompose.fs import atomic_dir

    folder = Path(folder)
    with atomic_dir(folder, overwrite=force) as tmp:
        text = json.dumps(result.to_json_dict(), indent=2, default=str) + "\n"
        (tmp / "search.json").write_text(text)
        (tmp / "search.md").write_text(result.to_markdown())
        plot_search(result, tmp / "search.png")
    return {k: folder / f"search.{k}" for k in ("json", "md", "png")}


def plot_search(result: SearchResult, path: str | Path) -> None:
    """Accuracy against lambda. Coordinate: one line per (source, pass) sweep. Grid: a
    heatmap for two sources, else per source the best accuracy over the other lambdas."""
    from matplotlib.figure import Figure  # Agg through savefig; no pyplot global state

    names = result.source_names()
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ylabel = result.metric or "score"
    best = result.best
    valid = [c for c in result.candidates if c.accuracy is not None]
    if result.method == "grid" and len(names) == 2:
        grid = list(result.grid)
        order = sorted(range(len(grid)), key=lambda i: grid[i])
        acc = {c.weights: c.accuracy for c in valid}
        mat = [[acc.get((grid[i], grid[j]), math.nan) for j in order] for i in order]
        im = ax.imshow(mat, origin="lower", cmap="viridis", aspect="auto")
        labels = [fmt_num(grid[i]) for i in order]
        ax.set_xticks(range(len(order)), labels)
        ax.set_yticks(range(len(order)), labels)
        ax.set_xlabel(f"lambda {names[1]}")
        ax.set_ylabel(f"lambda {names[0]}")
        fig.colorbar(im, ax=ax, label=ylabel)
        bi, bj = (sorted(grid).index(w) for w in best.weights)
        ax.plot([bj], [bi], marker="*", color="red", markersize=14, linestyle="none")
    elif result.method == "grid":
        for m, name in enumerate(names):
            xs = sorted(result.grid)
            ys = [max((c.accuracy for c in valid if c.weights[m] == x), default=math.nan)
                  for x in xs]  # fmt: skip
            ax.plot(xs, ys, marker="o", label=f"{name} (best over the others)")
        ax.set_xlabel("lambda")
    else:
        styles = ("-", "--", ":")
        for (p, m), pts in _sweeps(result).items():
            pts = sorted(pts)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{m % 10}",
                    linestyle=styles[(p - 1) % 3], label=f"{names[m]}, pass {p}")  # fmt: skip
        if best.swept is not None:
            ax.plot([best.weights[best.swept]], [best.accuracy], marker="*", color="red",
                    markersize=14, linestyle="none", label="best")  # fmt: skip
        ax.set_xlabel("lambda of the swept source (others fixed)")
    if not (result.method == "grid" and len(names) == 2):
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    ax.set_title(
        f"{result.method} search; best {fmt_vec(best.weights)} -> {fmt_num(best.accuracy)}",
        fontsize="medium",
    )
    fig.savefig(path, dpi=100)


def _sweeps(result: SearchResult) -> dict[tuple[int, int], list[tuple[float, float]]]:
    out: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for c in result.candidates:
        if c.swept is not None and c.accuracy is not None:
            out.setdefault((c.pass_, c.swept), []).append((c.weights[c.swept], c.accuracy))
    return out
