"""The regime of a composition, chosen from the sources' configs before any tensor is planned.

Which sources can be composed at all (one LLM family and size, one set of LoRA targets), the
composition (``naivemc``/``damc``/``mmer``, or full weights when some source is a full
fine-tune), the
one source each modality's tower and adapter come from, and the output folder's format. Every
ambiguity is refused with a :class:`MergeError` naming the config key that resolves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mmcompose.compose.config import ComposeConfig
from mmcompose.compose.inputs import Anatomy, same_path
from mmcompose.compose.method_roles import LORA_HINT
from mmcompose.compose.sources import Source
from mmcompose.errors import MergeError
from mmcompose.model.config import TEXT_ADAPTER

Mode = Literal["naivemc", "damc", "mmer"]
OutputFormat = Literal["mmcompose", "hf"]


@dataclass(frozen=True)
class Regime:
    """``full``: some source is a full fine-tune (every LLM tensor merged as a whole weight).
    ``owners``: modality -> index of the source its tower (and adapter) comes from, None when
    dropped."""

    mode: Mode
    full: bool
    owners: dict[str, int | None]
    output_format: OutputFormat
    notes: tuple[str, ...] = ()


def choose_regime(
    config: ComposeConfig,
    sources: Sequence[Source],
    parts: Sequence[Anatomy],
    n: int,
    base_idx: int | None,
    describe: Sequence[str],
) -> Regime:
    """``sources[:n]`` are the models to merge (a base listed apart from them follows);
    ``describe[i]`` names source i in messages."""
    check_llms(sources)
    models = sources[:n]
    mode, full, notes = choose_mode(config, models, describe)
    check_lora_sources(config, models, full, base_idx)
    owners = resolve_towers(config, models, parts)
    if mode == "mmer":
        check_mmer(config, full, base_idx, owners, parts)
    output_format = choose_format(config, mode, full, owners)
    return Regime(mode, full, owners, output_format, tuple(notes))


def check_llms(sources: Sequence[Source]) -> None:
    """Same LLM family and sizes everywhere; else nothing can be merged."""
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        values = {str(s.path): s.config.text_config.get(key) for s in sources}
        if len(set(values.values())) > 1:
            what = {"vocab_size": "vocabulary sizes", "hidden_size": "hidden sizes"}.get(key, key)
            raise MergeError(
                f"the sources' LLMs differ in {what}: "
                + ", ".join(f"{k}: {v}" for k, v in values.items()),
                hint="only models fine-tuned from one base LLM can be composed",
            )


def choose_mode(
    config: ComposeConfig, models: Sequence[Source], describe: Sequence[str]
) -> tuple[Mode, bool, list[str]]:
    """The composition, whether some model is a full fine-tune, and the notes for the plan."""
    loras = [m.config.lora for m in models]
    strategies = {lora.strategy if lora else None for lora in loras}
    full = None in strategies
    mode = config.composition
    composed = [describe[i] for i, m in enumerate(models) if m.config.mmer is not None]
    if composed:
        raise MergeError(
            "an MMER composition cannot be a source (its masks belong to its own sources): "
            + "; ".join(composed),
            hint="compose the original single-modality models instead",
        )
    if mode == "mmer" and "decoupled" in strategies:
        bad = [describe[i] for i, lora in enumerate(loras) if lora and lora.strategy != "shared"]
        raise MergeError(
            "mmer decouples shared (NaiveMC-style) sources by masks; these are "
            "decoupled-trained: " + "; ".join(bad),
            hint="use composition: damc for decoupled sources (they already route modality "
            "tokens to their own adapters)",
        )
    if mode == "mmer" and config.lora_output == "adapter":
        raise MergeError(
            "lora_output: adapter cannot be used with mmer: a mask of B @ A is not low-rank, "
            "so mmer stores merged weights and a dense delta (the lambda search, which keeps a "
            "text adapter, is not available for mmer either)",
            hint="remove lora_output (and --search) for composition: mmer",
        )
    if mode is None:
        if strategies == {"shared", "decoupled"}:
            raise MergeError(
                "the sources mix shared- and decoupled-trained LoRA",
                hint="set composition: naivemc or damc (damc needs decoupled sources only)",
            )
        mode = "damc" if strategies == {"decoupled"} else "naivemc"
    if mode == "damc" and strategies != {"decoupled"}:
        bad = [describe[i] for i, lora in enumerate(loras)
               if lora is None or lora.strategy != "decoupled"]  # fmt: skip
        raise MergeError(
            "damc needs every source trained with decoupled LoRA adapters; not: " + "; ".join(bad),
            hint="use composition: naivemc, or compose only decoupled-trained models",
        )
    if mode == "naivemc" and "decoupled" in strategies:
        raise MergeError(
            "naivemc gives every token one shared adapter, but some sources are decoupled-trained",
            hint="use composition: damc (needs all sources decoupled)",
        )
    if config.lora_output == "fold" and mode == "damc":
        raise MergeError(
            "lora_output: fold cannot be used with damc: modality tokens must keep W0",
            hint="remove lora_output (damc stores the merged text adapter)",
        )
    notes = []
    if full:
        notes.append("some sources are full fine-tunes: LLM weights merged as a whole")
        if config.lora_output == "adapter":
            raise MergeError(
                "lora_output: adapter needs every source LoRA-trained from one base",
                hint="remove lora_output; LoRA sources are folded into their weights",
            )
    return mode, full, notes


def check_lora_sources(
    config: ComposeConfig, models: Sequence[Source], full: bool, base_idx: int | None
) -> None:
    """One set of LoRA targets with a text adapter each; a base_model where the method needs
    one (and none it would ignore)."""
    loras = {str(m.path): m.config.lora for m in models if m.config.lora}
    targets = {k: tuple(sorted(v.target_modules)) for k, v in loras.items()}
    if len(set(targets.values())) > 1:
        raise MergeError(
            "the LoRA sources adapt different layers: "
            + "; ".join(f"{k}: {list(v)}" for k, v in targets.items()),
            hint="compose models trained with the same target_modules",
        )
    for k, v in loras.items():
        if TEXT_ADAPTER not in v.adapters:
            raise MergeError(f"{k} has no {TEXT_ADAPTER!r} adapter to merge")
    if not full and config.roles.lora is not None:  # every source is LoRA: deltas only
        raise MergeError(config.roles.lora, hint=LORA_HINT)
    needs_base = config.needs_base
    if full and config.requires_base and base_idx is None:
        raise MergeError(
            f"{config.merge_method} merges task vectors of full fine-tunes and needs base_model",
            hint="set base_model: PATH (the LLM the models were fine-tuned from)",
        )
    if not needs_base and base_idx is not None and base_idx >= len(models) and full:
        raise MergeError(
            f"{config.merge_method} gives base_model no role",
            hint="list the base under models (with a weight) to average it in, or remove "
            "base_model",
        )


def resolve_towers(
    config: ComposeConfig, models: Sequence[Source], parts: Sequence[Anatomy]
) -> dict[str, int | None]:
    """Modality -> the one model its tower (and adapter) comes from; None = dropped."""
    offered: dict[str, list[int]] = {}
    for i, src in enumerate(models):
        names = set(parts[i].towers)
        lora = src.config.lora
        if lora and lora.strategy == "decoupled":
            names |= set(lora.adapters) - {TEXT_ADAPTER}
        for m in sorted(names):
            offered.setdefault(m, []).append(i)
    for m in config.towers:
        if m not in offered:
            raise MergeError(
                f"towers.{m}: no source has a {m} tower",
                hint=f"modalities offered: {', '.join(offered) or '(none)'}",
            )
    owners: dict[str, int | None] = {}
    for m, idx in offered.items():
        choice = config.towers.get(m)
        if choice is not None and choice.drop:
            owners[m] = None
        elif choice is not None:
            hit = [i for i in idx if same_path(models[i].path, choice.source)]
            if not hit:
                raise MergeError(
                    f"towers.{m}.source {choice.source} is not a source with a {m} tower",
                    hint="choose one of: " + ", ".join(str(models[i].path) for i in idx),
                )
            owners[m] = hit[0]
        elif len(idx) > 1:
            raise MergeError(
                f"the {m} tower (or adapter) is in {len(idx)} sources: "
                + ", ".join(str(models[i].path) for i in idx),
                hint=f"pick one with towers: {{{m}: {{source: PATH}}}} or drop it with "
                f"towers: {{{m}: {{drop: true}}}}",
            )
        else:
            owners[m] = idx[0]
    return owners


def choose_format(
    config: ComposeConfig, mode: Mode, full: bool, owners: dict[str, int | None]
) -> OutputFormat:
    """``hf`` holds only an LLM; ``auto`` picks it for a text-only result."""
    fmt = config.output_format
    lora_kept = not full and (mode == "damc" or config.lora_output == "adapter")
    multimodal = any(o is not None for o in owners.values()) or lora_kept or mode == "mmer"
    if fmt == "hf" and multimodal:
        raise MergeError(
            "output_format: hf cannot hold towers, adapters or masks",
            hint="use output_format: mmcompose (or auto)",
        )
    if fmt == "auto":
        return "mmcompose" if multimodal else "hf"
    return fmt


def mask_owners(owners: dict[str, int | None], parts: Sequence[Anatomy]) -> dict[str, int]:
    """Modality -> the source whose task vector its mask is made from: the owner of its tower."""
    return {m: i for m, i in owners.items() if i is not None and m in parts[i].towers}


def check_mmer(
    config: ComposeConfig,
    full: bool,
    base_idx: int | None,
    owners: dict[str, int | None],
    parts: Sequence[Anatomy],
) -> None:
    """A common base for the task vectors, and at least one modality to decouple."""
    if full and base_idx is None:
        raise MergeError(
            "mmer takes task vectors against a common base, and some sources are full "
            "fine-tunes: base_model is needed",
            hint="set base_model: PATH (the LLM every source was fine-tuned from)",
        )
    if not mask_owners(owners, parts):
        raise MergeError(
            "mmer has no modality to decouple: no kept source has a tower",
            hint="compose single-modality MLLMs, or use composition: naivemc for text-only models",
        )
