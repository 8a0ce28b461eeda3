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
    model = MMComposeForCausalLM.from_pretrained(model_dir, device=device).fold_for_inference()
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
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Report folder (markdown, results JSON, chart).")
    ] = Path("runs/quickstart"),
    force: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    full: Annotated[
        bool,
        typer.Option(help="Whole test splits, all of mini-MCUB, generation too (slow)."),
    ] = False,
) -> None:
    """Prepare assets, train image/audio/point MLLMs (shared and decoupled), compose NaiveMC
    and DAMC, evaluate everything on each test split and mini-MCUB. Cached: a second run
    only re-reads results."""
    from mmcompose.quickstart import Budget, format_cell, run_quickstart

    r = run_quickstart(
        out_dir,
        force=force,
        budget=Budget.full() if full else Budget(),
        log=lambda s: err.print(s, highlight=False, markup=False),
    )
    t = Table("model", *r.columns, title="mmcompose quickstart: accuracy (%)")
    for row in r.rows:
        t.add_row(row.name, *(format_cell(row, c) for c in r.columns))
    out.print(t)
    out.print("log-likelihood accuracy; generation accuracy in brackets")
    for claim, ok, detail in r.claims:
        mark = "[green]holds[/]" if ok else "[red]does not hold[/]"
        out.print(f"{mark}: {escape(claim)} ({escape(detail)})")
    out.print(f"total {r.timings['total']:.0f} s; report: {r.out_dir / 'report.md'}")


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
    from mmcompose.assets.point_encoder import prepare_pointnet_meshes
    from mmcompose.errors import UnknownNameError

    preparers = (
        {
            "base_llm": lambda: prepare_base_llm(force=force),
            "efficientnet_lite0": lambda: prepare_efficientnet_lite0(force=force),
            "whisper_tiny_en": lambda: prepare_whisper_tiny_en(force=force),
        }
        | {name: (lambda n=name: prepare_datasets(only=[n], force=force)[n]) for name in DATASETS}
        # Trained here on the meshes dataset (about 2 minutes), so after the datasets.
        | {"pointnet_meshes": lambda: prepare_pointnet_meshes(force=force)}
    )
    names = only or list(preparers)
    for name in names:
        if name not in preparers:
            raise UnknownNameError(
                f"unknown asset {name!r}", hint=f"choose from {', '.join(preparers)}"
            )
    for name in names:
        out.print(f"{name}: {preparers[name]()}")


bench_app = typer.Typer(help="Benchmarks: build evaluation sets.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("build-mcub")
def bench_build_mcub(
    manifests: Annotated[
        list[str] | None,
        typer.Argument(help="Manifest JSONL files or dataset:NAME (default: every dataset)."),
    ] = None,
    manifest_opt: Annotated[
        list[str] | None,
        typer.Option("--manifests", "-m", help="Manifest JSONL or dataset:NAME; repeatable."),
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "runs/mcub"
    ),
    split: Annotated[str, typer.Option(help="Manifest split(s), e.g. test or val,test.")] = "test",
    seed: int = 0,
    modalities: Annotated[
        str, typer.Option(help="Modalities to combine (comma-separated).")
    ] = "image,audio,video,point",
    per_combination: Annotated[int, typer.Option(min=1, help="Target items per set.")] = 300,
    per_concept: Annotated[
        int | None, typer.Option(min=1, help="At most this many items per concept.")
    ] = None,
    top_k: Annotated[
        int, typer.Option(min=3, help="Distractors come from the k most similar concepts.")
    ] = 8,
    max_similarity: Annotated[
        float, typer.Option(help="Never offer a concept this similar to the gold one.")
    ] = 0.7,
    force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Build a mini-MCUB: items of 3-4 modalities sharing one concept, 4 options (A-D)."""
    from mmcompose.assets.datasets import DATASETS
    from mmcompose.bench.mcub_build import build_mcub

    entries = [*(manifest_opt or []), *(manifests or [])] or [f"dataset:{n}" for n in DATASETS]
    report = build_mcub(
        entries,
        out_dir,
        split=split,
        seed=seed,
        modalities=modalities,
        per_combination=per_combination,
        per_concept=per_concept,
        top_k=top_k,
        max_similarity=max_similarity,
        force=force,
    )
    out.print(report.summary(), markup=False, highlight=False)


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
    search: Annotated[
        Path | None,
        typer.Option(
            "--search",
            help="MCUB-format validation questions: search the per-source weights (lambdas) "
            "on them in memory first, compose with the best, report in OUT/search/.",
        ),
    ] = None,
    search_answers: Annotated[
        Path | None,
        typer.Option(
            "--search-answers", help="Gold answers for --search (default: the file's own)."
        ),
    ] = None,
    grid: Annotated[
        str | None,
        typer.Option(help="Candidate lambda values, comma-separated [0,0.25,0.5,0.75,1,1.25]."),
    ] = None,
    search_mode: Annotated[
        str, typer.Option("--search-mode", help="Scoring: loglikelihood or generate.")
    ] = "loglikelihood",
    search_method: Annotated[
        str,
        typer.Option(
            "--search-method",
            help="coordinate (sweep one lambda at a time, <= --search-passes passes) or grid "
            "(every combination, <= 500).",
        ),
    ] = "coordinate",
    search_passes: Annotated[
        int | None,
        typer.Option(
            "--search-passes", min=1, help="Most sweeps over the sources (coordinate) [3]."
        ),
    ] = None,
) -> None:
    """Compose single-modality MLLMs (NaiveMC, DAMC) or merge LLMs, streamed shard by shard."""
    from mmcompose.compose import run_from_yaml
    from mmcompose.errors import ConfigError

    if search is None:
        given = [
            f
            for f, v in (
                ("--search-answers", search_answers),
                ("--grid", grid),
                ("--search-passes", search_passes),
            )
            if v
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} needs --search VAL.json")
        result = run_from_yaml(
            config,
            out_dir,
            dry_run=dry_run,
            device=device,
            force=force,
            allow_nonfinite=allow_nonfinite,
        )
        out.print(result.summary(), markup=False, highlight=False)
        return
    if dry_run:
        raise ConfigError(
            "--dry-run cannot be combined with --search (the search scores real models)",
            hint="run --dry-run alone to check the plan",
        )
    from mmcompose.compose.search import (
        DEFAULT_GRID,
        MAX_PASSES,
        SEARCH_DIR,
        compose_with_search,
    )

    found, composed = compose_with_search(
        config,
        out_dir,
        search,
        search_answers,
        force=force,
        device=device,
        allow_nonfinite=allow_nonfinite,
        grid=DEFAULT_GRID if grid is None else grid,
        method=search_method,
        mode=search_mode,
        max_passes=MAX_PASSES if search_passes is None else search_passes,
    )
    names = found.source_names()
    best = ", ".join(f"{n}={w:g}" for n, w in zip(names, found.best_weights, strict=True))
    evaluated = sum(not c.cached for c in found.candidates)
    out.print(
        f"search ({found.method}, {found.metric}): best {best} -> {found.best_accuracy:.4g} "
        f"after {evaluated} candidates in {found.seconds:.1f} s; "
        f"report in {out_dir / SEARCH_DIR}",
        markup=False,
        highlight=False,
    )
    out.print(composed.summary(), markup=False, highlight=False)


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
    task: Annotated[str, typer.Option(help="classify or mcub")] = "classify",
    data: Annotated[
        Path | None, typer.Option(help="Manifest JSONL (classify) or questions JSON (mcub).")
    ] = None,
    answers: Annotated[
        Path | None,
        typer.Option(help="mcub: answers JSON (default: gold letters in the questions file)."),
    ] = None,
    split: Annotated[str, typer.Option(help="classify: manifest split to evaluate.")] = "test",
    modalities: Annotated[
        str | None,
        typer.Option(help="mcub: keep only these inputs, e.g. image,audio (MCUB-3 subsets)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="generate, loglikelihood or both.")] = "both",
    batch_size: Annotated[int, typer.Option(min=1, help="mcub: prompts per batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation length.")] = 8,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Results folder.")] = None,
    log_samples: Annotated[bool, typer.Option(help="Also write per-sample JSONL.")] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N items.")] = None,
    on_corrupt: Annotated[
        str,
        typer.Option(
            "--on-corrupt",
            help="classify: an unreadable file fails (fail) or its item is skipped and named "
            "in a warning (skip).",
        ),
    ] = "fail",
) -> None:
    """Evaluate a model; results follow lm-evaluation-harness's JSON layout.

    Under torchrun each process scores a strided shard of the items and rank 0 writes the
    one results file: torchrun --nproc_per_node N -m mmcompose eval ..."""
    from mmcompose.bench import mcub
    from mmcompose.bench.classify import ClassifyResult, classify, read_manifest, readable_rows
    from mmcompose.bench.distributed import data_parallel
    from mmcompose.bench.results import task_block, write_results
    from mmcompose.errors import ConfigError
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    if task not in ("classify", "mcub"):
        raise ConfigError(f"unknown task {task!r}", hint="tasks: classify, mcub")
    if data is None:
        what = "MANIFEST" if task == "classify" else "QUESTIONS.json"
        raise ConfigError(f"--data {what} is required for --task {task}")
    modes = ("generate", "loglikelihood") if mode == "both" else (mode,)
    if any(m not in ("generate", "loglikelihood") for m in modes):
        raise ConfigError(f"unknown mode {mode!r}", hint="use generate, loglikelihood or both")
    if task == "classify":
        rows = read_manifest(data, split)[:limit]
        # The label set is the whole dataset's (closed-set), whatever the split or --limit.
        labels = sorted({r["label"] for r in read_manifest(data, None)})
    else:
        items = mcub.load_mcub(data, answers)
        if modalities:
            keep = [m.strip() for m in modalities.split(",") if m.strip()]
            items = mcub.restrict_modalities(items, keep)
        items = items[:limit]
        if not any(it.answer for it in items):
            raise ConfigError(
                f"{data} holds no gold answers", hint="pass the answers file: --answers FILE"
            )
    model = MMComposeForCausalLM.from_pretrained(model_dir).fold_for_inference()
    processor = MMProcessor.from_pretrained(model_dir)
    with data_parallel() as dp:
        if task == "classify":
            rows, skipped = readable_rows(processor, rows, on_corrupt, warn=dp.main)
            mine = dp.take(rows)  # labels from all rows, so every rank scores the same set
            parts = dp.run(
                lambda: (
                    classify(
                        model,
                        processor,
                        mine,
                        labels=labels,
                        modes=modes,
                        max_new_tokens=max_new_tokens,
                        progress=dp.main,
                    )
                    if mine
                    else None
                )
            )
            r = ClassifyResult.merge([p for p in parts if p is not None])
            name, n, correct, samples = f"classify_{r.modality}", r.n, r.correct, r.samples
            extra = {"labels": str(len(r.labels))}
            config = {"test_split": split, "labels": r.labels, "output_type": list(modes)}
            config["skipped_unreadable"] = sorted(skipped)
        else:
            mcub.check_inputs(items, model.modalities)  # all ranks, all items: fail together
            kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
            parts = dp.run(
                lambda: mcub.evaluate_mcub(
                    model, processor, dp.take(items), modes, **kwargs, progress=dp.main
                )
            )
            res = mcub.MCUBResult.merge(parts)
            used = mcub.item_modalities(items)
            name, n, correct, samples = f"mcub_{'_'.join(used)}", res.n, res.correct, res.samples
            extra = {"modalities": ",".join(used)}
            output_type = {"generate": "generate_until", "loglikelihood": "multiple_choice"}
            config = {
                "answers_path": str(answers) if answers else None,
                "modalities": used,
                "output_type": [output_type[m] for m in modes],
                "generation_kwargs": {"max_new_tokens": max_new_tokens, "do_sample": False},
                "metric_list": list(correct),
            }
    if not dp.main:
        return
    block = task_block(correct, name)
    t = Table("task", "n", *extra, *correct, title=str(model_dir))
    t.add_row(
        name,
        str(n),
        *extra.values(),
        *[f"{block[k]:.3f} ± {block[k.replace(',', '_stderr,')]:.3f}" for k in correct],
    )
    out.print(t)
    if out_dir is not None:
        path = write_results(
            out_dir,
            {name: block},
            {name: {"task": name, "dataset_path": str(data), "num_fewshot": 0, **config}},
            {name: n},
            {
                "model": "mmcompose",
                "model_args": f"pretrained={model_dir}",
                "device": "cpu",
                "world_size": dp.world,
            },
            {name: samples} if log_samples else None,
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
