"""The report of a composition run (``mmcompose quickstart``): the table of single-modality
models and compositions, the paper's claims checked on it, and the report folder (markdown,
results JSON in lm-evaluation-harness's layout, PNG chart, the lambda search). With several
seeds the reproduction's report (:mod:`mmcompose.paper_report`) uses the :class:`Claim` here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Claim",
    "QuickstartReport",
    "Row",
    "check_claims",
    "format_cell",
    "format_p",
    "pct",
    "render_chart",
    "render_markdown",
    "write_report",
]


_NOT_METRICS = ("n", "per_item")  # evaluation block keys that are not lm-eval metrics


@dataclass
class Row:
    """One model's line in the results table: accuracy per task (None: not applicable)."""

    name: str
    kind: str  # "single" or "composed"
    scores: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    # 0/1 per test item (log-likelihood scoring), for the paired tests; absent: not measured
    correct: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class QuickstartReport:
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
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


ALPHA = 0.05  # a claim "holds" where its paired test gives p below this
KEEP = 0.95  # the retention claim: each source's own-modality accuracy kept to this ratio
N_BOOT = 10_000  # bootstrap replicates for the retention intervals (seeded: deterministic)


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims checked on this run: ``ok`` says whether the point estimates
    go the claimed way, ``p`` what the paired test on the same items says about it (None
    where the per-item results it needs are missing)."""

    claim: str
    ok: bool
    detail: str  # the numbers behind it
    p: float | None = None
    test: str = ""  # the test that gave ``p``

    @property
    def significant(self) -> bool:
        return self.ok and self.p is not None and self.p < ALPHA

    @property
    def verdict(self) -> str:
        """ "holds" only where the test says so at p < 0.05; the direction right but within
        noise says so with its p; the direction wrong "does not hold"."""
        if not self.ok:
            return "does not hold"
        if self.p is None:
            return "untested (no per-item results)"
        return "holds" if self.p < ALPHA else f"holds within noise (p = {format_p(self.p)})"

    @property
    def evidence(self) -> str:
        """The numbers, then the test and its p-value."""
        return (
            self.detail if self.p is None else f"{self.detail}; {self.test} p = {format_p(self.p)}"
        )

    def line(self) -> str:
        return f"{self.verdict}: {self.claim} ({self.evidence})"

    def as_dict(self) -> dict[str, Any]:
        """As results.json holds it."""
        return {
            "claim": self.claim,
            "verdict": self.verdict,
            "holds": self.significant,
            "direction_holds": self.ok,
            "p": self.p,
            "test": self.test,
            "detail": self.detail,
        }


def format_p(p: float) -> str:
    return f"{p:.2g}"


def _items(row: Row, column: str) -> list[float] | None:
    v = row.correct.get(column)
    return list(v) if v else None


def check_claims(rows: list[Row], columns: list[str], modalities: Sequence[str]) -> list[Claim]:
    """The paper's three claims, checked on this run: ``columns`` are each modality's own
    test split in ``modalities`` order, then mini-MCUB; ``rows`` hold the single models
    ``<modality>-shared`` / ``-decoupled`` and the compositions NaiveMC, DAMC.

    Orderings are tested with the exact McNemar test on the mini-MCUB items; "beats every
    single model" needs it against each one (its p is the largest of theirs: an
    intersection-union test). Retention is the paired bootstrap's one-sided p for "kept
    below 95%", the largest over the modalities."""
    from mmcompose.bench.stats import mcnemar_exact, retention

    by = {r.name: r for r in rows}
    mcub = columns[-1]
    out = []
    singles = [r for r in rows if r.kind == "single"]
    best_single = max(singles, key=lambda r: r.scores[mcub] or 0.0)

    def mcnemar_p(a: Row, others: list[Row]) -> float | None:
        x = _items(a, mcub)
        ys = [_items(o, mcub) for o in others]
        if x is None or any(y is None for y in ys):
            return None
        return max(mcnemar_exact(x, y).p for y in ys if y is not None)

    test = "exact McNemar"
    for comp in ("NaiveMC", "DAMC"):
        c = by[comp].scores[mcub] or 0.0
        out.append(
            Claim(
                f"{comp} beats every single-modality model on mini-MCUB",
                c > (best_single.scores[mcub] or 0.0),
                f"{pct(c)} vs best single {best_single.name} {pct(best_single.scores[mcub])}",
                mcnemar_p(by[comp], singles),
                f"{test} vs each single model, largest",
            )
        )
    d, n = by["DAMC"].scores[mcub] or 0.0, by["NaiveMC"].scores[mcub] or 0.0
    out.append(
        Claim(
            "DAMC >= NaiveMC on mini-MCUB",
            d >= n,
            f"{pct(d)} vs {pct(n)}",
            mcnemar_p(by["DAMC"], [by["NaiveMC"]]),
            test,
        )
    )
    for comp, strategy in (("NaiveMC", "shared"), ("DAMC", "decoupled")):
        kept, parts, ps = [], [], []
        for m, col in zip(modalities, columns, strict=False):
            source = by[f"{m}-{strategy}"]
            src = source.scores[col] or 0.0
            k = (by[comp].scores[col] or 0.0) / src if src else float("nan")
            kept.append(k)
            x, y = _items(by[comp], col), _items(source, col)
            if x is None or y is None:
                ps.append(None)
                parts.append(f"{m} {100 * k:.0f}%")
                continue
            r = retention(x, y, threshold=KEEP, n_boot=N_BOOT, seed=0)
            ps.append(r.p_below)
            parts.append(f"{m} {100 * k:.0f}% [{100 * r.low:.0f}, {100 * r.high:.0f}]")
        p = None if any(q is None for q in ps) else max(q for q in ps if q is not None)
        out.append(
            Claim(
                f"{comp} keeps >= {100 * KEEP:.0f}% of each source's own-modality accuracy",
                all(k >= KEEP for k in kept),
                ", ".join(parts),
                p,
                f"bootstrap, one-sided for < {100 * KEEP:.0f}%, largest",
            )
        )
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
    for c in report.claims:
        lines.append(f"- {c.line()}")
    lines += [
        "",
        f'"holds": the paired test on the same items gives p < {ALPHA}; "holds within '
        'noise": the numbers go the claimed way but the test cannot tell them from chance.',
    ]
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
                {
                    t: {k: v for k, v in b.items() if k not in _NOT_METRICS}
                    for t, b in blocks.items()
                },
                {t: {"task": t, **info} for t in blocks},
                {t: int(b.get("n", 0)) for t, b in blocks.items()},
                {"model": "mmcompose", "model_args": f"name={name}", "device": "cpu"},
            )
        doc = {
            "columns": report.columns,
            "rows": [{k: v for k, v in r.__dict__.items() if k != "correct"} for r in report.rows],
            "claims": [c.as_dict() for c in report.claims],
            "per_item": {r.name: r.correct for r in report.rows},
            "timings_s": report.timings,
            "setup": info,
        }
        (tmp / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
        render_chart(report, tmp / "chart.png")
        if search_report is not None and search_report.is_dir():
            shutil.copytree(search_report, tmp / "lambda_search")
