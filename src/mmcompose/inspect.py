"""Describe a model folder from config.json and the safetensors headers, without loading
weights (fast even for multi-GB checkpoints); of an MMER model only the packed masks are
read, to count their density."""

from __future__ import annotations

from collections import defaultdict
from math import prod
from pathlib import Path
from typing import Any

from mmcompose.io import open_safetensors, weight_files
from mmcompose.model.config import MMConfig

_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
_ITEM_BYTES |= {"U8": 1, "BOOL": 1}


def describe(path: str | Path) -> dict[str, Any]:
    config = MMConfig.from_dir(path)
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes: dict[str, int] = {}
    ones: dict[str, int] = {}
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, f in weight_files(path).items():
        by_file[f].append(name)
    for f, names in by_file.items():
        with open_safetensors(f, framework="numpy") as h:
            for n in names:
                sl = h.get_slice(n)
                shapes[n] = tuple(sl.get_shape())
                nbytes[n] = prod(shapes[n]) * _ITEM_BYTES.get(sl.get_dtype(), 4)
                if ".mmer.mask." in n:  # packed bits: the only tensors read
                    ones[n] = _popcount(h.get_tensor(n))
    counts: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        if ".mmer." not in name:  # MMER's delta and masks are buffers, reported under "mmer"
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
        "mmer": _mmer(config, shapes, nbytes, ones),
        "total_params": sum(counts.values()),
        "num_tensors": len(shapes),
    }


def _popcount(packed: Any) -> int:
    """Set bits of a packed uint8 mask (its padding bits are zero)."""
    import numpy as np

    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return int(table[np.asarray(packed, dtype=np.uint8)].sum(dtype=np.int64))


def _mmer(
    config: MMConfig,
    shapes: dict[str, tuple[int, ...]],
    nbytes: dict[str, int],
    ones: dict[str, int],
) -> dict[str, Any] | None:
    """MMER masks: per modality, the fraction of the merged delta its tokens see (density)
    and the masks' bytes on disk; the dense merged delta's size."""
    if config.mmer is None:
        return None
    deltas = [n for n in shapes if n.endswith(".mmer.delta")]
    entries = sum(prod(shapes[n]) for n in deltas)
    masks = []
    for m in config.mmer.modalities:
        names = [n for n in ones if n.endswith(f".mmer.mask.{m}")]
        kept = sum(ones[n] for n in names)
        masks.append(
            {
                "modality": m,
                "density": kept / entries if entries else 0.0,
                "kept": kept,
                "bytes": sum(nbytes[n] for n in names),
            }
        )
    return {
        "mask_rule": config.mmer.mask_rule,
        "mask_lambda": config.mmer.mask_lambda,
        "merge_method": config.mmer.merge_method,
        "target_modules": list(config.mmer.target_modules),
        "layers": len(deltas),
        "delta_params": entries,
        "delta_bytes": sum(nbytes[n] for n in deltas),
        "masks": masks,
    }


def human_bytes(n: float) -> str:
    """A size for people: 1234567 -> 1.2 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(x: int) -> str:
    """A parameter count for people: 1234567 -> 1.23M."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def param_group(name: str) -> str:
    """A tensor's part: language_model, lora.<adapter>, mmer.{delta,mask.<m>},
    towers.<m>.{encoder,projector,tokens}."""
    if name.startswith("towers."):
        parts = name.split(".")
        return (
            ".".join(parts[:3])
            if parts[2] in ("encoder", "projector")
            else f"towers.{parts[1]}.tokens"
        )
    if ".lora." in name:
        return "lora." + name.split(".lora.")[1].split(".")[0]
    if ".mmer." in name:  # mmer.delta, mmer.mask.<modality>
        return "mmer." + name.split(".mmer.")[1]
    return "language_model"


def _users(config: MMConfig, adapter: str) -> list[str]:
    kinds = ["text", *config.modalities]
    return [k for k in kinds if config.lora and config.lora.adapter_for(k) == adapter]
