"""Generated sections of the docs: a run's ``results.json`` read back, and the text between
two marker lines of a markdown file replaced, nothing else touched.

The composition and alignment reproductions both render into docs/results.md this way, each
with its own pair of markers, so the figures there always come from a run's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcompose.errors import ConfigError

__all__ = ["find_markers", "read_results", "replace_marked"]


def read_results(run_dir: str | Path, kind: str, fmt: int, command: str) -> dict[str, Any]:
    """The run's ``results.json`` if it is of ``kind`` and format ``fmt``; otherwise an error
    that names the folder ``command`` writes."""
    from mmcompose.fs import read_json

    path = Path(run_dir) / "results.json"
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise ConfigError(
            f"{path} is not the results of `{command}`" if path.is_file() else f"{path} not found",
            hint=f"give the folder `{command} -o DIR` wrote",
        )
    if doc.get("format") != fmt:
        raise ConfigError(f"{path}: results format {doc.get('format')}, expected {fmt}",
                          hint="run the reproduction again with this version")  # fmt: skip
    return doc


def find_markers(text: str, where: str, begin: str, end: str) -> tuple[int, int]:
    """Where the markers are; each must appear exactly once, the begin marker first."""
    counts = (text.count(begin), text.count(end))
    b, e = text.find(begin), text.find(end)
    if counts != (1, 1) or e < b:
        raise ConfigError(
            f"{where} needs the markers once each, in order (found {counts[0]} begin, "
            f"{counts[1]} end)",
            hint=f"put these two lines where the section goes:\n{begin}\n{end}",
        )
    return b, e


def replace_marked(text: str, section: str, where: str, begin: str, end: str) -> str:
    """``text`` with what lies between the markers replaced by ``section``."""
    b, e = find_markers(text, where, begin, end)
    return f"{text[: b + len(begin)]}\n{section.rstrip()}\n{text[e:]}"
