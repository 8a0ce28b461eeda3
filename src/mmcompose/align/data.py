"""The alignment data: which rows pair which modalities, per split, and the directions they allow.

Groups. Latents come in groups, each a set of modalities whose rows can be paired:

- :class:`~mmcompose.align.evaluate.PairedSplit` (row-paired): row i of every modality is one
  pair. A manifest gives one per non-text modality (its records paired with their texts), and
  synthetic data one over all of its modalities.
- :class:`KeyedSplit` (key-paired): two non-text modalities from different datasets, with no
  row pairing; items with the same ``data.cross_key`` (default ``label``, the concept of the
  shared vocabulary) are positives. A batch takes source items and, for each, a target item of
  the same key drawn from (seed, step), so every epoch pairs them differently.

A direction trains and is evaluated on the first group holding both its modalities (row-paired
first). Default directions: every ordered pair of the data's modalities that a group holds,
in sorted order; a configured direction whose modality has no features, or whose modalities
no group pairs, is a :class:`ConfigError` raised from the manifests alone, before any encoder
runs. One non-text modality gives exactly the single group of earlier versions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcompose.align.config import SPLITS, AlignConfig, SyntheticData
from mmcompose.align.evaluate import (
    KS,
    PairedSplit,
    evaluate_split,
    gallery_embeddings,
    query_embeddings,
    recall_at_k,
)
from mmcompose.align.features import ModalityFeatures, build_feature_store
from mmcompose.align.moe import AltMoEConnector, direction_name
from mmcompose.errors import ConfigError
from mmcompose.io import load_jsonl

__all__ = [
    "AlignData",
    "Direction",
    "KeyedSplit",
    "Layout",
    "direction_sources",
    "evaluate_data",
    "evaluate_group",
    "load_align_data",
    "load_data",
    "manifest_layout",
    "pair_batch",
    "resolve_directions",
    "source_rows",
]

Direction = tuple[str, str]


# =========================================================================== key-paired groups
@dataclass
class KeyedSplit:
    """Items of two modalities that are not row-paired; equal ``keys`` mark positives."""

    features: dict[str, ModalityFeatures]
    keys: dict[str, np.ndarray]  # modality -> (n_m,) int keys
    ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted(self.features))

    def eligible(self, src: str, tgt: str) -> np.ndarray:
        """Source items whose key some target item shares (the only ones with a positive)."""
        return np.flatnonzero(np.isin(self.keys[src], self.keys[tgt]))

    def partners(
        self, src: str, tgt: str, src_rows: np.ndarray, seed: int, step: int
    ) -> np.ndarray:
        """For each source row a target row with the same key, drawn from (seed, step)."""
        tk = self.keys[tgt]
        order = np.argsort(tk, kind="stable")
        uniq, first, counts = np.unique(tk[order], return_index=True, return_counts=True)
        slot = np.searchsorted(uniq, self.keys[src][src_rows])
        draw = np.random.default_rng([seed, step, 0x6B6579]).random(len(src_rows))
        offset = np.minimum((draw * counts[slot]).astype(np.int64), counts[slot] - 1)
        return order[first[slot] + offset]


def source_rows(group: PairedSplit | KeyedSplit, direction: Direction) -> int:
    """How many rows a direction's batches are drawn from."""
    if isinstance(group, KeyedSplit):
        return len(group.eligible(*direction))
    return len(group)


def pair_batch(
    group: PairedSplit | KeyedSplit, direction: Direction, rows: np.ndarray, seed: int, step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source rows, target rows, keys) of a batch given as rows of :func:`source_rows`."""
    if isinstance(group, KeyedSplit):
        src, tgt = direction
        src_rows = group.eligible(src, tgt)[rows]
        return src_rows, group.partners(src, tgt, src_rows, seed, step), group.keys[src][src_rows]
    return rows, rows, group.keys[rows]


def evaluate_group(
    connector: AltMoEConnector,
    group: PairedSplit | KeyedSplit,
    directions: Sequence[Direction],
    spaces: Sequence[Any] = ("cl", "reg"),
    ks: Sequence[int] = KS,
) -> dict[str, dict[str, dict[str, float]]]:
    """As :func:`~mmcompose.align.evaluate.evaluate_split`; for a key-paired group the queries
    are the source items with a positive and the gallery every target item (class relevance)."""
    if not isinstance(group, KeyedSplit):
        return evaluate_split(connector, group, directions, spaces, ks)
    results: dict[str, dict[str, dict[str, float]]] = {s: {} for s in spaces}
    for src, tgt in directions:
        q_rows = group.eligible(src, tgt)
        if not len(q_rows):
            continue  # this split holds no shared key: nothing to measure
        pooled = torch.as_tensor(np.asarray(group.features[tgt].pooled, dtype=np.float32))
        keys_q = torch.as_tensor(group.keys[src][q_rows])
        keys_g = torch.as_tensor(group.keys[tgt])
        for space in spaces:
            queries = group.features[src].take(q_rows)
            q = query_embeddings(connector, (src, tgt), queries, space)
            g = gallery_embeddings(connector, (src, tgt), pooled, space)
            metrics = recall_at_k(q @ g.T, keys_q[:, None] == keys_g[None, :], ks)
            results[space][direction_name((src, tgt))] = {
                **metrics,
                "queries": len(q_rows),
                "gallery": len(keys_g),
            }
    return results


def evaluate_data(
    model: AltMoEConnector,
    data: AlignData,
    split: str,
    directions: list[tuple[str, str]],
    spaces: tuple[str, ...] = ("cl", "reg"),
    *,
    fallback: str | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Recall of ``directions`` on ``split``, each on its own group (``fallback`` split where
    the split lacks that group; directions with data in neither are left out), in order."""
    where: dict[Direction, tuple[str, str]] = {}  # direction -> (group, split)
    for d in directions:
        g = data.group_of(d)
        for s in (split, fallback):
            group = data.splits.get(s, {}).get(g) if g is not None and s is not None else None
            if group is not None and source_rows(group, d):
                where[d] = (g, s)
                break
    parts = {
        (g, s): evaluate_group(
            model, data.splits[s][g], [d for d in directions if where.get(d) == (g, s)], spaces
        )
        for g, s in dict.fromkeys(where.values())
    }
    results: dict[str, dict[str, dict[str, float]]] = {s: {} for s in spaces}
    for d in directions:
        for s in spaces if d in where else ():
            entry = parts[where[d]][s].get(direction_name(d))
            if entry is not None:
                results[s][direction_name(d)] = entry
    return results


def direction_sources(
    data: AlignData, split: str, directions: Sequence[Direction]
) -> dict[Direction, ModalityFeatures]:
    """Each direction's source items in ``split`` as its evaluation queries them."""
    sources: dict[Direction, ModalityFeatures] = {}
    for d in directions:
        g = data.group_of(d)
        group = data.splits.get(split, {}).get(g) if g is not None else None
        if group is None:
            continue
        rows = group.eligible(*d) if isinstance(group, KeyedSplit) else group.side_rows(d[0])
        if len(rows):
            sources[d] = group.features[d[0]].take(rows)
    return sources


# =========================================================================== the data
@dataclass
class AlignData:
    """Groups per split (``splits[split][group name]``) and the feature stores they came from."""

    splits: dict[str, dict[str, PairedSplit | KeyedSplit]]
    stores: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_paired(cls, splits: dict[str, PairedSplit]) -> AlignData:
        """One row-paired group (the form ``train_connector`` took before groups)."""
        return cls({s: {"pairs": p} for s, p in splits.items()})

    @property
    def train(self) -> dict[str, PairedSplit | KeyedSplit]:
        return self.splits["train"]

    def dims(self) -> dict[str, int]:
        dims: dict[str, int] = {}
        for group in self.train.values():
            for m, f in group.features.items():
                dims.setdefault(m, f.dim)
        return dict(sorted(dims.items()))

    def group_of(self, direction: Direction) -> str | None:
        """The train group that pairs ``direction`` (row-paired groups first)."""
        ranked = sorted(self.train.items(), key=lambda kv: isinstance(kv[1], KeyedSplit))
        for name, group in ranked:
            if set(direction) <= set(group.features):
                return name
        return None

    def layout(self) -> Layout:
        return Layout(
            tuple(self.dims()),
            frozenset(frozenset(g.features) for g in self.train.values()),
            "data",
        )


@dataclass(frozen=True)
class Layout:
    """What the data can pair, known before any encoder runs."""

    modalities: tuple[str, ...]
    groups: frozenset[frozenset[str]]  # each group's modalities
    origin: str  # for messages: "data.synthetic.dims" or the dataset names

    def pairs(self, direction: Direction) -> bool:
        return any(set(direction) <= g for g in self.groups)

    def available(self) -> list[Direction]:
        ms = sorted(self.modalities)
        return [(a, b) for a in ms for b in ms if a != b and self.pairs((a, b))]


def resolve_directions(
    configured: Iterable[Sequence[str]] | None, layout: Layout, cross_key: str | None = None
) -> list[Direction]:
    """The configured directions checked against the data, or every pairable ordered pair."""
    if configured is None:
        return layout.available()
    out: list[Direction] = []
    for d in configured:
        src, tgt = str(d[0]), str(d[1])
        for m in (src, tgt):
            if m not in layout.modalities:
                raise ConfigError(
                    f"direction {src}->{tgt}: modality {m!r} has no features; the data "
                    f"({layout.origin}) hold {', '.join(layout.modalities)}",
                    hint=f"add data of modality {m!r} to the config, or drop the direction",
                )
        if not layout.pairs((src, tgt)):
            how = (
                f"records of both with the same {cross_key!r} in the train split"
                if cross_key
                else "data.cross_key (unset)"
            )
            raise ConfigError(
                f"direction {src}->{tgt}: no paired data; {src} and {tgt} pair only through {how}",
                hint="set data.cross_key to a field both modalities' records share (e.g. label)",
            )
        out.append((src, tgt))
    return out


# =========================================================================== synthetic
def _stream(seed: int, *parts: object) -> np.random.Generator:
    text = "\x1f".join(str(p) for p in (seed, *parts))
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def _synthetic(cfg: SyntheticData, seed: int) -> dict[str, PairedSplit]:
    rng = np.random.default_rng(seed)
    dims = cfg.dims.items()
    if cfg.independent:
        maps = {m: _stream(seed, "map", m).normal(size=(cfg.rank, d)) for m, d in dims}
    else:
        maps = {m: rng.normal(size=(cfg.rank, d)) for m, d in dims}
    maps = {m: w / math.sqrt(cfg.rank) for m, w in maps.items()}
    splits: dict[str, PairedSplit] = {}
    start = 0
    for split, n in cfg.sizes.items():
        z = (_stream(seed, "z", split) if cfg.independent else rng).normal(size=(n, cfg.rank))
        feats = {}
        for m, w in maps.items():
            t = cfg.tokens.get(m, 4)
            noise_rng = _stream(seed, "noise", m, split) if cfg.independent else rng
            tokens = (z @ w)[:, None, :] + cfg.noise * noise_rng.normal(size=(n, t, w.shape[1]))
            feats[m] = ModalityFeatures.from_token_list(list(tokens.astype(np.float32)))
        ids = [f"{split}/{i}" for i in range(n)]
        splits[split] = PairedSplit(feats, np.arange(start, start + n), ids)
        start += n
    return splits


def synthetic_layout(cfg: SyntheticData) -> Layout:
    return Layout(tuple(sorted(cfg.dims)), frozenset({frozenset(cfg.dims)}), "data.synthetic.dims")


# =========================================================================== manifests
def _manifest_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".jsonl" or path.is_file():
        return path
    from mmcompose.assets.cache import cache_dir

    manifest = cache_dir() / "datasets" / name / "manifest.jsonl"
    if not manifest.is_file():
        from mmcompose.assets.datasets import prepare_datasets

        prepare_datasets([name])
    return manifest


def _read_records(datasets: list[str]) -> list[dict[str, Any]]:
    records = []
    for name in datasets:
        records += [rec for _, rec in load_jsonl(_manifest_path(name), "manifest")]
    return records


def _cross_groups(
    records: list[dict[str, Any]], media: list[str], cross_key: str | None
) -> list[frozenset[str]]:
    """Pairs of non-text modalities sharing a cross key value in the train split."""
    if not cross_key:
        return []
    train_keys = {
        m: {
            str(r[cross_key])
            for r in records
            if r["modality"] == m and r.get("split") == "train" and cross_key in r
        }
        for m in media
    }
    return [
        frozenset((a, b))
        for i, a in enumerate(media)
        for b in media[i + 1 :]
        if train_keys[a] & train_keys[b]
    ]


def manifest_layout(records: list[dict[str, Any]], cfg: AlignConfig) -> Layout:
    media = sorted({str(r["modality"]) for r in records})
    groups = [frozenset((m, "text")) for m in media]
    groups += _cross_groups(records, media, cfg.data.cross_key) if len(media) > 1 else []
    return Layout(tuple(sorted({*media, "text"})), frozenset(groups), ", ".join(cfg.data.datasets))


def _check_records(records: list[dict[str, Any]], cfg: AlignConfig, needed: set[str]) -> None:
    key_field = cfg.data.match_key or cfg.data.text_field
    for m in sorted(needed):
        if m not in cfg.encoders:
            raise ConfigError(f"no encoder configured for modality {m!r} (encoders.{m})")
    missing = [r["id"] for r in records if not r.get(cfg.data.text_field) or key_field not in r]
    if missing:
        raise ConfigError(
            f"{len(missing)} records lack {cfg.data.text_field!r} or {key_field!r}, e.g. {missing[0]}"
        )


def _manifest_data(
    cfg: AlignConfig,
    records: list[dict[str, Any]],
    directions: list[Direction],
    progress: bool,
) -> AlignData:
    needed = {m for d in directions for m in d}
    media = sorted(needed - {"text"})
    if not media:
        raise ConfigError("the configured directions name no non-text modality")
    recs = [r for r in records if r["modality"] in media]  # the modalities trained (default all)
    _check_records(recs, cfg, needed)
    ids, root = [r["id"] for r in recs], cfg.feature_root
    rows_of = {m: np.array([i for i, r in enumerate(recs) if r["modality"] == m]) for m in media}
    stores = {
        m: build_feature_store(
            cfg.encoders[m],
            [ids[i] for i in rows_of[m]],
            [recs[i]["path"] for i in rows_of[m]],
            root,
            progress=progress,
        )
        for m in media
    }
    text_field = cfg.data.text_field
    stores["text"] = build_feature_store(
        cfg.encoders["text"], ids, [r[text_field] for r in recs], root, progress=progress
    )
    text = stores["text"].features()
    key_field = cfg.data.match_key or text_field
    key_of = {k: i for i, k in enumerate(sorted({str(r[key_field]) for r in recs}))}
    keys = np.array([key_of[str(r[key_field])] for r in recs])
    splits: dict[str, dict[str, PairedSplit | KeyedSplit]] = {s: {} for s in SPLITS}
    for m in media:
        rows = rows_of[m]
        whole = len(rows) == len(recs)  # one modality: the store's rows are the records'
        feats = {m: stores[m].features(), "text": text if whole else text.take(rows)}
        full = PairedSplit(feats, keys[rows], [ids[i] for i in rows], frozenset({"text"}))
        for split in SPLITS:
            pos = np.array(
                [p for p, i in enumerate(rows) if recs[i].get("split") == split], dtype=np.int64
            )
            if len(pos):
                splits[split][f"{m}+text"] = full.take(pos)
        if f"{m}+text" not in splits["train"]:
            extra = f" for modality {m!r}" if len(media) > 1 else ""
            raise ConfigError(f"the datasets have no train split{extra}")
    cross = cfg.data.cross_key
    pairs = [p for p in _cross_groups(recs, media, cross) if any(set(d) == p for d in directions)]
    if pairs and cross:
        vocab = {k: i for i, k in enumerate(sorted({str(r[cross]) for r in recs if cross in r}))}
        for pair in pairs:
            a, b = sorted(pair)
            for split in SPLITS:
                sides = {}
                for m in (a, b):
                    pos = np.array(
                        [p for p, i in enumerate(rows_of[m])
                         if recs[i].get("split") == split and cross in recs[i]],
                        dtype=np.int64,
                    )  # fmt: skip
                    sides[m] = pos
                if all(len(pos) for pos in sides.values()):
                    splits[split][f"{a}+{b}"] = KeyedSplit(
                        {m: stores[m].features().take(pos) for m, pos in sides.items()},
                        {
                            m: np.array([vocab[str(recs[rows_of[m][p]][cross])] for p in pos])
                            for m, pos in sides.items()
                        },
                        {m: [ids[rows_of[m][p]] for p in pos] for m, pos in sides.items()},
                    )
    return AlignData(
        {s: g for s, g in splits.items() if g}, {m: str(st.path) for m, st in stores.items()}
    )


def load_align_data(
    cfg: AlignConfig,
    progress: bool = True,
    *,
    check: Any = None,
) -> tuple[AlignData, list[Direction]]:
    """The data and the directions to train, checked against each other before encoding.

    ``check(layout, directions)`` runs after the directions are resolved and before any
    feature store is built (a continuation checks the connector it extends there)."""
    if cfg.data.kind == "synthetic":
        layout = synthetic_layout(cfg.data.synthetic)
        directions = resolve_directions(cfg.directions, layout, None)
        if check is not None:
            check(layout, directions)
        return AlignData.from_paired(_synthetic(cfg.data.synthetic, cfg.seed)), directions
    records = _read_records(cfg.data.datasets)
    layout = manifest_layout(records, cfg)
    directions = resolve_directions(cfg.directions, layout, cfg.data.cross_key)
    if not directions:
        raise ConfigError(f"the data ({layout.origin}) allow no direction")
    if check is not None:
        check(layout, directions)
    return _manifest_data(cfg, records, directions, progress), directions


def load_data(
    cfg: AlignConfig, progress: bool = True
) -> tuple[dict[str, PairedSplit], dict[str, str]]:
    """Splits of row-aligned features and {modality: feature store path} (empty if synthetic),
    for data of one group (synthetic, or one non-text modality); see :func:`load_align_data`."""
    data, _ = load_align_data(cfg, progress)
    names = {n for groups in data.splits.values() for n in groups}
    if len(names) != 1:
        raise ConfigError(
            f"the data form {len(names)} groups ({', '.join(sorted(names))}); "
            "use load_align_data for several modalities"
        )
    (name,) = names
    return {s: g[name] for s, g in data.splits.items() if name in g}, data.stores
