"""The ``mmcompose eval`` command: classification of a manifest split or MCUB questions,
data-parallel under torchrun, results in lm-evaluation-harness's layout.

Every input is checked before any work, cheapest first (options, output folder, data file,
model folder, media files), so a mistake costs no model load and shows no progress bar.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcompose.errors import ConfigError

TASKS = ("classify", "mcub")
MODES = ("generate", "loglikelihood")


@dataclass
class EvalReport:
    """One task's scores; ``main`` is False on the other ranks of a torchrun job (they print
    nothing and write nothing)."""

    task: str = ""
    n: int = 0
    extra: dict[str, str] = field(default_factory=dict)  # more columns: labels, modalities
    block: dict[str, Any] = field(default_factory=dict)  # metric -> value, with *_stderr
    metrics: list[str] = field(default_factory=list)
    results_path: Path | None = None
    main: bool = True

    @property
    def columns(self) -> list[str]:
        return ["task", "n", *self.extra, *self.metrics]

    def row(self) -> list[str]:
        """The table row: each metric as mean ± standard error."""
        cells = [
            f"{self.block[k]:.3f} ± {self.block[k.replace(',', '_stderr,')]:.3f}"
            for k in self.metrics
        ]
        return [self.task, str(self.n), *self.extra.values(), *cells]


def parse_modes(mode: str) -> tuple[str, ...]:
    """``both`` -> (generate, loglikelihood); otherwise the one named mode."""
    modes = MODES if mode == "both" else (mode,)
    if any(m not in MODES for m in modes):
        raise ConfigError(f"unknown mode {mode!r}", hint="use generate, loglikelihood or both")
    return modes


def run_eval(
    model_dir: Path,
    task: str,
    data: Path | None,
    *,
    answers: Path | None = None,
    split: str = "test",
    modalities: str | None = None,
    mode: str = "both",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    out_dir: Path | None = None,
    log_samples: bool = False,
    limit: int | None = None,
    on_corrupt: str = "fail",
    continuation: str = "lm_eval",
) -> EvalReport:
    """Evaluate ``model_dir`` on ``task`` and (rank 0) write the results file to ``out_dir``.

    ``continuation``: what log-likelihood scoring scores after the prompt, lm-evaluation-
    harness's convention (``lm_eval``) or option + end of turn (``end_of_turn``), see
    :mod:`mmcompose.bench.multiple_choice`. Under torchrun each process scores a strided shard
    of the items."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", hint="tasks: classify, mcub")
    from mmcompose.bench.multiple_choice import check_continuation

    continuation = check_continuation(continuation)
    started = time.time()
    if data is None:
        what = "MANIFEST" if task == "classify" else "QUESTIONS.json"
        raise ConfigError(
            f"--data {what} is required for --task {task}",
            hint="classify reads a JSONL manifest, mcub an MCUB questions file",
        )
    modes = parse_modes(mode)
    if out_dir is not None:
        from mmcompose.bench.results import check_results_dir

        check_results_dir(out_dir)  # before the work, not after it
    if task == "mcub":  # the files' format, before the scoring code (torch) is imported
        from mmcompose.train.data import load_conversations

        for f in (data, answers):
            if f is not None:
                load_conversations(f)
    else:
        inputs = _classify_inputs(data, split, limit)
    from mmcompose.model.config import MMConfig

    MMConfig.from_dir(model_dir)  # a missing or damaged folder, also before torch
    if task == "mcub":
        inputs = _mcub_inputs(data, answers, modalities, limit)
    from mmcompose.model import MMComposeForCausalLM, MMProcessor

    processor = MMProcessor.from_pretrained(model_dir)  # tokenizer/config errors: no load yet
    model = MMComposeForCausalLM.from_pretrained(model_dir)
    model.check_finite(model_dir)
    model.fold_for_inference()
    from mmcompose.bench.distributed import data_parallel

    opts = _Options(modes, max_new_tokens, batch_size, on_corrupt, split, answers, continuation)
    with data_parallel() as dp:
        score = _score_classify if task == "classify" else _score_mcub
        scored = score(model, processor, inputs, dp, opts)
    if not dp.main:
        return EvalReport(main=False)
    from mmcompose.bench.results import model_facts, task_block, write_results

    name, n = scored.name, scored.n
    report = EvalReport(name, n, scored.extra, task_block(scored.correct, name), [*scored.correct])
    if out_dir is not None:
        report.results_path = write_results(
            out_dir,
            {name: report.block},
            {name: {"task": name, "dataset_path": str(data), "num_fewshot": 0, **scored.config}},
            {name: n},
            {
                "model": "mmcompose",
                "model_args": f"pretrained={model_dir}",
                "model_num_parameters": sum(model.parameter_counts().values()),
                "model_dtype": str(model.language_model.dtype),
                "batch_size": batch_size,
                "device": str(model.device),
                "limit": limit,
                "gen_kwargs": {"max_new_tokens": max_new_tokens, "do_sample": False},
                "world_size": dp.world,
            },
            {name: scored.samples} if log_samples else None,
            facts=model_facts(
                str(model_dir),
                processor.tokenizer,
                max_length=getattr(model.language_model.config, "max_position_embeddings", None),
                chat_template=getattr(processor.tokenizer, "chat_template", None),
                system_instruction=processor.system_prompt,
            ),
            start_time=started,
        )
        _refresh_card_if_inside(Path(model_dir), Path(out_dir))
    return report


def _refresh_card_if_inside(model_dir: Path, out_dir: Path) -> None:
    """Results written into the model's own ``eval/`` folder go onto its model card."""
    from mmcompose.model.card import EVAL_DIR, refresh_card

    if out_dir.resolve().is_relative_to((model_dir / EVAL_DIR).resolve()):
        refresh_card(model_dir)


@dataclass(frozen=True)
class _Options:
    modes: tuple[str, ...]
    max_new_tokens: int
    batch_size: int
    on_corrupt: str
    split: str
    answers: Path | None
    continuation: str


@dataclass
class _Scored:
    """One task's merged per-item results and its lm-eval task config."""

    name: str
    n: int
    correct: dict[str, list[float]]
    samples: list[dict[str, Any]]
    extra: dict[str, str]
    config: dict[str, Any]


def _classify_inputs(data: Path, split: str, limit: int | None) -> tuple[list, list[str]]:
    from mmcompose.manifest import read_manifest

    rows = read_manifest(data, split)[:limit]
    # The label set is the whole dataset's (closed-set), whatever the split or --limit.
    labels = sorted({r["label"] for r in read_manifest(data, None)})
    return rows, labels


def _mcub_inputs(
    data: Path, answers: Path | None, modalities: str | None, limit: int | None
) -> list:
    from mmcompose.bench import mcub

    items = mcub.load_mcub(data, answers)
    if modalities:
        keep = [m.strip() for m in modalities.split(",") if m.strip()]
        items = mcub.restrict_modalities(items, keep)
    items = items[:limit]
    if not any(it.answer for it in items):
        raise ConfigError(
            f"{data} holds no gold answers", hint="pass the answers file: --answers FILE"
        )
    return items


def _score_classify(model, processor, inputs, dp, opts: _Options) -> _Scored:
    from mmcompose.bench.classify import ClassifyResult, classify, readable_rows

    rows, labels = inputs
    rows, skipped = readable_rows(processor, rows, opts.on_corrupt, warn=dp.main)
    mine = dp.take(rows)  # labels from all rows, so every rank scores the same set
    parts = dp.run(
        lambda: (
            classify(
                model,
                processor,
                mine,
                labels=labels,
                modes=opts.modes,
                max_new_tokens=opts.max_new_tokens,
                progress=dp.main,
                continuation=opts.continuation,
            )
            if mine
            else None
        )
    )
    r = ClassifyResult.merge([p for p in parts if p is not None])
    config = {
        "test_split": opts.split,
        "labels": r.labels,
        "output_type": list(opts.modes),
        "skipped_unreadable": sorted(skipped),
        "continuation": opts.continuation,
    }
    extra = {"labels": str(len(r.labels))}
    return _Scored(f"classify_{r.modality}", r.n, r.correct, r.samples, extra, config)


def _score_mcub(model, processor, items, dp, opts: _Options) -> _Scored:
    from mmcompose.bench import mcub

    mcub.check_inputs(items, model.modalities)  # all ranks, all items: fail together
    kwargs = {
        "max_new_tokens": opts.max_new_tokens,
        "batch_size": opts.batch_size,
        "continuation": opts.continuation,
    }
    parts = dp.run(
        lambda: mcub.evaluate_mcub(
            model, processor, dp.take(items), opts.modes, **kwargs, progress=dp.main
        )
    )
    res = mcub.MCUBResult.merge(parts)
    used = mcub.item_modalities(items)
    output_type = {"generate": "generate_until", "loglikelihood": "multiple_choice"}
    config = {
        "answers_path": str(opts.answers) if opts.answers else None,
        "modalities": used,
        "output_type": [output_type[m] for m in opts.modes],
        "generation_kwargs": {"max_new_tokens": opts.max_new_tokens, "do_sample": False},
        "metric_list": list(res.correct),
        "continuation": opts.continuation,
    }
    extra = {"modalities": ",".join(used)}
    return _Scored(f"mcub_{'_'.join(used)}", res.n, res.correct, res.samples, extra, config)


__all__ = ["EvalReport", "parse_modes", "run_eval"]
