"""A llava-hf image model and an mmcompose audio model, composed into one model that loads
and generates from a prompt holding both modalities (issue: inputs users already have)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from mmcompose.compose import run_from_yaml
from mmcompose.model import MMComposeForCausalLM, MMProcessor
from mmcompose.model.config import AdapterSpec, LoRAConfig, MMConfig
from mmcompose.testing import (
    assert_float_close,
    randomize,
    tiny_inputs,
    tiny_text_config,
    tiny_tokenizer,
    tiny_towers,
)

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=16)  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("llava_compose")
    tok = tiny_tokenizer()
    vocab = len(tok)
    text = tiny_text_config(vocab, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    # A LLaVA whose LLM carries 8 extra vocabulary rows (its <image> token and padding).
    llava = LlavaForConditionalGeneration(
        LlavaConfig(text_config=text | {"vocab_size": vocab + 8}, image_token_index=vocab,
                    vision_config=CLIPVisionConfig(**CLIP).to_dict(), vision_feature_layer=-2)
    ).eval()  # fmt: skip
    llava.save_pretrained(d / "llava")
    # An audio MLLM trained (LoRA) from the same base LLM: LLaVA's LLM without the extra rows.
    cfg = MMConfig(
        text_config=text,
        towers=tiny_towers(["audio"]),
        lora=LoRAConfig(strategy="shared", adapters={"text": AdapterSpec(rank=4, alpha=8)}),
    )
    audio = MMComposeForCausalLM(cfg).eval()
    llm = {
        k: v for k, v in llava.state_dict().items() if "vision" not in k and "multi_modal" not in k
    }
    ours = audio.language_model.state_dict()
    for k in ours:
        if ".lora." in k:
            continue
        src = next(v for kk, v in llm.items() if kk.endswith(k.split("model.", 1)[-1]) or kk == k)
        ours[k].copy_(src[: ours[k].shape[0]])
    randomize(audio, 3)
    audio.save_pretrained(d / "audio", processor=MMProcessor.from_config(cfg, tok))
    return d, llava, audio


def test_llava_hf_plus_audio_compose_loads_and_generates(sources, tmp_path):
    d, llava, audio = sources
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [
            {"model": str(d / "llava"), "parameters": {"weight": 0.5},
             "importer_options": {"base_vocab_size": audio.language_model.config.vocab_size}},
            {"model": str(d / "audio"), "parameters": {"weight": 0.5}},
        ],
        "tokenizer_source": str(d / "audio"),
    }))  # fmt: skip
    run_from_yaml(tmp_path / "c.yaml", tmp_path / "out", progress=False)
    model = MMComposeForCausalLM.from_pretrained(tmp_path / "out")
    proc = MMProcessor.from_pretrained(tmp_path / "out")
    assert model.modalities == ["image", "audio"]
    assert model.config.tower("image").encoder.name == "clip_vision"
    # Towers are carried bit-exact from their one source.
    out = model.state_dict()
    assert torch.equal(out["towers.image.projector.0.weight"],
                       llava.state_dict()[next(k for k in llava.state_dict() if k.endswith("linear_1.weight"))])  # fmt: skip
    a = audio.state_dict()
    assert all(torch.equal(out[k], a[k]) for k in a if k.startswith("towers.audio."))
    # NaiveMC: the LLM is the average of LLaVA's LLM and the audio model's W0 + dW.
    w = "language_model.model.layers.0.self_attn.q_proj"
    layer = dict(audio.named_modules())[w]
    merged_audio = layer.weight + layer.lora["text"].delta_weight()
    llava_w = next(
        v
        for k, v in llava.state_dict().items()
        if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight")
    )
    # float32 rounding of B @ A (rank 4) and of a two-term average, at the weights' scale
    assert_float_close(out[f"{w}.weight"], 0.5 * llava_w + 0.5 * merged_audio, n_terms=2 * 4)
    raw = tiny_inputs()
    batch = proc("image: <image>\naudio: <audio>\nWhat do they share?",
                 {"image": [raw["image"]], "audio": [raw["audio"]]})  # fmt: skip
    ids = model.generate(**batch, max_new_tokens=4, eos_token_id=[])
    assert ids.shape == (1, 4)


def test_llava_original_plus_audio_compose_loads_and_generates(sources, tmp_path):
    """LLaVA-1.5 as liuhaotian ships it (.bin shards, no CLIP weights inside): the CLIP folder
    comes through the importer's ``encoders`` option."""
    import json

    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    d, _, audio = sources
    torch.manual_seed(1)
    vis = CLIPVisionModel(CLIPVisionConfig(**CLIP))
    clip = tmp_path / "clip"
    clip.mkdir()
    sd = vis.state_dict()
    prefix = "" if any(k.startswith("vision_model.") for k in sd) else "vision_model."
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(clip / "model.safetensors"))
    (clip / "config.json").write_text(
        json.dumps({"model_type": "clip", "vision_config": vis.config.to_dict(), "text_config": {}})
    )
    llava = tmp_path / "llava"
    llava.mkdir()
    text = audio.config.text_config
    w0 = {
        k.removeprefix("language_model."): v
        for k, v in audio.state_dict().items()
        if k.startswith("language_model.") and ".lora." not in k and "lm_head" not in k
    }  # tied embeddings: lm_head is not stored
    g = torch.Generator().manual_seed(2)
    d_llm = text["hidden_size"]
    state = w0 | {
        "model.mm_projector.0.weight": torch.randn(d_llm, CLIP["hidden_size"], generator=g),
        "model.mm_projector.0.bias": torch.randn(d_llm, generator=g),
        "model.mm_projector.2.weight": torch.randn(d_llm, d_llm, generator=g),
        "model.mm_projector.2.bias": torch.randn(d_llm, generator=g),
    }
    torch.save(state, llava / "pytorch_model.bin")
    cfg = {k: v for k, v in text.items() if k != "model_type"} | {
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": CLIP["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
    }  # fmt: skip
    (llava / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [
            {"model": str(llava), "importer_options": {"encoders": {"image": str(clip)}}},
            {"model": str(d / "audio")},
        ],
        "tokenizer_source": str(d / "audio"),
    }))  # fmt: skip
    run_from_yaml(tmp_path / "c.yaml", tmp_path / "out", progress=False)
    model = MMComposeForCausalLM.from_pretrained(tmp_path / "out")
    proc = MMProcessor.from_pretrained(tmp_path / "out")
    assert model.modalities == ["image", "audio"]
    out = model.state_dict()
    assert torch.equal(out["towers.image.projector.2.weight"], state["model.mm_projector.2.weight"])
    raw = tiny_inputs()
    batch = proc("<image> and <audio>?", {"image": [raw["image"]], "audio": [raw["audio"]]})
    assert model.generate(**batch, max_new_tokens=3, eos_token_id=[]).shape == (1, 3)
