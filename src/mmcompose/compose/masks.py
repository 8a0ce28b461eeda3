"""MMER's per-modality masks over a merged task vector: the rule, and its YAML settings.

MMER (Li et al., ACL 2025, arXiv 2505.17110) merges the sources' LLM task vectors (TIES in the
paper; here whatever ``merge_method`` the config names) into ``tau*`` and then compares the
merged and original task vectors to give each modality a binary mask, so that modality's
tokens see ``W0 + m_i * tau*``. The paper's exact mask equation was not available to us (only
its abstract: "by comparing original and merged LLM parameters, MMER generates binary masks").
We implement the closest documented rule, TALL masks (Wang et al., ICML 2024, "Localizing Task
Information for Improved Model Merging and Compression", arXiv 2405.07813), on which this
family of methods builds::

    m_i = |tau_i| >= lambda * |tau* - tau_i|        (elementwise; tau_i = theta_i - theta_0)

An entry is kept where the merged model is, up to ``lambda``, at least as close to source i as
the base is. At ``lambda = 1`` this is exactly "``tau*`` agrees in sign with ``tau_i`` and
``|tau*| <= 2 |tau_i|``" (or ``tau* = 0`` there, where the mask does not matter); a smaller
``lambda`` keeps more entries (``lambda -> 0``: every entry, plain merging), a larger one fewer.
TALL tuned ``lambda`` in 0.2..0.6 on validation data; mmcompose defaults to 1.0, the value
at which the rule needs no tuning to read as sign agreement.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from mmcompose.errors import MergeError
from mmcompose.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")  # imported at the first merge, not with the schema

__all__ = ["DEFAULT_MASK_LAMBDA", "MMERSettings", "tall_mask"]

DEFAULT_MASK_LAMBDA = 1.0


class MMERSettings(BaseModel):
    """The ``mmer:`` block of a compose config (``composition: mmer``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_lambda: float = Field(DEFAULT_MASK_LAMBDA, gt=0, allow_inf_nan=False)


def tall_mask(tau: Tensor, merged: Tensor, mask_lambda: float) -> Tensor:
    """``|tau| >= mask_lambda * |merged - tau|`` as a boolean tensor of ``tau``'s shape.

    ``tau``: one source's task vector (unweighted, untrimmed: the source's own update);
    ``merged``: the merged task vector. Computed in float32 (float64 stays float64)."""
    if not (isinstance(mask_lambda, int | float) and math.isfinite(mask_lambda)) or (
        mask_lambda <= 0
    ):
        raise MergeError(
            f"mask_lambda must be a finite number > 0, got {mask_lambda!r}",
            hint="set mmer: {mask_lambda: 1.0} (smaller keeps more of the merged delta)",
        )
    if tau.shape != merged.shape:
        raise MergeError(f"task vector of shape {list(tau.shape)} vs merged {list(merged.shape)}")
    work = torch.float64 if torch.float64 in (tau.dtype, merged.dtype) else torch.float32
    t, m = tau.to(work), merged.to(work)
    return t.abs() >= mask_lambda * (m - t).abs()
