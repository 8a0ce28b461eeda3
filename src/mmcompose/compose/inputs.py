"""The composition's inputs: opening the sources, and sorting one source's tensors by role.

A source's tensors are LLM base weights (``language_model.*``), LoRA factors
(``language_model.<linear>.lora.<adapter>.lora_A/B``), tower weights (``towers.<modality>.*``
for a modality its config lists) or other; the planner decides the fate of each role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mmcompose.compose.config import ComposeConfig, ModelEntry
from mmcompose.compose.sources import Source, open_source

LLM = "language_model."
TOWERS = "towers."
_LORA = re.compile(r"^(language_model\..+)\.lora\.([^.]+)\.lora_([AB])$")


@dataclass
class Inputs:
    """The opened sources: the models to merge (with their config entries) and the base."""

    entries: list[ModelEntry]
    models: list[Source]
    base: Source | None


def open_inputs(config: ComposeConfig) -> Inputs:
    """Open every referenced folder (see ``ComposeConfig.merge_entries`` for the base)."""
    entries = config.merge_entries
    models = [open_source(e.model, e.importer, **e.importer_options) for e in entries]
    base = None
    if config.base_model is not None:
        listed = [
            m for e, m in zip(entries, models, strict=True) if same_path(e.model, config.base_model)
        ]
        base = listed[0] if listed else open_source(config.base_model)
    return Inputs(entries, models, base)


def same_path(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@dataclass
class Anatomy:
    """A source's tensors by role."""

    llm: list[str] = field(default_factory=list)
    lora: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (lin, ad) -> A/B
    towers: dict[str, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)


def anatomy(src: Source) -> Anatomy:
    out = Anatomy()
    modalities = set(src.config.modalities)
    for name in src:
        m = _LORA.match(name)
        if m:
            out.lora.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = name
        elif name.startswith(LLM):
            out.llm.append(name)
        elif name.startswith(TOWERS) and name.split(".")[1] in modalities:
            out.towers.setdefault(name.split(".")[1], []).append(name)
        else:
            out.other.append(name)
    return out
