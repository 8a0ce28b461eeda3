"""What a composition plan holds: the steps that make each output tensor, and the plan itself.

Plain frozen records, built by :mod:`mmcompose.compose.plan` and read by the executor; nothing
here reads a file or a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from mmcompose.inspect import human_bytes

if TYPE_CHECKING:
    import torch

    from mmcompose.compose.config import ComposeConfig
    from mmcompose.compose.methods import BoundMerge
    from mmcompose.compose.sources import Source
    from mmcompose.model.config import MMConfig


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


@dataclass(frozen=True)
class TaskVector:
    """One source's task vector on one linear: ``weight - W0`` (a full fine-tune) plus its
    shared LoRA's ``delta``; a LoRA-only source has just the delta."""

    weight: Ref | None
    delta: Delta | None


@dataclass(frozen=True)
class MaskedMerge:
    """MMER on one linear: ``out = W0 + tau*``, ``out_delta = tau*`` with ``tau*`` the method
    over the task vectors (``base=None``), and per ``(name, modality, i)`` in ``out_masks`` the
    packed mask of ``task_vectors[i]`` against ``tau*`` (:func:`~mmcompose.compose.masks.
    tall_mask`). ``base`` yields W0 (verified identical across its ``same_as``)."""

    out: str
    out_delta: str
    out_masks: tuple[tuple[str, str, int], ...]
    base: Carry
    task_vectors: tuple[TaskVector, ...]
    merge: BoundMerge
    mask_lambda: float


Step = Carry | MergeWeights | FoldDelta | ConcatAdapter | DenseAdapter | MaskedMerge


def step_outputs(step: Step) -> tuple[str, ...]:
    if isinstance(step, ConcatAdapter | DenseAdapter):
        return (step.out_a, step.out_b)
    if isinstance(step, MaskedMerge):
        return (step.out, step.out_delta, *(name for name, _, _ in step.out_masks))
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
        import torch

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
    mode: str  # naivemc | damc | mmer
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
            f"output: {self.output_format} folder, {human_bytes(self.total_bytes)}",
            *self.notes,
        ]
        return "\n".join(lines)
