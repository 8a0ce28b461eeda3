"""Tiny random models for tests, examples and laptops: no download, built in a second.

``build_tiny_model`` gives a complete composed model (LLM with hidden size 64 and 2 layers,
small random towers for every modality, optional LoRA) and its processor, with a small BPE
tokenizer trained on the spot and a ChatML chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mmcompose.model.config import AdapterSpec, LoRAConfig, MMConfig, ModuleSpec, TowerConfig
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.model.processor import MMProcessor

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = (
    "a chat between a user and an assistant. what is shown in the image? what do you hear? "
    "which attribute do these inputs have in common? answer with the letter. the option is "
    "a dog cat cow horse bird car plane apple orange banana drum guitar piano bell water fire "
    "it is a photo of a sound of a shape of a video of the object. yes no one two three four "
    "A B C D image audio video point cloud system user assistant describe briefly."
)


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic), with ChatML."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML
    return fast


def tiny_text_config(
    vocab_size: int,
    family: Literal["llama", "qwen2", "mistral"] = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        # Larger than the usual 0.02: with frozen tied embeddings, tiny std bounds the logits
        # (|logit| <~ 1) and a LoRA could never make a confident prediction in tests.
        "initializer_range": 0.2,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if family == "mistral":
        cfg["sliding_window"] = None
    return cfg


def tiny_towers(
    modalities: Sequence[str], num_prefix: int = 0, num_suffix: int = 0
) -> list[TowerConfig]:
    image = ModuleSpec(name="patch_embed", params={"image_size": 32, "patch_size": 8, "width": 32})
    specs = {
        "image": (image, ModuleSpec(name="mlp2x_gelu")),
        "audio": (
            ModuleSpec(name="mel_conv", params={"n_frames": 200, "width": 32, "num_tokens": 8}),
            ModuleSpec(name="qformer", params={"num_queries": 4, "num_layers": 1, "num_heads": 2}),
        ),
        "video": (
            ModuleSpec(
                name="video_frames",
                params={
                    "frame_encoder": {
                        "name": "patch_embed",
                        "params": {"image_size": 16, "patch_size": 8, "width": 32},
                    },
                    "num_frames": 4,
                },
            ),
            ModuleSpec(name="linear"),
        ),
        "point": (
            ModuleSpec(
                name="pointnet",
                params={"num_points": 128, "num_groups": 8, "group_size": 16, "width": 32},
            ),
            ModuleSpec(name="mlp2x_gelu"),
        ),
    }
    return [
        TowerConfig(
            modality=m,
            encoder=specs[m][0],
            projector=specs[m][1],
            num_prefix=num_prefix,
            num_suffix=num_suffix,
        )
        for m in modalities
    ]


def tiny_config(
    modalities: Sequence[str] = ("image", "audio", "video", "point"),
    strategy: Literal["shared", "decoupled"] | None = "decoupled",
    rank: int = 4,
    family: Literal["llama", "qwen2", "mistral"] = "llama",
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> MMConfig:
    tok = tokenizer or tiny_tokenizer()
    lora = None
    if strategy is not None:
        names = ["text"] + (list(modalities) if strategy == "decoupled" else [])
        lora = LoRAConfig(
            strategy=strategy, adapters={n: AdapterSpec(rank=rank, alpha=2 * rank) for n in names}
        )
    n_tok = 2 if strategy == "decoupled" else 0
    return MMConfig(
        text_config=tiny_text_config(
            len(tok), family, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        ),
        towers=tiny_towers(modalities, num_prefix=n_tok, num_suffix=n_tok),
        lora=lora,
    )


def build_tiny_model(
    modalities: Sequence[str] = ("image", "audio", "video", "point"),
    strategy: Literal["shared", "decoupled"] | None = "decoupled",
    rank: int = 4,
    family: Literal["llama", "qwen2", "mistral"] = "llama",
    seed: int = 0,
    randomize_adapters: bool = True,
    adapter_seed: int | None = None,
) -> tuple[MMComposeForCausalLM, MMProcessor]:
    """A random composed model and its processor. With ``randomize_adapters`` the LoRA B
    matrices and prefix/suffix tokens get random values, so every adapter changes outputs.

    The LLM's weights depend only on ``seed`` (and family/size), so models built with the same
    ``seed`` share one base LLM, like single-modality MLLMs fine-tuned from one base; give
    them different ``adapter_seed`` values to make their adapters differ."""
    tok = tiny_tokenizer()
    config = tiny_config(modalities, strategy, rank, family, tok)
    torch.manual_seed(seed)
    model = MMComposeForCausalLM(config).eval()
    if randomize_adapters:
        randomize(model, seed if adapter_seed is None else adapter_seed)
    return model, MMProcessor.from_config(config, tok)


def save_tiny_base_llm(
    path: str | Path, seed: int = 0, family: Literal["llama", "qwen2", "mistral"] = "llama"
) -> Path:
    """A tiny random Hugging Face causal LM folder (weights + tokenizer), like a real base LLM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_text_config(
        len(tok), family, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    path = Path(path)
    llm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def randomize(model: MMComposeForCausalLM, seed: int = 0) -> None:
    """Give zero-initialised trainables (LoRA B, prefix/suffix) random values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("lora_B") or name.endswith((".prefix", ".suffix")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_inputs(seed: int = 0) -> dict[str, Any]:
    """One random raw input per modality, in the types the file loaders return."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return {
        "image": Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
        "audio": (rng.standard_normal(16000) * 0.1).astype(np.float32),
        "video": rng.integers(0, 255, (4, 20, 20, 3), dtype=np.uint8),
        "point": rng.standard_normal((300, 3)).astype(np.float32),
    }


def save_tiny_single(folder: Path, modality: str, strategy: str, adapter_seed: int) -> Path:
    """A tiny single-modality model (shared base weights, its own adapters) saved for
    composition tests as ``folder/<strategy>-<modality>``."""
    model, proc = build_tiny_model((modality,), strategy, seed=0, adapter_seed=adapter_seed)
    path = Path(folder) / f"{strategy}-{modality}"
    model.save_pretrained(path, processor=proc)
    return path


def compose_config(
    paths: Sequence[Path], method: str = "linear", weights: Sequence[Any] | None = None, **extra
) -> dict[str, Any]:
    """A composition config dict (mergekit's schema) over ``paths`` with optional weights."""
    models = [
        {"model": str(p), **({"parameters": {"weight": w}} if w is not None else {})}
        for p, w in zip(paths, weights or [None] * len(paths), strict=True)
    ]
    return {"merge_method": method, "models": models, **extra}
