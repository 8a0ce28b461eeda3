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
    from mmcompose.inspect import describe, human_count

    info = describe(model_dir)
    if as_json:
        out.print_json(json.dumps(info))
        return
    llm = info["llm"]
    out.print(f"[bold]{info['path']}[/]  ({info['num_tensors']} tensors, {info['dtype']})")
    out.print(
        f"LLM: {llm['model_type']}, hidden {llm['hidden_size']}, {llm['num_layers']} layers, "
        f"vocab {llm['vocab_size']}, {human_count(llm['params'])} parameters"
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
            human_count(tw["encoder_params"]),
            human_count(tw["projector_params"]),
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
                human_count(ad["params"]),
            )
        out.print(a)
    else:
        out.print("LoRA: none")
    if info.get("mmer"):
        _print_mmer(info["mmer"])
    out.print(f"Total parameters: [bold]{human_count(info['total_params'])}[/]")


def _print_mmer(mmer: dict) -> None:
    from mmcompose.inspect import human_bytes, human_count

    t = Table("modality", "density", "kept", "mask storage",
              title=f"MMER masks ({mmer['mask_rule']}, lambda {mmer['mask_lambda']:g}, "
              f"{mmer['merge_method']})")  # fmt: skip
    for m in mmer["masks"]:
        t.add_row(m["modality"], f"{m['density']:.1%}", human_count(m["kept"]),
                  human_bytes(m["bytes"]))  # fmt: skip
    out.print(t)
    out.print(
        f"merged delta: {human_count(mmer['delta_params'])} entries in {mmer['layers']} "
        f"layers ({', '.join(mmer['target_modules'])}), {human_bytes(mmer['delta_bytes'])} "
        "(dense)"
    )


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
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print text and token ids as JSON.")
    ] = False,
) -> None:
    """Generate text from a prompt and modality inputs."""
    from mmcompose.model.generation import generate_from_folder

    g = generate_from_folder(
        model_dir,
        prompt,
        {"image": image, "audio": audio, "video": video, "point": point},
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        chat=chat,
        device=device,
    )
    if as_json:
        out.print_json(json.dumps({"text": g.text, "tokens": g.tokens}))
    else:
        out.print(g.text, markup=False, highlight=False)


@app.command()
def serve(
    model_dir: ModelDir,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="The page's default.")] = 128,
) -> None:
    """A chat page in the browser: upload media, ask, read the streamed answer (needs the
    serve extra). Folder and port are checked before the weights load."""
    from mmcompose.serve.app import serve as run_server

    run_server(model_dir, host=host, port=port, device=device, max_new_tokens=max_new_tokens)


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
    for c in r.claims:
        colour = "green" if c.significant else "yellow" if c.ok else "red"
        out.print(f"[{colour}]{escape(c.verdict)}[/]: {escape(c.claim)} ({escape(c.evidence)})")
    out.print(f"total {r.timings['total']:.0f} s; report: {r.out_dir / 'report.md'}")


reproduce_app = typer.Typer(
    help="The paper's composition table, reproduced offline with statistics.",
    no_args_is_help=True,
)
app.add_typer(reproduce_app, name="reproduce")


@reproduce_app.command("composition")
def reproduce_composition(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Report folder (report.md, results.json, chart).")
    ] = Path("runs/reproduce"),
    seeds: Annotated[
        str | None, typer.Option(help="Training seeds, e.g. 0,1,2 (default: the budget's).")
    ] = None,
    budget: Annotated[
        str, typer.Option(help="full (about 2 h on 2 CPU cores) or smoke (about 20 min).")
    ] = "full",
    modalities: Annotated[
        str | None, typer.Option(help="Modalities to train (default image,audio,video,point).")
    ] = None,
    subsets: Annotated[
        str | None, typer.Option(help="MCUB subsets to compose, e.g. IAV,AVP; all or none.")
    ] = None,
    on_corrupt: Annotated[
        str, typer.Option("--on-corrupt", help="An unreadable video: fail, or skip its items.")
    ] = "fail",
    force: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """Train every single-modality model per seed, compose NaiveMC and DAMC for MCUB-4 and
    each MCUB-3 subset (and the ablations), evaluate, report with intervals and paired
    tests. Every stage is cached: an interrupted run resumes where it stopped."""
    from mmcompose.reproduce import run_reproduction

    r = run_reproduction(
        out_dir,
        budget=budget,
        seeds=seeds,
        modalities=modalities,
        subsets=subsets,
        force=force,
        on_corrupt=on_corrupt,
        log=lambda s: err.print(s, highlight=False, markup=False),
    )
    for c in r.claims:
        colour = "green" if c["holds"] else "yellow" if c["direction_holds"] else "red"
        out.print(f"[{colour}]{escape(c['verdict'])}[/]: {escape(c['claim'])}")
    out.print(f"report: {r.out_dir / 'report.md'}")


@reproduce_app.command("render")
def reproduce_render(
    run_dir: Annotated[Path, typer.Argument(help="The folder a reproduction wrote.")],
    into: Annotated[
        Path, typer.Option(help="Markdown file whose marked section is regenerated.")
    ] = Path("docs/results.md"),
) -> None:
    """Regenerate docs/results.md's composition section from a run's results.json."""
    from mmcompose.reproduce import render_docs

    out.print(f"updated {render_docs(run_dir, into)}")


@reproduce_app.command("merge")
def reproduce_merge(
    run_dirs: Annotated[list[Path], typer.Argument(help="Report folders of runs of other seeds.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The merged report folder.")],
    force: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """Merge runs of different seeds (e.g. one per machine) into one report, computed from
    their per-item results as one run over all the seeds would compute it."""
    from mmcompose.reproduce_merge import merge_runs

    r = merge_runs(run_dirs, out_dir, force=force)
    out.print(f"seeds {', '.join(map(str, r.doc['seeds']))}; report: {r.out_dir / 'report.md'}")


@reproduce_app.command("alignment")
def reproduce_alignment(
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Report folder (report.md, results.json, chart).")
    ] = Path("runs/reproduce-alignment"),
    seeds: Annotated[
        str | None, typer.Option(help="Training seeds, e.g. 0,1,2 (default: the budget's).")
    ] = None,
    budget: Annotated[
        str, typer.Option(help="full (about 40 min on 2 CPU cores) or smoke (a few minutes).")
    ] = "full",
    force: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
) -> None:
    """The Alt-MoE ablation on one set of stored latents: MoE alternating / joint, MLP (matched
    parameters), linear, ASIF, FuseMix; LLM and MiniLM text features; image-text (captions)
    and audio-text (spoken + sounds); Recall@1/5/10 with 95% intervals and paired tests."""
    from mmcompose.align.reproduce import run_alignment_reproduction

    r = run_alignment_reproduction(
        out_dir, budget=budget, seeds=seeds, force=force,
        log=lambda s: err.print(s, highlight=False, markup=False),
    )  # fmt: skip
    for c in r.doc["claims"]:
        out.print(f"{escape(c['claim'])}: holds {c['holds']}/{c['cells']}, reversed "
                  f"{c['reversed']}/{c['cells']}")  # fmt: skip
    out.print(f"report: {r.out_dir / 'report.md'}")


@reproduce_app.command("render-alignment")
def reproduce_render_alignment(
    run_dir: Annotated[Path, typer.Argument(help="The folder `reproduce alignment` wrote.")],
    into: Annotated[
        Path, typer.Option(help="Markdown file whose marked section is regenerated.")
    ] = Path("docs/results.md"),
    chart: Annotated[
        Path | None, typer.Option(help="Chart PNG (default: img/alignment-recall.png beside it).")
    ] = None,
) -> None:
    """Regenerate docs/results.md's alignment section and its chart from a run's results."""
    from mmcompose.align.reproduce_report import render_alignment_docs

    md, png = render_alignment_docs(run_dir, into, chart)
    out.print(f"updated {md} and {png}")


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
    from mmcompose.assets.prepare import prepare_assets

    for name, result in prepare_assets(only, force=force):
        out.print(f"{name}: {result}")


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
    device: Annotated[
        str, typer.Option(help="Where the arithmetic runs: cpu, cuda, cuda:N or mps.")
    ] = "cpu",
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
    search_unlabelled: Annotated[
        Path | None,
        typer.Option(
            "--search-unlabelled",
            help="Search the lambdas without labels (AdaMMS's generation consistency) on "
            "unlabelled inputs: MCUB questions (.json), a folder or a list of media files "
            "[grid 0.25,0.5,0.75,1].",
        ),
    ] = None,
) -> None:
    """Compose single-modality MLLMs (NaiveMC, DAMC) or merge LLMs, streamed shard by shard."""
    from mmcompose.compose.command import run_compose

    result = run_compose(
        config,
        out_dir,
        dry_run=dry_run,
        device=device,
        force=force,
        allow_nonfinite=allow_nonfinite,
        search=search,
        search_answers=search_answers,
        grid=grid,
        search_mode=search_mode,
        search_method=search_method,
        search_passes=search_passes,
        search_unlabelled=search_unlabelled,
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
    from mmcompose.fs import refuse_existing
    from mmcompose.train.config import load_train_config

    cfg, base = load_train_config(config)  # config and output refused before torch
    refuse_existing(out_dir, force)
    from mmcompose.train.trainer import train as run_train

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
    from_dir: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="A trained alignment to add the config's new modalities to (its parameters "
            "stay frozen; only the new directions train).",
        ),
    ] = None,
) -> None:
    """Train an Alt-MoE connector between frozen unimodal models (alternating directions).

    For several processes: torchrun --nproc_per_node N -m mmcompose.align.trainer CONFIG -o OUT"""
    from mmcompose.fs import refuse_existing
    from mmcompose.io import load_yaml

    load_yaml(config, "align config")  # a missing or malformed file: refused before torch
    refuse_existing(out_dir, force)
    if from_dir is not None:
        from mmcompose.align.folder import read_alignment

        read_alignment(from_dir)  # not an alignment folder: refused before torch
    from mmcompose.align.trainer import run_align

    result = run_align(config, out_dir, force=force, continue_from=from_dir)
    out.print(result.summary(), markup=False, highlight=False)


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
    force: Annotated[
        bool, typer.Option(help="Replace an existing store (once the new one is complete).")
    ] = False,
    update: Annotated[
        bool,
        typer.Option(
            help="Add the items to an existing store of the same connector, replacing the "
            "vectors of ids it already holds (one atomic commit)."
        ),
    ] = False,
    target_recall: Annotated[
        float | None,
        typer.Option(
            "--target-recall",
            help="Tune efSearch (hnsw) or nprobe (ivfpq) to this recall@10 in (0, 1] against "
            "exact search on a sample of the store; recorded in the store for later searches.",
        ),
    ] = None,
    uri: Annotated[
        str | None,
        typer.Option(help="milvus: a Milvus server (http://HOST:19530) instead of Milvus Lite."),
    ] = None,
) -> None:
    """Embed a manifest once (frozen encoder + one connector pass) into a vector store.

    Under torchrun every process embeds a slice and rank 0 writes the one store:
    torchrun --nproc_per_node N -m mmcompose index ..."""
    from mmcompose.retrieval.service import index_manifest

    r = index_manifest(
        model, data, store, gallery=gallery, split=split, backend=backend, index=kind,
        force=force, update=update, target_recall=target_recall, uri=uri,
    )  # fmt: skip
    if r.main:
        out.print(r.summary(store), markup=False, highlight=False)


@app.command()
def delete(
    store: Annotated[Path, typer.Option(help="A store made by mmcompose index.")],
    ids: Annotated[list[str] | None, typer.Argument(help="Ids of the items to delete.")] = None,
    ids_file: Annotated[
        Path | None, typer.Option("--ids-file", help="A file of ids, one per line.")
    ] = None,
    compact: Annotated[
        bool, typer.Option(help="Drop the tombstones now (FAISS rebuilds its index).")
    ] = False,
) -> None:
    """Delete items from a store by id: all of them, or none if one is unknown."""
    from mmcompose.retrieval.service import delete_ids, read_ids_file

    every = list(ids or []) + (read_ids_file(ids_file) if ids_file else [])
    n = delete_ids(store, every, compact=compact)
    out.print(f"deleted {n} vectors from {store}" + (" (compacted)" if compact else ""))


@app.command()
def search(
    store: Annotated[Path, typer.Option(help="A store made by mmcompose index.")],
    model: Annotated[
        Path | None,
        typer.Option(help="The connector to embed with (default: the store's; no other)."),
    ] = None,
    text: Annotated[str | None, typer.Option(help="A text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="An image query.")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio query.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search a store with one query: frozen encoder, one connector pass, one index search."""
    from mmcompose.retrieval.service import one_query
    from mmcompose.retrieval.service import search as run_search

    hits = run_search(store, *one_query(text=text, image=image, audio=audio), k, model_dir=model)
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
    continuation: Annotated[
        str,
        typer.Option(
            help="loglikelihood: what is scored after the prompt: lm_eval (the option, as "
            "lm-evaluation-harness scores it) or end_of_turn (option + end of turn, so a "
            "prefix like 'cow' does not beat 'cowboy')."
        ),
    ] = "lm_eval",
) -> None:
    """Evaluate a model; results follow lm-evaluation-harness's JSON layout.

    Under torchrun each process scores a strided shard of the items and rank 0 writes the
    one results file: torchrun --nproc_per_node N -m mmcompose eval ..."""
    from mmcompose.bench.evaluate import run_eval

    r = run_eval(
        model_dir,
        task,
        data,
        answers=answers,
        split=split,
        modalities=modalities,
        mode=mode,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        out_dir=out_dir,
        log_samples=log_samples,
        limit=limit,
        on_corrupt=on_corrupt,
        continuation=continuation,
    )
    if not r.main:  # another rank of a torchrun job: rank 0 reports
        return
    t = Table(*r.columns, title=str(model_dir))
    t.add_row(*r.row())
    out.print(t)
    if r.results_path is not None:
        out.print(f"results: {r.results_path}")


@app.command()
def check(
    model_dir: ModelDir,
    against: Annotated[
        Path, typer.Option(help="The source folder (llava-hf, HF LLM or mmcompose).")
    ],
    prompt: Annotated[str | None, typer.Option(help="Prompt (<image> for the image).")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file for both models.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens compared.")] = 8,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = True,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Check that a model computes what its source computes when run by its own library
    (max logit difference, greedy tokens); exit 1 if they differ beyond float rounding."""
    from mmcompose.compose.check import check_against

    r = check_against(model_dir, against, prompt, image, max_new_tokens=max_new_tokens,
                      chat=chat, dtype=dtype, device=device)  # fmt: skip
    for line in r.lines():
        out.print(line, markup=False, highlight=False)
    if not r.faithful:
        raise typer.Exit(1)


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
