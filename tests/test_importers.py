"""Importers for LLaVA, llava-hf and ModelCompose checkpoints, on tiny fakes of each layout.

The fakes use the key names and config.json fields those projects write (LLaVA's sharded
``pytorch_model-*.bin``; llava-hf written by transformers itself and renamed to the pre-/post-
4.52 layouts; ModelCompose's LocalLoRA ``adapter_model.bin`` and peft's adapter + non-LoRA files
with LAVIS Q-Former names), so a mapping bug shows up as a name, shape or value mismatch.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import mmcompose.compose.importers as imp
from mmcompose.compose.sources import open_source
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.model.config import ModuleSpec
from mmcompose.model.encoders import build_encoder
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.testing import assert_algebraically_equal, float64_model

D, LAYERS, VOCAB, D_ENC = 64, 2, 128, 32
PROJS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
CLIP_TINY = dict(
    hidden_size=D_ENC, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=32, patch_size=8, projection_dim=16,
)  # fmt: skip


def _llama_config(vocab: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=D, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=256,
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Hugging Face Llama folder (the shared base LLM) and its state dict."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config())
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A CLIP folder as on the hub: model_type 'clip', vision + text weights, no LLaVA parts."""
    torch.manual_seed(1)
    vis = CLIPVisionModel(CLIPVisionConfig(**CLIP_TINY))
    sd = {k: v.clone() for k, v in vis.state_dict().items()}
    prefix = "" if any(k.startswith("vision_model.") for k in sd) else "vision_model."
    state = {prefix + k: v for k, v in sd.items()}
    state |= {"text_model.embeddings.token_embedding.weight": torch.randn(10, 8)}
    state |= {"logit_scale": torch.tensor(2.0), "visual_projection.weight": torch.randn(16, 32)}
    path = tmp_path_factory.mktemp("clip")
    save_file(state, str(path / "model.safetensors"))
    cfg = {"model_type": "clip", "vision_config": vis.config.to_dict(), "text_config": {}}
    (path / "config.json").write_text(json.dumps(cfg))
    return path, state


# ----------------------------------------------------------------------------- LLaVA original
def _write_llava(path: Path, llama_sd, extra: dict | None = None, **cfg_over) -> dict:
    """LLaVA-1.5 as liuhaotian ships it: two .bin shards + pytorch_model.bin.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = _llama_config().to_dict() | {
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": D_ENC, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "torch_dtype": "float16",
    } | cfg_over  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(2)
    state = dict(llama_sd) | {
        "model.mm_projector.0.weight": torch.randn(D, D_ENC, generator=g),
        "model.mm_projector.0.bias": torch.randn(D, generator=g),
        "model.mm_projector.2.weight": torch.randn(D, D, generator=g),
        "model.mm_projector.2.bias": torch.randn(D, generator=g),
    } | (extra or {})  # fmt: skip
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    for fname, ks in shards.items():
        torch.save({k: state[k] for k in ks}, path / fname)
    wmap = {k: f for f, ks in shards.items() for k in ks}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    return state


def _assert_values(src, mapping: dict[str, torch.Tensor]) -> None:
    for ours, t in mapping.items():
        assert torch.equal(src.get(ours), t), ours


def test_llava_maps_llm_and_projector_and_defers_the_missing_encoder(tmp_path, llama):
    state = _write_llava(tmp_path / "llava", llama[1])
    src = open_source(tmp_path / "llava")
    assert src.kind == "llava"
    expect = {"language_model." + k: v for k, v in llama[1].items()}
    expect |= {f"towers.image.projector.{k[len('model.mm_projector.'):]}": v
               for k, v in state.items() if k.startswith("model.mm_projector.")}  # fmt: skip
    assert sorted(src.keys()) == sorted(expect)
    _assert_values(src, expect)
    cfg = src.config
    assert cfg.text_config["model_type"] == "llama" and cfg.dtype == "float16"
    assert not any(k.startswith("mm_") for k in cfg.text_config)
    assert cfg.lora is None and [t.modality for t in cfg.towers] == ["image"]
    tower = cfg.towers[0]
    assert tower.projector == ModuleSpec(name="mlp2x_gelu")
    assert tower.encoder.name == "unavailable"
    assert tower.encoder.params["output_dim"] == D_ENC
    with pytest.raises(ConfigError, match=r"clip-vit-large-patch14-336.*not in the imported"):
        MMComposeForCausalLM(cfg)


def test_llava_with_clip_folder_loads_and_runs(tmp_path, llama, clip_dir):
    _write_llava(tmp_path / "llava", llama[1])
    src = imp.open_llava(tmp_path / "llava", encoders={"image": clip_dir[0]})
    enc = src.config.towers[0].encoder
    assert enc.name == "clip_vision"
    assert enc.params["feature_layer"] == -2 and enc.params["select_strategy"] == "default"
    clip_keys = [k for k in clip_dir[1] if k.startswith("vision_model.")]
    assert sum(k.startswith("towers.image.encoder.") for k in src) == len(clip_keys)
    assert "logit_scale" in {k.split("/")[-1] for k in src.dropped}
    model = MMComposeForCausalLM(src.config)
    model.load_weights({k: src.get(k) for k in src})
    x = torch.randn(2, 3, 32, 32)
    out = model.embed_modalities(modal_inputs={"image": x})["image"]
    assert out.shape == (2, 16, D)  # (32/8)^2 patches, CLS dropped


def test_llava_encoder_substitute_and_dim_check(tmp_path, llama):
    _write_llava(tmp_path / "llava", llama[1])
    good = ModuleSpec(name="patch_embed", params={"width": D_ENC, "image_size": 32})
    weights = tmp_path / "enc.safetensors"
    save_file(build_encoder(good).state_dict(), str(weights))
    src = imp.open_llava(tmp_path / "llava", encoders={"image": (good, weights)})
    assert src.config.towers[0].encoder == good
    model = MMComposeForCausalLM(src.config)
    model.load_weights({k: src.get(k) for k in src})
    bad = ModuleSpec(name="patch_embed", params={"width": 48, "image_size": 32})
    save_file(build_encoder(bad).state_dict(), str(weights))
    with pytest.raises(ConfigError, match="outputs 48 features but the projector takes 32"):
        imp.open_llava(tmp_path / "llava", encoders={"image": (bad, weights)})


def test_llava_linear_projector_and_vocab_trim(tmp_path, llama):
    over = {f"model.mm_projector.{k}": None for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    big = _llama_config(VOCAB + 2)
    torch.manual_seed(3)
    sd = LlamaForCausalLM(big).state_dict()
    path = tmp_path / "llava"
    _write_llava(path, sd, vocab_size=VOCAB + 2, mm_projector_type="linear")
    # rewrite the projector as a single Linear
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    for f in set(index["weight_map"].values()):
        part = {k: v for k, v in torch.load(path / f).items() if k not in over}
        torch.save(part, path / f)
    lin = {
        "model.mm_projector.weight": torch.randn(D, D_ENC),
        "model.mm_projector.bias": torch.randn(D),
    }
    torch.save(lin, path / "pytorch_model-00003-of-00003.bin")
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if k not in over}
    index["weight_map"] |= dict.fromkeys(lin, "pytorch_model-00003-of-00003.bin")
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    src = imp.open_llava(path, base_vocab_size=VOCAB)
    assert src.config.towers[0].projector == ModuleSpec(name="linear")
    assert src.get("towers.image.projector.weight").equal(lin["model.mm_projector.weight"])
    assert src.config.text_config["vocab_size"] == VOCAB
    emb = src.get("language_model.model.embed_tokens.weight")
    assert emb.shape == (VOCAB, D) and emb.equal(sd["model.embed_tokens.weight"][:VOCAB])
    assert src.shape("language_model.lm_head.weight") == (VOCAB, D)
    assert imp.open_llava(path).config.text_config["vocab_size"] == VOCAB + 2


@pytest.mark.parametrize(
    ("cfg_over", "extra", "match"),
    [
        ({"mm_projector_type": "resampler"}, None, "unsupported projector type 'resampler'"),
        ({}, {"model.image_newline": torch.zeros(D)}, r"does not know.*image_newline"),
        ({"mm_projector_type": "mlp3x_gelu"}, None, "expects tensors"),
    ],
)
def test_llava_bad_inputs(tmp_path, llama, cfg_over, extra, match):
    _write_llava(tmp_path / "llava", llama[1], extra, **cfg_over)
    with pytest.raises(CheckpointError, match=match):
        open_source(tmp_path / "llava")


def test_llava_missing_projector_and_corrupt_shard(tmp_path, llama):
    path = tmp_path / "llava"
    _write_llava(path, llama[1])
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if "mm_projector" not in k}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="projector's weights are missing"):
        open_source(path)
    _write_llava(path, llama[1])
    shard = path / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:200])
    src = open_source(path)  # shards listed by the index are only opened when read
    name = next(k for k in src if src._entries[k][0] == shard)
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        src.get(name)


# ----------------------------------------------------------------------------- llava-hf
def _rename_v5(key: str, layout: str) -> str:
    """transformers 5's save layout -> the pre-4.52 or post-4.52 layout of the hub repos."""
    vis = key.startswith("vision_tower.")
    if layout == "pre452":
        return "vision_tower.vision_model." + key[len("vision_tower.") :] if vis else key
    if vis:
        return "model.vision_tower.vision_model." + key[len("vision_tower.") :]
    for old, new in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):  # fmt: skip
        if key.startswith(old):
            return new + key[len(old) :]
    return key


@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory) -> tuple[Path, LlavaForConditionalGeneration]:
    torch.manual_seed(4)
    cfg = LlavaConfig(
        text_config=_llama_config(VOCAB + 64).to_dict(),
        vision_config=CLIPVisionConfig(**CLIP_TINY).to_dict(),
        image_token_index=VOCAB,
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    path = tmp_path_factory.mktemp("llava_hf") / "v5"
    model.save_pretrained(path)
    return path, model


def _llava_hf_layout(src_dir: Path, dst: Path, layout: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    state = {_rename_v5(k, layout): v for k, v in load_file(src_dir / "model.safetensors").items()}
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src_dir / "config.json").read_text())
    return state


@pytest.mark.parametrize("layout", ["v5", "pre452", "post452"])
def test_llava_hf_layouts_map_and_tower_matches_transformers(tmp_path, llava_hf, layout):
    path, hf = llava_hf
    state = _llava_hf_layout(path, tmp_path / layout, layout)
    src = open_source(tmp_path / layout)
    assert src.kind == "llava_hf"
    tower = src.config.towers[0]
    assert tower.projector == ModuleSpec(name="mlp2x_gelu")
    assert tower.encoder.name == "clip_vision" and tower.encoder.params["feature_layer"] == -2
    assert len(src.keys()) == len(state)
    proj_a = next(
        v for k, v in state.items() if k.endswith("multi_modal_projector.linear_2.weight")
    )
    emb = next(v for k, v in state.items() if k.endswith("embed_tokens.weight"))
    assert src.get("towers.image.projector.2.weight").equal(proj_a)
    assert src.get("language_model.model.embed_tokens.weight").equal(emb)
    assert src.get("language_model.lm_head.weight").equal(hf.lm_head.weight)
    assert src.config.text_config["hidden_size"] == D  # materialised from the nested config
    model = MMComposeForCausalLM(src.config).eval()
    model.load_weights({k: src.get(k) for k in src})
    # Same tower and projector, two implementations: algebraic, so compared in float64.
    float64_model(model)
    hf64 = copy.deepcopy(hf).double()
    x = torch.randn(2, 3, 32, 32).double()
    with torch.no_grad():
        ours = model.embed_modalities(modal_inputs={"image": x})["image"]
        ref = hf64.model.get_image_features(pixel_values=x, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default")  # fmt: skip
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    ref = torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref
    assert_algebraically_equal(ours, ref.reshape(ours.shape))  # a wrong layer or map: O(1)


def test_llava_hf_vocab_rows_and_bad_configs(tmp_path, llava_hf):
    path, _ = llava_hf
    src = imp.open_llava_hf(path)
    assert src.config.text_config["vocab_size"] == VOCAB + 64  # <image> etc. kept by default
    trimmed = imp.open_llava_hf(path, base_vocab_size=VOCAB)
    assert trimmed.shape("language_model.model.embed_tokens.weight") == (VOCAB, D)
    assert trimmed.shape("language_model.lm_head.weight") == (VOCAB, D)
    bad = tmp_path / "bad"
    _llava_hf_layout(path, bad, "v5")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"projector_hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="unsupported projector"):
        open_source(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        open_source(bad)


# ----------------------------------------------------------------------------- ModelCompose
W, Q, A_DIM = 64, 4, 48  # Q-Former width, queries, audio encoder width


def _qformer_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Video-LLaMA's audio Q-Former as the reference saves it (LAVIS BERT names)."""
    p = "model.modal_projectors.audio."
    s = {
        p + "audio_query_tokens": torch.randn(1, Q, W, generator=g),
        p + "audio_llama_proj.weight": torch.randn(D, W, generator=g),
        p + "audio_llama_proj.bias": torch.randn(D, generator=g),
        p + "audio_position_embedding.weight": torch.randn(16, A_DIM, generator=g),
        p + "audio_Qformer.bert.embeddings.LayerNorm.weight": torch.randn(W, generator=g),
        p + "audio_Qformer.bert.embeddings.LayerNorm.bias": torch.randn(W, generator=g),
    }
    for i in range(2):
        lp = f"{p}audio_Qformer.bert.encoder.layer.{i}."
        for att, kv_in in (("attention", W), ("crossattention", A_DIM)):
            for n, d_in in (("query", W), ("key", kv_in), ("value", kv_in)):
                s[f"{lp}{att}.self.{n}.weight"] = torch.randn(W, d_in, generator=g)
                s[f"{lp}{att}.self.{n}.bias"] = torch.randn(W, generator=g)
            s[f"{lp}{att}.output.dense.weight"] = torch.randn(W, W, generator=g)
            for n in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
                s[f"{lp}{att}.{n}"] = torch.randn(W, generator=g)
        s[f"{lp}intermediate_query.dense.weight"] = torch.randn(2 * W, W, generator=g)
        s[f"{lp}intermediate_query.dense.bias"] = torch.randn(2 * W, generator=g)
        s[f"{lp}output_query.dense.weight"] = torch.randn(W, 2 * W, generator=g)
        for n in (
            "output_query.dense.bias",
            "output_query.LayerNorm.weight",
            "output_query.LayerNorm.bias",
        ):
            s[lp + n] = torch.randn(W, generator=g)
    return s


def _lora_state(adapters, g, rank=4, prefix="", named=True) -> dict[str, torch.Tensor]:
    s = {}
    for i in range(LAYERS):
        for mod, projs in PROJS.items():
            for proj in projs:
                d_in = 128 if proj == "down_proj" else D
                d_out = 128 if proj in ("gate_proj", "up_proj") else D
                for a in adapters:
                    base = f"{prefix}model.layers.{i}.{mod}.{proj}"
                    tag = f".{a}" if named else ""
                    s[f"{base}.lora_A{tag}.weight"] = torch.randn(rank, d_in, generator=g)
                    s[f"{base}.lora_B{tag}.weight"] = torch.randn(d_out, rank, generator=g)
    return s


def _mc_config(**over) -> dict:
    return _llama_config().to_dict() | {
        "model_type": "multimodal", "architectures": ["MultimodalLlamaForCausalLM"],
        "_name_or_path": "/path/to/vicuna-7b-v1.5", "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.05, "lora_name": "default", "local_prefix_tokens": 5,
        "local_suffix_tokens": 5, "layer_local_tokens": False, "seperate_layernorm": False,
        "merge_default_weights": None, "reset_scaling_weights": None, "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "use_cache": True,
    } | over  # fmt: skip


def _write_mc_audio_damc(path: Path) -> dict[str, torch.Tensor]:
    """modelcompose-audio-finetune-damc: lora_strategy modal+language, qformer_4N_2L, 5+5 tokens."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = _mc_config(
        lora_strategy="modal+language", mm_audio_encoder="model/beats/BEATs_iter3_plus_AS2M.pt",
        mm_audio_projector_type=f"qformer_{Q}N_2L", mm_audio_hidden_size=A_DIM,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(5)
    state = _lora_state(["default", "audio"], g) | _qformer_state(g)
    for part in ("prefix", "suffix"):
        for m in ("default", "audio"):
            state[f"{part}_tokens.{m}"] = torch.randn(1, 5, D, generator=g)
    torch.save(state, path / "adapter_model.bin")
    return state


def test_modelcompose_damc_audio_maps_everything_and_loads(tmp_path, llama):
    state = _write_mc_audio_damc(tmp_path / "mc")
    src = open_source(tmp_path / "mc")
    assert src.kind == "modelcompose" and src.base_model == "/path/to/vicuna-7b-v1.5"
    lora = src.config.lora
    assert lora.strategy == "decoupled" and set(lora.adapters) == {"text", "audio"}
    assert lora.adapters["audio"].rank == 4 and lora.adapters["audio"].scaling == 2.0
    assert lora.target_modules == tuple(p for ps in PROJS.values() for p in ps)
    tower = src.config.tower("audio")
    assert (tower.num_prefix, tower.num_suffix) == (5, 5)
    assert tower.projector.name == "blip2_qformer"
    assert (
        tower.projector.params["num_queries"] == Q and tower.projector.params["num_positions"] == 16
    )
    assert tower.encoder.name == "unavailable" and "BEATs" in tower.encoder.params["origin"]
    assert set(src.dropped) == {"prefix_tokens.default", "suffix_tokens.default"}
    _assert_values(src, {
        "language_model.model.layers.1.mlp.down_proj.lora.audio.lora_B":
            state["model.layers.1.mlp.down_proj.lora_B.audio.weight"],
        "language_model.model.layers.0.self_attn.q_proj.lora.text.lora_A":
            state["model.layers.0.self_attn.q_proj.lora_A.default.weight"],
        "towers.audio.prefix": state["prefix_tokens.audio"][0],
        "towers.audio.projector.qformer.encoder.layer.1.crossattention.attention.key.weight":
            state["model.modal_projectors.audio.audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"],
        "towers.audio.projector.qformer.layernorm.bias":
            state["model.modal_projectors.audio.audio_Qformer.bert.embeddings.LayerNorm.bias"],
    })  # fmt: skip
    # With the base LLM and a substitute audio encoder, the source is a complete model.
    enc = ModuleSpec(name="mel_conv", params={"width": A_DIM, "num_tokens": 8})
    weights = tmp_path / "audio_enc.safetensors"
    save_file(build_encoder(enc).state_dict(), str(weights))
    full = imp.open_modelcompose(tmp_path / "mc", base=llama[0], encoders={"audio": (enc, weights)})
    assert full.base_model == str(llama[0])
    model = MMComposeForCausalLM(full.config).eval()
    model.load_weights({k: full.get(k) for k in full})  # strict: every name and shape matches
    feats = torch.randn(1, 8, A_DIM)
    block = model.embed_modalities(modal_features={"audio": feats})["audio"]
    assert block.shape == (1, 5 + Q + 5, D)
    assert torch.equal(block[0, :5], state["prefix_tokens.audio"][0])


def test_modelcompose_naive_vision_and_peft_layout(tmp_path, llama):
    g = torch.Generator().manual_seed(6)
    proj = {f"model.modal_projectors.vision.{k}": torch.randn(*s, generator=g)
            for k, s in (("0.weight", (D, D_ENC)), ("0.bias", (D,)), ("2.weight", (D, D)), ("2.bias", (D,)))}  # fmt: skip
    vis = {"mm_vision_encoder": "model/clip-vit-large-patch14-336", "mm_vision_tower": "model/clip-vit-large-patch14-336",
           "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": D_ENC, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "use_mm_proj": True}  # fmt: skip
    # LocalLoRA 'same' (NaiveMC): only the text adapter, no prefix/suffix.
    same = tmp_path / "same"
    same.mkdir()
    (same / "config.json").write_text(
        json.dumps(_mc_config(lora_strategy="same", local_prefix_tokens=0, **vis))
    )
    torch.save(_lora_state(["default"], g) | proj, same / "adapter_model.bin")
    src = open_source(same)
    assert src.config.lora.strategy == "shared" and set(src.config.lora.adapters) == {"text"}
    assert src.config.tower("image").projector == ModuleSpec(name="mlp2x_gelu")
    assert src.config.tower("image").num_prefix == 0
    assert src.get("towers.image.projector.0.weight").equal(
        proj["model.modal_projectors.vision.0.weight"]
    )
    # peft layout: adapter names stripped by peft's save, projector in non_lora_trainables.bin.
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "config.json").write_text(json.dumps(_mc_config(**vis)))
    adapter = {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "peft_type": "LORA",
               "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (peft / "adapter_config.json").write_text(json.dumps(adapter))
    lora = _lora_state(["default"], g, prefix="base_model.model.", named=False)
    lora = {k: v for k, v in lora.items() if ".q_proj." in k or ".v_proj." in k}
    save_file(lora, str(peft / "adapter_model.safetensors"))
    torch.save(
        {"base_model.model." + k: v for k, v in proj.items()}, peft / "non_lora_trainables.bin"
    )
    src = open_source(peft)
    assert src.config.lora.target_modules == ("q_proj", "v_proj")
    assert src.config.lora.adapters["text"].alpha == 16
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert src.get("language_model.model.layers.1.self_attn.v_proj.lora.text.lora_B").equal(
        lora[key]
    )


def test_modelcompose_bad_inputs(tmp_path, llama):
    path = tmp_path / "mc"
    state = _write_mc_audio_damc(path)
    cfg = json.loads((path / "config.json").read_text())
    # unknown key
    torch.save(
        state | {"model.layers.0.self_attn.q_proj.magnitude": torch.zeros(3)},
        path / "adapter_model.bin",
    )
    with pytest.raises(CheckpointError, match=r"does not know.*magnitude"):
        open_source(path)
    # 'same' strategy cannot hold modality adapters
    torch.save(state, path / "adapter_model.bin")
    (path / "config.json").write_text(json.dumps(cfg | {"lora_strategy": "same"}))
    with pytest.raises(CheckpointError, match="'same' but modality adapters"):
        open_source(path)
    # unsupported projector type, then a missing projector
    (path / "config.json").write_text(json.dumps(cfg | {"mm_audio_projector_type": "identity"}))
    with pytest.raises(CheckpointError, match="unsupported projector type 'identity'"):
        open_source(path)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(
        {k: v for k, v in state.items() if "modal_projectors" not in k}, path / "adapter_model.bin"
    )
    with pytest.raises(CheckpointError, match="audio projector's weights are missing"):
        open_source(path)
    # a base LLM of another shape
    torch.save(state, path / "adapter_model.bin")
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, vocab_size=VOCAB)).save_pretrained(other)  # fmt: skip
    with pytest.raises(CheckpointError, match="hidden_size=32"):
        imp.open_modelcompose(path, base=other)
    # a corrupt pickle
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        open_source(path)


def test_importer_towers_resolve_by_name_without_compose() -> None:
    """A saved model naming the modules importers give towers loads with ``model`` alone:
    the registries find them in ``mmcompose.model`` and never import ``mmcompose.compose``."""
    code = (
        "import sys\n"
        "from mmcompose.model.encoders import ENCODERS\n"
        "from mmcompose.model.projectors import PROJECTORS\n"
        "found = [ENCODERS.get('clip_vision'), ENCODERS.get('unavailable'),"
        " PROJECTORS.get('blip2_qformer')[1]]\n"
        "print([f.__module__ for f in found])\n"
        "print(sorted(m for m in sys.modules if m.startswith('mmcompose.compose')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules, compose = proc.stdout.splitlines()
    assert modules == str(
        ["mmcompose.model.clip", "mmcompose.model.unavailable", "mmcompose.model.blip2_qformer"]
    )
    assert compose == "[]"
