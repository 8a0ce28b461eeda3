"""How close the label-free lambda search comes to the labelled one, on the real models.

Both searches run over one in-memory composition (task arithmetic) of the shared (NaiveMC)
single-modality models of one seed, with the same grid, the same coordinate procedure and the
same validation items. Every weight vector visited is evaluated once (MCUB, option
log-likelihood), which gives both its accuracy on the gold letters (the labelled search's
criterion, ``compose --search``) and its answers (AdaMMS's generation consistency,
``compose --search-unlabelled``, which never reads the letters). Then each search's choice
and NaiveMC's lambda = 1/N are scored on held-out MCUB test items, with the paired bootstrap
between the two choices on the same items.

    python benchmarks/label_free_search.py --sources IMAGE AUDIO VIDEO POINT \\
        --val VAL.json VAL.answers.json --test TEST.json TEST.answers.json \\
        --out benchmarks/label_free_search.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODALITIES = ("image", "audio", "video", "point")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, help="folder of <modality>-shared-* (the first each)")
    ap.add_argument("--sources", type=Path, nargs="+", help="the shared models, instead")
    ap.add_argument("--val", type=Path, nargs=2, required=True, metavar=("QUESTIONS", "ANSWERS"))
    ap.add_argument("--test", type=Path, nargs=2, required=True, metavar=("QUESTIONS", "ANSWERS"))
    ap.add_argument("--grid", default="0.25,0.5,0.75,1")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--val-items", type=int, default=16)
    ap.add_argument("--test-items", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import numpy as np

    from mmcompose.bench.mcub import evaluate_mcub, load_mcub
    from mmcompose.bench.stats import paired_bootstrap
    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.consistency import run_consistency_search
    from mmcompose.compose.reweight import InMemoryComposition
    from mmcompose.compose.search_loop import parse_grid, run_search
    from mmcompose.job_tasks import evenly_spaced
    from mmcompose.model.encode_memo import memoized_encoders

    sources = args.sources or [sorted(args.models.glob(f"{m}-shared-*"))[0] for m in MODALITIES]
    cfg = ComposeConfig.model_validate(
        {"merge_method": "task_arithmetic", "models": [{"model": str(p)} for p in sources]}
    )
    val = load_mcub(*args.val)[: args.val_items]
    test = evenly_spaced(load_mcub(*args.test), args.test_items)
    grid = parse_grid(args.grid)
    n = len(sources)
    seen: dict[tuple[float, ...], dict] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, memoized_encoders():
        mem = InMemoryComposition(cfg, Path(tmp) / "model", (1 / n,) * n)

        def visit(w: tuple[float, ...]) -> dict:
            if w not in seen:
                mem.apply(w)
                r = evaluate_mcub(mem.model, mem.processor, val, ("loglikelihood",), progress=False)
                seen[w] = {
                    "accuracy": r.accuracy("acc,loglikelihood"),
                    "answers": [s["prediction"]["loglikelihood"] for s in r.samples],
                }
                print(f"  {w}: val acc {seen[w]['accuracy']:.3f}", flush=True)
            return seen[w]

        labelled = run_search(lambda w: visit(w)["accuracy"], n, grid, max_passes=args.passes)
        free = run_consistency_search(lambda w: visit(w)["answers"], n, grid,
                                      max_passes=args.passes)  # fmt: skip
        search_s = time.perf_counter() - t0
        chosen = {
            "labelled": labelled.best_weights,
            "label-free": free.best_weights,
            "NaiveMC (1/N)": (1 / n,) * n,
        }
        scored = {}
        for name, w in chosen.items():
            mem.apply(w)
            r = evaluate_mcub(mem.model, mem.processor, test, ("loglikelihood",), progress=False)
            scored[name] = r.correct["acc,loglikelihood"]
            print(f"{name} {w}: test acc {np.mean(scored[name]):.3f}", flush=True)
    a, b = np.asarray([scored["labelled"]]), np.asarray([scored["label-free"]])
    diff = paired_bootstrap(b, a, n_boot=10_000, seed=0)
    consistency = {c.weights: c.accuracy for c in free.candidates if c.accuracy is not None}
    pairs = [(consistency[w], seen[w]["accuracy"]) for w in consistency]
    ranks = [np.argsort(np.argsort(x)) for x in zip(*pairs, strict=True)]
    doc = {
        "sources": [str(p) for p in sources],
        "grid": list(grid),
        "passes": args.passes,
        "val_items": len(val),
        "test_items": len(test),
        "chosen": {k: list(v) for k, v in chosen.items()},
        "val_accuracy": {k: seen[tuple(v)]["accuracy"] for k, v in chosen.items()},
        "test_accuracy": {k: float(np.mean(v)) for k, v in scored.items()},
        "label_free_minus_labelled_test": {
            "difference": diff.difference,
            "low": diff.low,
            "high": diff.high,
            "p": diff.p,
        },
        "spearman_consistency_vs_val_accuracy": float(np.corrcoef(*ranks)[0, 1]),
        "candidates_visited": len(seen),
        "search_seconds": round(search_s, 1),
        "per_candidate": [{"weights": list(w), **v} for w, v in seen.items()],
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("chosen", "val_accuracy", "test_accuracy")}, indent=1))


if __name__ == "__main__":
    main()
