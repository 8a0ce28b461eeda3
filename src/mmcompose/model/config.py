"""Configuration of a composed multimodal model, stored as the folder's config.json.

The LLM keeps its own Hugging Face config (``text_config``), so the language part of a
composed checkpoint stays an ordinary causal LM; towers and LoRA adapters are described
next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.io import load_json
from mmcompose.modalities import canonical_modality

CONFIG_NAME = "config.json"
PROCESSOR_CONFIG = "processor_config.json"
TEXT_ADAPTER = "text"
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SUPPORTED_LLM_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModuleSpec(_Strict):
    """A registered module (encoder or projector) by name, with its constructor arguments."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class TowerConfig(_Strict):
    """One modality's path into the LLM: encoder -> projector, wrapped in learned tokens."""

    modality: str
    encoder: ModuleSpec
    projector: ModuleSpec
    num_prefix: int = Field(default=0, ge=0)
    num_suffix: int = Field(default=0, ge=0)
    freeze_encoder: bool = True

    @field_validator("modality")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return canonical_modality(v)


class AdapterSpec(_Strict):
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRAConfig(_Strict):
    """LoRA adapters on the LLM's linear layers and how tokens are routed to them.

    ``shared``: every token uses the ``text`` adapter (NaiveMC). ``decoupled``: a modality's
    tokens (prefix and suffix included) use that modality's adapter, text and padding tokens
    the ``text`` adapter (DAMC). Adapters may have different ranks (a merge of several LoRAs
    is stored exactly as one adapter of the summed rank).
    """

    strategy: Literal["shared", "decoupled"] = "shared"
    adapters: dict[str, AdapterSpec]
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        for name in self.adapters:
            if name != TEXT_ADAPTER:
                canonical_modality(name)
        if self.strategy == "shared" and set(self.adapters) - {TEXT_ADAPTER}:
            raise ValueError("the 'shared' strategy has only the 'text' adapter")
        return self

    def adapter_for(self, kind: str) -> str | None:
        """Adapter used by tokens of ``kind`` ('text' or a modality); None = base weights."""
        if self.strategy == "decoupled" and kind in self.adapters:
            return kind
        if self.strategy == "decoupled" and kind != TEXT_ADAPTER:
            return None
        return TEXT_ADAPTER if TEXT_ADAPTER in self.adapters else None


class MMERConfig(_Strict):
    """An MMER composition (Li et al., ACL 2025, arXiv 2505.17110): every ``target_modules``
    linear holds the merged weight ``W0 + tau*`` (text tokens), the merged task vector ``tau*``
    and one binary mask per modality in ``modalities``; that modality's tokens (prefix and
    suffix included) use ``W0 + mask * tau*``. ``mask_rule``/``mask_lambda``/``merge_method``
    record how the masks were made (see :mod:`mmcompose.compose.masks`)."""

    modalities: tuple[str, ...] = Field(min_length=1)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    mask_rule: Literal["tall"] = "tall"
    mask_lambda: float = Field(gt=0, allow_inf_nan=False)
    merge_method: str | None = None

    @field_validator("modalities")
    @classmethod
    def _canonical(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(canonical_modality(m) for m in v)
        if len(set(names)) != len(names):
            raise ValueError(f"a modality is listed twice in {list(names)}")
        return names


class MMConfig(_Strict):
    """The composed model: one LLM, any number of modality towers, optional LoRA."""

    model_type: Literal["mmcompose"] = "mmcompose"
    architectures: list[str] = Field(default_factory=lambda: ["MMComposeForCausalLM"])
    mmcompose_version: str = "0.1.0"
    text_config: dict[str, Any]
    towers: list[TowerConfig] = Field(default_factory=list)
    lora: LoRAConfig | None = None
    mmer: MMERConfig | None = None
    dtype: str = "float32"

    @field_validator("text_config")
    @classmethod
    def _llm_type(cls, v: dict[str, Any]) -> dict[str, Any]:
        mt = v.get("model_type")
        if mt not in SUPPORTED_LLM_TYPES:
            raise ValueError(
                f"LLM model_type {mt!r} is not supported; use one of {', '.join(SUPPORTED_LLM_TYPES)}"
            )
        return v

    @model_validator(mode="after")
    def _unique_towers(self) -> MMConfig:
        seen = [t.modality for t in self.towers]
        dup = {m for m in seen if seen.count(m) > 1}
        if dup:
            raise ValueError(f"more than one tower for modality {sorted(dup)}")
        return self

    @model_validator(mode="after")
    def _mmer(self) -> MMConfig:
        if self.mmer is None:
            return self
        if self.lora is not None:
            raise ValueError("mmer and lora cannot both be set: an MMER model holds no adapters")
        missing = sorted(set(self.mmer.modalities) - set(self.modalities))
        if missing:
            raise ValueError(f"mmer masks modalities without a tower: {missing}")
        return self

    @property
    def modalities(self) -> list[str]:
        return [t.modality for t in self.towers]

    def tower(self, modality: str) -> TowerConfig:
        for t in self.towers:
            if t.modality == modality:
                return t
        raise ConfigError(
            f"this model has no {modality!r} tower",
            hint=f"its modalities are: {', '.join(self.modalities) or '(none)'}",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MMConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(
                f"invalid {source}: {_brief(e)}",
                hint="an mmcompose config.json holds text_config, towers, lora and dtype; "
                "restore the file the model was saved with",
            ) from None

    @classmethod
    def from_dir(cls, path: str | Path) -> MMConfig:
        path = Path(path)
        f = path / CONFIG_NAME
        if not path.is_dir():
            raise CheckpointError(
                f"model folder {path} does not exist", hint="pass a folder saved by mmcompose"
            )
        if not f.is_file():
            raise CheckpointError(
                f"{path} has no {CONFIG_NAME}",
                hint="pass a folder written by mmcompose (save_pretrained, compose or train)",
            )
        data = load_json(
            f,
            "model config",
            error=CheckpointError,
            hint="config.json is damaged; restore it from where the model came from",
        )
        if data.get("model_type") != "mmcompose":
            raise CheckpointError(
                f"{f} describes a {data.get('model_type')!r} model, not an mmcompose model",
                hint="plain Hugging Face LLM folders are inputs to `mmcompose compose`",
            )
        return cls.from_dict(data, source=str(f))

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        if data.get("mmer") is None:  # configs without MMER stay as they were written before
            data.pop("mmer", None)
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def _brief(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
