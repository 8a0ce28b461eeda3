"""Describe a model folder from config.json and the safetensors headers, without loading
weights (fast even for multi-GB checkpoints)."""

from __future__ import annotations

from collections import defaultdict
from math import prod
from pathlib import Path
from typing import Any

from mmcompose.io import open_safetensors, weight_files
from mmcompose.model.config import MMConfig


def describe(path: str | Path) -> dict[str, Any]:
    config = MMConfig.from_dir(path)
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in weight_files(path).items():
        by_file[f].append(name)
    for f, names in by_file.items():
        with open_safetensors(f) as h:
            for n in names:
                shapes[n] = tuple(h.get_slice(n).get_shape())
    counts: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        counts[param_group(name)] += prod(shape)
    text = config.text_config
    towers = [
        {
            "modality": t.modality,
            "encoder": t.encoder.name,
            "projector": t.projector.name,
            "prefix_tokens": t.num_prefix,
            "suffix_tokens": t.num_suffix,
            "frozen_encoder": t.freeze_encoder,
            "encoder_params": counts.get(f"towers.{t.modality}.encoder", 0),
            "projector_params": counts.get(f"towers.{t.modality}.projector", 0)
            + counts.get(f"towers.{t.modality}.tokens", 0),
        }
        for t in config.towers
    ]
    adapters = []
    if config.lora:
        for name, spec in config.lora.adapters.items():
            adapters.append(
                {
                    "name": name,
                    "rank": spec.rank,
                    "alpha": spec.alpha,
                    "used_by": _users(config, name),
                    "params": counts.get(f"lora.{name}", 0),
                }
            )
    return {
        "path": str(Path(path).absolute()),
        "llm": {
            "model_type": text.get("model_type"),
            "hidden_size": text.get("hidden_size"),
            "num_layers": text.get("num_hidden_layers"),
            "vocab_size": text.get("vocab_size"),
            "params": counts.get("language_model", 0),
        },
        "dtype": config.dtype,
        "lora": None
        if config.lora is None
        else {
            "strategy": config.lora.strategy,
            "target_modules": list(config.lora.target_modules),
            "adapters": adapters,
        },
        "towers": towers,
        "total_params": sum(counts.values()),
        "num_tensors": len(shapes),
    }


def human_count(x: int) -> str:
    """A parameter count for people: 1234567 -> 1.23M."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def param_group(name: str) -> str:
    """A tensor's part: language_model, lora.<adapter>, towers.<m>.{encoder,projector,tokens}."""
    if name.startswith("towers."):
        parts = name.split(".")
        return (
            ".".join(parts[:3])
            if parts[2] in ("encoder", "projector")
            else f"towers.{parts[1]}.tokens"
        )
    if ".lora." in name:
        return "lora." + name.split(".lora.")[1].split(".")[0]
    return "language_model"


def _users(config: MMConfig, adapter: str) -> list[str]:
    kinds = ["text", *config.modalities]
    return [k for k in kinds if config.lora and config.lora.adapter_for(k) == adapter]
