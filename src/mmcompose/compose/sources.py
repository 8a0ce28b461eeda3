"""Composition inputs, seen through one interface whatever their on-disk layout.

A :class:`Source` presents a checkpoint as if it were an mmcompose folder: an
:class:`~mmcompose.model.config.MMConfig` plus tensors under mmcompose names
(``language_model.*``, ``towers.<modality>.*``, ``...<proj>.lora.<adapter>.lora_A/B``), read
lazily one tensor at a time. Plain Hugging Face causal LMs and the layouts users already have
(LLaVA, llava-hf, ModelCompose) are adapted by importers registered with
``@register_importer``; :func:`open_source` picks the first importer whose ``detect`` accepts
the folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor

from mmcompose.errors import CheckpointError
from mmcompose.io import load_json, open_safetensors, weight_files
from mmcompose.model.config import CONFIG_NAME, SUPPORTED_LLM_TYPES, MMConfig
from mmcompose.registry import Registry

LLM_PREFIX = "language_model."

# name in the source file(s) -> (file, name in file, optional transform applied after reading)
Transform = Callable[[Tensor], Tensor]


class Source:
    """A lazily read checkpoint under mmcompose tensor names.

    Subclasses (importers) fill ``config`` and ``_entries``; reading, shapes and dtypes come
    from the safetensors headers, so opening a multi-GB source costs no memory.
    """

    kind = "mmcompose"

    def __init__(self, path: str | Path, config: MMConfig) -> None:
        self.path = Path(path)
        self.config = config
        self._entries: dict[str, tuple[Path, str, Transform | None]] = {}
        self._handles: dict[Path, object] = {}

    # -- building (for importers)
    def add(
        self, name: str, file: Path, stored_name: str, transform: Transform | None = None
    ) -> None:
        if name in self._entries:
            raise CheckpointError(f"{self.path}: two tensors map to {name!r}")
        self._entries[name] = (file, stored_name, transform)

    # -- reading
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            h = open_safetensors(file)
            self._handles[file] = h
        return h

    def get(self, name: str) -> Tensor:
        file, stored, transform = self._entries[name]
        try:
            t = self._handle(file).get_tensor(stored)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {stored} from {file}: {e}") from None
        return transform(t) if transform else t

    def shape(self, name: str) -> tuple[int, ...]:
        file, stored, transform = self._entries[name]
        if transform is not None:
            return tuple(self.get(name).shape)
        return tuple(self._handle(file).get_slice(stored).get_shape())

    def dtype(self, name: str) -> str:
        file, stored, _ = self._entries[name]
        return self._handle(file).get_slice(stored).get_dtype()

    def close(self) -> None:
        self._handles.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self._entries)} tensors)"


Detector = Callable[[Path], bool]
Opener = Callable[..., Source]
IMPORTERS: Registry[tuple[Detector, Opener]] = Registry(
    "checkpoint importer", plugins=("mmcompose.compose.importers",)
)


def register_importer(name: str, detect: Detector) -> Callable[[Opener], Opener]:
    """``@register_importer("llava", detect=fn)`` on a function ``(path) -> Source``."""

    def deco(fn: Opener) -> Opener:
        IMPORTERS.register(name)((detect, fn))
        return fn

    return deco


def read_json(path: Path) -> dict:
    """A source's JSON object (config.json, an index, a PEFT config), failing clearly."""
    return load_json(
        path,
        "source file",
        error=CheckpointError,
        hint="the source folder is damaged; restore the file from where the model came from",
    )


def open_source(path: str | Path, importer: str | None = None, **options: object) -> Source:
    """Open a composition input, detecting its layout unless ``importer`` names one.

    ``options`` go to the importer (e.g. ``base=``, ``encoders=``, ``base_vocab_size=``)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"model folder {path} does not exist", hint="check the path in the config"
        )
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}", hint="pass a model folder")
    if importer is not None:
        return IMPORTERS.get(importer)[1](path, **options)
    # Importers recognise disjoint model_types, so the order they are tried in does not matter;
    # the built-in ones go first and a plain HF or mmcompose folder imports no importer.
    found = IMPORTERS.find(lambda entry: entry[0](path))
    if found is not None:
        return found[1][1](path, **options)
    mt = read_json(path / CONFIG_NAME).get("model_type")
    raise CheckpointError(
        f"{path}: no importer recognises this checkpoint (model_type {mt!r})",
        hint=f"supported: mmcompose folders, causal LMs of type {', '.join(SUPPORTED_LLM_TYPES)}, "
        f"and importers {', '.join(IMPORTERS.names())}",
    )


# ----------------------------------------------------------------------------- built-ins
def _is_mmcompose(path: Path) -> bool:
    return read_json(path / CONFIG_NAME).get("model_type") == "mmcompose"


@register_importer("mmcompose", detect=_is_mmcompose)
def open_mmcompose(path: Path, **options: object) -> Source:
    _no_options("mmcompose", options)
    src = Source(path, MMConfig.from_dir(path))
    for name, file in weight_files(path).items():
        src.add(name, file, name)
    return src


def _is_hf_causal_lm(path: Path) -> bool:
    cfg = read_json(path / CONFIG_NAME)
    return cfg.get("model_type") in SUPPORTED_LLM_TYPES


@register_importer("hf_causal_lm", detect=_is_hf_causal_lm)
def open_hf_causal_lm(path: Path, **options: object) -> Source:
    """A plain Hugging Face LLM folder: a text-only model with no towers and no adapters."""
    _no_options("hf_causal_lm", options)
    text_config = read_json(path / CONFIG_NAME)
    src = Source(path, MMConfig.from_dict({"text_config": text_config}, source=str(path)))
    src.kind = "hf_causal_lm"
    for name, file in weight_files(path).items():
        src.add(LLM_PREFIX + name, file, name)
    return src


def _no_options(importer: str, options: dict[str, object]) -> None:
    if options:
        raise CheckpointError(
            f"the {importer} importer takes no options, got {', '.join(sorted(options))}"
        )
