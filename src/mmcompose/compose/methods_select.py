"""Merge methods that select what to keep: della, della_linear, sce, model_stock,
arcee_fusion, ram, ramplus_tl; and passthrough.

The calling convention is ``methods.py``'s; each follows mergekit 0.1.5's implementation of
the same name, operation for operation in float32 (float64 for float64 inputs). All but
arcee_fusion and passthrough are functions of the task vectors ``tau_i = tensors[i] - base``
alone, so with ``base=None`` (a LoRA's ``dW``) the inputs are the task vectors and the merged
task vector comes back, exactly.

- ``della`` / ``della_linear`` (arXiv 2406.11617): MagPrune drops each tau entry with a
  probability that falls with its magnitude's rank in its row (keep probability from
  ``density - epsilon`` to ``density + epsilon``), rescales to tau's L1 norm, then merges as
  TIES (sign election, normalized) or as a weighted sum.
- ``sce`` (arXiv 2408.07990): keep the ``select_topk`` fraction of entries where the models
  vary most, elect signs, weight each model by its mean squared tau.
- ``model_stock`` (arXiv 2403.19522): interpolate the models' average toward the base by a
  ratio set by the angle between their task vectors (per tensor, or per row if
  ``filter_wise``).
- ``arcee_fusion``: keep the model's change where its importance (|change| times the KL
  divergence of the rows' softmax) is an outlier (above median + 1.5 IQR); needs whole
  weights (a softmax of the weights themselves), so it refuses LoRA deltas.
- ``ram`` / ``ramplus_tl`` (arXiv 2601.13572): entries changed by one model keep its change,
  entries changed by several get the mean; RAM+ boosts each model's unique entries by its
  share of shared ones.
- ``passthrough``: one model's tensor, times ``scale``. mergekit's layer ``slices``
  (frankenmerges) are refused by the config; whole weights only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, TypeAdapter

from mmcompose.compose.election import disjoint_sum
from mmcompose.compose.method_roles import (
    Roles,
    check_count,
    check_no_weights,
    merge_method_with,
)
from mmcompose.compose.methods import (
    _DENSITY,
    _WEIGHT,
    Density,
    Finite,
    PerModel,
    _check_tensors,
    _check_value,
    _match_l1,
    _per_model,
    _plain_sum,
    _task_vector,
    _weights,
)
from mmcompose.errors import MergeError
from mmcompose.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")  # imported at the first merge, not with the schema
F = lazy_module("torch.nn.functional")

__all__ = [
    "arcee_fusion",
    "della",
    "della_linear",
    "model_stock",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
]

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_FINITE = TypeAdapter(Finite)
_NON_NEGATIVE = TypeAdapter(NonNegative)
WEIGHTLESS = Roles(weights=False)
MODEL_STOCK_ROLES = Roles(weights=False, min_models=2)
ARCEE_ROLES = Roles(
    weights=False,
    max_models=1,
    lora="arcee_fusion needs whole weights: its importance compares the softmax of the "
    "model's and the base's weight rows, which a LoRA delta cannot give",
)
PASSTHROUGH_ROLES = Roles(
    base="none",
    weights=False,
    max_models=1,
    lora="passthrough copies one model's whole weights (times scale); a LoRA source holds "
    "a delta, not weights (to keep one LoRA model as it is, compose it with linear)",
)
_QUANTILE_SAMPLE = 1_000_000  # arcee_fusion: quantiles of larger tensors from a sample


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stacked_taus(tensors: Sequence[Tensor], base: Tensor | None, work: torch.dtype) -> Tensor:
    """tau_i = tensors[i] - base, one row each (the tensors themselves if base is None)."""
    base_w = None if base is None else base.to(work)
    taus = torch.empty((len(tensors), *tensors[0].shape), dtype=work, device=tensors[0].device)
    for row, t in zip(taus, tensors, strict=True):
        _task_vector(t, base_w, work, out=row)
    return taus


def _plus_base(tau: Tensor, base: Tensor | None, dtype: torch.dtype) -> Tensor:
    return (tau if base is None else base.to(tau.dtype) + tau).to(dtype)


# ---------------------------------------------------------------- DELLA


def check_della(density: Sequence[float], epsilon: Sequence[float], **_: Any) -> None:
    """mergekit's rule: where a model is pruned (density < 1), density +- epsilon in (0, 1)."""
    for i, (d, e) in enumerate(zip(density, epsilon, strict=True)):
        if d < 1 and (d + e >= 1 or d - e <= 0):
            raise MergeError(
                f"della: model {i}: density {d} +- epsilon {e} leaves (0, 1)",
                hint="choose epsilon with density - epsilon > 0 and density + epsilon < 1 "
                "(keep probabilities run from the one to the other)",
            )


def _della_merge(
    name: str,
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None,
    base: Tensor | None,
    density: PerModel[Density],
    epsilon: PerModel[Finite],
    normalize: bool,
    rescale: bool,
    lambda_: float,
    consensus: bool,
    generator: torch.Generator | None,
) -> Tensor:
    dtype = _check_tensors(tensors, base)
    n = len(tensors)
    w = _weights(weights, n)
    densities = _per_model("density", density, n, _DENSITY)
    epsilons = _per_model("epsilon", epsilon, n, _FINITE)
    check_della(densities, epsilons)
    _check_value("lambda", lambda_, _WEIGHT)
    taus = _stacked_taus(tensors, base, _work(dtype))
    for row, d, e in zip(taus, densities, epsilons, strict=True):
        if d < 1:  # density 1 keeps tau and draws no random numbers
            row.copy_(_magprune(name, row, d, e, rescale, generator))
    if consensus:
        mixed, divisor = disjoint_sum(taus, w, "sum", "mergekit", normalize)
    else:
        mixed, divisor = _plain_sum(iter(taus), w, "mergekit")
    if normalize:
        assert divisor is not None
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return _plus_base(mixed, base, dtype)


def _magprune(
    name: str,
    tau: Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """DELLA's MagPrune, as mergekit's ``della_magprune``: ranks along dim 1 (a 1-D tensor is
    one row), keep probability ``density - eps + 2 eps * rank / (cols - 1)``."""
    x = tau.unsqueeze(0) if tau.dim() < 2 else tau
    if x.shape[1] < 2:
        raise MergeError(
            f"{name}: cannot rank magnitudes along a dimension of size {x.shape[1]} "
            f"(shape {list(tau.shape)})",
            hint="leave this tensor unpruned with a density filter of 1, or use ties",
        )
    ranks = torch.argsort(x.abs(), dim=1, descending=False).argsort(dim=1).to(x.dtype) + 1
    min_ranks = ranks.min(dim=1, keepdim=True).values
    max_ranks = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - min_ranks) / (max_ranks - min_ranks)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator)
    before = x.abs().sum() if rescale else None
    kept = x * mask
    return (kept if before is None else _match_l1(before, kept)).view(tau.shape)


@merge_method_with("della", check=check_della)
def della(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    epsilon: PerModel[Finite] = 0.15,
    normalize: bool = True,
    rescale: bool = True,
    lambda_: Finite = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA-Merging: MagPrune, then TIES' sign election and normalized sum.

    ``int8_mask`` (mergekit's memory option for the sign mask) changes no value."""
    return _della_merge("della", tensors, weights, base, density, epsilon, normalize,
                        rescale, lambda_, True, generator)  # fmt: skip


@merge_method_with("della_linear", check=check_della)
def della_linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    epsilon: PerModel[Finite] = 0.15,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: Finite = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """MagPrune, then a weighted sum of the task vectors (no sign election)."""
    return _della_merge("della_linear", tensors, weights, base, density, epsilon, normalize,
                        rescale, lambda_, False, generator)  # fmt: skip


# ---------------------------------------------------------------- SCE


@merge_method_with("sce", WEIGHTLESS)
def sce(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    select_topk: Density = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Select (the ``select_topk`` fraction of entries with the largest variance across the
    models), Calculate (model i's weight: its mean tau^2 over the total), Erase (entries
    whose sign disagrees with the elected one), then the weighted mean of what is left."""
    dtype = _check_tensors(tensors, base)
    check_no_weights("sce", weights)
    taus = _stacked_taus(tensors, base, _work(dtype))
    if select_topk < 1:
        taus *= _sce_mask(taus, select_topk).unsqueeze(0)
    sums = taus.sum(dim=0)
    majority = torch.where(sums >= 0, 1.0, -1.0).to(taus.dtype)
    agree = taus.sign() == majority
    share = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = torch.sum(share).item()
    share = torch.ones_like(share) / share.shape[0] if abs(total) < 1e-6 else share / total
    share = share.view(-1, *([1] * (taus.dim() - 1)))
    erased = share * agree
    merged = (taus * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
    return _plus_base(merged, base, dtype)


def _sce_mask(taus: Tensor, fraction: float) -> Tensor:
    """1 at the ``int(nonzero * fraction)`` entries of largest variance across models."""
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


# ---------------------------------------------------------------- Model Stock


@merge_method_with("model_stock", MODEL_STOCK_ROLES)
def model_stock(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    filter_wise: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``t * mean(models) + (1 - t) * base`` with ``t = N cos / (1 + (N - 1) cos)``, ``cos``
    the mean cosine between the task vectors (of the tensor, or of each row if filter_wise);
    where ``1 + (N - 1) cos`` is ~0 the base is kept."""
    dtype = _check_tensors(tensors, base)
    check_count("model_stock", MODEL_STOCK_ROLES, len(tensors))
    check_no_weights("model_stock", weights)
    work = _work(dtype)
    shape = tensors[0].shape
    w0 = None if base is None else base.to(work)
    ws = [t.to(work) for t in tensors]
    if filter_wise:
        if len(shape) == 1:
            w0 = None if w0 is None else w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = None if w0 is None else w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = ws if w0 is None else [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)
    average = sum(ws) / n
    out = t * average if w0 is None else t * average + (1 - t) * w0
    return out.reshape(shape).to(dtype)


# ---------------------------------------------------------------- Arcee Fusion


@merge_method_with("arcee_fusion", ARCEE_ROLES)
def arcee_fusion(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``base + (model - base) * [importance >= median + 1.5 IQR]``, importance
    ``|model - base| * KL(softmax(model) || softmax(base))`` per last-dim row. Quantiles of
    tensors over 1M entries come from 1M entries drawn with ``generator`` (torch's global
    RNG if None, as mergekit)."""
    dtype = _check_tensors(tensors, base)
    check_count("arcee_fusion", ARCEE_ROLES, len(tensors))
    check_no_weights("arcee_fusion", weights)
    if base is None:
        raise MergeError(
            "arcee_fusion needs the base model's tensor (base=None was given)",
            hint="set base_model; it compares the model's weights with the base's",
        )
    work = _work(dtype)
    a, b = base.to(work), tensors[0].to(work)
    eps = 1e-8
    p = F.softmax(b, dim=-1) + eps
    q = F.softmax(a, dim=-1) + eps
    importance = (b - a).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    flat = importance.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        pick = torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), device=flat.device,
                             generator=generator)  # fmt: skip
        flat = flat[pick]
    ordered = torch.sort(flat).values
    at = (torch.tensor([0.25, 0.5, 0.75]).to(flat.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    mask = (importance >= median + 1.5 * (q3 - q1)).to(work)
    return (a + (b - a) * mask).to(dtype)


# ---------------------------------------------------------------- RAM


@merge_method_with("ram", WEIGHTLESS)
def ram(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    epsilon: NonNegative = 1e-5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reinforced Agent Merging: an entry changed (|tau| > epsilon) by one model takes that
    model's change; one changed by several takes the mean of their changes."""
    dtype = _check_tensors(tensors, base)
    check_no_weights("ram", weights)
    tv, nonzero, counts, overlap, unique = _ram_parts(tensors, base, epsilon, _work(dtype))
    tv_z = tv * nonzero
    merged = (tv_z * unique + tv_z * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return _plus_base(merged.reshape(tensors[0].shape), base, dtype)


@merge_method_with("ramplus_tl", WEIGHTLESS)
def ramplus_tl(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    r: Finite = 0.1,
    alpha: NonNegative = 0.2,
    epsilon: NonNegative = 1e-5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RAM+ (tensor-local): as ram, with model i's unique entries scaled by
    ``1 + r * min(rho_i, alpha)``, rho_i its count of shared over unique changed entries."""
    dtype = _check_tensors(tensors, base)
    check_no_weights("ramplus_tl", weights)
    tv, nonzero, counts, overlap, unique = _ram_parts(tensors, base, epsilon, _work(dtype))
    shared_counts = (nonzero & overlap).sum(dim=1)
    unique_counts = (nonzero & unique).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    tv_z = tv * nonzero
    merged = ((tv_z * unique * boost.unsqueeze(-1)) + (tv_z * overlap / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return _plus_base(merged.reshape(tensors[0].shape), base, dtype)


def _ram_parts(
    tensors: Sequence[Tensor], base: Tensor | None, epsilon: float, work: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat task vectors, which entries each changed, how many models changed each, and
    the entries changed by several / by exactly one."""
    _check_value("epsilon", epsilon, _NON_NEGATIVE)
    tv = _stacked_taus(tensors, base, work).view(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


# ---------------------------------------------------------------- passthrough


@merge_method_with("passthrough", PASSTHROUGH_ROLES)
def passthrough(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    scale: PerModel[Finite] = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The one model's tensor times ``scale`` (mergekit: unscaled if scale is unset)."""
    dtype = _check_tensors(tensors, base)
    check_count("passthrough", PASSTHROUGH_ROLES, len(tensors))
    check_no_weights("passthrough", weights)
    if base is not None:
        raise MergeError(
            "passthrough does not use a base tensor",
            hint="remove base_model; passthrough copies the one model listed",
        )
    (s,) = _per_model("scale", scale, 1, _FINITE)
    x = tensors[0].to(_work(dtype))
    return (x if s == 1 else x * s).to(dtype, copy=True)
