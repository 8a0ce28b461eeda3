"""End-to-end composition on tiny models: text-only merges against mergekit, NaiveMC and DAMC
compositions of single-modality models, every bad input, interruption and dry runs."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmcompose.compose import executor as ex
from mmcompose.compose import run_from_yaml
from mmcompose.compose.methods import MERGE_METHODS
from mmcompose.errors import CheckpointError, ConfigError, MergeError, UnknownNameError
from mmcompose.fs import OutputExistsError
from mmcompose.io import load_state_dict
from mmcompose.model.lora import LoRALinear, lora_layers
from mmcompose.model.modeling import MMComposeForCausalLM
from mmcompose.model.processor import MMProcessor
from mmcompose.model.splice import ROUTE_IDS
from mmcompose.testing import (
    assert_algebraically_equal,
    assert_float_close,
    build_tiny_model,
    compose_config,
    float64_model,
    save_tiny_single,
    tiny_inputs,
    to_float64,
)

MODS = ("image", "audio", "point")
PROMPT = "image: <image>\naudio: <audio>\npoint: <point>\nwhat do they share?"
F64 = torch.float64


def _yaml(folder: Path, name: str, cfg: dict) -> Path:
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _leaves_nothing(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------- (1) text-only vs mergekit


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    """A base tiny Llama and two full fine-tunes of it, as plain Hugging Face folders."""
    d = tmp_path_factory.mktemp("llms")
    model, proc = build_tiny_model(modalities=(), strategy=None, seed=0)
    llm = model.language_model
    for k, name in enumerate(["base", "ft1", "ft2"]):
        m = copy.deepcopy(llm)
        if k:
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        m.save_pretrained(d / name)
        proc.tokenizer.save_pretrained(d / name)
    return d


DARE_FILTER = "layers.1.mlp.up_proj"
TEXT_CONFIGS = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "ft1", "parameters": {"weight": 0.7}},
            {"model": "ft2", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "base"},
            {"model": "ft1", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "ft2", "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    # Only one tensor is sparsified (density 1 draws nothing), so the random draws do not
    # depend on the order in which mergekit visits tensors.
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {
                "model": "ft1",
                "parameters": {
                    "weight": 0.6,
                    "density": [{"filter": DARE_FILTER, "value": 0.5}, {"value": 1.0}],
                },
            },
            {
                "model": "ft2",
                "parameters": {
                    "weight": 0.4,
                    "density": [{"filter": DARE_FILTER, "value": 0.3}, {"value": 1.0}],
                },
            },
        ],
        "dtype": "float32",
    },
}
SEED = 7


@pytest.fixture(scope="module")
def text_merges(llm_dir) -> dict[str, tuple[Path, Path]]:
    """Each config merged by us and by mergekit-yaml (one subprocess for all three)."""
    runs = {}
    for name, cfg in TEXT_CONFIGS.items():
        path = _yaml(llm_dir, name, cfg)
        ours = llm_dir / f"ours-{name}"
        ours_cfg = _yaml(llm_dir, f"{name}-seeded", cfg | {"seed": SEED})
        run_from_yaml(ours_cfg, ours, progress=False)
        runs[name] = (path, ours, llm_dir / f"mk-{name}")
    script = (
        "import sys\nfrom mergekit.scripts.run_yaml import main\n"
        "for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        f"    main([cfg, out, '--random-seed', '{SEED}', '--quiet', '--no-write-model-card'],"
        " standalone_mode=False)\n"
    )
    args = [str(a) for p, _, mk in runs.values() for a in (p, mk)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=llm_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: (ours, mk) for k, (_, ours, mk) in runs.items()}


@pytest.mark.parametrize("method", list(TEXT_CONFIGS))
def test_text_only_merge_matches_mergekit(text_merges, llm_dir, method):
    ours_dir, mk_dir = text_merges[method]
    ours, theirs = load_state_dict(ours_dir), load_state_dict(mk_dir)
    assert set(theirs) - set(ours) <= {"lm_head.weight"}  # tied: mergekit may write it out
    assert set(ours) <= set(theirs)
    inputs = [load_state_dict(llm_dir / n) for n in ("base", "ft1", "ft2")]
    for name, t in ours.items():
        # Two float32 implementations of one formula: rounding of a few ops on <= 3 models'
        # values, scaled by the largest input; a wrong weight or mask moves values by >= 1e-3.
        mag = max(float(s[name].abs().max()) for s in inputs if name in s)
        assert_float_close(t, theirs[name], n_terms=len(inputs), magnitude=mag, msg=name)
    # A plain Hugging Face folder comes out, with the tokenizer and a report.
    cfg = json.loads((ours_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (ours_dir / "tokenizer.json").is_file()
    rep = json.loads((ours_dir / ex.REPORT_NAME).read_text())
    assert rep["counts"]["merged"] == len(ours) and rep["merge_method"] == method
    # The merge did something: the result is neither input.
    ft1 = load_state_dict(llm_dir / "ft1")
    name = f"model.{DARE_FILTER}.weight"
    assert not torch.equal(ours[name], ft1[name])


# ---------------------------------------------------------------- (2) NaiveMC


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, list[Path]]:
    d = tmp_path_factory.mktemp("single")
    return {
        s: [save_tiny_single(d, m, s, 10 + k) for k, m in enumerate(MODS)]
        for s in ("shared", "decoupled")
    }


def _config(paths, method="linear", weights=None, **extra) -> dict:
    return compose_config(paths, method, weights, **extra)


def _dense(
    state, lin: str, adapter: str, scaling: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    a = state[f"{lin}.lora.{adapter}.lora_A"].to(dtype)
    b = state[f"{lin}.lora.{adapter}.lora_B"].to(dtype)
    return (b @ a) * scaling


def _generate(out: Path) -> torch.Tensor:
    model = MMComposeForCausalLM.from_pretrained(out)
    proc = MMProcessor.from_pretrained(out)
    raw = tiny_inputs(0)
    batch = proc(PROMPT, {m: [raw[m]] for m in MODS})
    return model.generate(**batch, max_new_tokens=3)


def test_naivemc_folds_weighted_deltas_and_keeps_towers(tmp_path, sources):
    paths, weights = sources["shared"], [0.5, 0.3, 0.2]
    out = tmp_path / "naivemc"
    cfg = _yaml(tmp_path, "naivemc", _config(paths, weights=weights))
    result = run_from_yaml(cfg, out, progress=False)
    assert "merged" in result.summary() and result.written

    composed = load_state_dict(out)
    srcs = [load_state_dict(p) for p in paths]
    model = MMComposeForCausalLM.from_pretrained(out)
    assert model.modalities == list(MODS) and model.config.lora is None
    for m, src in zip(MODS, srcs, strict=True):
        tower = {k: v for k, v in src.items() if k.startswith(f"towers.{m}.")}
        assert tower and all(torch.equal(composed[k], v) for k, v in tower.items())
    scaling = 8 / 4  # tiny models: alpha = 2 * rank
    lins = {k.split(".lora.")[0] for k in srcs[0] if ".lora." in k}
    for lin in lins:
        expected = srcs[0][f"{lin}.weight"].double() + sum(
            w * _dense(s, lin, "text", scaling, torch.float64)
            for w, s in zip(weights, srcs, strict=True)
        )
        # float64 reference; ours rounds in float32 over rank 4 x 3 sources product terms
        n = 4 * len(srcs)
        assert_float_close(composed[f"{lin}.weight"], expected, n_terms=n, msg=lin)
    norm = "language_model.model.norm.weight"
    assert torch.equal(composed[norm], srcs[0][norm])
    assert _generate(out).shape == (1, 3)


# ---------------------------------------------------------------- (3) DAMC


def _masked_forward(deltas):
    """LoRALinear.forward from dense deltas per route, computed for every token and masked."""

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        routes = self.router.routes
        if routes is None:
            routes = torch.zeros(x.shape[:-1], dtype=torch.long)
        for rid, delta in deltas[id(self)].items():
            mask = (routes == rid).unsqueeze(-1).to(x.dtype)
            y = y + mask * F.linear(x, delta)
        return y

    return forward


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_damc_merges_text_adapter_and_routes_modalities(tmp_path, sources, method, monkeypatch):
    paths, weights = sources["decoupled"], [0.6, 0.9, 0.4]
    out = tmp_path / f"damc-{method}"
    extra = {"parameters": {"density": 0.6}} if method == "ties" else {}
    run_from_yaml(_yaml(tmp_path, method, _config(paths, method, weights, **extra)), out,
                  progress=False)  # fmt: skip

    composed, srcs = load_state_dict(out), [load_state_dict(p) for p in paths]
    model = MMComposeForCausalLM.from_pretrained(out)
    assert model.config.lora.strategy == "decoupled"
    assert set(model.config.lora.adapters) == {"text", *MODS}
    text_scaling = model.config.lora.adapters["text"].scaling
    merge = MERGE_METHODS.get(method).bind(
        [{"weight": w} | ({"density": 0.6} if method == "ties" else {}) for w in weights]
    )
    deltas: dict[int, dict[int, torch.Tensor]] = {}
    for name, layer in lora_layers(model.language_model):
        lin = f"language_model.{name}"
        per_source = [_dense(s, lin, "text", 2.0) for s in srcs]
        expected = merge(per_source)
        if method == "task_arithmetic":  # exactly sum_i w_i dW_i
            sum_ = sum(w * d for w, d in zip(weights, per_source, strict=True))
            assert_float_close(expected, sum_, n_terms=len(weights))  # float32 sum of 3 terms
        got = _dense(composed, lin, "text", text_scaling)
        # float32 rounding of B @ A over the stored rank (concatenated factors: 3 x 4)
        assert_float_close(got, expected, n_terms=composed[f"{lin}.lora.text.lora_A"].shape[0])
        # The routing reference below runs in float64 on the composed model's own factors
        # (their agreement with the merge is the check just above).
        deltas[id(layer)] = {ROUTE_IDS["text"]: _dense(composed, lin, "text", text_scaling, F64)}
        for m, s in zip(MODS, srcs, strict=True):
            for f in ("A", "B"):
                key = f"{lin}.lora.{m}.lora_{f}"
                assert torch.equal(composed[key], s[key])
            deltas[id(layer)][ROUTE_IDS[m]] = _dense(s, lin, m, 2.0, F64)

    proc = MMProcessor.from_pretrained(out)
    raw = tiny_inputs(1)
    float64_model(model)  # routing vs masking is algebraic: compare in float64
    batch = to_float64(proc(PROMPT, {m: [raw[m]] for m in MODS}))
    with torch.no_grad():
        routed = model(**batch, padding_side="left").logits
        monkeypatch.setattr(LoRALinear, "forward", _masked_forward(deltas))
        reference = model(**batch, padding_side="left").logits
    assert_algebraically_equal(routed, reference)  # a misrouted adapter moves logits O(1)


def test_apply_text_merge_resets_lambdas_in_memory(tmp_path, sources):
    paths = sources["decoupled"]
    out = tmp_path / "damc-lin"
    run_from_yaml(_yaml(tmp_path, "lin", _config(paths, "task_arithmetic", [1.0, 1.0, 1.0])),
                  out, progress=False)  # fmt: skip
    model = MMComposeForCausalLM.from_pretrained(out)
    weights = [0.2, 0.5, 0.3]
    from mmcompose.compose.sources import open_source

    ex.apply_text_merge(model, [open_source(p) for p in paths], weights)
    srcs = [load_state_dict(p) for p in paths]
    for name, layer in lora_layers(model.language_model):
        lin = f"language_model.{name}"
        expected = sum(w * _dense(s, lin, "text", 2.0) for w, s in zip(weights, srcs, strict=True))
        # float32 rounding of B @ A over the concatenated rank (3 sources x rank 4)
        assert_float_close(layer.lora["text"].delta_weight(), expected, n_terms=3 * 4)


# ---------------------------------------------------------------- (4) bad inputs


def _expect(tmp_path, cfg: dict, error, match: str, **kw) -> None:
    out = tmp_path / "out"
    path = _yaml(tmp_path, "bad", cfg)
    with pytest.raises(error, match=match):
        run_from_yaml(path, out, progress=False, **kw)
    _leaves_nothing(out)


def _broken_copy(tmp_path: Path, src: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_missing_and_truncated_weights(tmp_path, llm_dir):
    missing = _broken_copy(tmp_path, llm_dir / "ft2", "missing")
    (missing / "model.safetensors").unlink()
    _expect(tmp_path, _config([llm_dir / "ft1", missing]), CheckpointError, "holds no")
    trunc = _broken_copy(tmp_path, llm_dir / "ft2", "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect(tmp_path, _config([llm_dir / "ft1", trunc]), CheckpointError, "truncated|cannot read")


def _save_variant(tmp_path: Path, name: str, edit) -> Path:
    model, proc = build_tiny_model(modalities=(), strategy=None, seed=0)
    llm = edit(model.language_model)
    llm.save_pretrained(tmp_path / name)
    proc.tokenizer.save_pretrained(tmp_path / name)
    return tmp_path / name


def _with_nan(llm):
    with torch.no_grad():
        llm.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    return llm


def test_shape_dtype_and_nonfinite_inputs(tmp_path, llm_dir):
    bf16 = _save_variant(tmp_path, "bf16", lambda m: m.to(torch.bfloat16))
    _expect(tmp_path, _config([llm_dir / "ft1", bf16]), MergeError, "differs in dtype")
    # With an explicit compute dtype the inputs are cast, as in mergekit.
    ok = run_from_yaml(
        _yaml(tmp_path, "cast", _config([llm_dir / "ft1", bf16], dtype="float32")),
        tmp_path / "cast-out",
        progress=False,
    )
    assert ok.written

    def wider(llm):
        from mmcompose.testing import tiny_text_config

        cfg = tiny_text_config(llm.config.vocab_size) | {"intermediate_size": 160}
        from mmcompose.model.modeling import build_llm

        return build_llm(cfg)

    _expect(tmp_path, _config([llm_dir / "ft1", _save_variant(tmp_path, "wide", wider)]),
            MergeError, "differs in shape")  # fmt: skip

    nan = _save_variant(tmp_path, "nan", _with_nan)
    _expect(tmp_path, _config([llm_dir / "ft1", nan]), MergeError, "NaN or Inf")
    out = tmp_path / "nan-out"
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        res = run_from_yaml(_yaml(tmp_path, "nan", _config([llm_dir / "ft1", nan])), out,
                            allow_nonfinite=True, progress=False)  # fmt: skip
    assert res.written and res.warnings


def test_bad_configs(tmp_path, llm_dir, sources):
    two = [llm_dir / "ft1", llm_dir / "ft2"]
    dec, shared = sources["decoupled"], sources["shared"]
    bad_density = _config(two, "ties", base_model=str(llm_dir / "base"))
    bad_density["parameters"] = {"density": 1.5}
    _expect(tmp_path, bad_density, ConfigError, "density")
    bad_density["parameters"] = {"density": 0.0}
    _expect(tmp_path, bad_density, ConfigError, "density")
    _expect(tmp_path, _config(two, "frobnicate"), UnknownNameError, "unknown merge method")
    _expect(tmp_path, _config(two) | {"surprise": 1}, ConfigError, "unknown key 'surprise'")
    _expect(tmp_path, _config(dec, weights=[0.5, 0.5, None]), ConfigError, "some models only")
    _expect(tmp_path, _config(dec), MergeError, "missing lambda|no weight")
    mixed = _config([dec[0], shared[1]], weights=[0.5, 0.5], composition="damc")
    _expect(tmp_path, mixed, MergeError, "decoupled")
    _expect(tmp_path, _config([dec[0], shared[1]], weights=[0.5, 0.5]), MergeError, "mix")
    _expect(tmp_path, _config(two, "ties"), MergeError, "needs base_model")
    (tmp_path / "notyaml.yml").write_text("merge_method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        run_from_yaml(tmp_path / "notyaml.yml", tmp_path / "out")


def test_duplicate_tower_is_refused_unless_resolved(tmp_path, sources):
    a = sources["shared"][0]
    b = save_tiny_single(tmp_path, "image", "shared", adapter_seed=99)
    _expect(tmp_path, _config([a, b]), MergeError, "image tower .* in 2 sources")
    res = run_from_yaml(
        _yaml(tmp_path, "pick", _config([a, b], towers={"image": {"source": str(b)}})),
        tmp_path / "picked",
        progress=False,
    )
    composed, chosen = load_state_dict(tmp_path / "picked"), load_state_dict(b)
    key = next(k for k in chosen if k.startswith("towers.image.projector"))
    assert torch.equal(composed[key], chosen[key])
    assert any(d.reason.startswith("image tower") for d in res.plan.dropped)


def test_existing_output_needs_force(tmp_path, llm_dir):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    cfg = _yaml(tmp_path, "lin", _config([llm_dir / "ft1", llm_dir / "ft2"]))
    with pytest.raises(OutputExistsError):
        run_from_yaml(cfg, out, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    run_from_yaml(cfg, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------- (5) interruption, (6) dry run


def test_interrupted_merge_leaves_nothing(tmp_path, sources, monkeypatch):
    cfg = _config(sources["decoupled"], "task_arithmetic", [0.3, 0.3, 0.4],
                  max_shard_size="100KB")  # fmt: skip
    real, calls = ex._write_shard, []

    def interrupt_after_first(path, tensors, metadata):
        calls.append(path.name)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real(path, tensors, metadata)

    monkeypatch.setattr(ex, "_write_shard", interrupt_after_first)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_from_yaml(_yaml(tmp_path, "int", cfg), out, progress=False)
    assert len(calls) == 2 and calls[0].startswith("model-00001-of-")
    _leaves_nothing(out)


def test_dry_run_writes_nothing_and_summarises(tmp_path, sources):
    out = tmp_path / "dry"
    cfg = _yaml(tmp_path, "dry", _config(sources["decoupled"], weights=[0.3, 0.3, 0.4]))
    res = run_from_yaml(cfg, out, dry_run=True)
    _leaves_nothing(out)
    assert sorted(tmp_path.iterdir()) == [cfg]
    text = res.summary()
    assert "dry run" in text and "image, audio, point" in text and "damc" in text
    counts = res.plan.counts()
    assert counts["merged"] > 0 and counts["carried"] > 0
