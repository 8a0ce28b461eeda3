"""Time of one LoRA training step on the real SmolLM2-135M, by LoRA dropout and rank.

A step as the quickstart takes it (batch 16, 28 tokens, loss on the last 3, LoRA on every
linear layer, AdamW), median of ``--steps`` after one warm-up, each setting in the same run.
Why the quickstart trains without LoRA dropout: on a CPU, drawing the dropout masks is a
large share of the step.

    python benchmarks/train_step.py --out benchmarks/train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mmcompose.model import MMComposeForCausalLM
from mmcompose.model.config import AdapterSpec, LoRAConfig
from mmcompose.model.splice import IGNORE_INDEX
from mmcompose.train.trainer import _resolve_llm


def step_times(llm: Path, dropout: float, rank: int, steps: int, batch: int, length: int):
    torch.manual_seed(0)
    lora = LoRAConfig(
        strategy="shared",
        adapters={"text": AdapterSpec(rank=rank, alpha=2 * rank)},
        dropout=dropout,
    )
    model = MMComposeForCausalLM.from_base_llm(llm, [], lora).train()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(".lora." in name)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(100, 20000, (batch, length))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=28)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = _resolve_llm(args.llm, Path("."))
    rows = []
    for dropout, rank in ((0.05, 16), (0.0, 16), (0.0, 8)):
        s = step_times(llm, dropout, rank, args.steps, args.batch, args.length)
        rows.append({"dropout": dropout, "rank": rank, "s_per_step": s})
    base = rows[0]["s_per_step"]
    for r in rows:
        r["x_vs_dropout_0.05"] = r["s_per_step"] / base
        print(
            f"dropout {r['dropout']:<5} rank {r['rank']:<3} {r['s_per_step']:.2f} s/step  "
            f"x{r['x_vs_dropout_0.05']:.2f}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"threads": torch.get_num_threads(), **vars(args), "rows": rows}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
