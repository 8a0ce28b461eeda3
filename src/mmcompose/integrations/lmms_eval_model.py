"""lmms-eval model plugin: ``lmms-eval --model mmcompose --model_args pretrained=FOLDER``.

Registered through the ``lmms_eval.models`` entry-point group (:mod:`mmcompose.integrations`).
A *simple* lmms-eval model (lmms-eval gives multiple-choice tasks only to those): each request
carries the task's context text and its ``doc_to_visual``; the media are read as mmcompose's
modalities (:mod:`~mmcompose.integrations.lmms_eval_media`) and the context is rendered with
the model's own chat template, as ``mmcompose eval`` renders its prompts, so the same item
gives the same token ids through either.

- ``loglikelihood``: the options of one (doc, context) are packed into one row of
  :meth:`~mmcompose.model.modeling.MMComposeForCausalLM.score_requests`; each (context,
  continuation) pair is tokenised as lm-evaluation-harness does (the context's trailing
  whitespace moved into the continuation, :func:`mmcompose.bench.multiple_choice.encode_pair`).
  The first value returned is the summed **negative** log-likelihood: lmms-eval's
  ``multiple_choice`` takes the argmin (its models return a loss), so a log-probability would
  pick the worst option; its argmin of the NLL, plain and divided by the option's characters,
  is lm-eval's ``acc`` and ``acc_norm``. ``is_greedy`` comes from one greedy decode per
  context (the continuation is greedy iff greedy decoding produces it), skipped with
  ``greedy_check=False``.
- ``generate_until``: greedy (or sampled, ``do_sample``/``temperature``) decoding on
  left-padded batches, stopped at the end-of-turn token, cut at the task's ``until`` strings.
- ``generate_until_multi_round``: lmms-eval's round protocol: round 0 is the request's context,
  each later round the task's ``doc_to_text(doc, round_idx=, previous_output=,
  previous_round_info=)``, until it signals the end; one list of answers per doc.

A task giving a modality the model has no tower for fails before any compute, naming the
modalities it has; under lmms-eval's command line every mmcompose error is one message with a
hint and exit status 2 (:mod:`~mmcompose.integrations.lmms_eval_errors`).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmcompose.bench import multiple_choice as mc
from mmcompose.errors import ConfigError, MMComposeError
from mmcompose.integrations.lmms_eval_errors import exit_on_error
from mmcompose.integrations.lmms_eval_media import (
    Audio,
    Medium,
    classify,
    messages_from_context,
    place_inputs,
)
from mmcompose.modalities import MODALITIES
from mmcompose.model.encoders import encoder_params
from mmcompose.model.media import prepare_waveform
from mmcompose.model.modeling import MMComposeForCausalLM, ScoreRequest
from mmcompose.model.processor import MMProcessor

_NEVER = -1  # an end-of-sequence id no token has: greedy checks decode the full length


def filelock_api_alias() -> None:
    """lmms-eval 0.7.3's ``simple_evaluate`` patches ``filelock._api.FileLockMeta``, a module
    filelock 4 no longer has (it moved to ``filelock._core``); every run fails with
    ModuleNotFoundError. Where that module is missing, name the same two classes under it, so
    lmms-eval's patch applies to filelock 4's metaclass instead of pinning filelock 3 for all.
    Runs when lmms-eval imports this plugin, which it does before that patch."""
    import importlib.util
    import types

    if importlib.util.find_spec("filelock") is None or "filelock._api" in sys.modules:
        return
    try:
        importlib.import_module("filelock._api")
        return
    except ImportError:
        pass
    from filelock._core._lock import BaseFileLock
    from filelock._core._singleton import FileLockMeta

    api = types.ModuleType("filelock._api")
    api.BaseFileLock, api.FileLockMeta = BaseFileLock, FileLockMeta  # type: ignore[attr-defined]
    sys.modules["filelock._api"] = api


filelock_api_alias()


class PluginArgs(BaseModel):
    """``--model_args`` (and lmms-eval's ``--batch_size``/``--device``)."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    batch_size: int = Field(default=1, ge=1)  # lmms-eval's --batch_size: items per forward
    max_batch_size: int | None = None  # lmms-eval passes it for --batch_size auto; unused
    greedy_check: bool = True  # compute is_greedy (one greedy decode per context)
    max_tokens: int = Field(default=2048, gt=0)  # padded positions per scoring forward


def parse_args(kwargs: dict[str, Any]) -> PluginArgs:
    try:
        return PluginArgs(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'model_args'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(
            f"invalid mmcompose model arguments: {problems}",
            hint="--model_args pretrained=FOLDER[,dtype=float32|bfloat16|float16]"
            "[,greedy_check=False][,max_tokens=N] and --batch_size N (a number)",
        ) from None


class MMComposeLMMS(lmms):
    """An mmcompose folder (composed or trained) as an lmms-eval simple model."""

    is_simple = True

    @exit_on_error
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        args = parse_args(kwargs)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "the mmcompose lmms-eval model runs in one process",
                hint="start lmms-eval without accelerate/torchrun; for data-parallel MCUB use "
                "`torchrun ... mmcompose eval --task mcub`",
            )
        from mmcompose.devices import resolve_device
        from mmcompose.model.config import MMConfig

        MMConfig.from_dir(args.pretrained)  # a missing or damaged folder: named, no load
        device = resolve_device(args.device or "cpu")
        self.args = args
        self.processor = MMProcessor.from_pretrained(args.pretrained)
        self._model = MMComposeForCausalLM.from_pretrained(
            args.pretrained, device=device, dtype=args.dtype
        )
        self._model.check_finite(args.pretrained)
        self._model.fold_for_inference()
        self._model.eval()
        self.batch_size_per_gpu = args.batch_size
        tok = self.processor.tokenizer
        self.eos = [i for i in {tok.eos_token_id, *self._model._default_eos()} if i is not None]

    # ------------------------------------------------------------------ lmms-eval's API
    @property
    def model(self) -> MMComposeForCausalLM:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def modalities(self) -> list[str]:
        return self._model.modalities

    @exit_on_error
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(summed negative log-likelihood, is_greedy) per request (see the module doc),
        each wrapped in a GenerationResult: lmms-eval 0.7.3 passes any other response type
        through ``str()`` (``unwrap_generation_output``), which its multiple_choice scoring
        then cannot read; the wrapper's ``text`` reaches the task as the pair itself."""
        self._check_tasks(requests)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(requests):  # the options of one prompt: one packed row
            key = (*r.args[3:6], r.args[0]) if len(r.args) >= 6 else (None, None, i, r.args[0])
            groups.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(requests)
        keys = list(groups)
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start : start + self.batch_size]
            prepared = [self._score_request(requests, groups[k]) for k in chunk]
            scores = self.model.score_requests(
                [p for p, _ in prepared], max_tokens=self.args.max_tokens
            )
            greedy = (
                self._greedy(prepared)
                if self.args.greedy_check
                else [[False] * len(p.continuations) for p, _ in prepared]
            )
            for key, s, g in zip(chunk, scores, greedy, strict=True):
                for i, nll, is_greedy in zip(groups[key], (-s).tolist(), g, strict=True):
                    out[i] = GenerationResult(text=(float(nll), bool(is_greedy)))  # type: ignore[arg-type]
        return out

    @exit_on_error
    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        self._check_tasks(requests)
        out: list[str] = []
        for batch in _batches_by_kwargs(requests, self.batch_size, kwargs_at=1):
            prompts = []
            for r in batch:
                context, _, doc_to_visual, doc_id, task, split = r.args
                prompts.append((context, self._visuals(doc_to_visual, task, split, doc_id)))
            out.extend(self._generate(prompts, batch[0].args[1]))
        return out

    @exit_on_error
    @torch.no_grad()
    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        self._check_tasks(requests)
        results: list[list[str]] = []
        for r in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            visuals: Any = self._visuals(doc_to_visual, task, split, doc_id)
            answers: list[str] = []
            info = None
            for round_idx in itertools.count():
                if round_idx:
                    visuals, context, terminal, answers, info = doc_to_text(
                        doc, previous_output=answers, round_idx=round_idx, previous_round_info=info
                    )
                    answers = list(answers or [])
                    if terminal:
                        break
                    visuals = self._media(visuals, task)
                answers.append(self._generate([(context, visuals)], gen_kwargs)[0])
            results.append(answers)
        return results

    # ------------------------------------------------------------------ pieces
    def _check_tasks(self, requests: Sequence[Instance]) -> None:
        """Before any compute: the first doc of each task must give only media of
        modalities the model has (a task's docs share their modalities)."""
        seen = set()
        for r in requests:
            if len(r.args) < 6:  # lm-eval's unconditional (mutual-information) requests
                continue
            task, split = r.args[-2], r.args[-1]
            if (task, split) not in seen:
                seen.add((task, split))
                self._visuals(r.args[2], task, split, r.args[-3])

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Medium]:
        raw = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        return self._media(raw, task)

    def _media(self, raw: Any, task: str) -> list[Medium]:
        """The task's media, each with its modality; a modality without a tower is refused."""
        media = [classify(v) for v in _as_list(raw)]
        lacking = sorted({m.modality for m in media} - set(self.modalities), key=MODALITIES.index)
        if lacking:
            have = ", ".join(self.modalities) or "none (text only)"
            raise ConfigError(
                f"task {task!r} gives {', '.join(lacking)} input(s), but this model has no "
                f"{' or '.join(lacking)} tower (its modalities: {have})",
                hint=f"evaluate it on tasks of {have} inputs (for MCUB: an MCUB-3 set of "
                f"them, or dataset_kwargs: {{modalities: [{', '.join(self.modalities)}]}} in "
                f"the task's YAML), or compose a model with a {lacking[0]} tower",
            )
        return media

    def _prompt(self, context: str, media: Sequence[Medium]) -> tuple[str, dict[str, list[Any]]]:
        """The rendered chat prompt (placeholders in place) and each modality's inputs, in
        prompt order, as the processor takes them."""
        messages = place_inputs(messages_from_context(context), media)
        text = self.processor.render_chat(messages, add_generation_prompt=True)
        inputs: dict[str, list[Any]] = {}
        for m in media:
            inputs.setdefault(m.modality, []).append(self._item(m))
        return text, inputs

    def _item(self, m: Medium) -> Any:
        """Audio arrays go to the encoder's sample rate (in float64, as the file loader
        resamples); everything else goes to the processor as it is (paths are read there,
        by the modality's own loader, as ``mmcompose eval`` reads them)."""
        if isinstance(m.item, Audio):
            rate = getattr(encoder_params(self.processor.encoders["audio"]), "sample_rate", 16000)
            wave = m.item.array
            wave = wave.astype(np.float64) if wave.dtype.kind == "f" else wave
            return prepare_waveform(wave, m.item.sampling_rate, rate)
        return m.item

    def _score_request(
        self, requests: Sequence[Instance], idx: Sequence[int]
    ) -> tuple[ScoreRequest, list[int]]:
        """One context and all its continuations, tokenised as lm-eval tokenises each pair."""
        first = requests[idx[0]].args
        if len(first) < 6:  # ("", continuation): scored after the end-of-text token alone
            ctx = [
                self._pad_id()
                if self.processor.tokenizer.eos_token_id is None
                else self.processor.tokenizer.eos_token_id
            ]
            conts = [
                self.processor.tokenize(requests[i].args[1], add_special_tokens=False) for i in idx
            ]
            return ScoreRequest(torch.tensor(ctx), conts, None), ctx
        context, _, doc_to_visual, doc_id, task, split = first
        text, inputs = self._prompt(context, self._visuals(doc_to_visual, task, split, doc_id))
        modal = {m: self.processor.preprocess(m, v).to(self.device) for m, v in inputs.items()}
        conts = []
        ctx: list[int] = []
        for i in idx:
            continuation = requests[i].args[1]
            if not isinstance(continuation, str):  # lmms-eval's loglikelihood task type
                continuation = continuation(self.task_dict[task][split][doc_id])
            ctx, cont = mc.encode_pair(self.processor.tokenize, text, continuation)
            if not cont:
                raise MMComposeError(
                    f"task {task!r} doc {doc_id}: continuation {continuation!r} tokenises to "
                    "nothing after the prompt",
                    hint="multiple-choice options must be non-empty text",
                )
            conts.append(cont)
        return ScoreRequest(torch.tensor(ctx), conts, modal), ctx

    def _greedy(self, prepared: Sequence[tuple[ScoreRequest, list[int]]]) -> list[list[bool]]:
        """Per continuation: whether greedy decoding from its context produces it (then every
        continuation token is the argmax), from one batched decode of the longest length."""
        n = max(len(c) for p, _ in prepared for c in p.continuations)
        ids, mask = _left_pad([ctx for _, ctx in prepared], self._pad_id())
        modal: dict[str, list[torch.Tensor]] = {}
        for p, _ in prepared:
            for m, t in (p.modal_inputs or {}).items():
                modal.setdefault(m, []).append(t)
        out = self.model.generate(
            ids.to(self.device),
            mask.to(self.device),
            {m: torch.cat(ts) for m, ts in modal.items()},
            max_new_tokens=n,
            eos_token_id=[_NEVER],
            pad_token_id=self._pad_id(),
        ).tolist()
        return [
            [row[: len(c)] == list(c) for c in p.continuations]
            for (p, _), row in zip(prepared, out, strict=True)
        ]

    def _generate(
        self, prompts: Sequence[tuple[str, Sequence[Medium]]], gen_kwargs: Any
    ) -> list[str]:
        """One batch, as ``mmcompose eval`` generates: rendered prompts through the processor
        (left padding), decoded up to the end of turn, then cut at ``until``."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(kw.pop("num_beams", 1) or 1) != 1:
            raise ConfigError(
                "beam search is not supported by the mmcompose model",
                hint="set num_beams: 1 in the task's generation_kwargs",
            )
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kw.pop("do_sample", False)) and temperature > 0
        texts: list[str] = []
        inputs: dict[str, list[Any]] = {}
        for context, media in prompts:
            text, items = self._prompt(context, media)
            texts.append(text)
            for m, v in items.items():
                inputs.setdefault(m, []).extend(v)
        batch = self.processor(texts, inputs, chat=False)
        modal = {m: t.to(self.device) for m, t in batch["modal_inputs"].items()}
        out = self.model.generate(
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            modal,
            max_new_tokens=int(kw.pop("max_new_tokens", 128)),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=float(kw.pop("top_p", None) or 1.0),
            top_k=int(kw.pop("top_k", None) or 0),
            eos_token_id=self.eos,
            pad_token_id=self.eos[0] if self.eos else self._pad_id(),
        )
        answers = []
        for row in out.tolist():
            text = self.processor.decode(_until(row, self.eos))
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text)
        return answers

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[b, width - len(s) :] = 1
    return ids, mask


def _until(ids: list[int], eos: Sequence[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def _batches_by_kwargs(
    requests: Sequence[Instance], size: int, kwargs_at: int
) -> Iterator[list[Instance]]:
    """Consecutive requests in batches of ``size``, a new batch wherever the generation
    arguments change (one decode runs with one set)."""
    batch: list[Instance] = []
    for r in requests:
        if batch and (len(batch) == size or r.args[kwargs_at] != batch[0].args[kwargs_at]):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


__all__ = ["MMComposeLMMS", "PluginArgs", "parse_args"]
