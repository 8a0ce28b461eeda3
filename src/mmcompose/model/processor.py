"""Text with placeholders + modality inputs -> model inputs.

The text is split on placeholders and each piece tokenised on its own; a placeholder becomes
its modality's negative sentinel id (see :mod:`mmcompose.model.splice`), so the base LLM's
tokenizer and vocabulary are used unchanged. A placeholder the tokenizer itself holds as a
token (llava-hf adds ``<image>``) is tokenised with the text around it instead, as its own
processor does (it matters for SentencePiece tokenizers, which mark the start of each piece).
Chat templates are rendered by :class:`~mmcompose.model.chat.ChatRenderer`, in whichever
content form (string or parts) the template takes. Each input may be a file path or an object
already loaded (PIL image, waveform array at the encoder's sample rate, frame array, points).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmcompose.errors import CheckpointError, MediaError, PlaceholderError
from mmcompose.io import load_json
from mmcompose.modalities import MODALITIES, canonical_modality
from mmcompose.model.chat import ChatRenderer
from mmcompose.model.config import CONFIG_NAME, PROCESSOR_CONFIG, MMConfig, ModuleSpec
from mmcompose.model.encoders import ENCODERS, encoder_params
from mmcompose.model.media import OnCorrupt, handle_unreadable
from mmcompose.model.splice import SENTINELS


class MMProcessor:
    """Tokenises prompts with placeholders and preprocesses each modality's inputs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        encoders: Mapping[str, ModuleSpec],
        use_chat_template: bool = True,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoders = {canonical_modality(m): s for m, s in encoders.items()}
        self.use_chat_template = use_chat_template
        # Given to conversations without a system turn; None keeps the template's default.
        self.system_prompt = system_prompt
        self._special_prefix = _special_prefix(tokenizer)
        self._chat = ChatRenderer(tokenizer)
        self._native = _native_placeholders(tokenizer)

    @classmethod
    def from_config(
        cls,
        config: MMConfig,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str | None = None,
    ) -> MMProcessor:
        return cls(
            tokenizer, {t.modality: t.encoder for t in config.towers}, system_prompt=system_prompt
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    # ------------------------------------------------------------------ text
    def format_prompt(self, prompt: str, system: str | None = None) -> str:
        """Wrap a user turn in the base LLM's own chat template (or a plain fallback)."""
        if not self.use_chat_template:
            return prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.render_chat(messages, add_generation_prompt=True)

    def render_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
    ) -> str:
        """Messages -> text with the base LLM's chat template (plain USER/ASSISTANT if none).

        Training renders conversation prefixes with this same function, so the prompt a model
        sees at inference is tokenised exactly as during training."""
        tok = self.tokenizer
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if getattr(tok, "chat_template", None):
            return self._chat(messages, add_generation_prompt)
        parts = []
        for m in messages:
            if m["role"] == "assistant":
                parts.append(f"ASSISTANT: {m['content']}{tok.eos_token or ''}\n")
            else:
                parts.append(f"{m['role'].upper()}: {m['content']} ")
        return "".join(parts) + ("ASSISTANT:" if add_generation_prompt else "")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids with one sentinel per placeholder."""
        ids: list[int] = []
        split = self._native["split"]
        for piece in split.split(text) if split is not None else [text]:
            if not piece:
                continue
            if split is not None and split.fullmatch(piece):
                ids.append(SENTINELS[piece[1:-1]])
            else:
                native = self._native["ids"]
                for i in self.tokenizer(piece, add_special_tokens=False)["input_ids"]:
                    ids.append(SENTINELS[native[i]] if i in native else i)
        prefix = self._special_prefix
        if add_special_tokens and prefix and ids[: len(prefix)] != prefix:
            ids = prefix + ids
        return ids

    def decode(self, ids: Tensor | Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode(
            [i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens
        )

    # ------------------------------------------------------------------ inputs
    def preprocess(self, modality: str, items: Sequence[Any]) -> Tensor:
        """Load (if a path) and preprocess each input of one modality into a batch tensor."""
        modality = canonical_modality(modality)
        spec = self._spec(modality)
        cls, params = ENCODERS.get(spec.name), encoder_params(spec)
        out = []
        for item in items:
            if isinstance(item, str | Path):
                item = cls.load(item, params)
            out.append(cls.preprocess(item, params))
        return torch.stack(out)

    def find_unreadable(
        self, modality: str, items: Sequence[str | Path], on_corrupt: OnCorrupt = "fail"
    ) -> dict[str, str]:
        """Load and preprocess each file once (results dropped) before real work starts, so a
        bad file fails up front (``on_corrupt="fail"``: its MediaError, naming it) or is
        returned as path -> reason for the caller to drop (``"skip"``)."""
        skipped: dict[str, str] = {}
        for item in dict.fromkeys(str(i) for i in items):
            try:
                self.preprocess(modality, [item])
            except MediaError as e:
                handle_unreadable(item, e, on_corrupt, skipped)
        return skipped

    def __call__(
        self,
        text: str | Sequence[str],
        inputs: Mapping[str, Sequence[Any]] | None = None,
        *,
        chat: bool = True,
        padding_side: Literal["left", "right"] = "left",
    ) -> dict[str, Any]:
        """Batch of prompts -> ``input_ids``, ``attention_mask``, ``modal_inputs``.

        ``inputs`` maps a modality to its items for the whole batch, in order of appearance.
        """
        texts = [text] if isinstance(text, str) else list(text)
        given = {canonical_modality(m): list(v) for m, v in (inputs or {}).items() if v}
        if chat:
            texts = [self.format_prompt(t) for t in texts]
        seqs = [self.tokenize(t) for t in texts]
        self._check_counts(seqs, given)
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
            ids[b, sl] = torch.tensor(s, dtype=torch.long)
            mask[b, sl] = 1
        modal = {m: self.preprocess(m, items) for m, items in given.items()}
        return {"input_ids": ids, "attention_mask": mask, "modal_inputs": modal}

    def _spec(self, modality: str) -> ModuleSpec:
        if modality not in self.encoders:
            raise PlaceholderError(
                f"this model takes no {modality} input",
                hint=f"its modalities are: {', '.join(self.encoders) or '(none, text only)'}",
            )
        return self.encoders[modality]

    def _check_counts(self, seqs: list[list[int]], given: dict[str, list[Any]]) -> None:
        for m in MODALITIES:
            n_ph = sum(s.count(SENTINELS[m]) for s in seqs)
            n_in = len(given.get(m, []))
            if n_ph or n_in:
                self._spec(m)
            if n_ph != n_in:
                raise PlaceholderError(
                    f"the prompt holds {n_ph} <{m}> placeholder(s) but {n_in} {m} input(s) "
                    "were given",
                    hint=f"put one <{m}> in the prompt for each {m} input"
                    + (" (or pass the input)" if n_ph > n_in else ""),
                )

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        cfg = {
            "processor_class": "MMProcessor",
            "use_chat_template": self.use_chat_template,
            "system_prompt": self.system_prompt,
            "encoders": {m: s.model_dump(mode="json") for m, s in self.encoders.items()},
        }
        (path / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MMProcessor:
        path = Path(path)
        # A damaged config.json is named as such first (transformers' tokenizer loader reads
        # it too, and would blame the tokenizer); a processor saved alone has none.
        config = MMConfig.from_dir(path) if (path / CONFIG_NAME).is_file() else None
        pc = path / PROCESSOR_CONFIG
        data = (
            load_json(pc, "processor config", error=CheckpointError, hint=_RESAVE)
            if pc.is_file()
            else None
        )
        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(str(path))
            _load_chat_template(path, tokenizer)
        except CheckpointError:
            raise
        except Exception as e:  # a damaged tokenizer.json raises anything (KeyError, the
            # tokenizers library's bare Exception, ...): name the folder instead.
            raise CheckpointError(
                f"cannot load a tokenizer from {path}: {type(e).__name__}: "
                + " ".join(str(e).split())[:300],
                hint="the tokenizer files are missing or damaged; " + _RESAVE,
            ) from None
        if data is not None:
            try:
                encoders = {m: ModuleSpec(**s) for m, s in data.get("encoders", {}).items()}
            except (TypeError, AttributeError, ValueError) as e:
                raise CheckpointError(f"{pc} has malformed encoders: {e}", hint=_RESAVE) from None
            return cls(
                tokenizer,
                encoders,
                data.get("use_chat_template", True),
                data.get("system_prompt"),
            )
        return cls.from_config(config or MMConfig.from_dir(path), tokenizer)


_RESAVE = "save the model with its processor (save_pretrained(path, processor=...))"


def _native_placeholders(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Placeholders the tokenizer holds as single tokens (``ids``: token id -> modality) and
    a regex splitting on the others (``split``, None when every placeholder is native)."""
    added = tokenizer.get_added_vocab()  # split out before any pre-tokenizer sees the text
    ids: dict[int, str] = {}
    for m in MODALITIES:
        tid = added.get(f"<{m}>")
        if tid is not None and tokenizer(f"<{m}>", add_special_tokens=False)["input_ids"] == [tid]:
            ids[tid] = m
    rest = [f"<{m}>" for m in MODALITIES if m not in ids.values()]
    return {"ids": ids, "split": re.compile("(" + "|".join(rest) + ")") if rest else None}


def _load_chat_template(path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """The template a processor saved next to the tokenizer, as its library reads it:
    ``chat_template.jinja`` (transformers 4.5x+), else ``chat_template.json``
    (``{"chat_template": ...}``, older processors), else tokenizer_config.json's own."""
    jinja, js = path / "chat_template.jinja", path / "chat_template.json"
    if jinja.is_file():
        tokenizer.chat_template = jinja.read_text(encoding="utf-8")
    elif js.is_file():
        data = load_json(js, "chat template", error=CheckpointError)
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str):
            raise CheckpointError(
                f"{js} holds no chat template string under 'chat_template'",
                hint="restore the file, or delete it to use tokenizer_config.json's template",
            )
        tokenizer.chat_template = template


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns that config.json's model_type is not a tokenizer's; it is ours."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before text (e.g. BOS), found empirically."""
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []
