"""Named-object classification of a single-modality MLLM on a manifest split.

Two scorings: generation (greedy answer, normalised, compared with the label) and
log-likelihood over the label set (each label as the assistant's full answer; argmax), the
way lm-evaluation-harness scores multiple choice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmcompose.errors import MMComposeError
from mmcompose.modalities import canonical_modality
from mmcompose.model.modeling import MMComposeForCausalLM
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
    path = Path(path)
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise MMComposeError(f"manifest {path} not found") from None
    except json.JSONDecodeError as e:
        raise MMComposeError(f"{path} is not JSONL: {e}") from None
    if split:
        rows = [r for r in rows if r.get("split") == split]
    if not rows:
        raise MMComposeError(f"{path} has no items" + (f" in split {split!r}" if split else ""))
    return rows


@dataclass
class ClassifyResult:
    modality: str
    n: int
    labels: list[str]
    correct: dict[str, list[float]] = field(default_factory=dict)  # "acc,generate" -> 0/1 each
    samples: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def classify(
    model: MMComposeForCausalLM,
    processor: MMProcessor,
    rows: Sequence[dict[str, Any]],
    labels: Sequence[str] | None = None,
    modes: Sequence[str] = ("generate", "loglikelihood"),
    max_new_tokens: int = 8,
    progress: bool = True,
) -> ClassifyResult:
    modality = canonical_modality(rows[0]["modality"])
    if modality not in model.modalities:
        raise MMComposeError(
            f"the model has no {modality} tower",
            hint=f"its modalities: {', '.join(model.modalities)}",
        )
    labels = sorted({r["label"] for r in rows}) if labels is None else list(labels)
    question = QUESTIONS[modality][0]
    prompt_text = processor.format_prompt(f"<{modality}>\n{question}")
    prompt_ids = processor.tokenize(prompt_text)
    answers = [
        processor.tokenize(
            processor.render_chat(
                [
                    {"role": "user", "content": f"<{modality}>\n{question}"},
                    {"role": "assistant", "content": lab},
                ],
                add_generation_prompt=False,
            )[len(prompt_text) :],
            add_special_tokens=False,
        )
        for lab in labels
    ]
    eos = [processor.tokenizer.eos_token_id]
    res = ClassifyResult(modality, len(rows), labels, {f"acc,{m}": [] for m in modes})
    for r in tqdm(rows, desc=f"classify {modality}", disable=not progress):
        x = processor.preprocess(modality, [r["path"]])
        ids = torch.tensor([prompt_ids])
        sample: dict[str, Any] = {"id": r["id"], "label": r["label"]}
        if "generate" in modes:
            out = model.generate(
                ids, modal_inputs={modality: x}, max_new_tokens=max_new_tokens, eos_token_id=eos
            )
            pred = processor.decode(out[0]).strip()
            ok = generation_correct(pred, r["label"])
            res.correct["acc,generate"].append(float(ok))
            sample["generation"] = pred
        if "loglikelihood" in modes:
            scores = model.score_continuations(ids, answers, modal_inputs={modality: x})
            pred_ll = labels[int(scores.argmax())]
            res.correct["acc,loglikelihood"].append(float(pred_ll == r["label"]))
            sample["loglikelihood_choice"] = pred_ll
        res.samples.append(sample)
    return res
