"""Reading what users give us, failing with one clear error: JSON and YAML files, and weight
files as sharded safetensors in Hugging Face's layout (index + size-capped shards).

Every config, processor config, manifest and weight file goes through these readers, so a
file that is missing, a folder, a symlink loop, binary, malformed or truncated is named in an
:class:`~mmcompose.errors.MMComposeError` with a hint instead of a traceback.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from mmcompose.errors import CheckpointError, ConfigError, MMComposeError

if TYPE_CHECKING:  # torch is imported only where tensors are read or written
    from torch import Tensor

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def read_text(
    path: str | os.PathLike[str], what: str, error: type[MMComposeError] = ConfigError
) -> str:
    """The UTF-8 text of a user-given file; a missing file, a folder, a symlink loop, an
    unreadable or binary file raises ``error`` naming ``what`` and the path."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {p} not found", hint="check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder, not a file", hint="give the file itself") from None
    except UnicodeDecodeError:
        raise error(
            f"{what} {p} is not a text file", hint="give the JSON/YAML file, not a binary file"
        ) from None
    except OSError as e:  # symlink loop, permissions, ...
        raise error(f"cannot read {what} {p}: {e.strerror or e}", hint="check the path") from None


def load_json(
    path: str | os.PathLike[str],
    what: str,
    *,
    expect: type | tuple[type, ...] = dict,
    error: type[MMComposeError] = ConfigError,
    hint: str | None = None,
) -> Any:
    """Parse a user-given JSON file whose top level must be ``expect`` (an object by default).

    Unlike :func:`mmcompose.fs.read_json` (our own caches: unreadable means absent), every
    failure here is an ``error`` naming the file, with ``hint`` (or a generic one)."""
    text = read_text(path, what, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{what} {path} is not valid JSON: {e}",
            hint=hint or "fix the file (a JSON linter shows the spot) or restore it",
        ) from None
    if not isinstance(data, expect):
        kinds = expect if isinstance(expect, tuple) else (expect,)
        names = " or ".join(_JSON_KINDS.get(k, k.__name__) for k in kinds)
        raise error(
            f"{what} {path} must hold a JSON {names}, not {_JSON_KINDS.get(type(data), 'value')}",
            hint=hint or "the file is not the kind this command reads",
        )
    return data


def load_jsonl(
    path: str | os.PathLike[str], what: str, error: type[MMComposeError] = ConfigError
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    rows = []
    for n, line in enumerate(read_text(path, what, error).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(
                f"{path}:{n} is not JSON: {e}", hint=f"a {what} holds one JSON object per line"
            ) from None
        if not isinstance(rec, dict):
            raise error(
                f"{path}:{n} is not a JSON object", hint=f"a {what} holds one JSON object per line"
            )
        rows.append((n, rec))
    return rows


def load_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a user-given YAML config (an empty file gives None)."""
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{path} is not valid YAML: {' '.join(str(e).split())}",
            hint="check the indentation and brackets near the line named",
        ) from None
    return data


_JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
_JSON_KINDS |= {bool: "boolean", type(None): "null"}


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
    from safetensors.torch import save_file

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
        wmap = load_json(index, "safetensors index", error=CheckpointError).get("weight_map")
        if not isinstance(wmap, dict):
            raise CheckpointError(
                f"{index} is not a valid safetensors index (no weight_map)",
                hint="the download or copy is damaged; fetch the index again",
            )
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
    with open_safetensors(single, framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)


def open_safetensors(path: str | os.PathLike[str], framework: str = "pt"):
    """``safe_open`` on CPU; a truncated, damaged or non-safetensors file is a
    :class:`CheckpointError` naming it (safetensors checks the header against the size).

    ``framework="numpy"`` for names, shapes and dtypes only: ``"pt"`` imports torch (1-3 s),
    which ``mmcompose inspect`` and the early checks of every command do without."""
    try:
        return safe_open(str(path), framework=framework, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e}", hint="the file is truncated or not safetensors"
        ) from None


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of one safetensors file, with :func:`open_safetensors`' errors."""
    with open_safetensors(path) as f:
        try:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None


def check_safetensors(folder: str | os.PathLike[str]) -> None:
    """Open every safetensors file of a folder once, so a damaged one fails before work that
    a foreign loader (transformers) would start and then abort with a traceback."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open_safetensors(f, framework="numpy"):
            pass


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) file by file; only one file is open at a time."""
    by_file: dict[Path, list[str]] = {}
    for k, f in weight_files(folder).items():
        by_file.setdefault(f, []).append(k)
    for path, keys in by_file.items():
        with open_safetensors(path) as f:
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
    "check_safetensors",
    "dedupe_shared",
    "iter_tensors",
    "load_json",
    "load_jsonl",
    "load_safetensors",
    "load_state_dict",
    "load_yaml",
    "open_safetensors",
    "parse_size",
    "read_text",
    "save_state_dict",
    "tensor_bytes",
    "weight_files",
]
