"""``python -m mmcompose.integrations``: print the lmms-eval task folder, for
``lmms-eval --include_path "$(python -m mmcompose.integrations)" --tasks mcub_4 ...``."""

from mmcompose.integrations import LMMS_EVAL_TASKS

print(LMMS_EVAL_TASKS)
