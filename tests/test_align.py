"""Alt-MoE: routing, losses, schedule, training end to end, resume, DDP, feature stores, config."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmcompose.align.evaluate import AlignedModel, PairedSplit, evaluate_split, recall_at_k
from mmcompose.align.features import (
    EncoderRef,
    FeatureStore,
    ModalityFeatures,
    build_feature_store,
)
from mmcompose.align.losses import DEFAULT_TEMPERATURE, info_nce, regression_loss, step_loss
from mmcompose.align.moe import (
    AltMoEConnector,
    ConnectorConfig,
    MoE,
    load_balancing_loss,
    masked_mean,
    top_k_gate,
)
from mmcompose.align.trainer import (
    AlignConfig,
    batch_rows,
    build_connector,
    direction_schedule,
    learning_rate,
    load_align_config,
    run_align,
)
from mmcompose.errors import CheckpointError, ConfigError
from mmcompose.fs import OutputExistsError
from mmcompose.testing import assert_algebraically_equal, assert_float_close, float_tol

DIRS = (("a", "b"), ("b", "a"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread avoids oversubscribing a small/shared CPU (40x slower otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _connector(kind: str = "moe", **kw: object) -> AltMoEConnector:
    torch.manual_seed(0)
    cfg = ConnectorConfig(
        kind=kind,  # type: ignore[arg-type]
        hidden=16,
        num_experts=5,
        top_k=2,
        dropout=0.0,
        modalities={"a": 6, "b": 4},
        directions=DIRS,
        **kw,  # type: ignore[arg-type]
    )
    return AltMoEConnector(cfg)


# =========================================================================== MoE
@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_dispatch_equals_dense_reference(renormalize: bool) -> None:
    torch.manual_seed(0)
    moe = MoE(hidden=8, num_experts=6, top_k=3, dropout=0.0, renormalize=renormalize).eval()
    moe.double()  # dispatch == dense is algebraic: compared in float64 (~1e-15 rounding)
    x = torch.randn(40, 8).double().requires_grad_()
    out, _ = moe(x)
    ref = moe.forward_dense(x)
    assert_algebraically_equal(out, ref)  # a wrong expert or weight: O(1e-1)
    g1 = torch.autograd.grad(out.square().sum(), [x, *moe.parameters()])
    g2 = torch.autograd.grad(ref.square().sum(), [x, *moe.parameters()])
    for a, b in zip(g1, g2, strict=True):
        assert_algebraically_equal(a, b)


def test_moe_runs_each_expert_only_on_its_tokens() -> None:
    torch.manual_seed(0)
    moe = MoE(hidden=4, num_experts=4, top_k=1, dropout=0.0).eval()
    seen: list[int] = []
    for e in moe.experts:
        e.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    moe(torch.randn(30, 4))
    assert sum(seen) == 30  # k=1: every token visits exactly one expert, none runs densely


def test_top_k_gate_properties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 7)
    g = top_k_gate(logits, k=3)
    probs = logits.softmax(-1)
    torch.testing.assert_close(g.probs, probs, rtol=0, atol=0)  # the same softmax call: exact
    assert (g.experts.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
    # top-k values are elements of probs: exact
    torch.testing.assert_close(g.weights, probs.gather(-1, g.experts), rtol=0, atol=0)
    kth = g.weights[:, -1:]
    rest = probs.scatter(-1, g.experts, -1.0)
    assert (rest <= kth).all()  # the kept ones are the largest
    assert (g.weights.sum(-1) < 1).all()  # reference: not renormalised
    rn = top_k_gate(logits, k=3, renormalize=True)
    # w / sum(w) summed again: float32 rounding of 3 terms of size <= 1
    assert_float_close(rn.weights.sum(-1), torch.ones(50), n_terms=3)
    torch.testing.assert_close(rn.experts, g.experts, rtol=0, atol=0)  # indices: exact


def test_load_balancing_loss_values() -> None:
    e = 4
    uniform = torch.full((8, e), 1 / e)
    spread = torch.arange(8).remainder(e).unsqueeze(1)  # each expert gets 2 of 8 tokens
    # float32 means over 8 tokens and a sum over 4 experts, values <= e * 1
    tol = float_tol(torch.float32, e * 1.0, n_terms=8 * e)
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(1.0, abs=tol)
    collapsed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, e)
    to_zero = torch.zeros(8, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed, to_zero).item() == pytest.approx(e * 1.0 * 0.7, abs=tol)


def test_balance_option_reaches_the_gate() -> None:
    m = _connector()
    out = m(("a", "b"), torch.randn(3, 5, 6))
    out.aux_loss.backward()
    assert m.mixer.gate.weight.grad is not None and m.mixer.gate.weight.grad.abs().sum() > 0
    assert _connector("mlp")(("a", "b"), torch.randn(3, 5, 6)).aux_loss.item() == 0.0


@pytest.mark.parametrize("kind", ["moe", "mlp", "linear"])
def test_connector_shapes_and_padding_is_ignored(kind: str) -> None:
    m = _connector(kind).eval().double()  # "padding is ignored" is algebraic: float64
    tokens, mask = torch.randn(3, 5, 6).double(), torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    out = m(("a", "b"), tokens, mask)
    assert out.reg.shape == (3, 4) and out.cl.shape == (3, 16)
    garbage = tokens.clone()
    garbage[0, 3:] = 1e3
    again = m(("a", "b"), garbage, mask)
    # (expert batch sizes change with the garbage rows, so kernels may differ: ~1e-15)
    assert_algebraically_equal(again.reg, out.reg)
    assert_algebraically_equal(again.cl, out.cl)
    assert m.target_cl(("a", "b"), torch.randn(3, 4).double()).shape == (3, 16)


def test_masked_mean() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == 2.0


def test_unknown_direction_and_bad_config() -> None:
    with pytest.raises(KeyError, match="not trained"):
        _connector()(("a", "c"), torch.randn(1, 2, 6))
    with pytest.raises(ValueError, match="top_k"):
        ConnectorConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="differ"):
        ConnectorConfig(modalities={"a": 2}, directions=(("a", "a"),))


# =========================================================================== losses
def test_info_nce_hand_computed_and_symmetric() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos: [[1, .7071], [0, .7071]]
    t = 0.5
    c = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(c / t)))
    row1 = -math.log(math.exp(c / t) / (math.exp(0) + math.exp(c / t)))
    col0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0)))
    col1 = -math.log(math.exp(c / t) / (math.exp(c / t) + math.exp(c / t)))
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    # float32 log-sum-exp of 2 logits of size <= 1/t, then means (float64 reference)
    tol = float_tol(torch.float32, 1 / t, n_terms=2 * 2)
    assert info_nce(q, k, t).item() == pytest.approx(expected, abs=tol)
    torch.manual_seed(0)
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    # the transposed problem, summed in another order: logits of size <= 1/0.03, 6 x 2 terms
    tol_ab = float_tol(torch.float32, 1 / DEFAULT_TEMPERATURE, n_terms=6 * 2)
    assert info_nce(a, b).item() == pytest.approx(info_nce(b, a).item(), abs=tol_ab)
    assert info_nce(a, 5 * a).item() < info_nce(a, b).item()  # cosine: scale-free, aligned = low


def test_info_nce_groups_make_same_key_rows_positives() -> None:
    eye = torch.eye(2)  # cosine logits [[1, 0], [0, 1]] at temperature 1
    plain = info_nce(eye, eye, 1.0)
    grouped = info_nce(eye, eye, 1.0, groups=torch.tensor([7, 7]))
    # plain: -log(e / (e + 1)); grouped: targets [0.5, 0.5] -> log(e + 1) - 0.5
    tol = float_tol(torch.float32, math.log(math.e + 1), n_terms=2 * 2)  # float32 vs float64
    assert plain.item() == pytest.approx(math.log(math.e + 1) - 1, abs=tol)
    assert grouped.item() == pytest.approx(math.log(math.e + 1) - 0.5, abs=tol)
    distinct = info_nce(eye, eye, 1.0, groups=torch.tensor([0, 1]))
    assert distinct.item() == pytest.approx(plain.item(), abs=tol)


def test_smooth_l1_and_step_loss() -> None:
    pred, target = torch.tensor([0.0, 0.0]), torch.tensor([0.5, 3.0])
    # beta 1: 0.5 * 0.5^2 = 0.125 (quadratic), 3 - 0.5 = 2.5 (linear); mean 1.3125
    assert regression_loss(pred, target).item() == 1.3125  # dyadic values: exact in float32
    assert step_loss(torch.tensor(2.0), torch.tensor(4.0)).item() == 3.0


# =========================================================================== schedule
def test_direction_schedule() -> None:
    d = [("a", "b"), ("b", "a"), ("a", "c")]
    got = [direction_schedule(i, d, "alternating")[0] for i in range(6)]
    assert got == d + d
    got2 = [direction_schedule(i, d, "alternating", period=2)[0] for i in range(6)]
    assert got2 == [d[0], d[0], d[1], d[1], d[2], d[2]]
    assert direction_schedule(5, d, "joint") == d


def test_alternating_step_only_touches_active_direction() -> None:
    m = _connector()
    out = m(("a", "b"), torch.randn(4, 3, 6))
    target = torch.randn(4, 4)
    loss = step_loss(
        info_nce(out.cl, m.target_cl(("a", "b"), target)), regression_loss(out.reg, target)
    )
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in m.direction_parameters(("a", "b"))
    )
    assert all(p.grad is None for p in m.direction_parameters(("b", "a")))
    assert m.dir_emb.grad[0].abs().sum() > 0 and m.dir_emb.grad[1].abs().sum() == 0
    assert m.in_proj["b"][0].weight.grad is None  # other source projection untouched
    assert any(e[0].weight.grad is not None for e in m.mixer.experts)  # shared pool trained


def test_lr_schedule_and_batches() -> None:
    cfg = AlignConfig().train.model_copy(update={"lr": 1.0, "warmup_steps": 10, "max_steps": 110})
    tol = float_tol(np.float64, 1.0)  # Python floats: a few float64 roundings (and libm cos)
    assert learning_rate(0, cfg) == pytest.approx(0.1, abs=tol)
    assert learning_rate(10, cfg) == pytest.approx(1.0, abs=tol)
    assert learning_rate(60, cfg) == pytest.approx(0.5, abs=tol)
    assert learning_rate(110, cfg) == pytest.approx(0.0, abs=tol)
    first = np.concatenate([batch_rows(10, 3, s, 0) for s in range(3)])
    assert len(set(first)) == 9  # one epoch: no repeats
    assert (batch_rows(10, 3, 4, 0) == batch_rows(10, 3, 4, 0)).all()


# =========================================================================== evaluation
def test_recall_at_k_with_shared_keys() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    rel = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    r = recall_at_k(sim, rel, ks=(1, 2))
    # a float32 mean of 3 zeros/ones, times 100: float32 rounding of 2/3 (R@2 is exact)
    assert r == {"R@1": pytest.approx(200 / 3, abs=float_tol(torch.float32, 100.0)), "R@2": 100.0}
    rel_shared = rel | torch.tensor([[False, True, False], [True, False, False], [False] * 3])
    assert recall_at_k(sim, rel_shared, ks=(1,))["R@1"] == 100.0
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(sim, torch.zeros(3, 3, dtype=torch.bool))


def test_evaluation_dedupes_text_side() -> None:
    rng = np.random.default_rng(0)
    img = ModalityFeatures.from_token_list(list(rng.normal(size=(4, 2, 6)).astype(np.float32)))
    txt = ModalityFeatures.from_token_list(list(rng.normal(size=(4, 1, 4)).astype(np.float32)))
    split = PairedSplit({"a": img, "b": txt}, np.array([0, 0, 1, 1]), dedupe=frozenset({"b"}))
    res = evaluate_split(_connector().eval(), split, DIRS, ("cl",))["cl"]
    assert (res["a->b"]["queries"], res["a->b"]["gallery"]) == (4, 2)
    assert (res["b->a"]["queries"], res["b->a"]["gallery"]) == (2, 4)


# =========================================================================== end to end
def _write_config(path: Path, **train: object) -> Path:
    cfg = {
        "seed": 0,
        "data": {
            "kind": "synthetic",
            "synthetic": {
                "dims": {"a": 12, "b": 10},
                "rank": 8,
                "noise": 0.3,
                "sizes": {"train": 192, "val": 64, "test": 64},
            },
        },
        "connector": {"hidden": 32, "num_experts": 4, "top_k": 2, "dropout": 0.1},
        "train": {
            "max_steps": 80,
            "batch_size": 32,
            "eval_every": 20,
            "warmup_steps": 5,
            "lr": 3e-3,
            "checkpoint_every": 10,
            "num_threads": 1,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_end_to_end_recall_rises_far_above_chance(tmp_path: Path) -> None:
    result = run_align(_write_config(tmp_path / "c.yaml"), tmp_path / "out", progress=False)
    test = result.metrics["test"]
    for name in ("a->b", "b->a"):
        assert test["cl"][name]["R@1"] > 25.0  # chance: 1/64 = 1.6 %
        assert test["cl"][name]["R@10"] > 75.0
    assert "test [cl] a->b" in result.summary()
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "config.json",
        "model.safetensors",
        "metrics.json",
    }
    assert not (tmp_path / "out.ckpt").exists()
    model = AlignedModel.load(tmp_path / "out")
    q = model.embed_query("a", np.ones((3, 4, 12), np.float32))
    g = model.embed_gallery("b", np.ones((5, 10), np.float32))
    assert q.shape == (3, 32) and g.shape == (5, 32)
    # normalised then measured in float32 over 32 dims
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=float_tol(q.dtype, 1.0, 32))
    assert model.embed_query("a", np.ones((1, 12)), space="reg").shape == (1, 10)
    with pytest.raises(ConfigError, match="not trained for 'c'"):
        model.embed_query("c", np.ones((1, 12)))
    with pytest.raises(ConfigError, match="width 7"):
        model.embed_query("a", np.ones((1, 7)))
    with pytest.raises(OutputExistsError):
        run_align(tmp_path / "c.yaml", tmp_path / "out", progress=False)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_baselines_train(tmp_path: Path, kind: str) -> None:
    cfg = _write_config(tmp_path / "c.yaml", schedule="joint", max_steps=40)
    raw = yaml.safe_load(cfg.read_text())
    raw["connector"] = {"kind": kind, "hidden": 32}
    cfg.write_text(yaml.safe_dump(raw))
    result = run_align(cfg, tmp_path / "out", progress=False)
    assert result.metrics["test"]["cl"]["a->b"]["R@5"] > 30.0


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path / "c.yaml", max_steps=50)
    run_align(cfg, tmp_path / "full", progress=False)

    def interrupt(step: int) -> None:
        if step == 27:  # last checkpoint at 20: steps 21..27 are redone on resume
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_align(cfg, tmp_path / "resumed", progress=False, on_step=interrupt)
    assert (tmp_path / "resumed.ckpt" / "state.safetensors").is_file()  # no pickle
    assert not (tmp_path / "resumed.ckpt" / "checkpoint.pt").exists()
    assert not (tmp_path / "resumed").exists()
    seen: list[int] = []
    run_align(cfg, tmp_path / "resumed", progress=False, on_step=seen.append)
    assert seen[0] == 21
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # bit-exact by construction: restored weights, optimizer state and RNG, one thread,
        # the same steps with the same kernels on the same data
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    cfg = _write_config(tmp_path / "c.yaml", max_steps=12, eval_every=6)
    raw = yaml.safe_load(cfg.read_text())
    raw["connector"]["dropout"] = 0.0  # dropout masks differ per rank by design
    cfg.write_text(yaml.safe_dump(raw))
    run_align(cfg, tmp_path / "one", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "mmcompose.align.trainer", str(cfg), "-o", str(tmp_path / "two"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    # Adam normalises every update to about lr, so summation-order differences in the
    # gradients move a weight by a small fraction of one update: allow a tenth of one. No
    # gradient sync moves weights by many updates (0.025 here, lr = 3e-3).
    atol = 0.1 * raw["train"]["lr"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


# =========================================================================== feature stores
class _CountingEncoder:
    modality, dim = "text", 3

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    def encode(self, inputs: list[str]) -> list[np.ndarray]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("encoder crashed")
        return [np.full((len(t), 3), float(len(t)), np.float32) for t in inputs]


def test_feature_store_roundtrip_reuse_and_dedup(tmp_path: Path) -> None:
    ref = EncoderRef(name="minilm", batch_size=2)
    ids, texts = ["x", "y", "z", "w"], ["ab", "abcd", "ab", "a"]
    enc = _CountingEncoder()
    store = build_feature_store(
        ref, ids, texts, tmp_path, encoder=enc, progress=False, shard_size=3
    )
    assert enc.calls == 2  # 3 distinct texts, batches of 2
    feats = store.features()
    assert feats.tokens.shape == (4, 4, 3) and feats.tokens.dtype == np.float16
    assert feats.lengths.tolist() == [2, 4, 2, 1]
    np.testing.assert_array_equal(feats.pooled[:, 0], [2, 4, 2, 1])  # means of equal ints: exact
    assert store.rows(["z", "x"]).tolist() == [2, 0]
    single = build_feature_store(ref, ids[:2], texts[:2], tmp_path, encoder=enc, progress=False)
    assert isinstance(single.features().tokens, np.memmap)
    again = build_feature_store(
        ref, ids, texts, tmp_path, encoder=_CountingEncoder(0), progress=False
    )
    assert again.path == store.path  # reused: the encoder was not called
    other = build_feature_store(ref, ids, ["b", *texts[1:]], tmp_path, encoder=enc, progress=False)
    assert other.path != store.path


def test_feature_store_key_follows_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"1")
    from mmcompose.align.features import store_key

    ref = EncoderRef(name="efficientnet_lite0")
    k1 = store_key(ref, ["x"], [str(f)])
    os.utime(f, ns=(1, 1))
    assert store_key(ref, ["x"], [str(f)]) != k1
    assert (
        store_key(EncoderRef(name="efficientnet_lite0", params={"image_size": 64}), ["x"], [str(f)])
        != k1
    )


def test_feature_store_crash_leaves_nothing(tmp_path: Path) -> None:
    ref = EncoderRef(name="minilm", batch_size=1)
    with pytest.raises(RuntimeError, match="crashed"):
        build_feature_store(
            ref, ["a", "b"], ["x", "yy"], tmp_path, encoder=_CountingEncoder(1), progress=False
        )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete feature store"):
        FeatureStore(tmp_path / "half")


# =========================================================================== config
def test_config_unknown_keys_fail(tmp_path: Path) -> None:
    bad = [
        {"trian": {}},
        {"train": {"max_step": 5}},
        {"connector": {"experts": 4}},
        {"connector": {"modalities": {"a": 3}}},
        {"data": {"kind": "manifest"}},
        {"encoders": {"audio": {"name": "minilm"}}},
    ]
    for i, raw in enumerate(bad):
        p = tmp_path / f"{i}.yaml"
        p.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError):
            load_align_config(p)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"train": {"schedule": "joint"}}))
    assert load_align_config(ok).train.schedule == "joint"


def test_shipped_configs_validate() -> None:
    folder = Path(__file__).resolve().parents[1] / "configs" / "align"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_align_config(f)
        assert cfg.train.max_steps > 0


def test_build_connector_derives_dims_and_directions() -> None:
    rng = np.random.default_rng(0)
    feats = {
        m: ModalityFeatures.from_token_list(list(rng.normal(size=(2, 1, d)).astype(np.float32)))
        for m, d in (("a", 3), ("b", 5), ("c", 2))
    }
    m = build_connector(AlignConfig(), PairedSplit(feats, np.arange(2)))
    assert len(m.directions) == 6 and m.cfg.modalities == {"a": 3, "b": 5, "c": 2}


def test_random_feature_encoders_are_reproducible_across_rng_states() -> None:
    """Without stored weights, index time must rebuild the very encoder training used."""
    from mmcompose.align.features import EncoderRef, build_feature_encoder

    ref = EncoderRef(name="patch_embed", params={"image_size": 32, "patch_size": 8, "width": 16})
    torch.manual_seed(1)
    a = build_feature_encoder(ref)
    torch.manual_seed(2)
    state_before = torch.get_rng_state()
    b = build_feature_encoder(ref)
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's RNG is untouched
    for (k, x), (_, y) in zip(
        a.encoder.state_dict().items(), b.encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("case", ["checkpoint.pt", "state.pt", "tensors", "json"])
def test_resume_never_unpickles_a_planted_checkpoint(tmp_path: Path, run, case: str) -> None:
    """A pickle where the resume looks is refused with one clear error (it used to be loaded,
    or skipped with exit 0 as "another config"); its code never runs."""
    import io

    from mmcompose.errors import CheckpointError
    from mmcompose.testing import plant_bad_checkpoint

    cfg, out, marker = _write_config(tmp_path / "c.yaml"), tmp_path / "out", tmp_path / "pwned"
    planted = plant_bad_checkpoint(tmp_path / "out.ckpt", case, marker)
    with pytest.raises(CheckpointError, match="delete") as e:
        run_align(cfg, out, progress=False)
    assert planted.name in e.value.message
    r = run("align", str(cfg), "-o", str(out))
    assert r.returncode == 2 and r.stderr.count("error:") == 1, r.stderr
    assert "Traceback" not in r.stderr and planted.name in r.stderr
    assert not marker.exists() and not out.exists() and planted.is_file()
    torch.load(io.BytesIO(planted.read_bytes()), weights_only=False)["params"].close()
    assert marker.exists()  # the payload is live: a full unpickle would have run it


def test_checkpoint_of_another_config_starts_over(tmp_path: Path) -> None:
    """A valid checkpoint of another config is set aside (as before), never half-applied."""
    cfg = _write_config(tmp_path / "c.yaml", max_steps=20)
    with pytest.raises(KeyboardInterrupt):
        run_align(cfg, tmp_path / "out", progress=False, on_step=_stop_at(15))
    other = _write_config(tmp_path / "d.yaml", max_steps=20, lr=1e-3)
    seen: list[int] = []
    run_align(other, tmp_path / "out", progress=False, on_step=seen.append)
    assert seen[0] == 1 and not (tmp_path / "out.ckpt").exists()


def _stop_at(n: int):
    def stop(step: int) -> None:
        if step == n:
            raise KeyboardInterrupt

    return stop
