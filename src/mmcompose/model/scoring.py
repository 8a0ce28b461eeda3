"""Packed log-likelihood scoring: many prompts, each with many continuations, in one forward.

lm-evaluation-harness scores a multiple-choice item by running prompt + option once per
option. With a KV cache the prompt runs once, but every option length still costs its own
small forward pass, and on a CPU small matrix products run at a fraction of the machine's
speed. Here each prompt is followed in the same row by all of its continuations side by side
(a "tree" of branches that share the prompt), with an attention mask that lets each branch
see the prompt and its own earlier tokens only, and position ids that restart every branch
right after the prompt. Several such rows form one batch. Every continuation token then gets
exactly the logits it would get after the prompt alone, and a whole label set (73 labels,
~120 tokens) costs one forward of ~150 tokens instead of one per option length.

Only the layout is computed here (pure tensors, no model); :meth:`score_requests` on the
model embeds, runs and gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedRow:
    """The continuation part of one row, after a prompt of ``prompt_len`` positions.

    ``tokens``/``positions``/``branch``: the continuation tokens that are fed (every token of
    every continuation but its last), their position ids, and which continuation each belongs
    to. ``queries``/``targets``/``owner``: for each scored token, the row index whose logits
    predict it, the token, and its continuation."""

    prompt_len: int
    tokens: Tensor  # (n,)
    positions: Tensor  # (n,)
    branch: Tensor  # (n,)
    queries: Tensor  # (m,) indices into the row (prompt + fed tokens)
    targets: Tensor  # (m,)
    owner: Tensor  # (m,)

    @property
    def length(self) -> int:
        return self.prompt_len + int(self.tokens.numel())


def pack_continuations(prompt_len: int, continuations: Sequence[Sequence[int]]) -> PackedRow:
    if prompt_len < 1:
        raise ValueError("a prompt needs at least one position")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    tokens: list[int] = []
    positions: list[int] = []
    branch: list[int] = []
    queries: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    for k, cont in enumerate(continuations):
        query = prompt_len - 1  # the prompt's last position predicts each first token
        for j, tok in enumerate(cont):
            queries.append(query)
            targets.append(int(tok))
            owner.append(k)
            if j < len(cont) - 1:  # fed, so that it predicts the next token
                query = prompt_len + len(tokens)
                tokens.append(int(tok))
                positions.append(prompt_len + j)
                branch.append(k)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedRow(
        prompt_len,
        as_long(tokens),
        as_long(positions),
        as_long(branch),
        as_long(queries),
        as_long(targets),
        as_long(owner),
    )


def allowed_attention(row: PackedRow, length: int) -> Tensor:
    """(length, length) bool: causal over the prompt, each branch sees the prompt and its own
    earlier tokens; positions past the row (padding) see only themselves, so no softmax row is
    empty."""
    n = row.length
    idx = torch.arange(length)
    branch = torch.full((length,), -2, dtype=torch.long)
    branch[: row.prompt_len] = -1
    branch[row.prompt_len : n] = row.branch
    causal = idx[None, :] <= idx[:, None]
    same = (branch[None, :] == -1) | (branch[None, :] == branch[:, None])
    allowed = causal & same
    allowed[n:, :] = False
    allowed[idx[n:], idx[n:]] = True
    return allowed


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L, L) bool -> (B, 1, L, L) additive float mask, as Hugging Face attention takes."""
    zero = torch.zeros((), dtype=dtype)
    neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None]


def batches_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of rows whose padded size (rows x longest) stays within
    ``max_tokens`` (a row longer than that gets a batch of its own)."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out
