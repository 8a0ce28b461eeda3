"""The ``mmcompose train`` YAML schema and its reader, apart from the trainer so that a
missing, malformed or mistyped config is refused before torch and transformers are imported
(``mmcompose.train.trainer`` re-exports these names)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmcompose.errors import ConfigError
from mmcompose.io import load_yaml
from mmcompose.model.config import TowerConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageConfig(_Strict):
    epochs: float = Field(default=1.0, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, gt=0)  # global batch
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    data: str | list[str] | None = None  # defaults to TrainConfig.data


class LoRASettings(_Strict):
    strategy: Literal["shared", "decoupled"] = "shared"
    rank: int = Field(default=16, gt=0)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)


class TrainConfig(_Strict):
    """`mmcompose train` YAML."""

    base_llm: str  # a Hugging Face LLM folder, or the name of a prepared base LLM
    tower: TowerConfig
    # Conversation JSON (reference format), or manifest JSONL(s): stage 1 then answers with
    # captions and stage 2 with labels, from the ``split`` rows. ``dataset:NAME`` names a
    # prepared offline dataset.
    data: str | list[str]
    split: str = "train"
    lora: LoRASettings = LoRASettings()
    stage1: StageConfig = StageConfig(lr=1e-3)
    stage2: StageConfig = StageConfig(lr=2e-4)
    max_length: int = Field(default=256, gt=8)
    grad_clip: float = Field(default=1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(default=50, gt=0)
    feature_cache: str | None = None  # default: the asset cache
    device: str = "cpu"
    # A media file that cannot be read (missing, truncated, undecodable): fail before training
    # (default), or skip the examples using it, with a warning naming each file.
    on_corrupt: Literal["fail", "skip"] = "fail"
    # The system prompt every conversation gets when it has none (saved with the processor, so
    # inference renders prompts the same way). None: the chat template's own default
    # (SmolLM2's adds 16 tokens to every example); "": an empty system turn.
    system_prompt: str | None = None
    # "lstsq": fit the projector's output layer in closed form onto the embeddings of the
    # stage-2 answers before stage 1 (see mmcompose.train.anchor); "random": plain init.
    projector_init: Literal["random", "lstsq"] = "random"
    # A trained model folder to start the tower (projector, prefix/suffix) from, e.g. a
    # stage-1 run shared by the shared and decoupled variants (then stage1.epochs: 0).
    init_from: str | None = None
    init_ridge: float = Field(default=0.03, gt=0)


def load_train_config(path: str | Path) -> tuple[TrainConfig, Path]:
    path = Path(path)
    raw = load_yaml(path, "train config")
    try:
        return TrainConfig.model_validate(raw), path.parent
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid train config {path}: {msgs}") from None


__all__ = ["LoRASettings", "StageConfig", "TrainConfig", "load_train_config"]
