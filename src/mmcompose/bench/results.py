"""Results in lm-evaluation-harness's layout, so existing tooling reads them.

``results_<time>.json`` holds every top-level key of lm-eval 0.4.13's results file (its
``lm_eval.result_schema.EvalResults`` and what ``EvaluationTracker`` adds): per-task blocks,
groups, configs, versions, n-shot, higher-is-better, sample counts, the run config, git hash,
date, environment, tokenizer facts, model name, chat template and system instruction with
their SHA-256, and the timing; a key with nothing to say is ``null`` or empty, never absent.
The per-item records go to ``samples_<task>_<time>.jsonl`` beside it (lm-eval's file names).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcompose import __version__
from mmcompose.fs import atomic_file, check_creatable, write_json_atomic


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-eval reports ``*_stderr``."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def task_block(metrics: Mapping[str, Sequence[float]], alias: str) -> dict[str, Any]:
    """{"acc,generate": [0/1 per item]} -> {"acc,generate": m, "acc_stderr,generate": se}."""
    out: dict[str, Any] = {"alias": alias}
    for key, values in metrics.items():
        name, _, filt = key.partition(",")
        m, se = mean_stderr(values)
        out[key] = m
        out[f"{name}_stderr,{filt}"] = se
    return out


def check_results_dir(out_dir: str | Path) -> None:
    """Fail before an evaluation if its results could not be written to ``out_dir``: an
    existing folder gains new timestamped files; a file in the way or no permission fails."""
    check_creatable(Path(out_dir) / "results_<time>.json")


# lm-eval's _EvalConfig keys, filled with what mmcompose knows (None: not applicable).
_CONFIG_DEFAULTS: dict[str, Any] = {
    "model": "mmcompose",
    "model_args": None,
    "model_num_parameters": None,
    "model_dtype": None,
    "model_revision": None,
    "model_sha": None,
    "batch_size": None,
    "batch_sizes": [],
    "device": None,
    "use_cache": None,
    "limit": None,
    "bootstrap_iters": 0,  # stderr of a mean is closed-form (as lm-eval's mean_stderr)
    "gen_kwargs": None,
    "random_seed": None,
    "numpy_seed": None,
    "torch_seed": None,
    "fewshot_seed": None,
}
# lm-eval's GeneralConfigTracker._get_model_name: the first of these model_args keys names it.
_NAME_KEYS = ("peft", "delta", "pretrained", "model", "path", "engine")


def hash_string(text: str) -> str:
    """SHA-256 hex digest, as lm-eval hashes chat templates and system instructions."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sanitize_model_name(name: str) -> str:
    """lm-eval's ``sanitize_model_name``: a model name safe as one path component."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def model_facts(
    model_name: str,
    tokenizer: Any = None,
    *,
    max_length: int | None = None,
    chat_template: str | None = None,
    system_instruction: str | None = None,
    source: str = "mmcompose",
) -> dict[str, Any]:
    """The model, tokenizer and chat facts lm-eval records (``add_tokenizer_info`` and the
    tracker), from a Hugging Face tokenizer; the tokens as ``[token, str(id)]``."""

    def pair(kind: str) -> list[Any]:
        return [
            getattr(tokenizer, f"{kind}_token", None),
            str(getattr(tokenizer, f"{kind}_token_id", None)),
        ]

    tok: dict[str, Any] = {}
    if tokenizer is not None:
        tok = {
            "tokenizer_pad_token": pair("pad"),
            "tokenizer_eos_token": pair("eos"),
            "tokenizer_bos_token": pair("bos"),
            "eot_token_id": getattr(tokenizer, "eos_token_id", None),
        }
    if chat_template is not None and not isinstance(chat_template, str):
        chat_template = json.dumps(chat_template, sort_keys=True)  # named templates
    return {
        **tok,
        "max_length": max_length,
        "model_source": source,
        "model_name": model_name,
        "model_name_sanitized": sanitize_model_name(model_name),
        "system_instruction": system_instruction,
        "system_instruction_sha": hash_string(system_instruction) if system_instruction else None,
        "fewshot_as_multiturn": False,  # zero-shot: no few-shot turns
        "chat_template": chat_template or None,
        "chat_template_sha": hash_string(chat_template) if chat_template else None,
    }


def write_results(
    out_dir: str | Path,
    results: Mapping[str, dict[str, Any]],
    configs: Mapping[str, dict[str, Any]],
    n_samples: Mapping[str, int],
    model_info: Mapping[str, Any],
    samples: Mapping[str, list[dict[str, Any]]] | None = None,
    *,
    facts: Mapping[str, Any] | None = None,
    start_time: float | None = None,
) -> Path:
    """Write ``results_<time>.json`` (and ``samples_<task>_<time>.jsonl``) atomically.

    ``facts``: :func:`model_facts` of the evaluated model; ``start_time``: ``time.time()`` when
    the evaluation began (default: now)."""
    end = time.time()
    start = end if start_time is None else start_time
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H-%M-%S.%f")
    out_dir = Path(out_dir)
    config = {**_CONFIG_DEFAULTS, **model_info}
    given = dict(facts or {})
    name = given.pop("model_name", None) or _model_name(config)
    info = {**model_facts(name), **given}
    doc = {
        "results": {t: _block(t, b, n_samples.get(t)) for t, b in results.items()},
        "groups": {},
        "group_subtasks": {},
        "configs": dict(configs),
        "versions": dict.fromkeys(results, 1.0),
        "n-shot": dict.fromkeys(results, 0),
        "higher_is_better": {t: _higher_is_better(b) for t, b in results.items()},
        "n-samples": {t: {"original": n, "effective": n} for t, n in n_samples.items()},
        "config": config,
        "git_hash": _git_hash(),
        "date": start,
        **_env_info(),
        "tokenizer_pad_token": info.pop("tokenizer_pad_token", [None, "None"]),
        "tokenizer_eos_token": info.pop("tokenizer_eos_token", [None, "None"]),
        "tokenizer_bos_token": info.pop("tokenizer_bos_token", [None, "None"]),
        "eot_token_id": info.pop("eot_token_id", None),
        "max_length": info.pop("max_length", None),
        "task_hashes": {},  # lm-eval hashes its own docs and prompts; ours have none
        **info,
        "start_time": start,
        "end_time": end,
        "total_evaluation_time_seconds": str(end - start),
        "mmcompose_version": __version__,
    }
    path = out_dir / f"results_{stamp}.json"
    for task, rows in (samples or {}).items():
        with atomic_file(out_dir / f"samples_{task}_{stamp}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json_atomic(path, doc)
    return path


def _block(task: str, block: Mapping[str, Any], n: int | None) -> dict[str, Any]:
    """lm-eval's per-task block: name, alias, sample_len, then the metrics; a standard error
    that cannot be computed (one item) is lm-eval's ``"N/A"``, not a NaN that is no JSON."""
    out: dict[str, Any] = {"name": task, "alias": block.get("alias", task)}
    if n is not None:
        out["sample_len"] = n
    for k, v in block.items():
        if "_stderr," in k and isinstance(v, float) and math.isnan(v):
            v = "N/A"
        out.setdefault(k, v)
    return out


def _higher_is_better(block: Mapping[str, Any]) -> dict[str, bool]:
    """Every metric here is an accuracy: higher is better."""
    names = {k.partition(",")[0] for k in block if "," in k}
    return {m: True for m in sorted(names) if not m.endswith("_stderr")}


def _model_name(config: Mapping[str, Any]) -> str:
    args = config.get("model_args")
    if isinstance(args, str):
        for key in _NAME_KEYS:
            if f"{key}=" in args:
                return args.split(f"{key}=", 1)[1].split(",")[0]
    return str(config.get("model") or "mmcompose")


def _git_hash() -> str | None:
    """The short commit of the mmcompose checkout this runs from (None for an installed
    wheel), as lm-eval records its own."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _env_info() -> dict[str, Any]:
    """lm-eval's environment keys. ``pretty_env_info`` is a one-line summary: torch's full
    collect_env report runs pip and nvidia-smi, seconds per results file."""
    import torch
    import transformers

    try:
        from importlib.metadata import version

        lm_eval_version = version("lm_eval")
    except Exception:  # not installed: the layout is lm-eval's, the run mmcompose's
        lm_eval_version = None
    env = (
        f"mmcompose {__version__}; Python {platform.python_version()}; torch {torch.__version__}"
        f"; transformers {transformers.__version__}; {platform.platform()}"
    )
    return {
        "pretty_env_info": env,
        "transformers_version": transformers.__version__,
        "lm_eval_version": lm_eval_version,
        "upper_git_hash": None,
    }
