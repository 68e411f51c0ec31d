"""The statistics layer: exactness, martingale property, and the offline A/A and SRM acceptance tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from cohortgate.controller.loop import ControllerConfig
from cohortgate.controller.simulate import Behaviour, Users, run_controller
from cohortgate.core import stats
from tests.controller.policies import make_policy

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


# --------------------------------------------------------------------------- absolute limits


# the fraction of the limit: exactly 0, or at least 1e-6 (scipy's binomial pmf overflows for subnormal p,
# a limit of the reference computation here, not of the test under check)
rates_below = st.tuples(
    st.floats(0.001, 0.5), st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), st.integers(1, 60)
)


@settings(max_examples=60, deadline=None)
@given(rates_below)
def test_limit_likelihood_ratio_has_mean_at_most_one_at_or_below_the_limit(case):
    """E_p[LR] <= 1 for every p <= p0 and every alternative: a supermartingale under the whole null."""
    p0, frac, n = case
    p = p0 * frac
    support = np.arange(n + 1)
    pmf = sps.binom.pmf(support, n, p)
    above = (pmf[:, None] * np.exp(stats.limit_log_lr(support, n, p0))).sum(axis=0)
    assert (above <= 1 + 1e-9).all()
    # the mirrored test: mean <= 1 at or above the limit
    q = p0 + (1 - p0) * frac
    below = (sps.binom.pmf(support, n, q)[:, None] * np.exp(stats.limit_log_lr(support, n, p0, above=False))).sum(0)
    assert (below <= 1 + 1e-9).all()


@pytest.mark.parametrize(
    ("x", "n", "p0"), [(0, 50, 0.05), (5, 50, 0.05), (12, 100, 0.05), (40, 200, 0.1), (3, 40, 0.01)]
)
def test_one_look_at_the_limit_test_is_never_less_conservative_than_scipys_exact_binomial_test(x, n, p0):
    """At a fixed horizon the always-valid p-value bounds the exact one-sided binomial p-value from above
    (the mixture LR is monotone in x, so Markov's inequality gives P(X >= x) <= 1/M(x))."""
    exact = sps.binomtest(x, n, p0, alternative="greater").pvalue
    t = stats.LimitTest(p0)
    p = t.update(x, n)
    assert exact <= p + 1e-12
    if exact < 1e-4:  # and it is not uselessly conservative: within a few orders of magnitude
        assert p < 1e-2


@pytest.mark.parametrize(("x", "n1", "n0", "f"), [(5, 20, 180, 8), (10, 50, 50, 12), (3, 10, 90, 3), (1, 10, 90, 5)])
def test_one_look_at_the_harm_test_is_never_less_conservative_than_fishers_exact_test(x, n1, n0, f):
    table = [[x, n1 - x], [f - x, n0 - (f - x)]]
    exact = sps.fisher_exact(table, alternative="greater").pvalue
    p = stats.HarmTest().update(x, n1, n0, f)
    assert exact <= p + 1e-12


def test_tempering_only_ever_removes_evidence():
    rng = np.random.default_rng(9)
    x = rng.binomial(100, 0.09, 200)
    raw = stats.limit_paths(x, 100, 0.05)
    for c in (1.0, 0.5, 0.1):
        tempered = stats.limit_paths(x, 100, 0.05, temper=c)
        assert (tempered >= raw - 1e-15).all()
        np.testing.assert_allclose(np.log(tempered), c * np.log(raw), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        stats.LimitTest(0.05).update(1, 10, temper=1.5)


def test_limit_scalar_and_vectorised_paths_agree():
    rng = np.random.default_rng(5)
    n = rng.integers(0, 80, 60)
    x = rng.binomial(n, 0.07)
    temper = rng.uniform(0.2, 1.0, 60)
    t = stats.LimitTest(0.05)
    scalar = [t.update(int(a), int(b), float(c)) for a, b, c in zip(x, n, temper, strict=True)]
    # the vectorised twin with a per-interval temper: the running minimum of M_t ** -c_t
    np.testing.assert_allclose(stats.limit_paths(x, n, 0.05, temper=temper), scalar, rtol=1e-9)


# --------------------------------------------------------------------------- clustering by unit


def test_design_effect_predicts_the_randomisation_variance_of_an_arms_rate():
    """Independent check of the cluster-robust formula: re-randomise fixed, heterogeneous users to a 10 %
    arm many times; the arm rate's variance across assignments is the design effect times binomial."""
    rng = np.random.default_rng(21)
    users = 5000
    n_u = rng.poisson(np.exp(rng.normal(2.0, 1.0, users)))  # heavy users
    rates = np.where(rng.random(users) < 0.01, 0.5, 0.01)
    x_u = rng.binomial(n_u, rates)
    arm = rng.random((2000, users)) < 0.1
    n_arm = (arm * n_u).sum(1)
    r_arm = (arm * x_u).sum(1) / n_arm
    deff = np.array([stats.design_effect(n_u[a], x_u[a]) for a in arm[:200]])
    r = r_arm.mean()
    binomial = r * (1 - r) / n_arm.mean()
    assert deff.mean() > 3
    assert r_arm.var() / binomial == pytest.approx(deff.mean(), rel=0.25)
    # and the same users with identical rates: no design effect to speak of
    flat = rng.binomial(n_u, x_u.sum() / n_u.sum())
    assert stats.design_effect(n_u, flat) < 1.3


def test_pooled_design_effect_weights_each_arm_by_its_variance_share():
    assert stats.pooled_design_effect(4.0, 100, 1.0, 900) == pytest.approx((4 / 100 + 1 / 900) / (1 / 100 + 1 / 900))
    assert stats.pooled_design_effect(3.0, 0, 1.0, 10) == 3.0


# --------------------------------------------------------------------------- A/A and power through the controller


async def _runs(n, behaviours, *, seconds=20, rps=50, users=None, **policy):
    """``n`` seeded runs of the real Controller; it judges every 2 s (as often as the CPU budget of a
    CI test allows: the always-valid tests do not care how often they are looked at)."""
    out = []
    pol = make_policy(steps=None, **policy)
    config = ControllerConfig(interval_s=2.0)
    for seed in range(n):
        out.append(
            await run_controller(pol, behaviours, seconds=seconds, rps=rps, seed=seed, users=users, config=config)
        )
    return out


async def test_aa_at_the_error_limit_with_slow_tails_and_clustered_users_rarely_rolls_back():
    """The audit's worst A/A cases at once, through the real Controller (simulated clock): base error equal
    to ``max_error_rate`` (was 200/200 rolled back), log-normal sigma 1.0 under ``max_p99_ms: 250`` (was
    80 %), and 1 % of users failing half their requests in both arms (was 16.5 %). 200 runs of 20 s at
    50 req/s split 50/50 (500 canary requests each: the old point-estimate guardrail fired in about
    half of them). bench/bench_detection.py prints the full table."""
    same = Behaviour(0.05, median_ms=20.0, sigma=1.0)
    users = Users(bad_share=0.01, bad_rate=0.5)
    outcomes = await _runs(200, {"control": same, "canary": same}, users=users, weights=(50, 50))
    rolled = sum(o.rolled_back_at is not None for o in outcomes)
    # alpha = 0.05: at most 10 of 200; the always-valid bound makes it far fewer in practice
    assert rolled <= 10, [o.reason for o in outcomes if o.rolled_back_at is not None]


async def test_the_same_harness_catches_a_worse_canary():
    """Not vacuous: the harness and controller above roll back 3x the errors in almost every run."""
    users = Users(bad_share=0.01, bad_rate=0.5)
    outcomes = await _runs(30, {"control": Behaviour(0.05), "canary": Behaviour(0.15)}, users=users, weights=(50, 50))
    assert sum(o.rolled_back_at is not None for o in outcomes) >= 27


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


def test_srm_chi_square_agrees_with_scipy_and_the_always_valid_p_never_rises():
    counts, weights = [530, 470], [50, 50]
    r = stats.srm_check(counts, weights)
    ref = sps.chisquare(counts, [500, 500])
    assert r.chi2 == pytest.approx(ref.statistic) and r.p_chi2 == pytest.approx(ref.pvalue)
    # a running minimum: a later, more balanced look does not raise it again
    later = stats.srm_check([1000, 1000], weights, p_before=r.p_always_valid)
    assert later.p_always_valid == r.p_always_valid < 1.0
    assert stats.srm_check([1000, 1000], weights).p_always_valid == 1.0


def test_srm_bayes_factor_is_vectorised():
    counts = np.array([[500, 500], [600, 400]])
    log_bf = stats.srm_log_bf(counts, [0.5, 0.5])
    assert log_bf.shape == (2,)
    assert log_bf[1] > 10 > log_bf[0]
