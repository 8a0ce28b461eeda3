"""Merge methods that interpolate: slerp, nuslerp, multislerp, karcher, nearswap.

The calling convention is ``methods.py``'s (``method(tensors, weights, base, *, params,
generator)``); each follows mergekit 0.1.5's implementation of the same name, operation for
operation in float32 (float64 for float64 inputs), so results agree to float rounding.

- ``slerp``: the base and one model, on the great circle through them (the whole tensor as
  one vector). It needs both whole weights, so it refuses LoRA deltas.
- ``nuslerp``: two models, ``t = w_1 / (w_0 + w_1)``; with a base, their task vectors.
  By default the tensor is one vector; ``nuslerp_flatten: false`` takes rows (or columns).
- ``multislerp``: several models, a weighted mean on the hypersphere through the tangent space.
- ``karcher``: the Riemannian (Karcher) mean of the models' directions, iterated, scaled by
  their mean norm. No base, no weights (mergekit gives each 1/N); whole weights only.
- ``nearswap``: take the model's value where it is within ``t`` of the base's, moving toward
  it by ``t / |model - base|`` elsewhere. Depends only on the difference, so it is exact on
  LoRA deltas (``base=None``: the tensor is the task vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from mmcompose.compose.method_roles import (
    Roles,
    check_count,
    check_no_weights,
    merge_method_with,
)
from mmcompose.compose.methods import Finite, _check_tensors, _weights
from mmcompose.errors import MergeError
from mmcompose.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")  # imported at the first merge, not with the schema

__all__ = ["karcher", "multislerp", "nearswap", "nuslerp", "slerp"]

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_WHOLE = "{} needs whole weights"
SLERP_ROLES = Roles(
    weights=False,
    max_models=1,
    lora=_WHOLE.format("slerp") + " (the base's and the model's) to take the angle between "
    "them; a LoRA delta is neither",
)
NUSLERP_ROLES = Roles(base="optional", min_models=2, max_models=2)
MULTISLERP_ROLES = Roles(base="optional")
KARCHER_ROLES = Roles(
    base="none",
    weights=False,
    lora=_WHOLE.format("karcher") + ": it averages the models' directions, and mergekit's "
    "karcher has no task-vector form for a base-relative delta",
)
NEARSWAP_ROLES = Roles(weights=False, max_models=1)


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _need_base(name: str, base: Tensor | None) -> Tensor:
    if base is None:
        raise MergeError(
            f"{name} needs the base model's tensor (base=None was given)",
            hint="set base_model; LoRA sources offer only deltas, which have no base to "
            "interpolate from",
        )
    return base


def _refuse_base(name: str, base: Tensor | None) -> None:
    if base is not None:
        raise MergeError(
            f"{name} does not use a base tensor",
            hint="to merge the base in, list it among the tensors (mergekit adds base_model "
            "as one more input)",
        )


# ---------------------------------------------------------------- slerp


@merge_method_with("slerp", SLERP_ROLES)
def slerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    t: Finite,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spherical interpolation from the base (t=0) to the model (t=1), the tensor as one
    vector; nearly parallel vectors (|cos| > 0.9995) are interpolated linearly."""
    dtype = _check_tensors(tensors, base)
    check_count("slerp", SLERP_ROLES, len(tensors))
    check_no_weights("slerp", weights)
    base = _need_base("slerp", base)
    work = _work(dtype)
    a, b = base.reshape(1, -1).to(work), tensors[0].reshape(1, -1).to(work)
    tt = torch.tensor(float(t), dtype=work, device=a.device).reshape(-1, 1)
    if a.shape[1] == 0:
        return ((1 - tt) * a + tt * b).reshape(base.shape).to(dtype)
    return _slerp_rows(tt, a, b).reshape(base.shape).to(dtype)


def _slerp_rows(
    t: Tensor, a: Tensor, b: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> Tensor:
    """mergekit's slerp kernel on [1, n] rows (its norms of one chunk are the plain norms)."""
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return coef_a * a + coef_b * b


# ---------------------------------------------------------------- nuslerp


@merge_method_with("nuslerp", NUSLERP_ROLES)
def nuslerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Slerp of two models (their task vectors if a base is given) at ``w_1 / (w_0 + w_1)``
    (0.5 if the weights sum to ~0): the tensor as one vector, or along rows (``row_wise``:
    along columns) when ``nuslerp_flatten`` is false."""
    dtype = _check_tensors(tensors, base)
    check_count("nuslerp", NUSLERP_ROLES, len(tensors))
    w = _weights(weights, 2)
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    work = _work(dtype)
    v0, v1 = (x.to(work) for x in tensors)
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return _nuslerp(t, v0, v1, dim, flatten=nuslerp_flatten).to(dtype)
    b = base.to(work)
    return (b + _nuslerp(t, v0 - b, v1 - b, dim, flatten=nuslerp_flatten)).to(dtype)


def _nuslerp(
    t: float, v0: Tensor, v1: Tensor, dim: int, eps: float = 1e-8, flatten: bool = False
) -> Tensor:
    out_shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


# ---------------------------------------------------------------- multislerp


@merge_method_with("multislerp", MULTISLERP_ROLES)
def multislerp(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: NonNegative = 1e-8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Barycentric interpolation on the hypersphere: project the unit vectors (of the task
    vectors, with a base) to the tangent space at their weighted mean direction, average
    there, map back, and scale by the weighted mean norm.

    As mergekit, it fails where the weighted mean direction vanishes (antipodal inputs with
    balancing weights) unless there are two inputs (then: linear); unlike mergekit, task
    vectors that are all exactly zero (a tensor no model changed) give the base."""
    dtype = _check_tensors(tensors, base)
    n = len(tensors)
    w_list = _weights(weights, n)
    if n == 1:
        return tensors[0].to(dtype, copy=True)
    work = _work(dtype)
    stacked = torch.stack([x.to(work) for x in tensors], dim=0)
    if base is not None:
        stacked -= base.to(work)
    flat = stacked.view(n, -1)
    w = torch.tensor(w_list, dtype=work, device=flat.device)
    if normalize_weights:
        if abs(sum(w_list)) < 1e-8:
            raise MergeError(
                f"multislerp: weights {w_list} sum to zero and cannot be normalized",
                hint="set normalize_weights: false, or choose weights with a nonzero sum",
            )
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if n == 2:  # mergekit's fallback: linear
            res = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        elif not bool(flat.any()):
            res = torch.zeros_like(stacked[0])
        else:
            raise MergeError(
                "multislerp: the weighted mean of the inputs' directions is zero (antipodal "
                "inputs whose weights balance out)",
                hint="choose other weights",
            )
        return (res if base is None else res + base.to(work)).to(dtype)
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = ((unit - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return (result if base is None else result + base.to(work)).to(dtype)


# ---------------------------------------------------------------- karcher


@merge_method_with("karcher", KARCHER_ROLES)
def karcher(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    max_iter: Annotated[int, Field(ge=0)] = 10,
    tol: NonNegative = 1e-5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Karcher mean on the unit hypersphere (arXiv 2603.04972): from the mean direction,
    step along the average log map until it is shorter than ``tol`` or ``max_iter`` steps;
    then scale by the mean norm. Directions of inputs with norm <= tol are left out."""
    dtype = _check_tensors(tensors, base)
    check_no_weights("karcher", weights)
    _refuse_base("karcher", base)
    if len(tensors) == 1:
        return tensors[0].to(dtype, copy=True)
    work = _work(dtype)
    xs = [x.to(work) for x in tensors]
    return _karcher_mean(xs, [1.0 / len(xs)] * len(xs), max_iter, tol).to(dtype)


def _karcher_mean(xs: list[Tensor], alphas: list[float], max_iter: int, tol: float) -> Tensor:
    """mergekit's ``karcher_merge_tensors`` on tensors already in the work dtype."""
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(xs, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    alpha_sum = sum(alphas[i] for i in valid)
    coeffs = [alphas[i] / alpha_sum for i in valid]
    vs = [units[i] for i in valid]
    mean = torch.zeros_like(vs[0])
    for c, u in zip(coeffs, vs, strict=True):
        mean += c * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = vs[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for c, u in zip(coeffs, vs, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += c * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return scale * mean


# ---------------------------------------------------------------- nearswap


@merge_method_with("nearswap", NEARSWAP_ROLES)
def nearswap(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    t: Finite,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``w * model + (1 - w) * base`` with ``w = clamp(t / |model - base|, 0, 1)``: values
    within ``t`` of the base swap to the model's, others move ``t`` toward it. With
    ``base=None`` the tensor is a task vector and ``w * tau`` comes back."""
    dtype = _check_tensors(tensors, base)
    check_count("nearswap", NEARSWAP_ROLES, len(tensors))
    check_no_weights("nearswap", weights)
    work = _work(dtype)
    b = tensors[0].to(work)
    if base is None:
        return (_nearswap_weight(t, b.abs()) * b).to(dtype)
    a = base.to(work)
    w = _nearswap_weight(t, torch.abs(a - b))
    return (w * b + (1 - w) * a).to(dtype)


def _nearswap_weight(t: float, absdiff: Tensor) -> Tensor:
    return (t / absdiff.clamp(min=1e-6)).clamp(min=0, max=1)
