"""The image MLLM against its encoder's ceiling (issue 13, item 2): probe, variants, ratio.

The ceiling is a ridge linear probe on the frozen EfficientNet-Lite0 features exactly as the
trainer caches them (eval-mode encoder, ``FeatureCache``) and as the ``pooled`` projector
reads them (per-token LayerNorm, mean over the 49 tokens); its ridge is picked on the val
split. A variant is the recipe's image train config (``recipe.train_config``) with a few
fields changed; each is trained into ``--out`` and scored on the WHOLE image test split by
log-likelihood over every image label, as the quickstart's classification column scores
it. Per-item results go to ``--out/results/*.json``; each line printed is one JSON object
with n, Wilson 95% intervals and the paired-bootstrap ratio to the probe.

    python benchmarks/image_recipe.py probe [--mesh-views]
    python benchmarks/image_recipe.py fit [--mesh-views]
    python benchmarks/image_recipe.py run recipe ridge=1 ridge=1,epochs=2 [--mesh-views]

Variant syntax: comma-separated ``key=value`` (keys in ``OVERRIDES``); ``recipe`` = none.
Run it with ``nice`` and ``--threads 1`` beside other jobs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmcompose.assets.cache import cache_dir
from mmcompose.bench.classify import classify, read_manifest
from mmcompose.bench.stats import retention, wilson_interval
from mmcompose.errors import ConfigError
from mmcompose.fs import write_json_atomic
from mmcompose.recipe import DATASETS, Budget, train_config
from mmcompose.reproduce import DATASETS as REPRO_DATASETS

RIDGES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _set(path: str, cast: Callable[[str], Any]) -> Callable[[dict, str], None]:
    """An override writing ``cast(value)`` at the dotted ``path`` of the config dict."""

    def apply(cfg: dict, value: str) -> None:
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = cast(value)

    return apply


def _projector(cfg: dict, value: str) -> None:
    """``grid``: one linear map per encoder token (49 tokens); ``pooled``: the recipe's."""
    if value == "grid":
        cfg["tower"]["projector"] = {"name": "linear", "params": {}}
    elif value != "pooled":
        raise ConfigError(f"projector={value}: use grid or pooled")


OVERRIDES: dict[str, Callable[[dict, str], None]] = {
    "strategy": _set("lora.strategy", str),
    "ridge": _set("init_ridge", float),
    "epochs": _set("stage2.epochs", float),
    "lr": _set("stage2.lr", float),
    "batch": _set("stage2.batch_size", int),
    "tokens": _set("tower.projector.params.num_tokens", int),
    "hidden": _set("tower.projector.params.hidden", int),
    "init": _set("projector_init", str),
    "seed": _set("seed", int),
    "projector": _projector,
    "affixes": lambda cfg, v: cfg["tower"].update(num_prefix=int(v), num_suffix=int(v)),
}


def manifests(mesh_views: bool) -> list[Path]:
    """The image manifests of the quickstart (or of the reproduction, with mesh_views)."""
    names = REPRO_DATASETS["image"] if mesh_views else DATASETS["image"]
    paths = [cache_dir() / "datasets" / n / "manifest.jsonl" for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"image datasets not prepared: {', '.join(missing)}",
            hint="python -m mmcompose assets prepare",
        )
    return paths


def rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """Every row of the manifests and the label set (all rows, as the quickstart's column)."""
    out = [r for p in paths for r in read_manifest(p, None)]
    return out, sorted({r["label"] for r in out})


def variant_config(spec: str, files: list[Path], feature_cache: Path) -> Any:
    from mmcompose.train.trainer import TrainConfig

    base = train_config("image", "decoupled", Budget(), [str(f) for f in files])
    cfg = json.loads(base.model_dump_json())
    for part in [] if spec == "recipe" else spec.split(","):
        key, _, value = part.partition("=")
        if key not in OVERRIDES or not value:
            raise ConfigError(f"bad override {part!r}", hint=f"keys: {', '.join(OVERRIDES)}")
        OVERRIDES[key](cfg, value)
    cfg["feature_cache"] = str(feature_cache)
    return TrainConfig.model_validate(cfg)


# ----------------------------------------------------------------------------- the probe
def _ridge_fit(h: torch.Tensor, y: torch.Tensor, n_cls: int, ridge: float) -> torch.Tensor:
    """Centred ridge regression onto one-hot labels, ``ridge`` relative to the Gram's mean
    eigenvalue (the scale ``mmcompose.train.anchor`` uses)."""
    h, t = h.double(), F.one_hot(y, n_cls).double()
    gram = h.T @ h
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.solve(
        gram + lam * torch.eye(gram.shape[0], dtype=h.dtype), h.T @ (t - t.mean(0))
    )


@torch.no_grad()
def probe(args: argparse.Namespace) -> dict:
    """Ridge (val-picked) and nearest-centroid probes on the projector's input features."""
    from transformers import AutoTokenizer

    from mmcompose.model import MMComposeForCausalLM, MMProcessor
    from mmcompose.recipe import BASE_LLM, tower
    from mmcompose.train.features import FeatureCache
    from mmcompose.train.trainer import _resolve_llm

    files = manifests(args.mesh_views)
    everything, labels = rows(files)
    llm = _resolve_llm(BASE_LLM, Path("."))
    model = MMComposeForCausalLM.from_base_llm(llm, [tower("image")]).eval()
    enc = model.towers["image"].encoder
    assert not enc.training, "the frozen encoder must run in eval mode (BatchNorm statistics)"
    proc = MMProcessor.from_config(model.config, AutoTokenizer.from_pretrained(str(llm)))
    cache = FeatureCache(args.out / "features", model.towers["image"], proc)
    cache.build([r["path"] for r in everything], progress=False)
    index = {lab: i for i, lab in enumerate(labels)}

    def split(name: str) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        part = [r for r in everything if r["split"] == name]
        raw = cache.get([r["path"] for r in part]).float()
        pooled = F.layer_norm(raw, raw.shape[-1:]).mean(1)  # what Pooled's linear layer reads
        return part, pooled, torch.tensor([index[r["label"]] for r in part])

    (_, ftr, ytr), (_, fva, yva), (test, fte, yte) = split("train"), split("val"), split("test")
    mu = ftr.mean(0)
    scores = {}
    for ridge in RIDGES:
        w = _ridge_fit(ftr - mu, ytr, len(labels), ridge)
        scores[ridge] = (((fva - mu).double() @ w).argmax(-1) == yva).float().mean().item()
    best = max(RIDGES, key=lambda r: (scores[r], r))  # ties: the stronger ridge
    # Refit on train only (val stays out, as the MLLM never trains on it).
    w = _ridge_fit(ftr - mu, ytr, len(labels), best)
    linear = (((fte - mu).double() @ w).argmax(-1) == yte).float()
    present = torch.unique(ytr)
    centres = torch.stack([ftr[ytr == i].mean(0) for i in present.tolist()])
    sims = F.normalize(fte - mu, dim=-1) @ F.normalize(centres - mu, dim=-1).T
    centroid = (present[sims.argmax(-1)] == yte).float()
    name = "probe-mesh" if args.mesh_views else "probe"
    out = {
        "name": name,
        "datasets": [f.parent.name for f in files],
        "labels": len(labels),
        "train": len(ytr),
        "val": len(yva),
        "n": len(test),
        "val_acc_by_ridge": scores,
        "ridge": best,
        "linear": _acc(linear.tolist()),
        "centroid": _acc(centroid.tolist()),
        "ids": [r["id"] for r in test],
        "per_item": {"linear": linear.tolist(), "centroid": centroid.tolist()},
    }
    write_json_atomic(args.out / "results" / f"{name}.json", out)
    return {k: v for k, v in out.items() if k not in ("ids", "per_item")}


@torch.no_grad()
def fit_proxy(args: argparse.Namespace) -> list[dict]:
    """The closed-form fit alone, decoded without the LLM: each test block's nearest label
    target block (the label's token embeddings + newlines), per ridge and tokens per image.
    A cheap guide to the init's generalisation (the LLM's reading is measured by ``run``)."""
    from transformers import AutoTokenizer

    from mmcompose.model import MMComposeForCausalLM, MMProcessor
    from mmcompose.model.projectors import Pooled, PooledParams
    from mmcompose.recipe import BASE_LLM, tower
    from mmcompose.train.anchor import answer_targets, fit_output_layer
    from mmcompose.train.features import FeatureCache
    from mmcompose.train.trainer import _resolve_llm

    files = manifests(args.mesh_views)
    everything, labels = rows(files)
    llm = _resolve_llm(BASE_LLM, Path("."))
    model = MMComposeForCausalLM.from_base_llm(llm, [tower("image")]).eval()
    tok = AutoTokenizer.from_pretrained(str(llm))
    proc = MMProcessor.from_config(model.config, tok)
    cache = FeatureCache(args.out / "features", model.towers["image"], proc)
    cache.build([r["path"] for r in everything], progress=False)
    emb = model.language_model.get_input_embeddings().weight
    newline = emb[tok("\n", add_special_tokens=False)["input_ids"][-1]]
    train = [r for r in everything if r["split"] == "train"]
    test = [r for r in everything if r["split"] == "test"]
    ftr = cache.get([r["path"] for r in train]).float()
    fte = cache.get([r["path"] for r in test]).float()
    ids = {lab: tok(lab, add_special_tokens=False)["input_ids"] for lab in labels}
    yte = torch.tensor([labels.index(r["label"]) for r in test])
    out = []
    for n_tok in (1, 2, 4, 8):
        targets = answer_targets(emb, [ids[r["label"]] for r in train], n_tok, newline)
        label_blocks = answer_targets(emb, [ids[lab] for lab in labels], n_tok, newline)
        for ridge in RIDGES:
            torch.manual_seed(0)
            proj = Pooled(ftr.shape[-1], emb.shape[1], PooledParams(num_tokens=n_tok))
            res = fit_output_layer(proj, ftr, targets, ridge)
            pred = proj(fte).flatten(1)
            near = torch.cdist(pred, label_blocks.flatten(1)).argmin(1)
            truth = label_blocks[yte].flatten(1)
            test_res = ((pred - truth).norm() / truth.norm()).item()
            out.append({
                "tokens": n_tok, "ridge": ridge, "relative_residual": round(res, 3),
                "test_relative_residual": round(test_res, 3),
                "nearest_label_block": _acc((near == yte).float().tolist()),
            })  # fmt: skip
    return out


def _acc(correct: list[float]) -> dict:
    k, n = int(sum(correct)), len(correct)
    lo, hi = wilson_interval(k, n)
    return {"acc": round(k / n, 4), "k": k, "n": n, "wilson95": [round(lo, 4), round(hi, 4)]}


# ----------------------------------------------------------------------------- variants
def run_variant(spec: str, args: argparse.Namespace) -> dict:
    from mmcompose.model import MMComposeForCausalLM, MMProcessor
    from mmcompose.train.trainer import train

    files = manifests(args.mesh_views)
    everything, labels = rows(files)
    test = [r for r in everything if r["split"] == "test"]
    cfg = variant_config(spec, files, args.out / "features")
    tag = ("mesh-" if args.mesh_views else "") + spec.replace(",", "_").replace("=", "")
    folder = args.out / "runs" / tag
    seconds = math.nan
    if not (folder / "config.json").is_file():
        seconds = train(cfg, folder, progress=False).seconds
    log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
    init = next((r for r in log if r.get("stage") == 0), {})
    steps = [r for r in log if r.get("stage") == 2]
    scored = args.out / "results" / f"{tag}.json"
    if scored.is_file():  # scored before: the per-item results are reused
        correct = json.loads(scored.read_text())["per_item"]
    else:
        model = MMComposeForCausalLM.from_pretrained(folder)
        proc = MMProcessor.from_pretrained(folder)
        res = classify(model, proc, test, labels=labels, modes=("loglikelihood",), progress=False)
        correct = res.correct["acc,loglikelihood"]
        write_json_atomic(scored, {"name": tag, "variant": spec, "per_item": correct})
    out: dict[str, Any] = {
        "name": tag,
        "variant": spec,
        "n": len(correct),
        "labels": len(labels),
        "steps": len(steps),
        "final_loss": round(steps[-1]["loss"], 4) if steps else None,
        "relative_residual": round(init.get("relative_residual", math.nan), 4),
        "train_s": round(seconds, 1),
        "loglikelihood": _acc(correct),
    }
    probe_file = args.out / "results" / ("probe-mesh.json" if args.mesh_views else "probe.json")
    if probe_file.is_file():
        p = json.loads(probe_file.read_text())
        if p["ids"] == [r["id"] for r in test]:
            r = retention(correct, p["per_item"]["linear"], threshold=0.8)
            out["ratio_to_probe"] = {
                "ratio": round(r.ratio, 3),
                "bootstrap95": [round(r.low, 3), round(r.high, 3)],
                "p_below_0.8": round(r.p_below, 4) if r.p_below is not None else None,
            }
    write_json_atomic(scored, {**out, "per_item": correct})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("probe", "fit", "run"))
    ap.add_argument("variants", nargs="*", default=["recipe"])
    ap.add_argument("--mesh-views", action="store_true", help="the reproduction's image data")
    ap.add_argument("--out", type=Path, default=Path("/tmp/image"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "probe":
        print(json.dumps(probe(args)), flush=True)
        return
    if args.what == "fit":
        for row in fit_proxy(args):
            print(json.dumps(row), flush=True)
        return
    for spec in args.variants:
        print(json.dumps(run_variant(spec, args)), flush=True)


if __name__ == "__main__":
    main()
