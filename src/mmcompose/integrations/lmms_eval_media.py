"""What an lmms-eval task hands a model, read as mmcompose's modalities and prompts.

lmms-eval gives a simple model the context text and the task's ``doc_to_visual(doc)``, a list
of media in whatever form the task's dataset holds them: PIL images, audio as Hugging Face's
``{"array", "sampling_rate"}`` dicts, videos as file paths, point clouds as arrays or files.
Here each is assigned its modality (by type, then by file extension), and the context becomes
chat messages with one placeholder per input: kept where the task wrote them (MCUB does),
else prepended one per line in input order, as lmms-eval's LLaVA models prepend ``<image>``.
Pure functions of their arguments (no model, no torch), so they are tested on their own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcompose.errors import MediaError, PlaceholderError
from mmcompose.modalities import ALIASES, MODALITIES
from mmcompose.model.media.common import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    POINT_CLOUD_EXTENSIONS,
    VIDEO_EXTENSIONS,
)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Audio:
    """A waveform with its sample rate (resampled to the encoder's rate when preprocessed)."""

    array: np.ndarray
    sampling_rate: int


@dataclass(frozen=True)
class Medium:
    modality: str
    item: Any  # PIL image, Audio, np.ndarray, or a path the modality's loader reads


def classify(visual: Any) -> Medium:
    """The modality of one of ``doc_to_visual``'s items.

    A path goes by its extension (a folder is a video's frames); ``.gif`` counts as an image,
    as lmms-eval's own media rule has it. Arrays: (T, H, W, C) is a video, (H, W, 3|4) an
    image, (N, >=3) points; a 1-D waveform is refused, since it carries no sample rate."""
    from PIL import Image

    if isinstance(visual, Image.Image):
        return Medium("image", visual)
    if isinstance(visual, Mapping):
        return _from_mapping(visual)
    if hasattr(visual, "get_all_samples"):  # datasets' torchcodec AudioDecoder
        s = visual.get_all_samples()
        data = np.asarray(s.data)
        return Medium("audio", Audio(data.T if data.ndim == 2 else data, int(s.sample_rate)))
    if isinstance(visual, str | os.PathLike):
        return _from_path(Path(visual))
    if hasattr(visual, "detach"):  # a torch tensor
        visual = visual.detach().cpu().numpy()
    if isinstance(visual, np.ndarray):
        if visual.ndim == 4:
            return Medium("video", visual)
        if visual.ndim == 3 and visual.shape[-1] in (3, 4):
            return Medium("image", visual)
        if visual.ndim == 2 and visual.shape[1] >= 3:
            return Medium("point", visual)
        raise MediaError(
            f"cannot tell which modality an array of shape {visual.shape} is",
            hint="give audio as {'array': ..., 'sampling_rate': ...}, images as PIL images, "
            "videos as (T, H, W, 3) frames or a file, point clouds as (N, 3+) arrays",
        )
    raise MediaError(
        f"unsupported media object {type(visual).__name__} from the task's doc_to_visual",
        hint="PIL images, audio dicts (array, sampling_rate), file paths and arrays are read",
    )


def _from_mapping(d: Mapping[str, Any]) -> Medium:
    if "array" in d and "sampling_rate" in d:
        return Medium("audio", Audio(np.asarray(d["array"]), int(d["sampling_rate"])))
    kind = d.get("type") or d.get("modality")
    where = d.get("path") or d.get("url") or d.get(kind or "", None)
    if isinstance(kind, str) and isinstance(where, str | os.PathLike):
        modality = ALIASES.get(kind, kind)
        if modality in MODALITIES:
            _check_exists(Path(where))
            return Medium(modality, str(where))
    if isinstance(d.get("path"), str) and not d.get("bytes"):
        return _from_path(Path(d["path"]))
    raise MediaError(
        f"cannot read a media dict with keys {sorted(d)}",
        hint="audio as {'array', 'sampling_rate'}; other media as {'type': MODALITY, 'path': FILE}",
    )


def _from_path(p: Path) -> Medium:
    _check_exists(p)
    if p.is_dir():
        return Medium("video", str(p))
    ext = p.suffix.lower()
    for modality, exts in (
        ("image", IMAGE_EXTENSIONS),
        ("audio", AUDIO_EXTENSIONS),
        ("video", VIDEO_EXTENSIONS),
        ("point", POINT_CLOUD_EXTENSIONS),
    ):
        if ext in exts:
            return Medium(modality, str(p))
    raise MediaError(
        f"cannot tell the modality of {p} from its extension {ext or '(none)'}",
        hint="supported: "
        + ", ".join(dict.fromkeys(IMAGE_EXTENSIONS + AUDIO_EXTENSIONS + VIDEO_EXTENSIONS))
        + ", "
        + ", ".join(POINT_CLOUD_EXTENSIONS),
    )


def _check_exists(p: Path) -> None:
    if not p.exists():
        raise MediaError(f"media file not found: {p}", hint="the task's doc_to_visual names it")


def messages_from_context(context: str) -> list[dict[str, str]]:
    """The context as chat messages: a JSON list of turns (``role``/``content``, or the
    reference data's ``from``/``value``) is a conversation, as lmms-eval's LLaVA-OneVision
    reads one; any other text is one user turn."""
    text = context.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            turns = json.loads(text)
        except ValueError:
            turns = None
        parsed = _turns(turns) if isinstance(turns, list) and turns else None
        if parsed is not None:
            return parsed
    return [{"role": "user", "content": context}]


def _turns(turns: list[Any]) -> list[dict[str, str]] | None:
    from mmcompose.train.data import ROLES as REFERENCE_ROLES

    out = []
    for t in turns:
        if not isinstance(t, dict):
            return None
        role = t.get("role", REFERENCE_ROLES.get(t.get("from", ""), None))
        content = t.get("content", t.get("value"))
        if role not in ROLES or not isinstance(content, str):
            return None
        out.append({"role": role, "content": content})
    return out


def place_inputs(
    messages: Sequence[Mapping[str, str]], media: Sequence[Medium]
) -> list[dict[str, str]]:
    """Messages whose placeholders match ``media``: as written when the text has any (then
    each modality's count must equal its inputs), else one ``<modality>`` line per input,
    in input order, before the last user turn's text."""
    out = [dict(m) for m in messages]
    text = "".join(m["content"] for m in out)
    written = {m: text.count(f"<{m}>") for m in MODALITIES}
    given = {m: sum(x.modality == m for x in media) for m in MODALITIES}
    if not any(written.values()):
        if media:
            last = max(i for i, m in enumerate(out) if m["role"] == "user")
            lines = "".join(f"<{x.modality}>\n" for x in media)
            out[last]["content"] = lines + out[last]["content"]
        return out
    wrong = [m for m in MODALITIES if written[m] != given[m]]
    if wrong:
        detail = ", ".join(f"{written[m]} <{m}> for {given[m]} {m} input(s)" for m in wrong)
        raise PlaceholderError(
            f"the task's prompt holds {detail}",
            hint="a prompt with placeholders needs one per input of each modality; "
            "a prompt without any gets them prepended",
        )
    return out


__all__ = ["Audio", "Medium", "classify", "messages_from_context", "place_inputs"]
