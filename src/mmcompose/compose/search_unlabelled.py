"""The label-free lambda search (``mmcompose compose CFG --search-unlabelled INPUTS``).

The labelled search (:mod:`mmcompose.compose.search`) needs gold answers; this one needs only
inputs. It uses the same machinery: one in-memory composition
(:class:`~mmcompose.compose.reweight.InMemoryComposition`) re-weighted per candidate, frozen
encoders run once per input (``memoized_encoders``), each weight vector answered once, and
the same report (``OUT/search/search.{json,md,png}``). Candidates are chosen by AdaMMS's
generation consistency (:mod:`mmcompose.compose.consistency`) instead of accuracy.

INPUTS is one of:

- an MCUB-format questions file (``.json``, the reference format): each item's answer is the
  option it picks (by option log-likelihood, or the letter parsed from a greedy generation
  with ``--search-mode generate``; a generation naming no option is compared as text). Gold
  letters in the file, if any, are never read;
- a folder of media files (searched recursively), a JSON list of paths, or a text file with
  one path per line (relative paths resolve against the list's folder): each file is asked
  its modality's first training question ("What is shown in this image?") and the greedy
  answer, normalised, is compared (there are no options to score, so always by generation).

A file's modality comes from its extension (``.gif`` counts as an image). Files that cannot
be decoded are dropped with one warning naming each; inputs of modalities the composition
lacks are dropped with a note. With no readable input left the search is refused before
anything is composed (exit 2, nothing written).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mmcompose.compose.config import ComposeConfig
from mmcompose.compose.consistency import CRITERION, Response, run_consistency_search
from mmcompose.compose.reweight import (
    start_weights,
)
from mmcompose.compose.search import (
    candidates_in_memory,
    checked_options,
    search_then_compose,
    source_names,
)
from mmcompose.compose.search_loop import (
    MAX_PASSES,
    Method,
    SearchResult,
    Weights,
    check_choice,
)
from mmcompose.errors import ConfigError, MediaError

if TYPE_CHECKING:
    from mmcompose.bench.mcub import MCUBItem
    from mmcompose.compose.executor import ComposeResult
    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

__all__ = [
    "UNLABELLED_GRID",
    "Responder",
    "UnlabelledInputs",
    "check_unlabelled_path",
    "compose_with_unlabelled_search",
    "drop_unreadable",
    "load_unlabelled",
    "responder",
    "search_unlabelled",
]

# AdaMMS searched its coefficient over a limited range; lambda = 0 removes a source, where
# every answer of the others' modalities stays the same: a "consistent" but useless region.
UNLABELLED_GRID = (0.25, 0.5, 0.75, 1.0)
MODES = ("loglikelihood", "generate")
Mode = Literal["loglikelihood", "generate"]
Responder = Callable[["MMComposeForCausalLM", "MMProcessor"], list[Response]]
_HINT = (
    "give an MCUB-format questions file (.json), a folder of image/audio/video/point-cloud "
    "files, or a list of such paths (one per line)"
)


@dataclass(frozen=True)
class UnlabelledInputs:
    """What the label-free search asks each candidate: MCUB items or plain media files."""

    source: Path
    kind: Literal["mcub", "media"]
    items: tuple[MCUBItem, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (path, modality), in input order
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it was dropped
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.items) if self.kind == "mcub" else len(self.files)

    @property
    def modalities(self) -> list[str]:
        from mmcompose.modalities import MODALITIES

        used = (
            {m for it in self.items for m in it.modalities}
            if self.kind == "mcub"
            else {m for _, m in self.files}
        )
        return [m for m in MODALITIES if m in used]

    def describe(self) -> str:
        if self.kind == "mcub":
            return f"{len(self)} unlabelled MCUB items from {self.source}"
        counts = {m: sum(mm == m for _, mm in self.files) for m in self.modalities}
        per = ", ".join(f"{m} {k}" for m, k in counts.items())
        return f"{len(self)} unlabelled media files ({per}) from {self.source}"


# ----------------------------------------------------------------------------- inputs
def check_unlabelled_path(path: str | Path) -> Path:
    """The cheap check, before torch is imported: the path exists."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"unlabelled inputs {p} not found", hint=_HINT)
    return p


def _modality_of(path: str | Path) -> str | None:
    from mmcompose.model.media import (
        AUDIO_EXTENSIONS,
        IMAGE_EXTENSIONS,
        POINT_CLOUD_EXTENSIONS,
        VIDEO_EXTENSIONS,
    )

    suffix = Path(path).suffix.lower()
    for modality, exts in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS),
                           ("video", VIDEO_EXTENSIONS), ("point", POINT_CLOUD_EXTENSIONS)):  # fmt: skip
        if suffix in exts:
            return modality
    return None


def _media(source: Path, paths: Iterable[str | Path], where: str) -> UnlabelledInputs:
    files: list[tuple[str, str]] = []
    skipped: dict[str, str] = {}
    for p in paths:
        m = _modality_of(p)
        if m is None:
            skipped[str(p)] = f"{p}: not a supported media file extension"
        else:
            files.append((str(p), m))
    if not files:
        extra = f" ({len(skipped)} other file(s) ignored)" if skipped else ""
        raise ConfigError(f"no media files in {where}{extra}: nothing to search on", hint=_HINT)
    return UnlabelledInputs(source, "media", files=tuple(files), skipped=skipped)


def load_unlabelled(path: str | Path) -> UnlabelledInputs:
    """Read INPUTS (module docstring) without decoding any media file."""
    p = check_unlabelled_path(path)
    if p.is_dir():
        found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        return _media(p, found, f"folder {p}")
    if _modality_of(p) is not None:
        return _media(p, [p], str(p))
    if p.suffix.lower() == ".json":
        from mmcompose.io import load_json

        doc = load_json(p, "unlabelled inputs", expect=list, hint=_HINT)
        if doc and all(isinstance(x, str) for x in doc):
            return _media(p, [_relative(x, p) for x in doc], f"the list {p}")
        if not doc:
            raise ConfigError(f"{p} is an empty list: no inputs to search on", hint=_HINT)
        from mmcompose.bench.mcub import load_mcub

        items = tuple(replace(it, answer=None) for it in load_mcub(p))  # labels never read
        return UnlabelledInputs(p, "mcub", items=items)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the list of inputs {p}: {e}", hint=_HINT) from None
    names = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    return _media(p, [_relative(x, p) for x in names], f"the list {p}")


def _relative(entry: str, listing: Path) -> str:
    q = Path(entry).expanduser()
    return str(q if q.is_absolute() else listing.parent / q)


def _decode(path: str, modality: str) -> None:
    """Read one file with its modality's loader (the same checks training and eval make)."""
    from mmcompose.model import media

    if modality == "image":
        media.load_image(path)
    elif modality == "audio":
        media.load_audio(path)
    elif modality == "video":
        media.load_video(path, num_frames=4)
    else:
        media.load_point_cloud(path)


def drop_unreadable(inputs: UnlabelledInputs) -> UnlabelledInputs:
    """Decode every input file once: unreadable ones are dropped (one warning names each; an
    MCUB item goes with its file). None left: a :class:`MediaError` naming them."""
    from mmcompose.model.media import CorruptFileWarning

    bad: dict[str, str] = {}

    def readable(path: str, modality: str) -> bool:
        if path not in bad:
            try:
                _decode(path, modality)
            except MediaError as e:
                bad[path] = e.message if path in e.message else f"{path}: {e.message}"
                return False
            return True
        return False

    if inputs.kind == "mcub":
        items = tuple(
            it
            for it in inputs.items
            if all(readable(p, m) for m, ps in it.modal_inputs.items() for p in ps)
        )
        kept = len(items)
        out = replace(inputs, items=items, skipped={**inputs.skipped, **bad})
    else:
        files = tuple((p, m) for p, m in inputs.files if readable(p, m))
        kept = len(files)
        out = replace(inputs, files=files, skipped={**inputs.skipped, **bad})
    if kept == 0:
        shown = "; ".join(list(bad.values())[:3]) + (
            f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        )
        raise MediaError(
            f"no readable inputs in {inputs.source} for the label-free search: {shown}",
            hint="fix or replace the files (each must decode with its modality's loader)",
        )
    if bad:
        lines = "".join(f"\n  {why}" for why in bad.values())
        what = "MCUB items using them" if inputs.kind == "mcub" else "them"
        warnings.warn(
            f"label-free search: skipped {len(bad)} unreadable file(s) and {what}:{lines}",
            CorruptFileWarning,
            stacklevel=2,
        )
    return out


def for_modalities(inputs: UnlabelledInputs, modalities: Sequence[str]) -> UnlabelledInputs:
    """Only what the composition can take: media files of its modalities; MCUB items
    restricted to its modalities (other placeholders and inputs dropped, as ``eval
    --modalities`` does). Nothing left: refused."""
    lacking = [m for m in inputs.modalities if m not in modalities]
    if not lacking:
        return inputs
    if not any(m in modalities for m in inputs.modalities):
        raise ConfigError(
            f"{inputs.source}: the inputs are {', '.join(inputs.modalities)}, and the "
            f"composition has none of these (its modalities: {', '.join(modalities)})",
            hint="give inputs of the composed modalities",
        )
    note = f"inputs of {', '.join(lacking)} dropped: the composition has no such tower"
    if inputs.kind == "media":
        files = tuple((p, m) for p, m in inputs.files if m in modalities)
        return replace(inputs, files=files, notes=(*inputs.notes, note))
    from mmcompose.bench.mcub import restrict_modalities

    items = tuple(restrict_modalities(inputs.items, [m for m in modalities]))
    return replace(inputs, items=items, notes=(*inputs.notes, note))


# ----------------------------------------------------------------------------- responses
def responder(
    inputs: UnlabelledInputs, mode: Mode = "loglikelihood", *, batch_size: int = 8,
    max_new_tokens: int = 8,
) -> Responder:  # fmt: skip
    """``(model, processor) -> one response per input``, in input order (module docstring)."""
    check_choice("search mode", mode, MODES)
    if inputs.kind == "mcub":
        return _mcub_responder(list(inputs.items), mode, batch_size, max_new_tokens)
    return _media_responder(list(inputs.files), batch_size, max_new_tokens)


def _mcub_responder(
    items: list[MCUBItem], mode: Mode, batch_size: int, max_new_tokens: int
) -> Responder:
    from mmcompose.bench.classify import normalize
    from mmcompose.bench.mcub import evaluate_mcub

    def respond(model: MMComposeForCausalLM, processor: MMProcessor) -> list[Response]:
        r = evaluate_mcub(model, processor, items, (mode,), max_new_tokens=max_new_tokens,
                          batch_size=batch_size, progress=False)  # fmt: skip
        out: list[Response] = []
        for s in r.samples:
            letter = s["prediction"].get(mode)
            if letter is None and mode == "generate":
                out.append("text: " + normalize(s.get("generation") or ""))
            else:
                out.append(letter)
        return out

    return respond


def _media_responder(
    files: list[tuple[str, str]], batch_size: int, max_new_tokens: int
) -> Responder:
    import torch

    from mmcompose.bench.classify import normalize
    from mmcompose.modalities import MODALITIES
    from mmcompose.train.data import QUESTIONS

    @torch.no_grad()
    def respond(model: MMComposeForCausalLM, processor: MMProcessor) -> list[Response]:
        tok = processor.tokenizer
        eos = [i for i in {tok.eos_token_id, *model._default_eos()} if i is not None]
        out: list[Response] = [None] * len(files)
        for m in MODALITIES:
            idx = [i for i, (_, mm) in enumerate(files) if mm == m]
            prompt = f"<{m}>\n{QUESTIONS[m][0]}"
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                batch = processor([prompt] * len(chunk), {m: [files[i][0] for i in chunk]})
                gen = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                     pad_token_id=eos[0])  # fmt: skip
                for i, row in zip(chunk, gen, strict=True):
                    ids = row.tolist()
                    cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                    out[i] = normalize(processor.decode(ids[:cut]))
        return out

    return respond


# ----------------------------------------------------------------------------- the API
def search_unlabelled(
    config: ComposeConfig | str | Path,
    inputs: str | Path | UnlabelledInputs | None = None,
    *,
    grid: str | Iterable[float] = UNLABELLED_GRID,
    method: Method = "coordinate",
    mode: Mode = "loglikelihood",
    respond: Responder | None = None,
    start: Sequence[float] | None = None,
    max_passes: int = MAX_PASSES,
    device: str = "cpu",
    batch_size: int = 8,
    max_new_tokens: int = 8,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search the per-source weights without labels: AdaMMS's generation consistency of the
    in-memory composition's answers to ``inputs`` (or of ``respond(model, processor)``).

    Everything is checked (options, inputs, every media file decoded) before the temporary
    composition is written; it lives under ``workdir`` and is removed afterwards."""
    t0 = time.perf_counter()
    config, grid, n = checked_options(config, grid, method, mode, MODES, max_passes)
    if len(grid) < 2:
        raise ConfigError(
            f"the label-free search compares neighbouring grid values; the grid {list(grid)} "
            "has one",
            hint="give at least 3 values, e.g. --grid 0.25,0.5,0.75,1",
        )
    data: UnlabelledInputs | None = None
    if respond is None:
        if inputs is None:
            raise ConfigError("no unlabelled inputs", hint="pass --search-unlabelled INPUTS")
        data = inputs if isinstance(inputs, UnlabelledInputs) else load_unlabelled(inputs)
        data = drop_unreadable(data)
    start_w = tuple(float(x) for x in start) if start is not None else start_weights(config)
    total = len(grid) ** n if method == "grid" else None
    with candidates_in_memory(config, start_w, device=device, workdir=workdir,
                              desc=f"{method}, label-free", total=total,
                              progress=progress) as (mem, tick):  # fmt: skip
        if data is not None:
            data = for_modalities(data, mem.model.modalities)
            respond = responder(data, "generate" if data.kind == "media" else mode,
                                batch_size=batch_size, max_new_tokens=max_new_tokens)  # fmt: skip
        assert respond is not None

        def answers(w: Weights) -> list[Response]:
            mem.apply(w)
            out = respond(mem.model, mem.processor)
            tick()
            return out

        result = run_consistency_search(
            answers, n, grid, method=method, start=start_w, max_passes=max_passes
        )
        notes = list(mem.notes)
    used = mode if data is None or data.kind == "mcub" else "generate"
    result.sources = source_names(config)
    result.mode = used if data is not None else None
    result.metric = f"{CRITERION},{used}" if data is not None else CRITERION
    result.n_items = len(data) if data is not None else None
    if data is not None:
        head = [f"label-free (AdaMMS generation consistency) on {data.describe()}"]
        if data.kind == "media":
            head.append("plain media files are compared by their generated answers")
        head += data.notes
        if data.skipped:
            head.append(f"{len(data.skipped)} input(s) skipped: "
                        + "; ".join(list(data.skipped.values())[:3]))  # fmt: skip
        notes = head + notes
    result.notes = notes
    result.seconds = time.perf_counter() - t0
    return result


def compose_with_unlabelled_search(
    config: ComposeConfig | str | Path,
    out_dir: str | Path,
    inputs: str | Path | UnlabelledInputs | None = None,
    *,
    force: bool = False,
    device: str = "cpu",
    allow_nonfinite: bool = False,
    progress: bool = True,
    **search: Any,
) -> tuple[SearchResult, ComposeResult]:
    """Search the lambdas without labels, then compose with the chosen ones into ``out_dir``
    with the report in ``out_dir/search/``; nothing appears at ``out_dir`` unless everything
    succeeded. ``search``: keyword arguments of :func:`search_unlabelled`."""

    def run(cfg: ComposeConfig, **kw: Any) -> SearchResult:
        return search_unlabelled(cfg, inputs, **kw, **search)

    return search_then_compose(
        config, out_dir, run, force=force, device=device, allow_nonfinite=allow_nonfinite,
        progress=progress, workdir=search.pop("workdir", None),
    )  # fmt: skip
