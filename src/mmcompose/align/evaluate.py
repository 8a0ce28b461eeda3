"""Retrieval evaluation (Recall@K both directions) and the embedding API of a trained connector.

Positives. Captions and labels repeat (ten drawings captioned "a drawing of a bird"), so
"the one paired item" is not a usable ground truth. We use class-level relevance: a query
matches every gallery item with the same match key (the caption by default), and text rows,
whose inputs are identical when their keys are, are de-duplicated so each distinct caption is
one query and one gallery entry. R@K = share of queries with at least one positive among the
K most similar gallery items (cosine). With unique keys this is the usual paired R@K (COCO).

Spaces. ``cl`` (default): query = normalised contrastive head output, gallery = the target's
pooled latent through the direction's target projection. ``reg``: query = the regression head's
predicted target latent, gallery = the raw stored target latents (pre-storage without any
projection, the spec's inference path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mmcompose.align.features import EncoderRef, ModalityFeatures, build_feature_encoder
from mmcompose.align.moe import AltMoEConnector, ConnectorConfig, direction_name
from mmcompose.errors import CheckpointError, ConfigError

__all__ = [
    "KS",
    "AlignedModel",
    "PairedSplit",
    "evaluate_split",
    "gallery_embeddings",
    "query_embeddings",
    "recall_at_k",
]

KS = (1, 5, 10)
Space = Literal["cl", "reg"]
Direction = tuple[str, str]


@dataclass
class PairedSplit:
    """Row-aligned features of several modalities: row i of each is one pair, key i its class."""

    features: dict[str, ModalityFeatures]
    keys: np.ndarray  # (n,) int: rows with equal keys are positives of each other
    ids: list[str] = field(default_factory=list)
    dedupe: frozenset[str] = frozenset()  # modalities whose same-key rows are identical inputs

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray) -> PairedSplit:
        return PairedSplit(
            {m: f.take(rows) for m, f in self.features.items()},
            self.keys[rows],
            [self.ids[i] for i in rows] if self.ids else [],
            self.dedupe,
        )

    def side_rows(self, modality: str) -> np.ndarray:
        """Rows used for ``modality`` in evaluation (first row per key when de-duplicated)."""
        if modality not in self.dedupe:
            return np.arange(len(self.keys))
        _, first = np.unique(self.keys, return_index=True)
        return np.sort(first)


def recall_at_k(sim: Tensor, relevant: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K from a (Q, G) similarity matrix and a (Q, G) boolean relevance matrix.

    Rank of a query = number of gallery items scoring strictly above its best positive (ties
    count in the query's favour). A query without any positive is an error: it would silently
    lower every recall."""
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("some queries have no positive in the gallery")
    best = sim.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    rank = (sim > best).sum(dim=1)
    return {f"R@{k}": float((rank < k).float().mean()) * 100.0 for k in ks}


@torch.no_grad()
def query_embeddings(
    connector: AltMoEConnector,
    direction: Direction,
    feats: ModalityFeatures,
    space: Space = "cl",
    batch_size: int = 256,
) -> Tensor:
    """One connector pass per query: (n, H) for ``cl`` or (n, d_tgt) for ``reg``, L2-normalised."""
    was_training = connector.training
    connector.eval()
    out = []
    for s in range(0, len(feats), batch_size):
        tokens, mask = feats.batch(np.arange(s, min(s + batch_size, len(feats))))
        pred = connector(direction, tokens, mask)
        out.append(pred.cl if space == "cl" else pred.reg)
    connector.train(was_training)
    return F.normalize(torch.cat(out), dim=-1)


@torch.no_grad()
def gallery_embeddings(
    connector: AltMoEConnector, direction: Direction, pooled: Tensor, space: Space = "cl"
) -> Tensor:
    """Stored target latents in the chosen space, L2-normalised."""
    pooled = pooled.float()
    return F.normalize(connector.target_cl(direction, pooled) if space == "cl" else pooled, dim=-1)


def evaluate_split(
    connector: AltMoEConnector,
    split: PairedSplit,
    directions: Sequence[Direction],
    spaces: Sequence[Space] = ("cl", "reg"),
    ks: Sequence[int] = KS,
) -> dict[str, dict[str, dict[str, float]]]:
    """{space: {"src->tgt": {"R@1": .., "R@5": .., "R@10": .., "queries": n, "gallery": m}}}."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for space in spaces:
        results[space] = {}
        for src, tgt in directions:
            q_rows, g_rows = split.side_rows(src), split.side_rows(tgt)
            q = query_embeddings(connector, (src, tgt), split.features[src].take(q_rows), space)
            pooled = torch.as_tensor(np.asarray(split.features[tgt].pooled[g_rows]))
            g = gallery_embeddings(connector, (src, tgt), pooled, space)
            keys_q = torch.as_tensor(split.keys[q_rows])
            keys_g = torch.as_tensor(split.keys[g_rows])
            metrics = recall_at_k(q @ g.T, keys_q[:, None] == keys_g[None, :], ks)
            results[space][direction_name((src, tgt))] = {
                **metrics,
                "queries": len(q_rows),
                "gallery": len(g_rows),
            }
    return results


def mean_r1(results: dict[str, dict[str, float]]) -> float:
    """Mean R@1 over directions (the early-stopping criterion)."""
    return float(np.mean([m["R@1"] for m in results.values()]))


# =========================================================================== trained model
class AlignedModel:
    """A trained connector plus the frozen-encoder references needed to embed new inputs.

    ``embed_query(m, inputs)``: inputs of modality m -> vectors to search a gallery of the other
    modality; ``embed_gallery(m, inputs)``: inputs of modality m -> vectors to store. Inputs are
    raw (file paths, or strings for text, run through the frozen encoder), a
    :class:`ModalityFeatures`, or an array of tokens (n, T, d) / pooled latents (n, d)."""

    def __init__(self, connector: AltMoEConnector, meta: dict[str, Any], path: Path | None = None):
        self.connector = connector.eval()
        self.meta = meta
        self.path = path
        self.encoders = {m: EncoderRef(**r) for m, r in meta.get("encoders", {}).items()}
        self._built: dict[str, Any] = {}

    @classmethod
    def load(cls, out_dir: str | Path) -> AlignedModel:
        from mmcompose.align.folder import read_alignment
        from mmcompose.io import load_safetensors

        out_dir = Path(out_dir)
        meta, weights = read_alignment(out_dir)
        connector = AltMoEConnector(ConnectorConfig(**meta["connector"]))
        try:
            connector.load_state_dict(load_safetensors(weights), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights} does not fit its config.json: {exc}") from None
        return cls(connector, meta, out_dir)

    @property
    def directions(self) -> list[Direction]:
        return list(self.connector.directions)

    @property
    def modalities(self) -> list[str]:
        return sorted({m for d in self.directions for m in d})

    def default_space(self) -> Space:
        return self.meta.get("space", "cl")

    def _direction(self, modality: str, other: str | None, as_source: bool) -> Direction:
        pos = 0 if as_source else 1
        cands = [d for d in self.directions if d[pos] == modality and other in (None, d[1 - pos])]
        if not cands:
            role = "query" if as_source else "gallery"
            trained = ", ".join(direction_name(d) for d in self.directions)
            raise ConfigError(
                f"this connector was not trained for {modality!r} as a {role}"
                + (f" against {other!r}" if other else ""),
                hint=f"trained directions: {trained}",
            )
        if len(cands) > 1:
            raise ConfigError(
                f"{modality!r} has several directions; name the other modality",
                hint=", ".join(direction_name(d) for d in cands),
            )
        return cands[0]

    def features(self, modality: str, inputs: Any) -> ModalityFeatures:
        """Latents of ``inputs`` (raw inputs go through the frozen encoder once)."""
        if isinstance(inputs, ModalityFeatures):
            feats = inputs
        elif isinstance(inputs, np.ndarray | Tensor):
            arr = np.asarray(inputs, dtype=np.float32)
            if arr.ndim == 2:
                arr = arr[:, None, :]
            if arr.ndim != 3:
                raise ConfigError(f"features must be (n, d) or (n, T, d), got {arr.shape}")
            feats = ModalityFeatures(arr, np.full(len(arr), arr.shape[1], np.int32), arr.mean(1))
        else:
            if modality not in self.encoders:
                raise ConfigError(f"no encoder recorded for modality {modality!r}")
            if modality not in self._built:
                self._built[modality] = build_feature_encoder(self.encoders[modality])
            enc = self._built[modality]
            items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
            tokens = []
            for s in range(0, len(items), self.encoders[modality].batch_size):
                tokens += enc.encode(items[s : s + self.encoders[modality].batch_size])
            feats = ModalityFeatures.from_token_list(tokens, dtype=np.float32)
        expected = self.connector.cfg.modalities.get(modality)
        if expected is not None and feats.dim != expected:
            raise ConfigError(
                f"{modality} features have width {feats.dim}, the connector expects {expected}"
            )
        return feats

    def embed_query(
        self, modality: str, inputs: Any, target: str | None = None, space: Space | None = None
    ) -> np.ndarray:
        """(n, D) float32 unit vectors: one connector pass per query."""
        direction = self._direction(modality, target, as_source=True)
        feats = self.features(modality, inputs)
        return query_embeddings(
            self.connector, direction, feats, space or self.default_space()
        ).numpy()

    def embed_gallery(
        self, modality: str, inputs: Any, source: str | None = None, space: Space | None = None
    ) -> np.ndarray:
        """(n, D) float32 unit vectors to store; only the pooled latent is needed."""
        direction = self._direction(modality, source, as_source=False)
        pooled = torch.as_tensor(np.asarray(self.features(modality, inputs).pooled, np.float32))
        return gallery_embeddings(
            self.connector, direction, pooled, space or self.default_space()
        ).numpy()

    def dim(self, direction: Direction, space: Space | None = None) -> int:
        """Width of the vectors of ``direction`` in ``space`` (for the vector store)."""
        space = space or self.default_space()
        return (
            self.connector.cfg.hidden
            if space == "cl"
            else self.connector.cfg.modalities[direction[1]]
        )
