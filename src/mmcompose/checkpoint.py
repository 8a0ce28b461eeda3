"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder holding ``state.safetensors`` (weights, optimizer moments, RNG states
as uint8 tensors) and ``state.json`` (step, schedule, config digest, logs, optimizer
param_groups, and the tensor file's SHA-256). The folder is written with
:func:`mmcompose.fs.atomic_dir`, so a kill at any point leaves the previous checkpoint whole.

Loading never runs code from the files: safetensors and JSON are data formats. A folder with a
checkpoint of older mmcompose versions (``state.pt`` / ``checkpoint.pt``, pickles) is refused
without being opened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mmcompose.errors import CheckpointError
from mmcompose.fs import atomic_dir, fault_point, sha256_file, write_json_atomic

__all__ = [
    "LEGACY_NAMES",
    "META_NAME",
    "TENSORS_NAME",
    "load_checkpoint",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "save_checkpoint",
]

TENSORS_NAME = "state.safetensors"
META_NAME = "state.json"
LEGACY_NAMES = ("state.pt", "checkpoint.pt")
FORMAT = 1


def save_checkpoint(
    folder: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> None:
    """Replace the checkpoint at ``folder`` in one atomic step; ``meta`` must be JSON data."""
    from safetensors.torch import save_file

    # Copies: safetensors refuses tensors sharing memory (tied or viewed weights).
    data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(data, str(tmp / TENSORS_NAME))
        fault_point("checkpoint:tensors")
        doc = {"format": FORMAT, "tensors_sha256": sha256_file(tmp / TENSORS_NAME), **meta}
        write_json_atomic(tmp / META_NAME, doc)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and metadata at ``folder``, or None if there is no checkpoint.

    Anything else there (an old pickle checkpoint, a damaged or foreign file) is a
    :class:`CheckpointError` naming the file; nothing in it is executed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists():
        return None
    hint = f"delete {folder} to start over"
    for name in LEGACY_NAMES:
        if (folder / name).exists():
            raise CheckpointError(
                f"{folder / name} is a pickle checkpoint (older mmcompose); it is not loaded, "
                "since unpickling can run any code",
                hint=hint,
            )
    tensors_path, meta_path = folder / TENSORS_NAME, folder / META_NAME
    if not folder.is_dir() or not meta_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(
            f"{folder} is not an mmcompose checkpoint (it needs {TENSORS_NAME} and {META_NAME})",
            hint=hint,
        )

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {folder} is damaged: {what}", hint=hint)

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise damaged(f"{META_NAME} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise damaged(f"{META_NAME} is not a format-{FORMAT} checkpoint header")
    if sha256_file(tensors_path) != meta.get("tensors_sha256"):
        raise damaged(f"{TENSORS_NAME} does not match the SHA-256 in {META_NAME}")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise damaged(f"{TENSORS_NAME} is not readable ({exc})") from None
    return tensors, meta


def optimizer_to_flat(
    state: Mapping[str, Any], prefix: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict()`` as named tensors plus JSON (param_groups, scalars).

    Tensor ``{prefix}/{param}/{key}`` holds ``state[param][key]``; integer parameter keys
    survive the trip (JSON object keys are strings, the optimizer's are ints).
    """
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        slots: dict[str, Any] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}/{pid}/{key}"] = value
                slots[key] = None
            else:
                slots[key] = {"value": value}
        layout[str(pid)] = slots
    return tensors, {"param_groups": state["param_groups"], "state": layout}


def optimizer_from_flat(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str
) -> dict:
    """The inverse of :func:`optimizer_to_flat`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    try:
        for pid, slots in meta["state"].items():
            state[int(pid)] = {
                key: tensors[f"{prefix}/{pid}/{key}"] if slot is None else slot["value"]
                for key, slot in slots.items()
            }
        groups = [  # JSON made the tuples (betas) lists
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
            for g in meta["param_groups"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer state is incomplete ({exc!r})",
            hint="delete the checkpoint folder to start over",
        ) from None
    return {"state": state, "param_groups": groups}
