"""``mmcompose check``: does a model compute what its source computes, run by its own library?

The model is run as mmcompose runs it (``MMProcessor`` renders, tokenises and preprocesses;
``MMComposeForCausalLM`` computes); the source as its own library runs it: a llava-hf folder
through transformers' ``AutoProcessor`` (its chat template with content parts, its image
processor, its ``<image>`` expansion) and ``LlavaForConditionalGeneration``, a plain LLM folder
through ``AutoTokenizer`` and ``AutoModelForCausalLM``, an mmcompose folder through mmcompose.
Both get the same prompt and the same decoded image; the report gives the largest logit
difference over every position (and the vocabulary rows the model kept), the tolerance that
float rounding explains, and whether greedy decoding picks the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.io import load_json
from mmcompose.modalities import MODALITIES
from mmcompose.model.config import CONFIG_NAME, SUPPORTED_LLM_TYPES, MMConfig

if TYPE_CHECKING:  # torch is imported once the arguments are checked
    import torch
    from torch import Tensor

DEFAULT_PROMPT = "Describe what you see."
_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


@dataclass(frozen=True)
class CheckReport:
    """What ``check`` measured. ``max_diff`` is None when the sequences differ in length (the
    prompts were tokenised or expanded differently, so no position lines up)."""

    source_kind: str
    positions: tuple[int, int]  # sequence lengths (model, source), modality blocks included
    vocab: tuple[int, int]  # logit columns (model, source); the model's are compared
    max_diff: float | None
    max_logit: float
    tolerance: float
    greedy: tuple[list[int], list[int]]  # (model, source) greedy tokens

    @property
    def logits_match(self) -> bool:
        return self.max_diff is not None and self.max_diff <= self.tolerance

    @property
    def tokens_match(self) -> bool:
        return self.greedy[0] == self.greedy[1]

    @property
    def faithful(self) -> bool:
        return self.logits_match and self.tokens_match

    def lines(self) -> list[str]:
        n_model, n_src = self.positions
        out = [f"source run as: {self.source_kind}"]
        if self.max_diff is None:
            out.append(
                f"sequence lengths differ: model {n_model}, source {n_src} positions "
                "(the prompt is rendered, tokenised or expanded differently)"
            )
        else:
            cols = f"{self.vocab[0]} of {self.vocab[1]} vocabulary rows"
            out.append(
                f"max |logit difference|: {self.max_diff:.3g} over {n_model} positions and "
                f"{cols} (tolerance {self.tolerance:.3g}, largest |logit| {self.max_logit:.3g})"
            )
        model, src = self.greedy
        if self.tokens_match:
            out.append(f"greedy tokens: identical ({len(model)} tokens)")
        else:
            pairs = zip(model, src, strict=False)
            k = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(model), len(src)))
            out.append(f"greedy tokens: differ from token {k}: model {model}, source {src}")
        out.append("faithful: " + ("yes" if self.faithful else "NO"))
        return out


def tolerance(dtype: torch.dtype, max_logit: float, hidden: int, layers: int) -> float:
    """Logit difference that rounding alone explains: ``float_tol`` with the dtype's eps, the
    logits' magnitude and ``hidden * layers`` terms (a hidden-size reduction per layer, their
    rounding errors adding up like a random walk)."""
    from mmcompose.testing import float_tol

    return float_tol(dtype, max_logit, max(1, hidden * layers))


def check_against(
    model_dir: str | Path,
    source_dir: str | Path,
    prompt: str | None = None,
    image: str | Path | None = None,
    *,
    max_new_tokens: int = 8,
    chat: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
) -> CheckReport:
    """Run ``model_dir`` and ``source_dir`` on the same prompt (and image) and compare.

    A prompt without ``<image>`` gets one in front when an image is given."""
    from mmcompose.devices import check_device

    if dtype not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}", hint=f"use {', '.join(_DTYPES)}")
    check_device(device)
    source_dir = Path(source_dir)
    kind = _source_kind(source_dir)
    MMConfig.from_dir(model_dir)  # a missing or damaged folder: before torch is imported
    import torch

    from mmcompose.devices import resolve_device
    from mmcompose.model import media
    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

    dev, torch_dtype = resolve_device(device), getattr(torch, dtype)
    prompt = prompt if prompt is not None else DEFAULT_PROMPT
    if image is not None and "<image>" not in prompt:
        prompt = "<image>\n" + prompt
    img = media.load_image(image) if image is not None else None
    images = [img] if img is not None else []

    proc = MMProcessor.from_pretrained(model_dir)
    model = MMComposeForCausalLM.from_pretrained(model_dir, device=dev, dtype=dtype)
    batch = proc(prompt, {"image": images}, chat=chat)
    chat = chat and proc.use_chat_template  # the folder's own choice holds for both sides
    run = _SOURCES[kind]
    src_logits, src_greedy = run(source_dir, prompt, images, proc, chat, torch_dtype, dev,
                                 model.language_model.config.vocab_size, max_new_tokens)  # fmt: skip
    with torch.no_grad():
        logits = model(**batch).logits[0].float()
        greedy = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=[])
    cfg = model.language_model.config
    max_logit = float(src_logits.abs().max())
    tol = tolerance(torch_dtype, max_logit, cfg.hidden_size, cfg.num_hidden_layers)
    diff = None
    if logits.shape[0] == src_logits.shape[0] and logits.shape[1] <= src_logits.shape[1]:
        diff = float((logits - src_logits[:, : logits.shape[1]]).abs().max())
    return CheckReport(
        source_kind=kind,
        positions=(logits.shape[0], src_logits.shape[0]),
        vocab=(logits.shape[1], src_logits.shape[1]),
        max_diff=diff,
        max_logit=max_logit,
        tolerance=tol,
        greedy=(greedy[0].tolist(), src_greedy),
    )


# ---------------------------------------------------------------------------- sources
def _source_kind(path: Path) -> str:
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{path} has no {CONFIG_NAME}", hint="pass the folder the model was imported from"
        )
    cfg = load_json(path / CONFIG_NAME, "source config", error=CheckpointError)
    mt = cfg.get("model_type")
    if mt == "llava":
        return "llava_hf"
    if mt == "mmcompose":
        return "mmcompose"
    if mt in SUPPORTED_LLM_TYPES:
        return "causal_lm"
    raise ConfigError(
        f"{path}: cannot run a {mt!r} model with its own library here",
        hint="check compares against llava-hf folders (LlavaForConditionalGeneration), plain "
        f"{'/'.join(SUPPORTED_LLM_TYPES)} LLM folders and mmcompose folders; LLaVA-original "
        "and ModelCompose checkpoints need their own code bases",
    )


def _greedy_config(vocab: int, source_vocab: int, max_new_tokens: int) -> Any:
    """Greedy decoding of exactly ``max_new_tokens`` (no stop token, no penalties from the
    folder's generation_config), over the rows the model kept (``base_vocab_size``)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        suppress_tokens=list(range(vocab, source_vocab)) or None,
    )


def _messages(prompt: str, system: str | None, typed: Sequence[str]) -> list[dict[str, Any]]:
    from mmcompose.model.chat import content_parts

    head = [{"role": "system", "content": content_parts(system, typed)}] if system else []
    return [*head, {"role": "user", "content": content_parts(prompt, typed)}]


def _run_llava_hf(
    path: Path, prompt: str, images: list, proc: Any, chat: bool, dtype: torch.dtype,
    dev: torch.device, vocab: int, max_new_tokens: int,
) -> tuple[Tensor, list[int]]:  # fmt: skip
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmcompose.model.processor import _quiet_transformers

    with _quiet_transformers():
        hf_proc = AutoProcessor.from_pretrained(str(path))
        model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype)
    model = model.to(dev).eval()
    token = getattr(hf_proc, "image_token", "<image>")
    if chat and getattr(hf_proc, "chat_template", None):
        text = hf_proc.apply_chat_template(
            _messages(prompt, proc.system_prompt, ["image"]), add_generation_prompt=True
        )
    else:  # no template: the plain turn mmcompose renders, with the processor's image token
        text = (proc.format_prompt(prompt) if chat else prompt).replace("<image>", token)
    inputs = hf_proc(text=[text], images=images or None, return_tensors="pt").to(dev)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return _forward_and_greedy(model, inputs, vocab, max_new_tokens)


def _run_causal_lm(
    path: Path, prompt: str, images: list, proc: Any, chat: bool, dtype: torch.dtype,
    dev: torch.device, vocab: int, max_new_tokens: int,
) -> tuple[Tensor, list[int]]:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if images or any(f"<{m}>" in prompt for m in MODALITIES):
        raise ConfigError(
            f"{path} is a text-only LLM; it takes no image",
            hint="check a text prompt against it, or pass the multimodal source",
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(dev).eval()
    if chat and tok.chat_template:
        head = [{"role": "system", "content": proc.system_prompt}] if proc.system_prompt else []
        msgs = [*head, {"role": "user", "content": prompt}]
        inputs = tok.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
    else:
        inputs = tok(proc.format_prompt(prompt) if chat else prompt, return_tensors="pt")
    return _forward_and_greedy(model, dict(inputs.to(dev)), vocab, max_new_tokens)


def _run_mmcompose(
    path: Path, prompt: str, images: list, proc: Any, chat: bool, dtype: torch.dtype,
    dev: torch.device, vocab: int, max_new_tokens: int,
) -> tuple[Tensor, list[int]]:  # fmt: skip
    import torch

    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

    src_proc = MMProcessor.from_pretrained(path)
    model = MMComposeForCausalLM.from_pretrained(path, device=dev, dtype=str(dtype).split(".")[1])
    batch = src_proc(prompt, {"image": images}, chat=chat)
    with torch.no_grad():
        logits = model(**batch).logits[0].float()
        greedy = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=[])
    return logits, greedy[0].tolist()


def _forward_and_greedy(
    model: Any, inputs: dict[str, Tensor], vocab: int, max_new_tokens: int
) -> tuple[Tensor, list[int]]:
    import torch

    source_vocab = model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        out = model.generate(
            **inputs, generation_config=_greedy_config(vocab, source_vocab, max_new_tokens)
        )
    return logits, out[0, inputs["input_ids"].shape[1] :].tolist()


_SOURCES = {"llava_hf": _run_llava_hf, "causal_lm": _run_causal_lm, "mmcompose": _run_mmcompose}
