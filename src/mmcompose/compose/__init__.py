"""Model composition: merge methods (``compose.methods``) as pure tensor functions by name,
the YAML config (``compose.config``), planning (``compose.plan``) and the streaming executor
(``compose.executor``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcompose.compose.executor import ComposeResult, compose, run_from_yaml

__all__ = ["ComposeResult", "compose", "run_from_yaml"]


def __getattr__(name: str) -> Any:
    """Import the executor lazily, so ``import mmcompose.compose.methods`` stays light."""
    if name in __all__:
        from mmcompose.compose import executor

        return getattr(executor, name)
    raise AttributeError(name)
