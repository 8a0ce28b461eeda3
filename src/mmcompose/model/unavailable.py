"""The ``unavailable`` encoder: a tower whose encoder weights an imported checkpoint lacked.

LLaVA-original and ModelCompose checkpoints do not contain their frozen encoders; the
importers give such a tower this spec so composition can proceed, and building it fails with
a message naming the missing encoder and how to supply it. It lives in ``model`` (not with the
importers) so a composed model that still names it fails with that message, not with an
unknown-encoder error.
"""

from __future__ import annotations

from pydantic import Field

from mmcompose.errors import ConfigError
from mmcompose.model.encoders import Encoder, EncoderParams, register_encoder


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
