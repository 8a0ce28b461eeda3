"""Named-object classification of a single-modality MLLM on a manifest split.

Two scorings: generation (greedy answer, normalised, compared with the label) and
log-likelihood over the label set, scored as lm-evaluation-harness scores multiple choice
(``acc`` and ``acc_norm``; the conventions in :mod:`mmcompose.bench.multiple_choice`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmcompose import manifest
from mmcompose.bench.multiple_choice import (
    DEFAULT_CONTINUATION,
    METRICS,
    Continuation,
    check_continuation,
    choose,
    option_tokens,
)
from mmcompose.bench.multiple_choice import (
    answer_continuations as answer_continuations,  # re-exported (benchmarks import it here)
)
from mmcompose.errors import MMComposeError
from mmcompose.modalities import canonical_modality
from mmcompose.model.media import OnCorrupt, warn_skipped
from mmcompose.model.modeling import MMComposeForCausalLM, ScoreRequest
from mmcompose.model.processor import MMProcessor
from mmcompose.train.data import QUESTIONS

_ARTICLES = re.compile(r"^(a|an|the)\s+")


def normalize(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = " ".join(text.split())
    return _ARTICLES.sub("", text)


def generation_correct(prediction: str, label: str) -> bool:
    """The answer is the label, possibly followed by more words ("cow", "a cow.", "cow, ...")."""
    p, lab = normalize(prediction), normalize(label)
    return p == lab or p.startswith(lab + " ")


def read_manifest(path: str | Path, split: str | None) -> list[dict[str, Any]]:
    """The labelled rows (id, path, modality, label) of a manifest split, checked on reading."""
    return manifest.read_manifest(path, split)


def readable_rows(
    processor: MMProcessor,
    rows: Sequence[dict[str, Any]],
    on_corrupt: OnCorrupt = "fail",
    warn: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The rows whose file loads, checked before any scoring (the same on every rank): an
    unreadable file fails (``on_corrupt="fail"``) or its row is dropped and named in one
    warning (``"skip"``), so no score is silently computed on a substitute."""
    if on_corrupt not in ("fail", "skip"):
        raise MMComposeError(f"unknown on_corrupt {on_corrupt!r}", hint="use fail or skip")
    modality = canonical_modality(rows[0]["modality"])
    skipped = processor.find_unreadable(modality, [r["path"] for r in rows], on_corrupt)
    kept = [r for r in rows if str(r["path"]) not in skipped]
    if skipped and not kept:
        raise MMComposeError("every item's file is unreadable", hint="fix the files or paths")
    if warn:
        warn_skipped(skipped, f"eval ({len(kept)} of {len(rows)} items kept)")
    return kept, skipped


@dataclass
class ClassifyResult:
    modality: str
    n: int
    labels: list[str]
    correct: dict[str, list[float]] = field(default_factory=dict)  # "acc,generate" -> 0/1 each
    samples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: Sequence[ClassifyResult]) -> ClassifyResult:
        """Put the results of strided shards (``rows[rank::world]``) back in row order."""
        from mmcompose.bench.distributed import interleave

        first = parts[0]
        return cls(
            first.modality,
            sum(p.n for p in parts),
            first.labels,
            {k: interleave([p.correct[k] for p in parts]) for k in first.correct},
            interleave([p.samples for p in parts]),
        )


@torch.no_grad()
def classify(
    model: MMComposeForCausalLM,
    processor: MMProcessor,
    rows: Sequence[dict[str, Any]],
    labels: Sequence[str] | None = None,
    modes: Sequence[str] = ("generate", "loglikelihood"),
    max_new_tokens: int = 8,
    progress: bool = True,
    batch_size: int = 8,
    continuation: Continuation = DEFAULT_CONTINUATION,
) -> ClassifyResult:
    """Score each row by generation and/or log-likelihood over ``labels`` (``acc`` and
    lm-eval's ``acc_norm``; ``continuation`` picks what follows the prompt, see
    :mod:`mmcompose.bench.multiple_choice`)."""
    continuation = check_continuation(continuation)
    bad = [m for m in modes if m not in METRICS]
    if bad or not modes:
        raise MMComposeError(
            f"unknown mode(s) {bad or modes}", hint="use generate or loglikelihood"
        )
    modality = canonical_modality(rows[0]["modality"])
    if modality not in model.modalities:
        raise MMComposeError(
            f"the model has no {modality} tower",
            hint=f"its modalities: {', '.join(model.modalities)}",
        )
    labels = sorted({r["label"] for r in rows}) if labels is None else list(labels)
    question = QUESTIONS[modality][0]
    messages = [{"role": "user", "content": f"<{modality}>\n{question}"}]
    prompt_text = processor.format_prompt(messages[0]["content"])
    ids = torch.tensor([processor.tokenize(prompt_text)])  # the generation prompt
    # Scored after the prompt as lm-eval tokenises it (trailing whitespace moved into each
    # label's continuation); one context for every label.
    ctx, answers = option_tokens(
        processor, prompt_text, messages, labels, continuation, chat=processor.use_chat_template
    )
    eos = [processor.tokenizer.eos_token_id]
    keys = [k for m in modes for k in METRICS[m]]
    res = ClassifyResult(modality, len(rows), labels, {k: [] for k in keys})
    bar = tqdm(total=len(rows), desc=f"classify {modality}", disable=not progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        xs = [processor.preprocess(modality, [r["path"]]) for r in chunk]
        samples: list[dict[str, Any]] = [{"id": r["id"], "label": r["label"]} for r in chunk]
        if "generate" in modes:
            for r, x, sample in zip(chunk, xs, samples, strict=True):
                out = model.generate(
                    ids, modal_inputs={modality: x}, max_new_tokens=max_new_tokens, eos_token_id=eos
                )
                pred = processor.decode(out[0]).strip()
                res.correct["acc,generate"].append(float(generation_correct(pred, r["label"])))
                sample["generation"] = pred
        if "loglikelihood" in modes:
            # All labels of several rows in one packed forward pass (score_requests).
            reqs = [ScoreRequest(torch.tensor(ctx), answers, {modality: x}) for x in xs]
            for r, scores, sample in zip(chunk, model.score_requests(reqs), samples, strict=True):
                best, best_norm = choose(scores.tolist(), labels)
                res.correct["acc,loglikelihood"].append(float(labels[best] == r["label"]))
                res.correct["acc_norm,loglikelihood"].append(float(labels[best_norm] == r["label"]))
                sample["loglikelihood_choice"] = labels[best]
                sample["loglikelihood_norm_choice"] = labels[best_norm]
        res.samples.extend(samples)
        bar.update(len(chunk))
    bar.close()
    return res
