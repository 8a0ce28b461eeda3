"""Adaptive coefficients (DAMC's lambda_m): search the per-source weights on validation data.

The reference code takes the lambdas by hand; the spec asks us to search them. Writing a
checkpoint per candidate would cost a full composition each, so the composition is written
once (temporary folder) with a method linear in its inputs (``linear``/``task_arithmetic``):
the merged ``text`` adapter is then the sources' factors concatenated, ``A = cat(A_i)``,
``B = cat(c_i s_i B_i)``, and a candidate only rescales B's blocks in memory, with the very
coefficients ``c_i`` the executor would use for those weights (so ``normalize``, ``lambda``
and conditional parameters count). The best weights are then composed normally into the
output folder, with the report (``search/search.{json,md,png}``) inside it.

Layers, so the search logic can be tested without models:

- pure: :mod:`~mmcompose.compose.search_loop` (:func:`parse_grid`, :func:`run_search`: grid or
  coordinate ascent over a function ``weights -> accuracy``; :class:`SearchResult`);
- in memory: :mod:`~mmcompose.compose.reweight` (:class:`InMemoryComposition`: compose once,
  ``apply(weights)``; :func:`with_weights`, :func:`start_weights`);
- the report: :mod:`~mmcompose.compose.search_report` (:func:`write_search_report`);
- I/O, here: :func:`mcub_scorer`, :func:`search_coefficients`, :func:`compose_with_search`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmcompose.compose.config import ComposeConfig, load_compose_config
from mmcompose.compose.reweight import (
    SEARCHABLE_METHODS,
    InMemoryComposition,
    check_searchable,
    start_weights,
    with_weights,
)
from mmcompose.compose.search_loop import (
    DEFAULT_GRID,
    MAX_GRID_CANDIDATES,
    MAX_PASSES,
    Candidate,
    InvalidWeights,
    Method,
    SearchResult,
    Weights,
    check_choice,
    check_grid_size,
    parse_grid,
    run_search,
)
from mmcompose.compose.search_report import SEARCH_DIR, plot_search, write_search_report
from mmcompose.errors import ConfigError

if TYPE_CHECKING:
    from mmcompose.compose.executor import ComposeResult
    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

__all__ = [
    "DEFAULT_GRID",
    "MAX_GRID_CANDIDATES",
    "MAX_PASSES",
    "METRICS",
    "SEARCHABLE_METHODS",
    "SEARCH_DIR",
    "Candidate",
    "InMemoryComposition",
    "InvalidWeights",
    "Method",
    "Mode",
    "Scorer",
    "SearchResult",
    "Weights",
    "candidates_in_memory",
    "check_grid_size",
    "check_searchable",
    "checked_options",
    "compose_with_search",
    "mcub_scorer",
    "parse_grid",
    "plot_search",
    "run_search",
    "search_coefficients",
    "search_then_compose",
    "source_names",
    "start_weights",
    "with_weights",
    "write_search_report",
]

METRICS = {"loglikelihood": "acc,loglikelihood", "generate": "acc,generate"}
Mode = Literal["loglikelihood", "generate"]
Scorer = Callable[["MMComposeForCausalLM", "MMProcessor"], float]


def mcub_scorer(
    questions: str | Path,
    answers: str | Path | None = None,
    *,
    mode: Mode = "loglikelihood",
    batch_size: int = 8,
    max_new_tokens: int = 8,
) -> tuple[Scorer, int]:
    """A scorer ``(model, processor) -> accuracy`` on an MCUB-format file, and its item count."""
    check_choice("search mode", mode, METRICS)
    for label, path in (("validation questions", questions), ("validation answers", answers)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(
                f"{label} file {path} not found",
                hint="give an MCUB-format JSON list (the answers file holds the gold letters)",
            )
    try:
        from mmcompose.bench.mcub import evaluate_mcub, load_mcub
    except ImportError as e:
        raise ConfigError(
            f"the MCUB evaluator is not available ({e})",
            hint="pass scorer=... to search_coefficients instead",
        ) from None
    items = load_mcub(questions, answers)
    if not any(it.answer is not None for it in items):
        raise ConfigError(
            f"{questions} holds no items with a gold answer to score",
            hint="pass the answers file too (--search-answers A.json)",
        )
    metric = METRICS[mode]

    def score(model: MMComposeForCausalLM, processor: MMProcessor) -> float:
        result = evaluate_mcub(
            model,
            processor,
            items,
            modes=(mode,),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
        )
        return result.accuracy(metric)

    return score, len(items)


# ---------------------------------------------------------------- the API


def checked_options(
    config: ComposeConfig | str | Path,
    grid: str | Iterable[float],
    method: str,
    mode: str,
    modes: Iterable[str],
    max_passes: int,
) -> tuple[ComposeConfig, tuple[float, ...], int]:
    """(config, grid, number of sources) once every search option is checked; shared by the
    labelled and the label-free search, so both refuse the same things the same way."""
    if not isinstance(config, ComposeConfig):
        config = load_compose_config(config)
    grid = parse_grid(grid)
    check_choice("search method", method, ("coordinate", "grid"))
    check_choice("search mode", mode, modes)
    check_searchable(config)
    n = len(config.merge_entries)
    if method == "grid":
        check_grid_size(n, grid)
    if max_passes < 1:
        raise ConfigError(f"max_passes is {max_passes}", hint="search at least one pass")
    return config, grid, n


@contextmanager
def candidates_in_memory(
    config: ComposeConfig,
    start: Weights,
    *,
    device: str,
    workdir: str | Path | None,
    desc: str,
    total: int | None,
    progress: bool,
) -> Iterator[tuple[InMemoryComposition, Callable[[Candidate | None], None]]]:
    """The composition written once under ``workdir`` (removed afterwards) for candidates to
    re-weight in memory, with frozen encoders memoised (every candidate sees the same inputs;
    the caller's memo when there is one), and a progress tick per candidate."""
    from mmcompose.model.encode_memo import active, memoized_encoders

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"lambda search ({desc})", unit="candidate", leave=False)

    def tick(c: Candidate | None = None) -> None:
        if bar is not None:
            bar.update(1)
            if c is not None and c.accuracy is not None:
                bar.set_postfix(acc=f"{c.accuracy:.4g}", refresh=False)

    try:
        with tempfile.TemporaryDirectory(prefix=".mmcompose-search-", dir=workdir) as tmp:
            mem = InMemoryComposition(config, Path(tmp) / "model", start, device=device)
            with memoized_encoders(active()):
                yield mem, tick
    finally:
        if bar is not None:
            bar.close()


def search_coefficients(
    config: ComposeConfig | str | Path,
    val_questions: str | Path | None = None,
    val_answers: str | Path | None = None,
    *,
    grid: str | Iterable[float] = DEFAULT_GRID,
    method: Method = "coordinate",
    mode: Mode = "loglikelihood",
    scorer: Scorer | None = None,
    start: Sequence[float] | None = None,
    max_passes: int = MAX_PASSES,
    device: str = "cpu",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search the per-source weights (lambdas) of a composition on validation data.

    Scores every candidate with MCUB accuracy on ``val_questions`` (gold letters from
    ``val_answers``, else from the file's last turns) under ``mode``, or with ``scorer``.
    ``start`` (coordinate search) defaults to the config's weights, else 1/N each;
    ``max_passes`` bounds its sweeps over the sources. The
    temporary composition lives under ``workdir`` (default: the system's temp folder) and is
    removed afterwards. Writes nothing else; see :func:`write_search_report`.
    """
    t0 = time.perf_counter()
    config, grid, n = checked_options(config, grid, method, mode, METRICS, max_passes)
    start_w = tuple(float(x) for x in start) if start is not None else start_weights(config)
    n_items = None
    if scorer is None:
        if val_questions is None:
            raise ConfigError("no validation data", hint="pass --search VAL.json (MCUB format)")
        scorer, n_items = mcub_scorer(
            val_questions, val_answers, mode=mode, batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
    total = len(grid) ** n if method == "grid" else None
    with candidates_in_memory(config, start_w, device=device, workdir=workdir, desc=method,
                              total=total, progress=progress) as (mem, tick):  # fmt: skip

        def evaluate(w: Weights) -> float:
            mem.apply(w)
            return scorer(mem.model, mem.processor)

        result = run_search(
            evaluate, n, grid, method=method, start=start_w, max_passes=max_passes,
            on_candidate=tick,
        )  # fmt: skip
        notes = mem.notes
    result.sources = source_names(config)
    result.mode = mode if n_items is not None else None
    result.metric = METRICS[mode] if n_items is not None else "score"
    result.n_items = n_items
    result.notes = notes
    result.seconds = time.perf_counter() - t0
    return result


def source_names(config: ComposeConfig) -> list[str]:
    """Short unique names: each merged model's folder name (its path where names repeat)."""
    paths = [e.model for e in config.merge_entries]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        return [str(p) for p in paths]
    return names


def compose_with_search(
    config: ComposeConfig | str | Path,
    out_dir: str | Path,
    val_questions: str | Path | None = None,
    val_answers: str | Path | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    progress: bool = True,
    **search: Any,
) -> tuple[SearchResult, ComposeResult]:
    """Search the lambdas, then compose with the best ones into ``out_dir`` with the report in
    ``out_dir/search/``; the recorded config (composition_report.json) holds the weights.
    ``search``: keyword arguments of :func:`search_coefficients` (grid, method, mode, ...).
    Nothing appears at ``out_dir`` unless everything succeeded."""

    def run(cfg: ComposeConfig, **kw: Any) -> SearchResult:
        return search_coefficients(cfg, val_questions, val_answers, **kw, **search)

    return search_then_compose(
        config, out_dir, run, force=force, device=device, allow_nonfinite=allow_nonfinite,
        progress=progress, workdir=search.pop("workdir", None),
    )  # fmt: skip


def search_then_compose(
    config: ComposeConfig | str | Path,
    out_dir: str | Path,
    run: Callable[..., SearchResult],
    *,
    force: bool,
    device: str,
    allow_nonfinite: bool,
    progress: bool,
    workdir: str | Path | None = None,
) -> tuple[SearchResult, ComposeResult]:
    """``run(config, device=, progress=, workdir=)`` (a search), then the composition with its
    best weights into ``out_dir`` with the report in ``out_dir/search/``; the output path is
    checked before the search (which may take long), and nothing appears there unless
    everything succeeded. The temporary model goes on the output's disk by default."""
    from mmcompose.compose.executor import compose
    from mmcompose.fs import refuse_existing

    if not isinstance(config, ComposeConfig):
        config = load_compose_config(config)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    result = run(config, device=device, progress=progress, workdir=workdir or out_dir.parent)
    composed = compose(
        with_weights(config, result.best_weights),
        out_dir,
        device=device,
        force=force,
        allow_nonfinite=allow_nonfinite,
        progress=progress,
        before_commit=lambda tmp: write_search_report(result, tmp / SEARCH_DIR),
    )
    return result, composed
