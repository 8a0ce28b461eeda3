"""Merge methods against mergekit 0.1.5 (default semantics) and peft.utils.merge_utils.

mergekit computes task-vector merges in the inputs' dtype; ours always computes in float32,
so mergekit is called with ``dtype=float32, out_dtype=<input dtype>`` to compare like with
like. Random masks are compared exactly: both libraries draw ``torch.bernoulli`` on a float32
tensor from torch's global RNG, one model after another, skipping models with density 1, and a
``torch.Generator`` seeded like the global RNG yields the same draws.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from mmcompose.compose.methods import MERGE_METHODS, task_vector_merge
from mmcompose.errors import ConfigError, MergeError, UnknownNameError

mk = pytest.importorskip("mergekit.merge_methods")
mk_gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
mk_sparsify = pytest.importorskip("mergekit.sparsify")

SHAPES = [(7,), (16, 12), (3, 4, 5)]
DTYPES = [torch.float32, torch.bfloat16]
WEIGHTS = [None, [0.5, 0.3, 1.2], [1.0, -0.7, 0.4]]


def _inputs(shape, dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    return [t.to(dtype) for t in tensors], base.to(dtype)


def _ours(name, tensors, weights, base, params, generator=None):
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
    return MERGE_METHODS.get(name).fn(tensors, weights, base, generator=generator, **kwargs)


def _mergekit(method, tensors, weights, base, params):
    """mergekit's result for our call: base None means the inputs are task vectors."""
    n = len(tensors)
    base = torch.zeros_like(tensors[0]) if base is None else base
    weight = [1.0 / n] * n if weights is None else weights
    return mk.merge_tensors(
        [base, *tensors],
        method,
        base_index=0,
        parameters={"weight": weight, **params},
        dtype=torch.float32,
        out_dtype=tensors[0].dtype,
    )


# ---------------------------------------------------------------- mergekit


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(shape, dtype, normalize):
    tensors, _ = _inputs(shape, dtype)
    for weights in WEIGHTS:
        ours = MERGE_METHODS.get("linear").fn(tensors, weights, normalize=normalize)
        weight = [1 / 3] * 3 if weights is None else weights
        params = {"weight": weight, "normalize": normalize}
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, mk.merge_tensors(tensors, "linear", parameters=params))


GTA_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": [0.2, 0.5, 0.9], "normalize": False, "rescale": True}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs", {"density": [0.9, 0.3, 0.6], "gamma": [0.2, 0.0, 0.05], "rescale": True}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1, "normalize": True, "lambda": 1.5}),
]


@pytest.mark.parametrize(("name", "params"), GTA_CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
def test_task_vector_methods_match_mergekit(name, params, shape, dtype, with_base):
    tensors, base = _inputs(shape, dtype)
    if not with_base:  # the inputs are task vectors
        tensors = [t - base for t in tensors]
        base = None
    for weights in WEIGHTS:
        ours = _ours(name, tensors, weights, base, params)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, _mergekit(name, tensors, weights, base, params))


DARE_CASES = [
    ("dare_linear", {"density": 0.5}),
    ("dare_linear", {"density": [0.3, 1.0, 0.7], "normalize": True, "lambda": 0.8}),
    ("dare_linear", {"density": 0.4, "rescale": False}),
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": [0.6, 0.2, 1.0], "normalize": True}),
]


@pytest.mark.parametrize(("name", "params"), DARE_CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
def test_dare_matches_mergekit_with_the_same_seed(name, params, shape, dtype, with_base):
    tensors, base = _inputs(shape, dtype)
    base = base if with_base else None
    weights = [0.5, 0.3, 1.2]
    ours = _ours(name, tensors, weights, base, params, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    torch.testing.assert_close(ours, _mergekit(name, tensors, weights, base, params))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_count_consensus_matches_mergekit(method):
    tensors, base = _inputs((16, 12), torch.float32)
    sparsification = {"ties": "magnitude", "dare_ties": "random"}.get(method, "magnitude_outliers")
    ref_method = mk_gta.GeneralizedTaskArithmeticMerge(
        consensus_method=mk_gta.ConsensusMethod.count,
        sparsification_method=mk_sparsify.SparsificationMethod(sparsification),
        default_normalize=True,
        default_rescale=method == "dare_ties",
        method_name=f"{method}_count",
        method_pretty_name=None,
        method_reference_url=None,
    )
    params = {"density": 0.5, "normalize": True}
    # Negative weights make the weighted count differ from the unweighted one.
    weights = [1.0, -0.7, 0.4]
    ours = _ours(
        method,
        tensors,
        weights,
        base,
        {**params, "consensus": "count"},
        torch.Generator().manual_seed(3),
    )
    torch.manual_seed(3)
    ref = _mergekit(ref_method, tensors, weights, base, params)
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(
        ours, _ours(method, tensors, weights, base, params, torch.Generator().manual_seed(3))
    )


def test_default_weights_are_one_over_n():
    tensors, base = _inputs((16, 12), torch.float32)
    ours = MERGE_METHODS.get("task_arithmetic").fn(tensors, None, base)
    torch.testing.assert_close(ours, _mergekit("task_arithmetic", tensors, [1 / 3] * 3, base, {}))
    torch.testing.assert_close(ours, sum(tensors) / 3)


# ---------------------------------------------------------------- PEFT semantics


@pytest.fixture(scope="module")
def peft_merge():
    """peft.utils.merge_utils alone: importing the peft package loads transformers (~5 s)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("peft is not installed")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    file_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)  # it imports only torch and the standard library
    return module


def _peft_inputs(dtype):
    tensors, base = _inputs((16, 12), dtype)
    return [t - base for t in tensors], torch.tensor([0.2, 1.0, 0.6])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_peft_semantics(peft_merge, dtype, sign):
    taus, w = _peft_inputs(dtype)
    consensus = {"total": "sum", "frequency": "count"}[sign]
    ours = _ours(
        "ties",
        taus,
        w.tolist(),
        None,
        {"density": 0.3, "consensus": consensus, "semantics": "peft"},
    )
    ref = peft_merge.ties([t.float() for t in taus], w, 0.3, majority_sign_method=sign)
    torch.testing.assert_close(ours, ref.to(dtype))
    mergekit_style = _ours("ties", taus, w.tolist(), None, {"density": 0.3, "consensus": consensus})
    assert not torch.allclose(mergekit_style.float(), ref, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_peft_semantics(peft_merge, dtype, name):
    taus, w = _peft_inputs(dtype)
    params = {"density": 0.4, "semantics": "peft"}
    ours = _ours(name, taus, w.tolist(), None, params, torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    ref = getattr(peft_merge, name)([t.float() for t in taus], w, 0.4)
    torch.testing.assert_close(ours, ref.to(dtype))
    params["semantics"] = "mergekit"
    mergekit_style = _ours(name, taus, w.tolist(), None, params, torch.Generator().manual_seed(11))
    assert not torch.allclose(mergekit_style.float(), ref, atol=1e-2)


def test_task_arithmetic_and_magnitude_prune_peft(peft_merge):
    taus, w = _peft_inputs(torch.float32)
    torch.testing.assert_close(
        MERGE_METHODS.get("task_arithmetic").fn(taus, w.tolist()),
        peft_merge.task_arithmetic(taus, w),
    )
    ours = task_vector_merge(taus, w.tolist(), sparsify="magnitude", density=0.3, semantics="peft")
    torch.testing.assert_close(ours, peft_merge.magnitude_prune(taus, w, 0.3))


def test_peft_semantics_with_base_adds_the_base(peft_merge):
    tensors, base = _inputs((16, 12), torch.float32)
    w = torch.tensor([0.2, 1.0, 0.6])
    ours = _ours("ties", tensors, w.tolist(), base, {"density": 0.5, "semantics": "peft"})
    ref = base + peft_merge.ties([t - base for t in tensors], w, 0.5)
    torch.testing.assert_close(ours, ref)


def test_peft_magnitude_keeps_int_density_times_numel():
    # mergekit keeps at least one entry; PEFT keeps int(0.05 * 7) = 0.
    tau = [torch.arange(1.0, 8.0)]
    mergekit = task_vector_merge(tau, [1.0], sparsify="magnitude", density=0.05)
    peft = task_vector_merge(tau, [1.0], sparsify="magnitude", density=0.05, semantics="peft")
    assert mergekit.tolist() == [0, 0, 0, 0, 0, 0, 7]
    assert peft.count_nonzero() == 0


# ---------------------------------------------------------------- randomness


def _dare(seed, semantics="mergekit", density=0.3):
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out = MERGE_METHODS.get("dare_linear").fn(
        [tau], [1.0], density=density, semantics=semantics, generator=gen
    )
    return tau, out


@pytest.mark.parametrize("semantics", ["mergekit", "peft"])
def test_dare_keeps_density_fraction_and_rescales(semantics):
    tau, out = _dare(1, semantics)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005  # about 5 standard deviations
    if semantics == "peft":  # expected value preserved: survivors divided by density
        torch.testing.assert_close(out[kept], tau[kept] / 0.3)
    else:  # L1 norm preserved exactly
        torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
        ratio = out[kept] / tau[kept]
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_dare_is_determined_by_the_seed():
    assert torch.equal(_dare(5)[1], _dare(5)[1])
    assert not torch.equal(_dare(5)[1], _dare(6)[1])
    torch.manual_seed(5)  # no generator: torch's global RNG, like mergekit and PEFT
    assert torch.equal(_dare(None)[1], _dare(5)[1])


# ---------------------------------------------------------------- config and validation


def test_registry_names():
    assert MERGE_METHODS.names() == [
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "linear",
        "task_arithmetic",
        "ties",
    ]
    with pytest.raises(UnknownNameError, match="slerp") as err:
        MERGE_METHODS.get("slerp")
    assert "ties" in str(err.value)


def test_bind_validates_once_and_calls_like_the_function():
    tensors, base = _inputs((16, 12), torch.float32)
    method = MERGE_METHODS.get("breadcrumbs_ties")
    bound = method.bind(
        [{"weight": 0.5, "density": 0.4}, {"weight": 1.0, "gamma": 0.1}, {"weight": 0.3}],
        {"lambda": 0.5, "normalize": True},
    )
    direct = method.fn(
        tensors,
        [0.5, 1.0, 0.3],
        base,
        density=[0.4, 1.0, 1.0],
        gamma=[0.01, 0.1, 0.01],
        lambda_=0.5,
        normalize=True,
    )
    torch.testing.assert_close(bound(tensors, base), direct)
    assert not torch.allclose(direct, method.fn(tensors, [0.5, 1.0, 0.3], base, density=0.4))
    with pytest.raises(MergeError, match="configured for 3 models, got 2"):
        bound(tensors[:2], base)


@pytest.mark.parametrize(
    ("name", "models", "params", "message"),
    [
        ("ties", [{"density": 1.5}], {}, "model 0: density = 1.5"),
        ("ties", [{}, {"density": 0}], {}, "model 1: density = 0"),
        ("breadcrumbs", [{"gamma": 1.0}], {}, "gamma = 1.0"),
        ("ties", [{"densty": 0.5}], {}, "unknown parameter 'densty'"),
        ("linear", [{"density": 0.5}], {}, "unknown parameter 'density'"),
        ("dare_ties", [{}], {"semantics": "torch"}, "semantics = 'torch'"),
        ("task_arithmetic", [{}], {"lambda": "big"}, "lambda = 'big'"),
        ("ties", [{"weight": 1.0}, {}], {}, "weight is given for some models only"),
        ("ties", [{"weight": float("nan")}], {}, "weight = nan"),
        ("ties", [], {}, "got no models"),
    ],
)
def test_bind_rejects_bad_configs(name, models, params, message):
    with pytest.raises(ConfigError, match=message):
        MERGE_METHODS.get(name).bind(models, params)


def test_param_models_are_frozen():
    model = MERGE_METHODS.get("ties").model_params(density=0.5)
    with pytest.raises(ValueError, match="frozen"):
        model.density = 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 0.0}, r"density \(model 0\) = 0.0 is invalid"),
        ({"density": [0.5, 1.5, 0.5]}, r"density \(model 1\) = 1.5"),
        ({"density": [0.5, 0.5]}, "density has 2 values for 3 models"),
        ({"weights": [1.0, 2.0]}, "weight has 2 values for 3 models"),
        ({"semantics": "torch"}, "semantics = 'torch'"),
        ({"lambda_": float("inf")}, "lambda = inf"),
    ],
)
def test_functions_reject_bad_parameters(kwargs, message):
    tensors, base = _inputs((7,), torch.float32)
    weights = kwargs.pop("weights", None)
    with pytest.raises(MergeError, match=message):
        MERGE_METHODS.get("ties").fn(tensors, weights, base, **kwargs)


def test_functions_reject_bad_tensors():
    tensors, base = _inputs((7,), torch.float32)
    with pytest.raises(MergeError, match="differ in shape"):
        MERGE_METHODS.get("ties").fn(tensors, None, base[:5])
    with pytest.raises(MergeError, match=r"torch\.int64"):
        MERGE_METHODS.get("linear").fn([torch.arange(3), torch.arange(3)])
    with pytest.raises(MergeError, match="no tensors"):
        MERGE_METHODS.get("task_arithmetic").fn([])


def test_linear_refuses_a_base_and_unnormalizable_weights():
    tensors, base = _inputs((7,), torch.float32)
    linear = MERGE_METHODS.get("linear").fn
    with pytest.raises(MergeError, match="does not use a base"):
        linear(tensors, None, base)
    with pytest.raises(MergeError, match="sum to zero"):
        linear(tensors[:2], [1.0, -1.0])
    torch.testing.assert_close(
        linear(tensors[:2], [1.0, -1.0], normalize=False), tensors[0] - tensors[1]
    )


def test_float64_is_kept():
    tensors, base = _inputs((7,), torch.float64)
    out = MERGE_METHODS.get("ties").fn(tensors, None, base, density=0.5)
    assert out.dtype == torch.float64


def test_package_never_imports_mergekit_or_peft():
    """They are test and benchmark dependencies only (mergekit is LGPL); lazy imports count."""
    package = Path(__file__).resolve().parents[1] / "src" / "mmcompose"
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


FORBIDDEN = ("mergekit", "peft")
