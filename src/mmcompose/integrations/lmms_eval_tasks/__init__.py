"""lmms-eval tasks (``--include_path`` this folder): MCUB over local files, see :mod:`.mcub`."""
