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

- pure: :func:`parse_grid`, :func:`run_search` (grid or coordinate ascent over a function
  ``weights -> accuracy``), :class:`SearchResult` (table rows, JSON, markdown);
- in memory: :class:`InMemoryComposition` (compose once, ``apply(weights)``);
- I/O: :func:`mcub_scorer`, :func:`search_coefficients`, :func:`write_search_report`,
  :func:`compose_with_search`.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmcompose.compose.config import ComposeConfig, load_compose_config
from mmcompose.errors import ConfigError, MergeError, MMComposeError

if TYPE_CHECKING:
    import torch

    from mmcompose.compose.executor import ComposeResult
    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

__all__ = [
    "DEFAULT_GRID",
    "MAX_GRID_CANDIDATES",
    "SEARCH_DIR",
    "Candidate",
    "InMemoryComposition",
    "InvalidWeights",
    "SearchResult",
    "compose_with_search",
    "mcub_scorer",
    "parse_grid",
    "run_search",
    "search_coefficients",
    "start_weights",
    "with_weights",
    "write_search_report",
]

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
MAX_GRID_CANDIDATES = 500
MAX_PASSES = 3
SEARCH_DIR = "search"  # the report's folder inside the composed model
SEARCHABLE_METHODS = ("linear", "task_arithmetic")  # linear in their inputs: exact as concat
METRICS = {"loglikelihood": "acc,loglikelihood", "generate": "acc,generate"}
Method = Literal["coordinate", "grid"]
Mode = Literal["loglikelihood", "generate"]
Weights = tuple[float, ...]
Scorer = Callable[["MMComposeForCausalLM", "MMProcessor"], float]


# ---------------------------------------------------------------- pure search


class InvalidWeights(MergeError):
    """The merge method refuses these weights (e.g. linear normalising a zero sum): the
    candidate is recorded as invalid and the search goes on."""


@dataclass(frozen=True)
class Candidate:
    """One point of the search. ``cached``: these weights were scored earlier in the search
    (coordinate sweeps revisit the current point), so the score was reused, not recomputed."""

    index: int
    weights: Weights
    accuracy: float | None  # None: the weights are invalid for the method (see ``error``)
    seconds: float
    pass_: int = 0  # coordinate: 1-based pass, 0 for the start point; grid: 0
    swept: int | None = None  # coordinate: the source whose lambda varies in this sweep
    cached: bool = False
    error: str | None = None


@dataclass
class SearchResult:
    """Every candidate in evaluation order and the best one; I/O fields are filled by
    :func:`search_coefficients` (None when the pure :func:`run_search` made it)."""

    method: str
    grid: Weights
    start: Weights
    candidates: list[Candidate]
    best: Candidate
    passes: int = 0
    sources: list[str] = field(default_factory=list)
    mode: str | None = None
    metric: str | None = None
    n_items: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def best_weights(self) -> Weights:
        return self.best.weights

    @property
    def best_accuracy(self) -> float:
        assert self.best.accuracy is not None
        return self.best.accuracy

    def source_names(self) -> list[str]:
        return self.sources or [f"source {i}" for i in range(len(self.start))]

    def rows(self) -> list[dict[str, Any]]:
        """The table: one row per candidate, the weights keyed by source name."""
        names = self.source_names()
        return [
            {
                "index": c.index,
                "pass": c.pass_,
                "swept": None if c.swept is None else names[c.swept],
                "weights": dict(zip(names, c.weights, strict=True)),
                "accuracy": c.accuracy,
                "seconds": round(c.seconds, 4),
                "cached": c.cached,
                "best": c.index == self.best.index,
                **({"error": c.error} if c.error else {}),
            }
            for c in self.candidates
        ]

    def to_json_dict(self) -> dict[str, Any]:
        names = self.source_names()
        return {
            "method": self.method,
            "mode": self.mode,
            "metric": self.metric,
            "n_items": self.n_items,
            "grid": list(self.grid),
            "sources": names,
            "start": dict(zip(names, self.start, strict=True)),
            "best": {
                "weights": dict(zip(names, self.best.weights, strict=True)),
                "accuracy": self.best.accuracy,
                "index": self.best.index,
            },
            "passes": self.passes,
            "evaluated": sum(not c.cached for c in self.candidates),
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            "candidates": self.rows(),
        }

    def to_markdown(self) -> str:
        names = self.source_names()
        what = self.metric or "accuracy"
        items = f" on {self.n_items} items" if self.n_items is not None else ""
        best = ", ".join(f"{n} = {_fmt(w)}" for n, w in zip(names, self.best.weights, strict=True))
        lines = [
            f"# Coefficient search ({self.method}, {what}{items})",
            "",
            f"Best: {best} -> {_fmt(self.best.accuracy)} (candidate {self.best.index}); "
            f"start {_vec(self.start)}, grid {_vec(self.grid)}, {self.passes} pass(es), "
            f"{sum(not c.cached for c in self.candidates)} evaluated in {self.seconds:.1f} s.",
            *([""] + [f"- {n}" for n in self.notes] if self.notes else []),
            "",
            "| # | pass | swept | " + " | ".join(f"lambda {n}" for n in names)
            + " | accuracy | seconds | note |",
            "|" + "---|" * (len(names) + 6),
        ]  # fmt: skip
        for c in self.candidates:
            note = []
            if c.index == self.best.index:
                note.append("**best**")
            if c.cached:
                note.append("cached")
            if c.error:
                note.append(c.error.replace("|", "/").replace("\n", " "))
            swept = "" if c.swept is None else names[c.swept]
            cells = [str(c.index), str(c.pass_), swept, *(_fmt(w) for w in c.weights),
                     _fmt(c.accuracy), f"{c.seconds:.2f}", "; ".join(note)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _vec(xs: Iterable[float]) -> str:
    return "(" + ", ".join(_fmt(x) for x in xs) + ")"


def parse_grid(grid: str | Iterable[float | str]) -> Weights:
    """Candidate lambda values from ``"0,0.5,1"`` or a sequence: finite numbers, at least one;
    repeats are dropped (the order is kept: it breaks ties)."""
    parts = grid.split(",") if isinstance(grid, str) else list(grid)
    values: list[float] = []
    for p in parts:
        try:
            v = float(p.strip() if isinstance(p, str) else p)
        except (TypeError, ValueError):
            raise ConfigError(
                f"grid value {p!r} is not a number",
                hint="give comma-separated numbers, e.g. --grid 0,0.25,0.5,0.75,1",
            ) from None
        if not math.isfinite(v):
            raise ConfigError(f"grid value {p!r} is not finite", hint="use finite numbers")
        if v not in values:
            values.append(v)
    if not values:
        raise ConfigError("the grid is empty", hint="e.g. --grid 0,0.25,0.5,0.75,1")
    return tuple(values)


def _check_choice(name: str, value: str, options: Iterable[str]) -> None:
    options = list(options)
    if value not in options:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(options)}")


def run_search(
    evaluate: Callable[[Weights], float],
    n: int,
    grid: Sequence[float],
    *,
    method: Method = "coordinate",
    start: Sequence[float] | None = None,
    max_passes: int = MAX_PASSES,
    max_candidates: int = MAX_GRID_CANDIDATES,
    on_candidate: Callable[[Candidate], None] | None = None,
) -> SearchResult:
    """Maximise ``evaluate(weights)`` over per-source weights (pure: no I/O).

    ``grid``: every vector of the Cartesian product (refused above ``max_candidates``); ties
    go to the vector nearest ``start`` (L1), then to the earlier one. ``coordinate``: score
    ``start`` (default 1/N each), then sweep one source's lambda over the grid with the others
    fixed and move only on a strict improvement (ties keep the current point, then the earlier
    grid value); repeat passes until one changes nothing, at most ``max_passes``.
    ``evaluate`` may raise :class:`InvalidWeights` for weights the method refuses: the
    candidate is recorded as invalid and never chosen; any other error ends the search.
    """
    _check_choice("search method", method, ("coordinate", "grid"))
    if n < 1:
        raise ConfigError("nothing to search: no sources")
    grid = parse_grid(grid)
    start_w: Weights = tuple(float(x) for x in start) if start is not None else (1.0 / n,) * n
    if len(start_w) != n:
        raise ConfigError(f"{len(start_w)} start weights for {n} sources")
    if method == "grid":
        check_grid_size(n, grid, max_candidates)
    cands: list[Candidate] = []
    memo: dict[Weights, Candidate] = {}

    def score(w: Weights, pass_: int = 0, swept: int | None = None) -> Candidate:
        w = tuple(float(x) for x in w)
        prior = memo.get(w)
        if prior is not None:
            c = Candidate(len(cands), w, prior.accuracy, 0.0, pass_, swept, True, prior.error)
        else:
            t0 = time.perf_counter()
            acc, error = None, None
            try:
                acc = float(evaluate(w))
                if not math.isfinite(acc):
                    acc, error = None, f"score {acc} is not finite"
            except InvalidWeights as e:
                error = e.message
            c = Candidate(len(cands), w, acc, time.perf_counter() - t0, pass_, swept, False, error)
            memo[w] = c
        cands.append(c)
        if on_candidate is not None:
            on_candidate(c)
        return c

    passes = 0
    if method == "grid":
        best: Candidate | None = None
        for w in itertools.product(grid, repeat=n):
            c = score(w)
            if _better_grid(c, best, start_w):
                best = c
    else:
        best = score(start_w)
        for p in range(1, max_passes + 1):
            passes = p
            before = best.weights
            for m in range(n):
                current = best.weights
                for v in grid:
                    c = score((*current[:m], float(v), *current[m + 1 :]), p, m)
                    if _beats(c, best):
                        best = c
            if best.weights == before:
                break
    if best is None or best.accuracy is None:
        errors = sorted({c.error for c in cands if c.error})
        raise MergeError(
            "no candidate weights could be scored: " + "; ".join(errors[:3]),
            hint="choose grid values the merge method accepts (linear with normalize needs "
            "a nonzero sum), or use task_arithmetic",
        )
    return SearchResult(method, grid, start_w, cands, best, passes)


def check_grid_size(n: int, grid: Sequence[float], limit: int = MAX_GRID_CANDIDATES) -> None:
    """Refuse a Cartesian product too large to score."""
    total = len(grid) ** n
    if total > limit:
        raise ConfigError(
            f"grid search over {n} sources x {len(grid)} values is {total} candidates "
            f"(more than {limit})",
            hint="use --search-method coordinate, or a shorter --grid",
        )


def _beats(c: Candidate, best: Candidate | None) -> bool:
    if c.accuracy is None:
        return False
    return best is None or best.accuracy is None or c.accuracy > best.accuracy


def _better_grid(c: Candidate, best: Candidate | None, start: Weights) -> bool:
    if c.accuracy is None:
        return False
    if best is None or best.accuracy is None or c.accuracy > best.accuracy:
        return True
    if c.accuracy < best.accuracy:
        return False
    return _distance(c.weights, start) < _distance(best.weights, start)


def _distance(a: Weights, b: Weights) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- configs with weights


def start_weights(config: ComposeConfig) -> Weights:
    """The config's own weights where every merged model has one scalar weight (its own or
    the global one), else 1/N each (NaiveMC's default)."""
    entries = config.merge_entries
    glob = config.parameters.get("weight")
    found: list[float] = []
    for e in entries:
        w = e.parameters.get("weight", glob)
        if isinstance(w, bool) or not isinstance(w, int | float):
            return (1.0 / len(entries),) * len(entries)
        found.append(float(w))
    return tuple(found)


def with_weights(config: ComposeConfig, weights: Sequence[float]) -> ComposeConfig:
    """The config with ``parameters.weight = w_i`` on the i-th merged model (the models that
    ``merge_entries`` lists); other parameters, and a base listed among the models, unchanged."""
    entries = config.merge_entries
    if len(weights) != len(entries):
        raise ConfigError(f"{len(weights)} weights for {len(entries)} merged models")
    by_id = {id(e): float(w) for e, w in zip(entries, weights, strict=True)}
    models = [
        e.model_copy(update={"parameters": {**e.parameters, "weight": by_id[id(e)]}})
        if id(e) in by_id
        else e
        for e in config.models
    ]
    return config.model_copy(update={"models": models})


def _search_config(config: ComposeConfig, weights: Weights) -> ComposeConfig:
    """The temporary composition that the search loads: the text adapter kept (also for
    NaiveMC, whose shared ``text`` adapter is otherwise folded into W0) in an mmcompose folder."""
    cfg = with_weights(config, weights)
    return cfg.model_copy(update={"output_format": "mmcompose", "lora_output": "adapter"})


def check_searchable(config: ComposeConfig) -> None:
    """Refuse what cannot be re-weighted in memory, before anything is read."""
    if config.merge_method not in SEARCHABLE_METHODS:
        raise ConfigError(
            f"merge_method {config.merge_method!r} cannot be re-weighted in memory: its merged "
            "adapter is not linear in the per-model weights",
            hint="search with merge_method: task_arithmetic (or linear); weights tuned under "
            "one method are not tuned for another",
        )


# ---------------------------------------------------------------- in memory


class InMemoryComposition:
    """A composition written once (with ``weights``) to ``folder`` and loaded; :meth:`apply`
    resets its merged text adapter to any other weights, exactly as composing with them would.

    Only the adapter's B blocks change per candidate; the sources' text factors are read once
    and kept on ``device``. LLM base tensors stay as composed: with ``base_model`` under
    task_arithmetic they are ``base + sum_i w_i (W_i - base)``, which is ``base`` whatever the
    weights when the sources share the base (the usual case; otherwise a note says so).
    """

    def __init__(
        self,
        config: ComposeConfig,
        folder: str | Path,
        weights: Sequence[float] | None = None,
        *,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        import torch

        from mmcompose.compose.executor import compose
        from mmcompose.compose.plan import ConcatAdapter, MergeWeights, open_inputs
        from mmcompose.devices import resolve_device
        from mmcompose.model.config import TEXT_ADAPTER
        from mmcompose.model.lora import lora_layers
        from mmcompose.model.modeling import MMComposeForCausalLM
        from mmcompose.model.processor import MMProcessor

        check_searchable(config)
        self.config = config
        start = tuple(weights) if weights is not None else start_weights(config)
        folder = Path(folder)
        plan = compose(with_weights(config, start), folder, dry_run=True, progress=False).plan
        if plan.mode == "full":
            raise MergeError(
                "the coefficient search needs LoRA-trained sources with a text adapter "
                f"(this composition is {plan.mode!r}: nothing to re-weight in memory)",
                hint="search lambdas for NaiveMC/DAMC compositions of LoRA models; full "
                "fine-tunes are merged as whole weights",
            )
        self.notes: list[str] = []
        if any(isinstance(s, MergeWeights) for s in plan.steps):
            self.notes.append(
                "LLM base tensors are merged against base_model with the start weights and held "
                "fixed during the search (exact when the sources share base_model's weights)"
            )
        if config.merge_method == "linear" and config.parameters.get("normalize", True):
            self.notes.append(
                "linear normalizes the weights (normalize: true): only their ratios matter"
            )
        tmp_plan = compose(_search_config(config, start), folder, progress=progress).plan
        if not any(isinstance(s, ConcatAdapter) for s in tmp_plan.steps):
            raise MergeError("internal: the search composition holds no concatenated adapter")
        self.device = resolve_device(device)
        self.model = MMComposeForCausalLM.from_pretrained(folder, device=self.device)
        self.processor = MMProcessor.from_pretrained(folder)
        compute = getattr(torch, config.dtype) if config.dtype else None
        inputs = open_inputs(config)
        try:
            self.layers: list[tuple[str, Any, list[Any], list[Any], list[float]]] = []
            for name, layer in lora_layers(self.model.language_model):
                if TEXT_ADAPTER not in layer.lora:
                    continue
                key = f"language_model.{name}.lora.{TEXT_ADAPTER}"
                a_s, b_s, scales = [], [], []
                for src in inputs.models:
                    spec = src.config.lora.adapters.get(TEXT_ADAPTER) if src.config.lora else None
                    if spec is None or f"{key}.lora_A" not in src:
                        raise MergeError(f"{src.path} has no text adapter on {name}")
                    a, b = src.get(f"{key}.lora_A"), src.get(f"{key}.lora_B")
                    if compute is not None:
                        a, b = a.to(compute), b.to(compute)
                    a_s.append(a.to(self.device))
                    b_s.append(b.to(self.device))
                    scales.append(spec.scaling)
                self.layers.append((name, layer.lora[TEXT_ADAPTER], a_s, b_s, scales))
        finally:
            for s in [*inputs.models, inputs.base]:
                if s is not None:
                    s.close()

    @staticmethod
    def coefficients(config: ComposeConfig, hf_name: str) -> list[float]:
        """c_i with merged = sum_i c_i dW_i for one tensor, as the executor binds it."""
        from mmcompose.compose.config import bind_method
        from mmcompose.compose.plan import concat_coefficients

        return list(concat_coefficients(bind_method(config, config.merge_entries, hf_name)))

    def apply(self, weights: Sequence[float]) -> None:
        """Set the text adapter to the composition with ``weights`` (in place, exact)."""
        from mmcompose.compose.config import resolve_parameters
        from mmcompose.compose.executor import set_concat_adapter

        cfg = with_weights(self.config, weights)
        entries = cfg.merge_entries
        cache: dict[str, list[float]] = {}
        for name, adapter, a_s, b_s, scales in self.layers:
            hf = f"{name}.weight"
            key = json.dumps(resolve_parameters(cfg, entries, hf), sort_keys=True, default=str)
            if key not in cache:
                try:
                    cache[key] = self.coefficients(cfg, hf)
                except MMComposeError as e:
                    raise InvalidWeights(e.message, hint=e.hint) from None
            coeffs = [c * s for c, s in zip(cache[key], scales, strict=True)]
            set_concat_adapter(name, adapter, list(zip(a_s, b_s, strict=True)), coeffs, b_only=True)


# ---------------------------------------------------------------- scoring


def mcub_scorer(
    questions: str | Path,
    answers: str | Path | None = None,
    *,
    mode: Mode = "loglikelihood",
    batch_size: int = 8,
    max_new_tokens: int = 8,
) -> tuple[Scorer, int]:
    """A scorer ``(model, processor) -> accuracy`` on an MCUB-format file, and its item count."""
    _check_choice("search mode", mode, METRICS)
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
    if not isinstance(config, ComposeConfig):
        config = load_compose_config(config)
    grid = parse_grid(grid)
    _check_choice("search method", method, ("coordinate", "grid"))
    _check_choice("search mode", mode, METRICS)
    check_searchable(config)
    n = len(config.merge_entries)
    if method == "grid":
        check_grid_size(n, grid)
    if max_passes < 1:
        raise ConfigError(f"max_passes is {max_passes}", hint="search at least one pass")
    start_w = tuple(float(x) for x in start) if start is not None else start_weights(config)
    n_items = None
    if scorer is None:
        if val_questions is None:
            raise ConfigError("no validation data", hint="pass --search VAL.json (MCUB format)")
        scorer, n_items = mcub_scorer(
            val_questions, val_answers, mode=mode, batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    from mmcompose.model.encode_memo import active, memoized_encoders

    with tempfile.TemporaryDirectory(prefix=".mmcompose-search-", dir=workdir) as tmp:
        mem = InMemoryComposition(config, Path(tmp) / "model", start_w, device=device)
        bar = _bar(method, len(grid) ** n if method == "grid" else None, progress)

        def evaluate(w: Weights) -> float:
            mem.apply(w)
            return scorer(mem.model, mem.processor)

        def tick(c: Candidate) -> None:
            if bar is not None:
                bar.update(1)
                if c.accuracy is not None:
                    bar.set_postfix(acc=f"{c.accuracy:.4g}", refresh=False)

        # Frozen encoders see the same validation inputs for every candidate: encode once
        # (in the caller's memo when there is one).
        try:
            with memoized_encoders(active()):
                result = run_search(
                    evaluate,
                    n,
                    grid,
                    method=method,
                    start=start_w,
                    max_passes=max_passes,
                    on_candidate=tick,
                )
        finally:
            if bar is not None:
                bar.close()
        notes = mem.notes
    result.sources = _source_names(config)
    result.mode = mode if n_items is not None else None
    result.metric = METRICS[mode] if n_items is not None else "score"
    result.n_items = n_items
    result.notes = notes
    result.seconds = time.perf_counter() - t0
    return result


def _bar(method: str, total: int | None, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"lambda search ({method})", unit="candidate", leave=False)


def _source_names(config: ComposeConfig) -> list[str]:
    """Short unique names: each merged model's folder name (its path where names repeat)."""
    paths = [e.model for e in config.merge_entries]
    names = [p.name or str(p) for p in paths]
    if len(set(names)) < len(names):
        return [str(p) for p in paths]
    return names


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
        labels = [_fmt(grid[i]) for i in order]
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
        f"{result.method} search; best {_vec(best.weights)} -> {_fmt(best.accuracy)}",
        fontsize="medium",
    )
    fig.savefig(path, dpi=100)


def _sweeps(result: SearchResult) -> dict[tuple[int, int], list[tuple[float, float]]]:
    out: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for c in result.candidates:
        if c.swept is not None and c.accuracy is not None:
            out.setdefault((c.pass_, c.swept), []).append((c.weights[c.swept], c.accuracy))
    return out


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
    from mmcompose.compose.executor import compose
    from mmcompose.fs import refuse_existing

    if not isinstance(config, ComposeConfig):
        config = load_compose_config(config)
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)  # before a search that may take long
    search.setdefault("workdir", out_dir.parent)  # the temporary model on the output's disk
    result = search_coefficients(
        config, val_questions, val_answers, device=device, progress=progress, **search
    )
    best = with_weights(config, result.best_weights)
    composed = compose(
        best,
        out_dir,
        device=device,
        force=force,
        allow_nonfinite=allow_nonfinite,
        progress=progress,
        before_commit=lambda tmp: write_search_report(result, tmp / SEARCH_DIR),
    )
    return result, composed
