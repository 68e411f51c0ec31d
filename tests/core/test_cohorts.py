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
    before, after, grown = step
    rolled_back = list(after)
    rolled_back[0] += rolled_back[grown]
    rolled_back[grown] = 0
    zero = list(before)
    zero[0] += zero[grown]
    zero[grown] = 0
    key = cohorts.salt_key(salt)
    for unit in unit_list:
        # rolled back, every unit sits where it would with the variant never launched
        assert cohorts.assign(rolled_back, key, unit) == cohorts.assign(zero, key, unit)
        # and units the variant did not hold never moved
        if cohorts.assign(after, key, unit) != grown:
            assert cohorts.assign(rolled_back, key, unit) == cohorts.assign(after, key, unit)


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
    # the same salt, by contrast, is perfectly dependent
    same = sum(cohorts.assign(w, a, f"user-{i}") == cohorts.assign(w, a, f"user-{i}") for i in range(1000))
    assert same == 1000


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
    assert cohorts.bucket_of(cohorts.salt_key("tabular-2026-11"), "alice") == 6004
    assert cohorts.bucket_of(cohorts.salt_key("tabular-2026-11"), "bob") != cohorts.bucket_of(
        cohorts.salt_key("other-salt"), "bob"
    ) or cohorts.bucket_of(cohorts.salt_key("tabular-2026-11"), "carol") != cohorts.bucket_of(
        cohorts.salt_key("other-salt"), "carol"
    )
