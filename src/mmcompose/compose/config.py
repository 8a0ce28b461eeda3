"""The composition config: a YAML file in mergekit's schema, plus multimodal keys.

A mergekit text-only config (``merge_method``, ``base_model``, ``models``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``) is read unchanged; parameters may be scalars or
mergekit's conditional form ``[{filter: self_attn, value: 0.5}, {value: 0.3}]`` (first match
wins, the filter is a substring of the Hugging Face tensor name). The new keys::

    composition: damc          # naivemc | damc | mmer; default: from the sources' LoRA strategy
    mmer: {mask_lambda: 1.0}   # composition: mmer only: the mask rule's lambda (> 0)
    lora_output: adapter       # fold | adapter; naivemc folds merged LoRA deltas by default
    towers:                    # resolve a modality offered by several sources
      image: {source: ./llava-image}
      video: {drop: true}
    drop: ["language_model.model.extra_*"]   # input tensors to leave out (glob patterns)
    output_format: auto        # auto | mmcompose | hf (auto: hf for a text-only result)
    max_shard_size: 5GB
    seed: 0                    # randomness of DARE; none = torch's global RNG, as mergekit

Relative paths resolve against the YAML file's folder. Unknown keys are errors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mmcompose.compose.masks import MMERSettings
from mmcompose.compose.method_roles import Roles, roles_of
from mmcompose.compose.methods import MERGE_METHODS, BoundMerge, MergeMethod
from mmcompose.errors import ConfigError
from mmcompose.io import load_yaml, parse_size
from mmcompose.modalities import canonical_modality

__all__ = [
    "ComposeConfig",
    "ConditionalParameter",
    "ModelEntry",
    "TowerChoice",
    "bind_method",
    "load_compose_config",
    "resolve_parameters",
]

Scalar = bool | int | float | str
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"}
DTYPE_NAMES |= {"bfloat16": "bfloat16", "bf16": "bfloat16"}
# mergekit keys we know but do not (yet) support, with what to do instead.
_UNSUPPORTED = {
    "slices": "mmcompose merges whole models; layer slices (frankenmerges) are not supported",
    "modules": "per-module merge definitions are not supported; use one models list",
    "tokenizer": "the tokenizer block is not supported; use tokenizer_source: base or a path",
    "chat_template": "chat_template is not supported; edit tokenizer_config.json afterwards",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """A relative path is relative to the YAML file's folder (``context['base_dir']``)."""
    if not isinstance(value, str | Path):
        return value
    base = (info.context or {}).get("base_dir")
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


class ConditionalParameter(_Strict):
    """mergekit's ``{filter: SUBSTRING, value: V}``; no filter (or ``*``) matches every tensor."""

    value: Scalar
    filter: str | None = None

    def matches(self, tensor_name: str) -> bool:
        return self.filter in (None, "*") or self.filter in tensor_name


Setting = Scalar | list[ConditionalParameter]


def _check_setting(key: str, value: Any) -> Any:
    """Normalise one parameter setting; refuse mergekit gradients with a clear message."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and value and not all(isinstance(v, Mapping) for v in value):
        raise ValueError(
            f"parameter {key!r}: a list of values is a mergekit gradient over layers, which "
            "mmcompose does not support; give one value, or [{filter: ..., value: ...}] entries"
        )
    return value


def _check_settings(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    return {k: _check_setting(k, v) for k, v in value.items()}


class ModelEntry(_Strict):
    """One input model and its per-model parameters (``weight`` is its lambda)."""

    model: Path
    parameters: dict[str, Setting] = Field(default_factory=dict)
    # new: force a checkpoint importer (default: detected) and pass it options, e.g.
    # ``{base_vocab_size: 32000}`` for llava-hf, ``{base: PATH, encoders: {...}}`` for others
    importer: str | None = None
    importer_options: dict[str, Any] = Field(default_factory=dict)

    _path = field_validator("model", mode="before")(_resolve_path)
    _settings = field_validator("parameters", mode="before")(
        lambda v: _check_settings({} if v is None else v)
    )


class TowerChoice(_Strict):
    """How to resolve a modality: take its tower (and adapter) from ``source``, or drop it."""

    source: Path | None = None
    drop: bool = False

    _path = field_validator("source", mode="before")(_resolve_path)

    @model_validator(mode="after")
    def _one(self) -> TowerChoice:
        if (self.source is None) == (not self.drop):
            raise ValueError("give either source: PATH or drop: true")
        return self


class ComposeConfig(_Strict):
    """A validated composition config. Build it with :func:`load_compose_config`."""

    merge_method: str
    models: list[ModelEntry] = Field(min_length=1)
    base_model: Path | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    dtype: str | None = None  # compute dtype: inputs are cast to it (mergekit's meaning)
    out_dtype: str | None = None  # dtype written; default dtype, else the inputs' own
    tokenizer_source: Literal["base", "union"] | Path | None = None
    composition: Literal["naivemc", "damc", "mmer"] | None = None
    mmer: MMERSettings | None = None
    lora_output: Literal["fold", "adapter"] | None = None
    towers: dict[str, TowerChoice] = Field(default_factory=dict)
    drop: list[str] = Field(default_factory=list)
    output_format: Literal["auto", "mmcompose", "hf"] = "auto"
    max_shard_size: int | str = "5GB"
    seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, why in _UNSUPPORTED.items():
                if key in data:
                    raise ValueError(f"{key!r}: {why}")
        return data

    @model_validator(mode="after")
    def _mmer_block(self) -> ComposeConfig:
        if self.mmer is not None and self.composition != "mmer":
            raise ValueError("mmer: settings apply only with composition: mmer")
        return self

    @property
    def mmer_settings(self) -> MMERSettings:
        return self.mmer or MMERSettings()

    _paths = field_validator("base_model", mode="before")(_resolve_path)
    _settings = field_validator("parameters", mode="before")(
        lambda v: _check_settings({} if v is None else v)
    )

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer(cls, v: Any, info: ValidationInfo) -> Any:
        return v if v in ("base", "union", None) else _resolve_path(v, info)

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = v.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]

    @field_validator("towers")
    @classmethod
    def _modalities(cls, v: dict[str, TowerChoice]) -> dict[str, TowerChoice]:
        return {canonical_modality(k): c for k, c in v.items()}

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if parse_size(v) <= 0:
            raise ValueError("max_shard_size must be positive")
        return v

    @property
    def method(self) -> MergeMethod:
        return MERGE_METHODS.get(self.merge_method)

    @property
    def roles(self) -> Roles:
        """What the method needs: a base, weights, a count of models (method_roles)."""
        return roles_of(self.merge_method)

    @property
    def needs_base(self) -> bool:
        """The method uses base_model (if given); linear, karcher, passthrough do not."""
        return self.roles.base != "none"

    @property
    def requires_base(self) -> bool:
        """Full weights cannot be merged without base_model (nuslerp, multislerp can)."""
        return self.roles.base == "required"

    @property
    def merge_entries(self) -> list[ModelEntry]:
        """The models merged: a ``base_model`` listed among them is the base only (mergekit's
        rule) for task-vector methods, and an ordinary input for ``linear``."""
        base = self.base_model
        if base is None or not self.needs_base:
            return list(self.models)
        return [e for e in self.models if e.model.resolve() != base.resolve()]

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    def is_dropped(self, tensor_name: str) -> bool:
        return any(fnmatch.fnmatchcase(tensor_name, p) for p in self.drop)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True)


def resolve(setting: Setting, tensor_name: str) -> Scalar | None:
    """A setting's value for one tensor: a scalar, or the first matching conditional."""
    if not isinstance(setting, list):
        return setting
    return next((c.value for c in setting if c.matches(tensor_name)), None)


def resolve_parameters(
    config: ComposeConfig, entries: Iterable[ModelEntry], tensor_name: str
) -> tuple[list[dict[str, Scalar]], dict[str, Scalar]]:
    """Per-model and global parameters for one tensor, mergekit's precedence: a model's own
    value over the global one. Global keys the method takes per model apply to every model."""
    method = config.method
    per_model_keys = set(method.model_params.model_fields)
    glob = {k: resolve(s, tensor_name) for k, s in config.parameters.items()}
    glob = {k: v for k, v in glob.items() if v is not None}
    shared = {k: v for k, v in glob.items() if k in per_model_keys}
    models = []
    for entry in entries:
        own = {k: resolve(s, tensor_name) for k, s in entry.parameters.items()}
        models.append(shared | {k: v for k, v in own.items() if v is not None})
    return models, {k: v for k, v in glob.items() if k not in per_model_keys}


def bind_method(
    config: ComposeConfig, entries: list[ModelEntry], tensor_name: str = ""
) -> BoundMerge:
    """The method bound to its validated parameters for one tensor (MergeMethod's models)."""
    models, glob = resolve_parameters(config, entries, tensor_name)
    return config.method.bind(models, glob)


def _filters(config: ComposeConfig) -> set[str]:
    settings = [*config.parameters.values()] + [
        s for e in config.models for s in e.parameters.values()
    ]
    return {c.filter for s in settings if isinstance(s, list) for c in s if c.filter}


def validate_method(config: ComposeConfig) -> None:
    """Bind the method once per distinct filter, so a bad value fails before any work."""
    entries = config.merge_entries
    if not entries:
        raise ConfigError(
            "no models to merge besides the base model", hint="list the fine-tuned models"
        )
    for name in {"", *_filters(config)}:
        bind_method(config, entries, name)


def parse_compose_config(data: Any, base_dir: str | Path | None = None) -> ComposeConfig:
    """Validate a parsed YAML mapping; ConfigError names every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            "a compose config must be a YAML mapping",
            hint="start from: merge_method: linear\nmodels:\n  - model: ./a\n  - model: ./b",
        )
    try:
        config = ComposeConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as e:
        raise ConfigError(
            f"invalid compose config: {_brief(e)}",
            hint="keys: " + ", ".join(ComposeConfig.model_fields),
        ) from None
    validate_method(config)
    return config


def load_compose_config(path: str | Path) -> ComposeConfig:
    """Read and validate a compose YAML file; relative paths are taken from its folder."""
    path = Path(path)
    data = load_yaml(path, "compose config")
    try:
        return parse_compose_config(data, path.resolve().parent)
    except ConfigError as e:
        raise type(e)(f"{path}: {e.message}", hint=e.hint) from None


def _brief(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
    return "; ".join(dict.fromkeys(parts))
