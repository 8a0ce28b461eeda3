"""The reproduction's rows for the other ways to compose the shared (NaiveMC-style) sources:
MMER, TIES, DARE and NaiveMC with the label-free lambda search (issue: every method on the
benchmark). Each is one more composition of the same single-modality models, on the job's
whole MCUB set and each modality's test split (like the ablation rows, not on every subset).

The settings, each method at its paper's own choice where the paper makes one:

- ``TIES`` (Yadav et al., NeurIPS 2023): keep the top 20% of each task vector by magnitude
  (the paper's k = 20), elect signs, average the agreeing entries (mergekit's ``ties`` with
  ``normalize: true``), lambda 1, weight 1 per source.
- ``DARE`` (Yu et al., ICML 2024) with task arithmetic (mergekit's ``dare_linear``): drop each
  delta entry with p = 0.5 and rescale the rest by 1 / (1 - p), then NaiveMC's average
  (weight 1/N each), so its expected delta is NaiveMC's; seeded (``seed: 0``).
- ``MMER`` (Li et al., ACL 2025): the TIES merge above as tau*, and per-modality masks by
  :func:`mmcompose.compose.masks.tall_mask` at the default ``mask_lambda`` (``composition:
  mmer``), so MMER's row differs from TIES's by the masks alone.
- ``NaiveMC + label-free search``: task arithmetic with the lambdas chosen by AdaMMS's
  generation consistency (:mod:`mmcompose.compose.search_unlabelled`) on the same validation
  questions as the labelled search, their gold letters never read, over
  ``Budget.unlabelled_grid`` (AdaMMS compares neighbouring coefficients, so the grid has 4
  values where the labelled search's has 2).

Only the standard library and :func:`mmcompose.pipeline.digest` are imported at module level
(builders come from :mod:`mmcompose.job_build` when a plan runs), so importing the row names
is cheap and safe from anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from mmcompose.pipeline import digest

if TYPE_CHECKING:
    from pathlib import Path

    from mmcompose.quickstart import Job, Model

__all__ = [
    "DARE",
    "LABEL_FREE",
    "METHOD_ROWS",
    "MMER",
    "TIES",
    "method_config",
    "method_key",
    "method_plans",
    "unlabelled_key",
]

MMER = "MMER"
TIES = "TIES"
DARE = "DARE"
LABEL_FREE = "NaiveMC + label-free search"
METHOD_ROWS = (MMER, TIES, DARE, LABEL_FREE)
# row -> (cache group, compose config without its models, per-source weight: None = 1/N)
_TIES = {"merge_method": "ties", "parameters": {"density": 0.2}}
_DARE = {"merge_method": "dare_linear", "parameters": {"density": 0.5}, "seed": 0}
SETTINGS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    MMER: ("mmer", {**_TIES, "composition": "mmer", "mmer": {"mask_lambda": 1.0}}, 1.0),
    TIES: ("ties", _TIES, 1.0),
    DARE: ("dare", _DARE, None),
}


def method_config(row: str, source_paths: Sequence[str | Path]) -> dict[str, Any]:
    """The compose config (as the YAML would hold it) of one of the method rows."""
    _, cfg, w = SETTINGS[row]
    weight = 1.0 / len(source_paths) if w is None else w
    models = [{"model": str(p), "parameters": {"weight": weight}} for p in source_paths]
    return {**cfg, "models": models}


def method_key(row: str, source_keys: list[str], version: str) -> str:
    """Its sources, its settings (so a changed setting makes a new entry), the version."""
    group, cfg, w = SETTINGS[row]
    return digest("method", group, cfg, w, source_keys, version)


def unlabelled_key(source_keys: list[str], budget: Any, search_set: str, version: str) -> str:
    """As the labelled search's keys, with the criterion and its own grid."""
    return digest(
        "naive-unlabelled",
        "consistency",
        source_keys,
        list(budget.unlabelled_grid),
        budget.search_passes,
        search_set,
        version,
    )


def method_plans(
    job: Job,
    shared: Sequence[Model],
    search: tuple[Path, Path],
    search_digest: str,
    tag: str,
) -> list[tuple[str, str, str, Any, str]]:
    """The compose stage's plans (row, cache group, key, builder, label) for the method rows
    over the shared sources of one seed; none unless the budget asks for them."""
    from mmcompose import job_build

    if not getattr(job.budget, "methods", False):
        return []
    keys = [m.key for m in shared]
    plans: list[tuple[str, str, str, Any, str]] = []
    for row, (group, _, _) in SETTINGS.items():
        build = partial(job_build.compose_method, row, shared)
        plans.append((row, group, method_key(row, keys, job.version), build, row))
    plans.append(
        (
            LABEL_FREE,
            "naivemc-unlabelled",
            unlabelled_key(keys, job.budget, search_digest, job.version),
            partial(job_build.compose_unlabelled, job, shared, search, LABEL_FREE + tag),
            LABEL_FREE,
        )
    )
    return plans
