"""Paired statistics on known inputs: McNemar and Wilson against scipy's binomial test,
the bootstraps' determinism, symmetry and limiting cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from mmcompose.bench import stats


def _pair(a_only: int, b_only: int, both: int = 30, neither: int = 20) -> tuple[list, list]:
    """Two correctness vectors with the given discordant and concordant counts."""
    a = [1] * a_only + [0] * b_only + [1] * both + [0] * neither
    b = [0] * a_only + [1] * b_only + [1] * both + [0] * neither
    return a, b


# ----------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize(("a_only", "b_only"), [(10, 2), (2, 10), (5, 5), (0, 7), (1, 0), (13, 4)])
def test_mcnemar_is_the_two_sided_binomial_test_on_discordant_items(a_only, b_only):
    a, b = _pair(a_only, b_only)
    r = stats.mcnemar_exact(a, b)
    expected = binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue
    assert r.p == pytest.approx(expected, rel=1e-12)  # both exact sums of binomial terms
    assert (r.a_only, r.b_only) == (a_only, b_only)
    assert r.difference == pytest.approx((a_only - b_only) / len(a), abs=1e-15)
    assert stats.mcnemar_exact(b, a).p == r.p  # symmetric in the models


def test_mcnemar_b10_c2_by_hand():
    # P[X <= 2] for X ~ Bin(12, 1/2) = (1 + 12 + 66) / 4096; two-sided: twice that.
    assert stats.mcnemar_exact(*_pair(10, 2)).p == 2 * 79 / 4096


def test_identical_vectors_give_p_1():
    a = [1, 0, 1, 1, 0, 0, 1]
    assert stats.mcnemar_exact(a, a).p == 1.0
    r = stats.paired_bootstrap(a, a, n_boot=500, seed=3)
    assert (r.p, r.difference, r.low, r.high) == (1.0, 0.0, 0.0, 0.0)


def test_mcnemar_refuses_mismatched_or_seeded_inputs():
    with pytest.raises(ValueError, match="same items"):
        stats.mcnemar_exact([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="same items"):
        stats.mcnemar_exact([[1, 0], [0, 1]], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="0 or 1"):
        stats.mcnemar_exact([1, 0.5], [1, 0])


# ----------------------------------------------------------------------------- Wilson
@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (7, 20), (49, 60), (1, 3), (300, 1000)])
@pytest.mark.parametrize("level", [0.95, 0.9])
def test_wilson_matches_scipy(k, n, level):
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    lo, hi = stats.wilson_interval(k, n, level)
    # Both evaluate the same closed form in float64: a few ulps of values <= 1.
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_wilson_from_its_definition():
    """The interval's ends are the p whose score statistic |k/n - p| / sqrt(p(1-p)/n) is z."""
    k, n = 17, 40
    z = 1.959963984540054
    for p in stats.wilson_interval(k, n):
        assert abs(k / n - p) / math.sqrt(p * (1 - p) / n) == pytest.approx(z, rel=1e-12)


def test_one_run_accuracy_is_wilson():
    v = [1] * 13 + [0] * 7
    r = stats.accuracy_interval(v)
    assert r.method == "wilson" and r.estimate == 13 / 20
    assert (r.low, r.high) == stats.wilson_interval(13, 20)
    assert math.isnan(stats.wilson_interval(0, 0)[0])


# ----------------------------------------------------------------------------- bootstraps
def test_seeded_bootstrap_over_items_and_seeds_is_deterministic():
    rng = np.random.default_rng(0)
    x = (rng.random((3, 80)) < 0.6).astype(int)
    a = stats.accuracy_interval(x, seed=5, n_boot=2000)
    assert a == stats.accuracy_interval(x, seed=5, n_boot=2000)
    draws = [stats._bootstrap_totals([stats.correctness(x)], 50, seed) for seed in (5, 5, 6)]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])
    assert a.method.startswith("bootstrap") and a.estimate == x.mean()
    assert a.low < a.estimate < a.high


def test_seed_bootstrap_sees_seed_variation_and_item_variation():
    # Seeds that disagree completely: the accuracy could be anything from 0 to 1.
    r = stats.accuracy_interval([[1] * 50, [0] * 50], n_boot=2000)
    assert (r.low, r.high) == (0.0, 1.0)
    # Seeds that agree: only the items vary, so the interval is the item bootstrap's, about
    # +-1.96 sqrt(p(1-p)/n) = +-0.049 here. Tolerance: 2 grid steps of 1/400 plus a few
    # Monte-Carlo sds of a 2.5% quantile with 10k draws (~0.0007).
    v = [1, 0] * 200
    r = stats.accuracy_interval([v, v, v])
    half = 1.959963984540054 * math.sqrt(0.25 / 400)
    assert r.low == pytest.approx(0.5 - half, abs=0.0055)
    assert r.high == pytest.approx(0.5 + half, abs=0.0055)


def test_paired_bootstrap_is_antisymmetric_and_seeded():
    a, b = _pair(10, 2)
    ab = stats.paired_bootstrap(a, b, seed=1)
    ba = stats.paired_bootstrap(b, a, seed=1)
    assert ab.difference == pytest.approx(8 / len(a), abs=1e-15)
    # the same draws: the difference, interval and p mirror exactly
    assert (ba.difference, ba.low, ba.high, ba.p) == (-ab.difference, -ab.high, -ab.low, ab.p)
    assert ab == stats.paired_bootstrap(a, b, seed=1)
    assert ab.low > 0 and ab.p < 0.05
    assert stats.paired_bootstrap(a, b, seed=2) != ab


def test_paired_bootstrap_p_follows_the_evidence():
    clear = stats.paired_bootstrap(*_pair(40, 0), n_boot=999)
    assert clear.p == 1 / 1000  # no replicate comes near "no difference": the smallest p
    noisy = stats.paired_bootstrap(*_pair(6, 4), n_boot=2000)
    assert noisy.p > 0.3 and noisy.low < 0 < noisy.high
    # close to McNemar's p where the normal approximation holds (many discordant items)
    a, b = _pair(60, 40, both=200, neither=100)
    mc, bs = stats.mcnemar_exact(a, b).p, stats.paired_bootstrap(a, b).p
    assert 0.5 * mc < bs < 2 * mc


def test_paired_bootstrap_pairs_seeds():
    a, b = _pair(10, 2)
    seeded = stats.paired_bootstrap([a, a], [b, b], n_boot=2000)
    assert seeded.difference == pytest.approx(8 / len(a), abs=1e-15)
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_bootstrap([a, a], [b], n_boot=10)


# ----------------------------------------------------------------------------- retention
def test_retention_ratio_interval_and_threshold():
    source = [1] * 40 + [0] * 10
    same = stats.retention(source, source, threshold=0.95, n_boot=999)
    assert (same.ratio, same.low, same.high) == (1.0, 1.0, 1.0)
    assert same.p_below == 1 / 1000  # never below 95%
    kept = [1] * 36 + [0] * 14  # 36 of the source's 40 items kept: 90%
    r = stats.retention(kept, source, threshold=0.95, n_boot=2000, seed=4)
    assert r.ratio == 0.9 and r.low < 0.9 < r.high <= 1.0
    assert r.p_below > 0.5  # most replicates fall below 95%
    assert r == stats.retention(kept, source, threshold=0.95, n_boot=2000, seed=4)
    assert stats.retention(kept, source, n_boot=100).p_below is None
    assert math.isnan(stats.retention([0, 1], [0, 0], n_boot=10).ratio)
