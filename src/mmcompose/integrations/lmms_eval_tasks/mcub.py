"""MCUB as lmms-eval tasks over local files, scored as ``mmcompose eval --task mcub`` scores.

The items are read by mmcompose's own MCUB reader (:func:`mmcompose.bench.mcub.load_mcub`:
the reference format, relative paths resolved against the questions file, answers matched by
id, options A-D from the last question), so both tools see the same items and prompts.

- ``output_type: multiple_choice`` (the default): each option's text after the chat prompt,
  ``target_delimiter: ""`` as lm-evaluation-harness sets it under a chat template; lmms-eval's
  own ``acc`` and ``acc_norm`` (the per-character normalisation), which with the mmcompose
  model's negative log-likelihoods are ``acc,loglikelihood`` and ``acc_norm,loglikelihood``.
- ``output_type: generate_until``: greedy, 8 new tokens, no stop strings; ``acc`` is the
  option letter parsed from the answer (:func:`mmcompose.bench.mcub.parse_letter`, no parse
  is wrong), ``acc,generate``.

Accuracy is over the items with a gold answer, as in ``mmcompose eval``. A task is a YAML file
with ``class: !function mmcompose.integrations.lmms_eval_tasks.mcub.MCUBTask`` and
``dataset_path: QUESTIONS.json``; ``dataset_kwargs`` may give ``answers`` (default: the
``<name>.answers.json`` that ``mmcompose bench build-mcub`` writes next to the questions, else
the reference's shared ``MCUB-answer.json`` there, else the questions' own last turns) and
``modalities`` (keep only these inputs, as ``--modalities``). Environment variables in paths
are expanded: the bundled tasks read ``$MMCOMPOSE_MCUB_DIR``.

Media reach the model as lmms-eval tasks hand them over: images as PIL images (as mmcompose's
loader opens them), audio, video and point clouds as file paths, which the model reads with the
encoder's own loader, as ``mmcompose eval`` does (an audio array would be resampled in full,
where e.g. the Whisper tower's loader decodes only the seconds it uses).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableTask

from mmcompose.bench.mcub import LETTERS, MCUBItem, load_mcub, parse_letter, restrict_modalities
from mmcompose.errors import ConfigError
from mmcompose.integrations.lmms_eval_errors import exit_on_error
from mmcompose.modalities import MODALITIES

_log = logging.getLogger(__name__)
DIR_VARIABLE = "MMCOMPOSE_MCUB_DIR"
SPLIT = "test"
_ACC = {"aggregation": "mean", "higher_is_better": True}


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The item's inputs in prompt order (each modality's k-th input is its k-th placeholder)."""
    from mmcompose.model.media import load_image

    return [load_image(m["path"]) if m["modality"] == "image" else m["path"] for m in doc["media"]]


def process_generation(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``acc``: the option letter parsed from the answer is the gold one."""
    options = dict(zip(LETTERS, doc["options"], strict=True))
    return {"acc": float(parse_letter(results[0], options) == doc["gold"])}


def _defaults(output_type: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "test_split": SPLIT,
        "output_type": output_type,
        "doc_to_visual": doc_to_visual,
        "doc_to_text": "question",
        "doc_to_target": "answer",
        "metadata": {"version": 1.0},
    }
    if output_type == "multiple_choice":
        return {
            **common,
            "doc_to_choice": "options",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", **_ACC}, {"metric": "acc_norm", **_ACC}],
        }
    if output_type == "generate_until":
        return {
            **common,
            "process_results": process_generation,
            "metric_list": [{"metric": "acc", **_ACC}],
            "generation_kwargs": {"max_new_tokens": 8, "do_sample": False, "until": []},
        }
    raise ConfigError(
        f"MCUB tasks score multiple_choice or generate_until, not {output_type!r}",
        hint="set output_type: multiple_choice (option log-likelihoods) or generate_until",
    )


class MCUBTask(ConfigurableTask):
    """An MCUB questions file (+ answers) as an lmms-eval task (see the module doc)."""

    @exit_on_error
    def __init__(
        self,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        download_mode: Any = None,
        config: dict[str, Any] | None = None,
        model_name: str | None = None,
    ) -> None:
        given = {k: v for k, v in (config or {}).items() if k != "class"}
        merged = {**_defaults(given.get("output_type", "multiple_choice")), **given}
        super().__init__(data_dir, cache_dir, download_mode, merged, model_name)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        """The items from local files through mmcompose's reader (no hub, no HF cache)."""
        kwargs = dict(dataset_kwargs or {})
        unknown = sorted(set(kwargs) - {"answers", "modalities"})
        if unknown:
            raise ConfigError(
                f"task {self.config.task}: unknown dataset_kwargs {', '.join(unknown)}",
                hint="MCUB tasks take dataset_kwargs answers (a file) and modalities (a list)",
            )
        questions = _path(self.config.dataset_path, "dataset_path", self.config.task)
        answers = (
            _path(kwargs["answers"], "dataset_kwargs.answers", self.config.task)
            if kwargs.get("answers")
            else default_answers(questions)
        )
        items = load_mcub(questions, answers)
        if kwargs.get("modalities"):
            keep = kwargs["modalities"]
            keep = keep.split(",") if isinstance(keep, str) else list(keep)
            items = restrict_modalities(items, [m.strip() for m in keep if m.strip()])
        gold = [it for it in items if it.answer is not None]
        if not gold:
            raise ConfigError(
                f"{questions} holds no gold answers",
                hint="give its answers file in the task: dataset_kwargs: {answers: FILE}",
            )
        if len(gold) < len(items):
            _log.warning(
                "%s: %d item(s) without a gold answer left out", questions, len(items) - len(gold)
            )
        rows = [doc_from_item(it) for it in gold]
        self.dataset = datasets.DatasetDict({SPLIT: datasets.Dataset.from_list(rows)})
        self.dataset_no_image = self.dataset


def doc_from_item(it: MCUBItem) -> dict[str, Any]:
    """One lmms-eval doc: the prompt (one user turn's text, or a JSON conversation for
    multi-turn items, as lmms-eval's LLaVA-OneVision reads one), options, gold, media."""
    messages = it.messages()
    single = len(messages) == 1 and messages[0]["role"] == "user"
    return {
        "id": it.id,
        "question": messages[0]["content"] if single else json.dumps(messages),
        "options": [it.options[k] for k in LETTERS],
        "answer": LETTERS.index(it.answer),
        "gold": it.answer,
        "media": [
            {"modality": m, "path": p} for m in MODALITIES for p in it.modal_inputs.get(m, [])
        ],
    }


def default_answers(questions: Path) -> Path | None:
    """The answers file next to ``questions``: ``build-mcub``'s ``<name>.answers.json``, else
    the reference's shared ``MCUB-answer.json``; None when neither exists."""
    for name in (f"{questions.stem}.answers.json", "MCUB-answer.json"):
        candidate = questions.with_name(name)
        if candidate.is_file() and candidate != questions:
            return candidate
    return None


def _path(value: Any, what: str, task: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"task {task}: {what} must be a file path, got {value!r}")
    expanded = os.path.expanduser(os.path.expandvars(str(value)))
    if "$" in expanded:
        unset = DIR_VARIABLE if DIR_VARIABLE in expanded else "a variable in it"
        raise ConfigError(
            f"task {task}: {what} {value} names an unset environment variable ({unset})",
            hint=f"export {DIR_VARIABLE}=FOLDER, a folder `mmcompose bench build-mcub` wrote "
            "(MCUB-4.json, MCUB-3-*.json and their .answers.json) or the reference's MCUB folder",
        )
    return Path(expanded)


__all__ = ["MCUBTask", "default_answers", "doc_from_item", "doc_to_visual", "process_generation"]
