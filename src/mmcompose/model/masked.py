"""Routed masked deltas (MMER): one merged delta per linear, one binary mask per modality.

An MMER composition (``composition: mmer``) stores, for each targeted linear of the LLM, the
merged weight ``W' = W0 + tau*`` (what text tokens use), the merged task vector ``tau*`` and,
per modality, a binary mask ``m`` over it. A token of modality ``m`` (prefix and suffix
included) must see ``W0 + m * tau*``; :class:`MaskedDeltaLinear` computes
``x W'^T - x ((1 - m) * tau*)^T`` for that modality's rows only (gather, one product, scatter),
with the same :class:`~mmcompose.model.lora.TokenRouter` that routes DAMC's adapters. Text
tokens, and all of decoding, cost one ordinary matmul; nothing is computed for every mask over
every token.

Masks are stored bit-packed in ``numpy.packbits`` layout (row-major flattening, most
significant bit first, zero padding at the end), as ``uint8`` vectors of ``ceil(out*in/8)``
bytes: 1/32 of a float32 weight per modality.

The masked delta is dense per layer: ``m * (B @ A)`` for a binary ``m`` is not of low rank, so
a LoRA source's delta cannot stay factored. An MMER model therefore holds two dense matrices per
targeted linear (``W'`` and ``tau*``) plus the masks, about twice the targeted linears' memory of
a merged model; a modality's forward pass briefly materialises one dense ``(1 - m) * tau*`` per
layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcompose.model.config import MMERConfig
from mmcompose.model.lora import TokenRouter
from mmcompose.model.splice import ROUTE_IDS

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


# ---------------------------------------------------------------- bit packing


def packed_size(numel: int) -> int:
    """Bytes of a packed mask over ``numel`` entries."""
    return (numel + 7) // 8


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean tensor -> uint8 bytes, ``numpy.packbits(mask.ravel())`` exactly."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _BITS.to(flat.device)
    return (flat.view(-1, 8) * bits).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """uint8 bytes (:func:`pack_mask`'s layout) -> a boolean tensor of ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    if packed.numel() != packed_size(numel):
        raise ValueError(f"{packed.numel()} mask bytes cannot hold {numel} entries")
    bits = _BITS.to(packed.device)
    flat = (packed.reshape(-1, 1) & bits) != 0
    return flat.reshape(-1)[:numel].reshape(tuple(shape))


def count_ones(packed: Tensor) -> int:
    """Number of set entries of a packed mask (its padding bits are zero)."""
    return int(_POPCOUNT.to(packed.device)[packed.reshape(-1).long()].sum())


# ---------------------------------------------------------------- the layer


class MaskedDelta(nn.Module):
    """The merged delta ``tau*`` of one linear and one packed mask per modality (buffers:
    ``delta`` and ``mask.<modality>``, so they load and save with the model)."""

    def __init__(
        self, out_features: int, in_features: int, modalities: Sequence[str], like: Tensor
    ) -> None:
        super().__init__()
        self.shape = (out_features, in_features)
        self.modalities = tuple(modalities)
        self.register_buffer("delta", torch.zeros(self.shape, dtype=like.dtype, device=like.device))
        self.mask = nn.Module()
        nbytes = packed_size(out_features * in_features)
        for m in modalities:
            self.mask.register_buffer(m, torch.zeros(nbytes, dtype=torch.uint8, device=like.device))

    def mask_of(self, modality: str) -> Tensor:
        """The modality's mask as a boolean (out, in) tensor."""
        return unpack_mask(getattr(self.mask, modality), self.shape)

    def excluded(self, modality: str) -> Tensor:
        """``(1 - m) * tau*``: the part of the merged delta the modality's tokens do not see."""
        return torch.where(self.mask_of(modality), 0, self.delta)


class MaskedDeltaLinear(nn.Linear):
    """An ``nn.Linear`` holding ``W' = W0 + tau*`` (same ``weight``/``bias`` names) whose rows
    of each masked modality get ``W0 + m * tau*`` instead, routed per token."""

    def __init__(self, base: nn.Linear, router: TokenRouter, modalities: Sequence[str]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.mmer = MaskedDelta(self.out_features, self.in_features, modalities, base.weight)
        self.router = router

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        for name, idx in self.router.groups:
            if name not in self.mmer.modalities:
                continue
            off = self.mmer.excluded(name).to(x.dtype)
            if idx is None:
                y = y - F.linear(x, off)
                continue
            flat_x = x.reshape(-1, self.in_features)
            flat_y = y.reshape(-1, self.out_features)
            corr = F.linear(flat_x.index_select(0, idx), off)
            y = flat_y.index_add(0, idx, corr.to(flat_y.dtype), alpha=-1).view_as(y)
        return y


def mmer_routes(config: MMERConfig) -> dict[int, str | None]:
    """Route id -> the modality whose mask its tokens use; text (and unmasked) -> None."""
    return {rid: (kind if kind in config.modalities else None) for kind, rid in ROUTE_IDS.items()}


def inject_masked_deltas(llm: nn.Module, router: TokenRouter, config: MMERConfig) -> list[str]:
    """Replace the targeted ``nn.Linear`` layers of ``llm`` by routed masked-delta layers;
    returns their qualified names."""
    targets = set(config.target_modules)
    replaced: list[str] = []
    for qname, module in list(llm.named_modules()):
        if type(module) is not nn.Linear or qname.rsplit(".", 1)[-1] not in targets:
            continue
        parent = llm.get_submodule(qname.rsplit(".", 1)[0]) if "." in qname else llm
        setattr(parent, qname.rsplit(".", 1)[-1],
                MaskedDeltaLinear(module, router, config.modalities))  # fmt: skip
        replaced.append(qname)
    return replaced


def masked_layers(model: nn.Module) -> Iterator[tuple[str, MaskedDeltaLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, MaskedDeltaLinear):
            yield name, m


__all__ = [
    "MaskedDelta",
    "MaskedDeltaLinear",
    "count_ones",
    "inject_masked_deltas",
    "masked_layers",
    "mmer_routes",
    "pack_mask",
    "packed_size",
    "unpack_mask",
]
