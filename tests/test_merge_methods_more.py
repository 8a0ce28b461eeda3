"""The thirteen further mergekit methods (slerp ... ramplus_tl) against mergekit 0.1.5.

Whole tiny Llama (float32) and Qwen2 (bfloat16, merged in float32) models are merged from one
YAML by mmcompose and by mergekit's own ``mergekit-yaml`` (one subprocess for all), and every
tensor is compared. Tensor-level tests check the task-vector form (``base=None``, how LoRA
deltas are merged) against mergekit on ``base + tau``; then bad parameters and the methods
that refuse LoRA sources. DELLA draws random numbers: only one tensor is pruned (density 1
elsewhere draws nothing), so the draws do not depend on the order tensors are visited, and a
generator seeded like mergekit's ``--random-seed`` yields the same.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmcompose.compose import run_from_yaml
from mmcompose.compose.executor import compose, lora_delta
from mmcompose.compose.methods import MERGE_METHODS
from mmcompose.errors import ConfigError, MergeError
from mmcompose.io import load_state_dict
from mmcompose.testing import (
    assert_float_close,
    compose_config,
    eps,
    float_tol,
    save_tiny_base_llm,
    save_tiny_single,
    tiny_tokenizer,
)

mk = pytest.importorskip("mergekit.merge_methods")

FAMILIES = {"llama": torch.float32, "qwen2": torch.bfloat16}  # storage dtype
SEED = 7
PRUNED = "layers.1.mlp.up_proj"  # the one tensor DELLA prunes
NEW = ["arcee_fusion", "della", "della_linear", "karcher", "model_stock", "multislerp"]
NEW += ["nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "sce", "slerp"]


def _models(*specs: str | tuple[str, dict]) -> list[dict]:
    out = []
    for s in specs:
        name, params = (s, None) if isinstance(s, str) else s
        out.append({"model": name, **({"parameters": params} if params else {})})
    return out


def _pruned(value: float) -> list[dict]:
    return [{"filter": PRUNED, "value": value}, {"value": 1.0}]


# mergekit YAMLs, model names relative to a family's folder (made absolute when written).
CONFIGS: dict[str, dict] = {
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": _models("base", "ft1"),
        "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
    },
    "nuslerp": {  # no base: the weights themselves, each tensor one vector
        "merge_method": "nuslerp",
        "models": _models(("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.9})),
    },
    "nuslerp_rows": {  # task vectors, column by column
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": _models(("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.4})),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": _models(
            ("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.3}), ("ft3", {"weight": 0.8})
        ),
    },
    "karcher": {
        "merge_method": "karcher",
        "models": _models("ft1", "ft2", "ft3"),
        "parameters": {"max_iter": 20, "tol": 1e-7},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "base",
        "models": _models("base", "ft1"),
        "parameters": {"t": 0.01},  # the fine-tunes differ from the base by ~0.02
    },
    "della": {
        "merge_method": "della",
        "base_model": "base",
        "models": _models(
            ("ft1", {"weight": 0.6, "density": _pruned(0.5), "epsilon": 0.1}),
            ("ft2", {"weight": 0.4, "density": _pruned(0.7)}),
        ),
    },
    "della_linear": {
        "merge_method": "della_linear",
        "base_model": "base",
        "models": _models(
            ("ft1", {"weight": 0.6, "density": _pruned(0.4)}),
            ("ft2", {"weight": 0.5, "density": _pruned(0.6), "epsilon": 0.2}),
        ),
        "parameters": {"lambda": 0.9},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "base",
        "models": _models("ft1", "ft2", "ft3"),
        "parameters": {"select_topk": 0.4},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": _models("ft1", "ft2", "ft3"),
    },
    "model_stock_rows": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": _models("ft1", "ft2"),
        "parameters": {"filter_wise": True},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "base",
        "models": _models("base", "ft1"),
    },
    "ram": {  # |tau| > 0.015 for about half of the entries: unique and shared ones
        "merge_method": "ram",
        "base_model": "base",
        "models": _models("ft1", "ft2", "ft3"),
        "parameters": {"epsilon": 0.015},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": _models("ft1", "ft2", "ft3"),
        "parameters": {"epsilon": 0.015, "r": 0.5, "alpha": 0.3},
    },
    "passthrough": {
        "merge_method": "passthrough",
        "models": _models(("ft1", {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]})),
    },
}
CASES = [(f, c) for f in FAMILIES for c in CONFIGS]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory) -> dict[str, Path]:
    """Per family: a tiny base LLM and three full fine-tunes of it (noise of std 0.02)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("llms")
    tok = tiny_tokenizer()
    dirs = {}
    for family, dtype in FAMILIES.items():
        d = root / family
        base = AutoModelForCausalLM.from_pretrained(save_tiny_base_llm(d / "tmp", 0, family))
        for k, name in enumerate(["base", "ft1", "ft2", "ft3"]):
            m = copy.deepcopy(base)
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02 * (k > 0))
            m.to(dtype).save_pretrained(d / name)
            tok.save_pretrained(d / name)
        dirs[family] = d
    return dirs


def _absolute(cfg: dict, folder: Path, dtype: torch.dtype) -> dict:
    cfg = copy.deepcopy(cfg)
    for m in cfg["models"]:
        m["model"] = str(folder / m["model"])
    if "base_model" in cfg:
        cfg["base_model"] = str(folder / cfg["base_model"])
    cfg["dtype"] = "float32"
    if dtype != torch.float32:
        cfg["out_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def merges(llm_dirs, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """Every config merged by mergekit-yaml (one subprocess, run meanwhile) and by us."""
    d = tmp_path_factory.mktemp("merges")
    runs, args = {}, []
    for family, case in CASES:
        cfg = _absolute(CONFIGS[case], llm_dirs[family], FAMILIES[family])
        path = _write(d / f"{family}-{case}.yml", cfg)
        ours_cfg = _write(d / f"{family}-{case}-seeded.yml", cfg | {"seed": SEED})
        runs[family, case] = (ours_cfg, d / f"ours-{family}-{case}", d / f"mk-{family}-{case}")
        args += [str(path), str(runs[family, case][2])]
    script = (
        "import sys\nfrom mergekit.scripts.run_yaml import main\n"
        "for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        f"    main([cfg, out, '--random-seed', '{SEED}', '--quiet', '--no-write-model-card'],"
        " standalone_mode=False)\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=d,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for ours_cfg, ours, _ in runs.values():
            run_from_yaml(ours_cfg, ours, progress=False)
    finally:
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return {k: (ours, theirs) for k, (_, ours, theirs) in runs.items()}


def _assert_merged_close(ours: torch.Tensor, ref: torch.Tensor, mag: float, msg: str) -> None:
    """Two float32 computations of one merge: rounding of the longest reduction (norms, dot
    products, L1 norms and means over the whole tensor) at the values' size, plus, for a
    bfloat16 output, the two results rounding to neighbouring values (one output eps
    relative). A wrong weight, mask, angle or sign moves values by the task vectors' size
    (0.02 here), far above either."""
    assert ours.dtype == ref.dtype, msg
    atol = float_tol(torch.float32, mag, n_terms=ours.numel())
    rtol = 0.0 if ours.dtype == torch.float32 else eps(ours.dtype)
    torch.testing.assert_close(ours.float(), ref.float(), atol=atol, rtol=rtol, msg=msg)


@pytest.mark.parametrize(("family", "case"), CASES)
def test_whole_model_merge_matches_mergekit(merges, llm_dirs, family, case):
    ours_dir, mk_dir = merges[family, case]
    ours, theirs = load_state_dict(ours_dir), load_state_dict(mk_dir)
    assert set(theirs) - set(ours) <= {"lm_head.weight"}  # tied: mergekit may write it out
    assert set(ours) <= set(theirs)
    cfg = CONFIGS[case]
    used = {m["model"] for m in cfg["models"]} | {cfg.get("base_model", "ft1")}
    inputs = {n: load_state_dict(llm_dirs[family] / n) for n in sorted(used)}
    for name, t in ours.items():
        assert t.dtype == FAMILIES[family], name
        mag = max(float(s[name].abs().max()) for s in inputs.values())
        _assert_merged_close(t, theirs[name], mag, f"{family} {case} {name}")
    # The merge did something: the result is none of its inputs.
    for n, src in inputs.items():
        assert any(not torch.equal(t, src[k]) for k, t in ours.items()), f"{case} = {n}"


def test_registry_lists_every_mergekit_method():
    mergekit_names = {m.spec.name for m in mk.registered_methods()}
    assert mergekit_names <= set(MERGE_METHODS.names())
    assert set(NEW) <= mergekit_names


# ---------------------------------------------------------------- task vectors (LoRA deltas)

# The methods that see only task vectors: merging tau_i with base=None gives the merged task
# vector, which is how LoRA deltas dW_i are merged (the shared base is added afterwards).
TAU_CASES = [
    ("nuslerp", [0.3, 0.9], {}),
    ("nuslerp", [0.3, 0.9], {"nuslerp_flatten": False}),
    ("multislerp", [0.5, 0.3, 0.8], {}),
    ("nearswap", None, {"t": 0.05}),
    ("della", [0.5, 0.3, 1.2], {"density": [0.5, 0.6, 1.0]}),
    ("della_linear", [0.5, 0.3, 1.2], {"density": 0.4, "epsilon": 0.2}),
    ("sce", None, {"select_topk": 0.5}),
    ("model_stock", None, {}),
    ("model_stock", None, {"filter_wise": True}),
    ("ram", None, {"epsilon": 0.05}),
    ("ramplus_tl", None, {"epsilon": 0.05, "r": 0.4}),
]


def _inputs(shape, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)], base


@pytest.mark.parametrize(("name", "weights", "params"), TAU_CASES)
@pytest.mark.parametrize("shape", [(16, 12), (7,), (3, 4, 5)])
def test_task_vector_form_matches_mergekit_on_base_plus_tau(name, weights, params, shape):
    n = 1 if name == "nearswap" else 2 if name == "nuslerp" else 3
    xs, base = _inputs(shape, n)
    taus = [x - base for x in xs]  # what mergekit computes first, the same float32 op
    merged_tau = MERGE_METHODS.get(name).fn(
        taus, weights, None, generator=torch.Generator().manual_seed(3), **params
    )
    torch.manual_seed(3)
    per_model = {"weight": weights} if weights else {}
    ref = mk.merge_tensors([base, *xs], name, base_index=0, parameters=per_model | params)
    # base + merged tau against mergekit's base + its merged tau: one float32 addition
    # (nearswap: mergekit forms w * x + (1 - w) * base, a few roundings at the values' size)
    mag = max(float(t.abs().max()) for t in [*xs, base])
    assert_float_close(base + merged_tau, ref, n_terms=4, magnitude=mag)
    assert not torch.allclose(base + merged_tau, xs[0], atol=1e-3)


@pytest.mark.parametrize("name", NEW)
def test_float64_is_kept(name):
    xs, base = _inputs((6, 5), 3, torch.float64)
    fn = MERGE_METHODS.get(name).fn
    kwargs = {"t": 0.4} if name in ("slerp", "nearswap") else {}
    if name in ("slerp", "nearswap", "arcee_fusion", "passthrough"):
        xs = xs[:1]
    if name == "nuslerp":
        xs = xs[:2]
    with_base = None if name in ("karcher", "passthrough") else base.double()
    out = fn(xs, None, with_base, **kwargs)
    assert out.dtype == torch.float64 and out.shape == (6, 5)


# ---------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    ("name", "models", "params", "message"),
    [
        ("slerp", [{}], {}, "missing parameter 't'"),
        ("slerp", [{}], {"t": float("nan")}, "t = nan"),
        ("slerp", [{}, {}], {"t": 0.5}, "exactly 1 model besides the base, got 2"),
        ("slerp", [{"weight": 0.5}], {"t": 0.5}, "unknown parameter 'weight'"),
        ("nearswap", [{}], {}, "missing parameter 't'"),
        ("nuslerp", [{}, {}, {}], {}, "exactly 2 models besides the base, got 3"),
        ("nuslerp", [{}, {}], {"nuslerp_flatten": "sideways"}, "nuslerp_flatten"),
        ("multislerp", [{}], {"eps": -1.0}, "eps = -1.0"),
        ("karcher", [{}], {"max_iter": 2.5}, "max_iter = 2.5"),
        ("karcher", [{}], {"max_iter": -1}, "max_iter = -1"),
        ("karcher", [{"weight": 1.0}], {}, "unknown parameter 'weight'"),
        ("della", [{"density": 0.5, "epsilon": 0.5}], {}, r"density 0.5 \+- epsilon 0.5"),
        ("della", [{"density": 0.9}], {}, r"model 0: density 0.9 \+- epsilon 0.15"),
        ("della_linear", [{"density": 1.5}], {}, "density = 1.5"),
        ("della", [{}], {"gamma": 0.1}, "unknown parameter 'gamma'"),
        ("sce", [{}], {"select_topk": 0.0}, "select_topk = 0.0"),
        ("sce", [{}], {"select_topk": 1.5}, "select_topk = 1.5"),
        ("model_stock", [{}], {}, "at least 2 models besides the base, got 1"),
        ("arcee_fusion", [{}, {}], {}, "exactly 1 model besides the base, got 2"),
        ("arcee_fusion", [{}], {"t": 0.5}, "unknown parameter 't'"),
        ("ram", [{}], {"epsilon": -0.1}, "epsilon = -0.1"),
        ("ramplus_tl", [{}], {"alpha": -0.2}, "alpha = -0.2"),
        ("ramplus_tl", [{}], {"r": float("inf")}, "r = inf"),
        ("passthrough", [{}, {}], {}, "exactly 1 model, got 2"),
        ("passthrough", [{"scale": "big"}], {}, "scale = 'big'"),
    ],
)
def test_bind_rejects_what_mergekit_rejects(name, models, params, message):
    with pytest.raises(ConfigError, match=message):
        MERGE_METHODS.get(name).bind(models, params)


def test_della_epsilon_rule_is_mergekits():
    """mergekit raises where density +- epsilon leaves (0, 1); so do the bind and the call."""
    from mergekit.sparsify import della_magprune

    tau = torch.randn(4, 6)
    with pytest.raises(ValueError, match="Epsilon"):
        della_magprune(tau, density=0.5, epsilon=0.5)
    with pytest.raises(MergeError, match="leaves"):
        MERGE_METHODS.get("della").fn([tau], None, None, density=0.5, epsilon=0.5)
    MERGE_METHODS.get("della").bind([{"density": 0.5, "epsilon": -0.2}])  # allowed by both
    della_magprune(tau, density=0.5, epsilon=-0.2)


def test_functions_refuse_missing_bases_and_weights():
    xs, base = _inputs((5, 4), 2)
    with pytest.raises(MergeError, match="needs the base"):
        MERGE_METHODS.get("slerp").fn(xs[:1], None, None, t=0.5)
    with pytest.raises(MergeError, match="needs the base"):
        MERGE_METHODS.get("arcee_fusion").fn(xs[:1], None, None)
    with pytest.raises(MergeError, match="does not use a base"):
        MERGE_METHODS.get("karcher").fn(xs, None, base)
    with pytest.raises(MergeError, match="takes no weights"):
        MERGE_METHODS.get("sce").fn(xs, [0.5, 0.5], base)
    with pytest.raises(MergeError, match="sum to zero"):
        MERGE_METHODS.get("multislerp").fn(xs, [1.0, -1.0], base)


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("slerp", {"parameters": {}}, "missing parameter 't'"),
        ("della", {"parameters": {"epsilon": 0.6}}, r"\+- epsilon 0.6"),
        ("sce", {"parameters": {"select_topk": 2}}, "select_topk = 2"),
        ("karcher", {"base_model": "base"}, "karcher gives base_model no role"),
        ("model_stock", {"base_model": None}, "needs base_model"),
        ("nuslerp", {"parameters": {"t": 0.5}}, "unknown parameter 't'"),
    ],
)
def test_cli_exits_2_and_writes_nothing(run, llm_dirs, tmp_path, case, change, message):
    cfg = _absolute(CONFIGS[case], llm_dirs["llama"], torch.float32)
    for key, value in change.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = str(llm_dirs["llama"] / value) if key == "base_model" else value
    out = tmp_path / "out"
    r = run("compose", str(_write(tmp_path / "bad.yml", cfg)), "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert message.replace("\\", "") in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---------------------------------------------------------------- LoRA sources


@pytest.fixture(scope="module")
def lora_sources(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("lora")
    return [save_tiny_single(d, m, "shared", 10 + k) for k, m in enumerate(("image", "audio"))]


@pytest.mark.parametrize("name", ["slerp", "karcher", "arcee_fusion", "passthrough"])
def test_methods_needing_whole_weights_refuse_lora_sources(lora_sources, tmp_path, name):
    params = {"t": 0.5} if name == "slerp" else {}
    n = 2 if name == "karcher" else 1
    cfg = compose_config(lora_sources[:n], name, parameters=params)
    path = _write(tmp_path / "lora.yml", cfg)
    with pytest.raises(MergeError, match=f"{name} needs whole weights|{name} copies"):
        compose(path, tmp_path / "out", dry_run=True)


def test_lora_deltas_merged_as_mergekit_merges_the_full_weights(lora_sources, tmp_path):
    """sce over shared LoRA sources: W0 + sce(dW_1, dW_2) with the deltas as task vectors,
    which is mergekit's sce over the full weights W0 + dW_i with base W0 (a function of the
    task vectors alone)."""
    out = tmp_path / "sce"
    cfg = compose_config(lora_sources, "sce", parameters={"select_topk": 0.5})
    run_from_yaml(_write(tmp_path / "sce.yml", cfg), out, progress=False)
    composed, srcs = load_state_dict(out), [load_state_dict(p) for p in lora_sources]
    lins = sorted({k.split(".lora.")[0] for k in srcs[0] if ".lora.text." in k})
    assert lins
    for lin in lins:
        w0 = srcs[0][f"{lin}.weight"]
        deltas = [
            lora_delta(s[f"{lin}.lora.text.lora_A"], s[f"{lin}.lora.text.lora_B"], 2.0)
            for s in srcs
        ]
        # mergekit on the task vectors dW_i (a zero base): its sce of W0 + dW_i with base W0,
        # up to the rounding of (W0 + dW) - W0 (test_task_vector_form_... checks that part)
        zero = torch.zeros_like(w0)
        ref = w0 + mk.merge_tensors(
            [zero, *deltas], "sce", base_index=0, parameters={"select_topk": 0.5}
        )
        # rounding of the merge's means over the tensor, at the weights' size
        mag = max(float(t.abs().max()) for t in [w0, *deltas])
        assert_float_close(
            composed[f"{lin}.weight"], ref, n_terms=w0.numel(), magnitude=mag, msg=lin
        )
        assert not torch.equal(composed[f"{lin}.weight"], w0)
