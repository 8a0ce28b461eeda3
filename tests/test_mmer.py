"""MMER (composition: mmer): the mask rule, bit-packed masks, the planned tensors, the routed
forward against a dense per-token reference, mask isolation between modalities, inspect, and
every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from mmcompose.compose import run_from_yaml
from mmcompose.compose.executor import lora_delta
from mmcompose.compose.masks import tall_mask
from mmcompose.compose.methods import MERGE_METHODS
from mmcompose.errors import MergeError
from mmcompose.inspect import describe
from mmcompose.io import load_state_dict
from mmcompose.model.masked import (
    MaskedDeltaLinear,
    count_ones,
    masked_layers,
    pack_mask,
    packed_size,
    unpack_mask,
)
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.model.processor import MMProcessor
from mmcompose.model.splice import ROUTE_IDS
from mmcompose.testing import (
    assert_algebraically_equal,
    assert_float_close,
    build_tiny_model,
    compose_config,
    float64_model,
    float_tol,
    save_tiny_single,
    tiny_inputs,
    to_float64,
)

MODS = ("image", "audio", "point")
PROMPT = "image: <image>\naudio: <audio>\npoint: <point>\nwhat do they share?"
WEIGHTS = [0.5, 0.3, 0.2]
LAMBDA = 0.8
SCALING = 2.0  # tiny models: alpha = 2 * rank


def _yaml(folder: Path, name: str, cfg: dict) -> Path:
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _mmer_config(paths, **extra) -> dict:
    cfg = compose_config(paths, "ties", WEIGHTS[: len(paths)], composition="mmer",
                         parameters={"density": 0.6})  # fmt: skip
    return cfg | extra


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("mmer-src")
    return [save_tiny_single(d, m, "shared", 10 + k) for k, m in enumerate(MODS)]


@pytest.fixture(scope="module")
def composed(tmp_path_factory, shared) -> Path:
    d = tmp_path_factory.mktemp("mmer-out")
    out = d / "mmer"
    run_from_yaml(_yaml(d, "mmer", _mmer_config(shared, mmer={"mask_lambda": LAMBDA})), out,
                  progress=False)  # fmt: skip
    return out


def _np_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """A stored mask unpacked by numpy (independent of mmcompose's unpacking)."""
    n = math.prod(shape)
    bits = np.unpackbits(packed.numpy())[:n].reshape(shape)
    return torch.from_numpy(bits.astype(bool))


# ---------------------------------------------------------------- the rule and the bits


def test_mask_rule_on_known_tensors():
    tau = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, -3.0])
    merged = torch.tensor([1.5, 1.0, 0.0, -0.5, 0.0, -7.0])
    # |tau - merged| = [0.5, 2, 0.5, 2.5, 0, 4]
    want = {
        1.0: [True, False, True, False, True, False],
        0.4: [True, True, True, True, True, True],
        2.0: [True, False, False, False, True, False],
    }
    for lam, expected in want.items():
        assert tall_mask(tau, merged, lam).tolist() == expected, lam


def test_mask_rule_at_one_is_sign_agreement_within_twice():
    """On a dyadic grid (exact arithmetic) lambda = 1 keeps exactly the entries where tau*
    agrees in sign with tau and |tau*| <= 2 |tau|, or tau* = 0."""
    g = torch.Generator().manual_seed(0)
    tau = torch.randint(-16, 17, (4000,), generator=g).float() / 8
    merged = torch.randint(-16, 17, (4000,), generator=g).float() / 8
    agree = (torch.sign(tau) == torch.sign(merged)) & (merged.abs() <= 2 * tau.abs())
    assert torch.equal(tall_mask(tau, merged, 1.0), agree | (merged == 0))


@pytest.mark.parametrize("lam", [0.0, -0.5, float("nan"), float("inf")])
def test_mask_rule_refuses_out_of_range_lambda(lam):
    with pytest.raises(MergeError, match="mask_lambda"):
        tall_mask(torch.ones(3), torch.ones(3), lam)


@pytest.mark.parametrize("shape", [(1,), (8,), (7, 9), (3, 5, 2), (64, 128)])
def test_bit_packing_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.35
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(mask.numel())
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().ravel()))
    assert torch.equal(unpack_mask(packed, shape), mask)
    assert count_ones(packed) == int(mask.sum())


# ---------------------------------------------------------------- what is written


def test_mmer_writes_merged_weight_delta_and_masks(composed, shared):
    state, srcs = load_state_dict(composed), [load_state_dict(p) for p in shared]
    model = MMComposeForCausalLM.from_pretrained(composed)
    cfg = model.config
    assert cfg.lora is None and cfg.mmer is not None
    assert cfg.mmer.modalities == MODS and cfg.mmer.mask_lambda == LAMBDA
    assert model.modalities == list(MODS)
    merge = MERGE_METHODS.get("ties").bind([{"weight": w, "density": 0.6} for w in WEIGHTS])
    layers = list(masked_layers(model.language_model))
    assert len(layers) == 2 * 7  # every targeted linear of the 2-layer tiny Llama
    densities = {m: [] for m in MODS}
    for name, _ in layers:
        lin = f"language_model.{name}"
        taus = [lora_delta(s[f"{lin}.lora.text.lora_A"], s[f"{lin}.lora.text.lora_B"], SCALING)
                for s in srcs]  # fmt: skip
        merged = merge(taus)
        delta = state[f"{lin}.mmer.delta"]
        assert_float_close(delta, merged, n_terms=4, msg=lin)  # rank-4 products, float32
        w0 = srcs[0][f"{lin}.weight"].double()
        assert_float_close(state[f"{lin}.weight"], w0 + merged.double(), msg=lin)
        for m, tau in zip(MODS, taus, strict=True):
            got = _np_mask(state[f"{lin}.mmer.mask.{m}"], delta.shape)
            # Recomputed from the stored delta: equal wherever the rule is not within float32
            # rounding of its boundary.
            margin = tau.abs() - LAMBDA * (delta - tau).abs()
            clear = margin.abs() > float_tol(torch.float32, float(tau.abs().max()), n_terms=4)
            assert torch.equal(got[clear], tall_mask(tau, delta, LAMBDA)[clear]), (lin, m)
            densities[m].append(got.float().mean().item())
    for m, ds in densities.items():  # masks that keep some, not all, of the merged delta
        assert 0.05 < np.mean(ds) < 0.95, m
    norm = "language_model.model.norm.weight"
    assert torch.equal(state[norm], srcs[0][norm])  # carried from the common base


# ---------------------------------------------------------------- routing


def _reference_forward(self: MaskedDeltaLinear, x: torch.Tensor) -> torch.Tensor:
    """Every token through W0 + m * tau* of its own route (text: m = 1), computed for every
    route over every token and selected per token; masks unpacked by numpy."""
    routes = self.router.routes
    if routes is None:
        routes = torch.zeros(x.shape[:-1], dtype=torch.long)
    delta = self.mmer.delta
    w0 = self.weight - delta
    y = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype)
    for kind, rid in ROUTE_IDS.items():
        if kind in self.mmer.modalities:
            m = _np_mask(getattr(self.mmer.mask, kind), delta.shape).to(delta.dtype)
        else:  # text, and modalities without a mask, take the merged delta
            m = torch.ones_like(delta)
        select = (routes == rid).unsqueeze(-1).to(x.dtype)
        y = y + select * F.linear(x, w0 + m * delta, self.bias)
    return y


def _batch(out: Path, prompt: str = PROMPT, seed: int = 1) -> dict:
    proc = MMProcessor.from_pretrained(out)
    raw = tiny_inputs(seed)
    return to_float64(proc(prompt, {m: [raw[m]] for m in MODS if f"<{m}>" in prompt}))


def test_routed_forward_equals_masked_reference(composed, monkeypatch):
    model = float64_model(MMComposeForCausalLM.from_pretrained(composed))
    batch = _batch(composed)
    with torch.no_grad():
        out = model(**batch)
        routed = out.logits
        assert set(out.spliced.routes.unique().tolist()) == {0, *(ROUTE_IDS[m] for m in MODS)}
        monkeypatch.setattr(MaskedDeltaLinear, "forward", _reference_forward)
        reference = model(**batch).logits
        monkeypatch.undo()
        model.router.route_to_adapter = dict.fromkeys(model.router.route_to_adapter)
        merged_only = model(**batch).logits  # every token on W0 + tau*: no decoupling
    assert_algebraically_equal(routed, reference)  # a misrouted mask moves logits O(1e-3+)
    assert (routed - merged_only).abs().max() > 1e-3 * routed.abs().max()


def test_each_modality_sees_only_its_mask(composed):
    """Flip bits of the image mask: rows of every other token of a layer are bitwise
    unchanged, the image rows change; through the model (audio before image in the prompt),
    every position before the first image token is unchanged."""
    model = float64_model(MMComposeForCausalLM.from_pretrained(composed))
    _, layer = next(iter(masked_layers(model.language_model)))
    g = torch.Generator().manual_seed(3)
    routes = torch.tensor([[0, 1, 1, 2, 2, 4, 0, 1, 4, 2, 0, 0]])
    x = torch.randn(1, routes.shape[1], layer.in_features, generator=g, dtype=torch.float64)
    prompt = "audio: <audio> then image: <image> and point: <point>?"
    batch = _batch(composed, prompt)
    with torch.no_grad():
        with model.router.routing(routes):
            before = layer(x)
        full_before = model(**batch)
        for _, lay in masked_layers(model.language_model):
            packed = lay.mmer.mask.image
            flip = torch.randint(0, 256, packed.shape, generator=g, dtype=torch.uint8)
            packed.bitwise_xor_(flip)
        with model.router.routing(routes):
            after = layer(x)
        full_after = model(**batch)
    image = routes[0] == ROUTE_IDS["image"]
    assert torch.equal(after[0, ~image], before[0, ~image])
    assert (after[0, image] - before[0, image]).abs().max() > 1e-6
    sp_routes = full_before.spliced.routes[0]
    first_image = int((sp_routes == ROUTE_IDS["image"]).nonzero()[0])
    assert (sp_routes[:first_image] == ROUTE_IDS["audio"]).any()
    assert_algebraically_equal(full_after.logits[0, :first_image],
                               full_before.logits[0, :first_image])  # fmt: skip
    changed = (full_after.logits[0, first_image:] - full_before.logits[0, first_image:]).abs()
    assert changed.max() > 1e-6


def test_mmer_model_generates_and_roundtrips(composed, tmp_path):
    model = MMComposeForCausalLM.from_pretrained(composed)
    proc = MMProcessor.from_pretrained(composed)
    raw = tiny_inputs(0)
    batch = proc(PROMPT, {m: [raw[m]] for m in MODS})
    tokens = model.generate(**batch, max_new_tokens=3)
    assert tokens.shape == (1, 3)
    again = MMComposeForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "copy"))
    state, other = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)


# ---------------------------------------------------------------- inspect


def test_inspect_reports_mask_density_and_storage(composed, run):
    info = describe(composed)["mmer"]
    state = load_state_dict(composed)
    deltas = [k for k in state if k.endswith(".mmer.delta")]
    entries = sum(state[k].numel() for k in deltas)
    assert info["delta_params"] == entries and info["layers"] == len(deltas) == 14
    assert info["delta_bytes"] == 4 * entries  # float32
    assert info["mask_lambda"] == LAMBDA and info["merge_method"] == "ties"
    for row in info["masks"]:
        m = row["modality"]
        masks = [state[k.replace(".mmer.delta", f".mmer.mask.{m}")] for k in deltas]
        kept = sum(
            int(_np_mask(p, state[k].shape).sum()) for p, k in zip(masks, deltas, strict=True)
        )
        assert row["kept"] == kept and row["density"] == pytest.approx(kept / entries)
        assert (
            row["bytes"]
            == sum(p.numel() for p in masks)
            == sum(packed_size(state[k].numel()) for k in deltas)
        )
    assert [r["modality"] for r in info["masks"]] == list(MODS)
    r = run("inspect", str(composed))
    assert r.returncode == 0 and "MMER masks" in r.stdout
    assert f"{info['masks'][0]['density']:.1%}" in r.stdout


# ---------------------------------------------------------------- full fine-tunes


@pytest.fixture(scope="module")
def full_sources(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base tiny model and two full fine-tunes of its LLM, each with one tower."""
    d = tmp_path_factory.mktemp("mmer-full")
    base, proc = build_tiny_model((), strategy=None, seed=0)
    base.save_pretrained(d / "base", processor=proc)
    paths = []
    for k, m in enumerate(("image", "audio")):
        model, proc = build_tiny_model((m,), strategy=None, seed=0)
        g = torch.Generator().manual_seed(20 + k)
        with torch.no_grad():
            for p in model.language_model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(model.save_pretrained(d / f"full-{m}", processor=proc))
    return d / "base", paths


def test_mmer_over_full_fine_tunes_against_base(tmp_path, full_sources):
    base, paths = full_sources
    cfg = _mmer_config(paths, base_model=str(base))
    out = tmp_path / "out"
    run_from_yaml(_yaml(tmp_path, "full", cfg), out, progress=False)
    state = load_state_dict(out)
    b, srcs = load_state_dict(base), [load_state_dict(p) for p in paths]
    merge = MERGE_METHODS.get("ties").bind([{"weight": w, "density": 0.6} for w in WEIGHTS[:2]])
    lin = "language_model.model.layers.1.mlp.down_proj"
    taus = [s[f"{lin}.weight"] - b[f"{lin}.weight"] for s in srcs]
    merged = merge(taus)
    assert_float_close(state[f"{lin}.mmer.delta"], merged, n_terms=2)
    mask = _np_mask(state[f"{lin}.mmer.mask.audio"], merged.shape)
    assert 0 < mask.float().mean() < 1
    norm = "language_model.model.norm.weight"  # not a targeted linear: merged by the method
    expected = merge([s[norm] for s in srcs], b[norm])
    assert_float_close(state[norm], expected, n_terms=2)
    model = MMComposeForCausalLM.from_pretrained(out)
    assert model.config.mmer.modalities == ("image", "audio")


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A shared single-modality model fine-tuned from another base LLM (seed 1)."""
    d = tmp_path_factory.mktemp("mmer-other")
    model, proc = build_tiny_model(("video",), "shared", seed=1, adapter_seed=30)
    return model.save_pretrained(d / "shared-video", processor=proc)


@pytest.fixture(scope="module")
def decoupled(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("mmer-dec")
    return [save_tiny_single(d, m, "decoupled", 10 + k) for k, m in enumerate(MODS[:2])]


def _case(name, shared, decoupled, other_base, full_sources) -> tuple[dict, str]:
    two = shared[:2]
    cases = {
        "lambda-zero": (_mmer_config(two, mmer={"mask_lambda": 0}), "mmer.mask_lambda"),
        "lambda-negative": (_mmer_config(two, mmer={"mask_lambda": -0.5}), "mmer.mask_lambda"),
        "lambda-inf": (_mmer_config(two, mmer={"mask_lambda": float("inf")}), "mask_lambda"),
        "lambda-text": (_mmer_config(two, mmer={"mask_lambda": "high"}), "mask_lambda"),
        "unknown-key": (_mmer_config(two, mmer={"lambda": 0.5}), "unknown key 'mmer.lambda'"),
        "block-without-mmer": (
            _mmer_config(two, composition="naivemc", mmer={"mask_lambda": 0.5}),
            "composition: mmer",
        ),
        "decoupled": (_mmer_config(decoupled), "decoupled"),
        "no-common-base": (_mmer_config([shared[0], other_base]), "do not share one base"),
        "full-without-base": (_mmer_config(full_sources[1]), "base_model"),
        "hf-output": (_mmer_config(two, output_format="hf"), "output_format: hf"),
        "adapter-output": (_mmer_config(two, lora_output="adapter"), "lora_output"),
    }
    return cases[name]


@pytest.mark.parametrize(
    "case",
    ["lambda-zero", "lambda-negative", "lambda-inf", "lambda-text", "unknown-key",
     "block-without-mmer", "decoupled", "no-common-base", "full-without-base", "hf-output",
     "adapter-output"],
)  # fmt: skip
def test_bad_inputs_exit_2_and_write_nothing(
    case, tmp_path, run, shared, decoupled, other_base, full_sources
):
    cfg, match = _case(case, shared, decoupled, other_base, full_sources)
    out = tmp_path / "out"
    r = run("compose", str(_yaml(tmp_path, case, cfg)), "-o", str(out))
    assert r.returncode == 2, r.stdout + r.stderr
    assert match in " ".join((r.stdout + r.stderr).split())
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_composed_mmer_cannot_be_a_source(tmp_path, run, composed, shared):
    cfg = _mmer_config([composed, shared[0]])
    r = run("compose", str(_yaml(tmp_path, "again", cfg)), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "MMER composition cannot be a source" in r.stdout + r.stderr
