"""MoE routing diagnostics: expert load, router entropy and dead experts per direction.

Definitions (``N`` routed tokens, ``E`` experts, ``k`` experts per token):

- load_e: share of the N*k routing slots that go to expert e (sums to 1; balanced = 1/E).
  It is the ``f_e`` of the Switch load-balancing loss (``moe.load_balancing_loss``).
- router entropy: mean over tokens of H(softmax(gate logits)), in nats, and divided by
  log E (1 = the gate cannot tell experts apart, 0 = one expert takes all the mass).
- load entropy: H(load) / log E, 1 when every expert gets the same share.
- dead experts: those that received no slot at all during the pass.

``routing_stats`` is pure math on gate logits; ``gate_logits`` collects them over one eval pass
(a forward hook on the shared gate, nothing in the connector changes); ``plot_routing`` draws
the figure of a report (matplotlib, Agg, no pyplot state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmcompose.align.features import ModalityFeatures
from mmcompose.align.moe import STREAMS, AltMoEConnector, MoE, direction_name, top_k_gate

__all__ = ["gate_logits", "merge_stats", "plot_routing", "routing_report", "routing_stats"]

Direction = tuple[str, str]


def _entropy(p: Tensor) -> Tensor:
    """Entropy (nats) along the last dim; 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)


def routing_stats(logits: Tensor, k: int, renormalize: bool = False) -> dict[str, Any]:
    """Load, entropies and dead experts of the routing of (N, E) gate ``logits``."""
    logits = logits.double()  # statistics, not training: float64 so sums over N are exact enough
    n, num_experts = logits.shape
    g = top_k_gate(logits, k, renormalize)
    counts = torch.bincount(g.experts.reshape(-1), minlength=num_experts)
    load = counts.double() / max(n * k, 1)
    log_e = math.log(num_experts) if num_experts > 1 else 1.0
    router = float(_entropy(g.probs).mean()) if n else math.nan
    return {
        "tokens": n,
        "load": [float(x) for x in load],
        "counts": [int(c) for c in counts],
        "router_entropy": router,
        "router_entropy_norm": router / log_e,
        "load_entropy_norm": float(_entropy(load)) / log_e if n else math.nan,
        "max_load": float(load.max()) if n else math.nan,
        "dead": [int(e) for e in torch.nonzero(counts == 0).flatten()],
    }


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stats of the union of several passes (token-weighted), from their own stats."""
    n = sum(int(p["tokens"]) for p in parts)
    counts = np.sum([p["counts"] for p in parts], axis=0)
    slots = max(int(counts.sum()), 1)
    load = counts / slots
    num_experts = len(counts)
    log_e = math.log(num_experts) if num_experts > 1 else 1.0
    router = sum(p["router_entropy"] * p["tokens"] for p in parts) / max(n, 1)
    nz = load[load > 0]
    return {
        "tokens": n,
        "load": [float(x) for x in load],
        "counts": [int(c) for c in counts],
        "router_entropy": float(router),
        "router_entropy_norm": float(router) / log_e,
        "load_entropy_norm": float(-(nz * np.log(nz)).sum()) / log_e,
        "max_load": float(load.max()),
        "dead": [int(e) for e in np.flatnonzero(counts == 0)],
    }


@torch.no_grad()
def gate_logits(
    connector: AltMoEConnector, direction: Direction, feats: ModalityFeatures, batch_size: int = 256
) -> dict[str, Tensor]:
    """{stream: (tokens, E) gate logits} over one eval-mode pass of ``feats`` (padding excluded).

    The MoE sees both streams' valid tokens stacked, stream by stream (``AltMoEConnector``
    indexes ``u[valid]`` with ``valid`` (streams, B, L)), so each call's rows split in halves."""
    mixer = connector.mixer
    if not isinstance(mixer, MoE):
        raise ValueError(f"a {connector.cfg.kind!r} connector has no router")
    seen: list[Tensor] = []
    hook = mixer.gate.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    was_training = connector.training
    connector.eval()
    try:
        for s in range(0, len(feats), batch_size):
            tokens, mask = feats.batch(np.arange(s, min(s + batch_size, len(feats))))
            connector(direction, tokens, mask)
    finally:
        hook.remove()
        connector.train(was_training)
    per_stream: dict[str, list[Tensor]] = {s: [] for s in STREAMS}
    for out in seen:
        for s, part in zip(STREAMS, out.chunk(len(STREAMS)), strict=True):
            per_stream[s].append(part)
    return {s: torch.cat(parts) for s, parts in per_stream.items()}


def routing_report(
    connector: AltMoEConnector, sources: Mapping[Direction, ModalityFeatures]
) -> dict[str, Any]:
    """{"directions": {name: {stream: stats, "all": stats}}, "overall": stats, "dead": [...]}:
    one eval pass of each direction's source items (``sources``) through the router."""
    k, renorm = connector.cfg.top_k, connector.cfg.renormalize
    per_direction: dict[str, dict[str, Any]] = {}
    for direction, feats in sources.items():
        logits = gate_logits(connector, direction, feats)
        streams = {s: routing_stats(x, k, renorm) for s, x in logits.items()}
        per_direction[direction_name(direction)] = {
            **streams,
            "all": merge_stats(list(streams.values())),
        }
    overall = merge_stats([d["all"] for d in per_direction.values()]) if per_direction else {}
    return {
        "num_experts": connector.cfg.num_experts,
        "top_k": k,
        "directions": per_direction,
        "overall": overall,
        "dead": overall.get("dead", []),  # dead over every direction's pass
    }


def plot_routing(report: Mapping[str, Any], path: str | Path) -> None:
    """Expert load per direction (heatmap, dead experts crossed) and router entropy (bars)."""
    from matplotlib.figure import Figure  # Agg through savefig; no pyplot global state

    names = list(report["directions"])
    num_experts = int(report["num_experts"])
    load = np.array([report["directions"][n]["all"]["load"] for n in names])
    size = (max(7.0, 0.45 * num_experts + 4), 1.6 + 0.5 * len(names))
    fig = Figure(figsize=size, layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=(3, 1.4))
    im = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0)
    for i, n in enumerate(names):
        for e in report["directions"][n]["all"]["dead"]:
            ax.text(e, i, "x", ha="center", va="center", color="red", fontsize=11)
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("expert")
    ax.set_title(
        f"expert load (share of top-{report['top_k']} slots; balanced {1 / num_experts:.3f}); "
        "x: dead",
        fontsize="small",
    )
    fig.colorbar(im, ax=ax, fraction=0.05)
    y = np.arange(len(names))
    for j, stream in enumerate(STREAMS):
        vals = [report["directions"][n][stream]["router_entropy_norm"] for n in names]
        bx.barh(y + (j - 0.5) * 0.38, vals, height=0.38, label=stream)
    bx.set_yticks(y, [""] * len(names))
    bx.set_ylim(ax.get_ylim())
    bx.set_xlim(0, 1)
    bx.set_xlabel("router entropy / log E")
    bx.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2)
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
