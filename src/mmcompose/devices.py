"""Device names from the command line, checked before any work: ``cpu``, ``cuda``,
``cuda:N`` and ``mps``. ``torch.device`` takes more (``meta``, ``xpu``, ...) and fails on a typo
with a bare RuntimeError; a GPU that is asked for but absent fails only later, mid-way."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from mmcompose.errors import ConfigError

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"^(cpu|mps|cuda)(?::(\d+))?$")
HINT = "use cpu, cuda, cuda:N (N = the GPU's index) or mps"


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for ``name``, or a :class:`ConfigError` saying why not."""
    import torch

    if isinstance(name, torch.device):
        return name
    kind, index = check_device(name)
    return torch.device(kind, index) if index is not None else torch.device(kind)


def check_device(name: str) -> tuple[str, int | None]:
    """``(kind, index)`` of a device name, or the ConfigError :func:`resolve_device` raises; torch
    is imported only to ask whether a GPU is there, so ``cpu`` is checked in microseconds."""
    m = _NAME.match(str(name).strip().lower())
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ConfigError(f"unknown device {name!r}", hint=HINT)
    kind, index = m.group(1), None if m.group(2) is None else int(m.group(2))
    if kind == "cpu":
        return kind, index
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was asked for but no CUDA GPU is available",
                hint="run on --device cpu, or check the driver (nvidia-smi)",
            )
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise ConfigError(
                f"device {name!r}: there is no GPU {index} ({count} available)",
                hint=f"use cuda:0 to cuda:{count - 1}",
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for but MPS is not available", hint=HINT)
    return kind, index


__all__ = ["check_device", "resolve_device"]
