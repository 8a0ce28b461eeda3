# ruff: noqa: F811  (the `setup` fixture is imported from test_train and used by name)
"""Closed-form projector init (train.anchor), the pooled projector, the processor's system
prompt, and starting a run from another run's tower (init_from)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mmcompose.errors import ConfigError
from mmcompose.model import MMComposeForCausalLM, MMProcessor, ModuleSpec
from mmcompose.model.projectors import build_projector
from mmcompose.testing import (
    assert_algebraically_equal,
    assert_float_close,
    float_tol,
    tiny_tokenizer,
)
from mmcompose.train.anchor import answer_targets, fit_output_layer, last_linear
from mmcompose.train.trainer import TrainConfig, train
from test_train import setup  # noqa: F401  (the tiny image dataset and base LLM fixture)


def test_answer_targets_lay_out_the_word_then_padding():
    emb = torch.arange(20.0).view(10, 2)
    pad = torch.tensor([-1.0, -1.0])
    t = answer_targets(emb, [[3], [4, 5, 6, 7, 8]], 3, pad)
    assert t.shape == (2, 3, 2)
    assert torch.equal(t[0], torch.stack([emb[3], pad, pad]))
    assert torch.equal(t[1], emb[[4, 5, 6]])  # cut at n_out
    with pytest.raises(ValueError):
        answer_targets(emb, [[]], 3, pad)


@pytest.mark.parametrize("hidden", [None, 16])
def test_pooled_projector_shapes(hidden):
    proj = build_projector(
        ModuleSpec(name="pooled", params={"num_tokens": 3, "hidden": hidden}), 8, 5
    )
    out = proj(torch.randn(2, 7, 8))
    assert out.shape == (2, 3, 5)
    # Mean pooling: token order does not matter (algebraic: compared in float64).
    proj.double()
    x = torch.randn(1, 7, 8).double()
    assert_algebraically_equal(proj(x[:, torch.randperm(7)]), proj(x))


def test_fit_recovers_a_linear_map_exactly():
    """Targets that are an exact affine function of the (pooled, normalised) input are fitted
    to float precision with a tiny ridge; a large ridge shrinks towards the mean."""
    torch.manual_seed(0)
    proj = build_projector(ModuleSpec(name="pooled", params={"num_tokens": 2}), 6, 4)
    feats = torch.randn(64, 5, 6)
    with torch.no_grad():
        h = proj.norm(feats).mean(1)
        w, b = torch.randn(6, 8), torch.randn(8)
        y = (h @ w + b).view(64, 2, 4)
    for p in proj.parameters():
        torch.nn.init.zeros_(p)
    residual = fit_output_layer(proj, feats, y, ridge=1e-9)
    # Solved in float64; what remains is float32 rounding of the weights and of a 6-term
    # forward (relative), while a wrong fit (bias, ridge, layout) leaves >= 1e-2.
    assert residual < float_tol(torch.float32, 1.0, n_terms=6)
    with torch.no_grad():
        assert_float_close(proj(feats), y, n_terms=6)  # same, absolute at the targets' size
    assert fit_output_layer(proj, feats, y, ridge=100.0) > 0.5
    assert last_linear(proj) is proj.mlp[-1]


def test_system_prompt_renders_and_round_trips(tmp_path):
    tok = tiny_tokenizer()
    proc = MMProcessor(tok, {"image": ModuleSpec(name="patch_embed")}, system_prompt="Be brief.")
    text = proc.format_prompt("<image>\nWhat?")
    assert "Be brief." in text
    proc.save_pretrained(tmp_path)
    again = MMProcessor.from_pretrained(tmp_path)
    assert again.system_prompt == "Be brief." and again.format_prompt("<image>\nWhat?") == text
    # An explicit system turn wins over the default.
    msgs = [{"role": "system", "content": "Other."}, {"role": "user", "content": "hi"}]
    assert "Be brief." not in proc.render_chat(msgs, add_generation_prompt=True)


def _tiny_cfg(setup: dict, **over) -> TrainConfig:
    raw = yaml.safe_load(setup["config"].read_text())
    raw["tower"]["projector"] = {"name": "pooled", "params": {"num_tokens": 2}}
    raw.update(over)
    return TrainConfig.model_validate(raw)


def test_lstsq_init_fits_answers_and_init_from_copies_the_tower(setup, tmp_path):
    cfg = _tiny_cfg(
        setup,
        projector_init="lstsq",
        system_prompt="",
        stage1={"epochs": 0},
        stage2={"epochs": 0},
    )
    out = tmp_path / "init"
    train(cfg, out, config_dir=setup["dir"], progress=False)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["stage"] == 0 and log[0]["projector_init"] == "lstsq"
    assert log[0]["relative_residual"] < 1.0
    model = MMComposeForCausalLM.from_pretrained(out)
    proc = MMProcessor.from_pretrained(out)
    assert proc.system_prompt == ""
    tower = model.towers["image"]
    nl = proc.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    emb = model.language_model.get_input_embeddings().weight
    assert torch.equal(tower.prefix, emb[nl].expand_as(tower.prefix))  # copied: exact
    # The fitted block is closer to the answers' embeddings than a random projector's.
    base = MMComposeForCausalLM.from_base_llm(setup["dir"] / "llm", [cfg.tower])
    from mmcompose.train.features import FeatureCache

    fc = FeatureCache(setup["dir"] / "cache", tower, proc)
    rows = json.loads((setup["dir"] / "data.json").read_text())
    paths = [r["modal_inputs"]["image"][0] for r in rows]
    fc.build(paths, progress=False)
    feats = fc.get(paths)
    words = [
        proc.tokenizer(r["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
        for r in rows
    ]
    target = answer_targets(emb.detach(), words, 2, emb[nl].detach())
    with torch.no_grad():
        fitted = (tower.projector(feats) - target).norm()
        random_ = (base.towers["image"].projector(feats) - target).norm()
    assert fitted < 0.8 * random_

    # init_from: the next run starts from this tower (and skips the fit).
    cfg2 = _tiny_cfg(setup, init_from=str(out), stage1={"epochs": 0}, stage2={"epochs": 0})
    out2 = tmp_path / "from"
    train(cfg2, out2, config_dir=setup["dir"], progress=False)
    a = MMComposeForCausalLM.from_pretrained(out2).state_dict()
    b = model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith("towers.image.projector"))

    bad = _tiny_cfg(setup, init_from=str(setup["dir"] / "llm"), stage1={"epochs": 0})
    with pytest.raises(ConfigError, match="no image tower"):
        train(bad, tmp_path / "bad", config_dir=setup["dir"], progress=False)
