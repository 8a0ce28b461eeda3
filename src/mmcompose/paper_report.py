"""The reproduction's report: the paper's table over several training seeds, its claims with
paired tests, the retention table, a chart.

Every cell is the accuracy over seeds and test items (the same items for every seed) with
its 95% interval (:func:`mmcompose.bench.stats.accuracy_interval`: the bootstrap over items
and seeds; Wilson for one seed). Each claim is a paired bootstrap on the same items and seeds
(:func:`~mmcompose.bench.stats.paired_bootstrap`, two-sided p), and "holds" only at
p < 0.05 (:class:`mmcompose.report.Claim`). Retention is the paired bootstrap of the ratio
(:func:`~mmcompose.bench.stats.retention`).

Everything the markdown shows comes from one JSON document (``results.json``), so
``report.md`` and the docs section (:func:`render_section`, ``mmcompose reproduce render``)
are the same rendering of the same numbers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcompose.report import ALPHA, KEEP, N_BOOT, Claim, format_p

if TYPE_CHECKING:
    from mmcompose.quickstart import Evaluation, Job
    from mmcompose.report import Row

__all__ = [
    "FORMAT",
    "PaperReport",
    "build_doc",
    "column_label",
    "gap_growth",
    "render_chart",
    "render_markdown",
    "render_section",
    "write_paper_report",
]

FORMAT = 1
TEST = "paired bootstrap over items and seeds"
COMPOSITIONS = ("NaiveMC", "DAMC")
STRATEGY = {"NaiveMC": "shared", "DAMC": "decoupled"}  # whose singles each one composes


@dataclass
class PaperReport:
    out_dir: Path
    doc: dict[str, Any]

    @property
    def claims(self) -> list[dict[str, Any]]:
        return self.doc["claims"]


def column_label(column: str) -> str:
    """``mini-MCUB IAVP`` -> ``MCUB-4``, ``mini-MCUB IAV`` -> ``MCUB-3 IAV``; test columns
    as they are."""
    if not column.startswith("mini-MCUB "):
        return column
    letters = column.split(" ", 1)[1]
    return "MCUB-4" if len(letters) == 4 else f"MCUB-{len(letters)} {letters}"


def _matrix(by_seed: dict[int, list[Row]], name: str, column: str) -> np.ndarray | None:
    """(seeds, items) 0/1 of one row's column over every seed; None unless each has it."""
    vectors = []
    for seed in sorted(by_seed):
        row = next((r for r in by_seed[seed] if r.name == name), None)
        v = row.correct.get(column) if row is not None else None
        if not v:
            return None
        vectors.append(v)
    if len({len(v) for v in vectors}) != 1:
        raise ValueError(f"{name} / {column}: the seeds were scored on different items")
    return np.asarray(vectors, dtype=np.float64)


def _cell(m: np.ndarray) -> dict[str, Any]:
    from mmcompose.bench.stats import accuracy_interval

    iv = accuracy_interval(m, n_boot=N_BOOT, seed=0)
    return {
        "mean": iv.estimate,
        "low": iv.low,
        "high": iv.high,
        "interval": iv.method,
        "items": int(m.shape[1]),
        "per_seed": [float(x) for x in m.mean(axis=1)],
    }


def gap_growth(
    full: tuple[np.ndarray, np.ndarray],
    subsets: Sequence[tuple[np.ndarray, np.ndarray]],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """How much larger a's lead over b is on the full set than on the subsets (mean of
    their leads): (observed, 95% low, high, two-sided p). The sets hold different items,
    drawn independently per replicate; the seeds are drawn once per replicate for every set
    (seed s's models are the same in every set). p as
    :func:`~mmcompose.bench.stats.paired_bootstrap` computes it (shifted to the null)."""
    rng = np.random.default_rng(seed)
    s = full[0].shape[0]
    seeds = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), np.int64)

    def lead(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
        diff = (a - b).astype(np.int64)  # (seeds, items) in {-1, 0, 1}
        n = diff.shape[1]
        items = rng.integers(0, n, size=(n_boot, n))
        per_seed = diff[:, items].sum(axis=2)  # (seeds, n_boot)
        total = np.take_along_axis(per_seed, seeds.T, axis=0).sum(axis=0)
        return float(diff.mean()), total / (s * n)

    obs4, rep4 = lead(*full)
    subs = [lead(*x) for x in subsets]
    observed = obs4 - float(np.mean([o for o, _ in subs]))
    reps = rep4 - np.mean([r for _, r in subs], axis=0)
    p = (1 + int((np.abs(reps - observed) >= abs(observed) - 1e-12).sum())) / (n_boot + 1)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return observed, float(lo), float(hi), min(1.0, p)


def _paired(claim: str, a: np.ndarray, b: np.ndarray, detail: str) -> Claim:
    from mmcompose.bench.stats import paired_bootstrap

    r = paired_bootstrap(a, b, n_boot=N_BOOT, seed=0)
    spread = f"difference {100 * r.difference:+.1f} [{100 * r.low:+.1f}, {100 * r.high:+.1f}]"
    return Claim(claim, r.difference > 0, f"{detail}; {spread}", r.p, TEST)


def _claims(
    by_seed: dict[int, list[Row]], singles: list[str], mcub: list[str], tests: list[str]
) -> tuple[list[Claim], list[dict[str, Any]]]:
    """The paper's claims on every MCUB column, the ablations, the gap, and retention."""
    from mmcompose.bench.stats import retention
    from mmcompose.quickstart import FIXED, SEARCHED_NAIVE

    def m(name: str, col: str) -> np.ndarray | None:
        return _matrix(by_seed, name, col)

    def pc(x: np.ndarray) -> str:
        return f"{100 * x.mean():.1f}"

    out: list[Claim] = []
    for col in mcub:
        label = column_label(col)
        d, n = m("DAMC", col), m("NaiveMC", col)
        here = [(s, x) for s in singles if (x := m(s, col)) is not None]
        if d is None or n is None or not here:
            continue
        best, bx = max(here, key=lambda t: t[1].mean())
        for comp, x in (("NaiveMC", n), ("DAMC", d)):
            what = f"{comp} beats the best single-modality model on {label}"
            out.append(_paired(what, x, bx, f"{pc(x)} vs {best} {pc(bx)}"))
        out.append(_paired(f"DAMC beats NaiveMC on {label}", d, n, f"{pc(d)} vs {pc(n)}"))
    full = mcub[0] if mcub else None
    d = m("DAMC", full) if full else None
    for other, why in ((FIXED, "the lambda search"), (SEARCHED_NAIVE, "decoupled training")):
        x = m(other, full) if full else None
        if d is not None and x is not None:
            what = f"DAMC beats {other} on {column_label(full)} ({why} helps)"
            out.append(_paired(what, d, x, f"{pc(d)} vs {pc(x)}"))
    out += _method_claims(m, singles, full)
    pairs = [(m("DAMC", c), m("NaiveMC", c)) for c in mcub]
    if len(mcub) > 1 and all(a is not None and b is not None for a, b in pairs):
        obs, lo, hi, p = gap_growth(pairs[0], pairs[1:])  # type: ignore[arg-type]
        out.append(
            Claim(
                f"DAMC's lead over NaiveMC grows with the modalities ({column_label(full)} vs "
                "the mean of the subsets)",
                obs > 0,
                f"lead larger by {100 * obs:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                p,
                "bootstrap over items (per set) and seeds",
            )
        )
    kept: list[dict[str, Any]] = []
    strategy = {**STRATEGY, **dict.fromkeys(_method_rows(), "shared")}
    for comp in strategy:
        ratios, ps, parts = [], [], []
        for col in tests:
            modality = col.split(" ", 1)[0]
            x, y = m(comp, col), m(f"{modality}-{strategy[comp]}", col)
            if x is None or y is None:
                continue
            r = retention(x, y, threshold=KEEP, n_boot=N_BOOT, seed=0)
            kept.append(
                {
                    "composition": comp,
                    "modality": modality,
                    "ratio": r.ratio,
                    "low": r.low,
                    "high": r.high,
                    "p_below": r.p_below,
                }
            )
            ratios.append(r.ratio)
            ps.append(r.p_below)
            parts.append(f"{modality} {100 * r.ratio:.0f}% [{100 * r.low:.0f}, {100 * r.high:.0f}]")
        if ratios:
            out.append(
                Claim(
                    f"{comp} keeps >= {100 * KEEP:.0f}% of each source's own-modality accuracy",
                    all(r >= KEEP for r in ratios),
                    ", ".join(parts),
                    max(ps),
                    f"bootstrap, one-sided for < {100 * KEEP:.0f}%, largest",
                )
            )
    return out, kept


def _method_rows() -> tuple[str, ...]:
    """MMER, TIES, DARE, the label-free search (:mod:`mmcompose.job_methods`)."""
    from mmcompose.job_methods import METHOD_ROWS

    return METHOD_ROWS


def _method_claims(m: Any, singles: list[str], full: str | None) -> list[Claim]:
    """Each method row against the best single-modality model and against NaiveMC on the
    job's whole MCUB set (rows the run does not have are left out)."""
    if full is None:
        return []
    label = column_label(full)
    naive = m("NaiveMC", full)
    here = [(s, x) for s in singles if (x := m(s, full)) is not None]
    out: list[Claim] = []
    for row in _method_rows():
        x = m(row, full)
        if x is None:
            continue
        if here:
            best, bx = max(here, key=lambda t: t[1].mean())
            what = f"{row} beats the best single-modality model on {label}"
            detail = f"{100 * x.mean():.1f} vs {best} {100 * bx.mean():.1f}"
            out.append(_paired(what, x, bx, detail))
        if naive is not None:
            detail = f"{100 * x.mean():.1f} vs {100 * naive.mean():.1f}"
            out.append(_paired(f"{row} beats NaiveMC on {label}", x, naive, detail))
    return out


def build_doc(job: Job, ev: Evaluation, info: dict[str, Any]) -> dict[str, Any]:
    """The run's numbers as ``results.json`` holds them (every rendering reads only this)."""
    n_mod = len(job.modalities)
    tests, mcub = ev.columns[:n_mod], ev.columns[n_mod:]
    cols = [*mcub, *tests]  # the paper's order: MCUB-4, the MCUB-3 subsets, the test splits
    first = ev.by_seed[min(ev.by_seed)]
    names = [r.name for r in first]
    kinds = {r.name: r.kind for r in first}
    rows = []
    for name in names:
        cells: dict[str, Any] = {}
        for col in cols:
            x = _matrix(ev.by_seed, name, col)
            cells[col] = None if x is None else _cell(x)
            g = _matrix(ev.by_seed, name, f"{col} gen")
            if cells[col] is not None and g is not None:
                cells[col]["generate"] = _cell(g)
        rows.append({"name": name, "kind": kinds[name], "cells": cells})
    singles = [n for n in names if kinds[n] == "single"]
    claims, kept = _claims(ev.by_seed, singles, mcub, tests)
    return {
        "format": FORMAT,
        "kind": "mmcompose reproduce composition",
        "modalities": list(job.modalities),
        "seeds": sorted(ev.by_seed),
        "alpha": ALPHA,
        "columns": [{"key": c, "label": column_label(c)} for c in cols],
        "rows": rows,
        "claims": [c.as_dict() for c in claims],
        "retention": kept,
        "per_item": {str(s): {r.name: r.correct for r in rows_} for s, rows_ in ev.by_seed.items()},
        "timings_s": dict(job.timings),
        "setup": info,
    }


# ----------------------------------------------------------------------------- rendering
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "—"
    return f"{_pct(cell['mean'])} [{_pct(cell['low'])}, {_pct(cell['high'])}]"


def _table(doc: dict[str, Any], pick: Any) -> list[str]:
    cols = doc["columns"]
    lines = [
        "| model | " + " | ".join(c["label"] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in doc["rows"]:
        name = r["name"] if r["kind"] == "single" else f"**{r['name']}**"
        lines.append(f"| {name} | " + " | ".join(pick(r["cells"][c["key"]]) for c in cols) + " |")
    return lines


def render_section(doc: dict[str, Any]) -> str:
    """The results as markdown (no heading of its own): setup, the table by log-likelihood
    and by generation, the claims with their p-values, retention, the time. A function of
    ``doc`` alone: the same document always renders to the same text."""
    seeds = doc["seeds"]
    setup = doc.get("setup", {})
    budget = setup.get("budget", {})
    items = {c["label"]: None for c in doc["columns"]}
    for r in doc["rows"]:
        for c in doc["columns"]:
            cell = r["cells"][c["key"]]
            if cell is not None:
                items[c["label"]] = cell["items"]
    cells = [c for r in doc["rows"] for c in r["cells"].values() if c is not None]
    method = cells[0]["interval"] if cells else "none"
    out = [
        f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); every seed trains each "
        "single-modality model from that seed. Test items per column: "
        + ", ".join(f"{k} {v}" for k, v in items.items() if v is not None)
        + f" (the same items for every seed); lambda search on {budget.get('search_limit')} "
        f"validation items per set. Accuracy (%) over seeds and items, [95% interval] "
        f"({method}); "
        "a single-modality model sees only its own input of each MCUB item; — : not "
        "applicable or not measured.",
        "",
        *_methods_note(doc),
        "By log-likelihood (of each option's text; of each label for the test splits):",
        "",
        *_table(doc, _cell_text),
    ]
    if any(
        cell is not None and "generate" in cell for r in doc["rows"] for cell in r["cells"].values()
    ):
        out += [
            "",
            "By generation (greedy; MCUB: the option letter parsed from the answer, no letter "
            "counts as wrong; test splits: the label as the answer):",
            "",
            *_table(doc, lambda cell: _cell_text(cell.get("generate") if cell else None)),
        ]
    held = [c for c in doc["claims"] if c["holds"]]
    out += [
        "",
        f"The paper's claims on this run ({len(held)} of {len(doc['claims'])} hold at "
        f"p < {doc['alpha']}):",
        "",
    ]
    for c in doc["claims"]:
        p = "" if c["p"] is None else f"; {c['test']} p = {format_p(c['p'])}"
        out.append(f"- **{c['verdict']}**: {c['claim']} ({c['detail']}{p})")
    out += [
        "",
        '"holds": the test gives p < 0.05; "holds within noise": the numbers go the claimed '
        'way but the test cannot tell them from chance; "does not hold": they go the other way.',
    ]
    if doc["retention"]:
        mods = list(dict.fromkeys(k["modality"] for k in doc["retention"]))
        comps = list(dict.fromkeys(k["composition"] for k in doc["retention"]))
        by = {(k["composition"], k["modality"]): k for k in doc["retention"]}
        out += [
            "",
            "Retention: each composition's accuracy on a source's own test split over the "
            "source's (same items and seeds), [95% interval]:",
            "",
            "| composition | " + " | ".join(mods) + " |",
            "|---|" + "---|" * len(mods),
        ]
        for comp in comps:
            cells = []
            for mod in mods:
                k = by.get((comp, mod))
                cells.append(
                    "—"
                    if k is None
                    else f"{100 * k['ratio']:.0f}% [{100 * k['low']:.0f}, {100 * k['high']:.0f}]"
                )
            out.append(f"| {comp} | " + " | ".join(cells) + " |")
    t = doc.get("timings_s", {})
    if t:
        out += ["", "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())]
    return "\n".join(out) + "\n"


def _methods_note(doc: dict[str, Any]) -> list[str]:
    """What the method rows are, when the run has them."""
    if not {r["name"] for r in doc["rows"]} & set(_method_rows()):
        return []
    grid = doc.get("setup", {}).get("budget", {}).get("unlabelled_grid") or []
    return [
        "MMER, TIES and DARE compose the shared (NaiveMC) sources without training: TIES keeps "
        "the top 20% of each LoRA delta, elects signs and averages what agrees; MMER adds a "
        "binary mask per modality over that merged delta (TALL's rule, mask_lambda 1); DARE "
        "drops half of each delta at random, rescales the rest and averages. NaiveMC + "
        "label-free search: task arithmetic with the lambdas chosen by AdaMMS's generation "
        "consistency on the same validation questions without their answers (grid "
        + ", ".join(f"{g:g}" for g in grid)
        + ").",
        "",
    ]


def render_markdown(doc: dict[str, Any]) -> str:
    return "# mmcompose reproduce composition\n\n" + render_section(doc)


def render_chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = doc["columns"]
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(14, 5))
    width = 0.84 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, c in enumerate(cols):
            cell = r["cells"][c["key"]]
            if cell is None:
                continue
            xs.append(j + i * width)
            ys.append(100 * cell["mean"])
            lo.append(100 * (cell["mean"] - cell["low"]))
            hi.append(100 * (cell["high"] - cell["mean"]))
        ax.bar(
            xs,
            ys,
            width,
            yerr=[lo, hi],
            capsize=1.5,
            label=r["name"],
            hatch="//" if r["kind"] == "composed" else None,
        )
    ax.set_xticks([j + 0.42 - width / 2 for j in range(len(cols))], [c["label"] for c in cols])
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(ncol=6, fontsize=7)
    ax.set_title(f"single-modality models vs compositions, {len(doc['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_paper_report(
    job: Job, ev: Evaluation, info: dict[str, Any], search_report: Path | None
) -> PaperReport:
    """The folder at ``job.out_dir``, replaced as a whole: ``results.json``, ``report.md``,
    ``chart.png`` and ``lambda_search/`` (the first seed's DAMC on all modalities)."""
    from mmcompose.fs import atomic_dir

    doc = build_doc(job, ev, info)
    with atomic_dir(job.out_dir, overwrite=True) as tmp:
        text = json.dumps(doc, indent=1, default=str, sort_keys=False) + "\n"
        (tmp / "results.json").write_text(text)
        (tmp / "report.md").write_text(render_markdown(json.loads(text)))
        render_chart(doc, tmp / "chart.png")
        if search_report is not None and search_report.is_dir():
            shutil.copytree(search_report, tmp / "lambda_search")
    return PaperReport(job.out_dir, doc)
