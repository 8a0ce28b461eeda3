"""The CLIP vision tower as an mmcompose encoder (``clip_vision``), read as LLaVA reads it.

Importers (:mod:`mmcompose.compose.importers`) carry a checkpoint's CLIP weights into a tower
unchanged, so the weights live under ``clip.`` with the installed transformers' own names
(:func:`clip_state_prefix`). transformers is imported only when a tower is built or specified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import model_validator
from torch import Tensor

from mmcompose.errors import ConfigError
from mmcompose.model import media
from mmcompose.model.config import ModuleSpec
from mmcompose.model.encoders import Encoder, EncoderParams, register_encoder


class CLIPVisionParams(EncoderParams):
    vision_config: dict[str, Any]
    feature_layer: int = -2  # LLaVA: the penultimate layer's hidden states
    select_strategy: Literal["default", "full"] = "default"  # default drops the CLS token
    # The checkpoint's own image processor settings (importers copy them); None: CLIP's
    # processor at the tower's image_size, as openai/clip-* ship it.
    image_processing: media.ImageProcessing | None = None

    @model_validator(mode="after")
    def _pixels_fit_tower(self) -> CLIPVisionParams:
        size = self.vision_config.get("image_size", 224)
        out = self.pixels().output_size()
        if out != (size, size):
            raise ValueError(
                f"the image processor gives {out or 'input-dependent'} pixels; the CLIP "
                f"tower takes {size}x{size}"
            )
        return self

    def pixels(self) -> media.ImageProcessing:
        """The preprocessing in full (unset sizes = the tower's input size)."""
        size = self.vision_config.get("image_size", 224)
        return (self.image_processing or media.ImageProcessing()).for_size(size)


# The vision-config keys a spec keeps: the architecture, nothing about training or saving.
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
        return media.preprocess_image(item, params.pixels())

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
    vision_config: Mapping[str, Any],
    feature_layer: int,
    strategy: str,
    image_processing: media.ImageProcessing | None = None,
) -> ModuleSpec:
    """A ``clip_vision`` spec from a (possibly partial) HF vision config, defaults filled in,
    and the checkpoint's image processor settings (checked against the tower's input size)."""
    from transformers import CLIPVisionConfig

    full = CLIPVisionConfig(**dict(vision_config)).to_dict()
    vc = {k: full[k] for k in _CLIP_KEYS}
    params: dict[str, Any] = {
        "vision_config": vc,
        "feature_layer": feature_layer,
        "select_strategy": strategy,
    }
    if image_processing is not None and image_processing != media.ImageProcessing():
        params["image_processing"] = image_processing.model_dump(mode="json")
    spec = ModuleSpec(name="clip_vision", params=params)
    try:
        CLIPVisionParams(**spec.params)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"clip_vision: {e}") from None
    return spec
