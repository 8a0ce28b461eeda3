"""Importers for the multimodal checkpoint layouts users already have.

Importing this module registers three importers with :func:`~mmcompose.compose.sources.
register_importer` (``llava``, ``llava_hf``, ``modelcompose``), one encoder (``clip_vision``),
one placeholder encoder (``unavailable``) and one projector (``blip2_qformer``). Each importer
presents its checkpoint as a :class:`Source` under mmcompose names; nothing is converted on disk
and tensors are read one at a time (``.bin`` pickles through a read-only memory map).

Key mappings (``L`` = ``language_model.``, ``P`` = ``towers.<m>.projector.``,
``E`` = ``towers.<m>.encoder.``; ``<clip>`` = CLIP vision-transformer names such as
``embeddings.patch_embedding.weight``, ``encoder.layers.0.mlp.fc1.weight``)::

  importer      checkpoint key                                      mmcompose key
  llava         model.{embed_tokens,layers.*,norm}.*, lm_head.*     L + same
  (model_type   model.mm_projector.{0,2}.* (mlp2x_gelu) / .* (lin.) towers.image.projector.*
   llava_llama, model.vision_tower.vision_tower.vision_model.<clip> towers.image.encoder.clip.<clip>
   llava_mistral, (only when the tower was unfrozen; else see "Encoders" below)
   llava_qwen)
  llava_hf      language_model.model.* / model.language_model.*     L + model.*
  (model_type   language_model.lm_head.* / lm_head.*                L + lm_head.*
   llava)       multi_modal_projector.linear_{1,2}.*                towers.image.projector.{0,2}.*
                (or model.multi_modal_projector.*)
                [model.]vision_tower.[vision_model.]<clip>          towers.image.encoder.clip.<clip>
  modelcompose  [base_model.model.]model.layers.N.<mod>.<proj>      L + model.layers.N.<mod>.<proj>
  (model_type     .lora_{A,B}[.<adapter>].weight                      .lora.<ADAPTER>.lora_{A,B}
   multimodal)  [base_model.model.]model.modal_projectors.<mod>.*   towers.<MOD>.projector.*
                [base_model.model.]{prefix,suffix}_tokens.<mod>     towers.<MOD>.{prefix,suffix}
                                         (1, P, d)                         (P, d)

Adapter and modality names of the reference: ``default`` -> ``text``, ``vision`` -> ``image``,
``audio``/``video``/``point`` unchanged. The reference's audio projector ``qformer_<Q>N_<L>L`` (a
BLIP-2 BERT Q-Former, ``audio_Qformer.bert.*`` + ``audio_query_tokens`` + ``audio_llama_proj`` +
``audio_position_embedding``) maps onto ``blip2_qformer`` (transformers' ``Blip2QFormerModel``)
with ``bert.embeddings.LayerNorm`` -> ``qformer.layernorm`` and ``.attention.self.`` /
``.crossattention.self.`` -> ``.attention.attention.`` / ``.crossattention.attention.``.

Why each decision:

* Encoders. LLaVA-original and ModelCompose checkpoints do not contain their frozen encoders
  (CLIP is loaded from ``mm_vision_tower`` at run time; BEATs, LanguageBind and Point-BERT from
  their own files). Composing such a model with, say, an audio model is still useful (the LLM,
  adapters and projectors merge without the encoder), so opening never fails for that: the tower
  gets the ``unavailable`` encoder, a spec that records where the encoder came from and its
  output size, and that fails *when the composed model is built* with a message naming the
  missing encoder and the importer option that supplies it. Pass ``encoders={"image": PATH}``
  (a local Hugging Face CLIP folder: its vision weights are carried into the tower as
  ``clip_vision``) or ``encoders={"audio": (ModuleSpec(...), "encoder.safetensors")}`` (any
  registered encoder plus its state dict) to get a complete, loadable model. The output size is
  checked against the projector either way.
* Vocabulary. LLaVA-hf adds ``<image>`` (and ``<pad>``, padded to a multiple of 64) to the
  vocabulary, so its embeddings and LM head have more rows than the base LLM and a merge would
  refuse them. mmcompose splices blocks at negative sentinel ids and never needs an ``<image>``
  row, so ``base_vocab_size=N`` keeps only the first N rows (and sets ``vocab_size``); without it
  the rows are kept and the difference is left to the composer to refuse. The same option exists
  for LLaVA-original (``mm_use_im_start_end`` or v0's ``[PAD]`` add rows there).
* ModelCompose checkpoints hold only adapters, projectors and prefix/suffix tokens; the base
  LLM is whatever ``_name_or_path`` named at training time. ``base=PATH`` (or ``_name_or_path``
  when it is an existing local folder) adds the base weights as ``language_model.*``; otherwise
  the source has none, and ``source.base_model`` tells the composer what it needs.
* Unknown keys are errors, so nothing is silently dropped. The only tensors dropped on purpose
  are listed in ``DROPPED`` (e.g. the reference's unused ``prefix_tokens.default``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from torch import Tensor, nn

from mmcompose.compose.sources import (
    LLM_PREFIX,
    Source,
    Transform,
    open_hf_causal_lm,
    read_json,
    register_importer,
)
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.io import SAFE_INDEX, SAFE_WEIGHTS, weight_files
from mmcompose.modalities import canonical_modality
from mmcompose.model import media
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
from mmcompose.model.encoders import (
    ENCODERS,
    Encoder,
    EncoderParams,
    build_encoder,
    register_encoder,
)
from mmcompose.model.projectors import ProjectorParams, register_projector

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
_CONFIG_DTYPES = ("float32", "float16", "bfloat16")
# An encoder given to an importer: a local HF CLIP folder, or (spec, safetensors state dict).
EncoderChoice = str | Path | tuple[ModuleSpec, str | Path]


# ============================================================================ lazy .bin files
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


def _file_keys(file: Path) -> list[str]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(
                f"cannot read {file}: {e}", hint="the file is truncated or not safetensors"
            ) from None
    return _BinFile(file).keys()


# ============================================================================ encoders/projector
class CLIPVisionParams(EncoderParams):
    vision_config: dict[str, Any]
    feature_layer: int = -2  # LLaVA: the penultimate layer's hidden states
    select_strategy: Literal["default", "full"] = "default"  # default drops the CLS token


_CLIP_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
)
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


@register_encoder("clip_vision")
class CLIPVisionEncoder(Encoder):
    """transformers' CLIP vision tower, read at ``feature_layer`` as LLaVA does.

    Weights live under ``clip.`` with the installed transformers' own names (see
    :func:`clip_state_prefix`), so importers can carry a checkpoint's tower in unchanged.
    """

    modality = "image"
    Params = CLIPVisionParams

    def __init__(self, params: CLIPVisionParams) -> None:
        super().__init__(params)
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(**params.vision_config)
        n_layers = cfg.num_hidden_layers
        if not -n_layers - 1 <= params.feature_layer <= n_layers:
            raise ConfigError(
                f"clip_vision: feature_layer {params.feature_layer} is outside the "
                f"{n_layers + 1} hidden states"
            )
        self.clip = CLIPVisionModel(cfg)
        self.output_dim = cfg.hidden_size
        patches = (cfg.image_size // cfg.patch_size) ** 2
        self.num_tokens = patches + (params.select_strategy == "full")

    @classmethod
    def preprocess(cls, item: Any, params: CLIPVisionParams) -> Tensor:
        size = params.vision_config.get("image_size", 224)
        return media.image_to_tensor(item, size, media.CLIP_MEAN, media.CLIP_STD)

    def forward(self, x: Tensor) -> Tensor:  # (n, 3, S, S) -> (n, N, hidden)
        out = self.clip(pixel_values=x, output_hidden_states=True)
        h = out.hidden_states[self.params.feature_layer]
        return h[:, 1:] if self.params.select_strategy == "default" else h


_CLIP_PREFIX: list[str] = []


def clip_state_prefix() -> str:
    """'' or 'vision_model.': where the installed CLIPVisionModel keeps the transformer."""
    if not _CLIP_PREFIX:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with torch.device("meta"):
            m = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=1))
        _CLIP_PREFIX.append(
            "" if "embeddings.class_embedding" in m.state_dict() else "vision_model."
        )
    return _CLIP_PREFIX[0]


def clip_vision_spec(
    vision_config: Mapping[str, Any], feature_layer: int, strategy: str
) -> ModuleSpec:
    from transformers import CLIPVisionConfig

    full = CLIPVisionConfig(**dict(vision_config)).to_dict()
    vc = {k: full[k] for k in _CLIP_KEYS}
    return ModuleSpec(
        name="clip_vision",
        params={"vision_config": vc, "feature_layer": feature_layer, "select_strategy": strategy},
    )


class UnavailableParams(EncoderParams):
    modality: str
    origin: str
    output_dim: int = Field(gt=0)
    hint: str = ""


@register_encoder("unavailable")
class UnavailableEncoder(Encoder):
    """Stands for an encoder whose weights the imported checkpoint did not contain.

    It describes the tower (origin, output size) so composition can proceed, and refuses to be
    built, so a model that lacks real encoder weights can never run silently.
    """

    modality = "image"
    Params = UnavailableParams

    def __init__(self, params: UnavailableParams) -> None:
        raise ConfigError(
            f"the {params.modality} tower's encoder ({params.origin!r}, output size "
            f"{params.output_dim}) was not in the imported checkpoint",
            hint=params.hint
            or "re-import the checkpoint with encoders={modality: PATH or (spec, weights)}",
        )


class Blip2QFormerParams(ProjectorParams):
    num_queries: int = Field(default=32, gt=0)
    num_layers: int = Field(default=2, gt=0)
    width: int = Field(default=768, gt=0)
    num_heads: int = Field(default=12, gt=0)
    intermediate_size: int = Field(default=3072, gt=0)
    num_positions: int = Field(default=0, ge=0)  # >0: learned positions added to the input
    layer_norm_eps: float = 1e-12


class Blip2QFormerProjector(nn.Module):
    """The reference's audio projector (Video-LLaMA's audio Q-Former): positions added to the
    encoder tokens, a BLIP-2 Q-Former of learned queries, then Linear(width, d)."""

    def __init__(self, d_in: int, d_out: int, p: Blip2QFormerParams) -> None:
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        cfg = Blip2QFormerConfig(
            hidden_size=p.width,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            intermediate_size=p.intermediate_size,
            encoder_hidden_size=d_in,
            cross_attention_frequency=1,
            layer_norm_eps=p.layer_norm_eps,
        )
        self.num_tokens = p.num_queries
        self.qformer = Blip2QFormerModel(cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, p.num_queries, p.width))
        self.position_embedding = nn.Embedding(p.num_positions, d_in) if p.num_positions else None
        self.proj = nn.Linear(p.width, d_out)

    def forward(self, x: Tensor) -> Tensor:  # (n, N, d_in) -> (n, Q, d_out)
        if self.position_embedding is not None:
            x = x + self.position_embedding(torch.arange(x.shape[1], device=x.device))
        q = self.query_tokens.expand(x.shape[0], -1, -1)
        h = self.qformer(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        return self.proj(h)


@register_projector("blip2_qformer", Blip2QFormerParams)
def blip2_qformer(d_in: int, d_out: int, params: Blip2QFormerParams) -> nn.Module:
    return Blip2QFormerProjector(d_in, d_out, params)


# ============================================================================ shared helpers
def _fail_unknown(path: Path, keys: Iterable[str], layout: str) -> None:
    keys = sorted(keys)
    if keys:
        raise CheckpointError(
            f"{path}: {len(keys)} tensor(s) the {layout} importer does not know, e.g. {keys[:5]}",
            hint="this layout variant is not supported; nothing is dropped silently",
        )


def _dtype(cfg: Mapping[str, Any]) -> str:
    d = cfg.get("torch_dtype") or cfg.get("dtype")
    return d if d in _CONFIG_DTYPES else "float32"


def _check_vocab(path: Path, text_config: dict[str, Any], base_vocab_size: int | None) -> None:
    if base_vocab_size is None:
        return
    vocab = text_config.get("vocab_size")
    if not isinstance(vocab, int) or not 0 < base_vocab_size <= vocab:
        raise ConfigError(
            f"{path}: base_vocab_size {base_vocab_size} must be in 1..{vocab} (the checkpoint's)"
        )
    text_config["vocab_size"] = base_vocab_size


def _vocab_transform(name: str, base_vocab_size: int | None) -> Transform | None:
    """Keep the first ``base_vocab_size`` rows of the embeddings and LM head (added tokens go)."""
    if base_vocab_size is None or not name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return None
    n = base_vocab_size
    return lambda t: t[:n]


def _mlp_projector(kind: str, path: Path, extra: str = "") -> ModuleSpec:
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


def _check_projector(path: Path, modality: str, spec: ModuleSpec, got: Iterable[str]) -> None:
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


def _add_encoder(
    src: ImportedSource,
    modality: str,
    choice: EncoderChoice | None,
    origin: str,
    output_dim: int,
    clip_select: tuple[int, str] = (-2, "default"),
) -> ModuleSpec:
    """Resolve a tower's encoder: a CLIP folder, (spec, weights), or ``unavailable``."""
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
    return _add_clip_folder(src, Path(choice), output_dim, clip_select)


def _add_clip_folder(
    src: ImportedSource, folder: Path, output_dim: int, select: tuple[int, str]
) -> ModuleSpec:
    cfg = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
    mt = cfg.get("model_type")
    vc = cfg.get("vision_config") if mt == "clip" else cfg if mt == "clip_vision_model" else None
    if not isinstance(vc, dict):
        raise CheckpointError(
            f"{folder} is not a Hugging Face CLIP folder (config model_type {mt!r})",
            hint="pass a local copy of the CLIP model the checkpoint names (mm_vision_tower)",
        )
    spec = clip_vision_spec(vc, *select)
    _check_dim(folder, "image", spec.params["vision_config"]["hidden_size"], output_dim)
    files = checkpoint_files(folder)
    prefix = "towers.image.encoder.clip." + clip_state_prefix()
    for key, file in files.items():
        if key.startswith("vision_model."):
            src.add(prefix + key.removeprefix("vision_model."), file, key)
        else:
            src.dropped[f"{folder.name}/{key}"] = "CLIP text side or projection (not used)"
    return spec


def _add_substitute_encoder(
    src: ImportedSource, modality: str, choice: tuple[ModuleSpec, str | Path], output_dim: int
) -> ModuleSpec:
    spec, weights = choice
    with torch.device("meta"):
        enc = build_encoder(spec)
    if ENCODERS.get(spec.name).modality != modality:
        raise ConfigError(f"encoder {spec.name!r} does not take {modality} input")
    _check_dim(Path(str(weights)), modality, enc.output_dim, output_dim)
    weights = Path(weights)
    want = set(enc.state_dict())
    got = set(_file_keys(weights))
    if got != want:
        raise CheckpointError(
            f"{weights} does not match encoder {spec.name!r}: missing {sorted(want - got)[:5]}, "
            f"unexpected {sorted(got - want)[:5]}"
        )
    for key in sorted(got):
        src.add(f"towers.{modality}.encoder.{key}", weights, key)
    return spec


def _check_dim(where: Path, modality: str, enc_dim: int, proj_in: int) -> None:
    if enc_dim != proj_in:
        raise ConfigError(
            f"{where}: the {modality} encoder outputs {enc_dim} features but the projector "
            f"takes {proj_in}",
            hint="choose the encoder the checkpoint was trained with",
        )


def _llm_config(cfg: Mapping[str, Any], model_type: str, drop: Callable[[str], bool]) -> dict:
    text = {k: v for k, v in cfg.items() if not drop(k)}
    text["model_type"] = model_type
    text["architectures"] = [_ARCHS[model_type]]
    return text


_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LLAVA_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
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


def _is_llava_only(key: str) -> bool:
    return key.startswith("mm_") or key in _LLAVA_ONLY_KEYS


# ============================================================================ llava (original)
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
    text = _llm_config(cfg, llm_type, _is_llava_only)
    _check_vocab(path, text, base_vocab_size)
    proj = _mlp_projector(cfg.get("mm_projector_type", "linear"), path)
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
            src.add(LLM_PREFIX + key, file, key, _vocab_transform(key, base_vocab_size))
        elif key.endswith("rotary_emb.inv_freq"):
            src.dropped[key] = "rotary buffer, recomputed from the config"
        else:
            unknown.append(key)
    _fail_unknown(path, unknown, "llava")
    _check_projector(path, "image", proj, proj_keys)
    d_enc = int(cfg.get("mm_hidden_size") or src.shape("towers.image.projector." + _first(proj)))
    origin = str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or "")
    select = (
        int(cfg.get("mm_vision_select_layer", -1)),
        "full" if cfg.get("mm_vision_select_feature", "patch") == "cls_patch" else "default",
    )
    choice = (encoders or {}).get("image")
    if vision_keys and choice is None:
        enc = _add_embedded_clip(src, path, origin, vision_keys, d_enc, select)
    else:
        enc = _add_encoder(src, "image", choice, origin, d_enc, select)
        src.dropped.update(dict.fromkeys(vision_keys, "replaced by the encoder given"))
    tower = TowerConfig(modality="image", encoder=enc, projector=proj)
    src.config = MMConfig(text_config=text, towers=[tower], dtype=_dtype(cfg))
    return src


def _first(spec: ModuleSpec) -> str:
    return "weight" if spec.name == "linear" else "0.weight"


def _add_embedded_clip(
    src: ImportedSource,
    path: Path,
    origin: str,
    keys: Mapping[str, Path],
    d_enc: int,
    select: tuple[int, str],
) -> ModuleSpec:
    """A LLaVA checkpoint that saved its (unfrozen) CLIP tower: the config must be known."""
    vc = KNOWN_CLIP_TOWERS.get(origin.rstrip("/"))
    if vc is None:
        raise CheckpointError(
            f"{path}: the checkpoint holds vision-tower weights but {origin!r} is not a known "
            "CLIP tower, so its architecture is unknown",
            hint="pass encoders={'image': PATH} with a local copy of that CLIP model",
        )
    spec = clip_vision_spec(vc, *select)
    _check_dim(path, "image", vc["hidden_size"], d_enc)
    prefix = "towers.image.encoder.clip." + clip_state_prefix()
    for name, file in keys.items():
        src.add(prefix + name, file, "model.vision_tower.vision_tower.vision_model." + name)
    return spec


# ============================================================================ llava_hf
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
    if tc["model_type"] not in _ARCHS:
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
    text["architectures"] = [_ARCHS[tc["model_type"]]]
    _check_vocab(path, text, base_vocab_size)
    enc = clip_vision_spec(vc, layer, strategy)
    src = ImportedSource(path, MMConfig(text_config=text), kind="llava_hf")
    clip_prefix = "towers.image.encoder.clip." + clip_state_prefix()
    unknown, proj_keys = [], []
    for key, file in checkpoint_files(path).items():
        hit = _llava_hf_name(key)
        if hit is None:
            unknown.append(key)
        elif hit[0] == "llm":
            src.add(LLM_PREFIX + hit[1], file, key, _vocab_transform(hit[1], base_vocab_size))
        elif hit[0] == "projector":
            proj_keys.append(hit[1])
            src.add("towers.image.projector." + hit[1], file, key)
        else:
            src.add(clip_prefix + hit[1], file, key)
    _fail_unknown(path, unknown, "llava_hf")
    proj = ModuleSpec(name="mlp2x_gelu")
    _check_projector(path, "image", proj, proj_keys)
    d_enc = src.shape("towers.image.projector.0.weight")[1]
    _check_dim(path, "image", enc.params["vision_config"]["hidden_size"], d_enc)
    if not any(k.startswith("towers.image.encoder.") for k in src):
        raise CheckpointError(f"{path}: the vision tower's weights are missing")
    tower = TowerConfig(modality="image", encoder=enc, projector=proj)
    src.config = MMConfig(text_config=text, towers=[tower], dtype=_dtype(cfg))
    return src


# ============================================================================ modelcompose
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
    text = _llm_config(cfg, "llama", _is_mc_only)
    src = ImportedSource(path, MMConfig(text_config=text), kind="modelcompose")
    files = [path / f for f in _MC_FILES if (path / f).is_file()] or [path / _MC_PROJECTOR_ONLY]
    lora: dict[str, dict[str, dict[str, _Stored]]] = {}  # adapter -> target -> A/B -> stored
    proj: dict[str, dict[str, _Stored]] = {}  # reference modality -> rest of key -> stored
    tokens: dict[str, dict[str, _Stored]] = {}  # modality -> prefix/suffix -> stored
    unknown: list[str] = []
    for file in files:
        for key in _file_keys(file):
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
    _fail_unknown(path, unknown, "modelcompose")
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
    _fail_unknown(path, leftover, "modelcompose (no such modality in config.json)")
    src.config = MMConfig(text_config=text, towers=towers, lora=lora_cfg, dtype=_dtype(cfg))
    _mc_base(src, path, cfg, text, base)
    return src


def _is_mc_only(key: str) -> bool:
    return (
        _is_llava_only(key)
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
        spec = _mlp_projector(kind, path, ", qformer_<Q>N_<L>L")
        _check_projector(path, modality, spec, proj)
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
    enc = _add_encoder(src, modality, choice, origin, d_in, select)
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
    return src.shape(p + _first(spec))[1]


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
            _fail_unknown(path, [stored[1]], "modelcompose audio Q-Former")
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
