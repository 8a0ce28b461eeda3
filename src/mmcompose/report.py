"""The report of a composition run (``mmcompose quickstart``): the table of single-modality
models and compositions, the paper's claims checked on it, and the report folder (markdown,
results JSON in lm-evaluation-harness's layout, PNG chart, the lambda search)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "QuickstartReport",
    "Row",
    "check_claims",
    "format_cell",
    "pct",
    "render_chart",
    "render_markdown",
    "write_report",
]


@dataclass
class Row:
    """One model's line in the results table: accuracy per task (None: not applicable)."""

    name: str
    kind: str  # "single" or "composed"
    scores: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)


@dataclass
class QuickstartReport:
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    claims: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def format_cell(row: Row, column: str, stderr: bool = False) -> str:
    """One table cell in %: "—" where not applicable, ± the standard error if asked, the
    generation accuracy in brackets when it was measured."""
    v = row.scores.get(column)
    if v is None:
        return "—"
    se = row.stderr.get(column)
    cell = f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if stderr and se == se and se else "")
    g = row.scores.get(f"{column} gen")
    return cell + (f" ({100 * g:.1f})" if g is not None else "")


def check_claims(
    rows: list[Row], columns: list[str], modalities: Sequence[str]
) -> list[tuple[str, bool, str]]:
    """The paper's three claims, checked on this run's numbers: ``columns`` are each
    modality's own test split in ``modalities`` order, then mini-MCUB; ``rows`` hold the
    single models ``<modality>-shared`` / ``-decoupled`` and the compositions NaiveMC, DAMC."""
    by = {r.name: r for r in rows}
    mcub = columns[-1]
    out = []
    singles = [r for r in rows if r.kind == "single"]
    best_single = max(singles, key=lambda r: r.scores[mcub] or 0.0)
    for comp in ("NaiveMC", "DAMC"):
        c = by[comp].scores[mcub] or 0.0
        out.append(
            (
                f"{comp} beats every single-modality model on mini-MCUB",
                c > (best_single.scores[mcub] or 0.0),
                f"{pct(c)} vs best single {best_single.name} {pct(best_single.scores[mcub])}",
            )
        )
    d, n = by["DAMC"].scores[mcub] or 0.0, by["NaiveMC"].scores[mcub] or 0.0
    out.append(("DAMC >= NaiveMC on mini-MCUB", d >= n, f"{pct(d)} vs {pct(n)}"))
    for comp, strategy in (("NaiveMC", "shared"), ("DAMC", "decoupled")):
        worst = []
        for m, col in zip(modalities, columns, strict=False):
            src = by[f"{m}-{strategy}"].scores[col] or 0.0
            kept = (by[comp].scores[col] or 0.0) / src if src else float("nan")
            worst.append((kept, m))
        ok = all(k >= 0.95 for k, _ in worst)
        detail = ", ".join(f"{m} {100 * k:.0f}%" for k, m in worst)
        out.append((f"{comp} keeps >= 95% of each source's own-modality accuracy", ok, detail))
    return out


def render_markdown(report: QuickstartReport) -> str:
    cols = report.columns
    lines = [
        "# mmcompose quickstart",
        "",
        "Accuracy (%) by log-likelihood over the label set (classification, test split) and "
        "over the four options (mini-MCUB); ± is the standard error. "
        "Generation accuracy in brackets.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in report.rows:
        cells = [format_cell(r, c, stderr=True) for c in cols]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims on this run", ""]
    for claim, ok, detail in report.claims:
        lines.append(f"- {'holds' if ok else 'does not hold'}: {claim} ({detail})")
    lines += ["", "## Time (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in report.timings.items()]
    return "\n".join(lines) + "\n"


def render_chart(report: QuickstartReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = report.columns
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(report.rows)
    for i, r in enumerate(report.rows):
        xs = [j + i * width for j, c in enumerate(cols) if r.scores.get(c) is not None]
        ys = [100 * r.scores[c] for c in cols if r.scores.get(c) is not None]
        ax.bar(xs, ys, width, label=r.name, hatch="//" if r.kind == "composed" else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("single-modality models vs compositions (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    report: QuickstartReport,
    results: dict[str, dict[str, dict]],
    search_report: Path | None,
    info: dict[str, Any],
) -> None:
    """The folder at ``report.out_dir``, replaced as a whole: ``results/<model>/`` per model
    (``results`` maps model -> task -> metrics block with the item count ``n``),
    ``results.json``, ``report.md``, ``chart.png`` and ``lambda_search/``."""
    from mmcompose.bench.results import write_results
    from mmcompose.fs import atomic_dir

    with atomic_dir(report.out_dir, overwrite=True) as tmp:
        for name, blocks in results.items():
            write_results(
                tmp / "results" / name,
                {t: {k: v for k, v in b.items() if k != "n"} for t, b in blocks.items()},
                {t: {"task": t, **info} for t in blocks},
                {t: int(b.get("n", 0)) for t, b in blocks.items()},
                {"model": "mmcompose", "model_args": f"name={name}", "device": "cpu"},
            )
        doc = {
            "columns": report.columns,
            "rows": [r.__dict__ for r in report.rows],
            "claims": [{"claim": c, "holds": ok, "detail": d} for c, ok, d in report.claims],
            "timings_s": report.timings,
            "setup": info,
        }
        (tmp / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        render_chart(report, tmp / "chart.png")
        if search_report is not None and search_report.is_dir():
            shutil.copytree(search_report, tmp / "lambda_search")
