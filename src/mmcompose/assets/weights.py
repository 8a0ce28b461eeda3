"""Cached encoder weights: saved as safetensors, loaded strictly (a mismatch is a stale cache).

Shared by the converted encoders (``efficientnet``, ``whisper``) and the one trained here
(``point_encoder``), so none of them needs another's module.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from mmcompose.errors import CheckpointError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "load_cached_weights",
    "load_converted_state",
    "save_weights",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_weights(state: dict[str, Tensor], path: Path) -> None:
    """Cached encoder weights as safetensors, readable by every user of a shared cache."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    path.chmod(0o644)  # safetensors writes 0600; a shared cache must stay readable


def load_cached_weights(
    module: nn.Module,
    folder: Path,
    hint: str = "rebuild the cache: mmcompose assets prepare --force",
) -> None:
    """Strictly load the cached safetensors into ``module`` (a mismatch means a stale cache)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_NAME))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"cached encoder weights in {folder} do not fit the module: {exc}", hint=hint
        ) from None


def load_converted_state(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not convert to the expected module: {exc}") from None
