"""Alignment losses (pure torch): symmetric InfoNCE, Smooth-L1 regression, the weighted step loss,
and the cross-rank gather that gives every rank the global batch as negatives."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "DEFAULT_TEMPERATURE",
    "gather_with_grad",
    "info_nce",
    "regression_loss",
    "step_loss",
]

DEFAULT_TEMPERATURE = 0.03


def _targets(n: int, groups: Tensor | None, device: torch.device) -> Tensor:
    """(n, n) target distribution per row: the diagonal, or uniform over same-group columns.

    Groups make in-batch duplicates (two images captioned "a drawing of a bird") positives
    rather than negatives, which plain InfoNCE would push apart."""
    if groups is None:
        return torch.eye(n, device=device)
    same = (groups.unsqueeze(0) == groups.unsqueeze(1)).float()
    return same / same.sum(dim=1, keepdim=True)


def info_nce(
    queries: Tensor,
    keys: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    groups: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE over in-batch pairs with cosine logits / temperature.

    ``queries[i]`` and ``keys[i]`` are a positive pair; every other row is a negative unless
    ``groups`` (n,) marks it as the same item. Returns the mean of the two directions' CE."""
    q = F.normalize(queries, dim=-1)
    k = F.normalize(keys, dim=-1)
    logits = q @ k.T / temperature
    target = _targets(logits.shape[0], groups, logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


def regression_loss(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    """Smooth-L1 (Huber with ``beta``) between predicted and target pooled latents."""
    return F.smooth_l1_loss(pred, target, beta=beta)


def step_loss(cl: Tensor, reg: Tensor, cl_weight: float = 0.5, reg_weight: float = 0.5) -> Tensor:
    """The reference step loss ``0.5 * (L_cl + L_reg)``, weights configurable."""
    return cl_weight * cl + reg_weight * reg


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank (rank order) keeping the autograd graph.

    As open_clip's ``--gather-with-grad``: each rank computes the loss over the global batch;
    the gather's backward sums the gradient of every rank's loss into the local features, and
    averaging parameter gradients over ranks then yields exactly the single-process gradient.
    A no-op without an initialised process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
