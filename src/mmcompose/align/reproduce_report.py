"""The alignment reproduction's report: results.json (recalls with intervals, paired tests,
claims), report.md, chart.png, hits.safetensors (per-query hits, for re-analysis), and the
marked section of docs/results.md regenerated from results.json (``render_alignment_docs``).

Claims tested, each per (task, text encoder, direction) at R@1, by the paired bootstrap over
the same queries and seeds: the paper's "alternating beats joint" (``moe_alt`` vs
``moe_joint``) and "MoE beats an MLP" (``moe_alt`` vs ``mlp_alt``, matched parameters); and,
as context, the MoE against the linear map and the two baselines. A cell "holds" when the
difference is positive with p < 0.05, is "reversed" when negative with p < 0.05, else it is
"not resolved" (the sign alone is reported).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.align.recall import KS, compare, summarize
from mmcompose.errors import ConfigError

__all__ = [
    "ALIGN_MARK_BEGIN",
    "ALIGN_MARK_END",
    "build_doc",
    "read_alignment_run",
    "render_alignment_docs",
    "render_chart",
    "render_section",
    "replace_marked",
    "write_report",
]

ALIGN_MARK_BEGIN = (
    "<!-- mmcompose reproduce alignment: begin (written by `mmcompose reproduce "
    "render-alignment`) -->"
)
ALIGN_MARK_END = "<!-- mmcompose reproduce alignment: end -->"
KIND = "mmcompose reproduce alignment"
FORMAT = 1
REFERENCE = "moe_alt"
CLAIMS = {
    "moe_joint": "alternating beats joint training (paper)",
    "mlp_alt": "the MoE beats an MLP of the same size (paper)",
    "linear": "the MoE beats a linear map",
    "asif": "the MoE beats training-free ASIF",
    "fusemix": "the MoE beats FuseMix-style adapters",
}
SHORT = {"image": "img", "audio": "aud", "text": "txt"}


def _short(direction: str) -> str:
    src, tgt = direction.split("->")
    return f"{SHORT.get(src, src)}->{SHORT.get(tgt, tgt)}"


# =========================================================================== results.json
def build_doc(
    tasks: Sequence[Any],
    budget: Any,
    results: dict[tuple[str, str, str], list[tuple[dict, dict]]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The results document from every unit's hits and info (``run_ablation``)."""
    import mmcompose
    from mmcompose.align.reproduce import VARIANTS

    rows, tests = [], []
    task_info: dict[str, Any] = {}
    for data in tasks:
        t = task_info.setdefault(data.task, {"modality": data.modality, "text_encoders": {}})
        t["datasets"] = data.info.get("datasets")
        t["text_encoders"][data.text_encoder] = {
            k: data.info.get(k) for k in ("counts", "dims", "tokens", "encoders")
        }
        stacked: dict[str, dict[str, np.ndarray]] = {}
        for variant in budget.variants:
            units = results[(data.task, data.text_encoder, variant)]
            dirs = list(units[0][0])
            hits = {d: np.stack([u[0][d] for u in units]) for d in dirs}
            stacked[variant] = hits
            infos = [u[1] for u in units]
            rows.append(
                {
                    "task": data.task,
                    "text_encoder": data.text_encoder,
                    "variant": variant,
                    "label": VARIANTS[variant],
                    "params": infos[0].get("params"),
                    "seconds_per_seed": float(np.mean([i["seconds"] for i in infos])),
                    "infos": infos,
                    "queries": {d: int(h.shape[1]) for d, h in hits.items()},
                    "cells": {d: summarize(h, KS, n_boot=budget.n_boot) for d, h in hits.items()},
                }
            )
        if REFERENCE in stacked:
            for other in (v for v in budget.variants if v != REFERENCE):
                for d in stacked[REFERENCE]:
                    for j, k in enumerate(KS[:2]):
                        cmp = compare(stacked[REFERENCE][d], stacked[other][d], j,
                                      n_boot=budget.n_boot)  # fmt: skip
                        tests.append({"task": data.task, "text_encoder": data.text_encoder,
                                      "direction": d, "k": k, "a": REFERENCE, "b": other,
                                      **cmp})  # fmt: skip
    return {
        "kind": KIND,
        "format": FORMAT,
        "budget": budget.model_dump(mode="json"),
        "seeds": list(budget.seeds),
        "ks": list(KS),
        "tasks": task_info,
        "rows": rows,
        "tests": tests,
        "claims": _claims(tests),
        "timings": timings,
        "created_with": {"mmcompose": getattr(mmcompose, "__version__", "unknown")},
    }


def _verdict(t: dict[str, Any]) -> str:
    if t["p"] < 0.05:
        return "holds" if t["difference"] > 0 else "reversed"
    return "not resolved"


def _claims(tests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for other, claim in CLAIMS.items():
        cells = [t for t in tests if t["b"] == other and t["k"] == 1]
        if not cells:
            continue
        verdicts = [_verdict(t) for t in cells]
        out.append(
            {
                "claim": claim,
                "b": other,
                "cells": len(cells),
                "holds": verdicts.count("holds"),
                "reversed": verdicts.count("reversed"),
                "not_resolved": verdicts.count("not resolved"),
                "positive_sign": sum(t["difference"] > 0 for t in cells),
                "mean_difference": float(np.mean([t["difference"] for t in cells])),
            }
        )
    return out


def write_report(
    out_dir: Path,
    doc: dict[str, Any],
    results: dict[tuple[str, str, str], list[tuple[dict, dict]]],
    *,
    force: bool = False,
) -> None:
    """The report folder, written whole (``atomic_dir``): nothing half-written."""
    from safetensors.numpy import save_file

    from mmcompose.fs import atomic_dir

    tensors = {
        f"{task}/{enc}/{variant}/{d}": np.ascontiguousarray(np.stack([u[0][d] for u in units]))
        for (task, enc, variant), units in results.items()
        for d in units[0][0]
    }
    with atomic_dir(out_dir, overwrite=force) as tmp:
        text = json.dumps(doc, indent=1, default=str) + "\n"
        (tmp / "results.json").write_text(text, encoding="utf-8")
        clean = json.loads(text)
        render_chart(clean, tmp / "chart.png")
        (tmp / "report.md").write_text(
            "# mmcompose reproduce alignment\n\n" + render_section(clean, "chart.png"),
            encoding="utf-8",
        )
        save_file(tensors, str(tmp / "hits.safetensors"))


# =========================================================================== markdown
def _cell(c: dict[str, Any]) -> str:
    return f"{c['mean']:.1f} [{c['low']:.1f}, {c['high']:.1f}]"


def _fmt_params(n: int | None) -> str:
    if not n:
        return "0"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def render_section(doc: dict[str, Any], chart: str | None = None) -> str:
    """The markdown of the results (tables, tests, claims); ``chart``: image link to embed."""
    b = doc["budget"]
    seeds = doc["seeds"]
    out = [
        f"Budget: {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); connector hidden "
        f"{b['hidden']}, {b['num_experts']} experts top-{b['top_k']}; steps "
        + ", ".join(f"{k} {v}" for k, v in b["steps"].items())
        + f" (batch {b['batch_size']}, lr {b['lr']:g}, early stopping on val R@1 every "
        f"{b['eval_every']} steps, patience {b['patience']}); image tokens: the 7x7 grid pooled "
        f"to {b['image_grid']}x{b['image_grid']}; FuseMix {b['fusemix_steps']} steps; ASIF (k, p) "
        f"picked on val from k in {b['asif_k']}, p in {b['asif_p']}. Contrastive space. "
        "Recall in %, mean over seeds, [95% interval: bootstrap over queries and seeds].",
        "",
        "| task | text encoder | split | pairs | items | distinct texts |",
        "|---|---|---|---|---|---|",
    ]
    for task, t in doc["tasks"].items():
        for enc, e in t["text_encoders"].items():
            for split, c in (e.get("counts") or {}).items():
                items = c.get(t["modality"], "")
                out.append(f"| {task} ({', '.join(t['datasets'] or [])}) | {enc} | {split} | "
                           f"{c['pairs']} | {items} | {c.get('texts', '')} |")  # fmt: skip
    for task in doc["tasks"]:
        rows = [r for r in doc["rows"] if r["task"] == task]
        dirs = list(rows[0]["cells"])
        head = ["text enc.", "variant", "params"]
        for d in dirs:
            head += [f"{_short(d)} R@1", "R@5", "R@10"]
        queries = ", ".join(f"{_short(d)} {rows[0]['queries'][d]}" for d in dirs)
        out += ["", f"**{task}** (test queries: {queries})", "",
                "| " + " | ".join([*head, "s/seed"]) + " |",
                "|" + "---|" * (len(head) + 1)]  # fmt: skip
        for r in rows:
            cells = []
            for d in dirs:
                c = r["cells"][d]
                cells += [_cell(c["R@1"]), f"{c['R@5']['mean']:.1f}", f"{c['R@10']['mean']:.1f}"]
            out.append(
                f"| {r['text_encoder']} | {r['label']} | {_fmt_params(r['params'])} | "
                + " | ".join(cells)
                + f" | {r['seconds_per_seed']:.0f} |"
            )
    out += ["", "Paired tests at R@1, MoE + alternating minus the other variant (points, 95% "
            "interval, bootstrap p over queries and seeds; McNemar p on seed 0):", "",
            "| task | text enc. | direction | vs | difference | p | McNemar p |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in doc["tests"]:
        if t["k"] != 1:
            continue
        out.append(
            f"| {t['task']} | {t['text_encoder']} | {_short(t['direction'])} | {t['b']} | "
            f"{t['difference']:+.1f} [{t['low']:+.1f}, {t['high']:+.1f}] | {t['p']:.3g} | "
            f"{t['mcnemar_p_seed0']:.3g} |"
        )
    out += ["", "Claims (cells = task x text encoder x direction, R@1):", ""]
    for c in doc["claims"]:
        out.append(
            f"- {c['claim']}: holds in {c['holds']}/{c['cells']}, reversed in "
            f"{c['reversed']}/{c['cells']}, not resolved in {c['not_resolved']}/{c['cells']} "
            f"(positive sign in {c['positive_sign']}/{c['cells']}, mean difference "
            f"{c['mean_difference']:+.1f} points)"
        )
    if chart:
        out += ["", f"![R@1 per variant with 95% intervals]({chart})"]
    t = doc.get("timings") or {}
    if t:
        out += ["", "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())]
    return "\n".join(out) + "\n"


# =========================================================================== chart
def render_chart(doc: dict[str, Any], path: Path) -> None:
    """R@1 with 95% intervals: one panel per task and direction, bars per variant, one colour
    per text encoder."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "the chart needs matplotlib", hint="pip install 'mmcompose[bench]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, d) for task in doc["tasks"]
              for d in next(r for r in doc["rows"] if r["task"] == task)["cells"]]  # fmt: skip
    variants = list(dict.fromkeys(r["variant"] for r in doc["rows"]))
    encoders = list(dict.fromkeys(r["text_encoder"] for r in doc["rows"]))
    cols = 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 3.6 * nrows), squeeze=False)
    width = 0.8 / max(1, len(encoders))
    for ax, (task, d) in zip(axes.flat, panels, strict=False):
        for e, enc in enumerate(encoders):
            xs, ys, lo, hi = [], [], [], []
            for v, variant in enumerate(variants):
                row = next((r for r in doc["rows"] if r["task"] == task and
                            r["text_encoder"] == enc and r["variant"] == variant), None)  # fmt: skip
                if row is None:
                    continue
                c = row["cells"][d]["R@1"]
                xs.append(v + (e - (len(encoders) - 1) / 2) * width)
                ys.append(c["mean"])
                lo.append(c["mean"] - c["low"])
                hi.append(c["high"] - c["mean"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=enc)
        ax.set_xticks(range(len(variants)), [v.replace("_", "\n") for v in variants], fontsize=8)
        ax.set_title(f"{task}: {_short(d)}", fontsize=10)
        ax.set_ylabel("R@1 (%)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, title="text encoder", title_fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"Alignment ablation, R@1 with 95% intervals, {len(doc['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# =========================================================================== docs
def read_alignment_run(run_dir: str | Path) -> dict[str, Any]:
    from mmcompose.docs_section import read_results

    return read_results(run_dir, KIND, FORMAT, "mmcompose reproduce alignment")


def replace_marked(text: str, section: str, where: str = "the file") -> str:
    """``text`` with what lies between the alignment markers replaced by ``section``."""
    from mmcompose.docs_section import replace_marked as replace

    return replace(text, section, where, ALIGN_MARK_BEGIN, ALIGN_MARK_END)


def render_alignment_docs(
    run_dir: str | Path, into: str | Path, chart: str | Path | None = None
) -> tuple[Path, Path]:
    """Regenerate the marked section of ``into`` (docs/results.md) and its chart (default
    ``<into's folder>/img/alignment-recall.png``) from the run's results.json; both written
    atomically, the rest of the file unchanged. Returns (markdown, chart) paths."""
    from mmcompose.docs_section import find_markers
    from mmcompose.fs import atomic_file

    doc = read_alignment_run(run_dir)
    into = Path(into)
    if not into.is_file():
        raise ConfigError(f"{into} not found", hint="give the markdown file to update")
    text = into.read_text(encoding="utf-8")
    find_markers(text, str(into), ALIGN_MARK_BEGIN, ALIGN_MARK_END)  # before any work
    chart_path = Path(chart) if chart is not None else into.parent / "img" / "alignment-recall.png"
    link = Path(os.path.relpath(chart_path, into.parent)).as_posix()
    try:
        section = render_section(doc, link)
    except (KeyError, TypeError, IndexError, StopIteration) as e:
        raise ConfigError(
            f"{Path(run_dir) / 'results.json'} is incomplete ({type(e).__name__}: {e})",
            hint="run the reproduction again; its report folder is written whole or not at all",
        ) from None
    with atomic_file(chart_path) as tmp:
        render_chart(doc, tmp)
    new = replace_marked(text, section, str(into))
    with atomic_file(into) as tmp:
        tmp.write_text(new, encoding="utf-8")
    return into, chart_path
