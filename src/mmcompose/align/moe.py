"""The Alt-MoE connector: one module shared by every alignment direction (pure torch, no I/O).

Shapes: B batch, L source tokens, H hidden, E experts, k experts per token.

For a direction ``(src, tgt)``:

    x   = GELU(Linear_src(tokens)) + dir_emb[d]                     (B, L, H)
    u_s = x + task_emb[s]                      s in {reg, cl}         (B, L, H)
    o_s = GELU(LayerNorm_s(MoE(u_s))) + u_s    one shared gate + expert pool
    reg = reg_head[d](pool(o_reg))             (B, d_tgt)   vs the target's pooled latent
    cl  = cl_head[d](pool(o_cl))               (B, H)       vs tgt_proj[d](target pooled)

Heads are linear, so ``pool(head(o)) == head(pool(o))``: we pool first (cheaper), and the
contrastive target ``pool(Linear(tgt_tokens))`` is ``Linear(pool(tgt_tokens))``, which lets the
target side (and a pre-stored gallery) use pooled latents only.

Baselines with the same interface: ``kind="mlp"`` (one MLP in place of the MoE) and
``kind="linear"`` (per-direction linear maps of the pooled source latent, no shared module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "STREAMS",
    "AltMoEConnector",
    "ConnectorConfig",
    "ConnectorOutput",
    "Expert",
    "GateOutput",
    "MoE",
    "direction_name",
    "load_balancing_loss",
    "masked_mean",
    "top_k_gate",
]

STREAMS = ("reg", "cl")
Direction = tuple[str, str]


def direction_name(direction: Direction) -> str:
    """``("image", "text")`` -> ``"image->text"`` (module keys; no dots allowed there)."""
    return f"{direction[0]}->{direction[1]}"


class ConnectorConfig(BaseModel):
    """Architecture of the connector; ``modalities`` maps each modality to its latent width."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["moe", "mlp", "linear"] = "moe"
    hidden: int = Field(default=256, gt=0)
    num_experts: int = Field(default=12, gt=0)
    top_k: int = Field(default=4, gt=0)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    renormalize: bool = False  # reference: top-k weights are NOT renormalised
    modalities: dict[str, int] = Field(default_factory=dict)
    directions: tuple[tuple[str, str], ...] = ()

    @model_validator(mode="after")
    def _check(self) -> ConnectorConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        for src, tgt in self.directions:
            if src == tgt:
                raise ValueError(f"direction {src}->{tgt}: source and target must differ")
            for m in (src, tgt):
                if self.modalities and m not in self.modalities:
                    raise ValueError(f"direction {src}->{tgt} names unknown modality {m!r}")
        if len(set(self.directions)) != len(self.directions):
            raise ValueError("directions must be unique")
        return self


# =========================================================================== pure functions
def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of (B, L, D) counting only ``mask`` (B, L) positions (padding excluded)."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


@dataclass(frozen=True)
class GateOutput:
    probs: Tensor  # (N, E) full softmax
    weights: Tensor  # (N, k) weights applied to the chosen experts
    experts: Tensor  # (N, k) chosen expert indices


def top_k_gate(logits: Tensor, k: int, renormalize: bool = False) -> GateOutput:
    """Softmax over all experts, keep the top k. Without renormalisation (the reference) the
    kept weights sum to < 1, so a token's output scale also encodes the gate's confidence."""
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return GateOutput(probs=probs, weights=weights, experts=experts)


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` (1.0 when perfectly uniform).

    ``f_e``: share of the N*k routing slots sent to expert e (not differentiable);
    ``P_e``: mean gate probability of e (carries the gradient)."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(experts.flatten(), minlength=num_experts).to(probs.dtype)
    frac = counts / experts.numel()
    return num_experts * (frac * probs.mean(dim=0)).sum()


# =========================================================================== modules
class Expert(nn.Sequential):
    """Linear(H,H)-GELU-Dropout-Linear(H,H)-Dropout, as in the reference."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.Dropout(dropout),
        )


class MoE(nn.Module):
    """E experts behind one softmax top-k gate, applied per token; no noise, no capacity limit.

    Tokens are dispatched: each expert runs only on the tokens routed to it (sorted by expert,
    one contiguous slice each), so the cost is k/E of running every expert on every token.
    """

    def __init__(
        self, hidden: int, num_experts: int, top_k: int, dropout: float, renormalize: bool = False
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden, num_experts)
        self.experts = nn.ModuleList(Expert(hidden, dropout) for _ in range(num_experts))

    def route(self, x: Tensor) -> GateOutput:
        return top_k_gate(self.gate(x), self.top_k, self.renormalize)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, H) tokens -> (N, H) outputs and the load-balancing loss of this routing."""
        g = self.route(x)
        n, k = g.experts.shape
        flat_expert = g.experts.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)
        token = torch.arange(n, device=x.device).repeat_interleave(k)[order]
        weight = g.weights.reshape(-1)[order].unsqueeze(-1)
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts, strict=True):
            if count:
                idx = token[start : start + count]
                out.index_add_(0, idx, weight[start : start + count] * expert(x[idx]))
            start += count
        return out, load_balancing_loss(g.probs, g.experts)

    def forward_dense(self, x: Tensor) -> Tensor:
        """Reference: every expert on every token, weighted by the (zero outside top-k) gate."""
        g = self.route(x)
        dense = torch.zeros_like(g.probs).scatter(-1, g.experts, g.weights)  # (N, E)
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # (N, E, H)
        return (dense.unsqueeze(-1) * outs).sum(dim=1)


class _MLPBlock(nn.Module):
    """The ``mlp`` baseline: one expert, always on, same call signature as :class:`MoE`."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = Expert(hidden, dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.mlp(x), x.new_zeros(())


@dataclass(frozen=True)
class ConnectorOutput:
    reg: Tensor  # (B, d_tgt) predicted target latent
    cl: Tensor  # (B, H) contrastive query (not normalised)
    aux_loss: Tensor  # scalar load-balancing loss (0 for mlp / linear)


class AltMoEConnector(nn.Module):
    """The multi-directional connector (or one of its baselines, by ``cfg.kind``)."""

    def __init__(self, cfg: ConnectorConfig) -> None:
        super().__init__()
        if not cfg.modalities or not cfg.directions:
            raise ValueError("ConnectorConfig needs modalities and directions")
        self.cfg = cfg
        h, dims = cfg.hidden, cfg.modalities
        self.directions: list[Direction] = [tuple(d) for d in cfg.directions]  # type: ignore[misc]
        names = [direction_name(d) for d in self.directions]
        sources = sorted({s for s, _ in self.directions})
        if cfg.kind == "linear":
            self.linear_reg = nn.ModuleDict(
                {
                    n: nn.Linear(dims[s], dims[t])
                    for n, (s, t) in zip(names, self.directions, strict=True)
                }
            )
            self.linear_cl = nn.ModuleDict(
                {n: nn.Linear(dims[s], h) for n, (s, _) in zip(names, self.directions, strict=True)}
            )
        else:
            self.in_proj = nn.ModuleDict(
                {m: nn.Sequential(nn.Linear(dims[m], h), nn.GELU()) for m in sources}
            )
            self.dir_emb = nn.Parameter(torch.randn(len(names), h) * 0.02)
            self.task_emb = nn.Parameter(torch.randn(len(STREAMS), h) * 0.02)
            self.mixer: nn.Module = (
                MoE(h, cfg.num_experts, cfg.top_k, cfg.dropout, cfg.renormalize)
                if cfg.kind == "moe"
                else _MLPBlock(h, cfg.dropout)
            )
            self.norms = nn.ModuleDict({s: nn.LayerNorm(h) for s in STREAMS})
            self.reg_head = nn.ModuleDict(
                {n: nn.Linear(h, dims[t]) for n, (_, t) in zip(names, self.directions, strict=True)}
            )
            self.cl_head = nn.ModuleDict({n: nn.Linear(h, h) for n in names})
        self.tgt_proj = nn.ModuleDict(
            {n: nn.Linear(dims[t], h) for n, (_, t) in zip(names, self.directions, strict=True)}
        )

    def _index(self, direction: Direction) -> int:
        try:
            return self.directions.index(tuple(direction))  # type: ignore[arg-type]
        except ValueError:
            known = ", ".join(direction_name(d) for d in self.directions)
            raise KeyError(
                f"direction {direction_name(direction)} not trained; known: {known}"
            ) from None

    def forward(
        self, direction: Direction, tokens: Tensor, mask: Tensor | None = None
    ) -> ConnectorOutput:
        """Source tokens (B, L, d_src) + mask (B, L) -> predictions in the target's spaces."""
        i = self._index(direction)
        name = direction_name(self.directions[i])
        if self.cfg.kind == "linear":
            pooled = masked_mean(tokens, mask)
            return ConnectorOutput(
                self.linear_reg[name](pooled), self.linear_cl[name](pooled), tokens.new_zeros(())
            )
        b, seq = tokens.shape[:2]
        x = self.in_proj[direction[0]](tokens) + self.dir_emb[i]  # (B, L, H)
        u = torch.stack([x + self.task_emb[j] for j in range(len(STREAMS))])  # (2, B, L, H)
        if mask is None:
            mask = torch.ones(b, seq, dtype=torch.bool, device=tokens.device)
        valid = mask.bool().unsqueeze(0).expand(len(STREAMS), b, seq)
        routed, aux = self.mixer(u[valid])  # (tokens, H): padding never reaches the experts
        mixed = torch.zeros_like(u).masked_scatter(valid.unsqueeze(-1), routed)
        pooled = {}
        for j, stream in enumerate(STREAMS):
            o = F.gelu(self.norms[stream](mixed[j])) + u[j]
            pooled[stream] = masked_mean(o, mask)
        return ConnectorOutput(
            self.reg_head[name](pooled["reg"]), self.cl_head[name](pooled["cl"]), aux
        )

    def target_cl(self, direction: Direction, pooled_target: Tensor) -> Tensor:
        """The contrastive target: Linear(d_tgt -> H) of the target's pooled latent (B, H)."""
        return self.tgt_proj[direction_name(self.directions[self._index(direction)])](pooled_target)

    def direction_parameters(self, direction: Direction) -> list[nn.Parameter]:
        """Parameters owned by one direction (heads, target projection), for tests and logging."""
        name = direction_name(self.directions[self._index(direction)])
        groups = ["tgt_proj"] + (
            ["linear_reg", "linear_cl"] if self.cfg.kind == "linear" else ["reg_head", "cl_head"]
        )
        return [p for g in groups for p in getattr(self, g)[name].parameters()]
