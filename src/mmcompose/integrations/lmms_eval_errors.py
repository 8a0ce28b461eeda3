"""mmcompose's errors under lmms-eval's command line: one message and a hint, exit status 2.

lmms-eval's CLI catches every ``Exception`` of a run, prints its traceback and carries on to
exit 0, so a bad input (a task of a modality the model lacks, an unset data folder) would read
as a crash and still count as a success to a script. The plugin's and the MCUB task's entry
points are wrapped in :func:`exit_on_error`: under that CLI, an ``MMComposeError`` is printed as
the mmcompose CLI prints it and raised as ``SystemExit(2)``, which ``except Exception`` lets
through; called from Python (``lmms_eval.evaluator.simple_evaluate``) it propagates unchanged.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from mmcompose.errors import MMComposeError

F = TypeVar("F", bound=Callable[..., Any])
_CLI_FILE = os.path.join("lmms_eval", "__main__.py")


def under_lmms_eval_cli() -> bool:
    """Whether lmms-eval's command line (``cli_evaluate_single``) is on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "cli_evaluate_single" and code.co_filename.endswith(_CLI_FILE):
            return True
        frame = frame.f_back
    return False


def exit_on_error(fn: F) -> F:
    """``fn``, with an MMComposeError under lmms-eval's CLI turned into message + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MMComposeError as e:
            if not under_lmms_eval_cli():
                raise
            print(f"error: {e.message}", file=sys.stderr)
            if e.hint:
                print(f"hint: {e.hint}", file=sys.stderr)
            sys.stderr.flush()
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


__all__ = ["exit_on_error", "under_lmms_eval_cli"]
