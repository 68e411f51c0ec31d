"""Windows: histogram quantiles, exceedance counts, sliding expiry, batches and unit counting."""

from __future__ import annotations

import numpy as np
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
    recent = w.sliding(now=129.5)
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
