"""Adding a modality to a trained connector (``mmcompose align CONFIG -o OUT --from DIR``).

The issue asks for "a new modality's input projection and directions, nothing else changed",
so every parameter of the connector being continued is frozen: the shared gate and experts,
the stream norms and task embeddings, every old input projection, direction embedding and
head. Trained: the input projections of modalities that had none (a new modality, or an old
one that was only ever a target), and each new direction's embedding, heads and target
projection. The old directions' outputs are therefore bit-identical, and so is their recall
on the same data (the run checks the tensors and reports both recalls with the Wilson 95%
interval of the old one). The direction embeddings are one (D, H) tensor: the old rows are
held by zeroing their gradient (AdamW moves a weight with zero gradient and zero decay by
exactly 0; embeddings are not decayed).

Refused, before any training: a config whose encoder for an old modality differs from the
recorded one, an old modality whose feature width changed, a connector architecture that
differs, and a run with no direction to add.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcompose.align.config import AlignConfig
from mmcompose.align.features import EncoderRef
from mmcompose.align.moe import AltMoEConnector, ConnectorConfig, direction_name
from mmcompose.errors import ConfigError

__all__ = ["ARCHITECTURE", "Continuation", "compare_recall", "open_continuation"]

Direction = tuple[str, str]
ARCHITECTURE = ("kind", "hidden", "num_experts", "top_k", "renormalize")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Continuation:
    """The connector a run continues from, and the checks it imposes on the new config."""

    path: Path
    meta: dict[str, Any]
    connector: AltMoEConnector
    sha256: str

    @property
    def old_cfg(self) -> ConnectorConfig:
        return self.connector.cfg

    @property
    def directions(self) -> list[Direction]:
        return list(self.connector.directions)

    def check_config(self, cfg: AlignConfig) -> None:
        """Architecture and encoders (cheap: before any data is read)."""
        where = f"the connector being continued ({self.path})"
        for f in ARCHITECTURE:
            new, old = getattr(cfg.connector, f), getattr(self.old_cfg, f)
            if f in cfg.connector.model_fields_set and new != old:
                raise ConfigError(
                    f"connector.{f} is {new!r} but {where} has {old!r}",
                    hint="a continuation keeps the architecture: drop the key or set it to "
                    f"{old!r}",
                )
        for m, ref in cfg.encoders.items():
            recorded = self.meta.get("encoders", {}).get(m)
            if recorded is not None and EncoderRef(**recorded) != ref:
                raise ConfigError(
                    f"encoders.{m} is {ref.model_dump(mode='json')} but {where} was trained with "
                    f"{recorded}: its {m} directions would get other features",
                    hint=f"use the recorded encoder for {m!r} (its config.json lists it)",
                )

    def check_dims(self, dims: Mapping[str, int]) -> None:
        """An old modality's feature width must be the one the connector was trained with."""
        for m, d in dims.items():
            old = self.old_cfg.modalities.get(m)
            if old is not None and old != d:
                raise ConfigError(
                    f"modality {m!r} has features of width {d} here, but the connector being "
                    f"continued ({self.path}) was trained with width {old}",
                    hint=f"use the features (encoder, dims) the connector was trained on for {m!r}",
                )

    def new_directions(self, directions: Sequence[Direction]) -> list[Direction]:
        old = set(self.directions)
        new = [tuple(d) for d in directions if tuple(d) not in old]
        if not new:
            trained = ", ".join(direction_name(d) for d in self.directions)
            raise ConfigError(
                f"nothing to add: {self.path} already trains every direction of this config",
                hint=f"it trains {trained}; add data of a new modality to the config",
            )
        return new  # type: ignore[return-value]

    def extend(
        self, cfg: AlignConfig, dims: Mapping[str, int], new: Sequence[Direction]
    ) -> AltMoEConnector:
        """The old connector plus new input projections and direction parts; old parts frozen."""
        self.check_dims(dims)
        old = self.old_cfg
        modalities = {**{m: d for m, d in dims.items()}, **old.modalities}
        update: dict[str, Any] = {
            "modalities": dict(sorted(modalities.items())),
            "directions": (*old.directions, *new),
        }
        if "dropout" in cfg.connector.model_fields_set:
            update["dropout"] = cfg.connector.dropout
        ext_cfg = ConnectorConfig.model_validate({**old.model_dump(), **update})
        torch.manual_seed(cfg.seed)
        model = AltMoEConnector(ext_cfg)
        own = model.state_dict()
        old_state = self.connector.state_dict()
        n_old = len(old.directions)
        with torch.no_grad():
            for k, v in old_state.items():
                if k == "dir_emb":
                    own[k][:n_old].copy_(v)
                else:
                    own[k].copy_(v)
        for name, p in model.named_parameters():
            if name in old_state and name != "dir_emb":
                p.requires_grad_(False)
        if "dir_emb" in old_state:
            keep = torch.ones_like(model.dir_emb)
            keep[:n_old] = 0.0
            model.dir_emb.register_hook(lambda g: g * keep)
        return model

    def unchanged(self, model: AltMoEConnector) -> bool:
        """Whether every old tensor of ``model`` is bit-identical to the continued connector's."""
        own = model.state_dict()
        n_old = len(self.old_cfg.directions)
        for k, v in self.connector.state_dict().items():
            mine = own[k][:n_old] if k == "dir_emb" else own[k]
            if not torch.equal(mine, v):
                return False
        return True

    def frozen_count(self) -> int:
        """Parameters the continuation holds fixed (every tensor of the continued connector)."""
        return sum(v.numel() for v in self.connector.state_dict().values())

    def record(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "directions": [direction_name(d) for d in self.directions],
        }


def open_continuation(path: str | Path) -> Continuation:
    """Load a trained alignment folder to continue from (refused if it is none)."""
    from mmcompose.align.evaluate import AlignedModel
    from mmcompose.align.folder import read_alignment

    path = Path(path)
    _, weights = read_alignment(path)
    model = AlignedModel.load(path)
    return Continuation(path, model.meta, model.connector, _sha256(weights))


def compare_recall(
    before: Mapping[str, Mapping[str, Mapping[str, float]]],
    after: Mapping[str, Mapping[str, Mapping[str, float]]],
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per space and old direction: recall before/after, the Wilson interval of before's
    R@K (over its queries), and whether after lies inside every interval."""
    from mmcompose.bench.stats import wilson_interval

    out: dict[str, dict[str, Any]] = {}
    for space, per_dir in before.items():
        out[space] = {}
        for name, b in per_dir.items():
            a = after.get(space, {}).get(name)
            if a is None:
                continue
            n = int(b["queries"])
            ci, inside = {}, True
            for key in (k for k in b if k.startswith("R@")):
                lo, hi = wilson_interval(round(b[key] / 100 * n), n, level)
                ci[key] = [100 * lo, 100 * hi]
                eps = 1e-9  # the interval's ends at 0 and 1 come out a rounding inside
                inside = inside and lo - eps <= a[key] / 100 <= hi + eps
            out[space][name] = {
                "before": dict(b),
                "after": dict(a),
                "ci95": ci,
                "within_ci": inside,
            }
    return out
