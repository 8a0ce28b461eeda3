"""The question box's placeholders, kept in step with the uploads (pure text functions).

A person should not need to know that an uploaded picture is referred to as ``<image>``: each
upload puts its placeholder on a line of its own at the top of the question, in the order
image, audio, video, point (LLaVA's ``<image>\\n...`` layout), and clearing it takes the line
away. Placeholders typed elsewhere in the question are left where they are.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from mmcompose.modalities import MODALITIES

_LEADING = re.compile(r"\A(?:[ \t]*<(?:" + "|".join(MODALITIES) + r")>[ \t]*(?:\n|\Z))*")


def sync_placeholders(text: str, uploaded: Collection[str]) -> str:
    """``text`` with its leading placeholder lines rebuilt: one ``<m>`` line per uploaded
    modality ``m`` whose placeholder the rest of the question does not already hold."""
    rest = text[_LEADING.match(text).end() :]  # type: ignore[union-attr]  # \A(...)* matches
    lead = [m for m in MODALITIES if m in uploaded and f"<{m}>" not in rest]
    return "".join(f"<{m}>\n" for m in lead) + rest


__all__ = ["sync_placeholders"]
