"""Weight files: sharded safetensors in Hugging Face's layout (index + size-capped shards)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mmcompose.errors import CheckpointError, ConfigError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' / '500MiB' / 1000 -> bytes."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    if not m:
        raise ConfigError(f"cannot read size {size!r}", hint="write it like 2GB, 500MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving grouping of tensors into shards of at most ``max_bytes``
    (a tensor larger than the cap gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def save_state_dict(
    state: Mapping[str, Tensor],
    folder: str | Path,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write ``state`` as one file or as shards plus ``model.safetensors.index.json``."""
    folder = Path(folder)
    cap = parse_size(max_shard_size)
    groups = plan_shards(((k, t.numel() * t.element_size()) for k, t in state.items()), cap)
    files = shard_names(len(groups))
    meta = {"format": "pt"} | (metadata or {})
    for fname, keys in zip(files, groups, strict=True):
        save_file({k: state[k].contiguous() for k in keys}, str(folder / fname), metadata=meta)
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: f for f, keys in zip(files, groups, strict=True) for k in keys},
        }
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it, checking that the files exist."""
    folder = Path(folder)
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        missing = sorted({f for f in wmap.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{folder} lacks shard(s) {', '.join(missing)} named in {SAFE_INDEX}",
                hint="the download or copy is incomplete; fetch the missing files",
            )
        return {k: folder / f for k, f in wmap.items()}
    single = folder / SAFE_WEIGHTS
    if not single.is_file():
        raise CheckpointError(
            f"{folder} holds no {SAFE_WEIGHTS} or {SAFE_INDEX}",
            hint="weights must be safetensors (convert .bin files with safetensors first)",
        )
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e}", hint="the file is truncated or not safetensors"
        ) from None


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) file by file; only one file is open at a time."""
    by_file: dict[Path, list[str]] = {}
    for k, f in weight_files(folder).items():
        by_file.setdefault(f, []).append(k)
    for path, keys in by_file.items():
        with _open(path) as f:
            for k in keys:
                try:
                    yield k, f.get_tensor(k)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"cannot read tensor {k} from {path}: {e}") from None


def load_state_dict(folder: str | Path) -> dict[str, Tensor]:
    return dict(iter_tensors(folder))


def dedupe_shared(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); return (unique, alias->source)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        unique[k] = t.detach().cpu() if t.device.type != "cpu" else t.detach()
    return unique, aliases


def tensor_bytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


__all__ = [
    "dedupe_shared",
    "iter_tensors",
    "load_state_dict",
    "parse_size",
    "save_state_dict",
    "tensor_bytes",
    "weight_files",
]
