"""mmcompose inside other evaluation tools, through their own plugin interfaces.

lmms-eval (``pip install mmcompose[eval]``): the model plugin
:class:`~mmcompose.integrations.lmms_eval_model.MMComposeLMMS`, registered through the
``lmms_eval.models`` entry-point group (see pyproject.toml), so ``lmms-eval --model mmcompose
--model_args pretrained=FOLDER`` finds it without lmms-eval's deprecated ``LMMS_EVAL_PLUGINS``;
and MCUB as lmms-eval tasks over local files, in :data:`LMMS_EVAL_TASKS` (pass that folder as
``--include_path``; ``python -m mmcompose.integrations`` prints it).

This module stays free of torch and lmms-eval: lmms-eval loads every entry point each time it
starts, so the payload below only names the class, which lmms-eval imports when it is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: lmms-eval task folder: the MCUB tasks (``--include_path`` it).
LMMS_EVAL_TASKS = Path(__file__).with_name("lmms_eval_tasks")
#: The name ``lmms-eval --model`` knows the plugin by.
LMMS_EVAL_MODEL = "mmcompose"


def lmms_eval_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: a ``ModelManifest`` naming the plugin class (a
    simple model, since lmms-eval gives multiple-choice tasks to simple models only)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=LMMS_EVAL_MODEL,
        simple_class_path="mmcompose.integrations.lmms_eval_model.MMComposeLMMS",
    )


__all__ = ["LMMS_EVAL_MODEL", "LMMS_EVAL_TASKS", "lmms_eval_manifest"]
