"""Planning a composition: what becomes of every tensor, decided before any tensor is read.

Given the config and the opened sources, :func:`plan_composition` returns a :class:`Plan`: a list
of steps (each produces one or two output tensors from named inputs), the output tensors'
names, shapes and dtypes (so shards are laid out in advance), the inputs left out and why,
and the output :class:`MMConfig`. Everything ambiguous is refused here with a
:class:`MergeError` that says which config key resolves it; only tensor *values* are checked
later, while streaming (non-finite numbers, bases that should be identical but are not).

Three regimes, chosen from the sources:

- all sources LoRA-trained (``naivemc`` with shared adapters, ``damc`` with decoupled ones):
  base LLM tensors are carried (verified identical), text adapters are merged as full deltas
  ``dW_i = (alpha_i/r_i) B_i A_i`` with ``base=None``; naivemc folds the result into the base
  weight by default, damc stores it as the ``text`` adapter (exactly: concatenated factors for
  ``linear``/``task_arithmetic``, identity-padded dense factors for the other methods);
  modality adapters, towers and prefix/suffix tokens are carried from their one source.
  With ``base_model`` and a task-vector method the base tensors are merged by the method.
- some source fully fine-tuned: every LLM tensor is merged as a full weight (shared LoRAs
  folded into their source's weights first), with ``base_model`` as base where needed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mmcompose.compose.config import (
    ComposeConfig,
    ModelEntry,
    resolve_parameters,
)
from mmcompose.compose.methods import BoundMerge
from mmcompose.compose.sources import Source, open_source
from mmcompose.errors import CheckpointError, MergeError
from mmcompose.io import load_json
from mmcompose.model.config import TEXT_ADAPTER, AdapterSpec, LoRAConfig, MMConfig, TowerConfig

log = logging.getLogger(__name__)

LLM = "language_model."
TOWERS = "towers."
_LORA = re.compile(r"^(language_model\..+)\.lora\.([^.]+)\.lora_([AB])$")
_CONCAT = frozenset({"linear", "task_arithmetic"})  # linear in their inputs: exact as concat
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
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
Mode = Literal["naivemc", "damc"]


# ---------------------------------------------------------------- plan data


@dataclass(frozen=True)
class Ref:
    """One input tensor: source index (into ``Plan.sources``) and mmcompose name."""

    source: int
    name: str


@dataclass(frozen=True)
class Delta:
    """One source's LoRA update on one linear: ``scaling * B @ A``."""

    a: Ref
    b: Ref
    scaling: float


@dataclass(frozen=True)
class Carry:
    """Copy ``ref``; every tensor in ``same_as`` must hold the same values (one shared base)."""

    out: str
    ref: Ref
    same_as: tuple[Ref, ...] = ()


@dataclass(frozen=True)
class MergeWeights:
    """Merge full weights; ``deltas[i]`` (a shared LoRA) is folded into input i first."""

    out: str
    inputs: tuple[Ref, ...]
    base: Ref | None
    merge: BoundMerge
    deltas: tuple[Delta | None, ...] = ()


@dataclass(frozen=True)
class FoldDelta:
    """``W = base + merge(dW_1..dW_n)`` with the deltas merged as task vectors (NaiveMC)."""

    out: str
    base: Carry | MergeWeights
    deltas: tuple[Delta, ...]
    merge: BoundMerge


@dataclass(frozen=True)
class ConcatAdapter:
    """Exact adapter for a linear merge: ``A = cat(A_i)``, ``B = cat(c_i s_i B_i)``."""

    out_a: str
    out_b: str
    deltas: tuple[Delta, ...]
    coeffs: tuple[float, ...]


@dataclass(frozen=True)
class DenseAdapter:
    """Exact adapter for any merge: the dense merged delta padded to rank ``rank``.

    ``out <= in``: ``B = [I | 0]``, ``A = [delta; 0]``; else ``B = [delta | 0]``, ``A = [I; 0]``.
    """

    out_a: str
    out_b: str
    deltas: tuple[Delta, ...]
    merge: BoundMerge
    rank: int


Step = Carry | MergeWeights | FoldDelta | ConcatAdapter | DenseAdapter


def step_outputs(step: Step) -> tuple[str, ...]:
    if isinstance(step, ConcatAdapter | DenseAdapter):
        return (step.out_a, step.out_b)
    return (step.out,)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    action: Literal["merged", "carried"]
    sources: tuple[int, ...]
    method: str | None = None
    note: str = ""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Dropped:
    source: int
    name: str
    reason: str


@dataclass
class Plan:
    """Everything the executor needs; printable with :meth:`summary`."""

    config: ComposeConfig
    sources: list[Source]
    labels: list[str]  # one per source: its path (and role)
    mode: str  # naivemc | damc | full
    output_config: MMConfig
    output_format: Literal["mmcompose", "hf"]
    steps: list[Step]
    outputs: list[OutputTensor]
    dropped: list[Dropped]
    tokenizer_dir: Path | None
    use_chat_template: bool = True
    system_prompt: str | None = None
    compute_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def counts(self) -> dict[str, int]:
        merged = sum(o.action == "merged" for o in self.outputs)
        return {
            "merged": merged,
            "carried": len(self.outputs) - merged,
            "dropped": len(self.dropped),
        }

    def summary(self) -> str:
        c, cfg = self.counts(), self.output_config
        adapters = list(cfg.lora.adapters) if cfg.lora else []
        lines = [
            f"compose: {self.config.merge_method} ({self.mode}), {len(self.sources)} source(s)",
            *(f"  [{i}] {label}" for i, label in enumerate(self.labels)),
            f"tensors: {c['merged']} merged, {c['carried']} carried, {c['dropped']} dropped",
            f"towers: {', '.join(cfg.modalities) or '(none)'}",
            f"adapters: {', '.join(adapters) or '(none, LoRA folded or absent)'}"
            + (f" [{cfg.lora.strategy}]" if cfg.lora else ""),
            f"output: {self.output_format} folder, {_human(self.total_bytes)}",
            *self.notes,
        ]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------- opening inputs


@dataclass
class Inputs:
    """The opened sources: the models to merge (with their config entries) and the base."""

    entries: list[ModelEntry]
    models: list[Source]
    base: Source | None


def open_inputs(config: ComposeConfig) -> Inputs:
    """Open every referenced folder (see ``ComposeConfig.merge_entries`` for the base)."""
    entries = config.merge_entries
    models = [open_source(e.model, e.importer, **e.importer_options) for e in entries]
    base = None
    if config.base_model is not None:
        listed = [
            m for e, m in zip(entries, models, strict=True) if _same(e.model, config.base_model)
        ]
        base = listed[0] if listed else open_source(config.base_model)
    return Inputs(entries, models, base)


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# ---------------------------------------------------------------- source anatomy


@dataclass
class Anatomy:
    """A source's tensors by role."""

    llm: list[str] = field(default_factory=list)
    lora: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # (lin, ad) -> A/B
    towers: dict[str, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)


def anatomy(src: Source) -> Anatomy:
    out = Anatomy()
    modalities = set(src.config.modalities)
    for name in src:
        m = _LORA.match(name)
        if m:
            out.lora.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = name
        elif name.startswith(LLM):
            out.llm.append(name)
        elif name.startswith(TOWERS) and name.split(".")[1] in modalities:
            out.towers.setdefault(name.split(".")[1], []).append(name)
        else:
            out.other.append(name)
    return out


# ---------------------------------------------------------------- the planner


class _Planner:
    """Builds a Plan in small passes; holds the shared lookups."""

    def __init__(self, config: ComposeConfig, inputs: Inputs) -> None:
        self.config = config
        self.entries = inputs.entries
        self.sources = [*inputs.models]
        self.n = len(inputs.models)
        self.base_idx: int | None = None
        self.system_prompt: str | None = None  # from the tokenizer source's processor config
        if inputs.base is not None:
            same = [i for i, s in enumerate(inputs.models) if s is inputs.base]
            if same:
                self.base_idx = same[0]
            else:
                self.sources.append(inputs.base)
                self.base_idx = len(self.sources) - 1
        self.parts = [anatomy(s) for s in self.sources]
        self.model_idx = list(range(self.n))
        self.steps: list[Step] = []
        self.outputs: list[OutputTensor] = []
        self.dropped: list[Dropped] = []
        self.notes: list[str] = []
        self._bound: dict[str, BoundMerge] = {}
        self.compute_dtype = _torch_dtype(config.dtype)
        self.out_dtype = _torch_dtype(config.out_dtype) or self.compute_dtype

    # -- helpers
    def label(self, i: int) -> str:
        return str(self.sources[i].path)

    def lora_of(self, i: int) -> LoRAConfig | None:
        return self.sources[i].config.lora

    def bound(self, hf_name: str) -> BoundMerge:
        """The method bound for one tensor (mergekit filters see the HF name)."""
        models, glob = resolve_parameters(self.config, self.entries, hf_name)
        key = json.dumps([models, glob], sort_keys=True, default=str)
        if key not in self._bound:
            if self.mode == "damc":
                missing = [self.label(i) for i, m in enumerate(models) if m.get("weight") is None]
                if missing:
                    raise MergeError(
                        f"damc: no weight (lambda) for {', '.join(missing)}"
                        + (f" on tensor {hf_name}" if hf_name else ""),
                        hint="give every model parameters: {weight: LAMBDA}; under damc a missing "
                        "lambda is an error, not a silent 1 (or 1/N)",
                    )
            self._bound[key] = self.config.method.bind(models, glob)
        return self._bound[key]

    def out_name(self, name: str) -> str:
        return name.removeprefix(LLM) if self.output_format == "hf" else name

    def dtype_of(self, ref: Ref) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.sources[ref.source].dtype(ref.name)]

    def emit(self, step: Step, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, **kw) -> None:
        self.steps.append(step)
        for name, shape in zip(step_outputs(step), shapes, strict=True):
            out_dtype = self.out_dtype if self.out_dtype and dtype.is_floating_point else dtype
            self.outputs.append(OutputTensor(name, tuple(shape), out_dtype, **kw))

    def drop(self, i: int, name: str, reason: str) -> None:
        self.dropped.append(Dropped(i, name, reason))

    # -- passes
    def run(self) -> Plan:
        self.check_llms()
        self.mode = self.choose_mode()
        self.check_lora_sources()
        self.owners = self.resolve_towers()
        self.output_format = self.choose_format()
        self.plan_llm()
        self.plan_towers()
        self.plan_others()
        output_config = self.output_mmconfig()
        self.check_shapes(output_config)
        tok_dir, use_chat = self.tokenizer()
        return Plan(
            config=self.config,
            sources=self.sources,
            labels=[self.describe(i) for i in range(len(self.sources))],
            mode=self.mode,
            output_config=output_config,
            output_format=self.output_format,
            steps=self.steps,
            outputs=self.outputs,
            dropped=self.dropped,
            tokenizer_dir=tok_dir,
            use_chat_template=use_chat,
            system_prompt=self.system_prompt,
            compute_dtype=self.compute_dtype,
            out_dtype=self.out_dtype,
            notes=self.notes,
        )

    def describe(self, i: int) -> str:
        role = "base" if i == self.base_idx else "model"
        lora = self.lora_of(i)
        kind = f"LoRA {lora.strategy}" if lora else "full weights"
        towers = ", ".join(self.sources[i].config.modalities) or "text only"
        return f"{self.label(i)} ({role}; {kind}; {towers})"

    def check_llms(self) -> None:
        """Same LLM family and sizes everywhere; else nothing can be merged."""
        for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
            values = {
                self.label(i): s.config.text_config.get(key) for i, s in enumerate(self.sources)
            }
            if len(set(values.values())) > 1:
                what = {"vocab_size": "vocabulary sizes", "hidden_size": "hidden sizes"}.get(
                    key, key
                )
                raise MergeError(
                    f"the sources' LLMs differ in {what}: "
                    + ", ".join(f"{k}: {v}" for k, v in values.items()),
                    hint="only models fine-tuned from one base LLM can be composed",
                )

    def choose_mode(self) -> Mode | Literal["full"]:
        strategies = {self.lora_of(i).strategy if self.lora_of(i) else None for i in self.model_idx}
        full = None in strategies
        mode = self.config.composition
        if mode is None:
            if strategies == {"shared", "decoupled"}:
                raise MergeError(
                    "the sources mix shared- and decoupled-trained LoRA",
                    hint="set composition: naivemc or damc (damc needs decoupled sources only)",
                )
            mode = "damc" if strategies == {"decoupled"} else "naivemc"
        if mode == "damc" and strategies != {"decoupled"}:
            bad = [self.describe(i) for i in self.model_idx if self.lora_of(i) is None
                   or self.lora_of(i).strategy != "decoupled"]  # fmt: skip
            raise MergeError(
                "damc needs every source trained with decoupled LoRA adapters; not: "
                + "; ".join(bad),
                hint="use composition: naivemc, or compose only decoupled-trained models",
            )
        if mode == "naivemc" and "decoupled" in strategies:
            raise MergeError(
                "naivemc gives every token one shared adapter, but some sources are "
                "decoupled-trained",
                hint="use composition: damc (needs all sources decoupled)",
            )
        if self.config.lora_output == "fold" and mode == "damc":
            raise MergeError(
                "lora_output: fold cannot be used with damc: modality tokens must keep W0",
                hint="remove lora_output (damc stores the merged text adapter)",
            )
        self.full = full
        if full:
            self.notes.append("some sources are full fine-tunes: LLM weights merged as a whole")
            if self.config.lora_output == "adapter":
                raise MergeError(
                    "lora_output: adapter needs every source LoRA-trained from one base",
                    hint="remove lora_output; LoRA sources are folded into their weights",
                )
        return mode

    def check_lora_sources(self) -> None:
        loras = {self.label(i): self.lora_of(i) for i in self.model_idx if self.lora_of(i)}
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
        needs_base = self.config.needs_base
        if self.full and needs_base and self.base_idx is None:
            raise MergeError(
                f"{self.config.merge_method} merges task vectors of full fine-tunes and needs "
                "base_model",
                hint="set base_model: PATH (the LLM the models were fine-tuned from)",
            )
        if not needs_base and self.base_idx is not None and self.base_idx >= self.n and self.full:
            raise MergeError(
                "linear gives base_model no role",
                hint="list the base under models (with a weight) to average it in, or remove "
                "base_model",
            )

    def resolve_towers(self) -> dict[str, int | None]:
        """Modality -> the one source its tower (and adapter) comes from; None = dropped."""
        offered: dict[str, list[int]] = {}
        for i in self.model_idx:
            names = set(self.parts[i].towers)
            lora = self.lora_of(i)
            if lora and lora.strategy == "decoupled":
                names |= set(lora.adapters) - {TEXT_ADAPTER}
            for m in sorted(names):
                offered.setdefault(m, []).append(i)
        for m in self.config.towers:
            if m not in offered:
                raise MergeError(
                    f"towers.{m}: no source has a {m} tower",
                    hint=f"modalities offered: {', '.join(offered) or '(none)'}",
                )
        owners: dict[str, int | None] = {}
        for m, idx in offered.items():
            choice = self.config.towers.get(m)
            if choice is not None and choice.drop:
                owners[m] = None
            elif choice is not None:
                hit = [i for i in idx if _same(self.sources[i].path, choice.source)]
                if not hit:
                    raise MergeError(
                        f"towers.{m}.source {choice.source} is not a source with a {m} tower",
                        hint="choose one of: " + ", ".join(self.label(i) for i in idx),
                    )
                owners[m] = hit[0]
            elif len(idx) > 1:
                raise MergeError(
                    f"the {m} tower (or adapter) is in {len(idx)} sources: "
                    + ", ".join(self.label(i) for i in idx),
                    hint=f"pick one with towers: {{{m}: {{source: PATH}}}} or drop it with "
                    f"towers: {{{m}: {{drop: true}}}}",
                )
            else:
                owners[m] = idx[0]
        return owners

    def choose_format(self) -> Literal["mmcompose", "hf"]:
        fmt = self.config.output_format
        lora_kept = not self.full and (self.mode == "damc" or self.config.lora_output == "adapter")
        multimodal = any(o is not None for o in self.owners.values()) or lora_kept
        if fmt == "hf" and multimodal:
            raise MergeError(
                "output_format: hf cannot hold towers or adapters",
                hint="use output_format: mmcompose (or auto)",
            )
        if fmt == "auto":
            return "mmcompose" if multimodal else "hf"
        return fmt

    # -- the LLM
    def plan_llm(self) -> None:
        names = self.common_llm_names()
        self.linears = self.lora_linears()
        fold = not self.full and self.mode == "naivemc" and self.config.lora_output != "adapter"
        for name in names:
            base_step, sources, method = self.base_step(name)
            lin = name.removesuffix(".weight")
            shape = self.sources[0].shape(name)
            dtype = self.merge_dtype([Ref(i, name) for i in sources])
            if fold and lin in self.linears:
                deltas = self.text_deltas(lin)
                step = FoldDelta(self.out_name(name), base_step, deltas, self.bound(_hf(name)))
                note = "W0 + merged LoRA deltas (folded)"
                srcs = tuple(sorted({*sources, *self.model_idx}))
                self.emit(step, [shape], dtype, action="merged", sources=srcs,
                          method=self.config.merge_method, note=note)  # fmt: skip
                continue
            action = "carried" if isinstance(base_step, Carry) else "merged"
            note = "identical in every source (verified)" if action == "carried" else ""
            self.emit(base_step, [shape], dtype, action=action, sources=tuple(sources),
                      method=method, note=note)  # fmt: skip
        if not self.full:
            self.plan_adapters(fold)

    def common_llm_names(self) -> list[str]:
        """LLM base tensors, which must be the same set in every source (unless dropped)."""
        sets = {i: [n for n in self.parts[i].llm if not self._drop_cfg(i, n)] for i in
                range(len(self.sources))}  # fmt: skip
        first = sets[0]
        for i, names in sets.items():
            missing = sorted(set(first) - set(names))
            extra = sorted(set(names) - set(first))
            if missing or extra:
                which = f"{self.label(i)} lacks {missing[:3]}" if missing else (
                    f"{self.label(i)} has extra {extra[:3]}")  # fmt: skip
                raise MergeError(
                    f"the sources' LLMs hold different tensors: {which} "
                    f"(compared with {self.label(0)})",
                    hint="list tensors to leave out under drop: [PATTERN, ...]",
                )
        for name in first:
            shapes = {self.label(i): self.sources[i].shape(name) for i in sets}
            if len(set(shapes.values())) > 1:
                raise MergeError(
                    f"tensor {name} differs in shape: "
                    + ", ".join(f"{k}: {list(v)}" for k, v in shapes.items()),
                    hint="only models of one architecture and size can be merged",
                )
        return first

    def _drop_cfg(self, i: int, name: str) -> bool:
        if self.config.is_dropped(name):
            self.drop(i, name, "dropped by the config's drop patterns")
            return True
        return False

    def merge_dtype(self, refs: Sequence[Ref]) -> torch.dtype:
        """The inputs' common dtype; differing dtypes need an explicit ``dtype``."""
        dtypes = {self.label(r.source): self.dtype_of(r) for r in refs}
        if self.compute_dtype is not None:
            return self.compute_dtype
        if len(set(dtypes.values())) > 1:
            raise MergeError(
                f"tensor {refs[0].name} differs in dtype: "
                + ", ".join(f"{k}: {str(v).removeprefix('torch.')}" for k, v in dtypes.items()),
                hint="set dtype: float32 (or bfloat16) in the config to cast the inputs",
            )
        return next(iter(dtypes.values()))

    def base_step(self, name: str) -> tuple[Carry | MergeWeights, list[int], str | None]:
        """How one LLM base tensor is made: merged (full fine-tunes, or LoRA sources with a
        base_model under a task-vector method) or carried from one shared base."""
        needs_base = self.config.needs_base
        refs = tuple(Ref(i, name) for i in self.model_idx)
        base = Ref(self.base_idx, name) if self.base_idx is not None and needs_base else None
        if self.full or base is not None:
            lin = name.removesuffix(".weight")
            deltas = ()
            if self.full:  # shared LoRAs are folded into their own source's weights first
                deltas = tuple(self.delta(i, lin, TEXT_ADAPTER) for i in self.model_idx)
            step = MergeWeights(self.out_name(name), refs, base, self.bound(_hf(name)),
                                deltas if any(deltas) else ())  # fmt: skip
            used = [*self.model_idx] + ([self.base_idx] if base else [])
            return step, sorted(set(used)), self.config.merge_method
        others = tuple(Ref(i, name) for i in range(1, len(self.sources)))
        return (
            Carry(self.out_name(name), Ref(0, name), others),
            list(range(len(self.sources))),
            None,
        )

    def lora_linears(self) -> dict[str, tuple[int, int]]:
        """Linears with a text adapter (in every LoRA source) -> their (out, in) shape."""
        lins: dict[str, tuple[int, int]] = {}
        for i in self.model_idx:
            for lin, ad in self.parts[i].lora:
                if ad == TEXT_ADAPTER:
                    shape = self.sources[i].shape(lin + ".weight")
                    lins[lin] = (shape[0], shape[1])
        return lins

    def delta(self, i: int, lin: str, adapter: str) -> Delta | None:
        factors = self.parts[i].lora.get((lin, adapter))
        lora = self.lora_of(i)
        if factors is None or lora is None:
            return None
        if set(factors) != {"A", "B"}:
            raise MergeError(f"{self.label(i)}: adapter {adapter!r} on {lin} lacks lora_A/B")
        spec = lora.adapters[adapter]
        a, b = Ref(i, factors["A"]), Ref(i, factors["B"])
        self.check_factors(i, lin, a, b, spec)
        return Delta(a, b, spec.scaling)

    def check_factors(self, i: int, lin: str, a: Ref, b: Ref, spec: AdapterSpec) -> None:
        src = self.sources[i]
        out_f, in_f = src.shape(lin + ".weight")[:2]
        if src.shape(a.name) != (spec.rank, in_f) or src.shape(b.name) != (out_f, spec.rank):
            raise MergeError(
                f"{self.label(i)}: LoRA factors of {lin} have shapes {list(src.shape(a.name))} "
                f"and {list(src.shape(b.name))}, expected [{spec.rank}, {in_f}] and "
                f"[{out_f}, {spec.rank}] from its config",
                hint="the checkpoint does not match its config.json",
            )

    def text_deltas(self, lin: str) -> tuple[Delta, ...]:
        deltas = [self.delta(i, lin, TEXT_ADAPTER) for i in self.model_idx]
        if any(d is None for d in deltas):
            lacking = [self.label(i) for i, d in zip(self.model_idx, deltas, strict=True) if not d]
            raise MergeError(f"no text adapter on {lin} in {', '.join(lacking)}")
        return tuple(d for d in deltas if d is not None)

    # -- adapters
    def plan_adapters(self, fold: bool) -> None:
        self.text_rank: int | None = None
        if not fold:
            self.plan_text_adapter()
        for i in self.model_idx:
            for (_lin, ad), factors in self.parts[i].lora.items():
                if ad == TEXT_ADAPTER:
                    continue
                if self.owners.get(ad) != i:
                    for n in factors.values():
                        self.drop(i, n, f"{ad} adapter taken from another source or dropped")
                    continue
                for n in sorted(factors.values()):
                    ref = Ref(i, n)
                    self.emit(Carry(n, ref), [self.sources[i].shape(n)], self.dtype_of(ref),
                              action="carried", sources=(i,), note=f"{ad} adapter")  # fmt: skip

    def plan_text_adapter(self) -> None:
        concat = self.config.merge_method in _CONCAT
        ranks = [self.lora_of(i).adapters[TEXT_ADAPTER].rank for i in self.model_idx]
        rank = sum(ranks) if concat else max(min(s) for s in self.linears.values())
        self.text_rank = rank
        for lin, (out_f, in_f) in self.linears.items():
            deltas = self.text_deltas(lin)
            out_a = f"{lin}.lora.{TEXT_ADAPTER}.lora_A"
            out_b = f"{lin}.lora.{TEXT_ADAPTER}.lora_B"
            merge = self.bound(_hf(lin + ".weight"))
            if concat:
                step: Step = ConcatAdapter(out_a, out_b, deltas, concat_coefficients(merge))
                note = "concatenated LoRA factors, B scaled by w_i*alpha_i/r_i (exact)"
            else:
                step = DenseAdapter(out_a, out_b, deltas, merge, rank)
                note = "dense merged delta as identity-padded factors (exact)"
            refs = [r for d in deltas for r in (d.a, d.b)]
            self.emit(step, [(rank, in_f), (out_f, rank)], self.merge_dtype(refs),
                      action="merged", sources=tuple(self.model_idx),
                      method=self.config.merge_method, note=note)  # fmt: skip

    # -- towers and the rest
    def plan_towers(self) -> None:
        for i in self.model_idx:
            for m, names in self.parts[i].towers.items():
                for n in names:
                    if self._drop_cfg(i, n):
                        continue
                    if self.owners.get(m) != i:
                        self.drop(i, n, f"{m} tower taken from another source or dropped")
                        continue
                    ref = Ref(i, n)
                    self.emit(Carry(n, ref), [self.sources[i].shape(n)], self.dtype_of(ref),
                              action="carried", sources=(i,), note=f"{m} tower")  # fmt: skip
        if self.base_idx is not None and self.base_idx >= self.n:
            for names in self.parts[self.base_idx].towers.values():
                for n in names:
                    self.drop(self.base_idx, n, "towers of the base model are not used")

    def plan_others(self) -> None:
        for i in range(len(self.sources)):
            for n in self.parts[i].other:
                if self._drop_cfg(i, n):
                    continue
                raise MergeError(
                    f"{self.label(i)} holds tensor {n}, which is neither LLM, LoRA nor tower",
                    hint=f"leave it out with drop: [{n!r}]",
                )
            if i >= self.n:  # the base model's adapters play no part
                for factors in self.parts[i].lora.values():
                    for n in factors.values():
                        self.drop(i, n, "adapters of the base model are not used")

    def check_shapes(self, config: MMConfig) -> None:
        """Every output tensor has the shape the output config.json implies, so the written
        folder loads: a source whose config.json contradicts its weights (a tower's width, an
        LLM size) is named now, before any tensor is read, not by a later load."""
        from mmcompose.model.modeling import expected_shapes

        expected = expected_shapes(config)
        for o in self.outputs:
            want = expected.get(o.name if self.output_format == "mmcompose" else LLM + o.name)
            if want is not None and want != o.shape:
                who = ", ".join(self.label(i) for i in o.sources)
                raise CheckpointError(
                    f"{who}: tensor {o.name} has shape {list(o.shape)}, which does not match its "
                    f"config.json (it implies {list(want)})",
                    hint="the source's config.json was edited or belongs to other weights; "
                    "restore the original",
                )

    # -- output config and tokenizer
    def output_mmconfig(self) -> MMConfig:
        ref = self.sources[self.base_idx if self.base_idx is not None else 0].config
        towers: list[TowerConfig] = [
            self.sources[i].config.tower(m)
            for m, i in self.owners.items()
            if i is not None and m in self.parts[i].towers
        ]
        dtype = self.config.out_dtype or self.config.dtype or ref.dtype
        return MMConfig(
            text_config=ref.text_config, towers=towers, lora=self.output_lora(), dtype=dtype
        )

    def output_lora(self) -> LoRAConfig | None:
        if self.full or (self.text_rank is None and self.mode == "naivemc"):
            return None
        first = next(self.lora_of(i) for i in self.model_idx)
        adapters: dict[str, AdapterSpec] = {}
        if self.text_rank is not None:
            adapters[TEXT_ADAPTER] = AdapterSpec(rank=self.text_rank, alpha=self.text_rank)
        for m, i in self.owners.items():
            lora = self.lora_of(i) if i is not None else None
            if lora is not None and m in lora.adapters:
                adapters[m] = lora.adapters[m]
        strategy = "decoupled" if self.mode == "damc" else "shared"
        return LoRAConfig(strategy=strategy, adapters=adapters,
                          target_modules=first.target_modules, dropout=first.dropout)  # fmt: skip

    def tokenizer(self) -> tuple[Path | None, bool]:
        choice = self.config.tokenizer_source
        default = self.sources[self.base_idx if self.base_idx is not None else 0].path
        if choice == "union":
            texts = {self.label(i): _tokenizer_bytes(self.sources[i].path) for i in self.model_idx}
            if len(set(texts.values())) > 1:
                raise MergeError(
                    "tokenizer_source: union of different tokenizers is not supported",
                    hint="the sources' tokenizers differ; pick one with tokenizer_source: PATH",
                )
        path = Path(choice) if isinstance(choice, Path) else default
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            if isinstance(choice, Path):
                raise MergeError(f"tokenizer_source {path} holds no tokenizer files")
            self.notes.append(f"warning: {path} holds no tokenizer; none is written")
            log.warning("%s holds no tokenizer files; the output gets none", path)
            return None, True
        pc = path / "processor_config.json"
        use_chat, self.system_prompt = True, None
        if pc.is_file():
            data = load_json(pc, "processor config", error=CheckpointError)
            use_chat = bool(data.get("use_chat_template", True))
            self.system_prompt = data.get("system_prompt")
        return path, use_chat


def _tokenizer_bytes(path: Path) -> bytes:
    return b"".join((path / f).read_bytes() for f in TOKENIZER_FILES if (path / f).is_file())


def _hf(name: str) -> str:
    """The Hugging Face name mergekit's parameter filters are matched against."""
    return name.removeprefix(LLM)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def concat_coefficients(merge: BoundMerge) -> tuple[float, ...]:
    """c_i with ``merge(x_1..x_n) == sum_i c_i x_i`` for a method linear in its inputs,
    read off by merging the unit vectors (so lambda, normalize, weights all count)."""
    n = merge.n_models
    units = list(torch.eye(n, dtype=torch.float64))
    return tuple(float(c) for c in merge(units))


def plan_composition(config: ComposeConfig, inputs: Inputs) -> Plan:
    """Decide the fate of every tensor; reads headers and configs, never tensor data."""
    return _Planner(config, inputs).run()


__all__ = [
    "Carry",
    "ConcatAdapter",
    "Delta",
    "DenseAdapter",
    "Dropped",
    "FoldDelta",
    "Inputs",
    "MergeWeights",
    "OutputTensor",
    "Plan",
    "Ref",
    "Step",
    "concat_coefficients",
    "open_inputs",
    "plan_composition",
    "step_outputs",
]
