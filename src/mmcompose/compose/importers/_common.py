"""Helpers the format importers share: config translation, projector checks, encoder choice.

Each format module (``llava``, ``llava_hf``, ``modelcompose``) maps its keys itself and uses
these for what the layouts have in common: LLaVA-style configs and projectors, vocabulary
trimming, and resolving a tower's encoder (a CLIP folder, a substitute, or ``unavailable``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mmcompose.compose.importers.bin_reader import ImportedSource, checkpoint_files, file_keys
from mmcompose.compose.sources import Transform, read_json
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.model.clip import clip_state_prefix, clip_vision_spec
from mmcompose.model.config import CONFIG_NAME, ModuleSpec
from mmcompose.model.encoders import ENCODERS, build_encoder
from mmcompose.model.media import ImageProcessing

# An encoder given to an importer: a local HF CLIP folder, or (spec, safetensors state dict).
EncoderChoice = str | Path | tuple[ModuleSpec, str | Path]
_CONFIG_DTYPES = ("float32", "float16", "bfloat16")


def fail_unknown(path: Path, keys: Iterable[str], layout: str) -> None:
    keys = sorted(keys)
    if keys:
        raise CheckpointError(
            f"{path}: {len(keys)} tensor(s) the {layout} importer does not know, e.g. {keys[:5]}",
            hint="this layout variant is not supported; nothing is dropped silently",
        )


def config_dtype(cfg: Mapping[str, Any]) -> str:
    d = cfg.get("torch_dtype") or cfg.get("dtype")
    return d if d in _CONFIG_DTYPES else "float32"


def check_vocab(path: Path, text_config: dict[str, Any], base_vocab_size: int | None) -> None:
    """Apply ``base_vocab_size`` to the LLM config: ``vocab_size`` becomes it, and a
    ``pad_token_id`` among the dropped rows (llava-hf's added ``<pad>``) becomes None, since
    no kept row is that token (padding is masked, so its id is never embedded; the LLM's
    embedding could not even be built with it). A BOS or EOS id among the dropped rows is an
    error: the trimmed model could neither start nor stop like the checkpoint."""
    if base_vocab_size is None:
        return
    vocab = text_config.get("vocab_size")
    if not isinstance(vocab, int) or not 0 < base_vocab_size <= vocab:
        raise ConfigError(
            f"{path}: base_vocab_size {base_vocab_size} must be in 1..{vocab} (the checkpoint's)"
        )
    for key in ("bos_token_id", "eos_token_id"):
        ids = text_config.get(key)
        dropped = [
            i for i in (ids if isinstance(ids, list) else [ids]) if _past(i, base_vocab_size)
        ]
        if dropped:
            raise ConfigError(
                f"{path}: base_vocab_size {base_vocab_size} drops the {key} {dropped}",
                hint="base_vocab_size is the base LLM's vocabulary size; the tokens it keeps "
                "must include the special tokens the checkpoint starts and stops with",
            )
    text_config["vocab_size"] = base_vocab_size
    if _past(text_config.get("pad_token_id"), base_vocab_size):
        text_config["pad_token_id"] = None


def _past(token_id: object, n: int) -> bool:
    return isinstance(token_id, int) and token_id >= n


def image_processing(folder: Path | None, pad_to_square: bool = False) -> ImageProcessing | None:
    """A checkpoint's CLIP image-processor settings: ``preprocessor_config.json``, or the
    ``image_processor`` block of transformers 5's ``processor_config.json``; with LLaVA's
    pad-to-square when its ``image_aspect_ratio`` is ``pad``. None: CLIP's defaults."""
    found: tuple[Path, dict] | None = None
    if folder is not None:
        pre, proc = folder / "preprocessor_config.json", folder / "processor_config.json"
        if pre.is_file():
            found = pre, read_json(pre)
        elif proc.is_file() and isinstance(read_json(proc).get("image_processor"), dict):
            found = proc, read_json(proc)["image_processor"]
    if found is not None:
        return ImageProcessing.from_hf(found[1], str(found[0]), pad_to_square=pad_to_square)
    return ImageProcessing(pad_to_square=True) if pad_to_square else None


def llava_pads(cfg: Mapping[str, Any]) -> bool:
    """LLaVA-1.5's ``image_aspect_ratio: pad``: images are padded to a square first."""
    return cfg.get("image_aspect_ratio") == "pad"


def vocab_transform(name: str, base_vocab_size: int | None) -> Transform | None:
    """Keep the first ``base_vocab_size`` rows of the embeddings and LM head (added tokens go)."""
    if base_vocab_size is None or not name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return None
    n = base_vocab_size
    return lambda t: t[:n]


def mlp_projector(kind: str, path: Path, extra: str = "") -> ModuleSpec:
    """LLaVA's ``mm_projector_type`` ('linear', 'mlp<N>x_gelu') -> a registered projector."""
    if kind == "linear":
        return ModuleSpec(name="linear")
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m:
        depth = int(m.group(1))
        return ModuleSpec(name="mlp2x_gelu", params={} if depth == 2 else {"depth": depth})
    raise CheckpointError(
        f"{path}: unsupported projector type {kind!r}",
        hint=f"supported: linear, mlp<N>x_gelu{extra}",
    )


def _projector_keys(spec: ModuleSpec) -> set[str]:
    if spec.name == "linear":
        return {"weight", "bias"}
    depth = spec.params.get("depth", 2)
    return {f"{2 * i}.{p}" for i in range(depth) for p in ("weight", "bias")}


def check_projector(path: Path, modality: str, spec: ModuleSpec, got: Iterable[str]) -> None:
    got = set(got)
    if not got:
        raise CheckpointError(
            f"{path}: the {modality} projector's weights are missing",
            hint="the checkpoint is incomplete (projector-less LLaVA/ModelCompose files are "
            "not supported)",
        )
    want = _projector_keys(spec) if spec.name in ("linear", "mlp2x_gelu") else got
    if got != want:
        raise CheckpointError(
            f"{path}: the {modality} projector ({spec.name}) expects tensors {sorted(want)}, "
            f"found {sorted(got)}",
            hint="check mm_projector_type in config.json against the weights",
        )


def add_encoder(
    src: ImportedSource,
    modality: str,
    choice: EncoderChoice | None,
    origin: str,
    output_dim: int,
    clip_select: tuple[int, str] = (-2, "default"),
    pad_to_square: bool = False,
) -> ModuleSpec:
    """Resolve a tower's encoder: a CLIP folder, (spec, weights), or ``unavailable``.
    A CLIP folder's own image processor settings come with it (``pad_to_square`` added)."""
    if choice is None:
        local = Path(origin)
        if modality == "image" and origin and (local / CONFIG_NAME).is_file():
            choice = local
    if choice is None:
        return ModuleSpec(
            name="unavailable",
            params={
                "modality": modality,
                "origin": origin or "(unnamed)",
                "output_dim": output_dim,
                "hint": f"re-import {src.path} with encoders={{'{modality}': PATH}} (a local "
                f"copy of {origin!r}) or encoders={{'{modality}': (ModuleSpec, "
                "weights.safetensors)}}",
            },
        )
    if isinstance(choice, tuple):
        return _add_substitute_encoder(src, modality, choice, output_dim)
    if modality != "image":
        raise ConfigError(
            f"a folder is only accepted for the image encoder (CLIP); for {modality} pass "
            "(ModuleSpec, weights.safetensors)"
        )
    return _add_clip_folder(src, Path(choice), output_dim, clip_select, pad_to_square)


def _add_clip_folder(
    src: ImportedSource,
    folder: Path,
    output_dim: int,
    select: tuple[int, str],
    pad_to_square: bool = False,
) -> ModuleSpec:
    cfg = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
    mt = cfg.get("model_type")
    vc = cfg.get("vision_config") if mt == "clip" else cfg if mt == "clip_vision_model" else None
    if not isinstance(vc, dict):
        raise CheckpointError(
            f"{folder} is not a Hugging Face CLIP folder (config model_type {mt!r})",
            hint="pass a local copy of the CLIP model the checkpoint names (mm_vision_tower)",
        )
    spec = clip_vision_spec(vc, *select, image_processing(folder, pad_to_square))
    check_dim(folder, "image", spec.params["vision_config"]["hidden_size"], output_dim)
    files = checkpoint_files(folder)
    prefix = "towers.image.encoder.clip." + clip_state_prefix()
    for key, file in files.items():
        if key.startswith("vision_model."):
            src.add(prefix + key.removeprefix("vision_model."), file, key)
        elif mt == "clip_vision_model" and key.startswith(_CLIP_VISION_ROOTS):
            src.add(prefix + key, file, key)  # CLIPVisionModel saved by transformers 5
        else:
            src.dropped[f"{folder.name}/{key}"] = "CLIP text side or projection (not used)"
    if not any(k.startswith(prefix) for k in src):
        raise CheckpointError(f"{folder}: no CLIP vision-tower weights found")
    return spec


# Top-level modules of CLIP's vision transformer (transformers 5 saves a CLIPVisionModel
# without the ``vision_model.`` prefix that transformers 4 wrote).
_CLIP_VISION_ROOTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _add_substitute_encoder(
    src: ImportedSource, modality: str, choice: tuple[ModuleSpec, str | Path], output_dim: int
) -> ModuleSpec:
    spec, weights = choice
    with torch.device("meta"):
        enc = build_encoder(spec)
    if ENCODERS.get(spec.name).modality != modality:
        raise ConfigError(f"encoder {spec.name!r} does not take {modality} input")
    check_dim(Path(str(weights)), modality, enc.output_dim, output_dim)
    weights = Path(weights)
    want = set(enc.state_dict())
    got = set(file_keys(weights))
    if got != want:
        raise CheckpointError(
            f"{weights} does not match encoder {spec.name!r}: missing {sorted(want - got)[:5]}, "
            f"unexpected {sorted(got - want)[:5]}"
        )
    for key in sorted(got):
        src.add(f"towers.{modality}.encoder.{key}", weights, key)
    return spec


def check_dim(where: Path, modality: str, enc_dim: int, proj_in: int) -> None:
    if enc_dim != proj_in:
        raise ConfigError(
            f"{where}: the {modality} encoder outputs {enc_dim} features but the projector "
            f"takes {proj_in}",
            hint="choose the encoder the checkpoint was trained with",
        )


def llm_config(cfg: Mapping[str, Any], model_type: str, drop: Callable[[str], bool]) -> dict:
    text = {k: v for k, v in cfg.items() if not drop(k)}
    text["model_type"] = model_type
    text["architectures"] = [ARCHS[model_type]]
    return text


ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LLAVA_ONLY_KEYS = {
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "_name_or_path",
}


def is_llava_only(key: str) -> bool:
    """A LLaVA config key that is not part of the LLM's own config."""
    return key.startswith("mm_") or key in _LLAVA_ONLY_KEYS


def first_weight(spec: ModuleSpec) -> str:
    """The projector's first weight (its second dimension is the input size)."""
    return "weight" if spec.name == "linear" else "0.weight"
