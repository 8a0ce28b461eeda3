"""Carrying out a composition plan, streamed tensor by tensor into size-capped shards.

Each plan step reads its few inputs, computes on ``device``, hands the result to a shard
writer and drops the inputs. Three threads overlap the work (:mod:`~mmcompose.compose.tensor_io`):
one reads the next steps' inputs with ``preadv`` (no file mapping stays resident), the main one
computes, one writes each output tensor at its offset in its shard as soon as it exists (the
layout is fixed by the plan, so every header is known up front). Peak memory is about the
largest step's inputs plus the read-ahead and write-behind budgets, whatever the model's size
or depth. Everything is written into ``atomic_dir``: an error or Ctrl-C leaves nothing at the
output path.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmcompose.compose.config import ComposeConfig, load_compose_config
from mmcompose.compose.masks import tall_mask
from mmcompose.compose.methods import BoundMerge
from mmcompose.compose.plan import (
    TOKENIZER_FILES,
    Carry,
    ConcatAdapter,
    Delta,
    FoldDelta,
    MergeWeights,
    OutputTensor,
    Plan,
    Ref,
    Step,
    open_inputs,
    plan_composition,
)
from mmcompose.compose.plan_data import MaskedMerge, TaskVector
from mmcompose.compose.sources import Source
from mmcompose.compose.tensor_io import (
    ReadAhead,
    ShardFeed,
    ShardSpec,
    StreamWriter,
    TensorFile,
    all_finite,
    write_shard_stream,
)
from mmcompose.devices import resolve_device
from mmcompose.errors import CheckpointError, MergeError
from mmcompose.fs import atomic_dir, refuse_existing
from mmcompose.io import SAFE_INDEX, plan_shards, shard_names
from mmcompose.model.card import write_card
from mmcompose.model.config import CONFIG_NAME, PROCESSOR_CONFIG, TEXT_ADAPTER
from mmcompose.model.masked import pack_mask

REPORT_NAME = "composition_report.json"
_RELEASE_BYTES = 1 << 30  # input pages kept mapped before the files are reopened
# Bytes read ahead of the current step / waiting to be written: enough to keep the disk busy
# while a step computes, small beside the model (peak RSS is flat in its size and depth).
READ_AHEAD_BYTES = 256 << 20
WRITE_BEHIND_BYTES = 256 << 20
WRITE_THREAD = True

__all__ = [
    "REPORT_NAME",
    "ComposeResult",
    "apply_text_merge",
    "compose",
    "concat_factors",
    "identity_factors",
    "lora_delta",
    "run_from_yaml",
    "set_concat_adapter",
]


# ---------------------------------------------------------------- pure math


def _work(t: Tensor) -> Tensor:
    """float32 for arithmetic (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def lora_delta(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """dW = scaling * B @ A, (out, in): the update a LoRA adds to its linear."""
    return (_work(b) @ _work(a)) * scaling


def concat_factors(
    factors: Sequence[tuple[Tensor, Tensor]], coeffs: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """One adapter with ``B @ A == sum_i c_i B_i A_i`` exactly: stack the A_i, scale the B_i.

    ``factors`` holds (A_i, s_i-scaled or raw B_i); the caller folds scalings into ``coeffs``.
    """
    a = torch.cat([_work(a) for a, _ in factors], dim=0)
    b = torch.cat([_work(b) * c for (_, b), c in zip(factors, coeffs, strict=True)], dim=1)
    return a, b


def identity_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Exact factors of a dense delta at ``rank >= min(out, in)``: one factor is a padded
    identity, the other the delta itself, so ``B @ A == delta`` with no approximation."""
    out_f, in_f = delta.shape
    if rank < min(out_f, in_f):
        raise MergeError(f"rank {rank} cannot hold a dense ({out_f}, {in_f}) delta exactly")
    a = delta.new_zeros(rank, in_f)
    b = delta.new_zeros(out_f, rank)
    if out_f <= in_f:
        b[:, :out_f] = torch.eye(out_f, dtype=delta.dtype, device=delta.device)
        a[:out_f] = delta
    else:
        b[:, :in_f] = delta
        a[:in_f] = torch.eye(in_f, dtype=delta.dtype, device=delta.device)
    return a, b


# ---------------------------------------------------------------- reading inputs


class _Reader:
    """Reads input tensors, checks them for NaN/Inf, moves them to the compute device.

    Safetensors inputs are read directly (:class:`TensorFile`), ahead of the step that needs
    them when ``steps`` are given; anything else (``.bin`` files, importer transforms) through
    its :class:`Source`."""

    def __init__(
        self,
        plan: Plan,
        device: torch.device,
        allow_nonfinite: bool,
        read_ahead: int = 0,
    ) -> None:
        self.sources: list[Source] = plan.sources
        self.device = device
        self.dtype = plan.compute_dtype
        self.allow_nonfinite = allow_nonfinite
        self.warnings: list[str] = []
        self.read_bytes = 0
        self.files: dict[Path, TensorFile | None] = {}
        self.lock = threading.Lock()
        self.ahead = ReadAhead(plan.steps, self.locate, read_ahead) if read_ahead else None

    def locate(self, ref: Ref) -> tuple[TensorFile, str] | None:
        """Where ``ref`` can be read directly, or None (a transform, a ``.bin``, a Source
        subclass that reads its own way, a file it cannot open)."""
        src = self.sources[ref.source]
        entry = getattr(src, "_entries", {}).get(ref.name)
        if type(src).get is not Source.get or entry is None:
            return None
        file, stored, transform = entry
        if transform is not None or file.suffix != ".safetensors":
            return None
        with self.lock:
            if file not in self.files:
                try:
                    self.files[file] = TensorFile(file)
                except (OSError, CheckpointError):
                    self.files[file] = None  # Source.get reports it
            tf = self.files[file]
        return (tf, stored) if tf is not None and tf.readable(stored) else None

    def raw(self, ref: Ref) -> Tensor:
        got = self.ahead.read(ref) if self.ahead is not None else None
        if got is None:
            where = self.locate(ref)
            if where is None:
                t = self.sources[ref.source].get(ref.name)
                self.read_bytes += t.numel() * t.element_size()
            else:
                t = _read_direct(*where)
            got = t, all_finite(t)
        t, finite = got
        if not finite:
            self._nonfinite(ref)
        return t

    def compute(self, ref: Ref) -> Tensor:
        t = self.raw(ref).to(self.device)
        return t.to(self.dtype) if self.dtype is not None else t

    def _nonfinite(self, ref: Ref) -> None:
        msg = f"{self.sources[ref.source].path}: tensor {ref.name} holds NaN or Inf"
        if not self.allow_nonfinite:
            raise MergeError(msg, hint="fix the checkpoint, or pass --allow-nonfinite to go on")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self.warnings.append(msg)

    def release(self, every: int) -> None:
        """Unmap the input files once ``every`` bytes were read through them (``Source.get``
        only): pages read via safetensors' mmap otherwise stay resident, and peak RSS would
        grow with model size. Not after every tensor: reopening a file costs a little."""
        if self.read_bytes >= every:
            for s in self.sources:
                s.close()
            self.read_bytes = 0

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        for tf in self.files.values():
            if tf is not None:
                tf.close()
        self.files.clear()

    def delta(self, d: Delta) -> Tensor:
        return lora_delta(self.compute(d.a), self.compute(d.b), d.scaling)

    def label(self, i: int) -> str:
        return str(self.sources[i].path)


def _read_direct(tf: TensorFile, name: str) -> Tensor:
    try:
        return tf.read(name)
    except OSError as e:
        raise CheckpointError(f"cannot read tensor {name} from {tf.path}: {e}") from None


# ---------------------------------------------------------------- running steps


def run_step(step: Step, rd: _Reader, gen: torch.Generator | None) -> dict[str, Tensor]:
    """One plan step -> its output tensor(s)."""
    if isinstance(step, Carry):
        return {step.out: _carry(step, rd)}
    if isinstance(step, MergeWeights):
        return {step.out: _merge_weights(step, rd, gen)}
    if isinstance(step, FoldDelta):
        return {step.out: _fold(step, rd, gen)}
    if isinstance(step, MaskedMerge):
        return _masked_merge(step, rd, gen)
    if isinstance(step, ConcatAdapter):
        factors = [(rd.compute(d.a), rd.compute(d.b)) for d in step.deltas]
        coeffs = [c * d.scaling for c, d in zip(step.coeffs, step.deltas, strict=True)]
        a, b = concat_factors(factors, coeffs)
        return {step.out_a: a, step.out_b: b}
    delta = _merged_delta(step.deltas, step.merge, rd, gen)
    a, b = identity_factors(delta, step.rank)
    return {step.out_a: a, step.out_b: b}


def _carry(step: Carry, rd: _Reader) -> Tensor:
    t = rd.raw(step.ref)
    for other in step.same_as:
        u = rd.raw(other)
        if u.dtype != t.dtype or not torch.equal(u, t):
            raise MergeError(
                f"sources do not share one base LLM: {step.ref.name} differs between "
                f"{rd.label(step.ref.source)} and {rd.label(other.source)}",
                hint="compose models fine-tuned from one base; to merge different LLM weights "
                "give base_model and a task-vector method (task_arithmetic, ties, ...)",
            )
    return t


def _merge_weights(step: MergeWeights, rd: _Reader, gen: torch.Generator | None) -> Tensor:
    inputs = [rd.compute(r) for r in step.inputs]
    for i, d in enumerate(step.deltas):
        if d is not None:  # a shared LoRA's effective weight: W_i + dW_i
            inputs[i] = (_work(inputs[i]) + rd.delta(d)).to(inputs[i].dtype)
    base = rd.compute(step.base) if step.base is not None else None
    return _call(step.merge, inputs, base, gen, step.out)


def _fold(step: FoldDelta, rd: _Reader, gen: torch.Generator | None) -> Tensor:
    base = _carry(step.base, rd) if isinstance(step.base, Carry) else None
    if base is None:
        base = _merge_weights(step.base, rd, gen)  # type: ignore[arg-type]
    delta = _merged_delta(step.deltas, step.merge, rd, gen)
    return (_work(base.to(delta.device)) + delta).to(base.dtype)


def _masked_merge(step: MaskedMerge, rd: _Reader, gen: torch.Generator | None) -> dict[str, Tensor]:
    """MMER on one linear: W0 + tau*, tau*, and each modality's packed mask."""
    w0 = _carry(step.base, rd)
    base = _work(w0.to(rd.device, rd.dtype or w0.dtype))
    taus = [_task_vector(tv, base, rd) for tv in step.task_vectors]
    merged = _work(_call(step.merge, taus, None, gen, step.out))
    out = {step.out: (base + merged).to(w0.dtype), step.out_delta: merged}
    for name, _, i in step.out_masks:
        out[name] = pack_mask(tall_mask(taus[i], merged, step.mask_lambda))
    return out


def _task_vector(tv: TaskVector, base: Tensor, rd: _Reader) -> Tensor:
    tau = _work(rd.compute(tv.weight)) - base if tv.weight is not None else torch.zeros_like(base)
    return tau + rd.delta(tv.delta) if tv.delta is not None else tau


def _merged_delta(
    deltas: Sequence[Delta], merge: BoundMerge, rd: _Reader, gen: torch.Generator | None
) -> Tensor:
    """The method over dense deltas dW_i as task vectors (base=None)."""
    return _call(merge, [rd.delta(d) for d in deltas], None, gen, deltas[0].a.name)


def _call(
    merge: BoundMerge,
    tensors: list[Tensor],
    base: Tensor | None,
    gen: torch.Generator | None,
    name: str,
) -> Tensor:
    try:
        return merge(tensors, base, generator=gen)
    except MergeError as e:
        raise MergeError(f"{name}: {e.message}", hint=e.hint) from None


# ---------------------------------------------------------------- writing shards


def _write_shard(path: Path, tensors: ShardFeed, metadata: dict[str, str]) -> None:
    """Write one shard file from its tensors as they arrive (a seam for tests that interrupt
    a merge; runs in the writer thread)."""
    write_shard_stream(path, tensors, metadata)


class _ShardWriter:
    """Sends output tensors to the shards the plan laid out, written behind by a thread."""

    def __init__(
        self,
        folder: Path,
        outputs: Sequence[OutputTensor],
        cap: int,
        meta: dict,
        budget: int = WRITE_BEHIND_BYTES,
    ) -> None:
        self.folder, self.meta = folder, meta
        self.specs = {o.name: o for o in outputs}
        groups = plan_shards(((o.name, o.nbytes) for o in outputs), cap)
        self.files = shard_names(len(groups)) if outputs else []
        self.groups = groups if outputs else []
        self.shard_of = {n: g for g, names in enumerate(self.groups) for n in names}
        shards = [
            (
                folder / f,
                ShardSpec(
                    tuple(names),
                    tuple(self.specs[n].shape for n in names),
                    tuple(self.specs[n].dtype for n in names),
                ),
            )
            for f, names in zip(self.files, self.groups, strict=True)
        ]
        # the module attribute is looked up per shard, so a test can replace _write_shard
        self.stream = StreamWriter(
            shards, meta, lambda *a: _write_shard(*a), budget, threaded=WRITE_THREAD
        )

    def add(self, name: str, t: Tensor) -> None:
        spec = self.specs[name]
        if tuple(t.shape) != spec.shape:
            raise MergeError(f"internal: {name} came out {list(t.shape)}, planned {spec.shape}")
        self.stream.add(name, t.detach().to("cpu", spec.dtype).contiguous())

    def finish(self) -> list[str]:
        if self.stream.missing:
            self.stream.close()
            self.stream._raise()
            raise MergeError(f"internal: tensors never produced: {sorted(self.stream.missing)[:5]}")
        self.stream.finish()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(o.nbytes for o in self.specs.values())},
                "weight_map": {n: self.files[self.shard_of[n]] for n in self.specs},
            }
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)


# ---------------------------------------------------------------- the folder around them


def _write_configs(plan: Plan, folder: Path) -> None:
    if plan.output_format == "hf":
        text = dict(plan.output_config.text_config)
        if plan.out_dtype is not None:
            text["dtype"] = str(plan.out_dtype).removeprefix("torch.")
        (folder / CONFIG_NAME).write_text(json.dumps(text, indent=2) + "\n")
    else:
        (folder / CONFIG_NAME).write_text(plan.output_config.to_json())
        proc = {
            "processor_class": "MMProcessor",
            "use_chat_template": plan.use_chat_template,
            "system_prompt": plan.system_prompt,
            "encoders": {
                t.modality: t.encoder.model_dump(mode="json") for t in plan.output_config.towers
            },
        }
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(proc, indent=2) + "\n")
    if plan.tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (plan.tokenizer_dir / f).is_file():
                shutil.copyfile(plan.tokenizer_dir / f, folder / f)


def report(plan: Plan, files: Sequence[str] = (), warns: Sequence[str] = ()) -> dict[str, Any]:
    """The composition report: every tensor merged, carried or dropped, and the config."""
    label = [str(s.path) for s in plan.sources]
    tensors = [
        {
            "name": o.name,
            "action": o.action,
            "sources": [label[i] for i in o.sources],
            "method": o.method,
            "shape": list(o.shape),
            "dtype": str(o.dtype).removeprefix("torch."),
            **({"note": o.note} if o.note else {}),
        }
        for o in plan.outputs
    ]
    dropped = [
        {"name": d.name, "action": "dropped", "sources": [label[d.source]], "reason": d.reason}
        for d in plan.dropped
    ]
    return {
        "merge_method": plan.config.merge_method,
        "composition": plan.mode,
        "output_format": plan.output_format,
        "config": plan.config.to_json_dict(),
        "sources": plan.labels,
        "counts": plan.counts(),
        "files": list(files),
        "warnings": list(warns),
        "tensors": tensors + dropped,
    }


@dataclass
class ComposeResult:
    """What ``compose`` did (or, for a dry run, would do)."""

    plan: Plan
    out_dir: Path
    written: bool
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        tail = (
            f"wrote {self.out_dir} ({len(self.files)} weight file(s)) in {self.seconds:.1f} s"
            if self.written
            else f"dry run: nothing written (output would go to {self.out_dir})"
        )
        warns = [f"warning: {w}" for w in self.warnings]
        return "\n".join([self.plan.summary(), *warns, tail])


def _execute(plan: Plan, folder: Path, dev: torch.device, allow_nonfinite: bool, progress: bool):
    meta = {"format": "pt"} | ({"mmcompose": "1"} if plan.output_format == "mmcompose" else {})
    gen = None
    if plan.config.seed is not None:
        gen = torch.Generator(device=dev).manual_seed(plan.config.seed)
    rd = _Reader(plan, dev, allow_nonfinite, READ_AHEAD_BYTES)
    try:
        writer = _ShardWriter(folder, plan.outputs, plan.config.shard_bytes, meta)
        try:
            for i, step in enumerate(_progress(plan.steps, progress)):
                if rd.ahead is not None:
                    rd.ahead.begin(i)
                for name, t in run_step(step, rd, gen).items():
                    writer.add(name, t)
                if rd.ahead is not None:
                    rd.ahead.end(i)
                rd.release(min(plan.config.shard_bytes, _RELEASE_BYTES))
            return writer.finish(), rd.warnings
        finally:
            writer.stream.close()
    finally:
        rd.close()


def _progress(steps: Sequence[Step], enabled: bool) -> Iterable[Step]:
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="compose", unit="tensor", leave=False)


def compose(
    config: ComposeConfig | str | Path,
    out_dir: str | Path,
    *,
    dry_run: bool = False,
    device: str | torch.device = "cpu",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    before_commit: Callable[[Path], None] | None = None,
) -> ComposeResult:
    """Plan and write a composed checkpoint at ``out_dir`` (nothing there on any failure).

    ``before_commit(folder)`` may add files (a search report) to the finished temporary
    folder before it is renamed into place, so they appear atomically with the model."""
    if not isinstance(config, ComposeConfig):
        config = load_compose_config(config)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    dev = resolve_device(device)
    if not dry_run:
        refuse_existing(out_dir, force)  # a bad -o fails before the sources are opened
    inputs = open_inputs(config)
    try:
        plan = plan_composition(config, inputs)
        if dry_run:
            return ComposeResult(plan, out_dir, written=False)
        with atomic_dir(out_dir, overwrite=force) as tmp:
            files, warns = _execute(plan, tmp, dev, allow_nonfinite, progress)
            _write_configs(plan, tmp)
            text = json.dumps(report(plan, files, warns), indent=2, default=str) + "\n"
            (tmp / REPORT_NAME).write_text(text)
            write_card(tmp, name=out_dir.name)  # README.md: the model card
            if before_commit is not None:
                before_commit(tmp)
        return ComposeResult(plan, out_dir, True, files, warns, time.perf_counter() - start)
    finally:
        for s in [*inputs.models, inputs.base]:
            if s is not None:
                s.close()


def run_from_yaml(
    config_path: str | Path,
    out_dir: str | Path,
    dry_run: bool = False,
    device: str = "cpu",
    force: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> ComposeResult:
    """The ``mmcompose compose CONFIG.yaml -o OUT`` command."""
    return compose(
        load_compose_config(config_path),
        out_dir,
        dry_run=dry_run,
        device=device,
        force=force,
        allow_nonfinite=allow_nonfinite,
        progress=progress,
    )


# ---------------------------------------------------------------- in memory (lambda search)


@torch.no_grad()
def apply_text_merge(
    model: torch.nn.Module, sources: Sequence[Source], weights: Sequence[float]
) -> None:
    """Set a loaded model's ``text`` adapters to ``sum_i w_i dW_i^text`` of ``sources``,
    in place and exactly (concatenated factors), without writing a checkpoint.

    The model must hold a text adapter of rank ``sum_i r_i``, as a ``linear`` or
    ``task_arithmetic`` DAMC composition of the same sources writes; cheap enough to call
    once per candidate lambda vector.
    """
    from mmcompose.model.lora import lora_layers

    if len(weights) != len(sources):
        raise MergeError(f"{len(weights)} weights for {len(sources)} sources")
    prefix = "language_model."
    for name, layer in lora_layers(model.language_model):  # type: ignore[attr-defined]
        if TEXT_ADAPTER not in layer.lora:
            continue
        factors, coeffs = [], []
        for src, w in zip(sources, weights, strict=True):
            key = f"{prefix}{name}.lora.{TEXT_ADAPTER}"
            spec = src.config.lora.adapters[TEXT_ADAPTER] if src.config.lora else None
            if spec is None or f"{key}.lora_A" not in src:
                raise MergeError(f"{src.path} has no text adapter on {name}")
            factors.append((src.get(f"{key}.lora_A"), src.get(f"{key}.lora_B")))
            coeffs.append(w * spec.scaling)
        set_concat_adapter(name, layer.lora[TEXT_ADAPTER], factors, coeffs)


def set_concat_adapter(
    name: str,
    adapter: torch.nn.Module,
    factors: Sequence[tuple[Tensor, Tensor]],
    coeffs: Sequence[float],
    *,
    b_only: bool = False,
) -> None:
    """Write ``sum_i c_i B_i A_i`` into ``adapter`` as concatenated factors, in place.
    ``b_only``: the A blocks are already these sources' (a re-weighting changes only B)."""
    a, b = concat_factors(factors, coeffs)
    if adapter.lora_B.shape != b.shape:
        raise MergeError(
            f"{name}: text adapter has rank {adapter.rank}, the sources need {b.shape[1]}",
            hint="load a model composed from these sources with linear/task_arithmetic",
        )
    with torch.no_grad():
        if not b_only:
            adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b / adapter.scaling)
