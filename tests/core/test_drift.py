"""Drift statistics agree with scipy and behave as their names promise (pure: no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2, chi2_contingency, wasserstein_distance

from cohortgate.core import drift


@dataclass(frozen=True)
class Num:
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    nulls: int = 0
    below: int = 0
    above: int = 0


@dataclass(frozen=True)
class Cat:
    counts: dict[str, int] = field(default_factory=dict)


counts = st.lists(st.integers(0, 1000), min_size=2, max_size=30).filter(lambda c: sum(c) > 0)


@given(counts, st.data())
@settings(max_examples=200, deadline=None)
def test_js_distance_is_scipys_base_2_jensenshannon(p, data):
    q = data.draw(st.lists(st.integers(0, 1000), min_size=len(p), max_size=len(p)).filter(lambda c: sum(c) > 0))
    assert drift.js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-9)


@given(counts, st.data())
@settings(max_examples=200, deadline=None)
def test_binned_wasserstein_is_scipys_on_the_bin_centres(p, data):
    q = data.draw(st.lists(st.integers(0, 1000), min_size=len(p), max_size=len(p)).filter(lambda c: sum(c) > 0))
    points = np.cumsum(data.draw(st.lists(st.floats(0.01, 10), min_size=len(p), max_size=len(p))))
    expected = wasserstein_distance(points, points, p, q)
    assert drift.wasserstein_binned(p, q, points) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_psi_is_the_symmetrised_kl_with_floored_shares():
    p, q = np.array([50, 30, 20, 0]), np.array([20, 30, 40, 10])
    ps, qs = np.maximum(p / p.sum(), 1e-4), np.maximum(q / q.sum(), 1e-4)
    kl = lambda a, b: float((a * np.log(a / b)).sum())  # noqa: E731
    # PSI = KL(q||p) + KL(p||q) for shares that sum to one (up to the floor's tiny excess)
    assert drift.psi(p, q) == pytest.approx(((qs - ps) * np.log(qs / ps)).sum())
    assert drift.psi(p, q) == pytest.approx(kl(qs, ps) + kl(ps, qs), rel=1e-3)
    assert drift.psi(p, p) == 0.0
    assert drift.psi([10] * 10, [20, 0, *[10] * 8]) > 0.2  # an emptied decile is a shift


def test_identical_windows_have_zero_drift_and_disjoint_ones_the_maximum():
    assert drift.js_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)
    assert drift.js_distance([5, 0], [0, 7]) == pytest.approx(1.0)
    assert drift.wasserstein_binned([1, 0, 0], [0, 0, 1], [0.0, 1.0, 2.0]) == pytest.approx(2.0)


def test_statistics_vectorise_over_leading_axes():
    rng = np.random.default_rng(3)
    p = rng.integers(0, 100, size=(4, 5, 8))
    q = rng.integers(1, 100, size=(4, 5, 8))
    points = np.arange(8.0)
    for f, args in ((drift.psi, ()), (drift.js_distance, ()), (drift.wasserstein_binned, (points,))):
        batched = f(p, q, *args)
        assert batched.shape == (4, 5)
        assert batched[2, 3] == pytest.approx(float(f(p[2, 3], q[2, 3], *args)))


def test_numeric_sketch_drift_counts_nulls_and_out_of_range_as_categories():
    edges = tuple(np.linspace(0, 10, 11))
    ref = Num(edges, (100,) * 10)
    same = Num(edges, (100,) * 10)
    nulls = Num(edges, (50,) * 10, nulls=500)
    d0 = drift.feature_drift("x", ref, same)
    assert (d0.psi, d0.js, d0.wasserstein) == (0.0, 0.0, 0.0)
    d = drift.feature_drift("x", ref, nulls)
    assert d.psi > 0.2 and d.js > 0.1  # half the values now arrive empty: drift
    assert d.wasserstein == pytest.approx(0.0)  # ... though the values that arrive are where they were
    shifted = Num(edges, (0, 0, *(100,) * 8), above=200)
    ds = drift.feature_drift("x", ref, shifted)
    centres = drift.bin_centres(edges)
    r, c = drift.numeric_vector(ref)[:-1], drift.numeric_vector(shifted)[:-1]
    expected = wasserstein_distance(centres, centres, r, c) / drift.binned_std(r, centres)
    assert ds.wasserstein == pytest.approx(expected)
    assert ds.n_reference == 1000 and ds.n_current == 1000


def test_categorical_drift_takes_the_union_of_categories():
    d = drift.feature_drift("tier", Cat({"gold": 50, "silver": 50}), Cat({"gold": 50, "bronze": 50}))
    assert d.kind == "categorical" and d.wasserstein is None
    assert d.js == pytest.approx(jensenshannon([0, 50, 50, 0, 0], [50, 50, 0, 0, 0], base=2))


def test_real_sketches_from_the_wire_format_compare():
    from cohortgate.core.sketch import CategoricalSketch, NumericSketch

    rng = np.random.default_rng(1)
    edges = np.linspace(-3, 3, 13)
    a, b = NumericSketch.of(rng.normal(size=5000), edges), NumericSketch.of(rng.normal(0.5, 1, 5000), edges)
    d = drift.feature_drift("x", a, b)
    assert d.n_reference == d.n_current == 5000 and d.p_value < 1e-9
    assert d.wasserstein == pytest.approx(0.5, abs=0.08)  # half a standard deviation, as planted
    c1 = CategoricalSketch.of(["a"] * 50 + ["b"] * 50, ["a", "b"])
    c2 = CategoricalSketch.of(["a"] * 50 + ["zz"] * 40 + [None] * 10, ["a", "b"])
    dc = drift.feature_drift("c", c1, c2)  # undeclared values and nulls are categories of their own
    assert dc.js == pytest.approx(jensenshannon([50, 50, 0, 0], [50, 0, 10, 40], base=2))


def test_sketches_that_do_not_fit_are_refused_and_skipped_in_the_summary():
    a = Num((0.0, 1.0, 2.0), (5, 5))
    b = Num((0.0, 1.0, 3.0), (5, 5))
    with pytest.raises(drift.IncomparableSketches):
        drift.feature_drift("x", a, b)
    with pytest.raises(drift.IncomparableSketches):
        drift.feature_drift("x", a, Cat({"a": 1}))
    s = drift.summarize({"x": a, "y": Cat({"a": 600})}, {"x": b, "y": Cat({"a": 600})}, drift.Thresholds())
    assert set(s.features) == {"y"} and s.judged == 1 and not s.drifted


def test_summary_gives_the_share_of_drifted_features_and_respects_the_minimum_sample():
    edges = tuple(np.linspace(0, 1, 11))
    ref = {f"f{i}": Num(edges, (100,) * 10) for i in range(4)}
    cur = dict(ref)
    cur["f0"] = Num(edges, (0,) * 5 + (200,) * 5)
    s = drift.summarize(ref, cur, drift.Thresholds())
    assert dict(s.drifted) == {"f0": ("psi", "js", "wasserstein")}
    assert s.share_drifted == pytest.approx(0.25)
    assert s.max_js == pytest.approx(s.features["f0"].js) and s.mean_js == pytest.approx(s.max_js / 4)
    few = drift.summarize(ref, cur, drift.Thresholds(min_samples=5000))
    assert not few.drifted and few.judged == 0  # too few samples to say anything


@given(counts, st.data())
@settings(max_examples=100, deadline=None)
def test_homogeneity_p_is_scipys_pearson_chi_square_on_the_pooled_table(p, data):
    q = data.draw(st.lists(st.integers(0, 1000), min_size=len(p), max_size=len(p)).filter(lambda c: sum(c) > 0))
    table = np.array([p, q])
    rare = table.sum(0) < drift.POOL_BELOW  # sparse categories pooled into one (Cochran's rule)
    table = np.column_stack([table[:, ~rare], table[:, rare].sum(1)])
    table = table[:, table.sum(0) > 0]
    got = float(drift.homogeneity_p(p, q))
    if table.shape[1] < 2:
        assert got == 1.0
        return
    x2, expected_p, dof, _ = chi2_contingency(table, correction=False)
    assert got == pytest.approx(expected_p, rel=1e-6, abs=1e-12)
    assert got == pytest.approx(chi2.sf(x2, dof), rel=1e-6, abs=1e-12)


def test_aa_noise_is_kept_out_by_the_g_test_at_its_level():
    """Two samples of one distribution at the default minimum sample: the effect sizes are noisy
    (JS ~0.12 for 20 bins), but a feature drifts only when the chi-square test also rejects, at ``alpha``."""
    rng = np.random.default_rng(7)
    shares = rng.dirichlet(np.ones(20))
    t = drift.Thresholds()
    ref = rng.multinomial(t.min_samples, shares, size=4000)
    cur = rng.multinomial(t.min_samples, shares, size=4000)
    assert np.mean(drift.js_distance(ref, cur)) > 0.05  # the noise the threshold alone would trip on
    p = drift.homogeneity_p(ref, cur)
    assert np.mean(p < 0.01) <= 0.015  # the corrected test's level (asymptotic chi-square), with slack
    shifted = rng.multinomial(t.min_samples, np.roll(shares, 3), size=200)
    assert np.mean(drift.homogeneity_p(ref[:200], shifted) < t.alpha) > 0.95  # a real move is seen
