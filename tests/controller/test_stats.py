"""The statistics layer: exactness, martingale property, and the offline A/A and SRM acceptance tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from cohortgate.controller.windows import LAT_BINS, bins_of
from cohortgate.core import stats

# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(("x", "n1", "n0", "f"), [(0, 10, 90, 3), (3, 20, 180, 5), (7, 50, 50, 7), (4, 5, 5, 9)])
def test_fisher_log_lr_matches_scipy(x, n1, n0, f):
    psi = np.exp(stats.DEFAULT_LOG_PSI)
    expected = np.log(sps.nchypergeom_fisher.pmf(x, n1 + n0, n1, f, psi)) - np.log(sps.hypergeom.pmf(x, n1 + n0, n1, f))
    np.testing.assert_allclose(stats.fisher_log_lr(x, n1, n0, f), expected, rtol=1e-9, atol=1e-9)


margins = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda n: st.tuples(st.just(n[0]), st.just(n[1]), st.integers(0, n[0] + n[1]))
)


@settings(max_examples=60, deadline=None)
@given(margins)
def test_likelihood_ratio_has_mean_one_under_the_null(m):
    """E_null[LR] = 1 for every psi: what makes the product a martingale (Ville's inequality)."""
    n1, n0, f = m
    support = np.arange(max(0, f - n0), min(f, n1) + 1)
    null = sps.hypergeom.pmf(support, n1 + n0, n1, f)
    lr = np.exp(stats.fisher_log_lr(support, n1, n0, f))
    np.testing.assert_allclose((null[:, None] * lr).sum(axis=0), 1.0, rtol=1e-8)


batches = st.lists(
    st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=30
)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_harm_p_value_is_in_range_and_never_rises(rows):
    test = stats.HarmTest()
    last = 1.0
    for a, b, c, d in rows:
        n1, n0 = a + b, c + d  # a bad of n1 on the challenger, c bad of n0 on control
        p = test.update(a, n1, n0, a + c)
        assert 0.0 < p <= last <= 1.0
        last = p


def test_harm_test_rejects_a_clearly_worse_challenger_and_not_a_better_one():
    worse, better = stats.HarmTest(), stats.HarmTest()
    for _ in range(10):
        worse.update(3, 10, 90, 3)  # 30 % vs 0 %
        better.update(0, 10, 90, 9)  # 0 % vs 10 %
    assert worse.p_value < 1e-6
    assert better.p_value == 1.0


def test_harm_test_refuses_inconsistent_counts():
    with pytest.raises(ValueError):
        stats.HarmTest().update(5, 3, 10, 5)


def test_scalar_and_vectorised_paths_agree():
    rng = np.random.default_rng(3)
    n1 = rng.integers(0, 40, 50)
    n0 = rng.integers(0, 40, 50)
    x = rng.binomial(n1, 0.2)
    y = rng.binomial(n0, 0.1)
    paths = stats.harm_paths(x, n1, n0, x + y)
    t = stats.HarmTest()
    scalar = [t.update(int(a), int(b), int(c), int(a + d)) for a, b, c, d in zip(x, n1, n0, y, strict=True)]
    np.testing.assert_allclose(paths, scalar, rtol=1e-9)


# --------------------------------------------------------------------------- A/A: 100 repetitions


def _simulate_rollbacks(reps, intervals, per_interval, canary_error, canary_median, seed):
    """Which repetitions the controller's verdict rules would roll back (the statistics layer, vectorised).

    Mirrors `Controller._judge_route` + `verdict.judge` for one control/canary pair at 50/50: the
    error and slow-request harm tests at alpha/2 each (slow = above control's p95 over the previous
    60 intervals, fixed before the interval), and the absolute guardrails over the same sliding window.
    """
    alpha, min_samples, max_error_rate, max_p99_ms, window = 0.05, 200, 0.05, 250.0, 60
    rng = np.random.default_rng(seed)
    shape = (reps, intervals, per_interval)
    canary = rng.random(shape) < 0.5
    bad = rng.random(shape) < np.where(canary, canary_error, 0.01)
    lat = np.where(canary, canary_median, 20.0) * np.exp(0.4 * rng.standard_normal(shape))
    bins = bins_of(lat)

    n1 = canary.sum(-1)
    n0 = per_interval - n1
    x = (bad & canary).sum(-1)
    y = (bad & ~canary).sum(-1)
    p_err = stats.harm_paths(x, n1, n0, x + y)

    # per-interval latency histograms of each arm: (reps, intervals, LAT_BINS)
    def hist(mask):
        flat = (np.arange(reps * intervals)[:, None] * LAT_BINS + bins.reshape(reps * intervals, -1))[
            mask.reshape(reps * intervals, -1)
        ]
        return np.bincount(flat, minlength=reps * intervals * LAT_BINS).reshape(reps, intervals, LAT_BINS)

    h1, h0 = hist(canary), hist(~canary)

    def sliding(h):
        c = np.cumsum(h, axis=1)
        out = c.copy()
        out[:, window:] -= c[:, :-window]
        return out

    s0, s1 = sliding(h0), sliding(h1)
    # the threshold used in interval t is control's p95 bin over the window ending at t-1
    cum0 = np.cumsum(s0, axis=-1)
    rank = np.maximum(1, np.ceil(0.95 * cum0[..., -1]))
    k = np.argmax(cum0 >= rank[..., None], axis=-1)  # (reps, intervals)
    have = cum0[..., -1] >= 20
    k_prev = np.concatenate([np.zeros((reps, 1), int), k[:, :-1]], axis=1)
    have_prev = np.concatenate([np.zeros((reps, 1), bool), have[:, :-1]], axis=1)
    above = np.arange(LAT_BINS) > k_prev[..., None]
    xs = (h1 * above).sum(-1) * have_prev
    xc = (h0 * above).sum(-1) * have_prev
    p_lat = stats.harm_paths(xs, n1, n0, xs + xc)

    # absolute guardrails over the sliding window
    n_win = s1.sum(-1)
    err_win = np.cumsum(x, axis=1)
    err_win[:, window:] -= np.cumsum(x, axis=1)[:, :-window]
    cum1 = np.cumsum(s1, axis=-1)
    p99_bin = np.argmax(cum1 >= np.maximum(1, np.ceil(0.99 * n_win))[..., None], axis=-1)
    from cohortgate.controller.windows import LAT_EDGES

    p99 = LAT_EDGES[p99_bin]
    enough = n_win >= min_samples
    guard = enough & ((err_win / np.maximum(n_win, 1) > max_error_rate) | (p99 > max_p99_ms))
    fired = (p_err < alpha / 2) | (p_lat < alpha / 2) | guard
    return fired.any(axis=1)


def test_aa_20000_requests_rolls_back_at_most_5_of_100_repetitions():
    rolled = _simulate_rollbacks(
        reps=100, intervals=100, per_interval=200, canary_error=0.01, canary_median=20.0, seed=20_000
    )
    assert rolled.sum() <= 5, f"{rolled.sum()} of 100 A/A repetitions rolled back"


@pytest.mark.parametrize(("error", "median"), [(0.03, 20.0), (0.01, 30.0)])
def test_the_same_rules_catch_a_worse_variant(error, median):
    """The A/A result is not vacuous: 3x the errors, or 1.5x the latency, is caught nearly always."""
    rolled = _simulate_rollbacks(
        reps=100, intervals=100, per_interval=200, canary_error=error, canary_median=median, seed=7
    )
    assert rolled.sum() >= 90


# --------------------------------------------------------------------------- sample-ratio mismatch


def test_fifty_fifty_weights_with_sixty_forty_traffic_is_srm():
    rng = np.random.default_rng(11)
    counts = np.bincount(rng.choice(2, size=2000, p=[0.6, 0.4]), minlength=2)
    result = stats.srm_check(counts, [50, 50])
    assert result.mismatch
    assert result.p_chi2 < 1e-6 and result.p_always_valid < 1e-3


def test_a_correct_split_is_not_srm_in_99_of_100_repetitions():
    rng = np.random.default_rng(12)
    flagged = sum(
        stats.srm_check(np.bincount(rng.choice(2, 2000, p=[0.9, 0.1]), minlength=2), [90, 10]).mismatch
        for _ in range(100)
    )
    assert flagged <= 1


def test_srm_bayes_factor_is_vectorised():
    counts = np.array([[500, 500], [600, 400]])
    log_bf = stats.srm_log_bf(counts, [0.5, 0.5])
    assert log_bf.shape == (2,)
    assert log_bf[1] > 10 > log_bf[0]
