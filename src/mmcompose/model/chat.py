"""Conversations rendered with a model's own chat template, whichever content form it expects.

Templates come in two kinds. Text-LLM templates print ``message['content']`` as a string;
multimodal processors' templates (llava-hf's, saved as ``chat_template.jinja``) walk a list of
content parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``) and silently render
nothing for a string, so the user's words would vanish. :class:`ChatRenderer` renders string
content first, checks that every word and placeholder of the conversation came out, and
otherwise renders content parts: a placeholder becomes a typed part when the template prints
something for that type (its image token, mapped back to our ``<image>``), else it stays in
the text. A template that loses text either way is an error, never a silently short prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from mmcompose.errors import CheckpointError
from mmcompose.modalities import MODALITIES

PLACEHOLDER_RE = re.compile("(" + "|".join(f"<{m}>" for m in MODALITIES) + ")")
ContentForm = Literal["string", "parts"]
_PROBE = "mmcomposeprobe"


def split_prompt(text: str) -> list[tuple[str, str]]:
    """``"a <image> b"`` -> ``[("text", "a "), ("image", ""), ("text", " b")]`` (no empties)."""
    out: list[tuple[str, str]] = []
    for piece in PLACEHOLDER_RE.split(text):
        if PLACEHOLDER_RE.fullmatch(piece):
            out.append((piece[1:-1], ""))
        elif piece:
            out.append(("text", piece))
    return out


def content_parts(text: str, typed: Sequence[str] = MODALITIES) -> list[dict[str, str]]:
    """A prompt with placeholders as transformers' content parts.

    Placeholders of the ``typed`` modalities become ``{"type": m}`` parts and the whitespace
    next to them goes (a part list has no "\\n" after an image; the template adds its own);
    other placeholders stay inside the text."""
    parts: list[dict[str, str]] = []
    pieces = split_prompt(text)
    for k, (kind, piece) in enumerate(pieces):
        if kind in typed:
            parts.append({"type": kind})
            continue
        if kind != "text":
            piece = f"<{kind}>"
        else:
            if k > 0 and pieces[k - 1][0] in typed:
                piece = piece.lstrip()
            if k + 1 < len(pieces) and pieces[k + 1][0] in typed:
                piece = piece.rstrip()
        if not piece:
            continue
        if parts and parts[-1]["type"] == "text":
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + piece}
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def missing_from(messages: Sequence[Mapping[str, str]], rendered: str) -> list[str]:
    """What of the conversation a rendering lost: text pieces absent from it, and
    placeholders whose count differs (``"<image> x1 of 2"``)."""
    lost: list[str] = []
    want = dict.fromkeys(MODALITIES, 0)
    for m in messages:
        for kind, piece in split_prompt(m["content"]):
            if kind != "text":
                want[kind] += 1
            elif piece.strip() and piece.strip() not in rendered:
                lost.append(repr(piece.strip()))
    for mod, n in want.items():
        got = rendered.count(f"<{mod}>")
        if got != n:
            lost.append(f"<{mod}> x{got} of {n}")
    return lost


def _prints_parts(text: str) -> bool:
    """A string-content template given parts prints their repr (``[{'type': 'text', ...``)."""
    return "'type': '" in text or '"type": "' in text


class ChatRenderer:
    """Renders messages with ``tokenizer.chat_template`` in the content form it takes.

    The form that worked last is tried first, so a training loop renders once per call."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._template: str | None = None
        self._form: ContentForm = "string"
        self._markers: dict[str, str | None] = {}

    def __call__(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        self._sync()
        problems: list[str] = []
        forms: list[ContentForm] = [self._form, "parts" if self._form == "string" else "string"]
        for form in forms:
            try:
                text = self._render(messages, form, add_generation_prompt)
            except Exception as e:  # jinja raises TemplateError, TypeError, KeyError, ...
                problems.append(f"{form} content: {type(e).__name__}: {e}")
                continue
            lost = missing_from(messages, text)
            if not lost:
                self._form = form
                return text
            problems.append(f"{form} content renders {text[:120]!r}, losing {', '.join(lost[:4])}")
        raise CheckpointError(
            "the model's chat template cannot render this conversation: " + "; ".join(problems),
            hint="fix the template (chat_template.jinja, chat_template.json or tokenizer_config"
            ".json's chat_template), or set use_chat_template to false in processor_config.json",
        )

    def marker(self, modality: str) -> str | None:
        """What the template prints for a ``{"type": modality}`` part (its image token,
        e.g. ``<image>``), found by rendering a probe with and without one; None when it
        prints nothing for that type (the placeholder then stays in the text)."""
        self._sync()
        if modality not in self._markers:
            self._markers[modality] = self._find_marker(modality)
        return self._markers[modality]

    # ------------------------------------------------------------------ internals
    def _sync(self) -> None:
        template = self.tokenizer.chat_template
        if template != self._template:  # set or replaced after construction
            self._template, self._form, self._markers = template, "string", {}

    def _apply(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(out, str):
            raise TypeError(f"apply_chat_template returned {type(out).__name__}, not text")
        return out

    def _render(
        self, messages: Sequence[Mapping[str, str]], form: ContentForm, add_generation_prompt: bool
    ) -> str:
        if form == "string":
            return self._apply([dict(m) for m in messages], add_generation_prompt)
        typed = [m for m in MODALITIES if self.marker(m) is not None]
        converted = [{**m, "content": content_parts(m["content"], typed)} for m in messages]
        text = self._apply(converted, add_generation_prompt)
        if _prints_parts(text):
            raise ValueError("the template prints the content parts as data")
        for mod in typed:
            marker = self._markers[mod]
            assert marker is not None
            n = sum(p["type"] == mod for m in converted for p in m["content"])
            if text.count(marker) != n:
                raise ValueError(
                    f"the template printed its {mod} token {marker!r} {text.count(marker)} "
                    f"time(s) for {n} {mod} part(s)"
                )
            if marker != f"<{mod}>":
                text = text.replace(marker, f"<{mod}>")
        return text

    def _find_marker(self, modality: str) -> str | None:
        def probe(parts: list[dict[str, str]]) -> str:
            return self._apply([{"role": "user", "content": parts}], False)

        text = {"type": "text", "text": _PROBE}
        try:
            without, with_part = probe([text]), probe([{"type": modality}, text])
        except Exception:  # the template refuses content parts or this type
            return None
        i = 0
        while i < min(len(without), len(with_part)) and without[i] == with_part[i]:
            i += 1
        j = 0
        while j < min(len(without), len(with_part)) - i and without[-1 - j] == with_part[-1 - j]:
            j += 1
        inserted = with_part[i : len(with_part) - j].strip()
        if not inserted or _prints_parts(with_part):
            return None
        # Keep structure around the token (e.g. <|vision_start|>...<|vision_end|>) as text:
        # only an added token naming the modality stands for the placeholder.
        for tok in sorted(self._added_tokens(), key=len, reverse=True):
            if modality in tok.lower() and inserted.count(tok) == 1:
                return tok
        return inserted

    def _added_tokens(self) -> list[str]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        return [str(t) for t in decoder.values()]
