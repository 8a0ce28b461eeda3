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
import sys
from pathlib import Path

import pytest
import torch

from mmcompose.compose.methods import MERGE_METHODS, task_vector_merge
from mmcompose.errors import ConfigError, MergeError, UnknownNameError
from mmcompose.testing import assert_float_close, eps, float_tol

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


def _assert_merge_close(ours, ref, inputs) -> None:
    """Two float32 computations of one merge, cast to the inputs' dtype: float32 rounding of a
    sum over the models at the values' size, plus (bfloat16 outputs) the two results rounding
    to neighbouring values, one output eps relative. A wrong weight, mask or sign election
    moves values by the task vectors' size (0.1 here), far above either."""
    mag = max(float(t.detach().abs().max()) for t in [*inputs, ref])
    atol = float_tol(torch.float32, mag, n_terms=len(inputs))
    rtol = 0.0 if ours.dtype in (torch.float32, torch.float64) else eps(ours.dtype)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol)


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
        ref = mk.merge_tensors(tensors, "linear", parameters=params)
        _assert_merge_close(ours, ref, tensors)


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
        ref = _mergekit(name, tensors, weights, base, params)
        _assert_merge_close(ours, ref, [*tensors, *([] if base is None else [base])])


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
    ref = _mergekit(name, tensors, weights, base, params)
    _assert_merge_close(ours, ref, [*tensors, *([] if base is None else [base])])


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
    _assert_merge_close(ours, ref, [*tensors, base])
    assert not torch.allclose(  # count vs sum consensus: different elections, O(0.1) apart
        ours, _ours(method, tensors, weights, base, params, torch.Generator().manual_seed(3))
    )


def test_default_weights_are_one_over_n():
    tensors, base = _inputs((16, 12), torch.float32)
    ours = MERGE_METHODS.get("task_arithmetic").fn(tensors, None, base)
    ref = _mergekit("task_arithmetic", tensors, [1 / 3] * 3, base, {})
    _assert_merge_close(ours, ref, [*tensors, base])
    _assert_merge_close(ours, sum(tensors) / 3, [*tensors, base])


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
    _assert_merge_close(ours, ref.to(dtype), taus)
    mergekit_style = _ours("ties", taus, w.tolist(), None, {"density": 0.3, "consensus": consensus})
    # the other semantics: different results by the task vectors' size, not by rounding
    assert not torch.allclose(mergekit_style.float(), ref, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_peft_semantics(peft_merge, dtype, name):
    taus, w = _peft_inputs(dtype)
    params = {"density": 0.4, "semantics": "peft"}
    ours = _ours(name, taus, w.tolist(), None, params, torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    ref = getattr(peft_merge, name)([t.float() for t in taus], w, 0.4)
    _assert_merge_close(ours, ref.to(dtype), taus)
    params["semantics"] = "mergekit"
    mergekit_style = _ours(name, taus, w.tolist(), None, params, torch.Generator().manual_seed(11))
    # the other semantics: different results by the task vectors' size, not by rounding
    assert not torch.allclose(mergekit_style.float(), ref, atol=1e-2)


def test_task_arithmetic_and_magnitude_prune_peft(peft_merge):
    taus, w = _peft_inputs(torch.float32)
    _assert_merge_close(
        MERGE_METHODS.get("task_arithmetic").fn(taus, w.tolist()),
        peft_merge.task_arithmetic(taus, w),
        taus,
    )
    ours = task_vector_merge(taus, w.tolist(), sparsify="magnitude", density=0.3, semantics="peft")
    _assert_merge_close(ours, peft_merge.magnitude_prune(taus, w, 0.3), taus)


def test_peft_semantics_with_base_adds_the_base(peft_merge):
    tensors, base = _inputs((16, 12), torch.float32)
    w = torch.tensor([0.2, 1.0, 0.6])
    ours = _ours("ties", tensors, w.tolist(), base, {"density": 0.5, "semantics": "peft"})
    ref = base + peft_merge.ties([t - base for t in tensors], w, 0.5)
    _assert_merge_close(ours, ref, [*tensors, base])


def test_peft_magnitude_keeps_int_density_times_numel():
    # mergekit keeps at least one entry; PEFT keeps int(0.05 * 7) = 0.
    tau = [torch.arange(1.0, 8.0)]
    mergekit = task_vector_merge(tau, [1.0], sparsify="magnitude", density=0.05)
    peft = task_vector_merge(tau, [1.0], sparsify="magnitude", density=0.05, semantics="peft")
    assert mergekit.tolist() == [0, 0, 0, 0, 0, 0, 7]
    assert peft.count_nonzero() == 0


# ---------------------------------------------------------------- selection by threshold

# Few distinct magnitudes, so every slice end falls inside a group of equal values: which of
# them a selection keeps is decided by how torch's unstable sort orders equal values.
TIE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _tied(n, dtype, seed=0, levels=25):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (n,), generator=g) * 0.01).to(dtype)


def _bits(t):
    """Exact comparison, signed zeros included."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _stable_top_k(t, k):
    """Top k with ties to the lowest index: a rule that differs from the sort's."""
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[torch.sort(t.abs().float().reshape(-1), descending=True, stable=True).indices[:k]] = 1
    return mask


@pytest.mark.parametrize("dtype", TIE_DTYPES)
@pytest.mark.parametrize("n", [997, 40_000, 300_000])
def test_magnitude_selection_breaks_ties_like_mergekit(dtype, n):
    tau = _tied(n, dtype, seed=n)
    for density in (0.05, 0.3, 0.5, 0.77):
        ours = task_vector_merge([tau], [1.0], sparsify="magnitude", density=density)
        ref = mk_sparsify.magnitude(tau, density)
        assert torch.equal(_bits(ours), _bits(ref)), density
    # the test can tell: a different rule for the tied entries keeps other entries
    k = int(0.3 * n)
    stable = tau * _stable_top_k(tau, k).to(dtype)
    assert not torch.equal(stable, mk_sparsify.magnitude(tau, 0.3))


@pytest.mark.parametrize("dtype", TIE_DTYPES)
@pytest.mark.parametrize("n", [997, 300_000])
def test_outlier_selection_breaks_ties_like_mergekit(dtype, n):
    tau = _tied(n, dtype, seed=n + 1)
    for density, gamma in ((0.5, 0.01), (0.2, 0.3), (0.9, 0.3), (0.3, 0.0)):
        ours = task_vector_merge(
            [tau], [1.0], sparsify="magnitude_outliers", density=density, gamma=gamma
        )
        ref = mk_sparsify.magnitude_outliers(tau, density, gamma=gamma)
        assert torch.equal(_bits(ours), _bits(ref)), (density, gamma)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_merges_with_ties_match_the_sort_based_selection(method):
    """The whole merge, bf16 task vectors with many equal values: bit for bit as before."""
    from mmcompose.compose import selection

    g = torch.Generator().manual_seed(7)
    base = (torch.randn(256, 512, generator=g) * 0.02).bfloat16()
    tensors = [(base.float() + 0.002 * torch.randn(256, 512, generator=g)).bfloat16()]
    tensors += [tensors[0].clone(), (base.float() - 0.003).bfloat16()]
    extra = {"gamma": 0.05} if method == "breadcrumbs_ties" else {"rescale": True}
    params = {"density": [0.5, 0.3, 0.7], **extra}
    fn = MERGE_METHODS.get(method).fn
    ours = fn(tensors, [0.5, 0.3, 0.2], base, **params)
    selection.SELECTION = "sort"
    try:
        ref = fn(tensors, [0.5, 0.3, 0.2], base, **params)
    finally:
        selection.SELECTION = "threshold"
    assert torch.equal(_bits(ours), _bits(ref))


def test_selection_falls_back_to_the_sort_for_nan_and_inf():
    from mmcompose.compose.selection import magnitude_mask, sort_mask

    tau = _tied(5000, torch.float32)
    tau[[3, 77]] = torch.tensor([float("nan"), float("inf")])
    for start, stop, descending in ((0, 1200, True), (900, 4000, False)):
        ref = sort_mask(tau.abs(), start, stop, descending).float()
        assert torch.equal(magnitude_mask(tau, start, stop, descending=descending), ref)


@pytest.mark.parametrize("swap_chunk", [1 << 22, 1000], ids=["whole", "chunked-swaps"])
def test_replay_follows_torch_sort(monkeypatch, swap_chunk: int):
    """The replay of std::sort's partitions against torch.sort itself, several levels deep,
    with each partition's swaps made at once and in chunks of 1000 pairs.

    Linux torch builds sort with libstdc++'s std::sort; elsewhere (libc++) the probe fails
    and the full sort is used, which the mergekit tests above cover.
    """
    from mmcompose.compose import selection

    monkeypatch.setattr(selection, "_SWAP_CHUNK", swap_chunk)
    if sys.platform != "linux":
        pytest.skip("torch's CPU sort here may not be libstdc++ introsort")
    assert selection._replay_matches_torch()
    for n, levels in ((17, 2), (5000, 3), (200_000, 40)):
        w = _tied(n, torch.float64, seed=n, levels=levels).abs()
        for descending in (True, False):
            ranked = torch.sort(w, descending=descending).values
            for start, stop in ((0, n // 3), (n // 4, n - n // 5), (1, n - 1)):
                ties = sorted({float(ranked[start]), float(ranked[stop - 1])})
                chosen = selection._replay(w.numpy().copy(), start, stop, descending, ties)
                got = (w > ties[0]) & (w < ties[-1])
                got[torch.from_numpy(chosen)] = True
                assert torch.equal(got, selection.sort_mask(w, start, stop, descending))


def test_peft_magnitude_selection_with_ties(peft_merge):
    """``topk(sorted=False)`` keeps the entries PEFT's ``topk`` keeps."""
    for n, density in ((2000, 0.5), (50_000, 0.01)):  # nth_element, then partial_sort
        tau = _tied(n, torch.float32, seed=n)
        ours = task_vector_merge(
            [tau], [1.0], sparsify="magnitude", density=density, semantics="peft"
        )
        ref = peft_merge.magnitude_prune([tau], torch.tensor([1.0]), density)
        assert torch.equal(ours, ref)


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
        assert_float_close(out[kept], tau[kept] / 0.3)  # one float32 rounding per element
    else:  # L1 norm preserved exactly
        # float64 sums as the reference; ours sums 200k float32 terms in its own order (an
        # L1 ratio off by the kept fraction's noise, 1/0.3 instead, is 1e-2 relative)
        l1 = tau.double().abs().sum()
        assert_float_close(out.double().abs().sum(), l1, n_terms=tau.numel(), dtype=torch.float32)
        ratio = out[kept] / tau[kept]
        # out = fl(tau * c), ratio = fl(out / tau): two float32 roundings of c (about 3.3)
        assert_float_close(ratio, torch.full_like(ratio, ratio[0].item()), n_terms=2)


def test_dare_is_determined_by_the_seed():
    assert torch.equal(_dare(5)[1], _dare(5)[1])
    assert not torch.equal(_dare(5)[1], _dare(6)[1])
    torch.manual_seed(5)  # no generator: torch's global RNG, like mergekit and PEFT
    assert torch.equal(_dare(None)[1], _dare(5)[1])


# ---------------------------------------------------------------- config and validation


def test_registry_names():
    # the seven here and, registered by methods_interp/methods_select, mergekit's other 13
    assert MERGE_METHODS.names() == [
        "arcee_fusion",
        "breadcrumbs",
        "breadcrumbs_ties",
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
        "karcher",
        "linear",
        "model_stock",
        "multislerp",
        "nearswap",
        "nuslerp",
        "passthrough",
        "ram",
        "ramplus_tl",
        "sce",
        "slerp",
        "task_arithmetic",
        "ties",
    ]
    with pytest.raises(UnknownNameError, match="frankenmerge") as err:
        MERGE_METHODS.get("frankenmerge")
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
    # the same function with the same arguments, bound or not: bit-exact
    torch.testing.assert_close(bound(tensors, base), direct, atol=0, rtol=0)
    # other densities/gammas: different elements kept, O(0.1) apart
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
    _assert_merge_close(
        linear(tensors[:2], [1.0, -1.0], normalize=False), tensors[0] - tensors[1], tensors[:2]
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
