"""Training data in the reference (LLaVA-style) conversation format, tokenised for the model.

A record: ``{"id", "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
{"from": "gpt", "value": "A dog."}], "modal_inputs": {"vision": ["path.jpg"]}}``. Only the
assistant turns carry labels; everything else (system prompt, user turns, template tokens,
modality blocks) is -100. Conversation prefixes are rendered with the same chat template as at
inference, so training and generation see identical prompt tokens.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcompose.errors import ConfigError, MMComposeError
from mmcompose.io import load_json
from mmcompose.modalities import canonical_modality

if TYPE_CHECKING:  # reading and checking data files needs neither torch nor transformers
    from mmcompose.model.processor import MMProcessor

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(MMComposeError):
    """A training or evaluation data file is malformed."""


_FORMAT = (
    'a JSON list of {"id", "conversations": [{"from": "human", "value": "..."}, '
    '{"from": "gpt", "value": "..."}], "modal_inputs": {...}}'
)


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    inputs: dict[str, list[str]] = field(default_factory=dict)  # modality -> file paths


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a conversation JSON list (relative media paths resolve against it)."""
    path = Path(path)
    records = load_json(path, "data file", expect=list, error=DataError, hint=_FORMAT)
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
            raise DataError(f"{path}: record {i} has no 'conversations' list", hint=_FORMAT)
        for t, turn in enumerate(r["conversations"]):
            if not isinstance(turn, dict):
                raise DataError(
                    f"{path}: record {r.get('id', i)} turn {t} is not an object ({turn!r})",
                    hint=_FORMAT,
                )
            who = turn.get("from")
            if not isinstance(who, str) or who not in ROLES:
                raise DataError(
                    f"{path}: record {r.get('id', i)} has a turn from {who!r}",
                    hint=f"use one of {', '.join(ROLES)}",
                )
        raw = r.get("modal_inputs") or {}
        if not isinstance(raw, dict) or not all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v))
            for v in raw.values()
        ):
            raise DataError(
                f"{path}: record {r.get('id', i)} has malformed 'modal_inputs'",
                hint='map each modality to a path or a list of paths: {"vision": ["a.jpg"]}',
            )
        modal = {}
        for k, v in raw.items():
            items = [v] if isinstance(v, str) else list(v)
            modal[canonical_modality(k)] = [
                str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in items
            ]
        r["modal_inputs"] = modal
        r.setdefault("id", str(i))
    return records


def encode_example(
    processor: MMProcessor, record: Mapping[str, Any], max_length: int | None = None
) -> Example:
    """Token ids (with placeholder sentinels) and labels for one conversation."""
    from mmcompose.model.splice import IGNORE_INDEX

    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = processor.render_chat(messages[:i], add_generation_prompt=True)
        full = processor.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                f"record {record['id']}: the chat template does not render turns as prefixes"
            )
        ctx = processor.tokenize(prompt[len(done) :], add_special_tokens=not done)
        ans = processor.tokenize(full[len(prompt) :], add_special_tokens=False)
        ids += ctx + ans
        labels += [IGNORE_INDEX] * len(ctx) + ans
        done = full
    if not labels or all(x == IGNORE_INDEX for x in labels):
        raise DataError(f"record {record['id']}: no assistant answer to learn from")
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(str(record["id"]), ids, labels, dict(record.get("modal_inputs") or {}))


# ----------------------------------------------------------------------------- from manifests
QUESTIONS: dict[str, tuple[str, ...]] = {
    "image": (
        "What is shown in this image?",
        "What object is in the picture?",
        "Name the main thing in this image.",
        "What do you see?",
    ),
    "audio": (
        "What is this sound?",
        "What do you hear?",
        "Name the sound in this clip.",
        "What does this audio contain?",
    ),
    "video": (
        "What is shown in this video?",
        "What does the clip show?",
        "Name the main thing in this video.",
    ),
    "point": (
        "What object is this point cloud?",
        "What shape is this?",
        "Name the object in this 3D point cloud.",
    ),
}


def conversations_from_manifest(
    records: Sequence[Mapping[str, Any]],
    style: str = "label",
    seed: int = 0,
    questions: Mapping[str, Sequence[str]] = QUESTIONS,
) -> list[dict[str, Any]]:
    """Manifest rows (id, path, modality, label, caption) -> conversation records.

    ``style="caption"`` answers with the caption (stage 1, alignment); ``"label"`` asks a varied
    question and answers with the label word (stage 2, instruction-style)."""
    if style not in ("caption", "label"):
        raise ConfigError(f"unknown conversation style {style!r}", hint="use 'caption' or 'label'")
    rng = random.Random(seed)
    out = []
    for r in records:
        m = canonical_modality(r["modality"])
        q = rng.choice(list(questions[m])) if style == "label" else "Describe this briefly."
        a = r["label"] if style == "label" else (r.get("caption") or r["label"])
        out.append(
            {
                "id": r["id"],
                "conversations": [
                    {"from": "human", "value": f"<{m}>\n{q}"},
                    {"from": "gpt", "value": a},
                ],
                "modal_inputs": {m: [r["path"]]},
            }
        )
    return out


def drop_unreadable(
    datasets: Mapping[int, list[Example]], modality: str, skipped: Mapping[str, str], warn: bool
) -> dict[int, list[Example]]:
    """Drop the examples (per stage) that use a skipped file (``on_corrupt: skip``), with one
    warning naming every file and the count; a stage left with no example fails."""
    from mmcompose.model.media import warn_skipped

    bad = set(skipped)
    out = {
        k: [e for e in v if bad.isdisjoint(e.inputs.get(modality, []))] for k, v in datasets.items()
    }
    for stage, examples in out.items():
        if datasets[stage] and not examples:
            raise DataError(
                f"every stage {stage} example uses an unreadable {modality} file",
                hint="fix the files or the data paths",
            )
    if warn:
        dropped = sum(len(datasets[k]) - len(out[k]) for k in out)
        total = sum(len(v) for v in datasets.values())
        warn_skipped(skipped, f"training data ({dropped} of {total} examples dropped)")
    return out
