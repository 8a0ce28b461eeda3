"""Importer for transformers' ``LlavaForConditionalGeneration`` folders (``model_type`` llava).

The LLM, ``multi_modal_projector`` and the CLIP tower are all in the checkpoint, under any of
the three key layouts transformers has saved (see :func:`_llava_hf_name`).
"""

from __future__ import annotations

from pathlib import Path

from mmcompose.compose.importers._common import (
    ARCHS,
    check_dim,
    check_projector,
    check_vocab,
    config_dtype,
    fail_unknown,
    image_processing,
    vocab_transform,
)
from mmcompose.compose.importers.bin_reader import ImportedSource, checkpoint_files
from mmcompose.compose.sources import LLM_PREFIX, read_json, register_importer
from mmcompose.errors import CheckpointError
from mmcompose.model.clip import clip_state_prefix, clip_vision_spec
from mmcompose.model.config import CONFIG_NAME, MMConfig, ModuleSpec, TowerConfig


def _is_llava_hf(path: Path) -> bool:
    return read_json(path / CONFIG_NAME).get("model_type") == "llava"


_HF_VISION_PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
)


def _llava_hf_name(key: str) -> tuple[str, str] | None:
    """Stored llava-hf key -> (part, rest) for part in llm/projector/vision; None = unknown.

    Pre-4.52 (``language_model.model.*``), post-4.52 (``model.language_model.*``) and
    transformers 5's own save (pre-4.52 prefixes, CLIP without ``vision_model.``) all land here.
    """
    for old, new in (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
    ):
        if key.startswith(old):
            return "llm", new + key.removeprefix(old)
    for p in ("model.multi_modal_projector.", "multi_modal_projector."):
        if key.startswith(p):
            rest = key.removeprefix(p)
            for hf, ours in (("linear_1.", "0."), ("linear_2.", "2.")):
                if rest.startswith(hf):
                    return "projector", ours + rest.removeprefix(hf)
            return None
    for p in _HF_VISION_PREFIXES:
        if key.startswith(p):
            return "vision", key.removeprefix(p)
    return None


@register_importer("llava_hf", detect=_is_llava_hf)
def open_llava_hf(path: Path, *, base_vocab_size: int | None = None) -> ImportedSource:
    """transformers' ``LlavaForConditionalGeneration`` folders, any of the three key layouts."""
    from transformers import AutoConfig

    path = Path(path)
    cfg = read_json(path / CONFIG_NAME)
    tc, vc = dict(cfg.get("text_config") or {}), dict(cfg.get("vision_config") or {})
    tc.setdefault("model_type", "llama")
    if tc["model_type"] not in ARCHS:
        raise CheckpointError(f"{path}: LLM type {tc['model_type']!r} is not supported")
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(
            f"{path}: vision tower {vc.get('model_type')!r} is not supported (CLIP only)"
        )
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise CheckpointError(
            f"{path}: unsupported projector (activation {act!r}, bias "
            f"{cfg.get('multimodal_projector_bias', True)})",
            hint="mmcompose's mlp2x_gelu is Linear+bias, exact GELU, Linear+bias",
        )
    layer, strategy = cfg.get("vision_feature_layer", -2), cfg.get("vision_feature_select_strategy")
    if not isinstance(layer, int) or strategy not in ("default", "full"):
        raise CheckpointError(
            f"{path}: vision_feature_layer {layer!r} / select strategy {strategy!r} unsupported",
            hint="one feature layer and 'default' or 'full' selection are supported",
        )
    text = AutoConfig.for_model(**tc).to_dict()
    text["architectures"] = [ARCHS[tc["model_type"]]]
    check_vocab(path, text, base_vocab_size)
    enc = clip_vision_spec(vc, layer, strategy, image_processing(path))
    src = ImportedSource(path, MMConfig(text_config=text), kind="llava_hf")
    clip_prefix = "towers.image.encoder.clip." + clip_state_prefix()
    unknown, proj_keys = [], []
    for key, file in checkpoint_files(path).items():
        hit = _llava_hf_name(key)
        if hit is None:
            unknown.append(key)
        elif hit[0] == "llm":
            src.add(LLM_PREFIX + hit[1], file, key, vocab_transform(hit[1], base_vocab_size))
        elif hit[0] == "projector":
            proj_keys.append(hit[1])
            src.add("towers.image.projector." + hit[1], file, key)
        else:
            src.add(clip_prefix + hit[1], file, key)
    fail_unknown(path, unknown, "llava_hf")
    proj = ModuleSpec(name="mlp2x_gelu")
    check_projector(path, "image", proj, proj_keys)
    d_enc = src.shape("towers.image.projector.0.weight")[1]
    check_dim(path, "image", enc.params["vision_config"]["hidden_size"], d_enc)
    if not any(k.startswith("towers.image.encoder.") for k in src):
        raise CheckpointError(f"{path}: the vision tower's weights are missing")
    tower = TowerConfig(modality="image", encoder=enc, projector=proj)
    src.config = MMConfig(text_config=text, towers=[tower], dtype=config_dtype(cfg))
    return src
