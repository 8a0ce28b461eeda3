"""Reading foreign checkpoint folders: lazy ``.bin`` state dicts and the imported :class:`Source`.

``.bin`` files are read with ``torch.load(weights_only=True)`` (never a full unpickle) through
a read-only memory map, behind the same ``safe_open``-like calls :class:`Source` makes for
safetensors, so importers treat both formats alike.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from mmcompose.compose.sources import Source, read_json
from mmcompose.errors import CheckpointError
from mmcompose.io import SAFE_INDEX, SAFE_WEIGHTS, weight_files
from mmcompose.model.config import MMConfig

BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}


class _BinFile:
    """A ``.bin`` state dict behind the ``safe_open`` calls that :class:`Source` makes.

    ``torch.load(mmap=True)`` maps the file instead of reading it, so tensors are paged in only
    when used; a legacy (pre-zip) pickle cannot be mapped and is loaded whole, once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors = _load_bin(path)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_tensor(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path} holds no tensor {name!r}") from None

    def get_slice(self, name: str) -> _BinFile._Slice:
        return self._Slice(self.get_tensor(name))

    class _Slice:
        def __init__(self, t: Tensor) -> None:
            self.t = t

        def get_shape(self) -> list[int]:
            return list(self.t.shape)

        def get_dtype(self) -> str:
            return _DTYPE_NAMES.get(self.t.dtype, str(self.t.dtype).removeprefix("torch."))


def _load_bin(path: Path) -> dict[str, Tensor]:
    errors = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except errors as e:
        raise CheckpointError(
            f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="the file is truncated, corrupt or not a PyTorch state dict",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat state dict of tensors")
    return state


class ImportedSource(Source):
    """A :class:`Source` that also reads ``.bin`` files and remembers what it left out."""

    def __init__(self, path: str | Path, config: MMConfig, kind: str) -> None:
        super().__init__(path, config)
        self.kind = kind
        self.dropped: dict[str, str] = {}  # stored key -> why it was not imported
        self.base_model: str | None = None  # modelcompose: the base LLM the adapters need

    def _handle(self, file: Path):
        if file.suffix in (".bin", ".pt", ".pth"):
            h = self._handles.get(file)
            if h is None:
                h = self._handles[file] = _BinFile(file)
            return h
        return super()._handle(file)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Name -> file for a HF weight folder: safetensors (single/sharded) or ``.bin`` shards."""
    if (folder / SAFE_INDEX).is_file() or (folder / SAFE_WEIGHTS).is_file():
        return weight_files(folder)
    if (folder / BIN_INDEX).is_file():
        wmap = read_json(folder / BIN_INDEX).get("weight_map")
        if not isinstance(wmap, dict):
            raise CheckpointError(f"{folder / BIN_INDEX} has no weight_map")
        missing = sorted({f for f in wmap.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{folder} lacks shard(s) {', '.join(missing)} named in {BIN_INDEX}",
                hint="the download or copy is incomplete; fetch the missing files",
            )
        return {k: folder / f for k, f in wmap.items()}
    if (folder / BIN_WEIGHTS).is_file():
        return dict.fromkeys(_BinFile(folder / BIN_WEIGHTS).keys(), folder / BIN_WEIGHTS)
    raise CheckpointError(
        f"{folder} holds no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX})"
    )


def file_keys(file: Path) -> list[str]:
    """The tensor names in one ``.safetensors`` or ``.bin`` file."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(
                f"cannot read {file}: {e}", hint="the file is truncated or not safetensors"
            ) from None
    return _BinFile(file).keys()
