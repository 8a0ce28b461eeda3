"""A module imported on first use, for code whose import must stay cheap.

Why: ``compose/config.py`` validates a YAML against each merge method's parameter models, built
from the method functions' signatures, so importing the schema imports the methods, and they
do their arithmetic with torch (2-3 s to import). With ``torch = lazy_module("torch")`` a
module can define its functions, and a config can be checked and refused, before torch is
loaded; the first attribute read (``torch.float32``, at the first merge) imports it. Type
annotations stay strings (``from __future__ import annotations``) under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["lazy_module"]


class _LazyModule(types.ModuleType):
    """Stands in for a module until an attribute is read, then forwards to the real one."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = None

    def _load(self) -> types.ModuleType:
        target = self.__dict__["_lazy_target"]
        if target is None:
            target = importlib.import_module(self.__name__)
            self.__dict__["_lazy_target"] = target
        return target

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_lazy_target"] is not None else "not loaded yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_module(name: str) -> Any:
    """A stand-in for ``import name`` that imports it when an attribute is first read."""
    return _LazyModule(name)
