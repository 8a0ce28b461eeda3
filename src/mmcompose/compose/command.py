"""The ``mmcompose compose`` command: its option checks, then a plain composition or a lambda
search followed by the composition with the best lambdas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmcompose.errors import ConfigError

if TYPE_CHECKING:
    from mmcompose.compose.executor import ComposeResult
    from mmcompose.compose.search import SearchResult


@dataclass
class SearchedComposition:
    """A lambda search and the composition made with its best weights."""

    found: SearchResult
    composed: ComposeResult

    def summary(self) -> str:
        from mmcompose.compose.search import SEARCH_DIR

        f = self.found
        best = ", ".join(
            f"{n}={w:g}" for n, w in zip(f.source_names(), f.best_weights, strict=True)
        )
        evaluated = sum(not c.cached for c in f.candidates)
        return (
            f"search ({f.method}, {f.metric}): best {best} -> {f.best_accuracy:.4g} after "
            f"{evaluated} candidates in {f.seconds:.1f} s; report in "
            f"{self.composed.out_dir / SEARCH_DIR}\n{self.composed.summary()}"
        )


def check_search_options(
    search: Path | None,
    *,
    dry_run: bool = False,
    search_answers: Path | None = None,
    grid: str | None = None,
    search_passes: int | None = None,
    search_unlabelled: Path | None = None,
) -> None:
    """Search options only make sense with ``--search`` or ``--search-unlabelled`` (one of
    them: gold answers and no labels exclude each other), and a search is never a dry run."""
    if search is not None and search_unlabelled is not None:
        raise ConfigError(
            "--search and --search-unlabelled both given",
            hint="search with gold answers (--search VAL.json) or without (--search-unlabelled "
            "INPUTS), not both",
        )
    if search_unlabelled is not None and search_answers is not None:
        raise ConfigError(
            "--search-answers cannot be used with --search-unlabelled (it searches without labels)",
            hint="drop --search-answers, or search on them with --search VAL.json",
        )
    if search is None and search_unlabelled is None:
        given = [
            flag
            for flag, v in (
                ("--search-answers", search_answers),
                ("--grid", grid),
                ("--search-passes", search_passes),
            )
            if v is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} needs --search VAL.json or --search-unlabelled INPUTS",
                hint="add --search with MCUB-format validation questions, or drop "
                + ", ".join(given),
            )
    elif dry_run:
        flag = "--search" if search is not None else "--search-unlabelled"
        raise ConfigError(
            f"--dry-run cannot be combined with {flag} (the search scores real models)",
            hint="run --dry-run alone to check the plan",
        )


def run_compose(
    config: Path,
    out_dir: Path,
    *,
    dry_run: bool = False,
    device: str = "cpu",
    force: bool = False,
    allow_nonfinite: bool = False,
    search: Path | None = None,
    search_answers: Path | None = None,
    grid: str | None = None,
    search_mode: str = "loglikelihood",
    search_method: str = "coordinate",
    search_passes: int | None = None,
    search_unlabelled: Path | None = None,
) -> ComposeResult | SearchedComposition:
    """Check the options (device included) before any work, then compose, searching the
    lambdas first when ``search`` names validation questions (or, without labels, when
    ``search_unlabelled`` names inputs: :mod:`mmcompose.compose.search_unlabelled`).

    The options, the YAML file and the output path are checked before the composition code
    (torch, 1-3 s to import) is: a typo is answered in well under a second."""
    from mmcompose.devices import check_device
    from mmcompose.fs import refuse_existing
    from mmcompose.io import load_yaml

    check_search_options(
        search,
        dry_run=dry_run,
        search_answers=search_answers,
        grid=grid,
        search_passes=search_passes,
        search_unlabelled=search_unlabelled,
    )
    if search_unlabelled is not None:
        from mmcompose.compose.search_unlabelled import check_unlabelled_path

        check_unlabelled_path(search_unlabelled)  # a typo: before torch
    check_device(device)
    load_yaml(config, "compose config")  # a missing or malformed file: before torch
    if not dry_run:
        refuse_existing(out_dir, force)
    from mmcompose.compose.config import load_compose_config

    cfg = load_compose_config(config)  # its schema needs neither torch nor the model code
    if search is None and search_unlabelled is None:
        from mmcompose.compose.executor import compose

        return compose(
            cfg,
            out_dir,
            dry_run=dry_run,
            device=device,
            force=force,
            allow_nonfinite=allow_nonfinite,
        )
    from mmcompose.compose.search import DEFAULT_GRID, MAX_PASSES, compose_with_search

    if search_unlabelled is not None:
        from mmcompose.compose.search_unlabelled import (
            UNLABELLED_GRID,
            compose_with_unlabelled_search,
        )

        run, inputs, default_grid = (
            compose_with_unlabelled_search,
            (search_unlabelled,),
            UNLABELLED_GRID,
        )
    else:
        run, inputs, default_grid = compose_with_search, (search, search_answers), DEFAULT_GRID
    found, composed = run(
        cfg,
        out_dir,
        *inputs,
        force=force,
        device=device,
        allow_nonfinite=allow_nonfinite,
        grid=default_grid if grid is None else grid,
        method=search_method,
        mode=search_mode,
        max_passes=MAX_PASSES if search_passes is None else search_passes,
    )
    return SearchedComposition(found, composed)


__all__ = ["SearchedComposition", "check_search_options", "run_compose"]
