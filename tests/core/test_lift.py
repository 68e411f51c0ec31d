"""Lift statistics: agree with statsmodels at a fixed horizon, hold their level while watched,
deliver the power the plan promises, and use units (not requests) as the observations.

Simulations are seeded and go through exactly `lift.lift` (via `plan.simulate`); a few hundred runs
each, sized to finish in seconds on a busy 2-core machine. The 1 000-run figures are in
``bench/bench_outcomes.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cohortgate.core import lift as L
from cohortgate.core import plan as P

statsmodels = pytest.importorskip("statsmodels")
import statsmodels.api as sm  # noqa: E402
from statsmodels.stats.power import NormalIndPower  # noqa: E402
from statsmodels.stats.proportion import confint_proportions_2indep  # noqa: E402
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW  # noqa: E402

ALPHA = 0.05


def _lift(y1, y0, kind, d1=None, d0=None, x1=None, x0=None, cuped=False, alpha=ALPHA, planned=10_000):
    return L.lift(L.unit_moments(y1, d1, x1), L.unit_moments(y0, d0, x0), kind, alpha, planned, cuped=cuped)


# --------------------------------------------------------------------------- an established engine


def test_binary_matches_statsmodels_wald_interval() -> None:
    rng = np.random.default_rng(1)
    y1, y0 = (rng.random(3000) < 0.12).astype(float), (rng.random(5000) < 0.10).astype(float)
    lf = _lift(y1, y0, "binary")
    lo, hi = confint_proportions_2indep(y1.sum(), y1.size, y0.sum(), y0.size, method="wald", compare="diff")
    assert float(lf.abs) == pytest.approx(y1.mean() - y0.mean(), rel=1e-12)
    assert (float(lf.ci_abs[0]), float(lf.ci_abs[1])) == pytest.approx((lo, hi), rel=1e-9)


def test_mean_matches_statsmodels_welch_z_interval() -> None:
    rng = np.random.default_rng(2)
    y1, y0 = rng.lognormal(0.1, 1.0, 2000), rng.lognormal(0.0, 1.0, 3000)
    lf = _lift(y1, y0, "mean")
    cm = CompareMeans(DescrStatsW(y1), DescrStatsW(y0))
    lo, hi = cm.zconfint_diff(alpha=ALPHA, usevar="unequal")
    assert (float(lf.ci_abs[0]), float(lf.ci_abs[1])) == pytest.approx((lo, hi), rel=1e-9)
    _, p = cm.ztest_ind(usevar="unequal")
    assert float(lf.p_fixed) == pytest.approx(p, rel=1e-9)


def test_ratio_delta_method_matches_cluster_robust_regression() -> None:
    # Request-level outcomes clustered by unit: the delta method on unit totals is the Liang-Zeger
    # sandwich of a regression on the arm, clustered by unit (up to n/(n-1) per arm).
    rng = np.random.default_rng(3)
    units = 1500
    arm = np.arange(units) < 600
    act = rng.integers(1, 30, units)
    p = rng.beta(0.5, 4.5, units) * np.where(arm, 1.1, 1.0)
    unit_of = np.repeat(np.arange(units), act)
    clicks = (rng.random(unit_of.size) < p[unit_of]).astype(float)
    y_u = np.bincount(unit_of, clicks, minlength=units)
    lf = _lift(y_u[arm], y_u[~arm], "ratio", d1=act[arm], d0=act[~arm])
    X = sm.add_constant(arm[unit_of].astype(float))
    fit = sm.OLS(clicks, X).fit(cov_type="cluster", cov_kwds={"groups": unit_of, "use_correction": False})
    assert float(lf.abs) == pytest.approx(fit.params[1], rel=1e-9)
    assert float(lf.abs_se) == pytest.approx(fit.bse[1], rel=2e-3)
    # ...and a request-level binomial standard error would be far too small here.
    r1, r0 = clicks[arm[unit_of]].mean(), clicks[~arm[unit_of]].mean()
    naive = math.sqrt(r1 * (1 - r1) / arm[unit_of].sum() + r0 * (1 - r0) / (~arm[unit_of]).sum())
    assert float(lf.abs_se) > 1.5 * naive


def test_cuped_equals_ancova_and_narrows_the_interval() -> None:
    rng = np.random.default_rng(4)
    n = 4000
    arm = rng.random(n) < 0.5
    x = rng.normal(10, 3, n)
    y = 0.8 * x + rng.normal(0, 2, n) + 0.3 * arm
    plain = _lift(y[arm], y[~arm], "mean")
    adj = _lift(y[arm], y[~arm], "mean", x1=x[arm], x0=x[~arm], cuped=True)
    X = sm.add_constant(np.column_stack([arm.astype(float), x - x.mean()]))
    fit = sm.OLS(y, X).fit(cov_type="HC2")
    assert float(adj.abs) == pytest.approx(fit.params[1], rel=1e-9)  # the ANCOVA coefficient
    assert float(adj.abs_se) == pytest.approx(fit.bse[1], rel=0.03)
    assert float(adj.abs_se) < 0.75 * float(plain.abs_se)  # rho ~ 0.77: variance * (1 - rho^2)


def test_plan_matches_statsmodels_power_solver() -> None:
    for split in ((50, 50), (90, 10)):
        pl = P.plan(10.0, 0.05, kind="mean", sd=4.0, split=split, rps=100)
        ratio = split[0] / split[1]
        n1 = NormalIndPower().solve_power(effect_size=0.5 / 4.0, alpha=ALPHA, power=0.8, ratio=ratio)
        assert pl.units_fixed == pytest.approx(n1 * (1 + ratio), abs=2)


# --------------------------------------------------------------------------- always valid


@pytest.mark.parametrize("kind", L.KINDS)
def test_aa_false_win_and_false_loss_stay_under_alpha_while_looking_every_interval(kind: str) -> None:
    # Heterogeneous units (Beta propensities, log-normal activity): 300 runs x 40 looks each.
    r = P.simulate(P.Population(kind=kind, base=0.1), units=4000, looks=40, runs=300, seed=11)
    assert r.win <= ALPHA and r.loss <= ALPHA, r
    assert r.win + r.loss <= ALPHA, r


def test_peeking_at_the_fixed_horizon_interval_would_not_hold_its_level() -> None:
    # The control experiment for the test above: the same data, the Wald interval checked at every
    # look, rejects far more often than alpha. Shows the simulation can see a broken test.
    rng = np.random.default_rng(12)
    runs, units, looks = 300, 4000, 40
    arm = rng.random((runs, units)) < 0.5
    y = rng.normal(0, 1, (runs, units))
    idx = np.linspace(units / looks, units, looks).astype(int) - 1
    m1 = L.take(L.unit_moments(y, where=arm, cumulative=True), idx)
    m0 = L.take(L.unit_moments(y, where=~arm, cumulative=True), idx)
    lf = L.lift(m1, m0, "mean", ALPHA, units)
    peeked = ((lf.ci_abs[0] > 0) | (lf.ci_abs[1] < 0)).any(axis=-1).mean()
    always = ((lf.cs_abs[0] > 0) | (lf.cs_abs[1] < 0)).any(axis=-1).mean()
    assert peeked > 2 * ALPHA
    assert always <= ALPHA


def test_request_level_variance_breaks_the_level_that_unit_level_keeps() -> None:
    # Ratio metric, heavy and different users: treat every request as independent (binomial over
    # requests) and A/A "wins" and "losses" appear; the delta method on unit totals holds.
    rng = np.random.default_rng(13)
    runs, units = 300, 3000
    pop = P.Population(kind="ratio", base=0.1, concentration=1.0, activity_sigma=1.2)
    arm = rng.random((runs, units)) < 0.5
    y, d, _ = P._draw(pop, rng, (runs, units), np.ones(1))

    def request_level(where):  # each request a Bernoulli observation
        return L.Moments(
            n=(d * where).sum(-1), sy=(y * where).sum(-1), syy=(y * where).sum(-1),
            sd=(d * where).sum(-1), sdd=(d * where).sum(-1), syd=(y * where).sum(-1),
            sx=0 * y.sum(-1), sxx=0 * y.sum(-1), sxy=0 * y.sum(-1), sdx=0 * y.sum(-1),
        )  # fmt: skip

    naive = L.lift(request_level(arm), request_level(~arm), "binary", ALPHA, 10_000)
    unit = L.lift(L.unit_moments(y, d, where=arm), L.unit_moments(y, d, where=~arm), "ratio", ALPHA, 10_000)
    assert np.allclose(naive.abs, unit.abs)  # same estimate ...
    naive_rate = ((naive.ci_abs[0] > 0) | (naive.ci_abs[1] < 0)).mean()
    unit_rate = ((unit.ci_abs[0] > 0) | (unit.ci_abs[1] < 0)).mean()
    assert naive_rate > 3 * ALPHA  # ... but request-level intervals are too narrow
    assert unit_rate <= 2 * ALPHA  # a fixed-horizon 5 % test: within noise of 300 runs


def test_power_for_a_planted_lift_matches_the_plan_within_10_percent() -> None:
    # Homogeneous binary units so the plan's variances are the truth; looks as the plan assumes.
    base, mde = 0.2, 0.25
    first = P.plan(base, mde, split=(50, 50), rps=1.0)
    pl = P.plan(base, mde, split=(50, 50), rps=first.units_sequential / 30)
    assert 25 <= pl.looks <= 35
    pop = P.Population(kind="binary", base=base, concentration=1e9, activity_sigma=0.0)
    seq = P.simulate(
        pop, units=pl.units_sequential, looks=pl.looks, runs=300, lift=mde, planned_units=pl.units_sequential, seed=14
    )
    fixed = P.simulate(pop, units=pl.units_fixed, looks=1, runs=300, lift=mde, seed=15)
    assert abs(seq.win - 0.8) <= 0.08, seq
    assert abs(fixed.fixed_win - 0.8) <= 0.08, fixed
    assert seq.loss == 0.0


def test_cuped_narrows_the_sequence_on_correlated_data() -> None:
    pop = P.Population(kind="mean", base=0.2, concentration=1.0, activity_sigma=1.0, value_sigma=0.5)
    plain = P.simulate(pop, units=3000, looks=10, runs=100, seed=16)
    adj = P.simulate(pop, units=3000, looks=10, runs=100, seed=16, cuped=True)
    assert adj.final_width < 0.9 * plain.final_width
    assert adj.win <= ALPHA and adj.loss <= ALPHA


def test_the_sequence_is_wider_than_the_fixed_interval_and_tightest_near_the_plan() -> None:
    factors = L.cs_factor(np.array([1000, 10_000, 100_000]), 10_000, ALPHA)
    assert np.all(np.sqrt(factors) > 1.96)
    # relative to the fixed interval (same variance), the price is smallest at the planned size
    assert np.argmin(np.sqrt(factors)) >= 1
    pl = P.plan(0.05, 0.1, split=(90, 10), rps=200, max_looks=50)
    assert 1.2 < pl.price < 2.5
    assert pl.seconds_sequential > pl.seconds_fixed


def test_p_always_and_the_sequence_agree() -> None:
    rng = np.random.default_rng(17)
    y1, y0 = rng.normal(0.08, 1, (200, 3000)), rng.normal(0, 1, (200, 3000))
    lf = L.lift(L.unit_moments(y1), L.unit_moments(y0), "mean", ALPHA, 6000)
    excludes = (lf.cs_abs[0] > 0) | (lf.cs_abs[1] < 0)
    assert np.array_equal(excludes, lf.p_always < ALPHA)
    assert 0 < excludes.mean() < 1


def test_nothing_is_said_before_the_burn_in_or_without_variance() -> None:
    lf = _lift(np.ones(50), np.zeros(50), "binary")
    assert not bool(lf.valid) and float(lf.p_always) == 1.0 and float(lf.cs_abs[0]) == -math.inf
    same = _lift(np.zeros(500), np.zeros(500), "binary")
    assert not bool(same.valid)


# --------------------------------------------------------------------------- multiplicity, decisions


def test_multiplicity() -> None:
    assert L.per_challenger(0.05, 3) == pytest.approx(0.05 / 3)
    assert L.holm([0.01, 0.04, 0.03], 0.05).tolist() == [True, False, False]
    assert L.holm([0.01, 0.02, 0.03], 0.05).tolist() == [True, True, True]
    pl1, pl3 = (P.plan(0.1, 0.1, split=s, max_looks=50) for s in ((50, 50), (50, 25, 25)))
    assert pl3.alpha == pytest.approx(0.05 / 2) and pl3.units_fixed > pl1.units_fixed


def _bounds(lo: float, hi: float) -> L.Bounds:
    return L.Bounds(lo * 0.1, hi * 0.1, lo, hi)  # control mean 0.1: relative = absolute / 0.1


@pytest.mark.parametrize(
    ("direction", "lo", "hi", "units", "verdict"),
    [
        ("increase", 0.01, 0.2, 500, L.Verdict.WIN),
        ("increase", -0.2, -0.01, 500, L.Verdict.LOSS),
        ("increase", -0.1, 0.1, 500, L.Verdict.PENDING),
        ("increase", -0.1, 0.1, 10_000, L.Verdict.INCONCLUSIVE),
        ("increase", -0.001, 0.3, 20_000, L.Verdict.INCONCLUSIVE),  # never a win without a crossing
        ("decrease", -0.2, -0.01, 500, L.Verdict.WIN),
        ("decrease", 0.01, 0.2, 500, L.Verdict.LOSS),
    ],
)
def test_primary_verdicts(direction, lo, hi, units, verdict) -> None:
    spec = L.MetricSpec("conversion", direction=direction, planned_units=10_000)
    d = L.decide(spec, _bounds(lo, hi), units, ALPHA)
    assert d.verdict is verdict
    assert d.win == (verdict is L.Verdict.WIN) and d.non_inferior is None


@pytest.mark.parametrize(
    ("direction", "lo", "hi", "units", "verdict"),
    [
        ("increase", -0.01, 0.05, 500, L.Verdict.NON_INFERIOR),  # margin 2 %
        ("increase", -0.03, 0.05, 500, L.Verdict.PENDING),
        ("increase", -0.03, 0.05, 10_000, L.Verdict.INCONCLUSIVE),
        ("increase", -0.2, -0.03, 500, L.Verdict.INFERIOR),
        ("decrease", -0.05, 0.01, 500, L.Verdict.NON_INFERIOR),  # latency: lower is better
        ("decrease", 0.03, 0.2, 500, L.Verdict.INFERIOR),
    ],
)
def test_guardrail_verdicts_read_the_margin(direction, lo, hi, units, verdict) -> None:
    spec = L.MetricSpec("revenue", kind="mean", direction=direction, role="guardrail", margin=0.02)
    assert L.decide(spec, _bounds(lo, hi), units, ALPHA).verdict is verdict


def test_specs_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="margin"):
        L.MetricSpec("x", role="guardrail")
    with pytest.raises(ValueError, match="kind"):
        L.MetricSpec("x", kind="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        P.plan(0.05, 0.02, kind="mean")  # a mean metric needs its sd


def test_bounds_only_narrow() -> None:
    rng = np.random.default_rng(18)
    b = L.Bounds()
    widths = []
    for n in (500, 1000, 2000, 4000):
        lf = _lift(rng.normal(0, 1, n), rng.normal(0, 1, n), "mean")
        b = b.narrow(lf)
        widths.append(b.abs_hi - b.abs_lo)
    assert widths == sorted(widths, reverse=True)
    assert b.abs_lo < 0 < b.abs_hi


def test_parse_split() -> None:
    assert P.parse_split("90/10") == (90.0, 10.0)
    assert P.parse_split("80/10/10") == (80.0, 10.0, 10.0)
    for bad in ("100", "90/0", "a/b"):
        with pytest.raises(ValueError):
            P.parse_split(bad)
