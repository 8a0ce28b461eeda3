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


# ---------------------------------------------------------------- numeric tolerances
#: Safety factor of :func:`float_tol` over the statistical rounding estimate. The rounding
#: errors of an n-term reduction add like a random walk (``eps * sqrt(n)`` relative to the
#: terms' size); 8 covers the few roundings stacked per element (multiply, add, activation)
#: and the spread between kernels (SIMD widths, FMA, blocked or threaded summation orders).
#: Tolerances stay orders of magnitude below what a real defect changes (1e-3..1 relative).
TOL_K = 8.0

#: Relative tolerance for float64 comparisons of algebraically equal computations (about
#: 4500 float64 eps): rounding of our tiny networks in float64 is ~1e-14 relative, while a
#: wrong adapter, merge or mask changes outputs by 1e-3 or more.
ALGEBRAIC_RTOL = 1e-12


def eps(dtype: Any) -> float:
    """Machine epsilon of a torch or numpy floating dtype (float32: 1.19e-7)."""
    import numpy as np

    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps
    return float(np.finfo(dtype).eps)


def float_tol(dtype: Any, magnitude: float = 1.0, n_terms: int = 1, k: float = TOL_K) -> float:
    """Absolute tolerance between two computations of one value in ``dtype`` that differ only
    in rounding (kernel choice, summation order, thread count), not in what they compute:
    ``k * eps(dtype) * magnitude * sqrt(n_terms)``.

    ``magnitude``: size of the terms that are summed (e.g. the largest value involved);
    ``n_terms``: length of the longest reduction (dot-product length, number of tensors
    summed). Derived from the dtype and the values, never from what one CPU produced."""
    return k * eps(dtype) * float(magnitude) * float(n_terms) ** 0.5


def llm_tol(
    text_config: Any, magnitude: float, dtype: Any = torch.float32, k: float = TOL_K
) -> float:
    """Tolerance between two runs of one composed model in ``dtype`` that differ only in
    rounding (batching, packing, kernel choice), for outputs of size ``magnitude``.

    Each of the LLM's layers (plus the tower and head) reduces over about
    ``intermediate_size`` terms and rounds at the values' scale, and those errors add along
    the network: :func:`float_tol` with ``intermediate_size * (layers + 1)`` terms. Prefer
    a float64 comparison (:func:`float64_model`) where the claim is algebraic equality."""
    width = int(text_config["intermediate_size"])
    depth = int(text_config["num_hidden_layers"]) + 1
    return float_tol(dtype, magnitude, n_terms=width * depth, k=k)


def assert_float_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    n_terms: int = 1,
    k: float = TOL_K,
    magnitude: float | None = None,
    dtype: torch.dtype | None = None,
    msg: str | None = None,
) -> None:
    """``assert_close`` with ``atol = float_tol(dtype, magnitude, n_terms, k)``, rtol 0.

    ``magnitude`` defaults to the largest absolute value in ``expected``. The rounding allowed
    is that of ``dtype``, by default the less precise of the two tensors' dtypes (pass it when
    a float32 computation is compared in float64); values are compared in the more precise."""
    coarse, fine = sorted((actual.dtype, expected.dtype), key=eps, reverse=True)
    coarse = dtype or coarse
    if magnitude is None:
        magnitude = float(expected.detach().abs().max()) if expected.numel() else 0.0
    tol = float_tol(coarse, magnitude, n_terms, k)
    torch.testing.assert_close(actual.to(fine), expected.to(fine), atol=tol, rtol=0.0, msg=msg)


def assert_algebraically_equal(
    actual: torch.Tensor, expected: torch.Tensor, *, msg: str | None = None
) -> None:
    """Two float64 computations that are equal in exact arithmetic agree to
    :data:`ALGEBRAIC_RTOL` of the largest value (float32 inputs are refused: there the claim
    would be blurred by float32 rounding; build the model with ``.double()``)."""
    for t in (actual, expected):
        if t.dtype != torch.float64:
            raise TypeError(f"compare algebraic equality in float64, got {t.dtype}")
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=ALGEBRAIC_RTOL * scale, rtol=0.0, msg=msg)


def to_float64(batch: Any) -> Any:
    """``batch`` (nested dicts/lists/tuples of tensors) with floating tensors in float64, to
    feed a model converted with ``.double()``; integer tensors (ids, masks) stay as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_float64(v) for v in batch)
    return batch


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model.double()``, with the Hugging Face RMSNorm layers in it computing in float64.

    Those layers upcast to float32 and back (to protect half precision); in a float64 model
    that rounds every normalised hidden state to float32, so a 1e-15 difference between two
    algebraically equal computations would now and then, depending on the CPU, cross a
    float32 rounding boundary and surface as a 1e-7 one. The replacement is the same formula
    in the input's dtype, bound on each instance (the classes are left alone)."""
    import types

    def _rms_norm(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    model.double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm, module)
    return model


def save_tiny_aligned_model(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """An untrained Alt-MoE connector between a random ``patch_embed`` image encoder and MiniLM
    text, saved as ``mmcompose align`` writes it: enough for ``index`` / ``search`` tests (an
    image gallery never loads the text encoder)."""
    from safetensors.torch import save_file

    from mmcompose.align.moe import AltMoEConnector, ConnectorConfig
    from mmcompose.fs import write_json_atomic

    torch.manual_seed(seed)
    cfg = ConnectorConfig(
        hidden=16,
        num_experts=2,
        top_k=1,
        modalities={"image": 32, "text": 384},
        directions=(("image", "text"), ("text", "image")),
    )
    connector = AltMoEConnector(cfg)
    image = {"name": "patch_embed", "params": {"image_size": image_size, "patch_size": 8}}
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in connector.state_dict().items()}, folder / "model.safetensors"
    )
    meta = {
        "format": 1,
        "kind": "alt-moe",
        "connector": cfg.model_dump(mode="json"),
        "encoders": {
            "image": {**image, "params": {**image["params"], "width": 32}},
            "text": {"name": "minilm"},
        },
        "space": "cl",
        "text_field": "caption",
    }
    write_json_atomic(folder / "config.json", meta)
    return folder


def plant_pickle_payload(path: Path, marker: Path) -> Path:
    """Write ``path`` as a torch pickle that creates ``marker`` when unpickled, as a malicious
    checkpoint would run its code: tests show that no loader ever executes it."""

    class _Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": _Payload()}, path)
    return path


def plant_bad_checkpoint(folder: Path, case: str, marker: Path) -> Path:
    """A checkpoint folder a resume must refuse without running code; returns the bad file.

    ``case``: ``state.pt`` / ``checkpoint.pt`` (an old pickle checkpoint), ``tensors`` (a
    pickle as ``state.safetensors``, with a header whose SHA-256 matches it, so the
    safetensors parser meets it) or ``json`` (a pickle as ``state.json``).
    """
    from safetensors.torch import save_file

    from mmcompose.checkpoint import LEGACY_NAMES, META_NAME, TENSORS_NAME
    from mmcompose.fs import sha256_file, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    if case in LEGACY_NAMES:
        return plant_pickle_payload(folder / case, marker)
    if case == "tensors":
        bad = plant_pickle_payload(folder / TENSORS_NAME, marker)
        write_json_atomic(folder / META_NAME, {"format": 1, "tensors_sha256": sha256_file(bad)})
        return bad
    if case == "json":
        save_file({"x": torch.zeros(1)}, str(folder / TENSORS_NAME))
        return plant_pickle_payload(folder / META_NAME, marker)
    raise ValueError(f"unknown case {case!r}")
