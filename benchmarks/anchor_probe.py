"""The measurements behind the anchored projector init (docs/results.md, "How we got there").

1. oracle: put the exact token embeddings of each word in place of the modality block, with
   different padding and prefix/suffix vectors, and ask the frozen LLM; log-likelihood over
   every label, for every 4th label.
2. fit: the closed-form fit alone (no gradient step) for a few ridge values, scored on the
   first held-out items; and the nearest label embedding of the block's first token.
3. speed: one forward pass of the base LLM over an 85-token prompt.

    python benchmarks/anchor_probe.py configs/train/audio.yaml --held-out 30
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from mmcompose.bench.classify import answer_continuations, read_manifest
from mmcompose.model import MMComposeForCausalLM, MMProcessor
from mmcompose.train.anchor import answer_targets, fit_output_layer
from mmcompose.train.data import QUESTIONS
from mmcompose.train.features import FeatureCache
from mmcompose.train.trainer import _default_cache, _resolve_llm, load_train_config


class _Fixed(nn.Module):
    """A projector that returns a preset block (the oracle)."""

    def __init__(self) -> None:
        super().__init__()
        self.block: torch.Tensor | None = None

    def forward(self, _features: torch.Tensor) -> torch.Tensor:
        return self.block


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a train config (configs/train/audio.yaml)")
    ap.add_argument("--held-out", type=int, default=30)
    ap.add_argument("--ridges", default="0.003,0.01,0.03")
    args = ap.parse_args()
    cfg, base = load_train_config(args.config)
    from transformers import AutoTokenizer

    llm = _resolve_llm(cfg.base_llm, base)
    model = MMComposeForCausalLM.from_base_llm(llm, [cfg.tower]).eval()
    proc = MMProcessor.from_config(
        model.config, AutoTokenizer.from_pretrained(str(llm)), system_prompt=cfg.system_prompt
    )
    m, tok = cfg.tower.modality, proc.tokenizer
    data = cfg.data[0] if isinstance(cfg.data, list) else cfg.data
    name = data.split(":", 1)[1]
    manifest = _default_cache() / "datasets" / name / "manifest.jsonl"
    rows = read_manifest(manifest, None)
    labels = sorted({r["label"] for r in rows})
    emb = model.language_model.get_input_embeddings().weight
    newline = emb[tok("\n", add_special_tokens=False)["input_ids"][-1]]
    msgs = [{"role": "user", "content": f"<{m}>\n{QUESTIONS[m][0]}"}]
    prompt = torch.tensor([proc.tokenize(proc.render_chat(msgs, add_generation_prompt=True))])
    conts = [
        proc.tokenize(c, add_special_tokens=False) for c in answer_continuations(proc, msgs, labels)
    ]
    tower = model.towers[m]
    out: dict[str, object] = {"labels": len(labels)}

    def predict(features: torch.Tensor) -> str:
        s = model.score_continuations(prompt, conts, modal_features={m: features})
        return labels[int(s.argmax())]

    # 1. oracle
    fitted_projector, fixed = tower.projector, _Fixed()
    tower.projector = fixed
    affixes = (tower.prefix, tower.suffix)
    k = 4
    variants = {
        "word+newlines, no prefix/suffix": (newline, None),
        "word+repeats of its last token, no prefix/suffix": ("repeat", None),
        "word+newlines, zero prefix/suffix": (newline, torch.zeros_like(newline)),
        "word+newlines, newline prefix/suffix": (newline, newline),
        "word+newlines, mean-embedding prefix/suffix": (newline, emb.mean(0)),
    }
    dummy = torch.zeros(1, 1, 1)
    for label, (pad, affix) in variants.items():
        for p in affixes:
            if p is not None and affix is not None:
                p.data.copy_(affix.expand_as(p))
        tower.prefix, tower.suffix = affixes if affix is not None else (None, None)
        hits = 0
        for lab in labels[::4]:
            ids = tok(lab, add_special_tokens=False)["input_ids"]
            if pad == "repeat":
                fixed.block = emb[[ids[min(j, len(ids) - 1)] for j in range(k)]][None]
            else:
                fixed.block = answer_targets(emb, [ids], k, pad)
            hits += predict(dummy) == lab
        out[f"oracle: {label}"] = f"{hits}/{len(labels[::4])}"
    tower.projector, (tower.prefix, tower.suffix) = fitted_projector, affixes

    # 2. the fit alone
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"][: args.held_out]
    cache = FeatureCache(_default_cache(), tower, proc)
    cache.build([r["path"] for r in train + test], progress=False)
    ftr, fte = cache.get([r["path"] for r in train]), cache.get([r["path"] for r in test])
    answers = [tok(r["label"], add_special_tokens=False)["input_ids"] for r in train]
    n_out = tower.projector(ftr[:1]).shape[1]
    targets = answer_targets(emb, answers, n_out, newline)
    firsts = torch.stack(
        [emb[tok(lab, add_special_tokens=False)["input_ids"][0]] for lab in labels]
    )
    for p in affixes:
        p.data.copy_(newline.expand_as(p))
    for ridge in (float(x) for x in args.ridges.split(",")):
        res = fit_output_layer(tower.projector, ftr.float(), targets, ridge)
        first = tower.projector(fte.float())[:, 0]
        near = [labels[i] for i in torch.cdist(first, firsts).argmin(1).tolist()]
        hits = sum(predict(fte[i : i + 1].float()) == r["label"] for i, r in enumerate(test))
        out[f"fit ridge {ridge}"] = {
            "relative_residual": round(res, 3),
            "nearest_first_token_acc": round(sum(a == r["label"] for a, r in zip(near, test, strict=True)) / len(test), 3),
            "loglik": f"{hits}/{len(test)}",
        }  # fmt: skip

    # 3. speed of one 85-token forward pass
    decoder = model.language_model.get_decoder()
    x = torch.randint(0, 1000, (1, 85))
    decoder(input_ids=x)
    t = time.perf_counter()
    for _ in range(3):
        decoder(input_ids=x)
    out["forward_85_tokens_s"] = round((time.perf_counter() - t) / 3, 3)
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
