"""MCUB (Multimodal Commonality Understanding Benchmark): reader and scoring.

An item gives inputs of 3-4 modalities and asks which attribute they share, with options A-D.
The reference scores greedy generation by its first character and divides by the number of
predictions; here the option letter is parsed properly, accuracy is over the gold items (no
parse = wrong), and the options can also be scored by log-likelihood exactly as
lm-evaluation-harness scores multiple choice (:mod:`mmcompose.bench.multiple_choice`): each
option's text after the chat prompt, its trailing whitespace moved into the option before
tokenising, ``acc`` = argmax of the summed log-probability, ``acc_norm`` = argmax of that divided
by the option's length in characters. ``continuation="end_of_turn"`` scores option + the chat
template's end of turn instead (so "cow" does not beat "cowboy" as a prefix).

File format (spec section 5): a JSON list of ``{id, conversations, modal_inputs}``; the last
turn is ``{"from": "gpt", "value": null}`` in the questions file and the gold letter in the
answers file. Relative media paths resolve against the JSON file's folder.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmcompose.bench import multiple_choice as mc
from mmcompose.bench.classify import normalize
from mmcompose.errors import MediaError, MMComposeError
from mmcompose.modalities import MODALITIES, canonical_modality
from mmcompose.model.modeling import MMComposeForCausalLM, ScoreRequest
from mmcompose.model.processor import MMProcessor
from mmcompose.train.data import ROLES, DataError, load_conversations

_log = logging.getLogger(__name__)
LETTERS = ("A", "B", "C", "D")
OPTION_RE = re.compile(r"^\s*([A-D])[.):]\s*(.+?)\s*$", re.MULTILINE)
MODES = ("generate", "loglikelihood")
METRICS = mc.METRICS
_PRED = {  # metric key -> the sample's prediction it scores
    "acc,generate": "generate",
    "acc,loglikelihood": "loglikelihood",
    "acc_norm,loglikelihood": "loglikelihood_norm",
}
_GOLD_RE = re.compile(r"^\(?([A-D])\)?(?:[.):]|\s|$)")
# Answer forms, tried in order: "B" / "(b)" alone; "B." "B)" "(B) ..." "**B:** ..." first;
# "the answer is B" / "Answer: (B)" / "option B"; a single standalone capital letter.
_ONLY_LETTER = re.compile(r"^\W*([A-Da-d])\W*$")
_LEADING = re.compile(r"^[\s\"'*_]*\(?([A-D])\s*[.):\]]")
_STATED = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is))?\s*[:\-]?\s*(?:(?i:option)\s+)?"
    r"\(?([A-D])(?![\w'])"
)
_STANDALONE = re.compile(r"(?<![\w'])\(?([A-D])\)?(?![\w'])")
_ARTICLE_A = re.compile(r"A\)?\s+[a-z]")  # "A cow": the article, not option A


@dataclass
class MCUBItem:
    id: str
    conversations: list[dict[str, Any]]  # the prompt turns (the empty/gold last turn removed)
    modal_inputs: dict[str, list[str]]  # canonical modality -> absolute paths, in prompt order
    options: dict[str, str]  # letter -> option text, "A".."D"
    answer: str | None = None  # gold letter

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if self.modal_inputs.get(m)]

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (role, content) for the processor's chat template."""
        return [{"role": ROLES[t["from"]], "content": t["value"]} for t in self.conversations]


def load_mcub(questions: str | Path, answers: str | Path | None = None) -> list[MCUBItem]:
    """Read an MCUB questions file (and its answers file, matched by id).

    Without ``answers`` the gold letters come from the questions file's last turn where it
    holds one, so a validation file in the answers format works alone. The answers file may
    be one shared by several sets (the reference's ``MCUB-answer.json`` holds MCUB-4 and
    every MCUB-3 subset): answers to other sets' ids are ignored and counted in the log;
    a question without an answer is an error, and so is an id answered twice differently."""
    records = load_conversations(questions)
    items = [_item(r, questions) for r in records]
    dup = _duplicates(it.id for it in items)
    if dup:
        raise DataError(f"{questions}: duplicate item id(s) {_few(dup)}", hint="ids must be unique")
    if answers is None:
        return items
    asked = {it.id for it in items}
    gold: dict[str, Any] = {}
    conflicting: list[str] = []
    others: set[str] = set()
    for r in load_conversations(answers):
        iid, turns = str(r["id"]), r["conversations"]
        if iid not in asked:
            others.add(iid)
            continue
        value = (
            turns[-1].get("value") if turns and ROLES[turns[-1]["from"]] == "assistant" else None
        )
        if iid in gold and gold[iid] != value and iid not in conflicting:
            conflicting.append(iid)
        gold[iid] = value
    missing = [it.id for it in items if it.id not in gold]
    if missing or conflicting:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question id(s) have no answer (e.g. {_few(missing)})")
        if conflicting:
            parts.append(f"id(s) answered twice, differently: {_few(conflicting)}")
        raise DataError(
            f"{answers} does not match {questions}: " + "; ".join(parts),
            hint="pass the answers file made for this questions file, or a shared answers "
            "file (MCUB-answer.json) that holds every one of its ids once",
        )
    if others:
        _log.warning(
            "%s: answers to %d id(s) of other sets ignored; %d question(s) answered",
            answers,
            len(others),
            len(items),
        )
    return [replace(it, answer=_gold_letter(gold[it.id], it, answers)) for it in items]


def restrict_modalities(items: Iterable[MCUBItem], modalities: Sequence[str]) -> list[MCUBItem]:
    """Keep only these modalities: other modalities' inputs and placeholders are dropped
    (a line holding only a placeholder, e.g. ``<video>`` or ``video: <video>``, goes whole).
    Gives the MCUB-3 subsets from MCUB-4 and lets a single-modality model answer."""
    keep = {canonical_modality(m) for m in modalities}
    out = []
    for it in items:
        drop = [m for m in it.modal_inputs if m not in keep]
        drop += [m for m in MODALITIES if m not in keep and m not in drop]
        convs = copy.deepcopy(it.conversations)
        for turn in convs:
            if isinstance(turn.get("value"), str):
                for m in drop:
                    line = re.compile(rf"^[ \t]*(?:\w+:[ \t]*)?<{m}>[ \t]*(?:\n|$)", re.MULTILINE)
                    turn["value"] = line.sub("", turn["value"]).replace(f"<{m}>", "")
        modal = {m: list(v) for m, v in it.modal_inputs.items() if m in keep}
        out.append(replace(it, conversations=convs, modal_inputs=modal))
    return out


def check_inputs(items: Sequence[MCUBItem], model_modalities: Sequence[str]) -> None:
    """Fail before any compute if the model lacks a modality the items need or a media file
    is missing (under torchrun every rank checks all items, so all fail alike)."""
    needed = item_modalities(items)
    lacking = [m for m in needed if m not in model_modalities]
    if lacking:
        usable = [m for m in needed if m in model_modalities]
        raise MMComposeError(
            f"the items need {', '.join(needed)} but the model has no "
            f"{', '.join(lacking)} tower; its modalities: {', '.join(model_modalities) or 'none'}",
            hint=(
                f"evaluate on the modalities it has: --modalities {','.join(usable)}"
                if usable
                else "evaluate a model with these towers"
            ),
        )
    missing = [(it.id, p) for it in items for ps in it.modal_inputs.values() for p in ps]
    missing = [(i, p) for i, p in missing if not Path(p).exists()]  # a video may be a folder
    if missing:
        shown = "; ".join(f"{p} (item {i})" for i, p in missing[:3])
        raise MediaError(
            f"{len(missing)} media file(s) not found: {shown}",
            hint="relative paths resolve against the questions file's folder",
        )


def item_modalities(items: Iterable[MCUBItem]) -> list[str]:
    """The modalities any item uses, in canonical order (image, audio, video, point)."""
    used = {m for it in items for m in it.modalities}
    return [m for m in MODALITIES if m in used]


def parse_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option a free-form answer names: an explicit letter ("B", "B.", "(B)", "Answer: B",
    "The answer is B"), else the one option whose text it contains. None if neither."""
    text = text.strip()
    letters = set(options)
    for pattern in (_ONLY_LETTER, _LEADING, _STATED):
        m = pattern.search(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    found = {
        m.group(1)
        for m in _STANDALONE.finditer(text)
        if m.group(1) in letters and not _ARTICLE_A.match(text, m.start(1))
    }
    if len(found) == 1:
        return found.pop()
    said = normalize(text)
    named = {
        k: normalize(v)
        for k, v in options.items()
        if normalize(v) and re.search(rf"(?<!\w){re.escape(normalize(v))}(?!\w)", said)
    }
    # "sea lion" names "lion" too: keep the options no other named option's text contains.
    named = {k: v for k, v in named.items() if not any(v != w and v in w for w in named.values())}
    return next(iter(named)) if len(named) == 1 else None


@dataclass
class MCUBResult:
    n: int  # gold items
    correct: dict[str, list[float]] = field(default_factory=dict)  # metric key -> 0/1 per gold
    samples: list[dict[str, Any]] = field(default_factory=list)  # every item, in input order

    def accuracy(self, key: str = "acc,loglikelihood") -> float:
        values = self.correct[key]
        return sum(values) / len(values) if values else math.nan

    @classmethod
    def from_samples(cls, samples: list[dict[str, Any]], keys: Sequence[str]) -> MCUBResult:
        gold = [s for s in samples if s["gold"] is not None]
        return cls(len(gold), {k: [s["correct"][k] for s in gold] for k in keys}, samples)

    @classmethod
    def merge(cls, parts: Sequence[MCUBResult]) -> MCUBResult:
        """Put the results of strided shards (``items[rank::world]``) back in item order."""
        from mmcompose.bench.distributed import interleave

        return cls.from_samples(interleave([p.samples for p in parts]), list(parts[0].correct))


@torch.no_grad()
def evaluate_mcub(
    model: MMComposeForCausalLM,
    processor: MMProcessor,
    items: Sequence[MCUBItem],
    modes: Sequence[str] = MODES,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    progress: bool = True,
    continuation: mc.Continuation = mc.DEFAULT_CONTINUATION,
) -> MCUBResult:
    """Score items by greedy generation and/or option log-likelihood (``continuation``: what
    is scored after the prompt, :mod:`mmcompose.bench.multiple_choice`).

    Each batch of prompts is preprocessed once; generation runs on the left-padded batch and
    log-likelihood for the whole batch in one packed forward pass (``score_requests``)."""
    continuation = mc.check_continuation(continuation)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise MMComposeError(f"unknown mode(s) {bad or modes}", hint=f"use {' or '.join(MODES)}")
    check_inputs(items, model.modalities)
    keys = [k for m in MODES if m in modes for k in METRICS[m]]
    tok = processor.tokenizer
    eos = [i for i in {tok.eos_token_id, *model._default_eos()} if i is not None]
    samples: list[dict[str, Any]] = []
    bar = tqdm(total=len(items), desc="mcub", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        texts = [processor.render_chat(it.messages(), add_generation_prompt=True) for it in chunk]
        inputs = {m: [p for it in chunk for p in it.modal_inputs.get(m, [])] for m in MODALITIES}
        batch = processor(texts, {m: v for m, v in inputs.items() if v}, chat=False)
        generations: list[str | None] = [None] * len(chunk)
        if "generate" in modes:
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0]
            )
            generations = [processor.decode(_until(row.tolist(), eos)).strip() for row in out]
        offset = dict.fromkeys(MODALITIES, 0)
        chunk_samples: list[dict[str, Any]] = []
        requests: list[tuple[ScoreRequest, list[str]]] = []
        for b, it in enumerate(chunk):
            modal = {}
            for m, paths in it.modal_inputs.items():
                if not paths:
                    continue
                modal[m] = batch["modal_inputs"][m][offset[m] : offset[m] + len(paths)]
                offset[m] += len(paths)
            s: dict[str, Any] = {"id": it.id, "gold": it.answer, "prediction": {}}
            if generations[b] is not None:
                s["generation"] = generations[b]
                s["prediction"]["generate"] = parse_letter(generations[b], it.options)
            if "loglikelihood" in modes:
                requests.append(_option_request(processor, it, texts[b], modal, continuation))
            chunk_samples.append(s)
        if requests:  # every item's options, the whole chunk in one packed forward pass
            scores = model.score_requests([r for r, _ in requests])
            for s, it, sc in zip(chunk_samples, chunk, scores, strict=True):
                _fill_option_scores(s, it.options, sc.tolist())
        for it, s in zip(chunk, chunk_samples, strict=True):
            # No gold: nothing to score. No parsed prediction (None): wrong.
            s["correct"] = (
                {k: float(s["prediction"][_PRED[k]] == it.answer) for k in keys}
                if it.answer is not None
                else {}
            )
        samples.extend(chunk_samples)
        bar.update(len(chunk))
    bar.close()
    return MCUBResult.from_samples(samples, keys)


def _option_request(
    processor: MMProcessor,
    it: MCUBItem,
    prompt: str,
    modal: dict[str, torch.Tensor],
    continuation: mc.Continuation,
) -> tuple[ScoreRequest, list[str]]:
    """Every option of one item after its rendered chat ``prompt``, tokenised as lm-eval
    tokenises a (context, continuation) pair; with the option letters in order."""
    letters = list(it.options)
    answers = [it.options[k] for k in letters]
    ctx, conts = mc.option_tokens(processor, prompt, it.messages(), answers, continuation)
    return ScoreRequest(torch.tensor(ctx), conts, modal), letters


def _fill_option_scores(
    sample: dict[str, Any], options: Mapping[str, str], scores: list[float]
) -> None:
    """Summed log-probability per option; the predictions are lm-eval's arg-maxes: of the
    scores (``acc``) and of the scores divided by the option's characters (``acc_norm``)."""
    letters = list(options)
    best, best_norm = mc.choose(scores, [options[k] for k in letters])
    sample["option_logprobs"] = dict(zip(letters, scores, strict=True))
    sample["option_chars"] = {k: len(v) for k, v in options.items()}
    sample["prediction"]["loglikelihood"] = letters[best]
    sample["prediction"]["loglikelihood_norm"] = letters[best_norm]


def _until(ids: list[int], eos: Sequence[int]) -> list[int]:
    """Generated ids up to (not including) the first end-of-sequence token."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def _item(r: dict[str, Any], path: str | Path) -> MCUBItem:
    """One record -> MCUBItem, checked: prompt turns, 4 options A-D, placeholder counts."""
    iid = str(r["id"])
    turns = r["conversations"]
    if not turns:
        raise DataError(f"{path}: item {iid} has no conversation turns")
    gold = None
    if ROLES[turns[-1]["from"]] == "assistant":
        gold, turns = turns[-1].get("value"), turns[:-1]
    humans = [t for t in turns if ROLES[t["from"]] == "user"]
    if not humans or any(not isinstance(t.get("value"), str) for t in turns):
        raise DataError(f"{path}: item {iid} has no question text before its answer turn")
    options = {m.group(1): m.group(2) for m in OPTION_RE.finditer(humans[-1]["value"])}
    found = [m.group(1) for m in OPTION_RE.finditer(humans[-1]["value"])]
    if found != list(LETTERS):
        raise DataError(
            f"{path}: item {iid} has options {', '.join(found) or 'none'}; MCUB items have 4, "
            "A-D in order",
            hint='put one option per line in the last question: "A. cow"',
        )
    text = "\n".join(t["value"] for t in turns)
    modal = r["modal_inputs"]
    for m in MODALITIES:
        n_ph, n_in = text.count(f"<{m}>"), len(modal.get(m, []))
        if n_ph != n_in:
            raise DataError(
                f"{path}: item {iid} has {n_ph} <{m}> placeholder(s) but {n_in} {m} input(s)",
                hint=f"put one <{m}> in the question for each {m} input",
            )
    item = MCUBItem(iid, copy.deepcopy(turns), modal, options)
    item.answer = _gold_letter(gold, item, path) if gold is not None else None
    return item


def _gold_letter(value: Any, item: MCUBItem, path: str | Path) -> str | None:
    if value is None:
        return None
    m = _GOLD_RE.match(str(value).strip())
    if not m or m.group(1) not in item.options:
        raise DataError(
            f"{path}: item {item.id} has gold answer {value!r}, not one of its option letters",
            hint='the answers file\'s last turn holds the letter, e.g. "B"',
        )
    return m.group(1)


def _duplicates(ids: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dup = []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    return dup


def _few(ids: Sequence[str], k: int = 3) -> str:
    return ", ".join(map(str, ids[:k])) + (", ..." if len(ids) > k else "")
