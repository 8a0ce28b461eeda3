"""Model cards: the README.md that ``compose`` and ``train`` write into every model folder.

The layout is the Hugging Face Hub's (YAML front matter, then markdown), as mergekit writes
one for its merges (``mergekit/card.py``): ``base_model``, ``library_name``, ``tags``,
``pipeline_tag`` and ``modalities`` up front; then the sources, the method, each source's
weights (lambdas), the config that made the model as a YAML block, and evaluation results.

Results: ``mmcompose eval MODEL -o MODEL/eval`` keeps them in the folder; the card lists every
``eval/**/results_*.json`` found when it is written, and :func:`refresh_card` rewrites a card
we wrote (``eval`` does not call it yet), so it comes into step. :func:`render_card` is pure (facts -> markdown); :func:`card_facts` reads them
from a folder's own records (config.json, composition_report.json or train_config.json and
train_log.jsonl, eval/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
REPORT_NAME = "composition_report.json"
TRAIN_CONFIG = "train_config.json"
TRAIN_LOG = "train_log.jsonl"
EVAL_DIR = "eval"
#: The line every card we write holds: :func:`refresh_card` rewrites only such cards.
MARKER = "<!-- model card written by mmcompose (mmcompose.model.card.refresh_card) -->"

# Hub pipeline tags, the first modality the model has wins; text only: text generation.
_PIPELINE = {
    "image": "image-text-to-text",
    "video": "video-text-to-text",
    "audio": "audio-text-to-text",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name; local paths are absolute


@dataclass
class Result:
    task: str
    metric: str
    value: Any
    n: int | None
    source: str  # results file, relative to the model folder


@dataclass
class CardFacts:
    """What a card says; gathered by :func:`card_facts`, rendered by :func:`render_card`."""

    name: str
    kind: str  # "compose" or "train"
    method: str  # merge method, or the training recipe
    sources: list[dict[str, Any]]  # {"model": path or id, "role": ..., "parameters": {...}}
    config: dict[str, Any]  # the config that made the model
    modalities: list[str] = field(default_factory=list)
    composition: str | None = None  # naivemc | damc | mmer
    library_name: str = "mmcompose"  # "transformers" for a plain (text-only hf) folder
    base_llm: str | None = None
    adapters: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)


def hub_ids(names: Sequence[str | None]) -> list[str]:
    """The names that are Hub repository ids (``owner/name``), in order, once each: the
    front matter's ``base_model`` names models on the Hub only, as mergekit's does."""
    return list(dict.fromkeys(n for n in names if n and _HUB_ID.match(str(n))))


def front_matter(f: CardFacts) -> dict[str, Any]:
    tags = ["mmcompose", "multimodal", "merge" if f.kind == "compose" else "trained"]
    tags += [t for t in (f.method, f.composition) if t and t not in tags]
    tags += [m for m in f.modalities if m not in tags]
    pipeline = next((_PIPELINE[m] for m in f.modalities if m in _PIPELINE), "text-generation")
    bases = hub_ids([f.base_llm, *(str(s["model"]) for s in f.sources)])
    return {
        "base_model": bases,
        "library_name": f.library_name,
        "tags": tags,
        "pipeline_tag": pipeline,
        "modalities": ["text", *f.modalities],
    }


def render_card(f: CardFacts) -> str:
    """The card's markdown: YAML front matter, then what the model is and how it was made."""
    meta = yaml.safe_dump(front_matter(f), sort_keys=False).strip()
    made = (
        f"a composition (`{f.method}` merge" + (f", {f.composition}" if f.composition else "") + ")"
        if f.kind == "compose"
        else f"trained by `mmcompose train` ({f.method})"
    )
    towers = ", ".join(f.modalities) or "none (text only)"
    lines = [
        "---",
        meta,
        "---",
        MARKER,
        f"# {f.name}",
        "",
        f"This model is {made}, written by mmcompose.",
        "",
        f"- Base LLM: {_md(f.base_llm) if f.base_llm else 'see the sources'}",
        f"- Modality towers: {towers}",
        f"- LoRA adapters: {', '.join(f.adapters) or 'none (folded into the weights or absent)'}",
        *(f"- {n}" for n in f.notes),
        "",
        "## Sources",
        "",
        "| # | model | role | parameters (weight = lambda) |",
        "|---|---|---|---|",
        *(
            f"| {i} | {_md(s['model'])} | {s.get('role') or '-'} | {_params(s.get('parameters'))} |"
            for i, s in enumerate(f.sources)
        ),
        "",
        "## Configuration",
        "",
        "The configuration that produced this model:",
        "",
        "```yaml",
        yaml.safe_dump(f.config, sort_keys=False).strip(),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if f.results:
        lines += ["| task | metric | value | n | results file |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.task} | {r.metric} | {_value(r.value)} | {r.n if r.n is not None else '-'} "
            f"| {r.source} |"
            for r in f.results
        ]
    else:
        lines.append(
            f"No results yet (results go in `{EVAL_DIR}/`: `mmcompose eval DIR -o DIR/eval`)."
        )
    if f.library_name == "mmcompose":
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "import mmcompose  # registers the model type with transformers' Auto classes",
            "from transformers import AutoModelForCausalLM, AutoProcessor",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'processor = AutoProcessor.from_pretrained("path/to/this/folder")',
            "```",
        ]
    return "\n".join(lines) + "\n"


def _md(name: Any) -> str:
    s = str(name)
    return f"[{s}](https://huggingface.co/{s})" if hub_ids([s]) else f"`{s}`"


def _params(p: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in (p or {}).items()) or "-"


def _value(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- facts from a folder


def read_results(folder: Path) -> list[Result]:
    """Every metric of every ``eval/**/results_*.json`` (lm-eval layout) in the folder."""
    out: list[Result] = []
    for path in sorted((folder / EVAL_DIR).rglob("results_*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged results file is no result; the card is still written
        if not isinstance(doc, dict):
            continue
        for task, block in (doc.get("results") or {}).items():
            if not isinstance(block, dict):
                continue
            n = block.get("sample_len")
            for key, value in block.items():
                if "," in key and "_stderr," not in key and isinstance(value, int | float):
                    metric = key.removesuffix(",none")
                    out.append(Result(task, metric, value, n, str(path.relative_to(folder))))
    return out


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def card_facts(folder: str | Path, name: str | None = None) -> CardFacts:
    """The facts of a model folder written by ``compose`` or ``train``."""
    folder = Path(folder)
    config = _json(folder / "config.json") or {}
    mm = config if config.get("model_type") == "mmcompose" else None
    text = (mm or {}).get("text_config") or config
    modalities = [t["modality"] for t in (mm or {}).get("towers", [])]
    adapters = list(((mm or {}).get("lora") or {}).get("adapters", {}))
    base_llm = text.get("_name_or_path") or None
    common = {
        "name": name or folder.name,
        "modalities": modalities,
        "adapters": adapters,
        "library_name": "mmcompose" if mm else "transformers",
        "results": read_results(folder),
    }
    report = _json(folder / REPORT_NAME)
    if report is not None:
        return _compose_facts(report, base_llm, common)
    train = _json(folder / TRAIN_CONFIG)
    if train is not None:
        return _train_facts(train, folder, common)
    return CardFacts(kind="compose", method="unknown", sources=[], config={}, **common)


def _compose_facts(report: dict[str, Any], base_llm: str | None, common: dict) -> CardFacts:
    cfg = report.get("config") or {}
    base = cfg.get("base_model")
    sources = [
        {
            "model": e.get("model"),
            "role": "base" if base and e.get("model") == base else "merged",
            "parameters": {**(cfg.get("parameters") or {}), **(e.get("parameters") or {})},
        }
        for e in cfg.get("models", [])
    ]
    if base and all(s["model"] != base for s in sources):
        sources.insert(0, {"model": base, "role": "base", "parameters": {}})
    notes = [f"Output format: {report.get('output_format')}"] if report.get("output_format") else []
    counts = report.get("counts") or {}
    if counts:
        notes.append(
            f"Tensors: {counts.get('merged', 0)} merged, {counts.get('carried', 0)} carried, "
            f"{counts.get('dropped', 0)} dropped (details in {REPORT_NAME})"
        )
    return CardFacts(
        kind="compose",
        method=str(report.get("merge_method") or cfg.get("merge_method")),
        composition=report.get("composition"),
        sources=sources,
        config=cfg,
        base_llm=str(base) if base and not base_llm else base_llm,
        notes=notes,
        **common,
    )


def _train_facts(train: dict[str, Any], folder: Path, common: dict) -> CardFacts:
    tower = train.get("tower") or {}
    lora = train.get("lora") or {}
    recipe = "stage 1: projector; stage 2: projector + LoRA"
    notes = [f"Training data: {train.get('data')} (split {train.get('split', 'train')})"]
    log = folder / TRAIN_LOG
    if log.is_file():
        last: dict[Any, float] = {}
        for line in log.read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if "loss" in row:
                last[row.get("stage")] = row["loss"]
        notes += [f"Final training loss, stage {s}: {v:.4f}" for s, v in sorted(last.items())]
    enc = (tower.get("encoder") or {}).get("name")
    proj = (tower.get("projector") or {}).get("name")
    sources = [
        {"model": train.get("base_llm"), "role": "base LLM", "parameters": {}},
        {"model": f"{enc} encoder, {proj} projector", "role": "tower", "parameters": {}},
    ]
    if train.get("init_from"):
        sources.append({"model": train["init_from"], "role": "tower init", "parameters": {}})
    return CardFacts(
        kind="train",
        method=recipe,
        composition=lora.get("strategy"),
        sources=sources,
        config=train,
        base_llm=str(train.get("base_llm")),
        notes=notes,
        **common,
    )


def write_card(folder: str | Path, name: str | None = None) -> Path:
    """Write ``folder/README.md`` from the folder's own records (callers make it atomic)."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_card(card_facts(folder, name)), encoding="utf-8")
    return path


def refresh_card(folder: str | Path) -> Path | None:
    """Rewrite a card mmcompose wrote (a card without :data:`MARKER`, e.g. edited by hand
    into another, is left alone); None when nothing was written."""
    from mmcompose.fs import atomic_file

    folder = Path(folder)
    path = folder / CARD_NAME
    if path.is_file() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    name = _card_name(path) if path.is_file() else None
    with atomic_file(path) as tmp:
        tmp.write_text(render_card(card_facts(folder, name)), encoding="utf-8")
    return path


def _card_name(path: Path) -> str | None:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


__all__ = ["CardFacts", "card_facts", "front_matter", "refresh_card", "render_card", "write_card"]
