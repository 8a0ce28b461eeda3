"""LoRA with per-token routing.

Every adapted linear shares one :class:`TokenRouter`. Before a forward pass the model tells
the router which adapter each token uses; the router turns that into index lists once, and
every :class:`LoRALinear` then applies each adapter to its own tokens only: on row slices of
the activations where its tokens form a few contiguous runs (a modality block per sequence,
the usual case), else by gather, low-rank product and scatter-add. Nothing is computed over all tokens and then masked, so the cost of
decoupled adapters (DAMC) does not grow with the number of modalities. Because the MLP is
position-wise, routing gate/up/down per token gives each token its own adapter's whole MLP
path, exactly as the masked reference computes it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Route ids carried per token: 0 = text (and padding), i + 1 = MODALITIES[i].
TEXT_ROUTE = 0
# After fold_text_adapter: the adapter that takes tokens that had none back to W.
BASE_ADAPTER = "_base"
# A group of tokens in at most this many contiguous runs (a modality block per sequence) is
# applied on row slices of the activations: views, no gather or scatter copies.
MAX_RUNS = 32


def contiguous_runs(idx: Tensor, max_runs: int | None = None) -> tuple[tuple[int, int], ...] | None:
    """``idx`` (sorted, 1-D) as (start, length) runs of consecutive rows, or None when there
    are more than ``max_runs`` (default :data:`MAX_RUNS`) of them."""
    max_runs = MAX_RUNS if max_runs is None else max_runs
    if idx.numel() == 0:
        return ()
    breaks = (idx[1:] - idx[:-1] != 1).nonzero().squeeze(1)
    if breaks.numel() + 1 > max_runs:
        return None
    starts = [0, *(breaks + 1).tolist()]
    ends = [*(breaks + 1).tolist(), idx.numel()]
    first = idx[starts].tolist()
    return tuple((f, e - s) for f, s, e in zip(first, starts, ends, strict=True))


class TokenRouter:
    """Shared, per-forward routing state: which token rows each adapter applies to."""

    def __init__(self, route_to_adapter: dict[int, str | None]) -> None:
        self.route_to_adapter = dict(route_to_adapter)
        self.routes: Tensor | None = None
        self.groups: list[tuple[str, Tensor | None]] = self._default_groups()
        # Adapter name -> its rows as contiguous (start, length) runs, where there are few.
        self.runs: dict[str, tuple[tuple[int, int], ...]] = {}

    def _default_groups(self) -> list[tuple[str, Tensor | None]]:
        name = self.route_to_adapter.get(TEXT_ROUTE)
        return [(name, None)] if name is not None else []

    def set_routes(self, routes: Tensor | None) -> None:
        """``routes``: (B, T) route ids, or None when every token is text (decoding)."""
        self.routes = routes
        self.runs = {}
        if routes is None:
            self.groups = self._default_groups()
            return
        flat = routes.reshape(-1)
        by_adapter: dict[str, list[int]] = {}
        for rid in torch.unique(flat).tolist():
            name = self.route_to_adapter.get(rid)
            if name is not None:
                by_adapter.setdefault(name, []).append(rid)
        groups: list[tuple[str, Tensor | None]] = []
        for name, rids in by_adapter.items():
            mask = torch.isin(flat, torch.tensor(rids, device=flat.device))
            idx = mask.nonzero().squeeze(1)
            if idx.numel() == flat.numel():
                groups.append((name, None))
                continue
            groups.append((name, idx))
            if (runs := contiguous_runs(idx)) is not None:
                self.runs[name] = runs
        self.groups = groups

    @contextlib.contextmanager
    def routing(self, routes: Tensor | None) -> Iterator[None]:
        self.set_routes(routes)
        try:
            yield
        finally:
            self.set_routes(None)


class LoRAAdapter(nn.Module):
    """delta(x) = scaling * B(A(dropout(x))). A: (r, in), B: (out, r), B zero-initialised."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _down(self, x: Tensor) -> Tensor:
        """``scaling * A(dropout(x))``, skipping what does nothing: called once per adapter,
        layer and token run (hundreds of times a prefill), so the identity dropout outside
        training, a cast to the dtype ``A`` already has and a scaling of 1 cost dispatch."""
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
        a = self.lora_A
        h = F.linear(x, a if a.dtype == x.dtype else a.to(x.dtype))
        # Scaling on the rank-r product: r/out of the work of scaling the output.
        return h if self.scaling == 1 else h * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        h = self._down(x)
        b = self.lora_B
        return F.linear(h, b if b.dtype == h.dtype else b.to(h.dtype))

    def add_to(self, out: Tensor, x: Tensor) -> None:
        """``out += delta(x)`` for 2-D ``x`` and ``out``, in place: the second product
        accumulates into ``out`` (addmm) instead of making a delta to add."""
        h = self._down(x)
        b = self.lora_B
        out.addmm_(h.to(out.dtype), (b if b.dtype == out.dtype else b.to(out.dtype)).t())

    def delta_weight(self) -> Tensor:
        """The dense update dW = scaling * B @ A, shape (out, in), in at least float32 (half
        precision adapters are upcast; float64 ones stay float64)."""
        dtype = torch.promote_types(self.lora_B.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``/``bias`` names) with routed LoRA adapters."""

    def __init__(self, base: nn.Linear, router: TokenRouter) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora = nn.ModuleDict()
        self.router = router

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        self.lora[name] = LoRAAdapter(self.in_features, self.out_features, rank, alpha, dropout)
        self.lora[name].to(device=self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.lora or not self.router.groups:  # e.g. decoding after folding
            return y
        flat_x = x.reshape(-1, self.in_features)
        # In place on y, a fresh output that F.linear's backward does not need: one pass
        # over y per adapter instead of a copy of it.
        flat_y = y.view(-1, self.out_features)
        runs = self.router.runs
        for name, idx in self.router.groups:
            if name not in self.lora:
                continue
            adapter = self.lora[name]
            if idx is None:
                adapter.add_to(flat_y, flat_x)
            elif name in runs:  # row slices (views) of x and y, no copies
                for start, n in runs[name]:
                    adapter.add_to(flat_y.narrow(0, start, n), flat_x.narrow(0, start, n))
            else:
                delta = adapter(flat_x.index_select(0, idx))
                flat_y.index_add_(0, idx, delta.to(y.dtype))
        return y

    @torch.no_grad()
    def merge_adapter(self, name: str) -> None:
        """Fold an adapter into the base weight (used when no token needs W0 any more)."""
        adapter = self.lora.pop(name)
        self.weight += adapter.delta_weight().to(self.weight.dtype)


def inject_lora(
    llm: nn.Module,
    router: TokenRouter,
    target_modules: Sequence[str],
    adapters: dict[str, tuple[int, float]],
    dropout: float = 0.0,
) -> list[str]:
    """Replace the targeted ``nn.Linear`` layers of ``llm`` by routed LoRA layers.

    Returns the qualified names of the replaced modules. ``adapters`` maps name -> (rank, alpha).
    """
    targets = set(target_modules)
    replaced: list[str] = []
    for qname, module in list(llm.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        leaf = qname.rsplit(".", 1)[-1]
        if leaf not in targets:
            continue
        parent = llm.get_submodule(qname.rsplit(".", 1)[0]) if "." in qname else llm
        layer = LoRALinear(module, router)
        for name, (rank, alpha) in adapters.items():
            layer.add_adapter(name, rank, alpha, dropout)
        setattr(parent, leaf, layer)
        replaced.append(qname)
    return replaced


@torch.no_grad()
def fold_text_adapter(llm: nn.Module, router: TokenRouter) -> int:
    """Fold the text adapter into the base weights, for inference only; returns the number of
    layers changed.

    Most tokens are text, and a LoRA product costs a gather, two thin matmuls and a
    scatter-add per layer. After folding, ``W' = W + dW_text`` serves text tokens with no
    adapter at all, and each other adapter ``m`` becomes ``dW_m - dW_text`` (a rank
    ``r_m + r_text`` adapter applied to its own tokens only), so every token still sees
    exactly ``W + dW_<its adapter>``. The weights no longer match the model's config: a
    folded model must not be saved or trained."""
    text = router.route_to_adapter.get(TEXT_ROUTE)
    if text is None:
        return 0
    # Tokens whose route has no adapter used W alone; after folding they need -dW_text.
    base_routes = [rid for rid, name in router.route_to_adapter.items() if name is None]
    changed = 0
    for _, layer in lora_layers(llm):
        if text not in layer.lora:
            continue
        t = layer.lora[text]
        layer.merge_adapter(text)
        parts = {name: (a.lora_A, a.lora_B * a.scaling) for name, a in layer.lora.items()}
        if base_routes:
            parts[BASE_ADAPTER] = (t.lora_A[:0], t.lora_B[:, :0])
        for name, (a_in, b_out) in parts.items():
            rank = a_in.shape[0] + t.rank
            diff = LoRAAdapter(layer.in_features, layer.out_features, rank, rank)
            diff = diff.to(device=layer.weight.device, dtype=t.lora_A.dtype)
            diff.lora_A.copy_(torch.cat([a_in, t.lora_A]))
            diff.lora_B.copy_(torch.cat([b_out, -t.lora_B * t.scaling], dim=1))
            diff.requires_grad_(False)
            layer.lora[name] = diff
        changed += 1
    router.route_to_adapter = {
        rid: BASE_ADAPTER if name is None else (None if name == text else name)
        for rid, name in router.route_to_adapter.items()
    }
    router.set_routes(None)
    return changed


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m
