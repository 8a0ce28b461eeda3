"""Cost of routed DAMC adapters: prefill and per-token decode, side by side with the base model.

The same spliced tokens (``--tokens`` in all, ``--block`` of them per modality block, text in
between) go through, per setting of 1, 3 and 4 modality blocks:

- ``base``: the plain Hugging Face LLM (no adapters) on the same input embeddings.
- ``routed``: the composed model, decoupled LoRA (DAMC): each modality's tokens through its own
  adapter, text through the ``text`` adapter (:class:`~mmcompose.model.lora.LoRALinear`:
  gather, low-rank product, scatter-add per adapter).
- ``folded``: the same after :meth:`~MMComposeForCausalLM.fold_for_inference` (text adapter in
  the weights; modality adapters as differences on their own tokens).
- ``masked``: the reference implementation's computation, written here: every adapter over
  every token, each delta multiplied by its 0/1 token mask, summed.

Prefill: decoder over the prompt (with a KV cache, as generation fills it) + LM head on the last
position. Decode: ``generate`` with ``--new-tokens`` greedy tokens, timed per step by a forward
hook on the decoder (interval between consecutive decoder calls after the prefill, so head,
token choice and loop overhead count); ``hf-generate`` is transformers' own ``generate`` on the
base LLM from the same ``inputs_embeds``. Every variant is run once per repeat in rotating
order (interleaved); figures are medians.

Models: the real SmolLM2-135M (``--llm``), and a Llama-2-7B-shaped single decoder layer
(hidden 4096, intermediate 11008, 32 heads, random weights, ``--small-vocab`` so the layer,
not the LM head, is what is measured). LoRA on every linear (q,k,v,o,gate,up,down), rank
``--rank``, B random so adapters change outputs.

    python benchmarks/routed.py --threads 1 --repeats 5 --out benchmarks/routed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mmcompose.model import MMComposeForCausalLM
from mmcompose.model.config import AdapterSpec, LoRAConfig, MMConfig, ModuleSpec
from mmcompose.model.lora import TEXT_ROUTE, LoRALinear, TokenRouter, lora_layers
from mmcompose.model.modeling import _cache_kwarg
from mmcompose.model.splice import SENTINELS
from mmcompose.testing import tiny_towers
from mmcompose.train.trainer import _resolve_llm

SETTINGS = {1: ("image",), 3: ("image", "audio", "point"), 4: ("image", "audio", "video", "point")}
PREFILL = ("base", "routed", "folded", "masked")
DECODE = ("hf-generate", "base", "routed", "folded", "masked")


# ---------------------------------------------------------------- the masked reference


class MaskedRouter(TokenRouter):
    """Routes become one (B, T, 1) 0/1 mask per adapter, made once per forward."""

    masks: dict[str, Tensor] | None = None

    def set_routes(self, routes: Tensor | None) -> None:
        super().set_routes(routes)
        self.masks = None
        if routes is not None:
            self.masks = {}
            for rid, name in self.route_to_adapter.items():
                if name is not None:
                    m = (routes == rid).unsqueeze(-1)
                    self.masks[name] = self.masks[name] | m if name in self.masks else m


class MaskedLoRALinear(LoRALinear):
    """Every adapter over every token, then masked (what DAMC's reference code computes)."""

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        masks = self.router.masks  # type: ignore[attr-defined]
        text = self.router.route_to_adapter.get(TEXT_ROUTE)
        for name, adapter in self.lora.items():
            if masks is None:  # decoding: every token is text
                m = x.new_ones((*x.shape[:-1], 1)) * (name == text)
            else:
                m = masks.get(name, x.new_zeros((*x.shape[:-1], 1), dtype=torch.bool))
            y = y + adapter(x) * m.to(x.dtype)
        return y


def masked_copy(model: MMComposeForCausalLM) -> MMComposeForCausalLM:
    out = copy.deepcopy(model)  # layers keep sharing one router inside the copy
    out.router.__class__ = MaskedRouter
    for _, layer in lora_layers(out.language_model):
        layer.__class__ = MaskedLoRALinear
    return out


# ---------------------------------------------------------------- models and inputs


def towers(modalities: tuple[str, ...]) -> list:
    """The test encoders (never run: blocks come from features) with linear projectors, so a
    block's length is the number of feature rows given."""
    return [
        t.model_copy(update={"projector": ModuleSpec(name="linear")})
        for t in tiny_towers(modalities)
    ]


def smollm2_base(name: str) -> tuple[nn.Module, Path]:
    path = _resolve_llm(name, Path("."))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), path


def layer7b_base(vocab: int) -> nn.Module:
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=1,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def composed(base: nn.Module, modalities: tuple[str, ...], rank: int) -> MMComposeForCausalLM:
    names = ("text", *modalities)
    lora = LoRAConfig(
        strategy="decoupled",
        adapters={n: AdapterSpec(rank=rank, alpha=2 * rank) for n in names},
    )
    config = MMConfig(text_config=base.config.to_dict(), towers=towers(modalities), lora=lora)
    model = MMComposeForCausalLM(config, language_model=copy.deepcopy(base)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def prompt(
    modalities: tuple[str, ...], tokens: int, block: int, vocab: int, width: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """input_ids (1, n) with one placeholder per block, and features (1, block, width) each."""
    n_text = tokens - block * len(modalities)
    if n_text < len(modalities) + 1:
        raise SystemExit(f"--tokens {tokens} leaves too little text for {len(modalities)} blocks")
    g = torch.Generator().manual_seed(2)
    text = torch.randint(min(100, vocab // 2), vocab, (n_text,), generator=g)
    cuts = torch.linspace(0, n_text, len(modalities) + 2).round().long().tolist()
    ids: list[Tensor] = []
    for i, m in enumerate(modalities):
        ids += [text[cuts[i] : cuts[i + 1]], torch.tensor([SENTINELS[m]])]
    ids.append(text[cuts[-2] :])
    feats = {m: torch.randn(1, block, width, generator=g) for m in modalities}
    return torch.cat(ids)[None], feats


# ---------------------------------------------------------------- timed calls


def prefill_fn(variant: str, base: nn.Module, model: MMComposeForCausalLM, sp) -> Callable:
    if variant == "base":
        dec, head = base.get_decoder(), base.get_output_embeddings()

        def run() -> Tensor:
            cache = DynamicCache(config=base.config)
            h = dec(
                inputs_embeds=sp.embeds,
                attention_mask=sp.attention_mask,
                position_ids=sp.position_ids,
                use_cache=True,
                **{_cache_kwarg(type(dec)): cache},
            ).last_hidden_state
            return head(h[:, -1])

        return run
    head = model.language_model.get_output_embeddings()

    def run_composed() -> Tensor:
        cache = DynamicCache(config=model.language_model.config)
        h = model._decode(sp.embeds, sp.attention_mask, sp.position_ids, sp.routes, cache)
        return head(h[:, -1])

    return run_composed


class StepClock:
    """Perf-counter stamps at the end of every decoder forward."""

    def __init__(self, decoder: nn.Module) -> None:
        self.stamps: list[float] = []
        self.handle = decoder.register_forward_hook(
            lambda *_: self.stamps.append(time.perf_counter())
        )

    def per_token(self) -> float:
        s = self.stamps
        return (s[-1] - s[0]) / (len(s) - 1)


def decode_fn(
    variant: str, base: nn.Module, model: MMComposeForCausalLM, ids, feats, sp, n: int
) -> Callable[[], float]:
    if variant == "hf-generate":
        clock = StepClock(base.get_decoder())

        def run_hf() -> float:
            clock.stamps.clear()
            base.generate(
                inputs_embeds=sp.embeds,
                attention_mask=sp.attention_mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            return clock.per_token()

        return run_hf
    clock = StepClock(model.language_model.get_decoder())

    def run() -> float:
        clock.stamps.clear()
        out = model.generate(ids, modal_features=feats, max_new_tokens=n, eos_token_id=[])
        assert out.shape[1] == n
        return clock.per_token()

    return run


def interleaved(fns: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Each callable once per repeat, the order rotated every repeat; one warm-up each."""
    names = list(fns)
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            v = fns[name]()
            dt = time.perf_counter() - t
            times[name].append(v if isinstance(v, float) else dt)
    return times


@torch.inference_mode()
def bench_model(
    label: str, base: nn.Module, args: argparse.Namespace, decode_ks: list[int]
) -> dict:
    vocab = base.config.vocab_size
    out: dict = {"model": label, "settings": {}}
    for k in args.modalities:
        mods = SETTINGS[k]
        routed = composed(base, mods, args.rank)
        variants = {
            "routed": routed,
            "folded": copy.deepcopy(routed).fold_for_inference(),
            "masked": masked_copy(routed),
            "base": MMComposeForCausalLM(
                routed.config.model_copy(update={"lora": None}), language_model=base
            ).eval(),
        }
        ids, feats = prompt(mods, args.tokens, args.block, vocab, 32)
        sp = routed.prepare_inputs(ids, modal_features=feats)
        res: dict = {"modalities": list(mods), "tokens": int(sp.embeds.shape[1])}
        logits = {v: prefill_fn(v, base, variants.get(v, routed), sp)() for v in PREFILL}
        res["max_abs_logit_diff_vs_masked"] = {
            v: float((logits[v] - logits["masked"]).abs().max()) for v in ("routed", "folded")
        }
        fns = {v: prefill_fn(v, base, variants[v], sp) for v in PREFILL}
        pre = interleaved(fns, args.repeats)
        res["prefill_s"] = {v: statistics.median(t) for v, t in pre.items()}
        res["prefill_runs_s"] = pre
        if k in decode_ks:
            dfns = {
                v: decode_fn(v, base, variants.get(v, routed), ids, feats, sp, args.new_tokens)
                for v in DECODE
            }
            dec = interleaved(dfns, args.repeats)
            res["decode_s_per_token"] = {v: statistics.median(t) for v, t in dec.items()}
            res["decode_runs_s"] = dec
        out["settings"][str(k)] = res
        report_setting(label, k, res)
        if args.profile:
            profile(fns["routed"], f"{label} k={k} routed prefill")
    return out


def profile(fn: Callable, title: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"--- profile: {title}")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def report_setting(label: str, k: int, res: dict) -> None:
    pre = res["prefill_s"]
    print(f"\n{label}, {k} modality block(s), {res['tokens']} tokens")
    print(f"  {'variant':12s} {'prefill s':>10s} {'x base':>7s}")
    for v in PREFILL:
        print(f"  {v:12s} {pre[v]:10.4f} {pre[v] / pre['base']:7.3f}")
    print(f"  max |logit diff| vs masked: {res['max_abs_logit_diff_vs_masked']}")
    if "decode_s_per_token" in res:
        d = res["decode_s_per_token"]
        print(f"  {'decode':12s} {'ms/token':>10s} {'tok/s':>8s} {'vs hf':>7s}")
        for v in DECODE:
            print(f"  {v:12s} {d[v] * 1e3:10.2f} {1 / d[v]:8.1f} {d['hf-generate'] / d[v]:7.3f}")


def markdown(report: dict) -> str:
    """The tables of docs/benchmarks.md from a run's JSON (``--from-json``): per setting, the
    median time of each variant and, since the variants run interleaved, the median of the
    per-repeat ratios to base (prefill) or to hf-generate (decode: tokens/s relative), which
    cancels the machine's drift between repeats."""

    def paired(runs: dict, v: str, ref: str, invert: bool = False) -> float:
        r = [(b / a if invert else a / b) for a, b in zip(runs[v], runs[ref], strict=True)]
        return statistics.median(r)

    lines = []
    for m in report["models"]:
        lines += [f"**{m['model']}**, prefill s (median) and paired ratio to base", ""]
        lines += ["| blocks | " + " | ".join(PREFILL) + " |", "|---" * (len(PREFILL) + 1) + "|"]
        for k, res in m["settings"].items():
            pre, runs = res["prefill_s"], res["prefill_runs_s"]
            cells = [f"{pre[v]:.3f} ({paired(runs, v, 'base'):.2f}x)" for v in PREFILL]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        dec = {k: r for k, r in m["settings"].items() if "decode_s_per_token" in r}
        if dec:
            lines += ["", f"**{m['model']}**, decode ms/token (median) and paired tokens/s "
                      "relative to hf-generate", ""]  # fmt: skip
            lines += ["| blocks | " + " | ".join(DECODE) + " |", "|---" * (len(DECODE) + 1) + "|"]
            for k, res in dec.items():
                d, runs = res["decode_s_per_token"], res["decode_runs_s"]
                cells = [
                    f"{d[v] * 1e3:.1f} ({paired(runs, v, 'hf-generate', invert=True):.2f})"
                    for v in DECODE
                ]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def gemm_rates(tokens: int, block: int, rank: int, width: int = 576, mlp: int = 1536) -> None:
    """Throughput of the products a SmolLM2 prefill runs: a base linear over all tokens, and
    a folded difference adapter's two thin products (rank ``2 * rank``) over one block."""
    g = torch.Generator().manual_seed(0)
    r = 2 * rank
    shapes = {
        f"base q_proj ({tokens}x{width} @ {width}x{width})": (tokens, width, width),
        f"base up_proj ({tokens}x{width} @ {width}x{mlp})": (tokens, width, mlp),
        f"adapter A ({block}x{width} @ {width}x{r})": (block, width, r),
        f"adapter B ({block}x{r} @ {r}x{width})": (block, r, width),
        f"adapter B, MLP ({block}x{r} @ {r}x{mlp})": (block, r, mlp),
    }
    print(f"{torch.get_num_threads()} thread(s)")
    for label, (m, k, n) in shapes.items():
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        reps = max(20, int(2e9 / (2 * m * k * n)))
        for _ in range(10):
            F.linear(x, w)
        t = time.perf_counter()
        for _ in range(reps):
            F.linear(x, w)
        dt = (time.perf_counter() - t) / reps
        print(f"  {label:40s} {dt * 1e6:8.1f} us  {2 * m * k * n / dt / 1e9:6.1f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--models", default="smollm2,7b-layer", help="comma list")
    ap.add_argument("--modalities", default="1,3,4", help="numbers of modality blocks")
    ap.add_argument("--tokens", type=int, default=320, help="prompt length after splicing")
    ap.add_argument("--block", type=int, default=64, help="tokens per modality block")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--small-vocab", type=int, default=1024, help="vocab of the 7B layer")
    ap.add_argument("--decode-7b", default="3", help="settings decoded on the 7B layer")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of routed prefill")
    ap.add_argument(
        "--gemm", action="store_true", help="GFLOP/s of SmolLM2's base and adapter products"
    )
    ap.add_argument("--out", default=None, help="JSON file for the raw figures")
    ap.add_argument(
        "--from-json", default=None, help="print a run's tables (markdown), run nothing"
    )
    args = ap.parse_args()
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())))
        return
    args.modalities = [int(x) for x in args.modalities.split(",")]
    torch.set_num_threads(args.threads)
    if args.gemm:
        gemm_rates(args.tokens, args.block, args.rank)
        return
    hf_logging.set_verbosity_error()
    report = {"torch_threads": torch.get_num_threads(), "args": vars(args), "models": []}
    for name in args.models.split(","):
        if name == "smollm2":
            base, _ = smollm2_base(args.llm)
            ks = args.modalities
        elif name == "7b-layer":
            base = layer7b_base(args.small_vocab)
            ks = [int(x) for x in args.decode_7b.split(",") if x]
        else:
            raise SystemExit(f"unknown model {name!r}")
        report["models"].append(bench_model(name, base, args, ks))
        del base
        if args.out:  # after each model, so a long run leaves its figures
            Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
