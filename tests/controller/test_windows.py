"""Windows: histogram quantiles, exceedance counts, sliding expiry, batches and unit counting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohortgate.controller import windows
from cohortgate.controller.windows import RouteWindows, VariantWindow


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.02, 500_000, allow_nan=False), min_size=1, max_size=300))
def test_histogram_quantiles_are_within_one_bin(latencies):
    hist = np.zeros(windows.LAT_BINS, dtype=np.int64)
    for x in latencies:
        hist[windows.bin_of(x)] += 1
    np.testing.assert_array_equal(windows.bins_of(np.array(latencies)), [windows.bin_of(x) for x in latencies])
    for q in (0.5, 0.99):
        exact = float(np.quantile(latencies, q, method="inverted_cdf"))
        approx = windows.quantile(hist, q)
        assert exact <= approx <= exact * windows.LAT_RATIO * 1.0001


def test_count_above_counts_requests_slower_than_the_quantile_bin():
    hist = np.zeros(windows.LAT_BINS, dtype=np.int64)
    for x in [10.0] * 95 + [100.0] * 5:
        hist[windows.bin_of(x)] += 1
    p95 = windows.quantile(hist, 0.95)
    assert 10.0 <= p95 < 10.6
    assert windows.count_above(hist, p95) == 5
    assert windows.count_above(hist, 1e9) == 0


def test_errors_are_5xx_and_missing_responses():
    assert [windows.is_error(s) for s in (200, 404, 429, 500, 503, 0)] == [False, False, False, True, True, True]


def test_sliding_window_forgets_old_seconds_but_step_totals_do_not():
    w = VariantWindow(span_s=10)
    for t in range(30):
        w.add(500 if t < 5 else 200, 12.0, f"u{t}", now=100.0 + t)
    recent = w.sliding(now=130.0)  # an integer tick: the seconds 120..129
    assert recent.n == 10 and recent.errors == 0
    assert w.step.n == 30 and w.step.errors == 5
    batch = w.drain()
    assert batch.n == 30 and w.drain().n == 0
    w.new_step()
    assert w.step.n == 0


def test_units_count_only_after_the_srm_restart():
    rw = RouteWindows(["control", "canary"])
    rw.add("control", 200, 1.0, "a", now=1.0)
    rw.reset_srm(start_at=5.0)
    rw.add("control", 200, 1.0, "b", now=4.0)  # before gateways applied the new weights
    rw.add("canary", 200, 1.0, "c", now=6.0)
    rw.add("canary", 200, 1.0, "c", now=7.0)  # the same unit twice
    assert rw.unit_counts() == {"control": 0, "canary": 1}
    assert not rw.add("ghost", 200, 1.0, "d", now=8.0)


def test_a_sixty_second_window_holds_sixty_seconds_at_integer_ticks():
    """One request per second for 200 s: at every integer tick the window holds exactly 60 (was 59)."""
    w = VariantWindow(span_s=60)
    seen = []
    for t in range(200):
        w.add(200, 10.0, "u", now=1000.0 + t + 0.5)
        seen.append(w.sliding(now=1000.0 + t + 1).n)
    assert seen[59:] == [60] * (200 - 59)
    assert seen[:59] == list(range(1, 60))


def test_unit_tally_design_effect_is_one_for_independent_requests_and_large_for_clustered_ones():
    rng = np.random.default_rng(4)
    independent, clustered = windows.UnitTally(), windows.UnitTally()
    users = rng.integers(0, 2000, 40_000)
    rates = np.where(np.arange(2000) < 20, 0.5, 0.01)  # 1 % of users fail half of their requests
    same = rng.random(40_000) < rates.mean()
    own = rng.random(40_000) < rates[users]
    independent.add_many(users.tolist(), np.stack([same, same, same]))
    clustered.add_many(users.tolist(), np.stack([own, own, own]))
    assert independent.design_effect(windows.ERRORS) < 1.3
    assert clustered.design_effect(windows.ERRORS) > 3  # 1 + (20 - 1) * var(rate) / (p (1 - p)) = 4.1


def test_outcomes_without_a_unit_count_as_units_of_their_own():
    tally = windows.UnitTally()
    bad = np.zeros((3, 1000), bool)
    bad[0, ::10] = True
    tally.add_many([""] * 1000, bad)
    assert tally.singles == 1000 and not tally.index
    assert tally.design_effect(windows.ERRORS) == pytest.approx(1.0, rel=0.01)


def test_route_windows_count_srm_units_only_where_marked():
    rw = RouteWindows(["control", "canary"])
    unknown = rw.add_many(
        np.array([0, 1, 1, 5]),
        np.array([200, 200, 503, 200]),
        np.ones(4),
        ["a", "b", "c", "d"],
        1.0,
        np.array([True, False, True, True]),
    )
    assert unknown == 1
    assert rw.unit_counts() == {"control": 1, "canary": 1}
    assert rw.variants["canary"].batch.errors == 1 and rw.variants["canary"].tally.n.sum() == 2


def test_integer_units_and_string_units_tally_alike():
    """Simulations pass integer unit ids as an array (vectorised path); the loop passes hashes."""
    rng = np.random.default_rng(8)
    users = rng.integers(0, 300, 5000)
    bad = np.stack([rng.random(5000) < np.where(users < 10, 0.5, 0.02)] * 3)
    a, b = windows.UnitTally(), windows.UnitTally()
    for chunk in np.array_split(np.arange(5000), 7):
        a.add_many(users[chunk], bad[:, chunk])
        b.add_many([f"u{u}" for u in users[chunk]], bad[:, chunk])
    assert a.size == b.size == len(set(users.tolist()))
    assert a.design_effect(windows.ERRORS) == pytest.approx(b.design_effect(windows.ERRORS))
    assert a.design_effect(windows.ERRORS) > 2
