"""Sign election and the disjoint sum (TIES), whole-tensor, blocked and streamed.

TIES elects a sign per entry from all task vectors at once, so the obvious implementation
stacks them: ``n`` float32 copies of the tensor. On a 32000 x 4096 embedding that is 0.5 GB
per model. :func:`streamed_disjoint` keeps, per model, only which entries survive
sparsification (a bit per entry) and recomputes ``tau_i = x_i - base`` block by block when it
elects: one tensor-sized float32 buffer (for the magnitude selection) instead of ``n``.

Every variant performs the same float operations on each entry in the same order as
:func:`disjoint_sum` on the whole stack, so the bits are the same (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from mmcompose.compose.selection import magnitude_keep, outlier_slice, top_k_slice
from mmcompose.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")

Consensus = Literal["sum", "count"]
Semantics = Literal["mergekit", "peft"]
# The sparsifications whose survivors are a magnitude slice of each task vector (the ones
# streamed); ``random`` draws one Bernoulli tensor per model from the generator and stays on
# the stacked path.
STREAMED = ("none", "magnitude", "magnitude_outliers")
# Input pages behind the cursor are released every this many entries of the stream.
_RELEASE_EVERY = 1 << 24


def l1_ratio(before: Tensor, after: Tensor, eps: float = 1e-7) -> Tensor | None:
    """The factor that gives sparsified tau back its L1 norm (mergekit's rescale), or None
    where either norm is too small to divide by (then tau is left as it is)."""
    return None if before < eps or after < eps else before / after


def majority_mask(taus: Tensor, consensus: Consensus) -> Tensor:
    """1.0 where sign(tau_i) is the elected sign, else 0.0 (in taus' dtype)."""
    votes = taus.sum(dim=0) if consensus == "sum" else taus.sign().sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(taus.dtype)  # ties go to +
    return torch.mul(taus, majority).gt_(0)  # tau * (+-1) > 0: its sign is the majority


def disjoint_sum(
    taus: Tensor,
    weights: list[float],
    consensus: Consensus,
    semantics: Semantics,
    normalize: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Sum the w_i * tau_i whose sign agrees with the elected one; also the divisor if normalize.

    Works in place on ``taus`` (the stacked task vectors).
    """
    w = torch.tensor(weights, dtype=taus.dtype, device=taus.device)
    w = w.view(-1, *([1] * (taus.dim() - 1)))
    if semantics == "peft":  # PEFT elects on unweighted task vectors
        agree = majority_mask(taus, consensus)
        taus.mul_(w)
    else:
        taus.mul_(w)
        agree = majority_mask(taus, consensus)
    mixed = taus.mul_(agree).sum(dim=0)
    if not normalize:
        return mixed, None
    divisor = (agree.mul_(w) if semantics == "mergekit" else agree).sum(dim=0)
    return mixed, divisor.masked_fill_(divisor == 0, 1)


def _finish(
    mixed: Tensor, divisor: Tensor | None, lambda_: float, base: Tensor | None, out: Tensor
) -> None:
    """The rest of ``task_vector_merge`` on one block: divide, scale, add the base, cast."""
    if divisor is not None:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    if base is not None:
        mixed.add_(base)
    out.copy_(mixed)


def blocked_disjoint(
    taus: Tensor,
    weights: list[float],
    consensus: Consensus,
    semantics: Semantics,
    normalize: bool,
    lambda_: float,
    base: Tensor | None,
    dtype: torch.dtype,
    block: int,
) -> Tensor:
    """:func:`disjoint_sum` and the rest of the merge over column blocks of the stacked task
    vectors, straight into the result.

    The sign election and the sums are per entry, and each block is a (n, b) view with the
    whole stack's strides, so every entry goes through the same operations in the same order
    and the bits are the same; but about a dozen passes over the (n, ...) float32 stack become
    one, in blocks that stay in cache."""
    n = taus.shape[0]
    flat = taus.view(n, -1)
    out = torch.empty(taus.shape[1:], dtype=dtype, device=taus.device)
    flat_out = out.view(-1)
    flat_base = None if base is None else base.reshape(-1)
    step = max(1, block // n)
    for s in range(0, flat.shape[1], step):
        e = min(flat.shape[1], s + step)
        mixed, divisor = disjoint_sum(flat[:, s:e], weights, consensus, semantics, normalize)
        _finish(
            mixed, divisor, lambda_, None if flat_base is None else flat_base[s:e], flat_out[s:e]
        )
    return out


def streamed_disjoint(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weights: list[float],
    *,
    sparsify: str,
    densities: list[float],
    gammas: list[float],
    rescale: bool,
    consensus: Consensus,
    semantics: Semantics,
    normalize: bool,
    lambda_: float,
    work: torch.dtype,
    dtype: torch.dtype,
    block: int,
) -> Tensor:
    """TIES-style merge with one tensor-sized float buffer, whatever the number of models.

    Pass 1, per model: ``tau_i`` into the buffer, its survivors by magnitude (the same
    selection as the stacked path, partitioning the buffer in place), kept as packed bits, and
    the rescale factor. Pass 2, per block: ``tau_i`` again from the inputs, masked, rescaled,
    then :func:`disjoint_sum` and the rest. Mapped input pages are released as the passes
    leave them (:func:`~mmcompose.compose.tensor_io.release_pages`), so the inputs do not
    stay resident either.
    """
    from mmcompose.compose.tensor_io import release_pages

    if sparsify not in STREAMED:
        raise ValueError(f"sparsify {sparsify!r} is not streamed")
    flats = [t.reshape(-1) for t in tensors]
    flat_base = None if base is None else base.reshape(-1)
    inputs = [*flats] if flat_base is None else [*flats, flat_base]
    size = flats[0].numel()
    n = len(flats)
    scratch: Tensor | None = None
    bits: list[np.ndarray | None] = []
    scales: list[Tensor | float | None] = []  # mul_ factor (mergekit L1) or div_ (peft)

    def task_vector_into(t: Tensor, out: Tensor) -> Tensor:
        for s in range(0, size, block):
            e = min(size, s + block)
            if flat_base is None:
                out[s:e].copy_(t[s:e])
            else:  # as torch.sub(t, base.to(work)): t promoted to work, then subtracted
                torch.sub(t[s:e], flat_base[s:e].to(work), out=out[s:e])
        for x in (t, flat_base):  # read once: out of the resident set until pass 2
            if x is not None:
                release_pages(x)
        return out

    for x in inputs:  # a reader may have touched them all (its finiteness check)
        release_pages(x)

    for t, density, gamma in zip(flats, densities, gammas, strict=True):
        if sparsify == "none" or density >= 1:
            bits.append(None)
            scales.append(None)
            continue
        if scratch is None:
            scratch = torch.empty(size, dtype=work)
        tau = task_vector_into(t, scratch)
        before = tau.abs().sum() if rescale and semantics == "mergekit" else None

        def refill(w: Tensor, t: Tensor = t) -> None:
            task_vector_into(t, w).abs_()

        w = tau.abs_()
        start, stop, descending = (
            top_k_slice(size, density)
            if sparsify == "magnitude"
            else outlier_slice(size, density, gamma)
        )
        keep = magnitude_keep(w, start, stop, descending=descending, refill=refill)
        scale: Tensor | float | None = None
        if rescale and before is not None:
            refill(w)
            after = w.mul_(keep).sum()  # |tau * keep| entry for entry, summed in order
            scale = l1_ratio(before, after)
        elif rescale:
            scale = float(density)
        bits.append(np.packbits(keep.numpy()))
        scales.append(scale)
        del keep
    del scratch

    out = torch.empty(tensors[0].shape, dtype=dtype)
    flat_out = out.view(-1)
    step = max(8, block // n // 8 * 8)  # a multiple of 8: blocks start on whole mask bytes
    stack = torch.empty((n, step), dtype=work)
    base_buf = None if flat_base is None else torch.empty(step, dtype=work)
    released = 0
    for s in range(0, size, step):
        e = min(size, s + step)
        blk = stack[:, : e - s]
        c = None
        if flat_base is not None and base_buf is not None:
            c = base_buf[: e - s].copy_(flat_base[s:e])
        for i, t in enumerate(flats):
            row = blk[i]
            if c is None:
                row.copy_(t[s:e])
            else:
                torch.sub(t[s:e], c, out=row)
            mask = bits[i]
            if mask is not None:
                keep = np.unpackbits(mask[s // 8 : (e + 7) // 8], count=e - s).view(bool)
                row.mul_(torch.from_numpy(keep))  # as tau.mul_(0/1 mask): -0.0 stays -0.0
                scale = scales[i]
                if isinstance(scale, float):
                    row.div_(scale)
                elif scale is not None:
                    row.mul_(scale)
        mixed, divisor = disjoint_sum(blk, weights, consensus, semantics, normalize)
        _finish(mixed, divisor, lambda_, c, flat_out[s:e])
        if e - released >= _RELEASE_EVERY or e == size:
            for x in inputs:
                release_pages(x, released * x.element_size(), e * x.element_size())
            released = e
    return out
