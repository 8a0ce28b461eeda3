"""The output folder's config and tokenizer, derived from the plan's decisions, and the check
that every planned tensor has the shape that config implies (so the written folder loads)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmcompose.compose.config import ComposeConfig
from mmcompose.compose.inputs import LLM, Anatomy
from mmcompose.compose.plan_data import OutputTensor
from mmcompose.compose.sources import Source
from mmcompose.errors import CheckpointError, MergeError
from mmcompose.io import load_json
from mmcompose.model.config import (
    TEXT_ADAPTER,
    AdapterSpec,
    LoRAConfig,
    MMConfig,
    MMERConfig,
    TowerConfig,
)

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def output_mmconfig(
    config: ComposeConfig,
    ref: MMConfig,
    sources: Sequence[Source],
    parts: Sequence[Anatomy],
    owners: Mapping[str, int | None],
    lora: LoRAConfig | None,
    mmer: MMERConfig | None = None,
) -> MMConfig:
    """``ref``'s LLM (the base's, else the first source's) with each kept tower from its
    owner, the output LoRA (or MMER) config and the output dtype."""
    towers: list[TowerConfig] = [
        sources[i].config.tower(m)
        for m, i in owners.items()
        if i is not None and m in parts[i].towers
    ]
    dtype = config.out_dtype or config.dtype or ref.dtype
    return MMConfig(text_config=ref.text_config, towers=towers, lora=lora, mmer=mmer, dtype=dtype)


def output_lora(
    models: Sequence[Source],
    owners: Mapping[str, int | None],
    mode: str,
    full: bool,
    text_rank: int | None,
) -> LoRAConfig | None:
    """The merged ``text`` adapter (rank ``text_rank``, None when folded) and the modality
    adapters kept from their owners; None when nothing of LoRA is left (mmer folds it)."""
    if full or (text_rank is None and mode in ("naivemc", "mmer")):
        return None
    first = next(m.config.lora for m in models)
    adapters: dict[str, AdapterSpec] = {}
    if text_rank is not None:
        adapters[TEXT_ADAPTER] = AdapterSpec(rank=text_rank, alpha=text_rank)
    for m, i in owners.items():
        lora = models[i].config.lora if i is not None else None
        if lora is not None and m in lora.adapters:
            adapters[m] = lora.adapters[m]
    strategy = "decoupled" if mode == "damc" else "shared"
    return LoRAConfig(strategy=strategy, adapters=adapters,
                      target_modules=first.target_modules, dropout=first.dropout)  # fmt: skip


@dataclass(frozen=True)
class TokenizerChoice:
    """The folder the tokenizer is copied from (None: none is written) and its processor
    settings; ``warning``: a note for the plan."""

    path: Path | None
    use_chat_template: bool = True
    system_prompt: str | None = None
    warning: str | None = None


def choose_tokenizer(
    choice: Literal["base", "union"] | Path | None, default: Path, models: Sequence[Source]
) -> TokenizerChoice:
    """``choice`` (the config's ``tokenizer_source``) resolved against ``default`` (the base's
    folder, else the first source's); ``union`` only when every model's tokenizer is the same."""
    if choice == "union":
        texts = {str(m.path): _tokenizer_bytes(m.path) for m in models}
        if len(set(texts.values())) > 1:
            raise MergeError(
                "tokenizer_source: union of different tokenizers is not supported",
                hint="the sources' tokenizers differ; pick one with tokenizer_source: PATH",
            )
    path = Path(choice) if isinstance(choice, Path) else default
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        if isinstance(choice, Path):
            raise MergeError(f"tokenizer_source {path} holds no tokenizer files")
        log.warning("%s holds no tokenizer files; the output gets none", path)
        return TokenizerChoice(None, warning=f"warning: {path} holds no tokenizer; none is written")
    pc = path / "processor_config.json"
    use_chat, system_prompt = True, None
    if pc.is_file():
        data = load_json(pc, "processor config", error=CheckpointError)
        use_chat = bool(data.get("use_chat_template", True))
        system_prompt = data.get("system_prompt")
    return TokenizerChoice(path, use_chat, system_prompt)


def _tokenizer_bytes(path: Path) -> bytes:
    return b"".join((path / f).read_bytes() for f in TOKENIZER_FILES if (path / f).is_file())


def check_shapes(
    outputs: Sequence[OutputTensor],
    config: MMConfig,
    output_format: Literal["mmcompose", "hf"],
    labels: Sequence[str],
) -> None:
    """Every output tensor has the shape the output config.json implies, so the written
    folder loads: a source whose config.json contradicts its weights (a tower's width, an
    LLM size) is named now, before any tensor is read, not by a later load. ``labels[i]``
    names source i."""
    from mmcompose.compose.shape_cache import expected_shapes_cached

    expected = expected_shapes_cached(config)
    for o in outputs:
        want = expected.get(o.name if output_format == "mmcompose" else LLM + o.name)
        if want is not None and want != o.shape:
            who = ", ".join(labels[i] for i in o.sources)
            raise CheckpointError(
                f"{who}: tensor {o.name} has shape {list(o.shape)}, which does not match its "
                f"config.json (it implies {list(want)})",
                hint="the source's config.json was edited or belongs to other weights; "
                "restore the original",
            )
