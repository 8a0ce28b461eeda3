"""The ``mmcompose`` command line: one plain function per command.

Errors of mmcompose's own classes are printed as one message with a hint, no traceback,
and exit code 2; an interrupt exits with 130.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmcompose.errors import MMComposeError

app = typer.Typer(
    name="mmcompose",
    help="Compose multimodal LLMs from single-modality models; align frozen unimodal models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (logs, CI) gets a wide console so tables are not cut.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

ModelDir = Annotated[Path, typer.Argument(help="A model folder written by mmcompose.")]


@app.command()
def inspect(
    model_dir: ModelDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a model's LLM, towers, LoRA adapters and parameter counts (reads no weights)."""
    from mmcompose.inspect import describe

    info = describe(model_dir)
    if as_json:
        out.print_json(json.dumps(info))
        return
    llm = info["llm"]
    out.print(f"[bold]{info['path']}[/]  ({info['num_tensors']} tensors, {info['dtype']})")
    out.print(
        f"LLM: {llm['model_type']}, hidden {llm['hidden_size']}, {llm['num_layers']} layers, "
        f"vocab {llm['vocab_size']}, {_n(llm['params'])} parameters"
    )
    t = Table(
        "modality",
        "encoder",
        "projector",
        "prefix/suffix",
        "encoder params",
        "projector params",
        title="Towers",
    )
    for tw in info["towers"]:
        frozen = " (frozen)" if tw["frozen_encoder"] else ""
        t.add_row(
            tw["modality"],
            tw["encoder"] + frozen,
            tw["projector"],
            f"{tw['prefix_tokens']}/{tw['suffix_tokens']}",
            _n(tw["encoder_params"]),
            _n(tw["projector_params"]),
        )
    out.print(t if info["towers"] else "Towers: none (text only)")
    lora = info["lora"]
    if lora:
        a = Table(
            "adapter",
            "rank",
            "alpha",
            "used by",
            "params",
            title=f"LoRA ({lora['strategy']}) on {', '.join(lora['target_modules'])}",
        )
        for ad in lora["adapters"]:
            a.add_row(
                ad["name"],
                str(ad["rank"]),
                f"{ad['alpha']:g}",
                ", ".join(ad["used_by"]) or "-",
                _n(ad["params"]),
            )
        out.print(a)
    else:
        out.print("LoRA: none")
    out.print(f"Total parameters: [bold]{_n(info['total_params'])}[/]")


@app.command()
def generate(
    model_dir: ModelDir,
    prompt: Annotated[
        str, typer.Option(help="Text with placeholders <image> <audio> <video> <point>.")
    ],
    image: Annotated[
        list[Path] | None, typer.Option(help="Image file; repeat for several.")
    ] = None,
    audio: Annotated[list[Path] | None, typer.Option(help="Audio file (wav, flac, ogg).")] = None,
    video: Annotated[list[Path] | None, typer.Option(help="Video file (mp4, avi, ...).")] = None,
    point: Annotated[
        list[Path] | None, typer.Option(help="Point cloud (.npy .ply .off .obj).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the LLM's chat template.")] = True,
    device: str = "cpu",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print text and token ids as JSON.")
    ] = False,
) -> None:
    """Generate text from a prompt and modality inputs."""
    import torch

    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    torch.manual_seed(seed)
    processor = MMProcessor.from_pretrained(model_dir)
    inputs = {"image": image, "audio": audio, "video": video, "point": point}
    batch = processor(prompt, {m: v for m, v in inputs.items() if v}, chat=chat)
    model = MMComposeForCausalLM.from_pretrained(model_dir, device=device)
    eos = [i for i in {processor.tokenizer.eos_token_id, *model._default_eos()} if i is not None]
    ids = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
        seed=seed,
    )
    pad = processor.tokenizer.pad_token_id
    tokens = [t for t in ids[0].tolist() if t != pad]
    text = processor.decode(tokens).strip()
    if as_json:
        out.print_json(json.dumps({"text": text, "tokens": tokens}))
    else:
        out.print(text, markup=False, highlight=False)


@app.command()
def quickstart(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the model.")] = Path(
        "runs/quickstart"
    ),
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Run the main job end to end on the offline default assets."""
    from mmcompose.quickstart import run_quickstart

    r = run_quickstart(out_dir, force=force)
    t = Table("step", "seconds", title="mmcompose quickstart")
    for step, sec in r.timings.items():
        t.add_row(step, f"{sec:.1f}")
    out.print(t)
    out.print(f"model: {r.out_dir / 'model'}  ({_n(sum(r.params.values()))} parameters)")
    out.print(f"save -> load round trip bit-exact: {r.bit_exact}")
    for name, answer in r.answers.items():
        out.print(f"[bold]{name}[/] -> {escape(answer)}")
    if not r.bit_exact:
        raise typer.Exit(1)


assets_app = typer.Typer(
    help="Offline models and datasets in the asset cache.", no_args_is_help=True
)
app.add_typer(assets_app, name="assets")


@assets_app.command("prepare")
def assets_prepare(
    only: Annotated[list[str] | None, typer.Option(help="Prepare only these assets.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if prepared.")] = False,
) -> None:
    """Prepare offline assets in the cache (installs nothing; names what is missing)."""
    from mmcompose.assets import prepare_base_llm
    from mmcompose.assets.datasets import DATASETS, prepare_datasets
    from mmcompose.assets.encoders import prepare_efficientnet_lite0, prepare_whisper_tiny_en
    from mmcompose.errors import UnknownNameError

    preparers = {
        "base_llm": lambda: prepare_base_llm(force=force),
        "efficientnet_lite0": lambda: prepare_efficientnet_lite0(force=force),
        "whisper_tiny_en": lambda: prepare_whisper_tiny_en(force=force),
    } | {name: (lambda n=name: prepare_datasets(only=[n], force=force)[n]) for name in DATASETS}
    names = only or list(preparers)
    for name in names:
        if name not in preparers:
            raise UnknownNameError(
                f"unknown asset {name!r}", hint=f"choose from {', '.join(preparers)}"
            )
    for name in names:
        out.print(f"{name}: {preparers[name]()}")


@app.command()
def compose(
    config: Annotated[
        Path, typer.Argument(help="Composition YAML (mergekit's schema + multimodal keys).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing.")
    ] = False,
    device: Annotated[str, typer.Option(help="Where the arithmetic runs: cpu or cuda.")] = "cpu",
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    allow_nonfinite: Annotated[
        bool, typer.Option(help="Warn instead of failing on NaN/Inf in an input.")
    ] = False,
) -> None:
    """Compose single-modality MLLMs (NaiveMC, DAMC) or merge LLMs, streamed shard by shard."""
    from mmcompose.compose import run_from_yaml

    result = run_from_yaml(
        config,
        out_dir,
        dry_run=dry_run,
        device=device,
        force=force,
        allow_nonfinite=allow_nonfinite,
    )
    out.print(result.summary(), markup=False, highlight=False)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training YAML (see docs).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Train a single-modality MLLM (stage 1 projector, stage 2 projector + LoRA).

    Under torchrun, runs data-parallel; an interrupted run resumes from OUT.checkpoint."""
    from mmcompose.train.trainer import load_train_config
    from mmcompose.train.trainer import train as run_train

    cfg, base = load_train_config(config)
    r = run_train(cfg, out_dir, config_dir=base, force=force)
    out.print(
        f"trained {r.steps} steps in {r.seconds:.1f} s, final loss {r.final_loss:.4f}, "
        f"peak RSS {r.peak_rss_mb:.0f} MB -> {r.out_dir}"
    )


@app.command()
def align(
    config: Annotated[Path, typer.Argument(help="Alt-MoE alignment YAML (configs/align/).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Train an Alt-MoE connector between frozen unimodal models (alternating directions).

    For several processes: torchrun --nproc_per_node N -m mmcompose.align.trainer CONFIG -o OUT"""
    from mmcompose.align.trainer import run_align

    out.print(run_align(config, out_dir, force=force).summary(), markup=False, highlight=False)


@app.command()
def index(
    model: Annotated[Path, typer.Option(help="A trained alignment folder (mmcompose align).")],
    data: Annotated[Path, typer.Option(help="Manifest JSONL of the items to store.")],
    store: Annotated[Path, typer.Option(help="Vector store folder to create.")],
    gallery: Annotated[
        str | None, typer.Option(help="Store the items' modality (default) or 'text' (captions).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only this manifest split.")] = None,
    backend: Annotated[str, typer.Option(help="faiss, lancedb or milvus.")] = "faiss",
    kind: Annotated[str, typer.Option("--index", help="flat, hnsw or ivfpq.")] = "flat",
) -> None:
    """Embed a manifest once (frozen encoder + one connector pass) into a vector store."""
    from mmcompose.retrieval.service import index_manifest

    n = index_manifest(
        model, data, store, gallery=gallery, split=split, backend=backend, index=kind
    )
    out.print(f"stored {n} vectors in {store}")


@app.command()
def search(
    store: Annotated[Path, typer.Option(help="A store made by mmcompose index.")],
    text: Annotated[str | None, typer.Option(help="A text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="An image query.")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio query.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search a store with one query: frozen encoder, one connector pass, one index search."""
    from mmcompose.errors import ConfigError
    from mmcompose.retrieval.service import search as run_search

    given = {m: v for m, v in (("text", text), ("image", image), ("audio", audio)) if v is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of --text, --image, --audio")
    ((modality, query),) = given.items()
    hits = run_search(store, modality, str(query), k)
    if as_json:
        out.print_json(json.dumps([h.__dict__ for h in hits]))
        return
    t = Table("rank", "score", "id", "label", "caption / path")
    for h in hits:
        m = h.metadata or {}
        t.add_row(
            str(h.rank),
            f"{h.score:.3f}",
            h.id,
            str(m.get("label", "")),
            str(m.get("text") or m.get("caption") or m.get("path") or ""),
        )
    out.print(t)


@app.command("eval")
def evaluate(
    model_dir: ModelDir,
    task: Annotated[str, typer.Option(help="classify")] = "classify",
    data: Annotated[Path | None, typer.Option(help="Manifest JSONL (classify).")] = None,
    split: Annotated[str, typer.Option(help="Manifest split to evaluate.")] = "test",
    mode: Annotated[str, typer.Option(help="generate, loglikelihood or both.")] = "both",
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder.")] = None,
    log_samples: Annotated[bool, typer.Option(help="Also write per-sample JSONL.")] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items.")] = None,
) -> None:
    """Evaluate a model; results follow lm-evaluation-harness's JSON layout."""
    from mmcompose.bench.classify import classify, read_manifest
    from mmcompose.bench.results import task_block, write_results
    from mmcompose.errors import ConfigError
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    if task != "classify":
        raise ConfigError(f"unknown task {task!r}", hint="tasks: classify")
    if data is None:
        raise ConfigError("--data MANIFEST is required for --task classify")
    modes = ("generate", "loglikelihood") if mode == "both" else (mode,)
    if any(m not in ("generate", "loglikelihood") for m in modes):
        raise ConfigError(f"unknown mode {mode!r}", hint="use generate, loglikelihood or both")
    rows = read_manifest(data, split)[:limit]
    model = MMComposeForCausalLM.from_pretrained(model_dir)
    processor = MMProcessor.from_pretrained(model_dir)
    r = classify(model, processor, rows, modes=modes)
    name = f"classify_{r.modality}"
    block = task_block(r.correct, name)
    t = Table("task", "n", "labels", *[k for k in r.correct], title=str(model_dir))
    t.add_row(
        name,
        str(r.n),
        str(len(r.labels)),
        *[f"{block[k]:.3f} ± {block[k.replace(',', '_stderr,')]:.3f}" for k in r.correct],
    )
    out.print(t)
    if out_dir is not None:
        path = write_results(
            out_dir,
            {name: block},
            {
                name: {
                    "task": name,
                    "dataset_path": str(data),
                    "test_split": split,
                    "labels": r.labels,
                    "output_type": list(modes),
                }
            },
            {name: r.n},
            {"model": "mmcompose", "model_args": f"pretrained={model_dir}", "device": "cpu"},
            {name: r.samples} if log_samples else None,
        )
        out.print(f"results: {path}")


def _n(x: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv)
    except MMComposeError as e:
        err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False)
        if e.hint:
            err.print(f"[yellow]hint:[/] {escape(e.hint)}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
