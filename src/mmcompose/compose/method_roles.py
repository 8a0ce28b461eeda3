"""What a merge method needs besides its tensors: a base, weights, a count of models, LoRA.

mergekit 0.1.5 states this per method (its ``InputContract``: base required, optional or
ignored, how many inputs); slerp, for one, takes exactly the base and one model. Here it is a
:class:`Roles` per method, so a config is refused when it is read or planned, before any
tensor is: a wrong count of models, a weight given to a method without weights, a base-less
composition for a method that needs a base, or LoRA sources for a method that needs whole
weights (a LoRA source offers only its delta ``dW``, which mmcompose merges with
``base=None``; slerp's angle or arcee_fusion's softmax of the weights cannot be taken from it).

:func:`merge_method_with` registers a function like ``methods.merge_method`` and attaches its
roles and an optional cross-parameter check (DELLA's density +- epsilon), both applied by
``bind``. Keyword parameters without a default are required, as in mergekit (slerp's ``t``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Field, create_model

from mmcompose.compose.methods import (
    _MODEL_CONFIG,
    MERGE_METHODS,
    BoundMerge,
    MergeMethod,
    _param_models,
)
from mmcompose.errors import ConfigError, MergeError

if TYPE_CHECKING:
    from torch import Tensor


__all__ = [
    "LORA_HINT",
    "RoledMergeMethod",
    "Roles",
    "check_count",
    "check_no_weights",
    "merge_method_with",
    "roles_of",
]

F = TypeVar("F", bound="Callable[..., Tensor]")
BasePolicy = Literal["required", "optional", "none"]
LORA_HINT = (
    "with LoRA sources mmcompose merges the deltas dW_i alone (the shared base is added "
    "afterwards); use a method that merges task vectors (task_arithmetic, ties, della, sce, "
    "nuslerp, multislerp, model_stock, ...), or compose full-weight models"
)


@dataclass(frozen=True)
class Roles:
    """``base``: ``required`` (full weights are merged as task vectors against base_model;
    given LoRA deltas, the deltas are the task vectors), ``optional`` (base_model is used if
    given) or ``none`` (a base is refused; mergekit merges base_model as one more input).
    ``weights``: takes a per-model weight. ``models``: how many models besides the base.
    ``lora``: why LoRA deltas cannot be merged by the method; None if they can."""

    base: BasePolicy = "required"
    weights: bool = True
    min_models: int = 1
    max_models: int | None = None
    lora: str | None = None


# The methods of methods.py: linear takes no base, the task-vector methods need one.
_ROLES = {"linear": Roles(base="none")}


def roles_of(name: str) -> Roles:
    """A method's roles; an unknown name gets the default (its lookup fails elsewhere)."""
    method = MERGE_METHODS.get(name) if name in MERGE_METHODS else None
    if isinstance(method, RoledMergeMethod):
        return method.roles
    return _ROLES.get(name, Roles())


def check_count(name: str, roles: Roles, n: int) -> None:
    """Refuse a number of models (besides the base) the method does not take."""
    lo, hi = roles.min_models, roles.max_models
    if lo <= n and (hi is None or n <= hi):
        return
    want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
    besides = " besides the base" if roles.base != "none" else ""
    raise MergeError(
        f"{name} merges {want} model{'s' * (want != 'exactly 1')}{besides}, got {n}",
        hint="list the base model under base_model (it may also appear under models)"
        if roles.base == "required"
        else "list the models to merge under models",
    )


def check_no_weights(name: str, weights: Sequence[float] | None) -> None:
    if weights is not None:
        raise MergeError(
            f"{name} takes no weights (as in mergekit, every model counts the same)",
            hint="remove weight from the models' parameters",
        )


@dataclass(frozen=True)
class RoledMergeMethod(MergeMethod):
    """A merge method with its :class:`Roles` and a check across parameters, run by bind."""

    roles: Roles = Roles()
    check: Callable[..., None] | None = None

    def bind(
        self, models: Sequence[Mapping[str, Any]], params: Mapping[str, Any] | None = None
    ) -> BoundMerge:
        bound = super().bind(models, params)
        try:
            check_count(self.name, self.roles, len(models))
            if self.check is not None:
                self.check(**bound.kwargs)
        except MergeError as e:
            message = e.message.removeprefix(f"{self.name}: ")
            raise ConfigError(f"merge method {self.name!r}: {message}", hint=e.hint) from None
        return bound

    def _validate(self, model: type[BaseModel], data: Any, where: str) -> BaseModel:
        for key, f in model.model_fields.items():
            if f.is_required() and isinstance(data, Mapping) and (f.alias or key) not in data:
                raise ConfigError(
                    f"merge method {self.name!r}, {where}: missing parameter {f.alias or key!r}",
                    hint=f"{self.name} needs {f.alias or key} (mergekit has no default either)",
                )
        try:
            return super()._validate(model, data, where)
        except ConfigError as e:
            if model.model_fields:
                raise
            what = "per-model parameters" if where.startswith("model") else "parameters"
            no = " (nor weights)" if what.startswith("per") and not self.roles.weights else ""
            raise ConfigError(e.message, hint=f"{self.name} takes no {what}{no}") from None


class _NoWeight(BaseModel):
    """Per-model parameters of a method without weights: a ``weight`` key is unknown (an
    error), and bind reads None."""

    model_config = _MODEL_CONFIG

    @property
    def weight(self) -> None:
        return None


def _rebuild(model: type[BaseModel], base: type[BaseModel] | None, drop: str = "") -> type:
    """``model`` again, without field ``drop``; fields whose default is missing are required."""
    fields: dict[str, Any] = {}
    for key, f in model.model_fields.items():
        if key == drop:
            continue
        hint = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        default = ... if f.default is inspect.Parameter.empty else f.default
        fields[key] = (hint, Field(default, alias=f.alias))
    kind: dict[str, Any] = {"__base__": base} if base else {"__config__": _MODEL_CONFIG}
    return create_model(model.__name__, **kind, **fields)


def merge_method_with(
    name: str, roles: Roles = Roles(), check: Callable[..., None] | None = None
) -> Callable[[F], F]:
    """Register ``fn`` under ``name`` with its roles; ``check(**kwargs)`` gets the bound
    keyword parameters (per-model ones as tuples) and raises MergeError."""

    def deco(fn: F) -> F:
        per_model, glob = _param_models(name, fn)
        if roles.weights:
            per_model = _rebuild(per_model, None)
        else:
            per_model = _rebuild(per_model, _NoWeight, drop="weight")
        method = RoledMergeMethod(name, fn, per_model, _rebuild(glob, None), roles, check)
        MERGE_METHODS.register(name)(method)
        return fn

    return deco
