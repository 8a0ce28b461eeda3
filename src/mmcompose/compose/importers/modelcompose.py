"""Importer for THUNLP-MT/ModelCompose training outputs (``model_type`` multimodal).

They hold LoRA adapters, modality projectors and prefix/suffix tokens, not the base LLM or the
encoders (see :mod:`mmcompose.compose.importers` for the key mapping and why). The reference's
audio Q-Former is mapped onto :mod:`mmcompose.model.blip2_qformer`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmcompose.compose.importers._common import (
    EncoderChoice,
    add_encoder,
    check_projector,
    config_dtype,
    fail_unknown,
    first_weight,
    is_llava_only,
    llava_pads,
    llm_config,
    mlp_projector,
)
from mmcompose.compose.importers.bin_reader import ImportedSource, file_keys
from mmcompose.compose.sources import LLM_PREFIX, open_hf_causal_lm, read_json, register_importer
from mmcompose.errors import CheckpointError
from mmcompose.modalities import canonical_modality
from mmcompose.model.blip2_qformer import Blip2QFormerParams, Blip2QFormerProjector
from mmcompose.model.config import (
    CONFIG_NAME,
    DEFAULT_TARGETS,
    TEXT_ADAPTER,
    AdapterSpec,
    LoRAConfig,
    MMConfig,
    ModuleSpec,
    TowerConfig,
)

_MC_FILES = ("adapter_model.safetensors", "adapter_model.bin", "non_lora_trainables.bin")
_MC_PROJECTOR_ONLY = "mm_projector.bin"
_MC_ENCODER_KEYS = {  # reference config key of each modality's encoder / projector / width
    "vision": ("mm_vision_encoder", "mm_projector_type", "mm_hidden_size"),
    "audio": ("mm_audio_encoder", "mm_audio_projector_type", "mm_audio_hidden_size"),
    "video": ("mm_video_encoder", "mm_video_projector_type", "mm_video_hidden_size"),
    "point": ("mm_point_encoder", "mm_point_projector_type", "mm_point_hidden_size"),
}
_MC_CONFIG_KEYS = {
    "lora_strategy",
    "lora_name",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "layer_local_tokens",
    "seperate_layernorm",
    "merge_default_weights",
    "reset_scaling_weights",
    "_name_or_path",
}
_LORA = re.compile(
    r"model\.(layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])(?:\.([\w-]+))?\.weight"
)
_TOKENS = re.compile(r"(prefix|suffix)_tokens\.(\w+)")
DROPPED = {
    "prefix_tokens.default": "the reference creates it for the text adapter but never uses it",
    "suffix_tokens.default": "the reference creates it for the text adapter but never uses it",
}


def _is_modelcompose(path: Path) -> bool:
    cfg = read_json(path / CONFIG_NAME)
    return cfg.get("model_type") == "multimodal" and any(
        (path / f).is_file() for f in (*_MC_FILES, _MC_PROJECTOR_ONLY)
    )


def _mc_modalities(cfg: Mapping[str, Any]) -> list[str]:
    """Reference modalities of a checkpoint, as ``infer_modals`` finds them."""
    out = []
    for ref, (enc_key, _, _) in _MC_ENCODER_KEYS.items():
        if cfg.get(enc_key) or (ref == "vision" and cfg.get("mm_vision_tower")):
            out.append(ref)
    return out


def _mc_adapter(name: str | None, default: str) -> str:
    name = name or default
    if name == "default":
        return TEXT_ADAPTER
    if name.startswith("default-"):
        raise CheckpointError(
            f"adapter {name!r}: this checkpoint was merged by the reference's online merge",
            hint="import the single-modality checkpoints it was merged from instead",
        )
    return canonical_modality(name)


def _squeeze0(t: Tensor) -> Tensor:
    """The reference stores prefix/suffix tokens as (1, P, d); mmcompose as (P, d)."""
    return t.squeeze(0)


_Stored = tuple[Path, str]  # (file, key in file)


@register_importer("modelcompose", detect=_is_modelcompose)
def open_modelcompose(
    path: Path,
    *,
    base: str | Path | None = None,
    encoders: Mapping[str, EncoderChoice] | None = None,
) -> ImportedSource:
    """THUNLP-MT/ModelCompose training outputs (``MultimodalLlamaForCausalLM``).

    Files: ``adapter_model.bin`` (LocalLoRA training: adapters, projectors, prefix/suffix), or
    peft's ``adapter_model.{bin,safetensors}`` + ``non_lora_trainables.bin``, or a
    projector-only ``mm_projector.bin``. ``base``: the base LLM folder (default: the config's
    ``_name_or_path`` when that is a local folder); ``encoders``: see the module docstring.
    """
    path = Path(path)
    cfg = read_json(path / CONFIG_NAME)
    peft_file = path / "adapter_config.json"
    peft_cfg = read_json(peft_file) if peft_file.is_file() else {}
    text = llm_config(cfg, "llama", _is_mc_only)
    src = ImportedSource(path, MMConfig(text_config=text), kind="modelcompose")
    files = [path / f for f in _MC_FILES if (path / f).is_file()] or [path / _MC_PROJECTOR_ONLY]
    lora: dict[str, dict[str, dict[str, _Stored]]] = {}  # adapter -> target -> A/B -> stored
    proj: dict[str, dict[str, _Stored]] = {}  # reference modality -> rest of key -> stored
    tokens: dict[str, dict[str, _Stored]] = {}  # modality -> prefix/suffix -> stored
    unknown: list[str] = []
    for file in files:
        for key in file_keys(file):
            name = key.removeprefix("base_model.model.")
            if m := _LORA.fullmatch(name):
                adapter = _mc_adapter(m.group(4), "default")
                target = f"model.{m.group(1)}"
                lora.setdefault(adapter, {}).setdefault(target, {})[m.group(3)] = (file, key)
            elif name.startswith("model.modal_projectors."):
                ref, _, rest = name.removeprefix("model.modal_projectors.").partition(".")
                proj.setdefault(ref, {})[rest] = (file, key)
            elif name in DROPPED:
                src.dropped[key] = DROPPED[name]
            elif m := _TOKENS.fullmatch(name):
                tokens.setdefault(canonical_modality(m.group(2)), {})[m.group(1)] = (file, key)
            else:
                unknown.append(key)
    fail_unknown(path, unknown, "modelcompose")
    lora_cfg = _mc_lora(src, path, cfg, peft_cfg, lora)
    towers = [
        _mc_tower(
            src,
            path,
            cfg,
            ref,
            proj.pop(ref, {}),
            tokens.pop(canonical_modality(ref), {}),
            (encoders or {}).get(canonical_modality(ref)),
        )
        for ref in _mc_modalities(cfg)
    ]
    leftover = [k for d in (*proj.values(), *tokens.values()) for _, k in d.values()]
    fail_unknown(path, leftover, "modelcompose (no such modality in config.json)")
    src.config = MMConfig(text_config=text, towers=towers, lora=lora_cfg, dtype=config_dtype(cfg))
    _mc_base(src, path, cfg, text, base)
    return src


def _is_mc_only(key: str) -> bool:
    return (
        is_llava_only(key)
        or key in _MC_CONFIG_KEYS
        or key.startswith("local_")
        or key.endswith(("_lora_r", "_lora_alpha"))
    )


def _mc_lora(
    src: ImportedSource,
    path: Path,
    cfg: Mapping[str, Any],
    peft_cfg: Mapping[str, Any],
    lora: Mapping[str, Mapping[str, Mapping[str, _Stored]]],
) -> LoRAConfig | None:
    """Adapters found -> LoRAConfig; 'same' = shared, 'modal'/'modal+language' = decoupled."""
    strategy = cfg.get("lora_strategy")
    if not lora:
        if strategy not in (None, "none") and (path / "adapter_model.bin").is_file():
            raise CheckpointError(f"{path}: lora_strategy {strategy!r} but no LoRA tensors")
        return None
    rank = int(peft_cfg.get("r", cfg.get("lora_r", 0)))
    alpha = float(peft_cfg.get("lora_alpha", cfg.get("lora_alpha", 0)))
    if rank <= 0 or alpha <= 0:
        raise CheckpointError(f"{path}: LoRA rank/alpha missing from config.json")
    targets = None
    for adapter, by_target in sorted(lora.items()):
        if targets is None:
            targets = set(by_target)
        elif set(by_target) != targets:
            raise CheckpointError(f"{path}: adapter {adapter!r} covers other layers than the rest")
        for target, parts in sorted(by_target.items()):
            if set(parts) != {"A", "B"}:
                raise CheckpointError(f"{path}: {target} adapter {adapter!r} lacks lora_A or B")
            for ab, (file, key) in sorted(parts.items()):
                src.add(f"{LLM_PREFIX}{target}.lora.{adapter}.lora_{ab}", file, key)
        first = f"{LLM_PREFIX}{min(by_target)}.lora.{adapter}.lora_A"
        if src.shape(first)[0] != rank:
            raise CheckpointError(
                f"{path}: adapter {adapter!r} has rank {src.shape(first)[0]}, config says {rank}"
            )
    modal = set(lora) - {TEXT_ADAPTER}
    if strategy == "same" and modal:
        raise CheckpointError(
            f"{path}: lora_strategy 'same' but modality adapters {sorted(modal)} are present"
        )
    decoupled = strategy in ("modal", "modal+language") or bool(modal)
    names = {t.rsplit(".", 1)[-1] for t in targets or ()}
    order = [t for t in DEFAULT_TARGETS if t in names] + sorted(names - set(DEFAULT_TARGETS))
    return LoRAConfig(
        strategy="decoupled" if decoupled else "shared",
        adapters={a: AdapterSpec(rank=rank, alpha=alpha) for a in sorted(lora)},
        target_modules=tuple(order),
        dropout=float(peft_cfg.get("lora_dropout", cfg.get("lora_dropout", 0.0))),
    )


def _mc_tower(
    src: ImportedSource,
    path: Path,
    cfg: Mapping[str, Any],
    ref: str,
    proj: Mapping[str, _Stored],
    tokens: Mapping[str, _Stored],
    choice: EncoderChoice | None,
) -> TowerConfig:
    modality = canonical_modality(ref)
    enc_key, type_key, dim_key = _MC_ENCODER_KEYS[ref]
    origin = str(cfg.get(enc_key) or cfg.get("mm_vision_tower") or "")
    kind = str(cfg.get(type_key) or "linear")
    if re.fullmatch(r"qformer_\d+N_\d+L", kind) or (ref == "audio" and "VideoLLaMA" in origin):
        spec, mapped = _mc_qformer(src, path, proj)
    else:
        spec = mlp_projector(kind, path, ", qformer_<Q>N_<L>L")
        check_projector(path, modality, spec, proj)
        mapped = dict(proj)
    for rest, (file, key) in sorted(mapped.items()):
        src.add(f"towers.{modality}.projector.{rest}", file, key)
    d_in = _projector_in_dim(src, modality, spec)
    if cfg.get(dim_key) is not None and int(cfg[dim_key]) != d_in:
        raise CheckpointError(f"{path}: {dim_key}={cfg[dim_key]} but the projector takes {d_in}")
    counts = {}
    for part, (file, key) in tokens.items():
        src.add(f"towers.{modality}.{part}", file, key, _squeeze0)
        counts[part] = src.shape(f"towers.{modality}.{part}")[0]
    select = (
        int(cfg.get("mm_vision_select_layer", -1)),
        "full" if cfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default",
    )
    pad = ref == "vision" and llava_pads(cfg)  # the reference preprocesses images as LLaVA
    enc = add_encoder(src, modality, choice, origin, d_in, select, pad)
    return TowerConfig(
        modality=modality,
        encoder=enc,
        projector=spec,
        num_prefix=counts.get("prefix", 0),
        num_suffix=counts.get("suffix", 0),
    )


def _projector_in_dim(src: ImportedSource, modality: str, spec: ModuleSpec) -> int:
    p = f"towers.{modality}.projector."
    if spec.name == "blip2_qformer":
        return src.shape(p + "qformer.encoder.layer.0.crossattention.attention.key.weight")[1]
    return src.shape(p + first_weight(spec))[1]


_QFORMER_RENAMES = (
    ("audio_Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
    ("audio_Qformer.bert.encoder.", "qformer.encoder."),
    ("audio_query_tokens", "query_tokens"),
    ("audio_llama_proj.", "proj."),
    ("audio_position_embedding.", "position_embedding."),
)


def _mc_qformer(
    src: ImportedSource, path: Path, proj: Mapping[str, _Stored]
) -> tuple[ModuleSpec, dict[str, _Stored]]:
    """The reference's Video-LLaMA audio Q-Former -> ``blip2_qformer`` (names + shapes)."""
    if not proj:
        raise CheckpointError(f"{path}: the audio projector's weights are missing")
    mapped: dict[str, _Stored] = {}
    for rest, stored in proj.items():
        if rest.endswith("position_ids"):
            src.dropped[stored[1]] = "BERT position-id buffer (not a weight)"
            continue
        for old, new in _QFORMER_RENAMES:
            if rest.startswith(old):
                out = new + rest.removeprefix(old)
                out = out.replace(".attention.self.", ".attention.attention.")
                out = out.replace(".crossattention.self.", ".crossattention.attention.")
                mapped[out] = stored
                break
        else:
            fail_unknown(path, [stored[1]], "modelcompose audio Q-Former")
    need = ("query_tokens", "proj.weight", "qformer.layernorm.weight")
    missing = [k for k in need if k not in mapped]
    if missing:
        raise CheckpointError(f"{path}: the audio Q-Former lacks {missing}")

    def shape(name: str) -> list[int]:
        file, key = mapped[name]
        return list(src._handle(file).get_slice(key).get_shape())

    q = shape("query_tokens")
    layers = {int(k.split(".")[3]) for k in mapped if k.startswith("qformer.encoder.layer.")}
    inter = shape("qformer.encoder.layer.0.intermediate_query.dense.weight")[0]
    positions = (
        shape("position_embedding.weight")[0] if "position_embedding.weight" in mapped else 0
    )
    params = {
        "num_queries": q[1],
        "num_layers": len(layers),
        "width": q[2],
        "num_heads": max(1, q[2] // 64),  # BERT-base heads (64 wide); not stored in the file
        "intermediate_size": inter,
        "num_positions": positions,
    }
    spec = ModuleSpec(name="blip2_qformer", params=params)
    with torch.device("meta"):
        want = set(
            Blip2QFormerProjector(
                shape("qformer.encoder.layer.0.crossattention.attention.key.weight")[1],
                shape("proj.weight")[0],
                Blip2QFormerParams(**params),
            ).state_dict()
        )
    if set(mapped) != want:
        raise CheckpointError(
            f"{path}: the audio Q-Former does not match blip2_qformer: missing "
            f"{sorted(want - set(mapped))[:5]}, unexpected {sorted(set(mapped) - want)[:5]}"
        )
    return spec, mapped


def _mc_base(
    src: ImportedSource,
    path: Path,
    cfg: Mapping[str, Any],
    text: Mapping[str, Any],
    base: str | Path | None,
) -> None:
    """Add the base LLM's weights when they can be found; else record what is needed."""
    name = cfg.get("_name_or_path")
    if base is None and name and (Path(name) / CONFIG_NAME).is_file():
        base = name
    if base is None:
        src.base_model = str(name) if name else None
        return
    llm = open_hf_causal_lm(Path(base))
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if llm.config.text_config.get(key) != text.get(key):
            raise CheckpointError(
                f"{path}: base LLM {base} has {key}={llm.config.text_config.get(key)}, "
                f"the adapters were trained on {text.get(key)}",
                hint="pass the base LLM the ModelCompose checkpoint was trained from",
            )
    for name_ in llm:
        src.add(name_, *llm._entries[name_])
    src.base_model = str(base)
