"""Sticky cohorts: the five properties the policy's users rely on."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cohortgate.core import cohorts
from tests.strategies import ramp, salts, units, weights


@given(w=weights(), salt=salts, unit=units)
def test_deterministic(w, salt, unit):
    key = cohorts.salt_key(salt)
    first = cohorts.assign(w, key, unit)
    assert all(cohorts.assign(w, cohorts.salt_key(salt), unit) == first for _ in range(3))
    assert w[first] > 0


@settings(max_examples=10, deadline=None)
@given(w=weights(), salt=salts)
def test_even_split_within_one_point(w, salt):
    key = cohorts.salt_key(salt)
    bounds, owners = cohorts.layout(w)
    n = 100_000
    counts = np.zeros(len(w))
    for i in range(n):
        counts[cohorts.owner_of(bounds, owners, cohorts.bucket_of(key, f"user-{i}"))] += 1
    shares = counts / n * 100
    assert np.all(np.abs(shares - np.array(w)) <= 1.0), (w, shares)


@given(step=ramp(), salt=salts, unit_list=st.lists(units, min_size=1, max_size=200))
def test_monotone_ramp_moves_units_only_into_the_grown_variant(step, salt, unit_list):
    before, after, grown = step
    key = cohorts.salt_key(salt)
    for unit in unit_list:
        old, new = cohorts.assign(before, key, unit), cohorts.assign(after, key, unit)
        if old != new:
            assert new == grown, (before, after, unit)


@given(step=ramp(), salt=salts, unit_list=st.lists(units, min_size=1, max_size=200))
def test_rollback_returns_units_to_where_they_were(step, salt, unit_list):
    """Ramp up, then roll the grown variant back to 0: its units go to control, nobody else moves."""
    before, after, grown = step
    rolled_back = list(after)
    rolled_back[0] += rolled_back[grown]
    rolled_back[grown] = 0
    key = cohorts.salt_key(salt)
    for unit in unit_list:
        was, ramped, back = (cohorts.assign(w, key, unit) for w in (before, after, rolled_back))
        # the variant's units (from before the ramp and from the ramp) are all back on control
        assert back == (0 if ramped == grown else ramped), (before, after, unit)
        # and every unit outside the variant before the ramp sits where it sat then
        if was != grown:
            assert back == was, (before, after, unit)


def test_independent_routes_with_different_salts():
    """Membership in one route's canary says nothing about another route's (chi-square)."""
    a, b = cohorts.salt_key("route-a"), cohorts.salt_key("route-b")
    w = [50, 50]
    table = np.zeros((2, 2))
    for i in range(20_000):
        unit = f"user-{i}"
        table[cohorts.assign(w, a, unit), cohorts.assign(w, b, unit)] += 1
    _, p, _, _ = stats.chi2_contingency(table)
    assert p > 0.001, table
    # and the salt really enters the hash: nearly every unit lands in another bucket (1 in 10 000 alike)
    differ = sum(cohorts.bucket_of(a, f"user-{i}") != cohorts.bucket_of(b, f"user-{i}") for i in range(1000))
    assert differ >= 990, differ


def test_layout_rejects_bad_weights():
    for bad in ([50, 40], [101, -1], [-5, 105]):
        try:
            cohorts.layout(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_three_way_layout_owners_cover_all_buckets():
    bounds, owners = cohorts.layout([60, 25, 15])
    seen = [cohorts.owner_of(bounds, owners, b) for b in range(cohorts.BUCKETS)]
    assert [seen.count(i) for i in range(3)] == [6000, 2500, 1500]


def test_bucket_is_a_stable_function_of_salt_and_unit():
    """Golden values: a change of hash function would silently reshuffle every live experiment."""
    tabular, other = cohorts.salt_key("tabular-2026-11"), cohorts.salt_key("other-salt")
    assert [cohorts.bucket_of(tabular, u) for u in ("alice", "bob", "carol", "")] == [6004, 7253, 4905, 7755]
    assert [cohorts.bucket_of(other, u) for u in ("alice", "bob", "carol", "")] == [1755, 9483, 1985, 7157]
