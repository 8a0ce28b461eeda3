"""Log-likelihood scoring speed: packed branches vs the two usual ways, side by side.

Scores the same requests four ways on the real SmolLM2-135M (with a rank-16 LoRA adapter, as
the quickstart's models have) and reports seconds per item, the ratio to the packed method,
and the largest score difference (they must agree):

- ``per-option``: lm-evaluation-harness's way, prompt + option as one sequence per option
  (all options of an item padded into one batch; the LM head only on option positions).
- ``cached-prompt``: the prompt once with a KV cache, then the options grouped by length,
  one forward per length (mmcompose before packed scoring).
- ``packed``: :meth:`MMComposeForCausalLM.score_requests`, every option of several items in
  one forward (branches with their own attention mask).
- ``packed+folded``: the same after :meth:`~MMComposeForCausalLM.fold_for_inference` (the
  adapter added into the weights, as evaluation does).

Also times loading the saved model with and without random initialisation before the weights
are read (``from_pretrained`` skips it), median of 3.

Two workloads: ``classify`` (a 28-token prompt, the 73 labels of the quickstart's image
datasets as options) and ``mcub`` (an 85-token prompt, 4 options of 2-5 tokens).

    python benchmarks/scoring.py --items 16 --out benchmarks/scoring.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, DynamicCache

from mmcompose.io import load_state_dict
from mmcompose.model import MMComposeForCausalLM
from mmcompose.model.config import AdapterSpec, LoRAConfig, MMConfig
from mmcompose.model.encoders import no_pretrained_weights
from mmcompose.model.modeling import ScoreRequest
from mmcompose.train.trainer import _resolve_llm

WORDS = [
    "airplane",
    "anchor",
    "apple",
    "armadillo",
    "ball",
    "banana",
    "bear",
    "bee",
    "bicycle",
    "bird",
    "boat",
    "book",
    "bottle",
    "bus",
    "butterfly",
    "cake",
    "camel",
    "car",
    "castle",
    "cat",
    "chair",
    "cloud",
    "cow",
    "crab",
    "crocodile",
    "cup",
    "deer",
    "dog",
    "dolphin",
    "dragon",
    "duck",
    "elephant",
    "fish",
    "flower",
    "fox",
    "frog",
    "giraffe",
    "guitar",
    "hat",
    "horse",
    "house",
    "key",
    "kangaroo",
    "kite",
    "lamp",
    "leaf",
    "lion",
    "lobster",
    "monkey",
    "moon",
    "mouse",
    "mushroom",
    "octopus",
    "owl",
    "panda",
    "penguin",
    "piano",
    "pig",
    "rabbit",
    "rocket",
    "shark",
    "sheep",
    "shoe",
    "snail",
    "snake",
    "spider",
    "star",
    "sun",
    "table",
    "tiger",
    "tree",
    "truck",
    "turtle",
    "umbrella",
    "whale",
]


def per_option(model: MMComposeForCausalLM, req: ScoreRequest) -> torch.Tensor:
    prompt = req.input_ids.tolist()
    seqs = [prompt + list(c) for c in req.continuations]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    sp = model.prepare_inputs(ids, mask)
    hidden = model._decode(sp.embeds, sp.attention_mask, sp.position_ids, sp.routes)
    head = model.language_model.get_output_embeddings()
    out = []
    for b, c in enumerate(req.continuations):
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
        logp = head(hidden[b, pos]).float().log_softmax(-1)
        out.append(logp[torch.arange(len(c)), torch.tensor(c)].sum())
    return torch.stack(out)


def cached_prompt(model: MMComposeForCausalLM, req: ScoreRequest) -> torch.Tensor:
    sp = model.prepare_inputs(req.input_ids.reshape(1, -1))
    cache = DynamicCache(config=model.language_model.config)
    hidden = model._decode(sp.embeds, sp.attention_mask, sp.position_ids, sp.routes, cache)
    head = model.language_model.get_output_embeddings()
    embed = model.language_model.get_input_embeddings()
    first = head(hidden[:, -1]).float().log_softmax(-1)[0]
    conts = [torch.tensor(list(c)) for c in req.continuations]
    score = first[torch.stack([c[0] for c in conts])].clone()
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(conts):
        if len(c) > 1:
            groups.setdefault(len(c), []).append(i)
    start = sp.position_ids[0, -1] + 1
    for n, (length, idx) in enumerate(sorted(groups.items())):
        kv = cache if n == len(groups) - 1 else copy.deepcopy(cache)
        kv.batch_repeat_interleave(len(idx))
        ids = torch.stack([conts[i] for i in idx])
        mask = F.pad(sp.attention_mask.expand(len(idx), -1), (0, length - 1), value=1)
        pos = (start + torch.arange(length - 1)).expand(len(idx), -1)
        h = model._decode(embed(ids[:, :-1]), mask, pos, None, kv)
        logp = head(h).float().log_softmax(-1)
        score[torch.tensor(idx)] += logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    return score


def load_with_init(path: Path) -> MMComposeForCausalLM:
    """How ``from_pretrained`` loaded before: random initialisation, then the weights."""
    with no_pretrained_weights():
        model = MMComposeForCausalLM(MMConfig.from_dir(path))
    model.load_weights(load_state_dict(path))
    return model


def load_times(model: MMComposeForCausalLM) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_pretrained(Path(tmp) / "m")
        out = {}
        for name, fn in (
            ("with_init", load_with_init),
            ("from_pretrained", MMComposeForCausalLM.from_pretrained),
        ):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn(path)
                times.append(time.perf_counter() - t)
            out[name] = statistics.median(times)
    return out


def workload(tok, kind: str, n: int, seed: int) -> list[ScoreRequest]:
    g = torch.Generator().manual_seed(seed)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if kind == "classify":
        conts = [tok(w, add_special_tokens=False)["input_ids"] + [end] for w in WORDS]
        prompt_len = 28
    else:
        prompt_len = 85
    reqs = []
    for _ in range(n):
        prompt = torch.randint(100, 20000, (prompt_len,), generator=g)
        if kind == "mcub":
            pick = torch.randperm(len(WORDS), generator=g)[:4].tolist()
            conts = [tok(WORDS[i], add_special_tokens=False)["input_ids"] + [end] for i in pick]
        reqs.append(ScoreRequest(prompt, conts))
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="items per packed call")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    llm = _resolve_llm(args.llm, Path("."))
    lora = LoRAConfig(strategy="shared", adapters={"text": AdapterSpec(rank=16, alpha=32)})
    model = MMComposeForCausalLM.from_base_llm(llm, [], lora).eval()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.01)
    tok = AutoTokenizer.from_pretrained(str(llm))
    folded = copy.deepcopy(model).fold_for_inference()
    report = {"torch_threads": torch.get_num_threads(), "items": args.items, "workloads": {}}
    report["load_s"] = load_times(model)
    print("load: " + ", ".join(f"{k} {v:.2f} s" for k, v in report["load_s"].items()))
    for kind in ("classify", "mcub"):
        reqs = workload(tok, kind, args.items, seed=1)
        results: dict[str, dict] = {}
        scores: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode():
            model.score_requests(reqs[:1])  # warm-up
            for name, fn in (
                ("per-option", lambda reqs=reqs: [per_option(model, r) for r in reqs]),
                ("cached-prompt", lambda reqs=reqs: [cached_prompt(model, r) for r in reqs]),
                (
                    "packed",
                    lambda reqs=reqs: [
                        s
                        for i in range(0, len(reqs), args.batch)
                        for s in model.score_requests(reqs[i : i + args.batch])
                    ],
                ),
                (
                    "packed+folded",
                    lambda reqs=reqs: [
                        s
                        for i in range(0, len(reqs), args.batch)
                        for s in folded.score_requests(reqs[i : i + args.batch])
                    ],
                ),
            ):
                t = time.perf_counter()
                scores[name] = fn()
                results[name] = {"s_per_item": (time.perf_counter() - t) / len(reqs)}
        base = results["packed"]["s_per_item"]
        for name, r in results.items():
            r["x_packed_time"] = r["s_per_item"] / base
            r["max_abs_diff_vs_per_option"] = max(
                float((a - b).abs().max())
                for a, b in zip(scores[name], scores["per-option"], strict=True)
            )
        report["workloads"][kind] = results
        print(kind)
        for name, r in results.items():
            print(
                f"  {name:14s} {r['s_per_item']:.3f} s/item  x{r['x_packed_time']:.2f}  "
                f"max |diff| {r['max_abs_diff_vs_per_option']:.1e}"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
