"""The ``mmcompose align`` config schema (pydantic, unknown keys fail) and its YAML loader,
apart from the training loop (:mod:`mmcompose.align.trainer`), which re-exports them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmcompose.align.features import EncoderRef, encoder_modality
from mmcompose.align.moe import ConnectorConfig
from mmcompose.errors import ConfigError
from mmcompose.io import load_yaml

SPLITS = ("train", "val", "test")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticData(_Frozen):
    """Paired latents related through a hidden linear map (tests, smoke runs; as open_clip's
    synthetic dataset): z ~ N(0, I_rank); tokens of modality m = z W_m + noise, per token."""

    dims: dict[str, int] = Field(default_factory=lambda: {"a": 32, "b": 24})
    tokens: dict[str, int] = Field(default_factory=dict)  # default 4 per modality
    rank: int = Field(default=16, gt=0)
    noise: float = Field(default=0.5, ge=0)
    sizes: dict[str, int] = Field(default_factory=lambda: {"train": 512, "val": 128, "test": 128})
    # False (as before): one random stream for everything, so adding a modality to ``dims``
    # redraws the others. True: each modality's map and noise from its own stream keyed by its
    # name, z per split: adding a modality leaves the others' latents bit-identical (what a
    # continuation run, ``mmcompose align --from``, needs to compare old directions).
    independent: bool = False


class DataConfig(_Frozen):
    kind: Literal["manifest", "synthetic"] = "manifest"
    # dataset names (under cache_dir()/datasets) or paths to manifest.jsonl files; every record
    # is one pair: its own modality (file at ``path``) and text (its ``text_field``)
    datasets: list[str] = Field(default_factory=list)
    text_field: str = "caption"
    match_key: str | None = None  # which field defines positives; default: text_field
    # Pairs two non-text modalities (image <-> audio): records of different datasets with the
    # same value are positives of each other. ``label`` is the concept of the shared vocabulary
    # (assets/datasets/concepts.py), so a drawing of a cow and the spoken word "cow" pair up.
    # null: no media <-> media directions.
    cross_key: str | None = "label"
    synthetic: SyntheticData = SyntheticData()

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind == "manifest" and not self.datasets:
            raise ValueError("data.datasets is empty")
        return self


class TrainConfig(_Frozen):
    schedule: Literal["alternating", "joint"] = "alternating"
    period: int = Field(default=1, gt=0)  # steps per direction before switching
    max_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=64, gt=1)  # global, over all ranks
    lr: float = Field(default=1.5e-3, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    temperature: float = Field(default=0.03, gt=0)
    cl_weight: float = Field(default=0.5, ge=0)
    reg_weight: float = Field(default=0.5, ge=0)
    balance_weight: float = Field(default=0.0, ge=0)  # Switch load-balancing loss (off: reference)
    # {"src->tgt": w}: under ``alternating`` direction d takes w_d of every sum(w) turns,
    # interleaved (smooth weighted round-robin, align/schedule.py); under ``joint`` its loss
    # counts w_d / sum(w). Unlisted directions weigh 1; None: plain round-robin.
    schedule_weights: dict[str, int] | None = None
    eval_every: int = Field(default=50, gt=0)
    patience: int = Field(default=10, gt=0)  # evaluations without improvement
    checkpoint_every: int = Field(default=100, gt=0)
    # CPU threads for torch (None: torch's default). On a shared or small CPU, 1 thread avoids
    # oversubscription, which slowed small steps 40x in our measurements.
    num_threads: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_weights(self) -> TrainConfig:
        from mmcompose.align.schedule import parse_direction

        for name, w in (self.schedule_weights or {}).items():
            parse_direction(name)  # ValueError naming the malformed key
            if w < 1:
                raise ValueError(
                    f"train.schedule_weights[{name!r}] = {w}: weights are positive integers "
                    "(leave a direction out with `directions`)"
                )
        return self


class EvalConfig(_Frozen):
    space: Literal["cl", "reg"] = "cl"  # early stopping and the default embedding space
    split: str = "test"
    # routing.png (expert load, router entropy, dead experts per direction) in the output
    # folder; the same figures are always in metrics.json["routing"]. Off by default so an
    # output folder keeps its three files; the shipped configs turn it on. Needs matplotlib.
    figures: bool = False


class AlignConfig(_Frozen):
    seed: int = 0
    data: DataConfig = DataConfig(kind="synthetic")
    encoders: dict[str, EncoderRef] = Field(default_factory=dict)  # modality -> frozen encoder
    directions: list[tuple[str, str]] | None = None  # default: every ordered pair
    connector: ConnectorConfig = ConnectorConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    feature_root: str | None = None  # where feature stores live; default cache_dir()/align_features

    @model_validator(mode="after")
    def _check(self) -> AlignConfig:
        if self.connector.modalities or self.connector.directions:
            raise ValueError(
                "connector.modalities/directions are derived from the data; set top-level "
                "`directions` instead"
            )
        for modality, ref in self.encoders.items():
            produced = encoder_modality(ref.name)
            if produced != modality:
                raise ValueError(f"encoders.{modality}: {ref.name!r} encodes {produced!r}")
        return self

    def fingerprint(self) -> str:
        return hashlib.sha256(
            json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()[:16]


def load_align_config(path: str | Path) -> AlignConfig:
    """Parse and validate a YAML config; unknown keys and bad values raise :class:`ConfigError`."""
    raw = load_yaml(path, "align config") or {}
    try:
        return AlignConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid align config {path}:\n{exc}") from None
