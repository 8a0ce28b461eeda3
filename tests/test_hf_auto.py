"""transformers' Auto classes on mmcompose folders (issue 17, part 1): after ``import
mmcompose``, AutoConfig / AutoModelForCausalLM / AutoProcessor load a saved model with no
trust_remote_code, and the loaded model is our own, so its logits and generated tokens are
those of our loader and of ``mmcompose generate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcompose  # noqa: F401  (registers with the Auto classes)
from mmcompose.errors import ConfigError
from mmcompose.model import MMComposeForCausalLM, MMProcessor
from mmcompose.model.generation import generate_from_folder
from mmcompose.model.hf_auto import MMComposeHFConfig
from mmcompose.testing import tiny_inputs

PROMPT = "image: <image> audio: <audio> what is it?"


def _auto(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    return (
        AutoConfig.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder),
        AutoProcessor.from_pretrained(folder),
    )


def test_auto_classes_load_our_model_with_our_loaders_outputs(tiny_model_dir: Path):
    config, model, processor = _auto(tiny_model_dir)
    assert isinstance(config, MMComposeHFConfig)
    assert config.to_mmconfig() == MMComposeForCausalLM.from_pretrained(tiny_model_dir).config
    assert isinstance(model, MMComposeForCausalLM) and isinstance(processor, MMProcessor)

    ours = MMComposeForCausalLM.from_pretrained(tiny_model_dir)
    raw = tiny_inputs(0)
    batch = processor(PROMPT, {"image": [raw["image"]], "audio": [raw["audio"]]})
    ref = MMProcessor.from_pretrained(tiny_model_dir)(
        PROMPT, {"image": [raw["image"]], "audio": [raw["audio"]]}
    )
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    with torch.no_grad():
        a = model(**batch).logits
        b = ours(**ref).logits
    assert torch.equal(a, b)  # same loader, same weights, same code: bit-identical
    assert model.generate(**batch, max_new_tokens=6).shape == (1, 6)


def test_generate_through_auto_classes_equals_mmcompose_generate(
    tiny_model_dir: Path, media_files: dict[str, Path]
):
    _, model, processor = _auto(tiny_model_dir)
    files = {"image": [str(media_files["image"])], "audio": [str(media_files["audio"])]}
    tok = processor.tokenizer
    out = model.generate(
        **processor(PROMPT, files),
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tokens = [t for t in out[0].tolist() if t != tok.pad_token_id]
    cli = generate_from_folder(tiny_model_dir, PROMPT, files, max_new_tokens=8)
    assert tokens == cli.tokens and len(tokens) > 0


def test_auto_model_dtype_and_refused_options(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert m.language_model.dtype == torch.bfloat16 and m.config.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="load_in_8bit"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, load_in_8bit=True)


def test_invalid_config_is_refused_by_mmconfig(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoConfig

    bad = tmp_path / "bad"
    bad.mkdir()
    text = (tiny_model_dir / "config.json").read_text()
    (bad / "config.json").write_text(text.replace('"towers"', '"towerz"'))
    with pytest.raises(ConfigError, match="towerz"):
        AutoConfig.from_pretrained(bad)


def test_import_mmcompose_registers_lazily_without_torch(tiny_model_dir: Path):
    """``import mmcompose`` imports neither torch nor transformers, and the Auto classes
    imported after it know the model type (a fresh interpreter, so the check can fail)."""
    code = (
        "import sys, mmcompose\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "from transformers import AutoModelForCausalLM, AutoProcessor\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
        f"p = AutoProcessor.from_pretrained({str(tiny_model_dir)!r})\n"
        "print(type(m).__name__, type(p).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "MMComposeForCausalLM", "MMProcessor"]
