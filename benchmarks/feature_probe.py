"""Nearest-centroid and ridge linear-probe accuracy of a model's frozen encoder features.

Separates "the encoder does not carry the information" from "the projector/LLM does not learn
to use it": if this probe is far above a trained MLLM's accuracy, the problem is downstream.

    python benchmarks/feature_probe.py runs/audio-long \\
        ~/.cache/mmcompose/datasets/spoken/manifest.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mmcompose.bench.classify import read_manifest
from mmcompose.model import MMComposeForCausalLM, MMProcessor


@torch.no_grad()
def pooled_features(model, processor, modality: str, rows, batch: int = 32) -> torch.Tensor:
    tower = model.towers[modality]
    # Inference behaviour (BatchNorm running statistics), as the trainer caches features; a
    # train-mode encoder would give per-batch statistics and overwrite the pretrained ones.
    if tower.encoder.training:
        raise RuntimeError("the frozen encoder must run in eval mode")
    out = []
    for i in range(0, len(rows), batch):
        x = processor.preprocess(modality, [r["path"] for r in rows[i : i + batch]])
        out.append(tower.encode(x).mean(1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("manifest", nargs="+", help="one or more manifests (pooled)")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--ridge", type=float, default=0.3, help="relative to the mean eigenvalue")
    args = ap.parse_args()
    model = MMComposeForCausalLM.from_pretrained(args.model_dir).eval()
    processor = MMProcessor.from_pretrained(args.model_dir)
    train = [r for f in args.manifest for r in read_manifest(f, args.train_split)]
    test = [r for f in args.manifest for r in read_manifest(f, args.test_split)]
    m = train[0]["modality"]
    ftr = pooled_features(model, processor, m, train)
    fte = pooled_features(model, processor, m, test)
    labels = sorted({r["label"] for r in train})
    index = {lab: i for i, lab in enumerate(labels)}
    ytr = torch.tensor([index[r["label"]] for r in train])
    yte = torch.tensor([index.get(r["label"], -1) for r in test])
    centres = torch.stack([ftr[ytr == i].mean(0) for i in range(len(labels))])
    mu = ftr.mean(0)
    pred = (F.normalize(fte - mu, dim=-1) @ F.normalize(centres - mu, dim=-1).T).argmax(-1)
    acc = (pred == yte).float().mean().item()
    # Ridge regression onto one-hot labels (centred): the best a linear readout does.
    h, y = ftr - mu, F.one_hot(ytr, len(labels)).float()
    gram = h.T @ h
    eye = torch.eye(gram.shape[0])
    w = torch.linalg.solve(gram + args.ridge * gram.diagonal().mean() * eye, h.T @ (y - y.mean(0)))
    linear = (((fte - mu) @ w).argmax(-1) == yte).float().mean().item()
    blocks = model.embed_modalities(modal_inputs={m: processor.preprocess(m, [test[0]["path"]])})[m]
    text = model.language_model.get_input_embeddings().weight
    print(json.dumps({
        "modality": m, "classes": len(labels), "test_items": len(test),
        "nearest_centroid_acc": round(acc, 4), "linear_probe_acc": round(linear, 4),
        "block_token_norm": round(blocks.norm(dim=-1).mean().item(), 2),
        "text_embedding_norm": round(text.norm(dim=-1).mean().item(), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
