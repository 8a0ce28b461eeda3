"""Two alignment baselines from the anchors of issue 16, on pre-stored pooled latents (pure
torch, no I/O): ASIF (training-free) and a FuseMix-style pair of MLP adapters with latent mixup.

ASIF (Norelli et al., NeurIPS 2023, "ASIF: coupled data turns unimodal models to multimodal
without training"). A set of anchor pairs (x_i, y_i) is all it needs: an input of modality A is
represented by its cosine similarities to the anchors of A, an input of modality B by its
similarities to the anchors of B; since the anchors are paired, both live in one space indexed
by the anchors. Each relative representation keeps its ``k`` largest entries, raised to the
power ``p``, and is unit-normalised; retrieval is the dot product. (Ours) each modality is
centred on its anchors' mean before the cosine: mean-pooled LLM states are anisotropic (any two
captions have cosine ~0.9), which otherwise leaves the top-k weights nearly flat. Negative
similarities are clamped to 0 before the power (an even ``p`` would make them count).

FuseMix (Vouitsis et al., CVPR 2024, "Data-efficient multimodal fusion on a single GPU";
layer6ai-labs/fusemix). Frozen encoders, latents computed once; one adapter per modality,
``Block`` x layers (x + Linear-GELU-Dropout-Linear(LayerNorm(x))) then LayerNorm and a
Linear projection to a shared space; symmetric InfoNCE with a learnable temperature (0.07,
clamped to [0.001, 0.5]). Latent mixup, as the reference code does it: the batch is split in
halves, one lambda ~ Beta(alpha, alpha) per step, and both modalities mix the same pairs with
the same lambda (``mixup``), so a mixed image latent stays paired with its mixed caption.
(Ours) when several rows of a batch are the same item (captions of one image), they are
positives of each other (``mixup_groups``), as in :func:`mmcompose.align.losses.info_nce`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ASIFConfig",
    "FuseMixAdapters",
    "FuseMixConfig",
    "FuseMixFit",
    "asif_similarity",
    "fit_fusemix",
    "mixup",
    "mixup_groups",
    "relative_representation",
    "sample_mixup",
]


# =========================================================================== ASIF
class ASIFConfig(BaseModel):
    """ASIF's two knobs (reference: k = 800 of 1.6M anchors, p = 8) and the centring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(default=64, gt=0)
    p: float = Field(default=8.0, gt=0)
    center: bool = True


def relative_representation(
    x: Tensor, anchors: Tensor, k: int, p: float, center: Tensor | None = None
) -> Tensor:
    """(n, d) inputs and (N, d) anchors of one modality -> (n, N) unit relative representations:
    cosine similarity to every anchor, only the top ``k`` kept (clamped at 0, to the power
    ``p``), the rest 0."""
    if x.shape[-1] != anchors.shape[-1]:
        raise ValueError(f"inputs have width {x.shape[-1]}, anchors {anchors.shape[-1]}")
    x, anchors = x.float(), anchors.float()
    if center is not None:
        x, anchors = x - center, anchors - center
    sims = F.normalize(x, dim=-1) @ F.normalize(anchors, dim=-1).T
    vals, idx = sims.topk(min(k, anchors.shape[0]), dim=-1)
    rel = torch.zeros_like(sims).scatter(-1, idx, vals.clamp_min(0.0) ** p)
    return F.normalize(rel, dim=-1)


def asif_similarity(
    queries: Tensor,
    gallery: Tensor,
    anchors_q: Tensor,
    anchors_g: Tensor,
    cfg: ASIFConfig | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """(Q, G) similarities of queries (modality A) to gallery items (modality B) through the
    paired anchors (row i of ``anchors_q`` and ``anchors_g`` is one pair)."""
    cfg = cfg or ASIFConfig()
    if len(anchors_q) != len(anchors_g):
        raise ValueError(f"{len(anchors_q)} query anchors but {len(anchors_g)} gallery anchors")
    mean_q = anchors_q.float().mean(0) if cfg.center else None
    mean_g = anchors_g.float().mean(0) if cfg.center else None
    rel_g = relative_representation(gallery, anchors_g, cfg.k, cfg.p, mean_g)
    rows = []
    for s in range(0, len(queries), batch_size):
        rel_q = relative_representation(
            queries[s : s + batch_size], anchors_q, cfg.k, cfg.p, mean_q
        )
        rows.append(rel_q @ rel_g.T)
    return torch.cat(rows) if rows else queries.new_zeros((0, len(gallery)))


# =========================================================================== FuseMix
class FuseMixConfig(BaseModel):
    """Adapter shape and fit loop; defaults are the reference's scaled to this CPU (the
    reference: 4 blocks, expansion 4, projection 512, dropout 0.6, batch 40960, 500 epochs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    proj_dim: int = Field(default=128, gt=0)
    layers: int = Field(default=1, ge=0)
    expansion: float = Field(default=1.0, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    alpha: float = Field(default=1.0, ge=0)  # Beta(alpha, alpha); 0 turns mixup off
    steps: int = Field(default=300, gt=0)
    batch_size: int = Field(default=128, gt=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=30, ge=0)
    init_temperature: float = Field(default=0.07, gt=0)


class _Block(nn.Module):
    def __init__(self, dim: int, expansion: float, dropout: float) -> None:
        super().__init__()
        inner = max(1, int(expansion * dim))
        self.fn = nn.Sequential(
            nn.Linear(dim, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, dim)
        )
        self.ln = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(self.ln(x))


def _adapter(dim: int, cfg: FuseMixConfig) -> nn.Sequential:
    return nn.Sequential(
        *(_Block(dim, cfg.expansion, cfg.dropout) for _ in range(cfg.layers)),
        nn.LayerNorm(dim),
        nn.Linear(dim, cfg.proj_dim),
    )


class FuseMixAdapters(nn.Module):
    """One adapter per modality into a shared ``proj_dim`` space, and the temperature."""

    def __init__(self, dims: dict[str, int], cfg: FuseMixConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.adapters = nn.ModuleDict({m: _adapter(d, cfg) for m, d in dims.items()})
        self.temperature = nn.Parameter(torch.tensor(float(cfg.init_temperature)))

    def forward(self, modality: str, x: Tensor) -> Tensor:
        """(n, d_m) latents -> (n, proj_dim) unit vectors in the shared space."""
        return F.normalize(self.adapters[modality](x.float()), dim=-1)

    @torch.no_grad()
    def embed(self, modality: str, x: Tensor, batch_size: int = 1024) -> Tensor:
        was = self.training
        self.eval()
        out = torch.cat(
            [self(modality, x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        )
        self.train(was)
        return out


def sample_mixup(n: int, alpha: float, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """One lambda ~ Beta(alpha, alpha) and a pairing of the batch's rows (first half with a
    shuffled second half), as the reference's ``chunk(2)`` of a shuffled batch."""
    if n < 2:
        raise ValueError("mixup needs at least 2 rows")
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    order = rng.permutation(n)
    half = n // 2
    return lam, np.stack([order[:half], order[half : 2 * half]], axis=1)


def mixup(x: Tensor, y: Tensor, lam: float, pairs: np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
    """Mix both modalities with the same lambda and the same pairs: ``lam * row_a + (1 - lam) *
    row_b`` for every (a, b) in ``pairs``; (n/2, d_x) and (n/2, d_y)."""
    if len(x) != len(y):
        raise ValueError(f"mixup needs paired rows, got {len(x)} and {len(y)}")
    p = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
    a, b = p[:, 0], p[:, 1]
    return lam * x[a] + (1 - lam) * x[b], lam * y[a] + (1 - lam) * y[b]


def mixup_groups(keys: np.ndarray | Tensor, pairs: np.ndarray | Tensor) -> Tensor:
    """Group id per mixed row: two mixed rows are the same item iff both of their sources are
    (same key for the first and for the second row of each pair)."""
    k = torch.as_tensor(np.asarray(keys), dtype=torch.long)
    p = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
    both = torch.stack([k[p[:, 0]], k[p[:, 1]]], dim=1)
    return torch.unique(both, dim=0, return_inverse=True)[1]


def _contrastive(a: Tensor, b: Tensor, temperature: Tensor, groups: Tensor | None) -> Tensor:
    """Symmetric InfoNCE on unit vectors; same-group columns share the target mass."""
    logits = a @ b.T / temperature
    if groups is None:
        target = torch.eye(len(a), device=a.device)
    else:
        same = (groups[:, None] == groups[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


def _lr(step: int, cfg: FuseMixConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class FuseMixFit:
    model: FuseMixAdapters
    losses: list[float]


def fit_fusemix(
    x: Tensor,
    y: Tensor,
    keys: np.ndarray,
    cfg: FuseMixConfig | None = None,
    seed: int = 0,
    modalities: tuple[str, str] = ("a", "b"),
) -> FuseMixFit:
    """Train the adapters on paired pooled latents ``x`` (n, d_x) and ``y`` (n, d_y); row i of
    both is one pair, ``keys`` (n,) marks rows of one item. Deterministic given ``seed``."""
    cfg = cfg or FuseMixConfig()
    if len(x) != len(y) or len(x) != len(keys):
        raise ValueError(f"unpaired inputs: {len(x)}, {len(y)} rows and {len(keys)} keys")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FuseMixAdapters({modalities[0]: x.shape[1], modalities[1]: y.shape[1]}, cfg)
        rng = np.random.default_rng([seed, 7])
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": rest, "weight_decay": 0},
            ],
            lr=cfg.lr,
        )
        keys_t = torch.as_tensor(np.asarray(keys), dtype=torch.long)
        batch = min(cfg.batch_size, len(x)) // 2 * 2
        losses = []
        model.train()
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg)
            rows = torch.as_tensor(rng.choice(len(x), size=batch, replace=False))
            xb, yb, kb = x[rows].float(), y[rows].float(), keys_t[rows]
            if cfg.alpha > 0:
                lam, pairs = sample_mixup(batch, cfg.alpha, rng)
                xb, yb = mixup(xb, yb, lam, pairs)
                groups = mixup_groups(kb, pairs)
            else:
                groups = torch.unique(kb, return_inverse=True)[1]
            with torch.no_grad():
                model.temperature.clamp_(0.001, 0.5)
            loss = _contrastive(
                model(modalities[0], xb), model(modalities[1], yb), model.temperature, groups
            )
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    model.eval()
    return FuseMixFit(model, losses)
