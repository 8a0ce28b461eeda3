"""Text from a saved model folder, a prompt and modality files: the ``mmcompose generate``
command. Inputs are checked (device, tokenizer, placeholders, media) before the weights load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Generation:
    text: str
    tokens: list[int]  # generated ids, padding removed


def generate_from_folder(
    model_dir: str | Path,
    prompt: str,
    inputs: Mapping[str, Sequence[str | Path] | None] | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
    device: str = "cpu",
) -> Generation:
    """Greedy (``temperature`` 0) or sampled generation; ``inputs`` maps a modality to its
    files, in the order of the prompt's placeholders."""
    from mmcompose.devices import check_device
    from mmcompose.model.config import MMConfig

    check_device(device)
    MMConfig.from_dir(model_dir)  # a missing or damaged folder: before torch is imported
    import torch

    from mmcompose.devices import resolve_device
    from mmcompose.model.modeling import MMComposeForCausalLM
    from mmcompose.model.processor import MMProcessor

    dev = resolve_device(device)
    torch.manual_seed(seed)
    processor = MMProcessor.from_pretrained(model_dir)
    batch = processor(prompt, {m: v for m, v in (inputs or {}).items() if v}, chat=chat)
    model = MMComposeForCausalLM.from_pretrained(model_dir, device=dev)
    model.check_finite(model_dir)
    model.fold_for_inference()
    tok = processor.tokenizer
    eos = [i for i in {tok.eos_token_id, *model._default_eos()} if i is not None]
    ids = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id,
        seed=seed,
    )
    tokens = [t for t in ids[0].tolist() if t != tok.pad_token_id]
    return Generation(processor.decode(tokens).strip(), tokens)


__all__ = ["Generation", "generate_from_folder"]
