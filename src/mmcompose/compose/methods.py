"""Merge methods: pure functions over same-shaped tensors, registered by name.

Every registered method has the same calling convention, so an executor can apply any of
them tensor by tensor::

    method(tensors, weights=None, base=None, *, <parameters>, generator=None) -> Tensor

- ``tensors``: the N models' values of one weight, all of one shape.
- ``weights``: one float per model; ``None`` means 1/N each (NaiveMC's default lambda_i).
- ``base``: the base model's value. Task-vector methods merge ``tau_i = tensors[i] - base`` and
  return ``base + merged``; with ``base=None`` the inputs already are task vectors (a LoRA's
  dW, say) and the merged task vector comes back. ``linear`` refuses a base: mergekit gives
  it no role and merely adds it as one more input, so put it in ``tensors`` for that.
- ``<parameters>``: keyword-only. Per-model ones (``density``, ``gamma``) take one value for
  all models or a sequence with one per model; the others are global.
- ``generator``: randomness for DARE (same device as the tensors); ``None`` uses torch's
  global RNG, as mergekit and PEFT do.

The keyword parameters' annotations and defaults *are* the config schema: ``MERGE_METHODS``
maps each name to a ``MergeMethod`` holding the function and two frozen pydantic models built
from its signature, one per model (``weight`` plus the per-model parameters) and one global.
Arithmetic runs in float32 (float64 for float64 inputs); results have the inputs' dtype.
Names, defaults and results follow mergekit 0.1.5; ``semantics="peft"`` follows
``peft.utils.merge_utils`` instead (see ``task_vector_merge``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from mmcompose.compose.election import (
    STREAMED,
    blocked_disjoint,
    disjoint_sum,
    l1_ratio,
    streamed_disjoint,
)
from mmcompose.compose.selection import magnitude_mask, outlier_slice, top_k_slice
from mmcompose.errors import ConfigError, MergeError
from mmcompose.lazy import lazy_module
from mmcompose.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")  # imported at the first merge, not with the schema

__all__ = [
    "MERGE_METHODS",
    "BoundMerge",
    "MergeMethod",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "linear",
    "merge_method",
    "task_arithmetic",
    "task_vector_merge",
    "ties",
]

T = TypeVar("T")
F = TypeVar("F", bound="Callable[..., Tensor]")

Finite = Annotated[float, Field(allow_inf_nan=False)]
Density = Annotated[float, Field(gt=0, le=1)]  # fraction of each task vector kept
Gamma = Annotated[float, Field(ge=0, lt=1)]  # fraction of largest |tau| dropped (breadcrumbs)
Sparsify = Literal["none", "magnitude", "random", "magnitude_outliers"]
Consensus = Literal["sum", "count"]
Semantics = Literal["mergekit", "peft"]


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PER_MODEL"


_PER_MODEL = _PerModelMarker()
# A parameter given per model: one value for all, or one per model.
PerModel = Annotated[T | Sequence[T], _PER_MODEL]

_WEIGHT = TypeAdapter(Finite)
_DENSITY = TypeAdapter(Density)
_GAMMA = TypeAdapter(Gamma)
# Entries per block of the blocked plain sum (see _blocked_sum); a module attribute so a
# benchmark can change it. 1 MiB of float32: blocks stay in L2, and at a few thousand blocks
# per GB the per-op dispatch no longer dominates (24576 took twice the CPU on a 1 GB merge).
BLOCK = 262144


# ---------------------------------------------------------------- the generalised method


def task_vector_merge(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    sparsify: Sparsify = "none",
    density: PerModel[Density] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    semantics: Semantics = "mergekit",
    generator: torch.Generator | None = None,
) -> Tensor:
    """All task-vector methods in one: ``base + lambda * combine_i(w_i * sparsify(tau_i))``.

    sparsify: ``magnitude`` keeps the ``density`` fraction of largest |tau| (TIES), ``random``
    keeps each entry with probability ``density`` (DARE), ``magnitude_outliers`` drops the
    ``gamma`` fraction of largest |tau| and keeps ``density`` below them (breadcrumbs).
    consensus: elect a sign per entry from the ``sum`` of values or the ``count`` of signs and
    drop the entries that disagree (TIES). normalize: divide by what contributed to each entry.
    rescale: give the sparsified tau back its scale.

    ``semantics`` picks whose arithmetic: ``mergekit`` weights tau before electing signs,
    normalizes by the summed weights of the contributing models, rescales to tau's L1 norm,
    and keeps at least one entry per tensor; ``peft`` elects signs on unweighted tau,
    normalizes by the number of contributing models, rescales by 1/density, and keeps
    ``int(density * numel)`` entries.
    """
    dtype = _check_tensors(tensors, base)
    _check_choice("sparsify", sparsify, Sparsify)
    _check_choice("semantics", semantics, Semantics)
    if consensus is not None:
        _check_choice("consensus", consensus, Consensus)
    n = len(tensors)
    w = _weights(weights, n)
    densities = _per_model("density", density, n, _DENSITY)
    gammas = _per_model("gamma", gamma, n, _GAMMA)
    _check_value("lambda", lambda_, _WEIGHT)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    dense = sparsify == "none" or min(densities) >= 1  # _sparsify returns tau untouched
    blockable = _blockable(tensors, base)
    if consensus is None and dense and blockable:
        divisor = _plain_divisor(w, semantics) if normalize else None
        return _blocked_sum(tensors, base, w, work, dtype, divisor, lambda_)
    if consensus is not None and blockable and _streamable(sparsify, semantics):
        # one float buffer and a bit per entry and model, not the stacked task vectors
        return streamed_disjoint(
            tensors, base, w, sparsify=sparsify, densities=densities, gammas=gammas,
            rescale=rescale, consensus=consensus, semantics=semantics, normalize=normalize,
            lambda_=lambda_, work=work, dtype=dtype, block=BLOCK,
        )  # fmt: skip
    base_w = None if base is None else base.to(work)

    def sparse_tau(t: Tensor, d: float, g: float, out: Tensor | None = None) -> Tensor:
        tau = _task_vector(t, base_w, work, out)
        return _sparsify(tau, sparsify, d, g, rescale, semantics, generator)

    if consensus is None:
        taus = (sparse_tau(*a) for a in zip(tensors, densities, gammas, strict=True))
        mixed, divisor = _plain_sum(taus, w, semantics)
    else:  # sign election needs all task vectors at once: each is built in its row
        stacked = torch.empty((n, *tensors[0].shape), dtype=work, device=tensors[0].device)
        for row, *a in zip(stacked, tensors, densities, gammas, strict=True):
            sparse_tau(*a, out=row)
        if blockable:
            return blocked_disjoint(stacked, w, consensus, semantics, normalize, lambda_,
                                    base_w, dtype, BLOCK)  # fmt: skip
        mixed, divisor = disjoint_sum(stacked, w, consensus, semantics, normalize)
    if normalize and not _is_one(divisor):
        assert divisor is not None
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (mixed if base_w is None else mixed.add_(base_w)).to(dtype)


def _task_vector(
    tensor: Tensor, base: Tensor | None, work: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """tensor - base in ``work`` dtype, into ``out`` if given.

    Always a fresh tensor: later steps work in place and must not touch the inputs.
    """
    if out is None:
        out = torch.empty(tensor.shape, dtype=work, device=tensor.device)
    return out.copy_(tensor) if base is None else torch.sub(tensor, base, out=out)


def _sparsify(
    tau: Tensor,
    method: Sparsify,
    density: float,
    gamma: float,
    rescale: bool,
    semantics: Semantics,
    generator: torch.Generator | None,
) -> Tensor:
    """Zero part of tau, in place. density 1 returns tau untouched and draws no random numbers."""
    if method == "none" or density >= 1:
        return tau
    if method == "magnitude":
        mask = _top_k_mask(tau, density, semantics)
    elif method == "random":
        mask = torch.bernoulli(torch.full_like(tau, density), generator=generator)
    else:
        mask = _outlier_mask(tau, density, gamma)
    before = tau.abs().sum() if rescale and semantics == "mergekit" else None
    kept = tau.mul_(mask)
    if not rescale:
        return kept
    return kept.div_(density) if before is None else _match_l1(before, kept)


def _top_k_mask(tau: Tensor, density: float, semantics: Semantics) -> Tensor:
    """1 at the k largest |tau|: ``argsort(|tau|, descending=True)[:k]`` (``topk`` for PEFT)."""
    n = tau.numel()
    if semantics == "mergekit":
        start, stop, descending = top_k_slice(n, density)
        return magnitude_mask(tau, start, stop, descending=descending).view_as(tau)
    mask = torch.zeros(n, dtype=tau.dtype, device=tau.device)
    # sorted=False: the same entries (CPU topk runs nth_element, then only sorts them)
    mask[torch.topk(tau.abs().reshape(-1), int(density * n), sorted=False).indices] = 1
    return mask.view_as(tau)


def _outlier_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Keep the density fraction just below the gamma fraction of largest |tau|
    (:func:`~mmcompose.compose.selection.outlier_slice`)."""
    start, stop, descending = outlier_slice(tau.numel(), density, gamma)
    return magnitude_mask(tau, start, stop, descending=descending).view_as(tau)


def _match_l1(before: Tensor, kept: Tensor) -> Tensor:
    """Scale kept to the L1 norm tau had before sparsifying (``before``)."""
    ratio = l1_ratio(before, kept.abs().sum())
    return kept if ratio is None else kept.mul_(ratio)


def _plain_sum(
    taus: Iterable[Tensor], weights: list[float], semantics: Semantics
) -> tuple[Tensor, Tensor | float]:
    """Sum w_i * tau_i one model at a time, so only one extra tensor is alive."""
    mixed: Tensor | None = None
    for tau, w in zip(taus, weights, strict=True):
        mixed = tau.mul_(w) if mixed is None else mixed.add_(tau.mul_(w))
    assert mixed is not None  # _check_tensors guarantees a model
    return mixed, _plain_divisor(weights, semantics)


def _plain_divisor(weights: list[float], semantics: Semantics) -> float:
    if semantics == "peft":
        return float(len(weights))
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total  # mergekit's guard


def _is_one(x: Tensor | float | None) -> bool:
    """x / 1.0 is x, bit for bit: such a division is skipped."""
    return isinstance(x, float) and x == 1.0


def _streamable(sparsify: Sparsify, semantics: Semantics) -> bool:
    """Survivors chosen by :func:`magnitude_mask` (or all kept): the streamed election's case.
    PEFT's top-k and DARE's random drop stay on the stacked path."""
    return sparsify in STREAMED and not (sparsify == "magnitude" and semantics == "peft")


def _blockable(tensors: Sequence[Tensor], base: Tensor | None) -> bool:
    """Large strided CPU tensors: there the blocked sum saves whole-tensor float32 copies."""
    inputs = [*tensors] if base is None else [*tensors, base]
    return tensors[0].numel() > BLOCK and all(
        t.device.type == "cpu" and t.layout == torch.strided for t in inputs
    )


def _blocked_sum(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weights: list[float],
    work: torch.dtype,
    dtype: torch.dtype,
    divisor: float | None,
    lambda_: float,
) -> Tensor:
    """``base + lambda * sum_i w_i tau_i / divisor`` block by block, straight into the result.

    Each entry goes through the same float operations, in the same order, as in the
    whole-tensor path (tau in ``work`` dtype, ``mul_(w)``, ``add_``, ``/ divisor``,
    ``* lambda``, ``+ base``, cast), so the bits are the same; but the blocks stay in cache
    and no float32 copy of a whole input is made (a quarter of the memory traffic on bf16)."""
    out = torch.empty(tensors[0].shape, dtype=dtype)
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    flat_base = None if base is None else base.reshape(-1)
    n = flat_out.numel()
    acc, tmp = torch.empty(BLOCK, dtype=work), torch.empty(BLOCK, dtype=work)
    base_block = None if base is None else torch.empty(BLOCK, dtype=work)
    for s in range(0, n, BLOCK):
        e = min(n, s + BLOCK)
        a, b = acc[: e - s], tmp[: e - s]
        c = None
        if flat_base is not None and base_block is not None:
            c = base_block[: e - s].copy_(flat_base[s:e])
        for i, (t, w) in enumerate(zip(flats, weights, strict=True)):
            dst = a if i == 0 else b
            if c is None:
                dst.copy_(t[s:e])
            else:
                torch.sub(t[s:e], c, out=dst)
            dst.mul_(w)
            if i:
                a.add_(b)
        if divisor is not None and divisor != 1.0:
            a /= divisor
        if lambda_ != 1:
            a *= lambda_
        if c is not None:
            a.add_(c)
        flat_out[s:e].copy_(a)
    return out


# ---------------------------------------------------------------- input checks


def _check_tensors(tensors: Sequence[Tensor], base: Tensor | None) -> torch.dtype:
    """Return the result dtype (the inputs' promoted dtype), or fail clearly."""
    if len(tensors) == 0:
        raise MergeError("no tensors to merge", hint="pass at least one model's tensor")
    inputs = [*tensors] if base is None else [*tensors, base]
    if any(t.shape != inputs[0].shape for t in inputs):
        shapes = [tuple(t.shape) for t in inputs]
        raise MergeError(
            f"tensors to merge differ in shape: {shapes}"
            + (" (last: base)" if base is not None else ""),
            hint="only tensors of the same shape can be merged",
        )
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in inputs))
    if not dtype.is_floating_point:
        raise MergeError(f"cannot merge {dtype} tensors", hint="merge floating-point weights only")
    return dtype


def _check_choice(name: str, value: object, options: Any) -> None:
    if value not in get_args(options):
        raise MergeError(f"{name} = {value!r} is not one of {get_args(options)}")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    return [1.0 / n] * n if weights is None else _per_model("weight", weights, n, _WEIGHT)


def _per_model(name: str, value: Any, n: int, check: TypeAdapter[float]) -> list[float]:
    """Broadcast a scalar to n models, or check a sequence has one value per model."""
    values = [value] * n if isinstance(value, int | float) else list(value)
    if len(values) != n:
        raise MergeError(f"{name} has {len(values)} values for {n} models")
    for i, v in enumerate(values):
        _check_value(f"{name} (model {i})", v, check)
    return [float(v) for v in values]


def _check_value(name: str, value: object, check: TypeAdapter[float]) -> None:
    try:
        check.validate_python(value)
    except ValidationError as e:
        msg = e.errors()[0]["msg"]
        raise MergeError(f"{name} = {value!r} is invalid: {msg}") from None


# ---------------------------------------------------------------- registry and config


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: the function and the pydantic models that validate its config."""

    name: str
    fn: Callable[..., Tensor]
    model_params: type[BaseModel]  # per model: weight and the PerModel parameters
    params: type[BaseModel]  # global: the other keyword parameters

    def bind(
        self, models: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None
    ) -> BoundMerge:
        """Validate a config (one mapping per model, one global) once, for many tensors."""
        if len(models) == 0:
            raise ConfigError(f"merge method {self.name!r} got no models")
        per_model = [
            self._validate(self.model_params, m, f"model {i}") for i, m in enumerate(models)
        ]
        glob = self._validate(self.params, params or {}, "parameters")
        weights = [m.weight for m in per_model]  # type: ignore[attr-defined]
        if None in weights and any(w is not None for w in weights):
            raise ConfigError(
                f"merge method {self.name!r}: weight is given for some models only",
                hint="give every model a weight, or none (each then gets 1/N)",
            )
        kwargs = glob.model_dump()
        for key in self.model_params.model_fields.keys() - {"weight"}:
            kwargs[key] = tuple(getattr(m, key) for m in per_model)
        return BoundMerge(self, len(models), None if None in weights else tuple(weights), kwargs)

    def _validate(self, model: type[BaseModel], data: Any, where: str) -> BaseModel:
        try:
            return model.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(_describe(err) for err in e.errors())
            keys = ", ".join(f.alias or k for k, f in model.model_fields.items())
            raise ConfigError(
                f"merge method {self.name!r}, {where}: {problems}", hint=f"allowed keys: {keys}"
            ) from None


def _describe(err: Any) -> str:
    key = ".".join(str(part) for part in err["loc"]) or "value"
    if err["type"] == "extra_forbidden":
        return f"unknown parameter {key!r}"
    return f"{key} = {err['input']!r}: {err['msg']}"


@dataclass(frozen=True)
class BoundMerge:
    """A method with a validated config: call it with each tensor's inputs."""

    method: MergeMethod
    n_models: int
    weights: tuple[float, ...] | None
    kwargs: Mapping[str, Any]

    def __call__(
        self,
        tensors: Sequence[Tensor],
        base: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if len(tensors) != self.n_models:
            raise MergeError(
                f"{self.method.name}: configured for {self.n_models} models, got {len(tensors)}"
            )
        return self.method.fn(tensors, self.weights, base, generator=generator, **self.kwargs)


MERGE_METHODS: Registry[MergeMethod] = Registry(
    "merge method", plugins=("mmcompose.compose.methods_interp", "mmcompose.compose.methods_select")
)
_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def merge_method(name: str) -> Callable[[F], F]:
    """Register a function under ``name``, deriving its config models from its signature."""

    def deco(fn: F) -> F:
        MERGE_METHODS.register(name)(MergeMethod(name, fn, *_param_models(name, fn)))
        return fn

    return deco


def _resolve(fn: Callable[..., Tensor], annotation: Any) -> Any:
    """One parameter's annotation as a type. Only the keyword parameters are resolved (not
    ``get_type_hints`` over the whole signature): their types are pydantic's, while the
    tensors' ``Tensor`` would need torch imported just to check a config."""
    if not isinstance(annotation, str):
        return annotation
    return eval(annotation, fn.__globals__)


def _param_models(name: str, fn: Callable[..., Tensor]) -> tuple[type[BaseModel], ...]:
    """Split keyword-only parameters into per-model (PerModel[...]) and global fields."""
    sig = inspect.signature(fn)
    if (
        list(sig.parameters)[:3] != ["tensors", "weights", "base"]
        or "generator" not in sig.parameters
    ):
        raise TypeError(f"merge method {name!r} does not follow the common signature")
    per_model: dict[str, Any] = {"weight": (Finite | None, None)}
    glob: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name == "generator":
            continue
        hint = _resolve(fn, p.annotation)
        if get_origin(hint) is Annotated and _PER_MODEL in get_args(hint)[1:]:
            per_model[p.name] = (get_args(get_args(hint)[0])[0], p.default)
        else:  # ``lambda_`` is ``lambda`` in a config, as in mergekit
            glob[p.name] = (hint, Field(p.default, alias=p.name.rstrip("_")))
    title = name.title().replace("_", "")
    return (
        create_model(f"{title}ModelParams", __config__=_MODEL_CONFIG, **per_model),
        create_model(f"{title}Params", __config__=_MODEL_CONFIG, **glob),
    )


# ---------------------------------------------------------------- the registered methods


@merge_method("linear")
def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    normalize: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """NaiveMC / model soup: sum_i w_i * theta_i, over sum_i w_i if normalize (arXiv 2203.05482).

    The base has no role here; a base is refused rather than silently dropped.
    """
    if base is not None:
        raise MergeError(
            "linear does not use a base tensor",
            hint="to average the base in, list it among the tensors (mergekit adds it as an "
            "input); for base + weighted task vectors use task_arithmetic",
        )
    w = _weights(weights, len(tensors))
    if normalize and abs(sum(w)) < 1e-8:
        raise MergeError(
            f"linear: weights {w} sum to zero and cannot be normalized",
            hint="set normalize: false, or choose weights with a nonzero sum",
        )
    return task_vector_merge(tensors, w, None, normalize=normalize)


@merge_method("task_arithmetic")
def task_arithmetic(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    normalize: bool = False,
    lambda_: Finite = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """base + lambda * sum_i w_i tau_i (arXiv 2212.04089); for LoRA, W0 + sum_i w_i dW_i."""
    return task_vector_merge(tensors, weights, base, normalize=normalize, lambda_=lambda_)


@merge_method("ties")
def ties(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: Finite = 1.0,
    consensus: Consensus = "sum",
    semantics: Semantics = "mergekit",
    generator: torch.Generator | None = None,
) -> Tensor:
    """TIES (arXiv 2306.01708): trim small |tau|, elect a sign, average the agreeing entries."""
    return task_vector_merge(
        tensors,
        weights,
        base,
        sparsify="magnitude",
        density=density,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        semantics=semantics,
    )


@merge_method("dare_linear")
def dare_linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    lambda_: Finite = 1.0,
    semantics: Semantics = "mergekit",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE (arXiv 2311.03099): drop tau entries at random, rescale, sum."""
    return task_vector_merge(
        tensors,
        weights,
        base,
        sparsify="random",
        density=density,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        semantics=semantics,
        generator=generator,
    )


@merge_method("dare_ties")
def dare_ties(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    normalize: bool | None = None,
    rescale: bool = True,
    lambda_: Finite = 1.0,
    consensus: Consensus = "sum",
    semantics: Semantics = "mergekit",
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE's random drop with TIES' sign election.

    normalize=None is each library's default: off in mergekit, on (always) in PEFT.
    """
    return task_vector_merge(
        tensors,
        weights,
        base,
        sparsify="random",
        density=density,
        consensus=consensus,
        normalize=semantics == "peft" if normalize is None else normalize,
        rescale=rescale,
        lambda_=lambda_,
        semantics=semantics,
        generator=generator,
    )


@merge_method("breadcrumbs")
def breadcrumbs(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: Finite = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Model Breadcrumbs (arXiv 2312.06795): drop both the tiny and the outlying |tau|, sum."""
    return task_vector_merge(
        tensors,
        weights,
        base,
        sparsify="magnitude_outliers",
        density=density,
        gamma=gamma,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )


@merge_method("breadcrumbs_ties")
def breadcrumbs_ties(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    base: Tensor | None = None,
    *,
    density: PerModel[Density] = 1.0,
    gamma: PerModel[Gamma] = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: Finite = 1.0,
    consensus: Consensus = "sum",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Breadcrumbs' sparsification with TIES' sign election."""
    return task_vector_merge(
        tensors,
        weights,
        base,
        sparsify="magnitude_outliers",
        density=density,
        gamma=gamma,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
    )
