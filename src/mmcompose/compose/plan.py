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
- ``mmer`` (shared LoRA or full fine-tunes over one base): each targeted linear becomes
  ``W0 + tau*``, ``tau*`` (dense) and one packed mask per modality (:class:`MaskedMerge`,
  :mod:`~mmcompose.compose.masks`); the LLM's other tensors are made as above.

The parts: :mod:`~mmcompose.compose.inputs` (opening the sources, their tensors by role),
:mod:`~mmcompose.compose.regime` (the regime, tower owners, output format),
:mod:`~mmcompose.compose.plan_data` (the steps and the plan), this module (the fate of each
tensor) and :mod:`~mmcompose.compose.output_config` (config.json, tokenizer, shape check).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from mmcompose.compose.config import ComposeConfig, resolve_parameters
from mmcompose.compose.inputs import LLM, TOWERS, Anatomy, Inputs, anatomy, open_inputs
from mmcompose.compose.methods import BoundMerge
from mmcompose.compose.output_config import (
    TOKENIZER_FILES,
    check_shapes,
    choose_tokenizer,
    output_lora,
    output_mmconfig,
)
from mmcompose.compose.plan_data import (
    Carry,
    ConcatAdapter,
    Delta,
    DenseAdapter,
    Dropped,
    FoldDelta,
    MaskedMerge,
    MergeWeights,
    OutputTensor,
    Plan,
    Ref,
    Step,
    TaskVector,
    step_outputs,
)
from mmcompose.compose.regime import Mode, choose_regime, mask_owners
from mmcompose.errors import MergeError
from mmcompose.model.config import (
    DEFAULT_TARGETS,
    TEXT_ADAPTER,
    AdapterSpec,
    LoRAConfig,
    MMERConfig,
)
from mmcompose.model.masked import packed_size

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


class _Planner:
    """Builds a Plan in small passes; holds the shared lookups."""

    def __init__(self, config: ComposeConfig, inputs: Inputs) -> None:
        self.config = config
        self.entries = inputs.entries
        self.sources = [*inputs.models]
        self.n = len(inputs.models)
        self.base_idx: int | None = None
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
        self.text_rank: int | None = None  # the merged text adapter's; None: folded
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
            if self.mode == "damc" and self.config.roles.weights:
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

    def emit(
        self,
        step: Step,
        shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype | Sequence[torch.dtype],
        **kw,
    ) -> None:
        """``dtype``: one for every output of the step, or one per output."""
        self.steps.append(step)
        names = step_outputs(step)
        dtypes = [dtype] * len(names) if isinstance(dtype, torch.dtype) else list(dtype)
        for name, shape, dt in zip(names, shapes, dtypes, strict=True):
            out_dtype = self.out_dtype if self.out_dtype and dt.is_floating_point else dt
            self.outputs.append(OutputTensor(name, tuple(shape), out_dtype, **kw))

    def drop(self, i: int, name: str, reason: str) -> None:
        self.dropped.append(Dropped(i, name, reason))

    # -- passes
    def run(self) -> Plan:
        labels = [self.describe(i) for i in range(len(self.sources))]
        regime = choose_regime(self.config, self.sources, self.parts, self.n, self.base_idx,
                               labels)  # fmt: skip
        self.mode, self.full, self.owners = regime.mode, regime.full, regime.owners
        self.output_format = regime.output_format
        self.notes.extend(regime.notes)
        self.plan_llm()
        self.plan_towers()
        self.plan_others()
        ref = self.sources[self.base_idx if self.base_idx is not None else 0]
        models = self.sources[: self.n]
        lora = output_lora(models, self.owners, self.mode, self.full, self.text_rank)
        output_config = output_mmconfig(self.config, ref.config, self.sources, self.parts,
                                        self.owners, lora, self.mmer)  # fmt: skip
        check_shapes(self.outputs, output_config, self.output_format,
                     [self.label(i) for i in range(len(self.sources))])  # fmt: skip
        tokenizer = choose_tokenizer(self.config.tokenizer_source, ref.path, models)
        if tokenizer.warning is not None:
            self.notes.append(tokenizer.warning)
        return Plan(
            config=self.config,
            sources=self.sources,
            labels=labels,
            mode=self.mode,
            output_config=output_config,
            output_format=self.output_format,
            steps=self.steps,
            outputs=self.outputs,
            dropped=self.dropped,
            tokenizer_dir=tokenizer.path,
            use_chat_template=tokenizer.use_chat_template,
            system_prompt=tokenizer.system_prompt,
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

    # -- the LLM
    def plan_llm(self) -> None:
        self.mmer: MMERConfig | None = None
        if self.mode == "mmer":
            self.plan_mmer()
            return
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

    def plan_mmer(self) -> None:
        """MMER: every targeted linear as one :class:`MaskedMerge` (dense: a mask of a LoRA's
        ``B @ A`` is not low-rank); the LLM's other tensors carried or merged as usual."""
        names = self.common_llm_names()
        loras = [self.lora_of(i) for i in self.model_idx]
        targets = next((lo.target_modules for lo in loras if lo is not None), DEFAULT_TARGETS)
        owners = mask_owners(self.owners, self.parts)
        lam = self.config.mmer_settings.mask_lambda
        for name in names:
            lin = name.removesuffix(".weight")
            shape = self.sources[0].shape(name)
            leaf = lin.rsplit(".", 1)[-1]
            if not (name.endswith(".weight") and len(shape) == 2 and leaf in targets):
                base_step, sources, method = self.base_step(name)
                action = "carried" if isinstance(base_step, Carry) else "merged"
                note = "identical in every source (verified)" if action == "carried" else ""
                self.emit(base_step, [shape], self.merge_dtype([Ref(i, name) for i in sources]),
                          action=action, sources=tuple(sources), method=method,
                          note=note)  # fmt: skip
                continue
            deltas = [self.delta(i, lin, TEXT_ADAPTER) for i in self.model_idx]
            if not self.full:
                self.text_deltas(lin)  # every LoRA source adapts it (else a clear error)
                others = tuple(Ref(i, name) for i in range(1, len(self.sources)))
                base = Carry(self.out_name(name), Ref(0, name), others)
            else:
                base = Carry(self.out_name(name), Ref(self.base_idx, name))  # type: ignore[arg-type]
            tvs = tuple(TaskVector(Ref(i, name) if self.full else None, d)
                        for i, d in zip(self.model_idx, deltas, strict=True))  # fmt: skip
            masks = tuple((f"{lin}.mmer.mask.{m}", m, i) for m, i in owners.items())
            step = MaskedMerge(self.out_name(name), f"{lin}.mmer.delta", masks, base, tvs,
                               self.bound(_hf(name)), lam)  # fmt: skip
            refs = [Ref(i, name) for i in range(len(self.sources))]
            refs += [r for d in deltas if d is not None for r in (d.a, d.b)]
            dtype = self.merge_dtype(refs)
            packed = (packed_size(shape[0] * shape[1]),)
            self.emit(step, [shape, shape, *[packed] * len(masks)],
                      [dtype, dtype, *[torch.uint8] * len(masks)], action="merged",
                      sources=tuple(sorted({*self.model_idx, base.ref.source})),
                      method=self.config.merge_method,
                      note=f"mmer: W0 + tau*, tau*, masks of {', '.join(owners)}")  # fmt: skip
        self.mmer = MMERConfig(modalities=tuple(owners), target_modules=tuple(targets),
                               mask_lambda=lam, merge_method=self.config.merge_method)  # fmt: skip
        self.notes.append(
            f"mmer: masks |tau_i| >= {lam:g} * |tau* - tau_i| for {', '.join(owners)} on "
            f"{', '.join(targets)}; dense deltas (a masked B @ A is not low-rank)"
        )

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
    "LLM",
    "SAFETENSORS_DTYPES",
    "TOKENIZER_FILES",
    "TOWERS",
    "Anatomy",
    "Carry",
    "ConcatAdapter",
    "Delta",
    "DenseAdapter",
    "Dropped",
    "FoldDelta",
    "Inputs",
    "MergeWeights",
    "Mode",
    "OutputTensor",
    "Plan",
    "Ref",
    "Step",
    "anatomy",
    "concat_coefficients",
    "open_inputs",
    "plan_composition",
    "step_outputs",
]
