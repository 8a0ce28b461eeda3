"""The web demo (``mmcompose serve``): a chat page for a composed model. The page itself needs
the ``serve`` extra (NiceGUI); the checks and the streaming generator do not."""

from __future__ import annotations

from mmcompose.serve.checks import check_model_dir, check_port
from mmcompose.serve.prompt import sync_placeholders

__all__ = ["check_model_dir", "check_port", "sync_placeholders"]
