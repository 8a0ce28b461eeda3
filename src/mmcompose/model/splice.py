"""Placeholder splicing: replace each placeholder token by its modality's block.

Token ids carry placeholders as negative sentinels (never real vocabulary ids, so the
tokenizer and vocabulary stay those of the base LLM and merge cleanly). Each sentinel, in
order of appearance over the batch, takes the next block of its modality; samples may hold
any mix of modalities, or none. The output is padded on the requested side, with labels -100
over blocks and padding, and a route id per token for the LoRA router.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmcompose.errors import PlaceholderError
from mmcompose.modalities import MODALITIES

IGNORE_INDEX = -100
SENTINELS: dict[str, int] = {m: -200 - i for i, m in enumerate(MODALITIES)}  # image = -200
SENTINEL_TO_MODALITY: dict[int, str] = {v: k for k, v in SENTINELS.items()}
ROUTE_IDS: dict[str, int] = {"text": 0} | {m: i + 1 for i, m in enumerate(MODALITIES)}


@dataclass
class Spliced:
    embeds: Tensor  # (B, T', d)
    attention_mask: Tensor  # (B, T') long
    position_ids: Tensor  # (B, T')
    routes: Tensor  # (B, T') route ids
    labels: Tensor | None  # (B, T') with IGNORE_INDEX over blocks and padding


def count_placeholders(input_ids: Tensor) -> dict[str, int]:
    return {m: int((input_ids == s).sum()) for m, s in SENTINELS.items()}


def splice(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    embed: Callable[[Tensor], Tensor],
    blocks: Mapping[str, Tensor],
    labels: Tensor | None = None,
    padding_side: Literal["left", "right"] = "right",
) -> Spliced:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    counts = count_placeholders(input_ids[attention_mask.bool()])
    for m in MODALITIES:
        have = blocks[m].shape[0] if m in blocks else 0
        if counts[m] != have:
            raise PlaceholderError(
                f"the prompt(s) hold {counts[m]} <{m}> placeholder(s) but {have} {m} input(s) "
                "were given",
                hint=f"put one <{m}> in the text for each {m} input, in order",
            )
    # (B, T, d); sentinel rows are replaced below. Padding is embedded as id 0: its id may be
    # a token the model lacks (llava-hf's <pad> after base_vocab_size), and it is masked.
    text = embed(torch.where(attention_mask.bool(), input_ids, 0).clamp(min=0))
    used = dict.fromkeys(MODALITIES, 0)
    rows: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool()
        ids, emb = input_ids[b][keep], text[b][keep]
        lab = labels[b][keep] if labels is not None else None
        pieces, routes, labs = [], [], []
        start = 0
        for pos in (ids < 0).nonzero().flatten().tolist():
            m = SENTINEL_TO_MODALITY.get(int(ids[pos]))
            if m is None:
                raise PlaceholderError(f"unknown placeholder id {int(ids[pos])} in input_ids")
            _text_span(emb, lab, start, pos, pieces, routes, labs)
            block = blocks[m][used[m]].to(emb.dtype)
            used[m] += 1
            pieces.append(block)
            routes.append(torch.full((block.shape[0],), ROUTE_IDS[m], dtype=torch.long))
            labs.append(torch.full((block.shape[0],), IGNORE_INDEX, dtype=torch.long))
            start = pos + 1
        _text_span(emb, lab, start, ids.shape[0], pieces, routes, labs)
        rows.append(
            (torch.cat(pieces), torch.cat(routes), torch.cat(labs) if lab is not None else None)
        )
    return _pad(rows, text.dtype, text.device, padding_side, with_labels=labels is not None)


def _text_span(emb, lab, start, end, pieces, routes, labs) -> None:
    if end <= start:
        return
    pieces.append(emb[start:end])
    routes.append(torch.full((end - start,), ROUTE_IDS["text"], dtype=torch.long))
    labs.append(lab[start:end] if lab is not None else torch.empty(0, dtype=torch.long))


def _pad(rows, dtype, device, side, with_labels: bool) -> Spliced:
    bsz, width = len(rows), max(r[0].shape[0] for r in rows)
    d = rows[0][0].shape[1]
    embeds = torch.zeros(bsz, width, d, dtype=dtype, device=device)
    mask = torch.zeros(bsz, width, dtype=torch.long, device=device)
    routes = torch.zeros(bsz, width, dtype=torch.long, device=device)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long, device=device)
    for b, (e, r, lab) in enumerate(rows):
        n = e.shape[0]
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        embeds[b, sl], mask[b, sl], routes[b, sl] = e, 1, r.to(device)
        if with_labels:
            labels[b, sl] = lab.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Spliced(embeds, mask, position_ids, routes, labels if with_labels else None)
