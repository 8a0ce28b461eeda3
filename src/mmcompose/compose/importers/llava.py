"""Importer for haotian-liu/LLaVA checkpoints (``model_type`` llava_llama/_mistral/_qwen).

Full LLM weights, ``model.mm_projector`` and, only when the tower was unfrozen, the CLIP tower
named by ``mm_vision_tower`` (see :mod:`mmcompose.compose.importers` for the key mapping).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmcompose.compose.importers._common import (
    EncoderChoice,
    add_encoder,
    check_dim,
    check_projector,
    check_vocab,
    config_dtype,
    fail_unknown,
    first_weight,
    image_processing,
    is_llava_only,
    llava_pads,
    llm_config,
    mlp_projector,
    vocab_transform,
)
from mmcompose.compose.importers.bin_reader import ImportedSource, checkpoint_files
from mmcompose.compose.sources import LLM_PREFIX, read_json, register_importer
from mmcompose.errors import CheckpointError
from mmcompose.model.clip import clip_state_prefix, clip_vision_spec
from mmcompose.model.config import CONFIG_NAME, MMConfig, ModuleSpec, TowerConfig

_LLAVA_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
# Vision configs of the towers LLaVA names, for checkpoints that embed the tower's weights.
KNOWN_CLIP_TOWERS: dict[str, dict[str, Any]] = {
    name: {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": size,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    for name, size in (
        ("openai/clip-vit-large-patch14-336", 336),
        ("openai/clip-vit-large-patch14", 224),
    )
}


def _is_llava(path: Path) -> bool:
    return read_json(path / CONFIG_NAME).get("model_type") in _LLAVA_TYPES


@register_importer("llava", detect=_is_llava)
def open_llava(
    path: Path,
    *,
    encoders: Mapping[str, EncoderChoice] | None = None,
    base_vocab_size: int | None = None,
) -> ImportedSource:
    """haotian-liu/LLaVA checkpoints (``LlavaLlamaForCausalLM`` and siblings): full LLM weights,
    ``model.mm_projector``, and the CLIP tower named by ``mm_vision_tower`` (usually absent)."""
    path = Path(path)
    cfg = read_json(path / CONFIG_NAME)
    llm_type = _LLAVA_TYPES.get(cfg.get("model_type", ""))
    if llm_type is None:
        raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not LLaVA")
    if (
        cfg.get("mm_patch_merge_type", "flat") != "flat"
        or cfg.get("image_aspect_ratio") == "anyres"
    ):
        raise CheckpointError(f"{path}: LLaVA-NeXT 'anyres' checkpoints are not supported")
    text = llm_config(cfg, llm_type, is_llava_only)
    check_vocab(path, text, base_vocab_size)
    proj = mlp_projector(cfg.get("mm_projector_type", "linear"), path)
    src = ImportedSource(path, MMConfig(text_config=text), kind="llava")
    files = checkpoint_files(path)
    unknown, proj_keys, vision_keys = [], [], {}
    for key, file in files.items():
        if key.startswith("model.mm_projector."):
            proj_keys.append(key.removeprefix("model.mm_projector."))
            src.add("towers.image.projector." + proj_keys[-1], file, key)
        elif key.startswith("model.vision_tower.vision_tower.vision_model."):
            vision_keys[key.removeprefix("model.vision_tower.vision_tower.vision_model.")] = file
        elif key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")):
            src.add(LLM_PREFIX + key, file, key, vocab_transform(key, base_vocab_size))
        elif key.endswith("rotary_emb.inv_freq"):
            src.dropped[key] = "rotary buffer, recomputed from the config"
        else:
            unknown.append(key)
    fail_unknown(path, unknown, "llava")
    check_projector(path, "image", proj, proj_keys)
    d_enc = int(
        cfg.get("mm_hidden_size") or src.shape("towers.image.projector." + first_weight(proj))
    )
    origin = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    select = (
        int(cfg.get("mm_vision_select_layer", -1)),
        "full" if cfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default",
    )
    choice = (encoders or {}).get("image")
    pad = llava_pads(cfg)
    if vision_keys and choice is None:
        enc = _add_embedded_clip(src, path, origin, vision_keys, d_enc, select, pad)
    else:
        enc = add_encoder(src, "image", choice, origin, d_enc, select, pad)
        src.dropped.update(dict.fromkeys(vision_keys, "replaced by the encoder given"))
    tower = TowerConfig(modality="image", encoder=enc, projector=proj)
    src.config = MMConfig(text_config=text, towers=[tower], dtype=config_dtype(cfg))
    return src


def _add_embedded_clip(
    src: ImportedSource,
    path: Path,
    origin: str,
    keys: Mapping[str, Path],
    d_enc: int,
    select: tuple[int, str],
    pad_to_square: bool,
) -> ModuleSpec:
    """A LLaVA checkpoint that saved its (unfrozen) CLIP tower: the config must be known
    (its image processor is CLIP's at the tower's size, as those towers ship it)."""
    vc = KNOWN_CLIP_TOWERS.get(origin.rstrip("/"))
    if vc is None:
        raise CheckpointError(
            f"{path}: the checkpoint holds vision-tower weights but {origin!r} is not a known "
            "CLIP tower, so its architecture is unknown",
            hint="pass encoders={'image': PATH} with a local copy of that CLIP model",
        )
    spec = clip_vision_spec(vc, *select, image_processing(None, pad_to_square))
    check_dim(path, "image", vc["hidden_size"], d_enc)
    prefix = "towers.image.encoder.clip." + clip_state_prefix()
    for name, file in keys.items():
        src.add(prefix + name, file, "model.vision_tower.vision_tower.vision_model." + name)
    return spec
