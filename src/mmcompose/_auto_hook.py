"""Registers mmcompose with transformers' Auto classes when they are first imported.

``import mmcompose`` must stay free of torch and transformers (the CLI answers ``--help``
and refuses bad arguments without them), yet ``AutoConfig``, ``AutoModelForCausalLM`` and
``AutoProcessor`` should know ``model_type: mmcompose`` right after it. So :func:`install`
puts a finder on ``sys.meta_path`` that waits for each of transformers' three auto modules
and, once one has executed, adds our entry to it (:mod:`mmcompose.model.hf_auto`). A module
already imported is registered at once. The finder only watches those three names and
removes itself when all are done.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

_AUTO = "transformers.models.auto."
#: auto module -> the function of mmcompose.model.hf_auto that registers with it
WATCHED = {
    _AUTO + "configuration_auto": "register_config",
    _AUTO + "modeling_auto": "register_model",
    _AUTO + "processing_auto": "register_processor",
}


def _register(module_name: str) -> None:
    try:
        from mmcompose.model import hf_auto

        getattr(hf_auto, WATCHED[module_name])()
    except Exception as e:  # never break the user's import of transformers
        warnings.warn(
            f"mmcompose could not register with {module_name}: {type(e).__name__}: {e}",
            stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the registration."""

    def __init__(self, inner: importlib.abc.Loader, done: Callable[[str], None]) -> None:
        self._inner, self._done = inner, done

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)  # type: ignore[attr-defined]
        self._done(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ...
        return getattr(self._inner, name)


class _AutoFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending = set(WATCHED)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self._done)
                return spec
        return None

    def _done(self, name: str) -> None:
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        _register(name)


def install() -> None:
    """Register now with the auto modules already imported, later with the others."""
    if any(isinstance(f, _AutoFinder) for f in sys.meta_path):
        return
    finder = _AutoFinder()
    for name in WATCHED:
        if name in sys.modules:
            finder.pending.discard(name)
            _register(name)
    if finder.pending:
        sys.meta_path.insert(0, finder)
