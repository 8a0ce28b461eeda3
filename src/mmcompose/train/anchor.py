"""Closed-form projector initialisation: least squares onto the answer words' embeddings.

Stage 1 starts from a random projector and has to discover, through a frozen LLM, which
point of the embedding space makes the LLM say "cow". On a CPU budget of a few hundred steps
that search barely starts. But the destination is known: a frozen instruction-tuned LLM that
reads the *embedding of the word* in place of the modality block answers "What is this?" with
that word (SmolLM2-135M: 24 of 25 labels by log-likelihood). So we fit the projector's last
linear layer by ridge regression from its input (encoder features through the earlier,
still random, layers) to the embeddings of the training answers' tokens, then let stages 1
and 2 refine it by gradient descent. This is the linear-mapping idea of LiMBeR (Merullo et
al., 2023) used as an initialisation; it needs one pass over the cached features and one
solve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def answer_targets(
    embedding: Tensor, answers: Sequence[Sequence[int]], n_out: int, pad: Tensor
) -> Tensor:
    """(n, n_out, d) targets: the answer's token embeddings, then ``pad`` (a newline's
    embedding) for the remaining positions; an answer longer than ``n_out`` is cut.

    Measured on SmolLM2-135M with exact embeddings in the block (19 labels, 4 tokens, no
    prefix/suffix): word + newlines 19/19, word + repeats of its last token 4/19
    (``benchmarks/anchor_probe.py``)."""
    rows = []
    for ids in answers:
        if not ids:
            raise ValueError("every answer needs at least one token")
        toks = [embedding[t] for t in list(ids)[:n_out]]
        toks += [pad] * (n_out - len(toks))
        rows.append(torch.stack(toks))
    return torch.stack(rows)


def last_linear(module: nn.Module) -> nn.Linear:
    """The projector's output layer (the last ``nn.Linear`` registered in it)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no linear layer to fit")
    return linears[-1]


@torch.no_grad()
def fit_output_layer(
    projector: nn.Module, features: Tensor, targets: Tensor, ridge: float = 0.1
) -> float:
    """Set the projector's last linear layer to the ridge solution mapping ``features``
    (n, N, d_in) to ``targets`` (n, N', d_out); returns the relative residual.

    ``ridge`` is relative to the mean eigenvalue of the centred design's Gram matrix, so it
    means the same for encoders of any width or scale. The bias is fitted, not penalised (a
    layer without bias keeps the centred solution)."""
    layer = last_linear(projector)
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    try:
        out = projector(features)
    finally:
        handle.remove()
    h = captured[0].reshape(-1, layer.in_features).double()
    y = targets.reshape(out.shape).reshape(h.shape[0], layer.out_features).double()
    # Centre both sides: encoder features share a large common component (silence, the
    # background), which would otherwise dominate the ridge scale and flatten the fit.
    mu_h, mu_y = h.mean(0), y.mean(0)
    hc, yc = h - mu_h, y - mu_y
    gram = hc.T @ hc
    lam = ridge * torch.diagonal(gram).mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    w = torch.linalg.solve(gram + lam * eye, hc.T @ yc)  # (in, out)
    layer.weight.copy_(w.T.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((mu_y - mu_h @ w).to(layer.bias.dtype))
    fitted = projector(features).reshape(y.shape).double()
    return float((fitted - y).norm() / y.norm())
