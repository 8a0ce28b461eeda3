"""``mmcompose reproduce composition``: the paper's central experiment, end to end, offline.

The same job as the quickstart (:mod:`mmcompose.quickstart`: the same six cached stages,
the same recipe and cache) with the reproduction's :class:`~mmcompose.recipe.Budget`:

- four modalities (image, audio, video, point cloud); images also from ``mesh_views`` so that
  every one of the 31 mesh concepts has held-out images and MCUB-4 covers all of them;
- for each seed, the 8 single-modality models (4 modalities x shared / decoupled);
- for each seed and set (MCUB-4 and the four MCUB-3 subsets): NaiveMC and DAMC (lambdas
  searched on that set's validation items); on MCUB-4 also the ablations of DAMC's two parts:
  decoupled training with lambda = 1/N (no search), NaiveMC with the lambda search; and the
  other ways to compose the shared sources (:mod:`mmcompose.job_methods`): MMER, TIES, DARE
  and NaiveMC with the label-free lambda search, also scored on the modalities' test splits;
- evaluation on evenly spaced test items of every modality's test split and every MCUB set,
  by option log-likelihood and by generation (MCUB: the letter parsed);
- the report (:mod:`mmcompose.paper_report`): mean over seeds with 95% intervals, paired
  tests, retention, chart; :func:`render_docs` writes its section of docs/results.md.

Budgets (``--budget``), sized for the 2-core CPU this project runs on, at the speeds measured
in docs/results.md (training step ~3.5 s, MCUB item ~0.3 s per scoring mode, a 73-label
classification item ~0.5 s):

- ``full`` (about 2 h cold): 3 seeds; quickstart epochs (video 3/4, like images); 24 test
  items per modality, 32 per MCUB set, 16 validation items per lambda search (one sweep over
  {0.5, 1}). Training ~30 min (24 models), compositions and searches ~20 min (36 of them),
  evaluation ~60 min (~4,200 MCUB and ~1,150 classification scorings, each by both modes).
  About 35 GB of cache (each model folder holds its LLM).
- ``smoke`` (about 20 min cold): 1 seed, the same models as the full run's seed 0 (so a
  later full run reuses them), 8 items per column: checks the whole machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from mmcompose.errors import ConfigError
from mmcompose.job_tasks import subset_sets
from mmcompose.recipe import DATASETS as QUICKSTART_DATASETS
from mmcompose.recipe import Budget

__all__ = [
    "BUDGETS",
    "DATASETS",
    "MARK_BEGIN",
    "MARK_END",
    "MODALITIES",
    "parse_modalities",
    "parse_seeds",
    "parse_subsets",
    "plan",
    "render_docs",
    "run_reproduction",
]

MODALITIES = ("image", "audio", "video", "point")
DATASETS: dict[str, tuple[str, ...]] = {
    **QUICKSTART_DATASETS,
    "image": (*QUICKSTART_DATASETS["image"], "mesh_views"),
}
_PAPER = {
    "ablations": True,
    "paper_report": True,
    "generate": True,
    "generate_mcub": True,
    "methods": True,
}
BUDGETS: dict[str, Budget] = {
    "full": Budget(classify_limit=24, mcub_limit=32, search_limit=16, seeds=(0, 1, 2), **_PAPER),
    "smoke": Budget(classify_limit=8, mcub_limit=8, search_limit=8, seeds=(0,), **_PAPER),
}
MARK_BEGIN = "<!-- mmcompose reproduce: begin (written by `mmcompose reproduce render`) -->"
MARK_END = "<!-- mmcompose reproduce: end -->"


# ----------------------------------------------------------------------------- inputs
def parse_seeds(seeds: str | Sequence[int]) -> tuple[int, ...]:
    """``"0,1,2"`` or a sequence -> the seeds; empty, non-integer, negative or repeated
    seeds are refused (before any work)."""
    parts = [p.strip() for p in seeds.split(",")] if isinstance(seeds, str) else list(seeds)
    parts = [p for p in parts if p != ""]
    if not parts:
        raise ConfigError(
            "the seed list is empty", hint="give at least one seed, e.g. --seeds 0,1,2"
        )
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(
            f"seeds must be integers, got {seeds!r}", hint="e.g. --seeds 0,1,2"
        ) from None
    if any(s < 0 for s in out) or len(set(out)) < len(out):
        raise ConfigError(
            f"seeds must be distinct and >= 0, got {seeds!r}", hint="e.g. --seeds 0,1,2"
        )
    return out


def parse_modalities(modalities: str | Sequence[str] | None) -> tuple[str, ...]:
    from mmcompose.modalities import MODALITIES as ALL
    from mmcompose.modalities import canonical_modality

    if modalities is None:
        return MODALITIES
    parts = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    chosen = {canonical_modality(p.strip()) for p in parts if p.strip()}
    if len(chosen) < 3:
        raise ConfigError(
            f"MCUB needs at least 3 modalities, got {', '.join(sorted(chosen)) or 'none'}",
            hint="e.g. --modalities image,audio,video,point",
        )
    return tuple(m for m in ALL if m in chosen)


def parse_subsets(
    subsets: str | Sequence[str] | None, modalities: Sequence[str]
) -> tuple[tuple[str, ...], ...]:
    """Subsets by their letters (``IAV,AVP``; I/A/V/P), ``all`` (default: every MCUB-(N-1)
    subset) or ``none``. A subset needing a modality the run does not train is refused: it
    would have no source model to compose."""
    from mmcompose.bench.mcub_build import SET_LETTERS
    from mmcompose.modalities import MODALITIES as ALL

    if subsets is None or subsets == "all":
        return tuple(subset_sets(modalities))
    if subsets == "none":
        return ()
    by_letter = {v: k for k, v in SET_LETTERS.items()}
    parts = subsets.split(",") if isinstance(subsets, str) else list(subsets)
    out: list[tuple[str, ...]] = []
    for part in (p.strip().upper() for p in parts if p.strip()):
        unknown = [c for c in part if c not in by_letter]
        if unknown or len(set(part)) != len(part):
            raise ConfigError(
                f"subset {part!r}: use each of the letters I (image), A (audio), V (video), "
                "P (point) at most once",
                hint="e.g. --subsets IAV,IAP,IVP,AVP",
            )
        mods = tuple(m for m in ALL if SET_LETTERS[m] in part)
        lacking = [m for m in mods if m not in modalities]
        if lacking:
            raise ConfigError(
                f"subset {part} needs {', '.join(lacking)}, which has no trained source: this "
                f"run trains {', '.join(modalities)} only",
                hint=f"add {','.join(lacking)} to --modalities or drop {part} from --subsets",
            )
        if len(mods) < 3 or len(mods) >= len(modalities):
            raise ConfigError(
                f"subset {part}: a subset has at least 3 modalities and fewer than the run's "
                f"{len(modalities)} (the whole set is always composed)",
                hint="e.g. --subsets IAV,AVP",
            )
        if mods not in out:
            out.append(mods)
    return tuple(out)


def plan(
    budget: str | Budget = "full",
    seeds: str | Sequence[int] | None = None,
    modalities: str | Sequence[str] | None = None,
    subsets: str | Sequence[str] | None = None,
) -> tuple[Budget, tuple[str, ...]]:
    """The run's budget and modalities, every option checked (nothing runs yet)."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ConfigError(f"unknown budget {budget!r}", hint=f"use {' or '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    mods = parse_modalities(modalities)
    chosen = parse_subsets(subsets, mods)
    seeds_ = budget.seeds if seeds is None else parse_seeds(seeds)
    if not seeds_:
        raise ConfigError(
            "the seed list is empty", hint="give at least one seed, e.g. --seeds 0,1,2"
        )
    return replace(budget, seeds=seeds_, subsets=chosen), mods


def run_reproduction(
    out_dir: str | Path,
    *,
    budget: str | Budget = "full",
    seeds: str | Sequence[int] | None = None,
    modalities: str | Sequence[str] | None = None,
    subsets: str | Sequence[str] | None = None,
    force: bool = False,
    on_corrupt: str = "fail",
    progress: bool = True,
    log: Callable[[str], None] = print,
):
    """Check every input, then run the job; returns the report written to ``out_dir``."""
    from mmcompose.quickstart import run_job

    if on_corrupt not in ("fail", "skip"):
        raise ConfigError(f"unknown on_corrupt {on_corrupt!r}", hint="use fail or skip")
    b, mods = plan(budget, seeds, modalities, subsets)
    return run_job(
        out_dir,
        budget=b,
        modalities=mods,
        datasets=DATASETS,
        force=force,
        progress=progress,
        on_corrupt=on_corrupt,
        log=log,
        tag="reproduce",
    )


# ----------------------------------------------------------------------------- docs
def read_run(run_dir: str | Path) -> dict:
    from mmcompose.docs_section import read_results
    from mmcompose.paper_report import FORMAT

    return read_results(run_dir, "mmcompose reproduce composition", FORMAT,
                        "mmcompose reproduce composition")  # fmt: skip


def replace_section(text: str, section: str, where: str = "the file") -> str:
    """``text`` with what lies between the markers replaced by ``section``; nothing else
    changes."""
    from mmcompose.docs_section import replace_marked

    return replace_marked(text, section, where, MARK_BEGIN, MARK_END)


def render_docs(run_dir: str | Path, into: str | Path) -> Path:
    """Regenerate the marked section of ``into`` (docs/results.md) from the run's
    ``results.json``; written atomically, the rest of the file unchanged."""
    from mmcompose.docs_section import find_markers
    from mmcompose.fs import atomic_file
    from mmcompose.paper_report import render_section

    doc = read_run(run_dir)
    into = Path(into)
    if not into.is_file():
        raise ConfigError(f"{into} not found", hint="give the markdown file to update")
    text = into.read_text(encoding="utf-8")
    find_markers(text, str(into), MARK_BEGIN, MARK_END)  # a file without them fails first
    try:
        section = render_section(doc)
    except (KeyError, TypeError, IndexError) as e:
        raise ConfigError(
            f"{Path(run_dir) / 'results.json'} is incomplete ({type(e).__name__}: {e})",
            hint="run the reproduction again; its report folder is written whole or not at all",
        ) from None
    chart = Path(run_dir) / "chart.png"
    if chart.is_file():  # the run's chart beside the docs, linked from the section
        target = into.parent / "img" / "reproduce-composition.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as tmp:
            tmp.write_bytes(chart.read_bytes())
        section += f"\n![the table's MCUB columns]({target.relative_to(into.parent).as_posix()})\n"
    text = replace_section(text, section, str(into))
    with atomic_file(into) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return into
